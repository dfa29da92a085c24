"""Cross-entropy of a linear LM head without the full logits.

``F.cross_entropy(hidden @ weight.T, labels)`` keeps [N, V] logits alive for backward, and a
float32 copy plus its log-softmax on top (N = 16 x 1280 tokens, V = 49k: ~4 GB each at 1.4B
scale). :func:`linear_cross_entropy` walks the tokens in chunks of ``chunk`` rows: each chunk's
logits are made, turned into its loss *and* its gradients (softmax minus one-hot, over the number
of counted tokens) and freed before the next. What stays for backward is the gradient for the
hidden states ([N, D], compute dtype) and for the head weight ([V, D], float32) -- the size of
the weight's own gradient. Backward only scales them by the incoming gradient. Without autograd
(evaluation) only the loss is computed.

Numerics match ``F.cross_entropy(logits.float(), labels, ignore_index=-100)`` with the logits in
the compute dtype (the autocast dtype when autocast is on, else the weight's): the matmul runs in
that dtype, the log-softmax in float32. A batch with no counted token gives 0, not NaN.
"""
from __future__ import annotations

import torch
from torch import Tensor

CHUNK_TOKENS = 4096  # rows of logits alive at once: 4096 x 49152 x 4 B = 0.8 GB per float32 temporary
IGNORE_INDEX = -100


def _chunks(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int, grads: bool
            ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(summed loss / count, d loss / d hidden, d loss / d weight) over all rows."""
    count = (labels != IGNORE_INDEX).sum().clamp(min=1)
    total = hidden.new_zeros((), dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if grads else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads else None
    for start in range(0, hidden.shape[0], chunk):
        rows = hidden[start:start + chunk]
        target = labels[start:start + chunk]
        valid = target != IGNORE_INDEX
        logits = (rows @ weight.T).float()
        lse = torch.logsumexp(logits, dim=-1)
        picked = logits.gather(1, target.clamp(min=0)[:, None]).squeeze(1)
        total = total + ((lse - picked) * valid).sum()
        if grads:
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the chunk's logits
            probs.scatter_add_(1, target.clamp(min=0)[:, None], -valid[:, None].to(probs.dtype))
            probs.mul_((valid.to(probs.dtype) / count)[:, None])
            step = probs.to(weight.dtype)
            grad_hidden[start:start + chunk] = step @ weight
            grad_weight.add_(step.T @ rows)  # float32 accumulation over chunks
    return total / count, grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int) -> Tensor:  # type: ignore[override]
        loss, grad_hidden, grad_weight = _chunks(hidden, weight, labels, chunk, grads=True)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output.to(grad_hidden.dtype), (grad_weight * grad_output).to(ctx.weight_dtype), None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int = CHUNK_TOKENS) -> Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` [N, V] against ``labels`` [N] over the labels
    that are not -100; ``hidden`` [N, D], ``weight`` [V, D]. See the module docstring."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)  # autograd casts the gradients back
    with torch.autocast(device, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(hidden, weight, labels, chunk)
        return _chunks(hidden, weight, labels, chunk, grads=False)[0]
