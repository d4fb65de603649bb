"""Symmetric KL divergence between two logits tensors, the R3F regulariser.

For one row with logits ``a`` (P = softmax(a)) and ``b`` (Q = softmax(b)), and d = a - b::

    KL_S = KL(P||Q) + KL(Q||P) = sum_j (p_j - q_j)(log p_j - log q_j) = E_p[d] - E_q[d]

(the log-sum-exp terms cancel because both distributions sum to one). The gradient is row-local::

    dKL_S/da_j =  p_j (d_j - E_p[d]) + p_j - q_j
    dKL_S/db_j = -q_j (d_j - E_q[d]) + q_j - p_j

so the backward needs only a few statistics per row and the inputs; nothing of size rows x V is saved
beyond the logits themselves.

Centring. Any per-row constant r can be taken off d (sum_j (p_j - q_j) r = 0, d_j - E_p[d] is unchanged),
and one must be: when b = a + c (the same distribution), a - b is rounded to the float spacing at c
(0.0625 at c = 1e6 in float32) and E_p[d] - E_q[d] cancels to noise. Both paths use

    d'_j = (a_j - m_a) - (b_j - m_b) = d_j - (m_a - m_b)        (m_a, m_b: the rows' maxima)

whose differences are exact or nearly so for entries near their row's maximum, whatever c is; and the
log-probabilities as ``(x - m) - log Z`` with m and log Z kept apart (m + log Z rounded at |m| ~ 1e6 is
off by ~0.03, a 3 % error in p). The Triton kernel (``r3f_opt.kernels.sym_kl``) streams the same
quantities with running maxima and re-centres its sums as the maxima move.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._dispatch import use_triton

__all__ = ["symmetric_kl", "REDUCTIONS"]

REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _compute_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32


def _row_max(x: torch.Tensor) -> torch.Tensor:
    """Row maxima, 0 for a row that is -inf everywhere (so x - m = -inf, not NaN); NaN stays NaN."""
    m = x.amax(-1, keepdim=True)
    return torch.where(m == float("-inf"), torch.zeros_like(m), m)


def _log_z(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """log sum exp(x - m) per row, 0 for an empty row (Z = 0, so p = 0); a NaN Z stays NaN.

    Only Z == 0 is empty: NaN or +inf in the row makes Z NaN (+inf - +inf), and the row's value and
    gradients NaN.
    """
    z = torch.exp(x - m).sum(-1, keepdim=True)
    return torch.where(z == 0, torch.zeros_like(z), torch.log(z))


def _probs(a, b, m_a, m_b, lz_a, lz_b):
    """p, q and the centred d' = (a - m_a) - (b - m_b) of rows ``a``, ``b`` (compute dtype).

    d' is +-inf where one side only is -inf and NaN where both are; every use multiplies it by a
    probability and takes 0 * (that) := 0 where the probability is 0.
    """
    la, lb = a - m_a, b - m_b
    return torch.exp(la - lz_a), torch.exp(lb - lz_b), la - lb


def _times(prob: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """prob * x with 0 * (+-inf or NaN) := 0 where prob == 0 (a NaN prob stays NaN)."""
    return torch.where(prob == 0, torch.zeros_like(x), prob * x)


class _SymmetricKLRows(torch.autograd.Function):
    """Per-row KL_S of 2-D logits (masked rows give 0), closed-form backward."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        dtype = _compute_dtype(a, b)
        a32, b32 = a.to(dtype), b.to(dtype)
        m_a, m_b = _row_max(a32), _row_max(b32)
        lz_a, lz_b = _log_z(a32, m_a), _log_z(b32, m_b)
        p, q, d = _probs(a32, b32, m_a, m_b, lz_a, lz_b)
        # KL_S = sum (p - q) d': accurate when p ~ q (R3F's regime). A term with p = q (0 on both sides:
        # -inf in both, or -inf against an underflowing logit) is 0; p > q = 0 with d' = +inf (or the
        # reverse) makes the row +inf.
        kl = torch.where(p == q, torch.zeros_like(d), (p - q) * d).sum(-1, keepdim=True)
        e_p = _times(p, d).sum(-1, keepdim=True)  # E_p[d']
        e_q = _times(q, d).sum(-1, keepdim=True)  # E_q[d']
        rows = kl.squeeze(-1)
        if mask is not None:
            rows = torch.where(mask, rows, torch.zeros_like(rows))
        ctx.save_for_backward(a, b, mask, m_a, m_b, lz_a, lz_b, e_p, e_q)
        return rows

    @staticmethod
    @torch.autograd.function.once_differentiable  # the closed form treats the row statistics as constants
    def backward(ctx, grad_rows: torch.Tensor):
        a, b, mask, m_a, m_b, lz_a, lz_b, e_p, e_q = ctx.saved_tensors
        dtype = lz_a.dtype
        p, q, d = _probs(a.to(dtype), b.to(dtype), m_a, m_b, lz_a, lz_b)
        g = grad_rows.to(dtype).unsqueeze(-1)
        if mask is not None:
            g = torch.where(mask.unsqueeze(-1), g, torch.zeros_like(g))
        grad_a = grad_b = None
        # d - E_p[d] = d' - E_p[d']: the centring drops out of the gradient.
        if ctx.needs_input_grad[0]:
            grad_a = g * (_times(p, d - e_p + 1.0) - q)
            if mask is not None:  # NaN-safe zero for masked rows (their logits may be anything)
                grad_a = torch.where(mask.unsqueeze(-1), grad_a, torch.zeros_like(grad_a))
            grad_a = grad_a.to(a.dtype)
        if ctx.needs_input_grad[1]:
            grad_b = g * (_times(q, e_q - d + 1.0) - p)
            if mask is not None:
                grad_b = torch.where(mask.unsqueeze(-1), grad_b, torch.zeros_like(grad_b))
            grad_b = grad_b.to(b.dtype)
        return grad_a, grad_b, None


