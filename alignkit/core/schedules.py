"""Schedules as pure functions of the step (nothing to checkpoint).

Alignment weight ``lambda(step)`` (steps count from 0 for the first optimizer step; every
schedule is exactly 0 from ``stop_step`` on, which is when the engine frees the teacher):
  linear_decay  paper eq. 5: lambda0 * max(0, (stop - s) / stop)
  constant      lambda0 until stop_step
  cosine        lambda0 * (1 + cos(pi * s / stop)) / 2 until stop_step
  step          lambda0 * gamma ** (s // step_size) until stop_step
Each registers in :data:`~alignkit.core.registry.SCHEDULES` as ``f(lambda0, stop_step) -> (step -> weight)``;
a term that never stops passes ``stop_step = math.inf`` (only ``constant`` accepts it).
Learning-rate schedules are in :mod:`alignkit.core.optim`.
"""
from __future__ import annotations

import math
from typing import Callable

from alignkit.core.registry import SCHEDULES

Schedule = Callable[[int], float]


@SCHEDULES.register("linear_decay")
def linear_decay(lambda0: float, stop_step: int) -> Schedule:
    """Paper eq. 5. ``linear_decay(0.1, 1500)(750) == 0.05``."""

    def weight(step: int) -> float:
        return lambda0 * max(0.0, (stop_step - step) / stop_step) if stop_step > 0 else 0.0

    return weight


@SCHEDULES.register("constant")
def constant(lambda0: float, stop_step: int) -> Schedule:
    def weight(step: int) -> float:
        return lambda0 if step < stop_step else 0.0

    return weight


@SCHEDULES.register("cosine")
def cosine(lambda0: float, stop_step: int) -> Schedule:
    def weight(step: int) -> float:
        if step >= stop_step:
            return 0.0
        return lambda0 * 0.5 * (1.0 + math.cos(math.pi * step / stop_step))

    return weight


@SCHEDULES.register("step")
def step(lambda0: float, stop_step: int, step_size: int = 0, gamma: float = 0.5) -> Schedule:
    size = step_size or max(1, stop_step // 4)

    def weight(s: int) -> float:
        return lambda0 * gamma ** (s // size) if s < stop_step else 0.0

    return weight


def build_weight_schedule(name: str, lambda0: float, stop_step: float, key: str = "align.schedule") -> Schedule:
    """The registered schedule ``name`` (an error naming ``key`` and the known names if none)."""
    return SCHEDULES.get(name, key)(lambda0, stop_step)
