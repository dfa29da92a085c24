"""The frozen-teacher base class: what every shipped teacher does the same way.

A teacher wraps an ``nn.Module`` but is not one, so it never enters a student's state dict, the
optimizer, DDP or a checkpoint. :class:`FrozenTeacher` puts the model in eval mode without
gradients, runs every query under ``no_grad``, counts the queries (``calls``) and drops the model
on :meth:`release` (the engine calls it the step after the last term using the teacher stops).
Subclasses say what the model gives: ``num_layers``, ``width(layer)``, ``logits_kind`` and
``_forward(model, batch, layers, logits)``.
"""
from __future__ import annotations

import gc
from typing import Sequence

import torch
from torch import Tensor, nn

from alignkit.core.adapter import Batch


class FrozenTeacher:
    """Base of a :class:`~alignkit.core.adapter.TeacherAdapter` around a frozen ``nn.Module``."""

    logits_kind: str | None = None  # per_token | per_sample | None (features only)

    def __init__(self, model: nn.Module) -> None:
        model.eval()
        model.requires_grad_(False)
        self.model: nn.Module | None = model
        self.calls = 0
        self.released = False

    @property
    def device(self) -> torch.device:
        return next(self._live().parameters()).device

    def _live(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError(f"this {type(self).__name__} was released (its terms stopped); it cannot be queried")
        return self.model

    def run(self, batch: Batch, layers: Sequence[int], logits: bool = False) -> tuple[dict[int, Tensor], Tensor | None]:
        """Features of ``layers`` and (if ``logits``) the logits, from one forward."""
        if logits and self.logits_kind is None:
            raise RuntimeError(f"{type(self).__name__} gives no logits")
        model = self._live()
        self.calls += 1
        with torch.no_grad():
            return self._forward(model, batch, list(layers), logits)

    def features(self, batch: Batch, layers: Sequence[int]) -> dict[int, Tensor]:
        """Features only (the forward stops after the deepest layer asked for)."""
        return self.run(batch, layers, logits=False)[0]

    def _forward(self, model: nn.Module, batch: Batch, layers: list[int], logits: bool) -> tuple[dict[int, Tensor], Tensor | None]:
        raise NotImplementedError

    def release(self) -> None:
        """Drop the model (subclasses also drop their own references to its modules first) so
        its memory can be returned."""
        on_cuda = self.model is not None and self.device.type == "cuda"
        self.model = None
        self.released = True
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
