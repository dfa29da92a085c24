"""Checkpoints for exact resume: model + projections (safetensors), optimizer (torch.save,
loaded with ``weights_only=True``), step/tokens/data position (JSON), per-rank RNG state.

Layout: ``RUN_DIR/checkpoints/step_000100/{state.safetensors, optimizer.pt, trainer.json,
rng_rank0.json, data_rank0.json, model/}``; under ``train.parallel=fsdp`` the weights and optimizer
are instead ``sharded/`` (``torch.distributed.checkpoint``: each rank writes its own shards, no
gather) and there is no ``model/``. ``model/`` is the task's export (Hugging Face format
for text) that users open directly. The trainer adds ``best.safetensors`` (the weights selected by
``train.select_metric`` so far) and ``ema.safetensors`` when those are on. A checkpoint is written to a temporary folder and renamed,
so an interruption never leaves a half-written one behind.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_model, save_model
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


def rng_snapshot() -> tuple[Any, ...]:
    """Cheap raw copy of every RNG state (taken at each step start, serialised only on save)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), np.random.get_state(), random.getstate(), cuda


def rng_state(snapshot: tuple[Any, ...] | None = None) -> dict[str, Any]:
    """All RNG states as plain JSON data (no pickles to load back)."""
    torch_state, numpy_state, python_state, cuda = snapshot or rng_snapshot()
    name, keys, pos, has_gauss, gauss = numpy_state
    version, internal, gauss_next = python_state
    state: dict[str, Any] = {
        "torch": torch_state.tolist(),
        "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }
    if cuda is not None:
        state["cuda"] = [s.tolist() for s in cuda]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    return sorted(p for p in root.glob("step_*") if (p / "trainer.json").is_file()) if root.is_dir() else []


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None


def staging_dir(run_dir: Path, step: int) -> Path:
    path = run_dir / "checkpoints" / f".tmp_step_{step:06d}"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def save_rank_state(directory: Path, rank: int, data_state: dict[str, Any], rng: tuple[Any, ...]) -> None:
    (directory / f"rng_rank{rank}.json").write_text(json.dumps(rng_state(rng)))
    (directory / f"data_rank{rank}.json").write_text(json.dumps(data_state))


def save_main_state(directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer, trainer: dict[str, Any]) -> None:
    save_model(module, str(directory / "state.safetensors"))
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    save_trainer_state(directory, trainer)


def publish(staging: Path, run_dir: Path, step: int, keep: int) -> Path:
    """Atomically move a finished staging folder into place; keep the newest ``keep``."""
    final = run_dir / "checkpoints" / f"step_{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer, rank: int, device: torch.device
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore module, optimizer and this rank's RNG; return (trainer state, data state)."""
    load_model(module, str(directory / "state.safetensors"), device=str(device))
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location=device, weights_only=True))
    return load_run_state(directory, rank)


def load_run_state(directory: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore this rank's RNG; return (trainer state, this rank's data state)."""
    rng_file = directory / f"rng_rank{rank}.json"
    data_file = directory / f"data_rank{rank}.json"
    if not rng_file.is_file():
        raise FileNotFoundError(f"{rng_file} missing: resume with the same number of processes as the run")
    set_rng_state(json.loads(rng_file.read_text()))
    trainer = json.loads((directory / "trainer.json").read_text())
    return trainer, json.loads(data_file.read_text())


SHARDED = "sharded"


def save_trainer_state(directory: Path, trainer: dict[str, Any]) -> None:
    (directory / "trainer.json").write_text(json.dumps(trainer, indent=2))


def save_sharded(directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """FSDP: weights and optimizer state with ``torch.distributed.checkpoint``; a collective
    (every rank writes its own shards into ``directory/sharded``)."""
    model_state, optim_state = get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory / SHARDED))


def load_sharded(
    directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer, rank: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """FSDP counterpart of :func:`load_checkpoint` (a collective; same number of processes)."""
    if not (directory / SHARDED).is_dir():
        raise FileNotFoundError(f"{directory / SHARDED} missing: this checkpoint was not written with train.parallel=fsdp")
    model_state, optim_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(directory / SHARDED))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return load_run_state(directory, rank)
