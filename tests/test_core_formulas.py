"""Core formulas against hand-computed values: eq. 5 (schedule), eq. 6 (interpolation),
eq. 4/7 (cosine objective), KD (eq. 2), and the other objectives' basic properties."""
import math

import pytest
import torch

from alignkit.core import objectives, schedules
from alignkit.core.projections import build_projection, interpolate


def test_linear_decay_matches_eq5():
    weight = schedules.linear_decay(0.1, 1500)
    assert weight(0) == pytest.approx(0.1)
    assert weight(750) == pytest.approx(0.05)
    assert weight(1200) == pytest.approx(0.1 * 300 / 1500)
    assert weight(1500) == 0.0
    assert weight(4000) == 0.0


def test_other_weight_schedules_end_at_stop():
    for name in ("constant", "cosine", "step"):
        weight = schedules.build_weight_schedule(name, 0.2, 100)
        assert weight(0) == pytest.approx(0.2)
        assert weight(99) > 0.0
        assert weight(100) == 0.0
    assert schedules.cosine(1.0, 100)(50) == pytest.approx(0.5)
    assert schedules.step(1.0, 100)(25) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="align.schedule"):
        schedules.build_weight_schedule("exp", 0.1, 10)


def test_interpolate_matches_eq6_by_hand():
    h = torch.tensor([[0.0, 10.0, 20.0, 30.0, 40.0]])  # d_M = 5
    out = interpolate(h, 3)  # u_j = j * 4 / 2 = 0, 2, 4 -> endpoints kept
    assert torch.allclose(out, torch.tensor([[0.0, 20.0, 40.0]]))
    out = interpolate(torch.tensor([1.0, 3.0, 7.0]), 5)  # u_j = j * 2 / 4 = 0, .5, 1, 1.5, 2
    assert torch.allclose(out, torch.tensor([1.0, 2.0, 3.0, 5.0, 7.0]))
    h = torch.randn(2, 3, 7)
    assert interpolate(h, 7) is h
    up = interpolate(h, 13)
    assert up.shape == (2, 3, 13)
    assert torch.allclose(up[..., 0], h[..., 0]) and torch.allclose(up[..., -1], h[..., -1])


def eq6(h: torch.Tensor, width: int) -> torch.Tensor:
    """Eq. 6 written out, one output column at a time."""
    d_in = h.shape[-1]
    columns = []
    for j in range(width):
        u = j * (d_in - 1) / (width - 1)
        lower = min(math.floor(u), d_in - 1)
        beta = u - lower
        columns.append((1 - beta) * h[..., lower] + (beta * h[..., lower + 1] if lower + 1 < d_in else 0.0))
    return torch.stack(columns, dim=-1)


@pytest.mark.parametrize("d_in, width", [(48, 27), (24, 27), (9, 5), (5, 9)])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("autocast", [False, True])
def test_interpolate_equals_eq6_in_value_and_gradient(d_in, width, dtype, tolerance, autocast):
    """The matrix form (one matmul forward and backward) against eq. 6 by columns; under bf16
    autocast (the trainer's) it keeps the input's precision, as the weighted sum did."""
    h = torch.randn(2, 3, d_in, dtype=torch.float64)
    weights = torch.randn(2, 3, width, dtype=torch.float64)  # a loss weighting every output differently
    reference = h.clone().requires_grad_()
    (eq6(reference, width) * weights).sum().backward()
    x = h.to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = interpolate(x, width)
    (out * weights.to(dtype)).sum().backward()
    assert out.dtype == dtype
    assert torch.allclose(out.double(), eq6(h, width), atol=tolerance, rtol=0)
    assert torch.allclose(x.grad.double(), reference.grad, atol=tolerance, rtol=0)


def test_interpolate_builds_in_inference_mode_what_training_can_use():
    with torch.inference_mode():
        interpolate(torch.randn(2, 11), 7)  # the matrix for (11, 7, float32, cpu) is cached here
    h = torch.randn(2, 11, requires_grad=True)
    interpolate(h, 7).sum().backward()
    assert h.grad is not None


def test_projection_none_rejects_width_mismatch():
    with pytest.raises(ValueError, match="align.projection"):
        build_projection("none", 64, 32)
    assert isinstance(build_projection("linear", 64, 32), torch.nn.Linear)


def test_cosine_objective_matches_eq7_mean():
    s = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [5.0, 5.0]]])
    t = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]])
    per_token = [1.0, 1 / math.sqrt(2), -1.0]
    assert objectives.cosine(s, t).item() == pytest.approx(-sum(per_token) / 3)
    mask = torch.tensor([[True, True, False]])
    assert objectives.cosine(s, t, mask).item() == pytest.approx(-(per_token[0] + per_token[1]) / 2)


def test_mse_and_logsum_zero_when_equal():
    x = torch.randn(2, 5, 4)
    assert objectives.mse(x, x).item() == 0.0
    near = objectives.logsum(x, x + 1e-4 * torch.randn_like(x)).item()
    far = objectives.logsum(x, torch.randn_like(x)).item()
    assert near < far


def test_logsum_by_hand():
    s = torch.tensor([[[1.0], [-1.0]]])
    t = torch.tensor([[[-1.0], [1.0]]])  # standardised: s=(1,-1), t=(-1,1) -> |d| = 2
    expected = math.log(2.0**4)
    assert objectives.logsum(s, t, alpha=4.0).item() == pytest.approx(expected, rel=1e-3)


def test_cca_perfect_linear_relation_is_minus_one():
    x = torch.randn(1, 400, 3)
    mixed = x @ torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, -1.0]])
    assert objectives.cca(x, mixed).item() == pytest.approx(-1.0, abs=1e-2)
    assert objectives.cca(x, torch.randn(1, 400, 3)).item() > -0.3


def test_kd_is_eq2_cross_entropy():
    student = torch.tensor([[[0.0, math.log(3.0)]]])  # p_M = (1/4, 3/4)
    teacher = torch.tensor([[[0.0, 0.0]]])  # p_T = (1/2, 1/2)
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert objectives.kd(student, teacher).item() == pytest.approx(expected)
    mask = torch.tensor([[False]])
    assert objectives.kd(student, teacher, mask).item() == 0.0
