"""The adapter protocol: how the core sees a model, whatever its modality.

Layer index convention (used everywhere in alignkit):
  ``0``  = embedding output (input to block 1),
  ``i``  = output of block ``i`` (1-based),
  ``-1`` = the final layer as Hugging Face's ``hidden_states[-1]`` gives it, i.e. after the
           model's final norm (an adapter may offer the pre-norm variant via its config).
Negative indices other than -1 count from the end of the blocks (``-2`` = block L-1).

A *batch* is a dict of tensors. ``attention_mask`` [B, S] (1 = real position) lets objectives
average over real positions for any modality; a batch without one has only real positions
(packed text: the data producer omits the all-ones mask, so no model needs a host-side check
of it on every forward). A batch may carry
``teacher_index`` [B, S] (long, -1 = unmatched): the teacher position paired with each student
position when the two models see different token sequences (tokenizer mismatch). A batch the
trainer moved to the device keeps its host tensors under :data:`HOST` (a :class:`HostCopy`, not a
tensor): what reads a batch's content on the host reads them there (:func:`host_tensors`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, runtime_checkable

import torch
from torch import Tensor

from alignkit.core.errors import ConfigError

Batch = Mapping[str, Tensor]


@dataclass(frozen=True)
class DataInfo:
    """What the data tells the model builders (the task builds the data first). A field the
    modality does not have stays None."""

    tokenizer: Any = None  # text: the student's tokenizer
    vocab_size: int | None = None  # text: len(tokenizer)
    seq_len: int | None = None  # tokens per sequence, or the longest series
    num_classes: int | None = None  # classification
    num_channels: int | None = None  # time series: variables per time step
    class_names: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ()  # the data sets the task was built from


@dataclass
class StudentOutput:
    """What a student's forward returns: its own task loss, the tapped features, and logits.

    A student whose loss does not need full logits (a chunked cross-entropy) leaves ``logits``
    None unless its forward was called with ``logits=True`` (a logit-KD term is active).

    Under ``train.parallel=fsdp`` the student is an FSDP2 unit whose weights are resharded after
    its forward; FSDP gathers them again for backward from a hook it registers on the
    grad-requiring tensors of this output. torch 2.13 finds them inside a dataclass
    (``collect_grad_tensors`` walks its fields); earlier releases flattened outputs with
    ``tree_flatten``, to which an unregistered dataclass is one leaf: no hook, and backward on
    freed weights. Hence ``torch>=2.13`` in pyproject.toml; tests/test_fsdp.py checks the hook."""

    loss: Tensor
    features: dict[int, Tensor] = field(default_factory=dict)
    logits: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ModelShape:
    """What the memory estimate (:mod:`alignkit.memory`) needs to know of a model: sizes and
    parameter counts (an adapter's ``memory_shape`` capability gives it)."""

    params: int
    block_params: int  # one block
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    largest_param: int


HOST = "host"  # the batch key of a moved batch's HostCopy


class HostCopy:
    """The tensors of a batch as they were on the host before it moved to the device. The teacher
    cache hashes a batch's content: from here it needs no copy back from the device. Not a tensor
    nor a container, so DDP and FSDP pass it through untouched."""

    __slots__ = ("tensors",)

    def __init__(self, batch: Batch) -> None:
        self.tensors = {name: value for name, value in batch.items() if isinstance(value, Tensor)}


def host_tensors(batch: Batch) -> dict[str, Tensor]:
    """The tensors of ``batch`` on the host: its :data:`HOST` copy when it has one, else its own."""
    host = batch.get(HOST)
    return (host if isinstance(host, HostCopy) else HostCopy(batch)).tensors


LOGITS_KINDS = ("per_token", "per_sample")  # [B, S, V] (language models) | [B, C] (classifiers)


@runtime_checkable
class TeacherAdapter(Protocol):
    """A frozen pretrained model the alignment terms query. It declares what it can give:
    features at any layer ``0..num_layers`` (and -1), and logits of the kind ``logits_kind``
    (``per_token`` [B, S, V], ``per_sample`` [B, C], or None: a feature-only teacher, which a
    ``logit_kd`` term rejects at build time). :class:`alignkit.core.teacher.FrozenTeacher`
    implements the lifecycle (eval mode, no_grad, ``release``) for a wrapped ``nn.Module``."""

    num_layers: int
    logits_kind: str | None

    def width(self, layer: int) -> int: ...

    def run(self, batch: Batch, layers: list[int], logits: bool) -> tuple[dict[int, Tensor], Tensor | None]:
        """Hidden states [B, S, D] of ``layers`` and, if ``logits``, the logits (else None), from
        one forward under no_grad in eval mode; without logits it may stop after the deepest
        layer asked for. Called at most once per training step."""
        ...


@runtime_checkable
class StudentAdapter(Protocol):
    """The model being trained (an ``nn.Module``). ``logits_kind`` (optional, one of
    :data:`LOGITS_KINDS`) lets ``build_engine`` check a ``logit_kd`` term against its teacher."""

    num_layers: int

    def width(self, layer: int) -> int: ...

    def forward(self, batch: Batch, layers: list[int], logits: bool = False) -> StudentOutput:
        """The loss, the features of ``layers`` and, if ``logits``, the logits. They are computed
        inside forward, where an FSDP-sharded head is unsharded (the trainer passes ``logits``
        only while a logit-KD term is active; a student that always returns logits ignores it)."""
        ...


def resolve_layer(index: int, num_layers: int, name: str = "layer") -> int:
    """Map a layer index under the convention above to ``0..num_layers`` (-1 stays -1 since
    it is the post-norm final layer). Raises ValueError naming ``name`` when out of range."""
    if index == -1:
        return -1
    if index < -1:
        resolved = num_layers + 1 + index
    else:
        resolved = index
    if not 0 <= resolved <= num_layers:
        raise ConfigError(
            f"{name}={index} is out of range for a model with {num_layers} layers "
            f"(valid: 0..{num_layers}, or -1 for the final normed layer)"
        )
    return resolved


def align_teacher(teacher: Tensor, batch: Batch) -> Tensor:
    """Put teacher features on the student's positions using ``teacher_index`` if present."""
    index = batch.get("teacher_index") if hasattr(batch, "get") else None
    if index is None:
        return teacher
    gather = index.clamp(min=0).unsqueeze(-1).expand(-1, -1, teacher.shape[-1])
    return torch.gather(teacher, 1, gather)


def alignment_mask(batch: Batch) -> Tensor:
    """Positions that count in an alignment objective: real and (if mapped) matched; None when
    every position counts (no mask, no unmatched teacher position)."""
    mask = batch.get("attention_mask")
    index = batch.get("teacher_index")
    if index is not None:
        matched = index >= 0
        mask = matched if mask is None else mask.bool() & matched
    return None if mask is None else mask.bool()
