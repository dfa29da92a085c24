"""How the student is spread over processes: nothing, DDP, or FSDP2 (``train.parallel``).

``wrap_model`` takes the trainer's step module (student + engine), applies per-block activation
checkpointing and ``torch.compile`` when asked, then wraps it: DDP replicates it; FSDP2
(``torch.distributed.fsdp.fully_shard``) shards each transformer block, then the student (embedding,
final norm, head), then the step module (learned projections), with bf16 parameters in compute
under ``train.precision=bfloat16`` and fp32 gradient reduction. The student stays callable on its
own (evaluation and export call it directly). ``shard_teacher`` shards a frozen teacher the same way.
Blocks come from the adapter's ``_parts.blocks`` (the Hugging Face adapters set it).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any, ContextManager, Iterator

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from alignkit.core.config import ConfigError, TrainConfig
from alignkit.core.distributed import DistInfo

PARALLEL = ("auto", "none", "ddp", "fsdp")


def resolve_parallel(cfg: TrainConfig, dist: DistInfo) -> str:
    """``auto``: ddp with more than one process, none for one."""
    if cfg.parallel not in PARALLEL:
        raise ConfigError(f"train.parallel={cfg.parallel!r} is unknown (choose from {', '.join(PARALLEL)})")
    if cfg.parallel == "auto":
        return "ddp" if dist.world_size > 1 else "none"
    if cfg.parallel == "ddp" and dist.world_size == 1:  # one replica: DDP would only add a process group
        warnings.warn("train.parallel=ddp on one process: training without DDP (the same numbers; "
                      "launch with torchrun --nproc_per_node N for data parallelism)", stacklevel=2)
        return "none"
    if cfg.parallel == "none" and dist.world_size > 1:
        raise ConfigError(f"train.parallel=none cannot run on {dist.world_size} processes (use ddp or fsdp)")
    if cfg.parallel == "fsdp" and (cfg.select_metric or cfg.ema_decay > 0):
        raise ConfigError("train.parallel=fsdp does not support train.select_metric or train.ema_decay (use ddp)")
    return cfg.parallel


def blocks_of(model: Any, key: str) -> nn.ModuleList:
    """The transformer blocks of an adapter (``_parts.blocks``); ``key`` names the setting that needs them."""
    blocks = getattr(getattr(model, "_parts", None), "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ConfigError(f"{key}: {type(model).__name__} exposes no transformer blocks (_parts.blocks)")
    return blocks


def _mixed_precision(cfg: TrainConfig) -> MixedPrecisionPolicy:
    param_dtype = torch.bfloat16 if cfg.precision == "bfloat16" else None
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def wrap_model(module: nn.Module, cfg: TrainConfig, dist: DistInfo) -> tuple[nn.Module, str]:
    """(the module to call in training, the resolved ``train.parallel``). ``module`` has a
    ``student`` attribute (the trainer's step module) and is changed in place."""
    parallel = resolve_parallel(cfg, dist)
    student = module.student
    wanted = [key for key, on in [("train.parallel=fsdp", parallel == "fsdp"),
                                  ("train.activation_checkpointing", cfg.activation_checkpointing),
                                  ("train.compile", cfg.compile)] if on]
    if wanted:
        blocks = blocks_of(student, wanted[0])
        if cfg.activation_checkpointing or cfg.compile:
            for block in blocks:
                wrap_forward(block, cfg.activation_checkpointing, cfg.compile)
    if parallel == "ddp":
        return ddp(module), parallel
    if parallel == "fsdp":
        ensure_process_group(next(module.parameters()).device)
        policy = _mixed_precision(cfg)
        for block in blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(student, mp_policy=policy)  # embedding, final norm, head
        fully_shard(module, mp_policy=policy)  # learned projections of the engine
        _init_root(module)
    return module, parallel


def wrap_forward(block: nn.Module, checkpointed: bool, compiled: bool) -> None:
    """Checkpoint (non-reentrant) and/or ``torch.compile`` the block's ``forward``, not its
    module call: the block's forward hooks (the layer taps) run in eager around it. Inside a
    compiled call dynamo would trace the taps' writes to their own state, and inside a
    checkpoint it cannot (a graph break in every block); outside, turning taps on or off
    never recompiles. The block stays the same module, so state-dict keys do not change."""
    forward = block.forward
    if checkpointed:
        forward = partial(checkpoint, forward, use_reentrant=False)
    if compiled:
        if checkpointed:
            # transformers' hub-kernel wrapper (package `kernels`) sets and resets a global in
            # each attention forward; dynamo refuses that side effect inside a checkpoint (a graph
            # break per block) unless told not to replay it in backward, which is harmless for a
            # value restored before the forward returns
            torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
        forward = torch.compile(forward)
    block.forward = forward


def _init_root(module: nn.Module) -> None:
    """Make the step module FSDP's root now. FSDP2 picks as root the first module to run
    forward; a resumed run may evaluate (the student alone) before its first training step,
    and the student would become the root and the first step fail. torch has no public call
    for this (2.13): the root's lazy init is what its first forward would run."""
    module._get_fsdp_state()._lazy_init()  # type: ignore[operator]


def ddp(module: nn.Module) -> DistributedDataParallel:
    """DDP over the step module, without ``find_unused_parameters`` (a graph walk every step):
    every parameter takes part in every step -- the engine keeps an idle term's learned
    projection in the graph, and the trainer rewraps the module when a stopped term's
    projection leaves it."""
    return DistributedDataParallel(module)


def shard_teacher(teacher: Any, device: torch.device) -> None:
    """Shard a frozen teacher's weights over the processes (``teacher.options.shard: true``):
    each block, then the base model it is tapped through (embedding, final norm). The LM head,
    used only by logit KD, stays whole."""
    ensure_process_group(device)
    for block in blocks_of(teacher, "teacher.options.shard"):
        fully_shard(block)
    fully_shard(teacher.model.base_model)


def ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group even for one process (e.g. one GPU): make a local one."""
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)


def grad_sync(model: nn.Module, enabled: bool, fsdp_every_micro_batch: bool = False) -> ContextManager[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of a step. Under FSDP,
    ``fsdp_every_micro_batch`` (``train.fsdp_reduce_every_micro_batch``) keeps the
    reduce-scatter on every micro-batch: skipping it keeps unsharded fp32 gradients."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        return model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled or fsdp_every_micro_batch)
    return nullcontext()


@contextmanager
def gathered(module: nn.Module, dist: DistInfo) -> Iterator[None]:
    """Under FSDP: the module holds its full weights (on CPU) on the main rank while inside,
    e.g. to export a single Hugging Face folder. A collective: every rank must enter."""
    if not isinstance(module, FSDPModule):
        yield
        return
    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    replacement: dict[int, nn.Parameter] = {}  # tied weights stay tied
    if dist.is_main:
        for name, param in module.named_parameters(remove_duplicate=False):
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            if id(param) not in replacement:
                replacement[id(param)] = nn.Parameter(full[name], requires_grad=False)
            swapped.append((owner, leaf, param))
            owner._parameters[leaf] = replacement[id(param)]
    try:
        yield
    finally:
        for owner, leaf, param in swapped:
            owner._parameters[leaf] = param
