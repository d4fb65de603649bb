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

import contextlib
import functools
import math
from typing import Callable, Optional

import torch

from ._dispatch import use_triton

__all__ = ["symmetric_kl", "REDUCTIONS"]

REDUCTIONS = ("batchmean", "sum", "mean", "none")


def differentiable_once(backward: Callable) -> Callable:
    """For an autograd Function's ``backward`` written in closed form (the row statistics held constant): like
    torch's ``once_differentiable``, but a backward whose result could be differentiated again
    (``create_graph=True``) raises, instead of returning a gradient whose own gradient is silently wrong (it
    would flow only through whatever produced the logits, e.g. a matmul, not through the closed form)."""
    @functools.wraps(backward)
    def run(ctx, *grads):
        if torch.is_grad_enabled():  # the engine enables grad in backward exactly when create_graph=True
            raise RuntimeError(
                "the symmetric KL's backward is a closed form, differentiable once: a double backward "
                "(create_graph=True, e.g. a gradient penalty through the KL) is not supported; write that KL "
                "with torch.log_softmax instead")
        with torch.no_grad():
            return backward(ctx, *grads)
    return run


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


# ------------------------------------------------------------------------------------ the PyTorch path
# Rows are processed in chunks: per chunk, four chunk x V buffers of the compute dtype (the centred logits
# of both sides, then d' and p - q in them; p and q), reused chunk after chunk, instead of six to fifteen
# full-size temporaries streaming through memory. CHUNK_BYTES per buffer (8 MiB in all: inside a server's
# L3) bounds a chunk; WORKSPACE_FRACTION of one input's bytes bounds the four buffers, so that the extra
# memory stays near the two gradients (about 2.75x one input), but a row is never split (one row of
# V = 128256 is a 0.5 MiB buffer) and a chunk has at least MIN_CHUNK_ELEMENTS. Measured on a 2-core Zen 3
# VM (docs/benchmarks.md): larger chunks win up to about 16 rows of 32000, each chunk costing some 25
# operator calls.
CHUNK_BYTES = 2 * 2**20
WORKSPACE_FRACTION = 0.75
STATS_PASS_FRACTION = 2.2  # a forward without gradients: 4 buffers + the vecdots' product (5/4) within ~2.75
MIN_CHUNK_ELEMENTS = 2**15  # below this the workspace bound gives way: a small input is one or a few chunks
STATS = 7  # per-row statistics the forward keeps (see _fast_chunk)


