"""Projections from the student's width to the teacher's (paper Appendix G).

``interpolate`` is eq. 6: endpoint-aligned linear interpolation along the hidden dimension,
parameter-free. ``linear`` is a learned map trained with the student; the engine drops it (and the
trainer takes it out of the optimizer) at its term's stop step.
``none`` is the identity and requires equal widths.

Each registers in :data:`~alignkit.core.registry.PROJECTIONS` as ``f(student_width,
teacher_width, key) -> nn.Module`` (``key``: the config key that chose it, for errors).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from alignkit.core.errors import ConfigError
from alignkit.core.registry import PROJECTIONS


def interpolate(h: Tensor, width: int) -> Tensor:
    """Resize the last dimension of ``h`` to ``width`` by eq. 6:
    u_j = j (d_in - 1) / (width - 1), out_j = (1 - b_j) h[floor u_j] + b_j h[floor u_j + 1]."""
    d_in = h.shape[-1]
    if d_in == width:
        return h
    if width == 1:
        return h[..., :1]
    u = torch.arange(width, device=h.device, dtype=torch.float64) * ((d_in - 1) / (width - 1))
    lower = u.floor().long().clamp(max=d_in - 1)
    upper = (lower + 1).clamp(max=d_in - 1)
    beta = (u - lower.to(torch.float64)).to(h.dtype)
    return h[..., lower] * (1 - beta) + h[..., upper] * beta


class Interpolate(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def forward(self, h: Tensor) -> Tensor:
        return interpolate(h, self.width)


@PROJECTIONS.register("interpolate")
def interpolated(student_width: int, teacher_width: int, key: str = "align.projection") -> nn.Module:
    return Interpolate(teacher_width) if student_width != teacher_width else nn.Identity()


@PROJECTIONS.register("linear")
def linear(student_width: int, teacher_width: int, key: str = "align.projection") -> nn.Module:
    return nn.Linear(student_width, teacher_width, bias=False)


@PROJECTIONS.register("none")
def identity(student_width: int, teacher_width: int, key: str = "align.projection") -> nn.Module:
    if student_width != teacher_width:
        raise ConfigError(
            f"{key}='none' but the student's width {student_width} differs from the teacher's "
            f"{teacher_width}; use 'interpolate' or 'linear'"
        )
    return nn.Identity()


def build_projection(kind: str, student_width: int, teacher_width: int, key: str = "align.projection") -> nn.Module:
    """The registered projection ``kind`` (an error naming ``key`` and the known names if none)."""
    return PROJECTIONS.get(kind, key)(student_width, teacher_width, key)
