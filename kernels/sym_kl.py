"""Fused symmetric KL over rows of two logits tensors (Triton): forward, backward, autograd Function.

For a row with logits a, b (p = softmax(a), q = softmax(b)) and d = a - b::

    KL_S = KL(P||Q) + KL(Q||P) = sum_j (p_j - q_j) d_j = E_p[d] - E_q[d]

Forward streams each row once, keeping online statistics per side (as in an online softmax)::

    m   = running max                 Z = sum exp(x - m)          S = sum exp(x - m) * d

rescaled by exp(m_old - m_new) whenever the max grows. Then E_p[d] = S_a / Z_a, E_q[d] = S_b / Z_b and
lse = m + log Z. Only four floats per row are saved (lse_a, lse_b, E_p[d], E_q[d]), plus the inputs.
Backward reads a, b once more and writes both gradients (g = upstream gradient of the row)::

    dKL_S/da_j = g * (p_j (d_j - E_p[d] + 1) - q_j)        p_j = exp(a_j - lse_a)
    dKL_S/db_j = g * (q_j (E_q[d] - d_j + 1) - p_j)        q_j = exp(b_j - lse_b)

Traffic for forward + backward: two reads of (a, b) and one write of (da, db), the minimum.
Arithmetic is float32 whatever the input dtype; only the stored gradients are rounded.

Rows with few programs and a long vocabulary are split over SPLIT programs (grid axis 1), whose partial
(m, Z, S) are merged by a second small kernel; backward is split the same way with no merge needed.
Edge cases follow ``r3f_opt.symmetric_kl``: entries that are -inf in both inputs contribute 0 (d := 0
where a == b), a row that is -inf everywhere has lse := 0 (so p = 0), an entry that is -inf on one side
only makes the row +inf, and masked rows are never read, give 0 and get zero gradient.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

__all__ = ["symmetric_kl_rows", "Config", "launches"]

# Finite "minus infinity" for running maxima: -inf - -inf would be NaN.
_NEG_BIG = tl.constexpr(-3.4028234663852886e38)

launches = {"forward": 0, "merge": 0, "backward": 0}  # kernel launches, so tests can prove the kernel ran


@triton.jit
def _load_row_tile(a_row, b_row, cols, sav, sbv, col_ok):
    # Out-of-range (and masked-row) entries read as -inf on both sides, which contribute exactly 0.
    a = tl.load(a_row + cols * sav, mask=col_ok, other=float("-inf")).to(tl.float32)
    b = tl.load(b_row + cols * sbv, mask=col_ok, other=float("-inf")).to(tl.float32)
    d = tl.where(a == b, 0.0, a - b)  # -inf in both: d = 0 instead of NaN
    return a, b, d


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
def _rescale(s, alpha):
    # s * exp(m_old - m_new); keeps +-inf (a one-sided -inf entry) instead of inf * 0 = NaN.
    return tl.where(tl.abs(s) == float("inf"), s, s * alpha)


@triton.jit
def _finish(out_ptr, stats_ptr, row, n_rows, m_a, z_a, s_a, m_b, z_b, s_b, valid):
    # lse = m + log Z; a row that is -inf everywhere has Z = 0: lse := 0 and E[d] := 0.
    lse_a = tl.where(z_a > 0, m_a + tl.log(z_a), 0.0)
    lse_b = tl.where(z_b > 0, m_b + tl.log(z_b), 0.0)
    e_p = tl.where(z_a > 0, s_a / z_a, 0.0)
    e_q = tl.where(z_b > 0, s_b / z_b, 0.0)
    kl = tl.where(valid, e_p - e_q, 0.0)
    tl.store(out_ptr + row, kl)
    tl.store(stats_ptr + row, lse_a)
    tl.store(stats_ptr + n_rows + row, lse_b)
    tl.store(stats_ptr + 2 * n_rows + row, e_p)
    tl.store(stats_ptr + 3 * n_rows + row, e_q)


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
        a, b, d = _load_row_tile(a_row, b_row, cols, sav, sbv, cols < hi)
        # Online update of (m, Z, S) for each side.
        new_m_a = tl.maximum(m_a, tl.max(a, axis=0))
        new_m_b = tl.maximum(m_b, tl.max(b, axis=0))
        alpha_a = tl.exp(m_a - new_m_a)
        alpha_b = tl.exp(m_b - new_m_b)
        e_a = tl.exp(a - new_m_a)
        e_b = tl.exp(b - new_m_b)
        # exp(x - m) * d with 0 * inf := 0 (x = -inf where the other side is finite).
        t_a = tl.where(e_a > 0, e_a * d, 0.0)
        t_b = tl.where(e_b > 0, e_b * d, 0.0)
        z_a = z_a * alpha_a + tl.sum(e_a, axis=0)
        z_b = z_b * alpha_b + tl.sum(e_b, axis=0)
        s_a = _rescale(s_a, alpha_a) + tl.sum(t_a, axis=0)
        s_b = _rescale(s_b, alpha_b) + tl.sum(t_b, axis=0)
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
def _merge_side(part_ptr, plane, idx, ok):
    # m = max_i m_i;  Z = sum_i Z_i exp(m_i - m);  S = sum_i S_i exp(m_i - m)
    m_i = tl.load(part_ptr + idx, mask=ok, other=_NEG_BIG)
    z_i = tl.load(part_ptr + plane + idx, mask=ok, other=0.0)
    s_i = tl.load(part_ptr + 2 * plane + idx, mask=ok, other=0.0)
    m = tl.max(m_i, axis=0)
    w = tl.exp(m_i - m)
    z = tl.sum(z_i * w, axis=0)
    s = tl.sum(_rescale(s_i, w), axis=0)
    return m, z, s


@triton.jit
def _sym_kl_merge_kernel(part_ptr, mask_ptr, out_ptr, stats_ptr, n_rows, n_parts,
                         HAS_MASK: tl.constexpr, PARTS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    valid = True
    if HAS_MASK:
        valid = tl.load(mask_ptr + row) != 0
    plane = n_rows * n_parts
    p = tl.arange(0, PARTS)
    idx = row * n_parts + p
    ok = p < n_parts
    m_a, z_a, s_a = _merge_side(part_ptr, plane, idx, ok)
    m_b, z_b, s_b = _merge_side(part_ptr + 3 * plane, plane, idx, ok)
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
    lse_a = tl.load(stats_ptr + row)
    lse_b = tl.load(stats_ptr + n_rows + row)
    e_p = tl.load(stats_ptr + 2 * n_rows + row)
    e_q = tl.load(stats_ptr + 3 * n_rows + row)
    hi = tl.minimum(lo + chunk, V)
    hi_read = tl.where(valid, hi, lo)  # a masked row is never read, only written with zeros
    offs = tl.arange(0, BLOCK)
    for start in range(lo, hi, BLOCK):
        cols = start + offs
        in_row = cols < hi
        a, b, d = _load_row_tile(a_row, b_row, cols, sav, sbv, cols < hi_read)
        p = tl.exp(a - lse_a)
        q = tl.exp(b - lse_b)
        out = row * V + cols  # gradients are contiguous (n_rows, V)
        if NEED_GA:
            ga = g * (p * (d - e_p + 1.0) - q)
            tl.store(ga_ptr + out, ga, mask=in_row)  # g = 0 and p = q = 0 on a masked row
        if NEED_GB:
            gb = g * (q * (e_q - d + 1.0) - p)
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
        stats = torch.empty(4, n_rows, dtype=torch.float32, device=a.device)
        cfg = _config(n_rows, vocab, max(a.element_size(), b.element_size()), a.device)
        n_parts = triton.cdiv(max(vocab, 1), cfg.chunk)
        mask_arg = mask if mask is not None else out  # never read when HAS_MASK is False
        if n_rows > 0:
            split = n_parts > 1
            part = torch.empty(6, n_rows, n_parts, dtype=torch.float32, device=a.device) if split else out
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
            _sym_kl_bwd_kernel[(n_rows, n_parts)](
                a, b, mask if mask is not None else stats, stats, grad_rows,
                ga if need_a else stats, gb if need_b else stats,
                n_rows, vocab, cfg.chunk, grad_rows.stride(0), *lay_a, *lay_b,
                HAS_MASK=mask is not None, NEED_GA=need_a, NEED_GB=need_b, BLOCK=block, num_warps=warps,
            )
            launches["backward"] += 1
        return ga, gb, None


def symmetric_kl_rows(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL_S per row of ``a``, ``b`` (shape ``(*, V)``, any strides) as float32 ``(prod(*),)``.

    ``mask``: optional flat bool tensor with one entry per row (False: value 0, zero gradient).
    """
    if a.shape != b.shape or a.dim() == 0:
        raise ValueError(f"a and b must have one shape (*, V), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on one device, got {a.device} and {b.device}")
    if mask is not None:
        if mask.numel() != a[..., 0].numel():
            raise ValueError(f"mask needs one entry per row ({a[..., 0].numel()}), got {mask.numel()}")
        mask = mask.to(device=a.device, dtype=torch.bool).reshape(-1).contiguous()
    return SymmetricKLRows.apply(a, b, mask)
