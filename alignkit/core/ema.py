"""Exponential moving average of a model's weights (Polyak averaging), for evaluation and
export: on small fine-tuning sets the averaged weights generalise more smoothly than the last
optimizer step. Opt-in through ``train.ema_decay``: a trainer callback that updates after
every optimizer step, swaps the averaged weights in for evaluation (so model selection picks
among them) and for the export, and checkpoints them for exact resume.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from alignkit.core.callbacks import Callback, Record
from alignkit.core.errors import CheckpointError, ConfigError

FILE = "ema.safetensors"


class WeightAverage(Callback):
    """``shadow = d * shadow + (1 - d) * weights`` after every optimizer step, with the usual
    warm-up ``d = min(decay, (1 + n) / (10 + n))`` so the random start fades quickly."""

    def __init__(self, *, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"train.ema_decay={decay} must be in (0, 1) (0 turns averaging off)")
        self.decay, self.updates = decay, 0
        live = {k: v.detach() for k, v in module.state_dict().items() if v.is_floating_point()}
        self.shadow: dict[str, Tensor] = {k: v.clone() for k, v in live.items()}
        # state_dict tensors share storage with the module (loading copies in place), so the
        # pairs are gathered once and each step is one fused lerp, not a walk over the module
        self._live, self._averaged = list(live.values()), list(self.shadow.values())

    @torch.no_grad()
    def on_step_end(self, trainer: Any, record: Record | None) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        torch._foreach_lerp_(self._averaged, self._live, 1.0 - d)

    @contextmanager
    def eval_weights(self, trainer: Any) -> Iterator[None]:
        """Evaluate with the averaged weights in the student; the trained ones come back after."""
        module = trainer.student
        state = module.state_dict()
        backup = {k: state[k].detach().clone() for k in self.shadow}
        module.load_state_dict(self.shadow, strict=False)
        try:
            yield
        finally:
            module.load_state_dict(backup, strict=False)

    def on_fit_end(self, trainer: Any, results: dict[str, float]) -> None:
        trainer.student.load_state_dict(self.shadow, strict=False)  # a selected best model replaces it after

    def on_save(self, trainer: Any, directory: Path, state: dict[str, Any]) -> None:
        save_file({k: v.contiguous() for k, v in self.shadow.items()}, str(directory / FILE),
                  metadata={"updates": str(self.updates)})

    def on_load(self, trainer: Any, directory: Path, state: dict[str, Any]) -> None:
        path = directory / FILE
        if not path.is_file():
            raise CheckpointError(f"{path} missing: the checkpoint was written without train.ema_decay")
        loaded = load_file(str(path))
        for key, value in self.shadow.items():
            value.copy_(loaded[key])
        with safe_open(str(path), "pt") as handle:
            self.updates = int(handle.metadata()["updates"])