def default_chunk_rows(rows: int, vocab: int, dtype: torch.dtype = torch.float32,
                       input_dtype: Optional[torch.dtype] = None, fraction: float = WORKSPACE_FRACTION) -> int:
    """Rows per chunk of the PyTorch path: ``CHUNK_BYTES`` per compute-``dtype`` buffer and four buffers
    within ``fraction`` of one input (of ``input_dtype``, default ``dtype``), but at least
    ``MIN_CHUNK_ELEMENTS`` (a small input, e.g. a classification head's, takes one chunk: each chunk costs
    some 25 operator calls) and at least one row. ``fraction``: ``WORKSPACE_FRACTION`` when the gradients
    (2 inputs' worth) are alive beside the workspace; ``STATS_PASS_FRACTION`` for the recompute strategy's
    forward, which holds no gradient (so its fewer, larger chunks stay within the same peak)."""
    size = torch.empty((), dtype=dtype).element_size()
    in_size = torch.empty((), dtype=input_dtype or dtype).element_size()
    cap = max(MIN_CHUNK_ELEMENTS, int(fraction * rows * vocab * in_size / (4 * size)))
    elements = min(CHUNK_BYTES // size, cap)
    return max(1, min(rows, elements // max(vocab, 1)))


def _fast_chunk(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, ws: torch.Tensor,
                stats: Optional[torch.Tensor] = None):
    """p, q, d' and p - q of a chunk of rows (compute dtype, in the workspace ``ws``), and its statistics.

    ``ws``: 4 x rows x V of the compute dtype, reused chunk after chunk. ``stats`` (rows x 7: m_a,
    m_b, 1/Z_a, 1/Z_b, E_p[d'], E_q[d'], and 1 for a row the guarded formulas took) is filled when None
    (forward), read otherwise (the backward's recomputation, which so gets bit for bit the forward's p and
    q). Returns ``p, q, d, pq, kl, stats``. No guard here (an all -inf row's maximum is -inf, its a - m
    NaN; 0 * inf is NaN): a row whose statistics come out non-finite is redone by ``_exact_chunk``
    (``_redo_rows``); when they are finite every product p_j d'_j and (p_j - q_j) d'_j was finite and
    every Z >= 1, and the guards would not have changed a thing.
    """
    fresh = stats is None
    if fresh:
        stats = torch.zeros(x.shape[0], STATS, dtype=dtype, device=x.device)
        stats[:, :1] = x.amax(-1, keepdim=True)
        stats[:, 1:2] = y.amax(-1, keepdim=True)
    m_a, m_b, inv_a, inv_b, e_p, e_q, _ = stats.split(1, -1)
    la, lb, p, q = ws
    for inp, m, out in ((x, m_a, la), (y, m_b, lb)):  # a - m_a in the compute dtype
        if inp.dtype == dtype:
            torch.sub(inp, m, out=out)
        else:  # widen (exactly) into the buffer first: sub would allocate its own converted copy
            out.copy_(inp)
            out.sub_(m)
    torch.exp(la, out=p)
    torch.exp(lb, out=q)
    if fresh:  # 1 / Z, Z = sum_j exp(a_j - m_a) >= 1 (the maximum's term is 1) unless the row is NaN
        inv_a.copy_(p.sum(-1, keepdim=True).reciprocal_())
        inv_b.copy_(q.sum(-1, keepdim=True).reciprocal_())
    p.mul_(inv_a)  # p_j = exp(a_j - m_a) / Z_a
    q.mul_(inv_b)
    d = la.sub_(lb)  # d'_j = (a_j - m_a) - (b_j - m_b), in la's buffer
    pq = torch.sub(p, q, out=lb)  # p - q, in lb's buffer
    kl = None
    if fresh:
        kl = torch.linalg.vecdot(pq, d)  # sum_j (p_j - q_j) d'_j: accurate when p ~ q (not E_p - E_q)
        e_p.copy_(torch.linalg.vecdot(p, d).unsqueeze(-1))  # E_p[d']
        # E_q[d'] = E_p[d'] - KL_S (one pass less; it only enters d' - E_q[d'] in the gradient). Finite
        # KL_S and E_p mean every term (p_j - q_j) d'_j and p_j d'_j was finite, so d' was, and E_q is.
        torch.sub(e_p, kl.unsqueeze(-1), out=e_q)
    return p, q, d, pq, kl, stats


def _exact_chunk(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype):
    """The same quantities with every edge case guarded (-inf, all -inf rows, NaN): p, q, d, kl, E_p, E_q.

    log p = (x - m) - log Z with m and log Z kept apart; 0 * (+-inf or NaN) := 0 where the probability
    is 0; a term with p = q contributes 0 to KL_S (0 on both sides, or -inf in both); p > q = 0 with
    d' = +inf (or the reverse) makes the row +inf; NaN or +inf anywhere makes the row NaN.
    """
    x, y = x.to(dtype), y.to(dtype)
    m_a, m_b = _row_max(x), _row_max(y)
    p, q, d = _probs(x, y, m_a, m_b, _log_z(x, m_a), _log_z(y, m_b))
    kl = torch.where(p == q, torch.zeros_like(d), (p - q) * d).sum(-1)
    e_p = _times(p, d).sum(-1, keepdim=True)
    e_q = _times(q, d).sum(-1, keepdim=True)
    return p, q, d, kl, e_p, e_q


def _exact_grads(p, q, d, e_p, e_q, g):
    """dKL_S/da = p (d' - E_p[d']) + p - q, dKL_S/db = -q (d' - E_q[d']) + q - p, times g, guarded."""
    return g * (_times(p, d - e_p + 1.0) - q), g * (_times(q, e_q - d + 1.0) - p)


def _write_grads(p, q, d, pq, e_p, e_q, g: Optional[torch.Tensor], out_a, out_b) -> None:
    """out_a = g dKL_S/da = g (p (d' - E_p[d']) + p - q), out_b = g dKL_S/db = -g (q (d' - E_q[d']) + p - q),
    unguarded (finite rows). ``g`` None (the forward of the save strategy): out_a = dKL_S/da and
    out_b = -dKL_S/db (the sign goes with the upstream gradient in the backward: one pass less).
    d' - E_p[d'] = d - E_p[d]: the centring drops out of the gradient.

    An output in the compute dtype is written directly; one in another dtype (bf16) is computed in place in
    the chunk's p (q) and d' buffers, which this overwrites, and rounded once when copied out (so the
    workspace needs no fifth buffer; d' - E_q[d'] is then (d' - E_p[d']) - (E_q - E_p), a float32 rounding
    far below the output's)."""
    todo = [(out, prob, e, sign) for out, prob, e, sign in ((out_a, p, e_p, 1.0), (out_b, q, e_q, -1.0))
            if out is not None]
    todo.sort(key=lambda t: t[0].dtype != d.dtype)  # the direct ones first: the others overwrite d'
    shift = None
    for out, prob, e, sign in todo:
        if out.dtype == d.dtype:
            torch.addcmul(pq, prob, d, out=out)  # prob d' + (p - q)
            out.addcmul_(prob, e, value=-1.0)  # prob (d' - E[d']) + (p - q)
            w = out
        else:
            d.sub_(e if shift is None else e - shift)  # d' - E[d'], in d's buffer
            shift = e
            w = prob.mul_(d).add_(pq)  # prob (d' - E[d']) + (p - q), in prob's buffer
        if g is not None:
            w.mul_(g if sign > 0 else -g)
        if w is not out:
            out.copy_(w)


def _chunked(device: torch.device) -> bool:
    """Whether ``device`` takes the chunked path with its data-dependent branches (CPU), or one guarded
    chunk with nothing to wait on (CUDA with R3F_KERNELS=torch). Tests monkeypatch this."""
    return device.type == "cpu"


def _redo_rows(x, y, dtype, bad, kl, st, ga, gb, g) -> None:
    """Rows ``bad`` of a chunk through the guarded formulas: in the forward (``kl`` not None) their KL_S
    and E_p, E_q into ``kl`` and ``st``; their gradients times ``g`` (None: 1) into ``ga``/``gb``."""
    idx = bad.nonzero().squeeze(1)
    p, q, d, kl_x, e_p, e_q = _exact_chunk(x.index_select(0, idx), y.index_select(0, idx), dtype)
    if kl is not None:
        kl.index_copy_(0, idx, kl_x)
        st[idx, 4:6] = torch.cat([e_p, e_q], -1)
    if ga is not None or gb is not None:
        # g None: the save strategy's forward, which keeps -dKL_S/db (see _write_grads)
        ga_x, gb_x = _exact_grads(p, q, d, e_p, e_q, torch.ones_like(e_p) if g is None else g[idx])
        if g is None:
            gb_x = -gb_x
        for out, part in ((ga, ga_x), (gb, gb_x)):
            if out is not None:
                out.index_copy_(0, idx, part.to(out.dtype))


def _pass(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor], dtype: torch.dtype, fast: bool,
          chunk_rows: Optional[int], need_a: bool, need_b: bool, stats: Optional[torch.Tensor] = None,
          g: Optional[torch.Tensor] = None):
    """One pass over the rows of ``a``, ``b`` (2-D), chunk by chunk: ``(kl_rows, stats, grad_a, grad_b)``.

    Forward (``stats`` None): per-row KL_S (0 where masked), the statistics, and the gradients asked for,
    unscaled. Backward: ``stats`` from the forward, gradients times ``g`` (rows x 1, 0 where masked).
    On CPU the masked rows are skipped (their gradients are zeros); elsewhere they are computed and
    zeroed by ``torch.where`` (NaN-safe), as one chunk, with no data-dependent branch.
    """
    forward = stats is None
    rows, vocab = a.shape
    counted = None  # CPU: indices of the counted rows when some are masked
    if mask is not None and fast and not bool(mask.all()):
        counted = mask.nonzero().squeeze(1)
    n = rows if counted is None else counted.numel()
    smallest = min(a.dtype, b.dtype, key=lambda t: torch.empty((), dtype=t).element_size())
    # The recompute strategy's forward (statistics only, no gradient alive) may take larger chunks.
    fraction = STATS_PASS_FRACTION if forward and not (need_a or need_b) else WORKSPACE_FRACTION
    chunk = chunk_rows or (default_chunk_rows(n, vocab, dtype, smallest, fraction) if fast else max(n, 1))
    new = torch.zeros if counted is not None else torch.empty
    grad_a = new(a.shape, dtype=a.dtype, device=a.device) if need_a else None
    grad_b = new(b.shape, dtype=b.dtype, device=b.device) if need_b else None
    out = torch.zeros(rows, dtype=dtype, device=a.device) if forward else None
    if forward:
        stats = torch.zeros(rows, STATS, dtype=dtype, device=a.device)
    flagged = not forward and fast and bool((stats[:, 6] != 0).any())  # backward: any row redone?
    # CPU workspace, reused chunk after chunk: la/d', lb/(p - q), p, q (see _fast_chunk, _write_grads).
    ws = torch.empty(4, min(chunk, n), vocab, dtype=dtype, device=a.device) if fast and n else None
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        if counted is None:
            idx: object = slice(s, e)
            x, y = a[s:e], b[s:e]
            ga = None if grad_a is None else grad_a[s:e]
            gb = None if grad_b is None else grad_b[s:e]
        else:
            idx = counted[s:e]
            x, y = a.index_select(0, idx), b.index_select(0, idx)
            ga = None if grad_a is None else torch.empty(x.shape, dtype=a.dtype, device=a.device)
            gb = None if grad_b is None else torch.empty(y.shape, dtype=b.dtype, device=b.device)
        gg = None if g is None else g[idx]
        if fast:
            w = ws[:, : e - s]
            p, q, d, pq, kl, st = _fast_chunk(x, y, dtype, w, None if forward else stats[idx])
            if ga is not None or gb is not None:
                _write_grads(p, q, d, pq, st[:, 4:5], st[:, 5:6], gg, ga, gb)
            if forward and not math.isfinite(float(kl.sum() + st[:, 4].sum())):  # one check per chunk
                # flag the rows whose fast statistics are not finite (the flag is kept for the backward)
                st[:, 6] = ~(torch.isfinite(kl) & torch.isfinite(st[:, 4:6]).all(-1))
                _redo_rows(x, y, dtype, st[:, 6] != 0, kl, st, ga, gb, gg)
            elif not forward and flagged:
                bad = st[:, 6] != 0
                if bool(bad.any()):
                    _redo_rows(x, y, dtype, bad, kl, st, ga, gb, gg)
        else:
            p, q, d, kl, e_p, e_q = _exact_chunk(x, y, dtype)
            if forward:
                st = torch.cat([torch.zeros_like(e_p).expand(-1, 4), e_p, e_q, torch.ones_like(e_p)], -1)
            if ga is not None or gb is not None:
                ga_x, gb_x = _exact_grads(p, q, d, e_p, e_q, torch.ones_like(e_p) if gg is None else gg)
                if gg is None:  # the save strategy's forward keeps -dKL_S/db (see _write_grads)
                    gb_x = -gb_x
                for part_out, part in ((ga, ga_x), (gb, gb_x)):
                    if part_out is not None:
                        if mask is not None:  # NaN-safe zero for masked rows (their logits may be anything)
                            part = torch.where(mask[idx].unsqueeze(-1), part, torch.zeros_like(part))
                        part_out.copy_(part)
        if counted is not None:
            if forward:
                out.index_copy_(0, idx, kl)
                stats.index_copy_(0, idx, st)
            for full, part in ((grad_a, ga), (grad_b, gb)):
                if full is not None:
                    full.index_copy_(0, idx, part)
        elif forward:
            out[s:e] = kl
            stats[s:e] = st
    if forward and mask is not None:
        out = torch.where(mask, out, torch.zeros_like(out))
    return out, stats, grad_a, grad_b


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast switched off on ``device`` if it is on there (the closed form runs in its own compute dtype)."""
    try:
        on = torch.is_autocast_enabled(device.type)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        on = False
    return torch.autocast(device.type, enabled=False) if on else contextlib.nullcontext()


class _SymmetricKLRows(torch.autograd.Function):
    """Per-row KL_S of 2-D logits (masked rows give 0), closed-form backward, chunked over rows.

    ``apply(a, b, mask, chunk_rows=None, save_grads=None, grad_enabled=True)``. Two strategies for the
    gradients (``save_grads``; None picks):

    * save (when every input that needs a gradient is in the compute dtype, e.g. float32): the forward
      computes the gradients chunk by chunk, unscaled, straight into full-size tensors, and the backward
      scales them by the upstream gradient in place and hands them over (a second backward, after
      ``retain_graph=True``, recomputes);
    * recompute (bfloat16 / float16 inputs): the forward keeps seven floats per row, the backward
      recomputes p, q chunk by chunk and writes the gradients already scaled, so a low-precision gradient
      is rounded once (saved unscaled, it would be rounded twice).

    ``grad_enabled=False`` (the caller ran under ``torch.no_grad()``, where ``needs_input_grad`` still
    says True) computes no gradient. Extra memory: the gradients, and on CPU four chunk x V buffers.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor],
                chunk_rows: Optional[int] = None, save_grads: Optional[bool] = None,
                grad_enabled: bool = True) -> torch.Tensor:
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive number of rows, got {chunk_rows}; pass None "
                             "for the default (CHUNK_BYTES per buffer)")
        dtype = _compute_dtype(a, b)
        fast = _chunked(a.device)
        need_a = grad_enabled and ctx.needs_input_grad[0]
        need_b = grad_enabled and ctx.needs_input_grad[1]
        if save_grads is None:
            save_grads = all(x.dtype == dtype for x, need in ((a, need_a), (b, need_b)) if need)
        save = bool(save_grads) and (need_a or need_b)
        with _no_autocast(a.device):  # the compute dtype, not autocast's (CPU autocast runs vecdot in bf16)
            out, stats, grad_a, grad_b = _pass(a, b, mask, dtype, fast, chunk_rows, save and need_a,
                                               save and need_b)
        ctx.save_for_backward(a, b, mask, stats)
        ctx.grads = (grad_a, grad_b) if save else None
        ctx.chunk_rows, ctx.fast = chunk_rows, fast
        return out

    @staticmethod
    @differentiable_once  # the closed form treats the row statistics as constants
    def backward(ctx, grad_rows: torch.Tensor):
        a, b, mask, stats = ctx.saved_tensors
        g = grad_rows.to(stats.dtype).unsqueeze(-1)
        if mask is not None:  # masked rows: zero gradient whatever the upstream gradient (NaN included)
            g = torch.where(mask.unsqueeze(-1), g, torch.zeros_like(g))
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        saved, ctx.grads = ctx.grads, None  # handed over once: a second backward recomputes
        if saved is not None and (saved[0] is not None or not need_a) and (saved[1] is not None or not need_b):
            # g dKL_S/da, and g dKL_S/db = -g (-dKL_S/db): the forward kept -dKL_S/db (see _write_grads)
            grad_a = saved[0].mul_(g) if saved[0] is not None else None
            grad_b = saved[1].mul_(-g) if saved[1] is not None else None
        else:
            with _no_autocast(a.device):
                _, _, grad_a, grad_b = _pass(a, b, mask, stats.dtype, ctx.fast, ctx.chunk_rows, need_a, need_b,
                                             stats, g)
        return (grad_a if need_a else None), (grad_b if need_b else None), None, None, None, None


