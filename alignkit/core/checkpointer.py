"""The Checkpointer: *how* a run's checkpoints are written and read (the trainer decides *when*).

It owns the format (safetensors weights and a ``weights_only`` optimizer file for one process
or DDP; ``torch.distributed.checkpoint`` shards under FSDP), the staging folder and its atomic
publish, the folder naming (:func:`alignkit.core.checkpoint.checkpoint_path`), the newest-first
fallback over damaged checkpoints, and the agreement of all ranks after each part that can fail
on one of them (:func:`alignkit.core.distributed.agree`), so a failure on one rank is one
message on every rank and none waits in a collective.

The trainer's own state is a :class:`TrainerState` record; callbacks add their entries to its
JSON form in ``on_save`` and read them back in ``on_load``. A run reads sharded state only if
it is itself sharded (``trainer.json`` says so): a one-process run never hands a ``sharded/``
folder to DCP, whose metadata is a pickle. Every checkpoint carries the checksums of its files
(:mod:`alignkit.core.checkpoint_integrity`), verified on every rank's share before it is read:
a damaged one is skipped like an unreadable one.
"""
from __future__ import annotations

import shutil
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from alignkit.core import checkpoint as ckpt
from alignkit.core import checkpoint_integrity as integrity
from alignkit.core.distributed import DistInfo, PeerFailure, agree, barrier, gather, min_max_over_ranks
from alignkit.core.errors import CheckpointError


@dataclass
class TrainerState:
    """The trainer's counters at a step boundary (per-rank data positions and RNG are saved
    beside it, one file each)."""

    step: int = 0
    tokens: int = 0
    eval_pending: bool = False  # an eval was interrupted: the resumed run evaluates first
    last_eval: dict[str, float] = field(default_factory=dict)
    sharded: bool = False  # weights and optimizer in sharded/ (train.parallel=fsdp)
    checksums: bool = False  # manifest.json holds every file's checksum (False: written before them)
    world_size: int = 0  # processes that wrote it (0: written before this field; its RNG files say)
    global_batch: int = 0  # sequences per optimizer step over all processes (0: not recorded)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], where: Path) -> "TrainerState":
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as err:
            raise CheckpointError(f"{where} is corrupt ({err})") from None


Loaded = tuple[Path, TrainerState, dict[str, Any], list[dict[str, Any]]]  # folder, state, its JSON, data positions


