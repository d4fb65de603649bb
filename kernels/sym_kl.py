"""Fused symmetric KL over rows of two logits tensors (Triton): forward, backward, autograd Function.

For a row with logits a, b (p = softmax(a), q = softmax(b)) and d = a - b::

    KL_S = KL(P||Q) + KL(Q||P) = sum_j (p_j - q_j) d_j = E_p[d] - E_q[d]

Centring. E_p[d] - E_q[d] is unchanged by d -> d - r for any per-row constant r (p and q both sum to 1),
but computed as it stands it cancels catastrophically when b = a + c: both terms are ~ -c and their
difference is ~ the rounding of c (a negative KL at c = 1e6). So the kernel never forms a - b. It uses

    d'_j = (a_j - m_a) - (b_j - m_b) = d_j - (m_a - m_b)          (m_a, m_b: the rows' maxima)

whose two differences are exact or nearly so whatever the offset (x - m for x near m is exact in
floating point); d' is O(the spread of the two rows), not O(c), and so are E_p[d'], E_q[d'].

Forward streams each row once, keeping online statistics per side (as in an online softmax)::

    m = running max        Z = sum exp(x - m)        S = sum exp(x - m) * d'   (d' with the running maxima)

When a tile raises the maxima from (m_a, m_b) to (m_a', m_b'), Z is rescaled by alpha = exp(m - m') as
usual, and the d' of the entries already summed moves by -delta, delta = (m_a' - m_a) - (m_b' - m_b)::

    S  ->  alpha * (S - delta * Z)

Then E_p[d'] = S_a / Z_a, E_q[d'] = S_b / Z_b, KL_S = E_p[d'] - E_q[d']. Six floats per row are saved
(m_a, m_b, log Z_a, log Z_b, E_p[d'], E_q[d']), plus the inputs: the maxima and log Z are kept apart,
because lse = m + log Z rounded to float32 at |m| ~ 1e6 is off by up to 0.03 and would scale p by 3 %.
Backward reads a, b once more and writes both gradients (g = upstream gradient of the row)::

    p_j = exp((a_j - m_a) - log Z_a)        q_j = exp((b_j - m_b) - log Z_b)
    dKL_S/da_j = g * (p_j (d'_j - E_p[d'] + 1) - q_j)
    dKL_S/db_j = g * (q_j (E_q[d'] - d'_j + 1) - p_j)

(d_j - E_p[d] = d'_j - E_p[d']: the centring drops out of the gradient too.)
Traffic for forward + backward: two reads of (a, b) and one write of (da, db), the minimum.
Arithmetic is float32 whatever the input dtype; only the stored gradients are rounded.

Rows with few programs and a long vocabulary are split over SPLIT programs (grid axis 1), whose partial
(m, Z, S) are merged by a second small kernel (with the same re-centring); backward is split the same way
with no merge needed.

Edge cases follow ``r3f_opt.symmetric_kl`` (the PyTorch path computes the same expressions):

* a term with probability 0 on both sides (-inf in both, or -inf against a logit whose exp underflows
  in float32) contributes 0 to the value and to the gradient (0 * inf := 0 where the probability is 0);
* -inf in one input where the other has a nonzero probability makes the row +inf;
* a row that is -inf everywhere has Z = 0: log Z := 0 (so p = 0) and E := 0;
* NaN or +inf anywhere in a counted row makes Z NaN, hence the value and every gradient entry of the
  row NaN (a NaN normaliser is not an empty row);
* masked rows are never read, give 0 and get zero gradient.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .._dispatch import device_context as _device_context  # the name the tests wrap

__all__ = ["symmetric_kl_rows", "Config", "launches"]

# Finite "minus infinity" for running maxima: -inf - -inf would be NaN.
_NEG_BIG = tl.constexpr(-3.4028234663852886e38)

launches = {"forward": 0, "merge": 0, "backward": 0}  # kernel launches, so tests can prove the kernel ran


@triton.jit
def _load_row_tile(a_row, b_row, cols, sav, sbv, col_ok):
    # Out-of-range (and masked-row) entries read as -inf on both sides, which contribute exactly 0.
    a = tl.load(a_row + cols * sav, mask=col_ok, other=float("-inf")).to(tl.float32)
    b = tl.load(b_row + cols * sbv, mask=col_ok, other=float("-inf")).to(tl.float32)
    return a, b


@triton.jit
def _program_row(a_ptr, b_ptr, mask_ptr, chunk, n1a, sa0, sa1, n1b, sb0, sb1, HAS_MASK: tl.constexpr):
    # Program (row, part) handles columns [part * chunk, min((part + 1) * chunk, V)) of one row.
    row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: row * stride overflows int32 at large N * V
    part = tl.program_id(1).to(tl.int64)
    # Row r of x starts at (r // n1) * s0 + (r % n1) * s1: leading dims as up to two strided groups.
    a_row = a_ptr + (row // n1a) * sa0 + (row % n1a) * sa1
    b_row = b_ptr + (row // n1b) * sb0 + (row % n1b) * sb1
    valid = True
    if HAS_MASK:
        valid = tl.load(mask_ptr + row) != 0
    return row, a_row, b_row, valid, part * chunk


@triton.jit
def _recentre(s, z, delta, alpha):
    # S = sum exp(x - m) d' after the maxima moved: d' -> d' - delta and exp(x - m) -> alpha exp(x - m),
    # so S -> alpha (S - delta Z). Z == 0 (nothing summed on this side yet; m may still be the -3.4e38
    # sentinel, so delta may be huge or inf): S stays 0. S = +-inf (an entry that is -inf on the other
    # side only: the row is +inf) stays as it is rather than inf * 0 = NaN. A NaN Z or S stays NaN.
    return tl.where((z == 0) | (tl.abs(s) == float("inf")), s, (s - delta * z) * alpha)


@triton.jit
def _finish(out_ptr, stats_ptr, row, n_rows, m_a, z_a, s_a, m_b, z_b, s_b, valid):
    # A row that is -inf everywhere on one side has Z = 0 there: log Z := 0 (so p = exp(-inf) = 0 in
    # backward) and E[d'] := 0. Only Z == 0 means empty: a NaN Z (NaN or +inf in the row) stays NaN and
    # makes the value and every gradient of the row NaN.
    lz_a = tl.where(z_a == 0, 0.0, tl.log(z_a))
    lz_b = tl.where(z_b == 0, 0.0, tl.log(z_b))
    e_p = tl.where(z_a == 0, 0.0, s_a / z_a)  # E_p[d']
    e_q = tl.where(z_b == 0, 0.0, s_b / z_b)  # E_q[d']
    kl = tl.where(valid, e_p - e_q, 0.0)  # KL_S = E_p[d'] - E_q[d'] (= E_p[d] - E_q[d])
    tl.store(out_ptr + row, kl)
    tl.store(stats_ptr + row, m_a)
    tl.store(stats_ptr + n_rows + row, m_b)
    tl.store(stats_ptr + 2 * n_rows + row, lz_a)
    tl.store(stats_ptr + 3 * n_rows + row, lz_b)
    tl.store(stats_ptr + 4 * n_rows + row, e_p)
    tl.store(stats_ptr + 5 * n_rows + row, e_q)


@triton.jit
def _sym_kl_fwd_kernel(
    a_ptr, b_ptr, mask_ptr, out_ptr, stats_ptr, part_ptr,
    n_rows, V, chunk, n1a, sa0, sa1, sav, n1b, sb0, sb1, sbv,
    HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
):
    row, a_row, b_row, valid, lo = _program_row(a_ptr, b_ptr, mask_ptr, chunk, n1a, sa0, sa1, n1b, sb0, sb1,
                                                HAS_MASK)
    hi = tl.where(valid, tl.minimum(lo + chunk, V), lo)  # a masked row is never read
    m_a = _NEG_BIG
    m_b = _NEG_BIG
    z_a = 0.0
    z_b = 0.0
    s_a = 0.0
    s_b = 0.0
    offs = tl.arange(0, BLOCK)
    for start in range(lo, hi, BLOCK):
        cols = start + offs
        a, b = _load_row_tile(a_row, b_row, cols, sav, sbv, cols < hi)
        # Online update of (m, Z, S) for each side.
        new_m_a = tl.maximum(m_a, tl.max(a, axis=0))
        new_m_b = tl.maximum(m_b, tl.max(b, axis=0))
        alpha_a = tl.exp(m_a - new_m_a)
        alpha_b = tl.exp(m_b - new_m_b)
        # Re-centre what is summed so far: d' = (a - m_a) - (b - m_b) moves by -delta.
        delta = (new_m_a - m_a) - (new_m_b - m_b)
        s_a = _recentre(s_a, z_a, delta, alpha_a)
        s_b = _recentre(s_b, z_b, delta, alpha_b)
        la = a - new_m_a  # x - m: exact for x near m, whatever the offset of the row
        lb = b - new_m_b
        e_a = tl.exp(la)
        e_b = tl.exp(lb)
        d = la - lb  # d' = d - (m_a - m_b); +-inf where one side only is -inf; NaN where both are
        # exp(x - m) * d' with 0 * (+-inf or NaN) := 0: a zero probability contributes nothing. A NaN
        # exp (NaN or +inf in the row) is not 0 and reaches Z below.
        t_a = tl.where(e_a == 0, 0.0, e_a * d)
        t_b = tl.where(e_b == 0, 0.0, e_b * d)
        z_a = z_a * alpha_a + tl.sum(e_a, axis=0)
        z_b = z_b * alpha_b + tl.sum(e_b, axis=0)
        s_a = s_a + tl.sum(t_a, axis=0)
        s_b = s_b + tl.sum(t_b, axis=0)
        m_a = new_m_a
        m_b = new_m_b
    if SPLIT:
        # Partial statistics, layout (6, n_rows, n_parts); merged by _sym_kl_merge_kernel.
        n_parts = tl.num_programs(1).to(tl.int64)
        plane = n_rows * n_parts
        base = part_ptr + row * n_parts + tl.program_id(1)
        tl.store(base, m_a)
        tl.store(base + plane, z_a)
        tl.store(base + 2 * plane, s_a)
        tl.store(base + 3 * plane, m_b)
        tl.store(base + 4 * plane, z_b)
        tl.store(base + 5 * plane, s_b)
    else:
        _finish(out_ptr, stats_ptr, row, n_rows, m_a, z_a, s_a, m_b, z_b, s_b, valid)


@triton.jit
def _sym_kl_merge_kernel(part_ptr, mask_ptr, out_ptr, stats_ptr, n_rows, n_parts,
                         HAS_MASK: tl.constexpr, PARTS: tl.constexpr):
    # Part i summed d'_i = (a - m_a,i) - (b - m_b,i) with its own maxima. With the row's maxima
    # M = max_i m_i, d' = d'_i - delta_i, delta_i = (M_a - m_a,i) - (M_b - m_b,i), and w_i = exp(m_i - M):
    #     Z = sum_i w_i Z_i        S = sum_i w_i (S_i - delta_i Z_i)
    row = tl.program_id(0).to(tl.int64)
    valid = True
    if HAS_MASK:
        valid = tl.load(mask_ptr + row) != 0
    plane = n_rows * n_parts
    p = tl.arange(0, PARTS)
    idx = row * n_parts + p
    ok = p < n_parts  # padding lanes: m = sentinel, Z = S = 0, so they add nothing
    m_ai = tl.load(part_ptr + idx, mask=ok, other=_NEG_BIG)
    z_ai = tl.load(part_ptr + plane + idx, mask=ok, other=0.0)
    s_ai = tl.load(part_ptr + 2 * plane + idx, mask=ok, other=0.0)
    m_bi = tl.load(part_ptr + 3 * plane + idx, mask=ok, other=_NEG_BIG)
    z_bi = tl.load(part_ptr + 4 * plane + idx, mask=ok, other=0.0)
    s_bi = tl.load(part_ptr + 5 * plane + idx, mask=ok, other=0.0)
    m_a = tl.max(m_ai, axis=0)
    m_b = tl.max(m_bi, axis=0)
    w_a = tl.exp(m_ai - m_a)
    w_b = tl.exp(m_bi - m_b)
    delta = (m_a - m_ai) - (m_b - m_bi)
    z_a = tl.sum(z_ai * w_a, axis=0)
    z_b = tl.sum(z_bi * w_b, axis=0)
    s_a = tl.sum(_recentre(s_ai, z_ai, delta, w_a), axis=0)
    s_b = tl.sum(_recentre(s_bi, z_bi, delta, w_b), axis=0)
    _finish(out_ptr, stats_ptr, row, n_rows, m_a, z_a, s_a, m_b, z_b, s_b, valid)


@triton.jit
def _sym_kl_bwd_kernel(
    a_ptr, b_ptr, mask_ptr, stats_ptr, g_ptr, ga_ptr, gb_ptr,
    n_rows, V, chunk, sg, n1a, sa0, sa1, sav, n1b, sb0, sb1, sbv,
    HAS_MASK: tl.constexpr, NEED_GA: tl.constexpr, NEED_GB: tl.constexpr, BLOCK: tl.constexpr,
):
    row, a_row, b_row, valid, lo = _program_row(a_ptr, b_ptr, mask_ptr, chunk, n1a, sa0, sa1, n1b, sb0, sb1,
                                                HAS_MASK)
    g = tl.load(g_ptr + row * sg).to(tl.float32)  # upstream gradient of this row (stride 0: a scalar)
    g = tl.where(valid, g, 0.0)
    m_a = tl.load(stats_ptr + row)
    m_b = tl.load(stats_ptr + n_rows + row)
    lz_a = tl.load(stats_ptr + 2 * n_rows + row)
    lz_b = tl.load(stats_ptr + 3 * n_rows + row)
    e_p = tl.load(stats_ptr + 4 * n_rows + row)  # E_p[d']
    e_q = tl.load(stats_ptr + 5 * n_rows + row)  # E_q[d']
    hi = tl.minimum(lo + chunk, V)
    hi_read = tl.where(valid, hi, lo)  # a masked row is never read, only written with zeros
    offs = tl.arange(0, BLOCK)
    for start in range(lo, hi, BLOCK):
        cols = start + offs
        in_row = cols < hi
        a, b = _load_row_tile(a_row, b_row, cols, sav, sbv, cols < hi_read)
        la = a - m_a  # as in forward, with the final maxima
        lb = b - m_b
        p = tl.exp(la - lz_a)  # p = exp(a - m_a) / Z_a
        q = tl.exp(lb - lz_b)
        d = la - lb  # d' = d - (m_a - m_b); d - E_p[d] = d' - E_p[d']
        out = row * V + cols  # gradients are contiguous (n_rows, V)
        if NEED_GA:
            # g (p (d' - E_p[d'] + 1) - q), with p * (...) := 0 where p = 0 (d' may be +-inf or NaN there)
            ga = g * (tl.where(p == 0, 0.0, p * (d - e_p + 1.0)) - q)
            tl.store(ga_ptr + out, ga, mask=in_row)  # g = 0 and p = q = 0 on a masked row
        if NEED_GB:
            # g (q (E_q[d'] - d' + 1) - p), with q * (...) := 0 where q = 0
            gb = g * (tl.where(q == 0, 0.0, q * (e_q - d + 1.0)) - p)
            tl.store(gb_ptr + out, gb, mask=in_row)


class Config(NamedTuple):
    block: int  # columns per loop iteration (a power of two)
    chunk: int  # columns per program (a multiple of block)
    num_warps: int


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _config(n_rows: int, vocab: int, elem_size: int, device: torch.device) -> Config:
    """Tile per V and dtype; split rows over several programs when rows alone cannot fill the GPU.

    Moderate tiles (DESIGN.md §3): very wide ones spill registers. 16-bit inputs get twice the columns
    per tile for the same bytes in flight.
    """
    cap = 8192 if elem_size <= 2 else 4096
    block = max(16, min(triton.next_power_of_2(max(vocab, 1)), cap))
    num_warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
    tiles = triton.cdiv(max(vocab, 1), block)
    target = 4 * _sm_count(device)  # programs wanted in flight
    split = 1
    if n_rows < target and tiles > 1:
        split = min(tiles, triton.cdiv(target, max(n_rows, 1)), 256)
    chunk = triton.cdiv(tiles, split) * block
    return Config(block=block, chunk=chunk, num_warps=num_warps)


def _backward_tile(cfg: Config, elem_size: int) -> tuple[int, int]:
    """Backward keeps more live values per column (p, q, d, two gradients): halve the widest tiles.

    Compiled for sm_90 (no GPU run yet), the forward's 8192-column bf16 / 4096-column fp32 tiles spilled
    or used 170+ registers in backward; a power of two <= block still divides the chunk.
    """
    block = min(cfg.block, 4096 if elem_size <= 2 else 2048)
    return block, (4 if block <= 1024 else 8)


def _rows_layout(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int, int]:
    """``(x, n_rows, n1, s0, s1, sv)`` so that row r starts at ``(r // n1) * s0 + (r % n1) * s1``.

    Leading dimensions that collapse into at most two strided groups need no copy (slices, most
    transposes); anything else is made contiguous.
    """
    groups: list[list[int]] = []  # [size, stride], outermost first
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        if size == 1:
            continue
        if groups and groups[-1][1] == stride * size:
            groups[-1] = [groups[-1][0] * size, stride]
        else:
            groups.append([size, stride])
    if len(groups) > 2:
        x = x.contiguous()
        return _rows_layout(x)
    n_rows = 1
    for size, _ in groups:
        n_rows *= size
    (n0, s0), (n1, s1) = ([[1, 0]] * (2 - len(groups)) + groups)[-2:]
    return x, n_rows, n1, s0, s1, x.stride(-1)


class SymmetricKLRows(torch.autograd.Function):
    """Per-row KL_S of logits ``(*, V)`` with a flat bool row mask; returns float32 ``(rows,)``."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        shape = a.shape
        a, n_rows, *lay_a = _rows_layout(a)
        b, _, *lay_b = _rows_layout(b)
        vocab = a.shape[-1]
        out = torch.empty(n_rows, dtype=torch.float32, device=a.device)
        # Per row: m_a, m_b, log Z_a, log Z_b, E_p[d'], E_q[d'] (see the module docstring).
        stats = torch.empty(6, n_rows, dtype=torch.float32, device=a.device)
        cfg = _config(n_rows, vocab, max(a.element_size(), b.element_size()), a.device)
        n_parts = triton.cdiv(max(vocab, 1), cfg.chunk)
        mask_arg = mask if mask is not None else out  # never read when HAS_MASK is False
        if n_rows > 0:
            split = n_parts > 1
            part = torch.empty(6, n_rows, n_parts, dtype=torch.float32, device=a.device) if split else out
            with _device_context(a):
                _sym_kl_fwd_kernel[(n_rows, n_parts)](
                    a, b, mask_arg, out, stats, part, n_rows, vocab, cfg.chunk, *lay_a, *lay_b,
                    HAS_MASK=mask is not None, SPLIT=split, BLOCK=cfg.block, num_warps=cfg.num_warps,
                )
                launches["forward"] += 1
                if split:
                    _sym_kl_merge_kernel[(n_rows,)](
                        part, mask_arg, out, stats, n_rows, n_parts,
                        HAS_MASK=mask is not None, PARTS=triton.next_power_of_2(n_parts),
                    )
                    launches["merge"] += 1
        ctx.save_for_backward(a, b, mask, stats)
        ctx.layout = (shape, n_rows, lay_a, lay_b, cfg)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows: torch.Tensor):
        a, b, mask, stats = ctx.saved_tensors
        shape, n_rows, lay_a, lay_b, cfg = ctx.layout
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        vocab = shape[-1]
        ga = torch.empty(shape, dtype=a.dtype, device=a.device) if need_a else None  # contiguous
        gb = torch.empty(shape, dtype=b.dtype, device=b.device) if need_b else None
        if n_rows > 0 and vocab > 0 and (need_a or need_b):
            n_parts = triton.cdiv(vocab, cfg.chunk)
            block, warps = _backward_tile(cfg, max(a.element_size(), b.element_size()))
            with _device_context(a):
                _sym_kl_bwd_kernel[(n_rows, n_parts)](
                    a, b, mask if mask is not None else stats, stats, grad_rows,
                    ga if need_a else stats, gb if need_b else stats,
                    n_rows, vocab, cfg.chunk, grad_rows.stride(0), *lay_a, *lay_b,
                    HAS_MASK=mask is not None, NEED_GA=need_a, NEED_GB=need_b, BLOCK=block, num_warps=warps,
                )
                launches["backward"] += 1
        return ga, gb, None


def symmetric_kl_rows(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL_S per row of ``a``, ``b`` (shape ``(*, V)`` with V >= 1, any strides) as float32 ``(prod(*),)``.

    ``mask``: optional bool tensor with one entry per row (False: value 0, zero gradient).
    ``r3f_opt.symmetric_kl`` validates and converts its arguments and then calls this.
    """
    if a.shape != b.shape or a.dim() == 0:
        raise ValueError(f"a and b must have one shape (*, V), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[-1] == 0:
        raise ValueError("a and b have V = 0 classes; a softmax needs at least one (shape (*, V), V >= 1)")
    if a.device != b.device:
        raise ValueError(f"a and b must be on one device, got {a.device} and {b.device}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True: the row counts), got {mask.dtype}")
        if mask.numel() != a[..., 0].numel():
            raise ValueError(f"mask needs one entry per row ({a[..., 0].numel()}), got {mask.numel()}")
        mask = mask.to(device=a.device).reshape(-1).contiguous()
    return SymmetricKLRows.apply(a, b, mask)