def _bool_mask(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """``mask`` as bool: bool as is, integers only if every value is 0 or 1 (one device sync); anything else
    is an error. ``name="noise_mask"``: the (batch, seq) positions to perturb, an attention mask, which may
    also be floating-point 0/1 (as it was always accepted)."""
    noise = name == "noise_mask"
    what = "True: the position is perturbed" if noise else "True: the row counts"
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool tensor ({what}), got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or (mask.is_floating_point() and not noise):
        raise TypeError(f"{name} must be a bool tensor ({what}), got {mask.dtype}; pass e.g. labels != -100, "
                        "or attention_mask.bool()")
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):  # one device sync, for non-bool masks only: pass a bool mask to avoid it
        value = mask[bad].flatten()[0].item()
        raise ValueError(
            f"{name} must hold only 0 and 1 (like an attention_mask), got the value {value:g}; "
            + ("input_ids are not a mask, and a packed attention mask numbering its sequences is not 0/1: pass "
               "attention_mask != 0" if noise else
               "labels are not a mask (cast to bool, -100 would count and token 0 would not): pass labels != -100"))
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
    (float64 always takes the PyTorch path). Both paths give the same answers, edge cases included, but for
    one window on the GPU, where a -inf on one side faces a probability below 2^-126, and rows whose value is
    beyond float32 (logits of its own magnitude, e.g. ``finfo.min`` as a mask in one input only), where the
    kernel, summing such rows in float64, may return the value where this path gives +inf (docs/kernels.md).
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
        a, b = p_logits.reshape(-1, vocab), q_logits.reshape(-1, vocab)
        if not torch.is_grad_enabled():  # needs_input_grad would still say True: compute no gradient
            a, b = a.detach(), b.detach()
        rows = _SymmetricKLRows.apply(a, b, mask)
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / max(lead[0] if len(lead) > 0 else 1, 1)
    counted = mask.sum() if mask is not None else torch.tensor(rows.numel(), device=rows.device)
    return total / counted.clamp(min=1).to(total.dtype)