class Checkpointer:
    """Writes and reads the checkpoints of ``run_dir`` for ``module`` and ``optimizer``.

    ``export(directory)`` writes the task's export of the model (a one-process or DDP checkpoint
    carries one in ``model/``); ``sharded`` is ``train.parallel=fsdp``; ``keep`` how many
    checkpoints stay (0: all)."""

    def __init__(self, run_dir: Path, module: nn.Module, optimizer: torch.optim.Optimizer, dist: DistInfo,
                 device: torch.device, *, sharded: bool, keep: int, export: Callable[[Path], None]) -> None:
        self.run_dir, self.module, self.optimizer, self.dist, self.device = run_dir, module, optimizer, dist, device
        self.sharded, self.keep, self.export = sharded, keep, export

    def path(self, step: int) -> Path:
        return ckpt.checkpoint_path(self.run_dir, step)

    # --- writing ------------------------------------------------------------------------------
    def save(self, state: TrainerState, data_state: dict[str, Any], rng: tuple[Any, ...],
             on_save: Callable[[Path, dict[str, Any]], None]) -> Path:
        """Write the checkpoint of ``state.step`` (``on_save(staging, state_json)`` lets callbacks
        add files and entries); on a failed write remove the partial one and raise
        :class:`CheckpointError` on every rank."""
        main = self.dist.is_main
        staging = ckpt.staging_path(self.run_dir, state.step)
        state.sharded, state.checksums, state.world_size = self.sharded, True, self.dist.world_size

        def part(action: Callable[[], Any]) -> Any:  # one rank's part, as a one-line error, agreed on
            return agree(ckpt.as_write_error(action, staging), self.dist)

        try:
            part(lambda: ckpt.staging_dir(self.run_dir, state.step) if main else None)
            part(lambda: ckpt.save_rank_state(staging, self.dist.rank, data_state, rng))
            if self.sharded:  # a collective of its own: every rank writes its shards
                part(lambda: ckpt.save_sharded(staging, self.module, self.optimizer))
            part(lambda: self._save_main(staging, state, on_save) if main else None)
            shares = gather(part(lambda: integrity.digests(staging, self.dist.rank, self.dist.world_size)), self.dist)
            part(lambda: integrity.write_manifest(staging, shares) if main else None)
            part(lambda: ckpt.publish(staging, self.run_dir, state.step, self.keep) if main else None)
        except BaseException:  # every rank is here (agree), with the same outcome
            if main:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        return self.path(state.step)

    def _save_main(self, staging: Path, state: TrainerState, on_save: Callable[[Path, dict[str, Any]], None]) -> None:
        record = state.to_json()
        on_save(staging, record)  # callbacks' files, and their entries in the record
        if self.sharded:
            ckpt.save_trainer_state(staging, record)
        else:
            ckpt.save_main_state(staging, self.module, self.optimizer, record)
            self.export(staging / "model")

    # --- reading ------------------------------------------------------------------------------
    def load(self, directory: Path, prepare: Callable[[int], None] | None = None) -> Loaded:
        """Restore weights, optimizer and this rank's RNG from ``directory``; ``prepare(step)``
        runs before the weights load (the trainer drops what the run had dropped by then). On
        another process count than the checkpoint's, DCP reshards the FSDP state, a new rank
        keeps its RNG as it is, and every saved rank's data position is returned (the trainer
        has the task map them)."""
        verified = self._verify(directory)
        record = ckpt.read_json(directory / "trainer.json")
        state = TrainerState.from_json(record, directory / "trainer.json")
        if not verified and state.checksums:
            raise CheckpointError(f"{directory / integrity.MANIFEST} is missing")
        if not verified:
            warnings.warn(f"{directory} was written before checkpoints had checksums: loading it unverified", stacklevel=3)
        if "sharded" not in record:  # written before the flag: only a sharded run reads sharded/
            state.sharded = self.sharded and (directory / ckpt.SHARDED).is_dir()
        if state.sharded != self.sharded:
            written = "with" if state.sharded else "without"
            raise CheckpointError(f"{directory} was written {written} train.parallel=fsdp: resume with the run's "
                                  "own train.parallel")
        state.world_size = state.world_size or ckpt.saved_ranks(directory)
        resharded_from = state.world_size if state.world_size != self.dist.world_size else None
        data_states = ckpt.load_checkpoint(directory, self.module, self.optimizer, self.dist.rank, self.device,
                                           sharded=self.sharded, prepare=lambda: prepare(state.step) if prepare else None,
                                           resharded_from=resharded_from)
        return directory, state, record, data_states

    def _verify(self, directory: Path) -> bool:
        """Every rank checks its share of the files; all learn whether any failed."""
        try:
            return bool(agree(lambda: integrity.verify(directory, self.dist.rank, self.dist.world_size), self.dist))
        except PeerFailure as err:  # another rank's share failed: the same checkpoint is skipped here
            raise CheckpointError(str(err)) from None

    def load_latest(self, prepare: Callable[[int], None] | None = None) -> Loaded | None:
        """The newest readable checkpoint (older ones if the newest is damaged; half-written
        ones removed first), the same on every rank; None when the run has none."""
        if self.dist.is_main:
            for leftover in ckpt.remove_staging(self.run_dir):
                warnings.warn(f"removed {leftover}: a checkpoint write that never finished", stacklevel=2)
        barrier(self.dist)
        found = None
        for directory in reversed(ckpt.checkpoint_dirs(self.run_dir)):
            try:
                found = self.load(directory, prepare)
                break
            except CheckpointError as err:
                warnings.warn(f"skipping checkpoint {directory.name}: {err}; trying the one before it", stacklevel=2)
        low, high = min_max_over_ranks(found[1].step if found else -1, self.dist)  # host ints: control plane
        if low != high:
            raise CheckpointError(f"{self.run_dir}: ranks found different usable checkpoints; check the rank files")
        return found
