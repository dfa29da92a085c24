"""The chunked linear cross-entropy equals F.cross_entropy on the full logits (values and
gradients), in float32 and under bf16 autocast, with ignored labels, and without autograd."""
import pytest
import torch
import torch.nn.functional as F

from alignkit.core.linear_ce import linear_cross_entropy


def data(n: int = 37, d: int = 12, v: int = 50):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=generator, requires_grad=True)
    weight = torch.randn(v, d, generator=generator, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=generator)
    labels[::5] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("chunk", [1, 8, 1000])
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_chunked_cross_entropy_matches_full_logits(chunk: int, precision: str) -> None:
    hidden, weight, labels = data()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16")
    with autocast:
        expected = F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=-100)
    (expected * 2).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    with autocast:
        got = linear_cross_entropy(hidden, weight, labels, chunk=chunk)
    (got * 2).backward()
    tol = dict(rtol=1e-5, atol=1e-6) if precision == "float32" else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got, expected, **tol)
    torch.testing.assert_close(hidden.grad, grads[0], **tol)
    torch.testing.assert_close(weight.grad, grads[1], **tol)
    with torch.no_grad(), autocast:  # evaluation: the loss only
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels, chunk=chunk), expected, **tol)


def test_no_counted_token_gives_zero_not_nan() -> None:
    hidden, weight, labels = data()
    assert linear_cross_entropy(hidden, weight, torch.full_like(labels, -100)).item() == 0.0
