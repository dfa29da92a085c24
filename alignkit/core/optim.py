"""The optimizer and learning-rate schedule a run trains with, chosen by ``train.optimizer`` and
``train.lr_schedule`` from the OPTIMIZERS and LR_SCHEDULES registries (plug-ins add their own).

Optimizers (weight decay never applies to norms and biases, i.e. 1-D parameters):
  adamw   AdamW, decoupled weight decay (default)
  adam    Adam, weight decay as an L2 term
  sgd     SGD with momentum ``betas[0]``
LR schedules: a linear warmup over ``warmup_ratio * steps`` steps, then
  warmup_cosine  cosine decay to ``min_lr_ratio`` of the peak at the last step (default)
  warmup_linear  linear decay to ``min_lr_ratio`` of the peak at the last step
  constant       the peak LR
They are pure functions of the step (nothing to checkpoint: a resumed run recomputes them).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from alignkit.core.config import TrainConfig
from alignkit.core.registry import LR_SCHEDULES, OPTIMIZERS

Schedule = Callable[[int], float]


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@OPTIMIZERS.register("adamw")
def adamw(groups: list[dict[str, Any]], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=device.type == "cuda")


@OPTIMIZERS.register("adam")
def adam(groups: list[dict[str, Any]], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=device.type == "cuda")


@OPTIMIZERS.register("sgd")
def sgd(groups: list[dict[str, Any]], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.betas[0])


def build_optimizer(cfg: TrainConfig, module: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """``train.optimizer`` over the trainable parameters of ``module``."""
    return OPTIMIZERS.get(cfg.optimizer, "train.optimizer")(param_groups(module, cfg.weight_decay), cfg, device)


def warmup_then(decay: Callable[[float, float], float]) -> Callable[..., Schedule]:
    """An LR schedule: linear warmup to ``peak``, then ``peak * decay(progress, min_ratio)`` with
    ``progress`` going from 0 after the warmup to 1 at the last step."""

    def schedule(peak: float, total_steps: int, warmup_steps: int, min_ratio: float = 0.1) -> Schedule:
        def lr(s: int) -> float:
            if warmup_steps > 0 and s < warmup_steps:
                return peak * (s + 1) / warmup_steps
            progress = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
            return peak * decay(progress, min_ratio)

        return lr

    return schedule


LR_SCHEDULES.register("warmup_cosine", warmup_then(lambda p, low: low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * p))))
LR_SCHEDULES.register("warmup_linear", warmup_then(lambda p, low: low + (1.0 - low) * (1.0 - p)))
LR_SCHEDULES.register("constant", warmup_then(lambda p, low: 1.0))


def build_lr_schedule(cfg: TrainConfig) -> Schedule:
    """``train.lr_schedule`` as a function of the step (0 = the first optimizer step)."""
    make = LR_SCHEDULES.get(cfg.lr_schedule, "train.lr_schedule")
    return make(cfg.lr, cfg.steps, int(cfg.warmup_ratio * cfg.steps), cfg.min_lr_ratio)
