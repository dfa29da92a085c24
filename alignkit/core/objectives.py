"""Alignment objectives on features ``s`` (student, projected) and ``t`` (teacher), both
[B, S, D], with an optional boolean ``mask`` [B, S] of positions that count.

All feature objectives are means over the counted positions, so ``lambda`` keeps the paper's
meaning next to a token-averaged NLL (eq. 7 writes a sum; its mean is what pairs with a mean NLL).
``kd`` is the logit distillation term (paper eq. 2) of ``logit_kd`` terms (the RKD and SALT presets).

The feature objectives register in :data:`~alignkit.core.registry.OBJECTIVES` at import; a
plug-in adds its own with ``OBJECTIVES.register("name", f)``, ``f(s, t, mask, **options)``
(``options``: a term's ``objective_options``).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.core.registry import OBJECTIVES

Objective = Callable[..., Tensor]


def _masked_rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """Flatten [B, S, D] to [N, D] keeping the counted positions only."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if mask is None else rows[mask.reshape(-1).bool()]


def cosine_similarity(s: Tensor, t: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean cosine similarity over counted positions (a metric; the loss is its negative)."""
    sim = F.cosine_similarity(s.float(), t.float(), dim=-1, eps=1e-8)
    if mask is None:
        return sim.mean()
    weights = mask.to(sim.dtype)
    return (sim * weights).sum() / weights.sum().clamp(min=1.0)


@OBJECTIVES.register("cosine")
def cosine(s: Tensor, t: Tensor, mask: Tensor | None = None) -> Tensor:
    """Paper eq. 4/7: negative cosine similarity of the normalised vectors, averaged."""
    return -cosine_similarity(s, t, mask)


@OBJECTIVES.register("mse")
def mse(s: Tensor, t: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error over counted positions and feature dimensions."""
    return F.mse_loss(_masked_rows(s.float(), mask), _masked_rows(t.float(), mask))


@OBJECTIVES.register("logsum")
def logsum(s: Tensor, t: Tensor, mask: Tensor | None = None, alpha: float = 4.0) -> Tensor:
    """Appendix H (Miles & Mikolajczyk, AAAI 2024): features are standardised per dimension
    over the counted positions (batch norm without affine, so scale gaps between a small and a
    large model do not dominate), then ``log(mean(|s - t| ** alpha))``: a soft maximum that
    emphasises the dimensions where the two disagree most."""
    rows_s, rows_t = _masked_rows(s.float(), mask), _masked_rows(t.float(), mask)
    rows_s = F.batch_norm(rows_s, None, None, training=True, eps=1e-5)
    rows_t = F.batch_norm(rows_t, None, None, training=True, eps=1e-5)
    return torch.log((rows_s - rows_t).abs().pow(alpha).mean() + 1e-12)


def _whitener(cov: Tensor) -> Tensor:
    """L^-1 for cov = L L^T. Any whitening gives the same canonical correlations; Cholesky
    (unlike an eigendecomposition) keeps finite gradients when eigenvalues repeat, as they do
    for interpolated, rank-deficient student features."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    return torch.linalg.solve_triangular(torch.linalg.cholesky(cov), eye, upper=False)


@OBJECTIVES.register("cca")
def cca(s: Tensor, t: Tensor, mask: Tensor | None = None, ridge: float = 1e-3) -> Tensor:
    """Table 5's CCA objective: negative mean canonical correlation between the two feature
    sets over the counted positions (float64; covariances ridge-regularised relative to their
    scale; the canonical correlations are the singular values of Wss Cst Wtt^T, W whiteners)."""
    rows_s, rows_t = _masked_rows(s.double(), mask), _masked_rows(t.double(), mask)
    n = rows_s.shape[0]
    if n < 2:
        return s.sum() * 0.0
    rows_s = rows_s - rows_s.mean(0)
    rows_t = rows_t - rows_t.mean(0)

    def covariance(a: Tensor) -> Tensor:
        cov = a.T @ a / (n - 1)
        scale = cov.diagonal().mean().clamp(min=1e-12)
        return cov + ridge * scale * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)

    cov_st = rows_s.T @ rows_t / (n - 1)
    whitened = _whitener(covariance(rows_s)) @ cov_st @ _whitener(covariance(rows_t)).T
    return (-torch.linalg.svdvals(whitened).mean()).to(s.dtype)


def kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Paper eq. 2 at temperature T: cross-entropy of the teacher's softened next-token
    distribution under the student's, times T^2 (Hinton et al.), averaged over counted
    positions ([B, S, V] per-token logits) or over samples ([B, C] per-sample class logits,
    ``mask`` None). The two vocabularies are compared on their common prefix (same tokenizer,
    possibly padded embedding matrices)."""
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    student, teacher = student_logits[..., :vocab].float(), teacher_logits[..., :vocab].float()
    if temperature != 1.0:  # each division is a pass over [B, S, V]: the largest tensors of a step
        student, teacher = student / temperature, teacher / temperature
    p_teacher = F.softmax(teacher, dim=-1)
    # cross_entropy with probability targets: the same sum, with fewer [B, S, V] intermediates
    # than log_softmax, a product and a sum (a third less time on CPU at 49k tokens)
    per_position = F.cross_entropy(student.reshape(-1, vocab), p_teacher.reshape(-1, vocab), reduction="none")
    per_position = per_position.view(student.shape[:-1]) * temperature**2  # [B, S] per token, [B] per sample
    if mask is None:
        return per_position.mean()
    weights = mask.to(per_position.dtype)
    return (per_position * weights).sum() / weights.sum().clamp(min=1.0)