def _bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` as bool: bool as is, integers only if every value is 0 or 1; anything else is an error."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool tensor (True: the row counts), got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(
            f"mask must be a bool tensor (True: the row counts), got {mask.dtype}; pass e.g. "
            "labels != -100, or attention_mask.bool()"
        )
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):  # one device sync, for integer masks only: pass a bool mask to avoid it
        raise ValueError(
            f"an integer mask must hold only 0 and 1 (like an attention_mask), got the value "
            f"{int(mask[bad].flatten()[0])}; labels are not a mask (cast to bool, -100 would count and "
            "token 0 would not): pass labels != -100"
        )
    return mask != 0


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
    (float64 always takes the PyTorch path). Both paths give the same answers, edge cases included.
    A constant offset between the two inputs (``q_logits = p_logits + c`` per row) costs no precision.

    Edge cases (per counted row; masked rows are never looked at):

    * an entry whose probability is 0 in both inputs contributes 0, with zero gradient: ``-inf`` in
      both (a masked vocabulary), or ``-inf`` in one and a finite logit in the other whose probability
      underflows to 0 in the compute dtype (e.g. ``[0, -inf]`` vs ``[0, -1e30]`` gives 0);
    * ``-inf`` in one input where the other has a nonzero probability gives ``+inf`` (the supports
      differ), with non-finite gradients;
    * a row that is ``-inf`` everywhere in both inputs gives 0 with zero gradient;
    * NaN or ``+inf`` anywhere in a row (either input) gives NaN for the row and NaN for every gradient
      entry of the row, so any reduction is NaN and a training step that checks its loss is skipped;
    * ``V = 0`` (no classes) is a ``ValueError``; no rows (``(0, V)``) gives 0 (``"none"``: empty).

    Args:
        p_logits, q_logits: logits of the same shape ``(*, V)`` with ``V >= 1``; a 1-D tensor is one row.
        mask: optional tensor of shape ``p_logits.shape[:-1]``; rows where it is False count as 0
            and get zero gradient (e.g. padding tokens). A bool tensor, or an integer tensor whose
            values are all 0 or 1 (an ``attention_mask``; checked, which costs a device sync).
            Anything else is refused: float masks (``TypeError``), and integer tensors holding other
            values (``ValueError``), notably labels: pass ``labels != -100``, not ``labels``.
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
    if p_logits.shape[-1] == 0:
        raise ValueError(
            f"logits of shape {tuple(p_logits.shape)} have V = 0 classes: a softmax over no classes is "
            "undefined; pass logits of shape (*, V) with at least one class in the last dimension"
        )
    if not (p_logits.is_floating_point() and q_logits.is_floating_point()):
        raise ValueError(f"logits must be floating point, got {p_logits.dtype} and {q_logits.dtype}")
    lead = p_logits.shape[:-1]
    if mask is not None:
        mask = _bool_mask(mask)
        if mask.shape != lead:
            raise ValueError(
                f"mask must have the logits' shape without the last dimension, {tuple(lead)}, "
                f"got {tuple(mask.shape)}"
            )
        mask = mask.to(device=p_logits.device).reshape(-1)
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
