"""Memory per GPU of a training run, estimated from model shapes (for ``alignkit check``), and a
counter of live tensor bytes to measure it (tests, benchmarks).

The estimate (:func:`estimate_memory`, bytes per process) adds up, for ``ddp`` and ``fsdp``:

* weights     fp32 master weights (``4 P``; ``4 P / N`` under FSDP). Under bf16 autocast the
              bf16 copies autocast caches of the blocks' weights for the step (``2 P_blocks``);
              under FSDP the bf16 all-gathered root (embeddings, head) and two blocks in flight.
* gradients   fp32 (``4 P``, sharded under FSDP, plus two unsharded blocks in flight); DDP with
              more than one process adds its gradient buckets (another ``4 P``).
* optimizer   AdamW's two fp32 states (``8 P``, sharded under FSDP); the non-fused (CPU) step
              adds temporaries of about twice the largest parameter.
* accumulated gradients  what is kept across the micro-batches of a step (``grad_accum`` > 1):
              the gradients as above, except under FSDP without
              ``train.fsdp_reduce_every_micro_batch``: skipping the reduce-scatter makes FSDP2
              keep every block's *unsharded* fp32 gradient (``4 P`` per process, not ``4 P / N``).
* activations what a micro-batch of ``T = micro_batch x seq_len`` tokens keeps for backward:
              per LLaMA block ``T h (8 + 5 r + 3 e) + T i 4 e`` bytes (``e`` = 2 under bf16, else
              4; ``r`` the residual stream's bytes: 4 under autocast, which keeps fp32 weights,
              2 under FSDP with bf16 parameters; h hidden, i intermediate size; SDPA attention
              without a mask, which keeps no ``S x S`` scores), plus ``T h (5 + 2 r + e)``
              outside the blocks. With activation checkpointing a block keeps only its input
              (``r T h``) and one block is recomputed at a time. The coefficients were fitted to
              tensor bytes measured with :class:`TensorMemoryCounter` on CPU (two widths, two
              intermediate sizes, two depths, float32 and bf16 autocast, with and without FSDP's
              bf16 parameters) -- a model, not a guarantee, for other families (GELU MLPs keep
              fewer intermediate tensors).
* loss        the chunked cross-entropy (:mod:`alignkit.core.linear_ce`): the head's float32
              gradient (``4 V h``) made in forward, and one chunk's float32 logits temporaries.
* teacher     its weights in its dtype, and four float32 [T, teacher width] tensors of the
              alignment (its features, the projected student, their normalised copies);
              logit KD adds the full logits of both models.
* build       the student is built whole in fp32 on every process before FSDP shards it
              (``4 P``, with the teacher's weights): a transient before training, kept in the
              peak because at small widths and many processes it can exceed training's.

Peak = the larger of the build and of training: weights + optimizer + teacher + the larger of
the forward/backward phase (activations + loss buffers + accumulated gradients + DDP buckets)
and the optimizer step (gradients + step temporaries). Gradients grow during backward while
activations are freed, so they are not counted on top of all activations.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from alignkit.core.adapter import ModelShape
from alignkit.core.linear_ce import CHUNK_TOKENS

GPU_BYTES = 80 * 10**9  # an 80 GB A100/H100
GB = 10**9


@dataclass
class RunSetting:
    """The training settings that decide memory per process."""

    micro_batch: int
    seq_len: int
    precision: str = "bfloat16"  # float32 | bfloat16 (autocast, or FSDP's bf16 parameters)
    activation_checkpointing: bool = False
    processes: int = 1
    grad_accum: int = 1
    fsdp_reduce_every_micro_batch: bool = False  # train.fsdp_reduce_every_micro_batch
    fused_optimizer: bool = True  # CUDA: fused AdamW (no step temporaries)
    teacher_params: int = 0
    teacher_width: int = 0
    teacher_bytes_per_param: int = 2
    logit_kd: bool = False


def _block_activation_bytes(shape: ModelShape, tokens: int, e: int, r: int) -> int:
    return tokens * (shape.hidden * (8 + 5 * r + 3 * e) + shape.intermediate * 4 * e)


def estimate_memory(shape: ModelShape, run: RunSetting, parallel: str) -> dict[str, int]:
    """Bytes per process by component and the estimated ``peak`` (see the module docstring).
    ``parallel``: ``ddp`` (also used for one process, where nothing is replicated) or ``fsdp``."""
    if parallel not in ("ddp", "fsdp"):
        raise ValueError(f"parallel={parallel!r} is not ddp or fsdp")
    P, n = shape.params, max(run.processes, 1)
    bf16 = run.precision == "bfloat16"
    e = 2 if bf16 else 4
    tokens = run.micro_batch * run.seq_len
    blocks_params = shape.layers * shape.block_params
    root_params = P - blocks_params
    in_flight = 2 * shape.block_params * (e + 4)  # two blocks' unsharded gradients being reduced
    if parallel == "fsdp":
        gathered = (root_params + 2 * shape.block_params) * e  # unsharded root + two blocks in flight
        weights = 4 * P // n + gathered
        gradients = 4 * P // n + in_flight
        optimizer = 8 * P // n
        buckets = 0
        skips_sync = run.grad_accum > 1 and not run.fsdp_reduce_every_micro_batch
        accumulated = 4 * P + in_flight if skips_sync else gradients
    else:
        weights = 4 * P + (2 * blocks_params if bf16 else 0)  # autocast's cached bf16 weights
        gradients = 4 * P
        optimizer = 8 * P
        buckets = 4 * P if n > 1 else 0
        accumulated = gradients
    if run.grad_accum == 1:
        accumulated = 0
    r = 2 if parallel == "fsdp" and bf16 else 4  # FSDP casts the weights, so the residual stream, to bf16
    block = _block_activation_bytes(shape, tokens, e, r)
    outside = tokens * shape.hidden * (5 + 2 * r + e)
    if run.activation_checkpointing:
        activations = shape.layers * tokens * shape.hidden * r + block + outside
    else:
        activations = shape.layers * block + outside
    chunk = min(CHUNK_TOKENS, tokens)
    loss = 4 * shape.vocab * shape.hidden + 8 * chunk * shape.vocab + e * shape.vocab * shape.hidden
    teacher = run.teacher_params * run.teacher_bytes_per_param + 4 * 4 * tokens * run.teacher_width
    if run.logit_kd:
        teacher += tokens * shape.vocab * (2 * e + 3 * 4)  # both models' logits, float32 softmaxes
    step_temporaries = 0 if run.fused_optimizer else 2 * 4 * shape.largest_param
    forward_backward = activations + loss + buckets + accumulated
    step = gradients + buckets + step_temporaries
    build = 4 * P + run.teacher_params * run.teacher_bytes_per_param
    peak = max(build, weights + optimizer + teacher + max(forward_backward, step))
    return {"weights": weights, "gradients": gradients + buckets, "accumulated_gradients": accumulated,
            "optimizer": optimizer, "activations": activations, "loss_buffers": loss, "teacher": teacher,
            "build": build, "peak": peak}


class TensorMemoryCounter(TorchDispatchMode):
    """Live bytes of tensor storage, and their peak, while the mode is active.

    Every storage an operator returns is counted once (by identity) until it is freed (a weak
    reference's callback), so this measures what the allocator is asked to hold -- not the
    process RSS, which includes the allocator's caches and the libraries. Tensors made before
    the mode (the model's parameters) are added with :meth:`track`. Views share their base's
    storage and count once; a storage resized in place keeps the size it was first seen with."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def track(self, tensors: Iterable[Any]) -> None:
        for tensor in tensors:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            if storage in self._seen:
                continue
            nbytes = storage.nbytes()
            self._seen[storage] = nbytes
            weakref.finalize(storage, self._free, nbytes)
            self.current += nbytes
            self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        self.track(tree_flatten(out)[0])
        return out
