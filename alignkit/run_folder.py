"""Run folders: make or reopen one, and check a resume against the run's saved config.

A new run refuses a folder that already holds a run. ``--resume`` compares the resolved config
with the run's ``config.yaml`` (never rewritten): changes that would break exactness (model,
data, batch, seed, alignment, ...) are refused with the list of them; the safe ones users need
(``train.steps`` longer, eval/save/log cadence, checkpoints kept) are allowed and recorded in
``resumes.jsonl`` once the checkpoint has loaded (a refused resume writes nothing). A finished
run (``results.json``) is left as it is.

A resume keeps the run's global batch (sequences per optimizer step, in every checkpoint's
``trainer.json``) on any number of processes: :func:`resumed_grad_accum` recomputes
``train.grad_accum`` for the new count, or refuses when the batch cannot be split over it; so
``train.grad_accum`` is not compared with the saved config once the run has a checkpoint.

A new run's folder is ``output_dir/run_name`` itself, never a symlink out of it. A new run that
fails before it has written anything but its claim (``config.yaml``, ``.lock``) leaves no folder,
so the same command can simply be run again; ``--resume`` of a folder that is not a run is
refused before anything is written there.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from alignkit.core.checkpoint import checkpoint_dirs, checkpoint_step, read_json, saved_ranks
from alignkit.core.errors import CheckpointError, ConfigError, MissingFile, RunDirError
from alignkit.core.folder_lock import LOCK_FILE
from alignkit.experiment import ExperimentConfig, load_experiment, save_resolved

# placement and cadence only: none of these changes a number the run computes (tests pin it)
SAFE_CHANGES = ("train.steps", "train.eval_every", "train.save_every", "train.log_every", "train.keep_checkpoints",
                "train.loggers", "teacher.options.shard")
NOT_COMPARED = ("run_name", "output_dir")  # the folder itself is named by --resume
RESUMES_FILE = "resumes.jsonl"
CLAIM_FILES = {"config.yaml", LOCK_FILE}  # what a new run writes before its first step
ACCUMULATION = "train.grad_accum"  # compared through the global batch it gives (resumed_grad_accum)


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


def new_run_dir(output_dir: str, name: str) -> Path:
    """``output_dir/name``, refused when it is a symlink (it would lead the run elsewhere)."""
    run_dir = Path(output_dir) / name
    if run_dir.is_symlink() or run_dir.resolve().parent != Path(output_dir).resolve():
        raise RunDirError(f"{run_dir} is a link to {run_dir.resolve()}: a run folder must be a plain folder inside "
                          f"output_dir={output_dir} (remove the link or choose another run_name)")
    return run_dir


def existing_run(path: str) -> Path:
    """The run folder ``--resume`` names, refused before anything is written there if it is not one."""
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise RunDirError(f"--resume {path}: no such run directory")
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"--resume {path}: no config.yaml there; is it a run folder?")
    return run_dir


def discard_unstarted(run_dir: Path) -> None:
    """Remove a new run's folder that holds only its claim (the run failed before its first step)."""
    if run_dir.is_dir() and not {p.name for p in run_dir.iterdir()} - CLAIM_FILES:
        shutil.rmtree(run_dir, ignore_errors=True)


def open_new(cfg: ExperimentConfig, run_dir: Path) -> None:
    """Claim ``run_dir`` for a new run (main rank, lock held) and save the resolved config."""
    if (run_dir / "config.yaml").exists() or (run_dir / "metrics.jsonl").exists():
        hint = "" if checkpoint_dirs(run_dir) else " (it has no checkpoint yet: --resume starts it over)"
        raise RunDirError(f"{run_dir} already holds a run: pass --resume {run_dir}{hint} or choose another run_name")
    save_resolved(cfg, run_dir)


def run_global_batch(run_dir: Path, micro_batch_size: int, saved_accum: int) -> int | None:
    """Sequences per optimizer step of the run in ``run_dir``, from its newest readable
    checkpoint (one written before the record: micro batch x the saved accumulation x the
    processes that wrote it); None without a checkpoint."""
    for directory in reversed(checkpoint_dirs(run_dir)):
        try:
            record = read_json(directory / "trainer.json")
        except CheckpointError:
            continue  # the trainer falls back past it too
        ranks = record.get("world_size") or saved_ranks(directory)
        return int(record.get("global_batch") or micro_batch_size * saved_accum * ranks)
    return None


def resumed_grad_accum(cfg: ExperimentConfig, run_dir: Path, world_size: int) -> int:
    """``train.grad_accum`` for a resume of ``run_dir`` on ``world_size`` processes: the one
    that keeps the run's global batch. Set for this resume (``train.global_batch_size``, or a
    ``train.grad_accum`` other than the saved one) it must keep it; else it is recomputed."""
    train, saved = cfg.train, run_dir / "config.yaml"
    if not saved.is_file():
        return train.grad_accum  # not a run folder: open_resumed says so
    saved_accum = int(OmegaConf.load(saved).train.grad_accum)
    global_batch = run_global_batch(run_dir, train.micro_batch_size, saved_accum)
    if global_batch is None:
        return train.grad_accum
    per_pass = train.micro_batch_size * world_size
    if train.global_batch_size or train.grad_accum != saved_accum:
        if train.grad_accum * per_pass != global_batch:
            raise ConfigError(f"--resume {run_dir}: train.grad_accum={train.grad_accum} x train.micro_batch_size="
                              f"{train.micro_batch_size} x {world_size} processes is not the run's global batch of "
                              f"{global_batch} sequences; leave train.grad_accum as saved (it is recomputed)")
        return train.grad_accum
    if global_batch % per_pass:
        raise ConfigError(f"--resume {run_dir}: the run's global batch of {global_batch} sequences is not a multiple "
                          f"of train.micro_batch_size x processes = {train.micro_batch_size} x {world_size}; resume "
                          f"on a number of processes that divides {global_batch // train.micro_batch_size}")
    return global_batch // per_pass


def open_resumed(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """Check a resume of ``run_dir`` (main rank, lock held); return its record for
    :func:`record_resume`. With no checkpoint yet the run starts over in the same folder."""
    saved = existing_run(str(run_dir)) / "config.yaml"
    changes = config_changes(saved, cfg)
    if checkpoint_dirs(run_dir):
        changes.pop(ACCUMULATION, None)
    unsafe = {k: v for k, v in changes.items() if k not in SAFE_CHANGES}
    if unsafe:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in unsafe.items())
        raise ConfigError(f"--resume {run_dir}: these changes would break an exact resume: {listed} "
                          f"(only {', '.join(SAFE_CHANGES)} may change; start a new run for the others)")
    step = last_step(run_dir)
    if cfg.train.steps < step:
        raise ConfigError(f"train.steps={cfg.train.steps} is before the checkpoint at step {step}; pass train.steps >= {step}")
    return {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "from_step": step,
            "changes": {k: list(v) for k, v in changes.items()}}


def record_resume(run_dir: Path, record: dict[str, Any]) -> None:
    """Append an accepted resume (:func:`open_resumed`'s record) to ``resumes.jsonl``; with no
    checkpoint the run starts over, so its old metrics and results go."""
    with open(run_dir / RESUMES_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    if not checkpoint_dirs(run_dir):
        for stale in ("metrics.jsonl", "results.json"):
            (run_dir / stale).unlink(missing_ok=True)
