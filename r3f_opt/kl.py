"""Symmetric KL divergence between two logits tensors, the R3F regulariser.

For one row with logits ``a`` (P = softmax(a)) and ``b`` (Q = softmax(b)), and d = a - b::

    KL_S = KL(P||Q) + KL(Q||P) = sum_j (p_j - q_j)(log p_j - log q_j) = E_p[d] - E_q[d]

(the log-sum-exp terms cancel because both distributions sum to one). The gradient is row-local::

    dKL_S/da_j =  p_j (d_j - E_p[d]) + p_j - q_j
    dKL_S/db_j = -q_j (d_j - E_q[d]) + q_j - p_j

so the backward needs only four statistics per row (two log-sum-exps, E_p[d], E_q[d]) and the inputs;
nothing of size rows x V is saved beyond the logits themselves.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._dispatch import use_triton

__all__ = ["symmetric_kl", "REDUCTIONS"]

REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _compute_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32


def _row_stats(a: torch.Tensor, b: torch.Tensor):
    """Per-row p, q, d and the statistics of the closed form. ``a``, ``b``: (rows, V), compute dtype."""
    lse_a = torch.logsumexp(a, dim=-1, keepdim=True)
    lse_b = torch.logsumexp(b, dim=-1, keepdim=True)
    # A row that is -inf everywhere has lse = -inf; use 0 so p = exp(-inf) = 0 rather than NaN.
    lse_a = torch.where(torch.isfinite(lse_a), lse_a, torch.zeros_like(lse_a))
    lse_b = torch.where(torch.isfinite(lse_b), lse_b, torch.zeros_like(lse_b))
    p = torch.exp(a - lse_a)
    q = torch.exp(b - lse_b)
    # Entries that are -inf in both inputs: d = -inf - (-inf) = NaN, but p = q = 0 there, so they add 0.
    d = torch.nan_to_num(a - b, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    return lse_a, lse_b, p, q, d


class _SymmetricKLRows(torch.autograd.Function):
    """Per-row KL_S of 2-D logits (masked rows give 0), closed-form backward."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        dtype = _compute_dtype(a, b)
        a32, b32 = a.to(dtype), b.to(dtype)
        lse_a, lse_b, p, q, d = _row_stats(a32, b32)
        # KL_S = sum (p - q) d: accurate when p ~ q (R3F's regime), and 0 * inf never arises from an
        # entry that is -inf on one side only (the row is then +inf, as in the reference).
        kl = ((p - q) * d).sum(-1, keepdim=True)
        e_p = (p * d).sum(-1, keepdim=True)  # E_p[d]
        e_q = (q * d).sum(-1, keepdim=True)  # E_q[d]
        rows = kl.squeeze(-1)
        if mask is not None:
            rows = torch.where(mask, rows, torch.zeros_like(rows))
        ctx.save_for_backward(a, b, mask, lse_a, lse_b, e_p, e_q)
        return rows

    @staticmethod
    @torch.autograd.function.once_differentiable  # the closed form treats the row statistics as constants
    def backward(ctx, grad_rows: torch.Tensor):
        a, b, mask, lse_a, lse_b, e_p, e_q = ctx.saved_tensors
        dtype = lse_a.dtype
        a32, b32 = a.to(dtype), b.to(dtype)
        p = torch.exp(a32 - lse_a)
        q = torch.exp(b32 - lse_b)
        d = torch.nan_to_num(a32 - b32, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
        g = grad_rows.to(dtype).unsqueeze(-1)
        if mask is not None:
            g = torch.where(mask.unsqueeze(-1), g, torch.zeros_like(g))
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = g * (p * (d - e_p + 1.0) - q)
            if mask is not None:  # NaN-safe zero for masked rows (their logits may be -inf everywhere)
                grad_a = torch.where(mask.unsqueeze(-1), grad_a, torch.zeros_like(grad_a))
            grad_a = grad_a.to(a.dtype)
        if ctx.needs_input_grad[1]:
            grad_b = g * (q * (e_q - d + 1.0) - p)
            if mask is not None:
                grad_b = torch.where(mask.unsqueeze(-1), grad_b, torch.zeros_like(grad_b))
            grad_b = grad_b.to(b.dtype)
        return grad_a, grad_b, None


def symmetric_kl(
    p_logits: torch.Tensor,
    q_logits: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    r"""Symmetric KL divergence ``KL(P||Q) + KL(Q||P)`` between softmaxes over the last dimension.

    Computed in float32 whatever the input dtype (float64 if either input is float64); gradients flow
    into both inputs and are returned in each input's dtype. CUDA tensors use the fused Triton kernel
    (``r3f_opt.kernels.sym_kl``), others the PyTorch path; ``R3F_KERNELS=torch|triton`` overrides this
    (float64 always takes the PyTorch path). Entries that are ``-inf`` in both inputs
    (a masked vocabulary) contribute 0.

    Args:
        p_logits, q_logits: logits of the same shape ``(*, V)``; a 1-D tensor is one row.
        mask: optional bool tensor of shape ``p_logits.shape[:-1]``; rows where it is False count as 0
            and get zero gradient (e.g. padding tokens).
        reduction: ``"batchmean"`` (sum over counted rows / ``p_logits.shape[0]``, the reference's
            reduction; a 1-D input is one row), ``"sum"``, ``"mean"`` (sum / number of counted rows,
            0 if none) or ``"none"`` (per-row values of shape ``p_logits.shape[:-1]``, 0 where masked).

    Example:
        >>> clean, noisy = torch.randn(4, 3), torch.randn(4, 3)
        >>> symmetric_kl(clean, noisy).shape
        torch.Size([])
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if p_logits.shape != q_logits.shape:
        raise ValueError(
            f"p_logits and q_logits must have the same shape, got {tuple(p_logits.shape)} and "
            f"{tuple(q_logits.shape)}"
        )
    if p_logits.dim() == 0:
        raise ValueError("logits must have at least one dimension (the vocabulary)")
    if not (p_logits.is_floating_point() and q_logits.is_floating_point()):
        raise ValueError(f"logits must be floating point, got {p_logits.dtype} and {q_logits.dtype}")
    lead = p_logits.shape[:-1]
    if mask is not None:
        if mask.shape != lead:
            raise ValueError(
                f"mask must have the logits' shape without the last dimension, {tuple(lead)}, "
                f"got {tuple(mask.shape)}"
            )
        mask = mask.to(device=p_logits.device, dtype=torch.bool).reshape(-1)
    if p_logits.device != q_logits.device:
        raise ValueError(f"p_logits and q_logits must be on one device, got {p_logits.device} and {q_logits.device}")
    if torch.float64 not in (p_logits.dtype, q_logits.dtype) and use_triton("symmetric_kl", p_logits, q_logits):
        from .kernels.sym_kl import symmetric_kl_rows

        rows = symmetric_kl_rows(p_logits, q_logits, mask)
    else:
        vocab = p_logits.shape[-1]
        rows = _SymmetricKLRows.apply(p_logits.reshape(-1, vocab), q_logits.reshape(-1, vocab), mask)
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / max(lead[0] if len(lead) > 0 else 1, 1)
    counted = mask.sum() if mask is not None else torch.tensor(rows.numel(), device=rows.device)
    return total / counted.clamp(min=1).to(total.dtype)
