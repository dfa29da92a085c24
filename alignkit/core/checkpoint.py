"""Checkpoints for exact resume: model + projections (safetensors), optimizer (torch.save,
loaded with ``weights_only=True``), step/tokens/data position (JSON), per-rank RNG state.

Layout: ``RUN_DIR/checkpoints/step_000100/{state.safetensors, optimizer.pt, trainer.json,
rng_rank0.json, data_rank0.json, model/, manifest.json}`` (the manifest: every file's checksum,
:mod:`alignkit.core.checkpoint_integrity`); under ``train.parallel=fsdp`` the weights and optimizer
are instead ``sharded/`` (``torch.distributed.checkpoint``: each rank writes its own shards, no
gather) and there is no ``model/``. ``model/`` is the task's export (Hugging Face format
for text) that users open directly. The trainer adds ``best.safetensors`` (the weights selected by
``train.select_metric`` so far) and ``ema.safetensors`` when those are on. A checkpoint is written to a temporary folder and renamed,
so an interruption never leaves a half-written one behind; so is ``final/``. Checkpoints are ordered by their
parsed step (``step_1000000`` after ``step_999000``); a newest checkpoint that fails its checksums
or cannot be read is skipped with a warning in favour of the one before it.
"""
from __future__ import annotations

import errno
import json
import random
import re
import shutil
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from alignkit.core.checkpoint_integrity import RestrictedPlanner, RestrictedReader
from alignkit.core.errors import CheckpointError

_STEP_DIR = re.compile(r"step_(\d+)")
T = TypeVar("T")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The seed of a rank that has no saved RNG state (a resume on more processes than the
    run had): derived from the run's seed, the rank and the step, so it is reproducible and
    differs from every other rank's and step's."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


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


@contextmanager
def kept_rng() -> Iterator[None]:
    """Every RNG state as it was before the block (what the block draws leaves no trace)."""
    outer = rng_snapshot()
    try:
        yield
    finally:
        set_rng_state(rng_state(outer))


def checkpoint_step(path: Path) -> int | None:
    match = _STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else None


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first, by step number (not by name)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if checkpoint_step(p) is not None and (p / "trainer.json").is_file()]
    return sorted(found, key=checkpoint_step)  # type: ignore[arg-type,return-value]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None


def remove_staging(run_dir: Path) -> list[Path]:
    """Delete half-written ``.tmp_step_*`` folders left by a killed save; returns them."""
    root = run_dir / "checkpoints"
    leftovers = sorted(root.glob(".tmp_step_*")) if root.is_dir() else []
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives once published."""
    return run_dir / "checkpoints" / f"step_{step:06d}"


def staging_path(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written before :func:`publish` renames it."""
    return run_dir / "checkpoints" / f".tmp_step_{step:06d}"


def staging_dir(run_dir: Path, step: int) -> Path:
    """A new, empty staging folder for ``step`` (one left by an earlier try is removed)."""
    path = staging_path(run_dir, step)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


# how a full disk (or quota) reads when it is not an OSError: torch's zip writer after a short
# write ("unexpected pos 9088 vs 8980"), safetensors' wrapped Rust I/O error
_FULL_DISK_SIGNS = ("No space left on device", "StorageFull", "unexpected pos", "PytorchStreamWriter failed writing")


def write_error(err: BaseException, directory: Path, what: str = "checkpoint") -> CheckpointError:
    """A one-line reason for a failed checkpoint (or export) write (torch reports a full disk
    as ``unexpected pos``, safetensors as an I/O error, so the disk is asked directly)."""
    failures = getattr(err, "failures", None)  # DCP's CheckpointException: {rank: (error, traceback)}
    if isinstance(failures, dict) and failures:  # every rank gets the same: the first failed rank's error
        err = failures[min(failures)][0]
    full = (isinstance(err, OSError) and err.errno == errno.ENOSPC) or any(sign in str(err) for sign in _FULL_DISK_SIGNS)
    try:
        full = full or shutil.disk_usage(directory.parent if not directory.exists() else directory).free < 2**20
    except OSError:
        pass
    if full:
        reason = "no space left on device"
    elif isinstance(err, PermissionError) or (isinstance(err, OSError) and err.errno in (errno.EROFS, errno.EACCES)):
        reason = "the folder is not writable"
    else:
        reason = first_line(err)
    return CheckpointError(
        f"cannot write {what} {directory}: {reason}; earlier checkpoints are kept "
        "(free space or fix permissions, then resume)"
    )


def as_write_error(action: Callable[[], T], directory: Path, what: str = "checkpoint") -> Callable[[], T]:
    """``action`` with any failure but an interrupt raised as :func:`write_error`'s one line
    (DCP's ``CheckpointException`` is a ``BaseException``: it is caught too)."""
    def run() -> T:
        try:
            return action()
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # noqa: BLE001
            raise write_error(err, directory, what) from None
    return run


