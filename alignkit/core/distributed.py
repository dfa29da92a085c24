"""Process-group set-up for ``torchrun`` (one process per device; gloo on CPU, nccl on CUDA),
and the two planes of collectives:

- the *compute* plane (:func:`all_reduce_mean`): tensors on the training device over the default
  group (NCCL on GPUs). NCCL takes only CUDA tensors, so a host tensor there is an error that
  names this module, not NCCL's "No backend type associated with device type cpu".
- the *control* plane (:func:`agree`, :func:`max_over_ranks`, :func:`min_max_over_ranks`,
  :func:`barrier`): host values over a gloo group made once. Stop requests, failures and waits
  for slow I/O (a checkpoint, a 27 GB export) go here, never through NCCL, whose watchdog
  kills a job that waits more than 10 minutes, and every collective that can follow a local
  failure is preceded by :func:`agree`, so a failing rank never leaves the others waiting.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from alignkit.core.errors import AlignkitError, ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op for one process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available (use train.device=auto or cpu)")
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world_size, local_rank)


def resolve_device(device: str, info: DistInfo) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is available (use train.device=auto or cpu)")
        return torch.device("cuda", info.local_rank)
    return torch.device(device)


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean over ranks of a tensor on the training device (compute plane)."""
    if info.world_size > 1:
        if dist.get_backend() == "nccl" and values.device.type != "cuda":
            raise RuntimeError(f"all_reduce_mean got a {values.device.type} tensor but the default process group is "
                               "NCCL (CUDA tensors only): host values go through the control plane "
                               "(alignkit.core.distributed.max_over_ranks / agree)")
        values = values.clone()
        dist.all_reduce(values)
        values /= info.world_size
    return values


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    _CONTROL_GROUP.clear()


_CONTROL_GROUP: list = []  # the gloo group of the control plane (None: the default group is gloo)


def control_group() -> dist.ProcessGroup | None:
    """A gloo group over all ranks for host values (None when the default group is gloo itself)."""
    if not _CONTROL_GROUP:
        _CONTROL_GROUP.append(dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None)
    return _CONTROL_GROUP[0]


def _reduce_max(values: list[int], info: DistInfo) -> list[int]:
    tensor = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=control_group())
    return tensor.tolist()


def max_over_ranks(value: int, info: DistInfo) -> int:
    """The largest ``value`` of all ranks, on every rank: stop requests and failures must be
    agreed on, or one rank would wait forever in a collective the others never reach."""
    return value if info.world_size <= 1 else _reduce_max([value], info)[0]


def min_max_over_ranks(value: int, info: DistInfo) -> tuple[int, int]:
    """The smallest and largest ``value`` over ranks, in one collective."""
    if info.world_size <= 1:
        return value, value
    low, high = _reduce_max([-value, value], info)
    return -low, high


def gather(value: T, info: DistInfo) -> list[T]:
    """Every rank's ``value`` (a small picklable host value), on every rank, in rank order."""
    if info.world_size <= 1:
        return [value]
    found: list = [None] * info.world_size
    dist.all_gather_object(found, value, group=control_group())
    return found


def barrier(info: DistInfo) -> None:
    """Wait for every rank, on the control plane (gloo: no NCCL timeout while a rank writes files)."""
    if info.world_size > 1:
        dist.barrier(group=control_group())


class PeerFailure(AlignkitError):
    """Another rank failed a step that this rank finished (its message names the rank and the error)."""


def agree(action: Callable[[], T] | None, info: DistInfo) -> T | None:
    """Run this rank's part of a step that can fail locally (None: nothing to do on this rank),
    then learn on every rank whether any rank failed, so that all ranks leave together with the
    same one-line message instead of some waiting in the next collective. If any rank was
    interrupted, every rank raises ``KeyboardInterrupt`` (they then save together); else a failed
    rank re-raises its own exception and the others raise :class:`PeerFailure` naming it."""
    failure: BaseException | None = None
    result = None
    try:
        result = action() if action is not None else None
    except BaseException as err:  # noqa: BLE001 -- every rank must learn of it, or the others hang
        failure = err
    if info.world_size <= 1:
        if failure is not None:
            raise failure
        return result
    message = str(failure) if isinstance(failure, AlignkitError) else f"{type(failure).__name__}: {failure}"
    mine = None if failure is None else (isinstance(failure, KeyboardInterrupt), message.splitlines()[0])
    outcomes: list = [None] * info.world_size
    dist.all_gather_object(outcomes, mine, group=control_group())
    failed = [(rank, o) for rank, o in enumerate(outcomes) if o is not None]
    if not failed:
        return result
    if any(interrupted for _, (interrupted, _) in failed):  # every rank handles it as an interrupt
        raise failure if isinstance(failure, KeyboardInterrupt) else KeyboardInterrupt
    if failure is not None:
        raise failure
    rank, (_, message) = failed[0]
    raise PeerFailure(f"{message} (on rank {rank})")
