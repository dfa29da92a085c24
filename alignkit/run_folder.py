"""Run folders: make or reopen one, and check a resume against the run's saved config.

A new run refuses a folder that already holds a run. ``--resume`` compares the resolved config
with the run's ``config.yaml`` (never rewritten): changes that would break exactness (model,
data, batch, seed, alignment, ...) are refused with the list of them; the safe ones users need
(``train.steps`` longer, eval/save/log cadence, checkpoints kept) are allowed and recorded in
``resumes.jsonl``. A finished run (``results.json``) is left as it is.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from alignkit.core.checkpoint import checkpoint_dirs, checkpoint_step
from alignkit.core.errors import ConfigError, MissingFile, RunDirError
from alignkit.core.folder_lock import LOCK_FILE
from alignkit.experiment import ExperimentConfig, load_experiment, save_resolved

# placement and cadence only: none of these changes a number the run computes (tests pin it)
SAFE_CHANGES = ("train.steps", "train.eval_every", "train.save_every", "train.log_every", "train.keep_checkpoints",
                "train.loggers", "teacher.options.shard")
NOT_COMPARED = ("run_name", "output_dir")  # the folder itself is named by --resume
RESUMES_FILE = "resumes.jsonl"


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: list(node) if isinstance(node, tuple) else node}  # YAML has no tuples


def config_changes(saved: Path, cfg: ExperimentConfig) -> dict[str, tuple[Any, Any]]:
    """{key: (saved value, new value)} for every key the two configs both have and differ on."""
    old = _flat(OmegaConf.to_container(OmegaConf.load(saved)))
    new = _flat(OmegaConf.to_container(OmegaConf.structured(cfg)))
    return {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys())
            if k not in NOT_COMPARED and old[k] != new[k]}


def resume_config(run_dir: Path, overrides: list[str]) -> ExperimentConfig:
    """The config a ``--resume`` without a recipe continues with: the saved one, the changes
    of earlier resumes, then ``overrides``."""
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        raise MissingFile(f"--resume {run_dir}: no config.yaml there (is it a run folder?)")
    earlier = [f"{k}={json.dumps(v[1])}" for r in _resumes(Path(run_dir)) for k, v in r["changes"].items()]
    return load_experiment(saved, earlier + list(overrides))


def _resumes(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / RESUMES_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_step(run_dir: Path) -> int:
    found = checkpoint_dirs(run_dir)
    return checkpoint_step(found[-1]) if found else 0  # type: ignore[return-value]


def is_finished(run_dir: Path, cfg: ExperimentConfig) -> bool:
    return (run_dir / "results.json").is_file() and last_step(run_dir) >= cfg.train.steps


def open_new(cfg: ExperimentConfig, run_dir: Path) -> None:
    """Claim ``run_dir`` for a new run (main rank, lock held) and save the resolved config."""
    if (run_dir / "config.yaml").exists() or (run_dir / "metrics.jsonl").exists():
        hint = "" if checkpoint_dirs(run_dir) else " (it has no checkpoint yet: --resume starts it over)"
        raise RunDirError(f"{run_dir} already holds a run: pass --resume {run_dir}{hint} or choose another run_name")
    save_resolved(cfg, run_dir)


def discard_unstarted(run_dir: Path) -> None:
    """Remove a new run's folder that holds nothing but its config and lock (main rank, lock
    held): its build failed (a model or data that cannot be loaded), and a retry should not
    find a folder to clean up."""
    if {path.name for path in run_dir.iterdir()} <= {"config.yaml", LOCK_FILE}:
        shutil.rmtree(run_dir, ignore_errors=True)


def open_resumed(cfg: ExperimentConfig, run_dir: Path) -> bool:
    """Check a resume of ``run_dir`` (main rank, lock held); record it. False when there is no
    checkpoint yet, so the run starts over in the same folder."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise RunDirError(f"--resume {run_dir}: no config.yaml there; is it a run folder?")
    changes = config_changes(saved, cfg)
    unsafe = {k: v for k, v in changes.items() if k not in SAFE_CHANGES}
    if unsafe:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in unsafe.items())
        raise ConfigError(f"--resume {run_dir}: these changes would break an exact resume: {listed} "
                          f"(only {', '.join(SAFE_CHANGES)} may change; start a new run for the others)")
    step = last_step(run_dir)
    if cfg.train.steps < step:
        raise ConfigError(f"train.steps={cfg.train.steps} is before the checkpoint at step {step}; pass train.steps >= {step}")
    with open(run_dir / RESUMES_FILE, "a") as handle:
        handle.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "from_step": step,
                                 "changes": {k: list(v) for k, v in changes.items()}}) + "\n")
    if not checkpoint_dirs(run_dir):
        for stale in ("metrics.jsonl", "results.json"):
            (run_dir / stale).unlink(missing_ok=True)
        return False
    return True