def save_rank_state(directory: Path, rank: int, data_state: dict[str, Any], rng: tuple[Any, ...]) -> None:
    (directory / f"rng_rank{rank}.json").write_text(json.dumps(rng_state(rng)))
    (directory / f"data_rank{rank}.json").write_text(json.dumps(data_state))


def save_main_state(directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer, trainer: dict[str, Any]) -> None:
    save_model(module, str(directory / "state.safetensors"))
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    save_trainer_state(directory, trainer)


def save_trainer_state(directory: Path, trainer: dict[str, Any]) -> None:
    (directory / "trainer.json").write_text(json.dumps(trainer, indent=2))


SHARDED = "sharded"


def save_sharded(directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """FSDP: weights and optimizer state with ``torch.distributed.checkpoint``; a collective
    (every rank writes its own shards into ``directory/sharded``)."""
    model_state, optim_state = get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory / SHARDED))


def export_staged(export: Callable[[Path], None], final: Path) -> None:
    """``export(folder)`` into a staging folder beside ``final``, then renamed to it: a failed
    export (a full disk) leaves no partial ``final`` behind."""
    staging = final.with_name(f".tmp_{final.name}")
    shutil.rmtree(staging, ignore_errors=True)  # left by an earlier, killed export
    try:
        staging.mkdir(parents=True)  # an export that writes nothing still publishes a folder
        export(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)


def publish(staging: Path, run_dir: Path, step: int, keep: int) -> Path:
    """Atomically move a finished staging folder into place; keep the newest ``keep``."""
    final = checkpoint_path(run_dir, step)
    if final.exists():  # the same step saved again (e.g. an interrupt right after a save)
        shutil.rmtree(final)
    staging.rename(final)
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is corrupt ({err})") from None


def _unreadable(path: Path, err: BaseException) -> CheckpointError:
    return CheckpointError(f"{path} is unreadable ({first_line(err)})")


def _load_weights(directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                  sharded: bool, prepare: Callable[[], None]) -> None:
    """Load weights and optimizer state; ``prepare()`` runs first (for a single-file checkpoint:
    once both files have proved readable, so a corrupt one changes nothing before the fallback)."""
    if sharded:  # FSDP: a collective, every rank reads its shards
        prepare()
        model_state, optim_state = get_state_dict(module, optimizer)
        state = {"model": model_state, "optim": optim_state}
        try:  # DCP unpickles: its metadata and non-tensor items go through allowlists
            dcp.load(state, storage_reader=RestrictedReader(directory / SHARDED), planner=RestrictedPlanner())
        except (Exception, CheckpointException) as err:  # noqa: BLE001 -- DCP's own is a BaseException
            raise _unreadable(directory / SHARDED, err) from None
        set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return
    state_file, optimizer_file = directory / "state.safetensors", directory / "optimizer.pt"
    try:
        with safe_open(str(state_file), framework="pt"):
            pass  # the header parses
    except Exception as err:  # noqa: BLE001 -- safetensors raises its own error types for bad headers
        raise _unreadable(state_file, err) from None
    try:
        optimizer_state = torch.load(optimizer_file, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise _unreadable(optimizer_file, err) from None
    prepare()
    try:
        load_model(module, str(state_file), device=str(device))
    except Exception as err:  # noqa: BLE001
        raise _unreadable(state_file, err) from None
    try:
        optimizer.load_state_dict(optimizer_state)
    except Exception as err:  # noqa: BLE001
        raise _unreadable(optimizer_file, err) from None


def saved_ranks(directory: Path) -> int:
    """How many processes wrote the checkpoint in ``directory`` (one RNG file each), for
    checkpoints whose ``trainer.json`` predates its ``world_size``."""
    return len(list(directory.glob("rng_rank*.json")))


def load_checkpoint(
    directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer, rank: int, device: torch.device,
    sharded: bool, prepare: Callable[[], None], resharded_from: int | None = None,
) -> list[dict[str, Any]]:
    """Restore module, optimizer (from ``sharded/`` if ``sharded``) and this rank's RNG; return
    the data positions to continue from: ``[this rank's]``, or on a resume on another process
    count (``resharded_from``: the saved count) every saved rank's, and this rank's RNG only if
    it was saved. ``prepare()`` runs before the weights are loaded. Any unreadable part raises
    :class:`CheckpointError` naming the file (see :class:`alignkit.core.checkpointer.Checkpointer`)."""
    ranks = [rank] if resharded_from is None else list(range(resharded_from))
    data_states = [read_json(directory / f"data_rank{r}.json") for r in ranks]
    rng_file = directory / f"rng_rank{rank}.json"
    rng = read_json(rng_file) if resharded_from is None or rank < resharded_from else None
    _load_weights(directory, module, optimizer, device, sharded, prepare)
    try:
        if rng is not None:
            set_rng_state(rng)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{rng_file} is corrupt ({err})") from None
    return data_states
