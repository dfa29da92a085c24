"""Projections from the student's width to the teacher's (paper Appendix G).

``interpolate`` is eq. 6: endpoint-aligned linear interpolation along the hidden dimension,
parameter-free. ``linear`` is a learned map trained with the student; the engine drops it (and the
trainer takes it out of the optimizer) at its term's stop step.
``none`` is the identity and requires equal widths.

Each registers in :data:`~alignkit.core.registry.PROJECTIONS` as ``f(student_width,
teacher_width, key) -> nn.Module`` (``key``: the config key that chose it, for errors).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from alignkit.core.errors import ConfigError
from alignkit.core.registry import PROJECTIONS


@functools.lru_cache(maxsize=32)
def _interpolation_matrix(d_in: int, width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Eq. 6 as a [d_in, width] matrix (two weights per column), built once per shape, dtype and
    device: ``h @ matrix`` backpropagates as one matmul, where indexing ``h`` would accumulate
    its gradient with ``index_put_``."""
    with torch.inference_mode(False):  # built under inference mode, autograd could not save it for backward
        u = torch.arange(width, device=device, dtype=torch.float64) * ((d_in - 1) / (width - 1))
        lower = u.floor().long().clamp(max=d_in - 1)
        upper = (lower + 1).clamp(max=d_in - 1)
        beta = (u - lower.to(torch.float64)).to(dtype)  # the weights rounded as eq. 6 in ``dtype`` rounds them
        columns = torch.arange(width, device=device)
        matrix = torch.zeros(d_in, width, dtype=dtype, device=device)
        # accumulate: the last column has lower == upper (and beta 0)
        matrix.index_put_((torch.cat([lower, upper]), torch.cat([columns, columns])), torch.cat([1 - beta, beta]),
                          accumulate=True)
    return matrix


def interpolate(h: Tensor, width: int) -> Tensor:
    """Resize the last dimension of ``h`` to ``width`` by eq. 6:
    u_j = j (d_in - 1) / (width - 1), out_j = (1 - b_j) h[floor u_j] + b_j h[floor u_j + 1]."""
    d_in = h.shape[-1]
    if d_in == width:
        return h
    if width == 1:
        return h[..., :1]
    matrix = _interpolation_matrix(d_in, width, h.dtype, h.device)
    if not torch.amp.is_autocast_available(h.device.type):  # e.g. meta (shapes only): no autocast to leave
        return h @ matrix
    with torch.autocast(h.device.type, enabled=False):  # in h's dtype, as the weighted sum is, not autocast's
        return h @ matrix


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
