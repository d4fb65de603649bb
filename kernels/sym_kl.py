"""Fused symmetric KL over rows of two logits tensors (Triton): forward, backward, autograd Function.

For a row with logits a, b (p = softmax(a), q = softmax(b)) and d = a - b::

    KL_S = KL(P||Q) + KL(Q||P) = sum_j (p_j - q_j) d_j = E_p[d] - E_q[d]

Centring. E_p[d] - E_q[d] is unchanged by d -> d - r for any per-row constant r (p and q both sum to 1),
but computed as it stands it cancels catastrophically when b = a + c: both terms are ~ -c and their
difference is ~ the rounding of c (a negative KL at c = 1e6). So the kernel never forms a - b. It uses

    d'_j = (a_j - m_a) - (b_j - m_b) = d_j - (m_a - m_b)          (m_a, m_b: maxima of the entries seen)

whose two differences are exact or nearly so whatever the offset (x - m for x near m is exact in
floating point); d' is O(the spread of the two rows), not O(c), and so are E_p[d'], E_q[d'].

Forward: per-lane streaming statistics. A program owns one row (or one part of a row, below) and
reads it in tiles of LANES x VEC columns: each lane (a thread holds one or a few) owns VEC consecutive
columns of every tile, and keeps its own online statistics for each side, as in an online softmax::

    m = running max        Z = sum exp(x - m)        S = sum exp(x - m) * d'   (d' with the lane's maxima)

Per tile a lane takes the max of its VEC columns (no communication), and when that raises its maxima from
(m_a, m_b) to (m_a', m_b') rescales with alpha = exp(m - m') and re-centres: the d' of the entries already
summed moves by -delta, delta = (m_a' - m_a) - (m_b' - m_b)::

    Z  ->  alpha * Z        S  ->  S * alpha - delta * (C * alpha)

with C the mass S holds (Z in the fast pass; in the guarded one Z less the entries facing a -inf, which S
leaves out), and alpha applied first: delta is ~3.4e38 while a lane's maximum is still the sentinel.

then adds exp(x - m') and exp(x - m') * d' of its VEC columns. There is no cross-thread reduction (no
barrier, no shuffle) inside the loop: the lanes are merged once, after it, with the same algebra (lane i
with maxima m_i, M = max_i m_i, w_i = exp(m_i - M), delta_i = (M_a - m_a,i) - (M_b - m_b,i))::

    Z = sum_i w_i Z_i        S = sum_i (w_i S_i - delta_i w_i C_i)

Then E_p[d'] = S_a / Z_a, E_q[d'] = S_b / Z_b (d' now with the row's maxima), KL_S = E_p[d'] - E_q[d'].
The loop adds exp(x - m') * d' unguarded: where -inf entries make it 0 * inf, S turns NaN while Z does not, so
the row's value comes out NaN with finite log Z, and a second kernel (_sym_kl_fwd_guarded_kernel, a program
per row that otherwise reads three floats) redoes such a row, whole, with the guard 0 * (+-inf or NaN) := 0
(rows without -inf are read once; a kernel of its own, so that the guarded loop's registers do not lower the
fast kernel's occupancy). That pass keeps entries that are -inf on one side only out of S and remembers the
largest logit facing one (x_a, x_b: merged by max); with the row's m and log Z it decides whether that
probability is positive (KL_S = +inf) or underflows (the entries add 0), which no lane can tell from its own
maximum. It also redoes rows that came out +-inf with finite log Z, and sums Z, S, C (and the maxima's shift)
in float64: logits of float32's own magnitude (finfo.min as a mask in one input) overflow the fast pass's
float32 sums. Exponentials are tl.exp2(x log2 e): one MUFU.EX2 on the GPU, which flushes results below
2^-126 to 0 (the interpreter and the PyTorch path keep them as subnormals).
Six floats per row are saved (m_a, m_b, log Z_a, log Z_b, E_p[d'], E_q[d']), plus the inputs: the maxima
and log Z are kept apart, because lse = m + log Z rounded to float32 at |m| ~ 1e6 is off by up to 0.03
and would scale p by 3 %. Backward reads a, b once more and writes both gradients (g = upstream
gradient of the row)::

    p_j = exp((a_j - m_a) - log Z_a)        q_j = exp((b_j - m_b) - log Z_b)
    dKL_S/da_j = g * (p_j (d'_j - E_p[d'] + 1) - q_j)
    dKL_S/db_j = g * (q_j (E_q[d'] - d'_j + 1) - p_j)

(d_j - E_p[d] = d'_j - E_p[d']: the centring drops out of the gradient too.)
Traffic for forward + backward: two reads of (a, b) and one write of (da, db), the minimum.
Arithmetic is float32 whatever the input dtype; only the stored gradients are rounded.

Tiling paths (chosen by :func:`plan`, a pure function of the shapes, dtypes and SM count that the
launcher itself calls and ``bench.sm90`` inspects):

* columns, aligned (ALIGN > 1: both inputs with one layout and contiguous, non-overlapping rows spanning
  at most 1.25x their elements: both contiguous, or e.g. both the causal-LM slice logits[:, :-1]; row r
  starts at the same element offset of a, b and both gradients, which are written with the inputs'
  layout). The columns of a row (part) split into an aligned body [body_lo, body_hi), whose ends are
  multiples of ALIGN elements (16 bytes of the narrower dtype), and the edges before and after it (fewer
  than ALIGN columns each). The body is read through pointers the compiler can prove 16-byte aligned,
  with masks constant over each vector, so every load and store is 128-bit whatever V is (V = 50257
  included); the edges (< 2 ALIGN columns per row) are gathered into one masked tile;
* columns, strided (any other layout: two different layouts, a vocabulary stride other than 1, broadcast
  rows): the same loop with each input's strides and no alignment claim (scalar loads);
* rows (tiny V, padded V <= ``ROWS_MAX_V``): ROWS rows per program in one [ROWS, V] tile, so a V = 2
  classification head uses the threads it launches; forward and backward without loops.

Rows with few programs and a long vocabulary are split over SPLIT programs (grid axis 1), whose partial
(m, Z, S) are merged by a second small kernel (the lane-merge algebra again); backward is split the same
way with no merge needed.

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

from collections import Counter
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .._dispatch import device_context as _device_context  # the name the tests wrap
from ..kl import differentiable_once

__all__ = ["symmetric_kl_rows", "kl_ce_grads_", "Plan", "plan", "launches", "kernel_launches"]

# Finite "minus infinity" for running maxima: -inf - -inf would be NaN.
_NEG_BIG = tl.constexpr(-3.4028234663852886e38)

launches = {"forward": 0, "merge": 0, "guarded": 0, "backward": 0}  # kernel launches, so tests can prove the kernel ran
kernel_launches: Counter[str] = Counter()  # the same by kernel name (which tiling path ran)


# ------------------------------------------------------------------------------------------------- helpers
@triton.jit
def _row_start(ptr, row, n1, s0, s1):
    # Row r of x starts at (r // n1) * s0 + (r % n1) * s1: leading dims as up to two strided groups.
    return ptr + (row // n1) * s0 + (row % n1) * s1


@triton.jit
def _row_valid(mask_ptr, row, HAS_MASK: tl.constexpr):
    valid = row >= 0  # True, of row's shape
    if HAS_MASK:
        valid = tl.load(mask_ptr + row) != 0
    return valid


@triton.jit
def _recentre(s, c, delta, alpha):
    # S = sum exp(x - m) d' after the maxima moved: d' -> d' - delta and exp(x - m) -> alpha exp(x - m),
    # so S -> alpha (S - delta C), C = sum exp(x - m) over the entries S holds (Z in the fast pass; in a
    # guarded pass Z less the entries -inf on the other side, which S leaves out). C == 0 (nothing summed
    # yet; m may still be the -3.4e38 sentinel, so delta may be ~3.4e38): S stays. alpha is applied to C
    # before delta: alpha = 0 (the old maximum far below the new one) then gives 0, not 3.4e38 * 2 * 0 =
    # inf * 0 = NaN. A NaN C or S stays NaN.
    return tl.where(c == 0, s, s * alpha - delta * (c * alpha))


@triton.jit
def _exp(x):
    # exp(x) = 2^(x log2 e) with tl.exp2, which is one MUFU.EX2 on the GPU (ex2.approx.ftz: results below
    # 2^-126 flush to 0); tl.exp adds a range check and two multiplies per call for the subnormal results,
    # a quarter of the forward's instruction budget. A probability below 1.2e-38 of the row's largest is 0.
    return tl.exp2(x * 1.4426950408889634)


@triton.jit
def _lane_update(a, b, m_a, z_a, s_a, c_a, m_b, z_b, s_b, c_b, x_a, x_b, SAFE: tl.constexpr):
    # One tile [LANES, VEC] (float32, -inf where not read) into the per-lane statistics [LANES] of both
    # sides. Every reduction is along axis 1, which one thread holds: no communication. x_a, x_b (guarded
    # pass only; the fast pass returns them as they came): the largest logit of each side facing a -inf on
    # the other side (see below); c_a, c_b (guarded pass; the fast pass returns Z): the mass S holds.
    new_m_a = tl.maximum(m_a, tl.max(a, axis=1))
    new_m_b = tl.maximum(m_b, tl.max(b, axis=1))
    # d' = (a - m_a) - (b - m_b) moves by -delta
    delta = (_acc(new_m_a, SAFE) - _acc(m_a, SAFE)) - (_acc(new_m_b, SAFE) - _acc(m_b, SAFE))
    alpha_a = _exp(m_a - new_m_a)
    alpha_b = _exp(m_b - new_m_b)
    if SAFE:
        s_a = _recentre(s_a, c_a, delta, alpha_a)
        s_b = _recentre(s_b, c_b, delta, alpha_b)
    else:
        s_a = _recentre(s_a, z_a, delta, alpha_a)
        s_b = _recentre(s_b, z_b, delta, alpha_b)
    la = a - new_m_a[:, None]  # x - m: exact for x near m, whatever the offset of the row
    lb = b - new_m_b[:, None]
    e_a = _exp(la)
    e_b = _exp(lb)
    d = la - lb  # d'; +-inf where one side only is -inf; NaN where both are
    if SAFE:
        # exp(x - m) * d' with 0 * (+-inf or NaN) := 0: a zero probability contributes nothing. A NaN exp
        # (NaN or +inf in the row) is not 0 and reaches Z. An entry that is -inf on one side only (d' = +inf:
        # b's; -inf: a's) makes the row +inf if the other side's probability is positive *against the row*,
        # which a lane cannot tell: exp(x - m) may be positive against the lane's maximum and still underflow
        # against the row's (then the entry contributes 0, as on the PyTorch path). So such entries stay out
        # of S, and the lane keeps the largest logit facing one, x (the one with the largest probability);
        # _finish decides once the row's m and Z are known.
        one_sided = tl.abs(d) == float("inf")
        x_a = tl.maximum(x_a, tl.max(tl.where(d == float("inf"), a, float("-inf")), axis=1))
        x_b = tl.maximum(x_b, tl.max(tl.where(d == float("-inf"), b, float("-inf")), axis=1))
        d_a = tl.where((e_a == 0) | one_sided, 0.0, d)
        d_b = tl.where((e_b == 0) | one_sided, 0.0, d)
        c_a = c_a * alpha_a + tl.sum(tl.where(one_sided, 0.0, e_a), axis=1)
        c_b = c_b * alpha_b + tl.sum(tl.where(one_sided, 0.0, e_b), axis=1)
    else:
        # Fast pass: no guard on the probabilities, so 0 * inf (an entry -inf on one side only) makes S NaN
        # and the caller redoes the row SAFE. d' is NaN where both sides are -inf: the positions past the data
        # (the last partial tile, the edge gather) and masked vocabulary entries. Both contribute exactly 0,
        # so d' := 0 there, or every row with a partial tile would be read twice. (A NaN or +inf in the data
        # makes Z NaN, and the row NaN, whatever S is.)
        d_a = tl.where(d == d, d, 0.0)
        d_b = d_a
    if SAFE:  # |exp(x - m) d'| <= 3.4e38, so a tile's sum is taken at 2^-64 (exact but for subnormal terms)
        s_a = s_a + _acc(tl.sum(e_a * (d_a * 5.421010862427522e-20), axis=1), SAFE) * 1.8446744073709552e19
        s_b = s_b + _acc(tl.sum(e_b * (d_b * 5.421010862427522e-20), axis=1), SAFE) * 1.8446744073709552e19
    else:
        s_a = s_a + tl.sum(e_a * d_a, axis=1)  # a chain of FMAs in one thread
        s_b = s_b + tl.sum(e_b * d_b, axis=1)
    z_a = z_a * alpha_a + tl.sum(e_a, axis=1)
    z_b = z_b * alpha_b + tl.sum(e_b, axis=1)
    if not SAFE:
        c_a = z_a
        c_b = z_b
    return new_m_a, z_a, s_a, c_a, new_m_b, z_b, s_b, c_b, x_a, x_b


@triton.jit
def _acc(x, SAFE: tl.constexpr):
    # The dtype of the sums Z, S, C and of the maxima's shift delta: float32, and float64 in the guarded pass,
    # whose rows are rare and may hold logits of float32's own magnitude (finfo.min as a mask in one input):
    # there exp(x - m) * d' summed over a lane, or a maximum's shift from the sentinel, overflows float32
    # (then inf * 0 = NaN). The tiles stay float32.
    if SAFE:
        y = x.to(tl.float64)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _fwd_pass(a_ptr, b_ptr, row, lo, hi, valid, n1a, sa0, sa1, sav, n1b, sb0, sb1, sbv, V,
              LANES: tl.constexpr, VEC: tl.constexpr, ALIGN: tl.constexpr, SAFE: tl.constexpr):
    # Per-lane statistics [LANES] of columns [lo, hi) of one row, then the lanes merged: (m, Z, S) per side.
    # pos[l, k] = l * VEC + k: lane l owns VEC consecutive columns of each tile
    pos = tl.arange(0, LANES)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    m_a = tl.full([LANES], _NEG_BIG, tl.float32)
    m_b = tl.full([LANES], _NEG_BIG, tl.float32)
    zero = _acc(tl.zeros([LANES], tl.float32), SAFE)  # Z, S, C: float64 in the guarded pass
    z_a = zero
    z_b = zero
    s_a = zero
    s_b = zero
    c_a = zero
    c_b = zero
    x_a = tl.full([LANES], float("-inf"), tl.float32)
    x_b = tl.full([LANES], float("-inf"), tl.float32)
    if ALIGN > 1:
        row_off = (row // n1a) * sa0 + (row % n1a) * sa1  # b has a's strides on this path
        start, body_lo, body_hi, body_len, read_len, n_head, n_tail = _aligned_bounds(row_off, lo, hi, valid, ALIGN)
        if n_head + n_tail > 0:  # the < 2 ALIGN unaligned columns: one masked gather (scalar loads)
            idx, ok = _edge_index(pos, start, body_hi, n_head, n_tail)
            a = tl.load(a_ptr + idx, mask=ok, other=float("-inf")).to(tl.float32)
            b = tl.load(b_ptr + idx, mask=ok, other=float("-inf")).to(tl.float32)
            m_a, z_a, s_a, c_a, m_b, z_b, s_b, c_b, x_a, x_b = _lane_update(
                a, b, m_a, z_a, s_a, c_a, m_b, z_b, s_b, c_b, x_a, x_b, SAFE)
        a_body = a_ptr + body_lo  # 16-byte aligned, provably: loads below are 128-bit
        b_body = b_ptr + body_lo
        for t in range(0, body_len, LANES * VEC):
            cols = t + pos
            ok = cols < read_len  # constant over each vector: read_len is a multiple of ALIGN
            a = tl.load(a_body + cols, mask=ok, other=float("-inf")).to(tl.float32)
            b = tl.load(b_body + cols, mask=ok, other=float("-inf")).to(tl.float32)
            m_a, z_a, s_a, c_a, m_b, z_b, s_b, c_b, x_a, x_b = _lane_update(
                a, b, m_a, z_a, s_a, c_a, m_b, z_b, s_b, c_b, x_a, x_b, SAFE)
    else:
        a_row = _row_start(a_ptr, row, n1a, sa0, sa1)
        b_row = _row_start(b_ptr, row, n1b, sb0, sb1)
        hi_read = tl.where(valid, hi, lo)  # a masked row is never read
        for t in range(lo, hi_read, LANES * VEC):
            cols = t + pos
            ok = cols < hi_read
            # Out-of-range entries read as -inf on both sides, which contribute exactly 0.
            a = tl.load(a_row + cols * sav, mask=ok, other=float("-inf")).to(tl.float32)
            b = tl.load(b_row + cols * sbv, mask=ok, other=float("-inf")).to(tl.float32)
            m_a, z_a, s_a, c_a, m_b, z_b, s_b, c_b, x_a, x_b = _lane_update(
                a, b, m_a, z_a, s_a, c_a, m_b, z_b, s_b, c_b, x_a, x_b, SAFE)
    # The one cross-thread reduction of the program: merge the lanes.
    m_a, z_a, s_a, m_b, z_b, s_b = _merge(m_a, z_a, s_a, c_a, m_b, z_b, s_b, c_b)
    return m_a, z_a, s_a, m_b, z_b, s_b, tl.max(x_a, axis=0), tl.max(x_b, axis=0)


@triton.jit
def _merge(m_ai, z_ai, s_ai, c_ai, m_bi, z_bi, s_bi, c_bi):
    # Statistics i (lanes, or parts of a row) each with their own maxima m_i, merged along axis 0 with the
    # overall maxima M = max_i m_i, w_i = exp(m_i - M), delta_i = (M_a - m_a,i) - (M_b - m_b,i):
    #     Z = sum_i w_i Z_i        S = sum_i w_i (S_i - delta_i C_i)
    # with C_i the mass S_i holds (Z_i but in a guarded pass; see _recentre). Lanes that read nothing:
    # m = sentinel, Z = S = C = 0, add nothing.
    m_a = tl.max(m_ai, axis=0)
    m_b = tl.max(m_bi, axis=0)
    w_a = _exp(m_ai - m_a)
    w_b = _exp(m_bi - m_b)
    wide = s_ai.dtype  # the sums' dtype: float64 in the guarded pass (a shift from the sentinel overflows float32)
    delta = (m_a.to(wide) - m_ai.to(wide)) - (m_b.to(wide) - m_bi.to(wide))
    z_a = tl.sum(z_ai * w_a, axis=0)
    z_b = tl.sum(z_bi * w_b, axis=0)
    s_a = tl.sum(_recentre(s_ai, c_ai, delta, w_a), axis=0)
    s_b = tl.sum(_recentre(s_bi, c_bi, delta, w_b), axis=0)
    return m_a, z_a, s_a, m_b, z_b, s_b


@triton.jit
def _finish(out_ptr, stats_ptr, row, n_rows, m_a, z_a, s_a, x_a, m_b, z_b, s_b, x_b, valid, ok):
    # A row that is -inf everywhere on one side has Z = 0 there: log Z := 0 (so p = exp(-inf) = 0 in
    # backward) and E[d'] := 0. Only Z == 0 means empty: a NaN Z (NaN or +inf in the row) stays NaN and
    # makes the value and every gradient of the row NaN. Scalars or vectors of rows (``ok``: store mask).
    lz_a = tl.log(tl.where(z_a == 0, 1.0, z_a))
    lz_b = tl.log(tl.where(z_b == 0, 1.0, z_b))
    # Entries -inf on one side only (x: the largest logit facing one; -inf: none): where its probability
    # against the row, exp((x - m) - log Z) (the PyTorch path's and the backward's expression), is positive,
    # the supports differ and KL_S = +inf: E_p[d'] = +inf (a finite, b = -inf) or E_q[d'] = -inf (the
    # reverse). Otherwise those entries underflowed and add 0.
    # (in float32, as the PyTorch path decides, also where the guarded pass's statistics are float64)
    s_a = tl.where(_exp(((x_a - m_a) - lz_a).to(tl.float32)) > 0, float("inf"), s_a)
    s_b = tl.where(_exp(((x_b - m_b) - lz_b).to(tl.float32)) > 0, float("-inf"), s_b)
    e_p = tl.where(z_a == 0, 0.0, s_a / z_a)  # E_p[d']
    e_q = tl.where(z_b == 0, 0.0, s_b / z_b)  # E_q[d']
    kl = tl.where(valid, e_p - e_q, 0.0)  # KL_S = E_p[d'] - E_q[d'] (= E_p[d] - E_q[d])
    tl.store(out_ptr + row, kl, mask=ok)
    plane = row * 0 + n_rows  # n_rows in row's 64 bits: k * n_rows overflows int32 from 429M rows on
    tl.store(stats_ptr + row, m_a, mask=ok)
    tl.store(stats_ptr + plane + row, m_b, mask=ok)
    tl.store(stats_ptr + 2 * plane + row, lz_a, mask=ok)
    tl.store(stats_ptr + 3 * plane + row, lz_b, mask=ok)
    tl.store(stats_ptr + 4 * plane + row, e_p, mask=ok)
    tl.store(stats_ptr + 5 * plane + row, e_q, mask=ok)


@triton.jit
def _aligned_bounds(row_off, lo, hi, valid, ALIGN: tl.constexpr):
    # Columns [lo, hi) of the row starting at element row_off (of tensors with one layout and contiguous
    # rows: row * V when contiguous) are elements [start, end) with start = row_off + lo.
    # The body [body_lo, body_hi) has both ends multiples of ALIGN (written as
    # x // ALIGN * ALIGN, which the compiler's alignment analysis can follow), the edges are
    # [start, head_end) and [body_hi, end), each shorter than ALIGN. A masked row reads nothing.
    start = row_off + lo
    end = row_off + hi
    body_lo = (start + ALIGN - 1) // ALIGN * ALIGN
    body_hi = tl.maximum(end // ALIGN * ALIGN, body_lo)
    n_head = tl.minimum(body_lo, end) - start
    n_tail = tl.maximum(end - body_hi, 0)
    body_len = (body_hi - body_lo).to(tl.int32)
    n_head = tl.where(valid, n_head, 0).to(tl.int32)
    n_tail = tl.where(valid, n_tail, 0).to(tl.int32)
    read_len = tl.where(valid, body_len, 0)
    return start, body_lo, body_hi, body_len, read_len, n_head, n_tail


@triton.jit
def _edge_index(pos, start, body_hi, n_head, n_tail):
    # Position pos of the edge tile: head entries first, then the tail; ok where there is an entry.
    idx = tl.where(pos < n_head, start + pos, body_hi + (pos - n_head))
    return idx, pos < n_head + n_tail


# ------------------------------------------------------------------------------------------------- forward
@triton.jit
def _sym_kl_fwd_kernel(
    a_ptr, b_ptr, mask_ptr, out_ptr, stats_ptr, part_ptr,
    n_rows, V, chunk, n1a, sa0, sa1, sav, n1b, sb0, sb1, sbv,
    HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr,
    ALIGN: tl.constexpr,
):
    # Program (row, part): columns [part * chunk, min((part + 1) * chunk, V)) of one row.
    row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: row * stride overflows int32 at large N * V
    part = tl.program_id(1).to(tl.int64)
    valid = _row_valid(mask_ptr, row, HAS_MASK)
    lo = part * chunk
    hi = tl.minimum(lo + chunk, V)
    # The fast pass only. S is NaN while Z is not only where it multiplied a zero probability by an infinite
    # d' (-inf entries): such a row comes out with a NaN value and finite log Z, and _sym_kl_fwd_guarded_kernel
    # redoes it (rare; a NaN Z makes the row NaN either way). A separate kernel, so that the guarded loop's
    # registers do not count against this one's occupancy.
    m_a, z_a, s_a, m_b, z_b, s_b, x_a, x_b = _fwd_pass(a_ptr, b_ptr, row, lo, hi, valid, n1a, sa0, sa1, sav,
                                                       n1b, sb0, sb1, sbv, V, LANES, VEC, ALIGN, False)
    if SPLIT:
        # Partial statistics, layout (6, n_rows, n_parts); merged by _sym_kl_merge_kernel.
        n_parts = tl.num_programs(1).to(tl.int64)
        plane = n_rows * n_parts
        base = part_ptr + row * n_parts + part
        tl.store(base, m_a)
        tl.store(base + plane, z_a)
        tl.store(base + 2 * plane, s_a)
        tl.store(base + 3 * plane, m_b)
        tl.store(base + 4 * plane, z_b)
        tl.store(base + 5 * plane, s_b)
    else:
        _finish(out_ptr, stats_ptr, row, n_rows, m_a, z_a, s_a, x_a, m_b, z_b, s_b, x_b, valid, True)


@triton.jit
def _sym_kl_merge_kernel(part_ptr, mask_ptr, out_ptr, stats_ptr, n_rows, n_parts,
                         HAS_MASK: tl.constexpr, PARTS: tl.constexpr):
    # Part i summed d'_i with its own maxima: merged like the lanes of one program (_merge).
    row = tl.program_id(0).to(tl.int64)
    valid = _row_valid(mask_ptr, row, HAS_MASK)
    plane = (row * 0 + n_rows) * n_parts  # 64-bit, as row
    p = tl.arange(0, PARTS)
    idx = row * n_parts + p
    ok = p < n_parts  # padding lanes: m = sentinel, Z = S = 0, so they add nothing
    z_ai = tl.load(part_ptr + plane + idx, mask=ok, other=0.0)
    z_bi = tl.load(part_ptr + 4 * plane + idx, mask=ok, other=0.0)
    m_a, z_a, s_a, m_b, z_b, s_b = _merge(  # fast-pass parts: S holds all of Z (C = Z)
        tl.load(part_ptr + idx, mask=ok, other=_NEG_BIG), z_ai, tl.load(part_ptr + 2 * plane + idx, mask=ok, other=0.0),
        z_ai, tl.load(part_ptr + 3 * plane + idx, mask=ok, other=_NEG_BIG), z_bi,
        tl.load(part_ptr + 5 * plane + idx, mask=ok, other=0.0), z_bi)
    none = float("-inf")  # the fast pass has no one-sided entries to decide (x = -inf)
    _finish(out_ptr, stats_ptr, row, n_rows, m_a, z_a, s_a, none, m_b, z_b, s_b, none, valid, True)


@triton.jit
def _sym_kl_fwd_guarded_kernel(
    a_ptr, b_ptr, out_ptr, stats_ptr,
    n_rows, V, n1a, sa0, sa1, sav, n1b, sb0, sb1, sbv,
    LANES: tl.constexpr, VEC: tl.constexpr, ALIGN: tl.constexpr,
):
    # After the fast forward (and the merge): a row whose value came out NaN with finite log Z on both
    # sides had an entry -inf on one side only (see _sym_kl_fwd_kernel); this program redoes it, the whole
    # row, with the guard and the one-sided decision. Every other row costs three loads. (A masked row has
    # value 0.)
    row = tl.program_id(0).to(tl.int64)
    plane = row * 0 + n_rows  # 64-bit, as row
    kl = tl.load(out_ptr + row)
    lz_a = tl.load(stats_ptr + 2 * plane + row)
    lz_b = tl.load(stats_ptr + 3 * plane + row)
    if ((kl != kl) | (tl.abs(kl) == float("inf"))) & (lz_a == lz_a) & (lz_b == lz_b):
        m_a, z_a, s_a, m_b, z_b, s_b, x_a, x_b = _fwd_pass(a_ptr, b_ptr, row, 0, V, row >= 0, n1a, sa0, sa1, sav,
                                                           n1b, sb0, sb1, sbv, V, LANES, VEC, ALIGN, True)
        _finish(out_ptr, stats_ptr, row, n_rows, m_a, z_a, s_a, x_a, m_b, z_b, s_b, x_b, True, True)


@triton.jit
def _sym_kl_fwd_rows_kernel(
    a_ptr, b_ptr, mask_ptr, out_ptr, stats_ptr,
    n_rows, V, n1a, sa0, sa1, sav, n1b, sb0, sb1, sbv,
    HAS_MASK: tl.constexpr, ROWS: tl.constexpr, BV: tl.constexpr,
):
    # Tiny V: ROWS whole rows per program in one [ROWS, BV] tile; the statistics directly, no loop.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    valid = _row_valid(mask_ptr, tl.where(row_ok, rows, 0), HAS_MASK) & row_ok
    cols = tl.arange(0, BV).to(tl.int64)  # cols * sav: a vocabulary stride of 69M overflows int32
    ok = valid[:, None] & (cols < V)[None, :]  # masked rows and padding read as -inf: they add 0
    a_rows = _row_start(a_ptr, rows, n1a, sa0, sa1)
    b_rows = _row_start(b_ptr, rows, n1b, sb0, sb1)
    a = tl.load(a_rows[:, None] + cols[None, :] * sav, mask=ok, other=float("-inf")).to(tl.float32)
    b = tl.load(b_rows[:, None] + cols[None, :] * sbv, mask=ok, other=float("-inf")).to(tl.float32)
    m_a = tl.full([ROWS], _NEG_BIG, tl.float32)
    m_b = tl.full([ROWS], _NEG_BIG, tl.float32)
    zero = tl.zeros([ROWS], tl.float32)
    none = tl.full([ROWS], float("-inf"), tl.float32)
    m_a, z_a, s_a, _, m_b, z_b, s_b, _, x_a, x_b = _lane_update(a, b, m_a, zero, zero, zero, m_b, zero, zero, zero,
                                                                  none, none, True)
    _finish(out_ptr, stats_ptr, rows, n_rows, m_a, z_a, s_a, x_a, m_b, z_b, s_b, x_b, valid, row_ok)


# ------------------------------------------------------------------------------------------------ backward
@triton.jit
def _grads(a, b, g, m_a, m_b, lz_a, lz_b, e_p, e_q):
    la = a - m_a  # as in forward, with the row's maxima
    lb = b - m_b
    p = _exp(la - lz_a)  # p = exp(a - m_a) / Z_a
    q = _exp(lb - lz_b)
    d = la - lb  # d' = d - (m_a - m_b); d - E_p[d] = d' - E_p[d']
    # g (p (d' - E_p[d'] + 1) - q), with p * (...) := 0 where p = 0 (d' may be +-inf or NaN there)
    ga = g * (tl.where(p == 0, 0.0, p * (d - e_p + 1.0)) - q)
    # g (q (E_q[d'] - d' + 1) - p), with q * (...) := 0 where q = 0
    gb = g * (tl.where(q == 0, 0.0, q * (e_q - d + 1.0)) - p)
    return ga, gb, p


@triton.jit
def _ce_grad(ga, p, col, y, w, eps_v, keep):
    # + w (p_j - t_j), t = keep * onehot(y) + eps / V (label smoothing; keep = 1 - eps); w = 0: no label
    return ga + w * (p - eps_v) - tl.where(col == y, w * keep, 0.0)


@triton.jit
def _bwd_tile(a_src, b_src, ga_dst, gb_dst, idx, read_ok, write_ok, g, m_a, m_b, lz_a, lz_b, e_p, e_q,
              sav, sbv, col, ce_y, ce_w, ce_eps_v, ce_keep, NEED_GA: tl.constexpr, NEED_GB: tl.constexpr,
              WITH_CE: tl.constexpr):
    # Each element is read before it is written, by this program alone: ga_dst may be a_src (in place).
    a = tl.load(a_src + idx * sav, mask=read_ok, other=float("-inf")).to(tl.float32)
    b = tl.load(b_src + idx * sbv, mask=read_ok, other=float("-inf")).to(tl.float32)
    ga, gb, p = _grads(a, b, g, m_a, m_b, lz_a, lz_b, e_p, e_q)
    if WITH_CE:
        ga = _ce_grad(ga, p, col, ce_y, ce_w, ce_eps_v, ce_keep)
    if NEED_GA:  # g = 0 and p = q = 0 on a masked row: zeros
        tl.store(ga_dst + idx, ga.to(ga_dst.dtype.element_ty), mask=write_ok)
    if NEED_GB:
        tl.store(gb_dst + idx, gb.to(gb_dst.dtype.element_ty), mask=write_ok)


@triton.jit
def _sym_kl_bwd_kernel(
    a_ptr, b_ptr, mask_ptr, stats_ptr, g_ptr, ga_ptr, gb_ptr, ce_y_ptr, ce_w_ptr, ce_eps_v, ce_keep,
    n_rows, V, chunk, sg, n1a, sa0, sa1, sav, n1b, sb0, sb1, sbv,
    HAS_MASK: tl.constexpr, NEED_GA: tl.constexpr, NEED_GB: tl.constexpr, BLOCK: tl.constexpr,
    ALIGN: tl.constexpr, WITH_CE: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1).to(tl.int64)
    valid = _row_valid(mask_ptr, row, HAS_MASK)
    g = tl.load(g_ptr + row * sg).to(tl.float32)  # upstream gradient of this row (stride 0: a scalar)
    g = tl.where(valid, g, 0.0)
    plane = row * 0 + n_rows  # 64-bit, as row
    m_a = tl.load(stats_ptr + row)
    m_b = tl.load(stats_ptr + plane + row)
    lz_a = tl.load(stats_ptr + 2 * plane + row)
    lz_b = tl.load(stats_ptr + 3 * plane + row)
    e_p = tl.load(stats_ptr + 4 * plane + row)  # E_p[d']
    e_q = tl.load(stats_ptr + 5 * plane + row)  # E_q[d']
    ce_y = -1
    ce_w = 0.0
    if WITH_CE:  # the row's label (-1: none) and CE weight, for dA += w (p - t) (linear_kl's objective)
        ce_y = tl.load(ce_y_ptr + row)
        ce_w = tl.load(ce_w_ptr + row)
    lo = part * chunk
    hi = tl.minimum(lo + chunk, V)
    offs = tl.arange(0, BLOCK)
    if ALIGN > 1:
        # On this path a, b and both gradients share one layout with contiguous rows: one set of aligned
        # bounds for all four.
        row_off = (row // n1a) * sa0 + (row % n1a) * sa1
        start, body_lo, body_hi, body_len, read_len, n_head, n_tail = _aligned_bounds(row_off, lo, hi, True, ALIGN)
        if n_head + n_tail > 0:
            epos = tl.arange(0, 2 * ALIGN)
            idx, ok = _edge_index(epos, start, body_hi, n_head, n_tail)
            read_ok = epos < tl.where(valid, n_head + n_tail, 0)  # a masked row is only written
            _bwd_tile(a_ptr, b_ptr, ga_ptr, gb_ptr, idx, read_ok, ok, g, m_a, m_b, lz_a, lz_b, e_p, e_q, 1, 1,
                      idx - row_off, ce_y, ce_w, ce_eps_v, ce_keep, NEED_GA, NEED_GB, WITH_CE)
        read_len = tl.where(valid, body_len, 0)
        for t in range(0, body_len, BLOCK):
            cols = t + offs
            _bwd_tile(a_ptr + body_lo, b_ptr + body_lo, ga_ptr + body_lo, gb_ptr + body_lo, cols,
                      cols < read_len, cols < body_len, g, m_a, m_b, lz_a, lz_b, e_p, e_q, 1, 1,
                      (body_lo - row_off) + cols, ce_y, ce_w, ce_eps_v, ce_keep, NEED_GA, NEED_GB, WITH_CE)
    else:
        a_row = _row_start(a_ptr, row, n1a, sa0, sa1)
        b_row = _row_start(b_ptr, row, n1b, sb0, sb1)
        hi_read = tl.where(valid, hi, lo)  # a masked row is never read, only written with zeros
        for t in range(lo, hi, BLOCK):
            cols = t + offs
            # gradients are contiguous (n_rows, V)
            _bwd_tile(a_row, b_row, ga_ptr + row * V, gb_ptr + row * V, cols, cols < hi_read, cols < hi, g,
                      m_a, m_b, lz_a, lz_b, e_p, e_q, sav, sbv, cols, ce_y, ce_w, ce_eps_v, ce_keep, NEED_GA,
                      NEED_GB, WITH_CE)


@triton.jit
def _sym_kl_bwd_rows_kernel(
    a_ptr, b_ptr, mask_ptr, stats_ptr, g_ptr, ga_ptr, gb_ptr, ce_y_ptr, ce_w_ptr, ce_eps_v, ce_keep,
    n_rows, V, sg, n1a, sa0, sa1, sav, n1b, sb0, sb1, sbv,
    HAS_MASK: tl.constexpr, NEED_GA: tl.constexpr, NEED_GB: tl.constexpr, ROWS: tl.constexpr,
    BV: tl.constexpr, WITH_CE: tl.constexpr = False,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    r = tl.where(row_ok, rows, 0)
    valid = _row_valid(mask_ptr, r, HAS_MASK) & row_ok
    g = tl.where(valid, tl.load(g_ptr + r * sg).to(tl.float32), 0.0)[:, None]
    plane = tl.program_id(0).to(tl.int64) * 0 + n_rows  # 64-bit: k * n_rows overflows int32 from 429M rows
    m_a = tl.load(stats_ptr + r)[:, None]
    m_b = tl.load(stats_ptr + plane + r)[:, None]
    lz_a = tl.load(stats_ptr + 2 * plane + r)[:, None]
    lz_b = tl.load(stats_ptr + 3 * plane + r)[:, None]
    e_p = tl.load(stats_ptr + 4 * plane + r)[:, None]
    e_q = tl.load(stats_ptr + 5 * plane + r)[:, None]
    cols = tl.arange(0, BV).to(tl.int64)[None, :]  # cols * sav: a vocabulary stride of 69M overflows int32
    in_row = cols < V
    a = tl.load(_row_start(a_ptr, r, n1a, sa0, sa1)[:, None] + cols * sav, mask=valid[:, None] & in_row,
                other=float("-inf")).to(tl.float32)
    b = tl.load(_row_start(b_ptr, r, n1b, sb0, sb1)[:, None] + cols * sbv, mask=valid[:, None] & in_row,
                other=float("-inf")).to(tl.float32)
    ga, gb, p = _grads(a, b, g, m_a, m_b, lz_a, lz_b, e_p, e_q)
    if WITH_CE:
        ga = _ce_grad(ga, p, cols, tl.load(ce_y_ptr + r)[:, None], tl.load(ce_w_ptr + r)[:, None], ce_eps_v, ce_keep)
    out = rows[:, None] * V + cols  # gradients are contiguous (n_rows, V)
    ok = row_ok[:, None] & in_row
    if NEED_GA:
        tl.store(ga_ptr + out, ga.to(ga_ptr.dtype.element_ty), mask=ok)
    if NEED_GB:
        tl.store(gb_ptr + out, gb.to(gb_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------------- plan
ROWS_MAX_V = 32  # padded V up to which programs take whole rows (the rows path)


class Plan(NamedTuple):
    """How the launcher tiles one call; :func:`plan` makes it, ``bench.sm90`` inspects it.

    ``rows > 0``: the rows path (``rows`` rows of padded width ``bv`` per program, forward and backward).
    Otherwise the columns path: the forward reads tiles of ``lanes x vec`` columns (a lane owns ``vec``
    consecutive columns), ``chunk`` columns per program (a multiple of both tiles; fewer than V splits
    rows over programs and adds the merge kernel), the backward tiles of ``bwd_block`` columns; ``align``
    > 1 is the aligned body + edges path (elements per 16 bytes of the narrower input).
    """

    rows: int
    bv: int
    lanes: int
    vec: int
    chunk: int
    num_warps: int
    bwd_block: int
    bwd_warps: int
    align: int


def plan(n_rows: int, vocab: int, elem_sizes: tuple[int, int], contiguous: bool, sm_count: int,
         rows_aligned: bool = True) -> Plan:
    """The launch plan for ``n_rows`` rows of ``vocab`` logits (inputs of ``elem_sizes`` bytes) on a device
    with ``sm_count`` SMs (1: the interpreter).

    * tiny V (padded V <= ROWS_MAX_V): whole rows, 2 warps, enough rows per program for every thread to
      hold an entry and at most 8 entries per thread, fewer rows per program when that leaves SMs idle;
    * otherwise one vector of 16 bytes (of the narrower input) per lane and 2 lanes per thread, 4 warps:
      2048 bf16 / 1024 fp32 columns per forward tile, the same columns per backward tile. Moderate tiles
      (DESIGN.md §3); the per-lane statistics keep the forward loop free of cross-thread reductions, so
      small CTAs (many per SM) hide the memory latency;
    * rows that cannot fill the GPU (fewer than 4 programs per SM) are split over programs;
    * both inputs with one layout and contiguous rows (``contiguous``: both contiguous, or both e.g. the
      causal-LM slice ``logits[:, :-1]``): the aligned body + edges path (128-bit loads and stores for
      every V); otherwise the strided columns path, with the same tiles when every row starts 16-byte
      aligned (``rows_aligned``: the compiler can then still vectorise), else one column per lane and 4
      lanes per thread (scalar loads either way; wider lanes cost 2-4x the registers and cross-thread
      shuffles for nothing: 255 registers, 12 % occupancy at bf16 V = 50,257 with 8 columns per lane).
    """
    narrow = min(elem_sizes)
    bv = triton.next_power_of_2(max(vocab, 1))
    if bv <= ROWS_MAX_V:
        num_warps = 2
        threads = 32 * num_warps
        rows_max = max(1, 8 * threads // bv)  # 8 entries per thread
        rows_min = max(1, threads // bv)  # every thread holds one
        want = triton.next_power_of_2(max(triton.cdiv(n_rows, max(sm_count, 1)), 1)) // 2 or 1  # ~2 per SM
        rows = max(rows_min, min(rows_max, want))
        return Plan(rows=rows, bv=bv, lanes=0, vec=0, chunk=vocab, num_warps=num_warps, bwd_block=0,
                    bwd_warps=num_warps, align=1)
    num_warps = 4
    vec = 16 // narrow
    lanes = 2 * 32 * num_warps
    if not contiguous and not rows_aligned:
        vec, lanes = 1, 4 * 32 * num_warps
    tile = lanes * vec
    tiles = triton.cdiv(vocab, tile)
    target = 4 * sm_count  # programs wanted in flight
    split = 1
    if n_rows < target and tiles > 1:
        split = min(tiles, triton.cdiv(target, max(n_rows, 1)), 256)
    chunk = triton.cdiv(tiles, split) * tile
    return Plan(rows=0, bv=bv, lanes=lanes, vec=vec, chunk=chunk, num_warps=num_warps, bwd_block=tile,
                bwd_warps=num_warps, align=vec if contiguous else 1)


def _sm_count(device: torch.device) -> int:
    """SMs of a CUDA device, 1 elsewhere (the interpreter). ``bench.sm90`` replaces it to plan for an H200."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _one_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` can take the aligned path: one layout (the same strides), contiguous rows that
    do not overlap (the gradients are written with that layout), e.g. both contiguous, or both the causal-LM
    slice ``logits[:, :-1]``. Broadcast (stride 0) or overlapping rows take the strided path."""
    if a.stride() != b.stride() or (a.shape[-1] > 1 and a.stride(-1) != 1):
        return False
    _, n_rows, n1, s0, s1, _ = _rows_layout(a)  # a is already laid out (see _forward): no copy here
    groups = sorted(((n, st) for n, st in ((n_rows // max(n1, 1), s0), (n1, s1)) if n > 1), key=lambda g: g[1])
    extent = a.shape[-1]  # elements spanned by the rows so far (inner groups first)
    for n, st in groups:
        if st < extent:
            return False
        extent = (n - 1) * st + extent
    # The gradients span the same extent: only layouts with gaps of at most a quarter (logits[:, :-1]: 1/T)
    # take this path, not e.g. logits[:, -1], whose gradient buffers would span the whole (B, T, V) tensor.
    return extent <= a.numel() + max(a.numel() // 4, a.shape[-1])


def _rows_aligned(x: torch.Tensor) -> bool:
    """Whether every row of ``x`` starts 16-byte aligned with unit column stride (vector loads possible)."""
    per = max(1, 16 // x.element_size())
    return (x.shape[-1] <= 1 or x.stride(-1) == 1) and x.data_ptr() % 16 == 0 and \
        all(st % per == 0 for n, st in zip(x.shape[:-1], x.stride()[:-1]) if n > 1)


def _plan(n_rows: int, vocab: int, a: torch.Tensor, b: torch.Tensor) -> Plan:
    """:func:`plan` for these inputs (tests replace this to force tiles and paths)."""
    return plan(n_rows, vocab, (a.element_size(), b.element_size()), _one_layout(a, b), _sm_count(a.device),
                rows_aligned=_rows_aligned(a) and _rows_aligned(b))


_KEYS = {"_sym_kl_fwd_kernel": "forward", "_sym_kl_fwd_rows_kernel": "forward", "_sym_kl_merge_kernel": "merge",
         "_sym_kl_fwd_guarded_kernel": "guarded",
         "_sym_kl_bwd_kernel": "backward", "_sym_kl_bwd_rows_kernel": "backward"}


def _launch(kernel, grid, *args, **meta) -> None:
    """Every launch goes through here: counted in ``launches``; ``bench.sm90`` records instead of launching."""
    launches[_KEYS[kernel.fn.__name__]] += 1
    kernel_launches[kernel.fn.__name__] += 1
    kernel[grid](*args, **meta)


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


def _forward(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor]):
    """Launch the forward on 2-D-able ``a``, ``b``: ``(out, stats, (n_rows, lay_a, lay_b, plan), a, b)``."""
    a, n_rows, *lay_a = _rows_layout(a)
    b, _, *lay_b = _rows_layout(b)
    vocab = a.shape[-1]
    out = torch.empty(n_rows, dtype=torch.float32, device=a.device)
    # Per row: m_a, m_b, log Z_a, log Z_b, E_p[d'], E_q[d'] (see the module docstring).
    stats = torch.empty(6, n_rows, dtype=torch.float32, device=a.device)
    p = _plan(n_rows, vocab, a, b)
    mask_arg = mask if mask is not None else out  # never read when HAS_MASK is False
    has_mask = mask is not None
    if n_rows > 0:
        with _device_context(a):
            if p.rows:
                _launch(_sym_kl_fwd_rows_kernel, (triton.cdiv(n_rows, p.rows),), a, b, mask_arg, out, stats,
                        n_rows, vocab, *lay_a, *lay_b, HAS_MASK=has_mask, ROWS=p.rows, BV=p.bv,
                        num_warps=p.num_warps)
            else:
                n_parts = triton.cdiv(vocab, p.chunk)
                split = n_parts > 1
                part = torch.empty(6, n_rows, n_parts, dtype=torch.float32, device=a.device) if split else out
                _launch(_sym_kl_fwd_kernel, (n_rows, n_parts), a, b, mask_arg, out, stats, part, n_rows, vocab,
                        p.chunk, *lay_a, *lay_b, HAS_MASK=has_mask, SPLIT=split, LANES=p.lanes, VEC=p.vec,
                        ALIGN=p.align, num_warps=p.num_warps)
                if split:
                    _launch(_sym_kl_merge_kernel, (n_rows,), part, mask_arg, out, stats, n_rows, n_parts,
                            HAS_MASK=has_mask, PARTS=triton.next_power_of_2(n_parts))
                _launch(_sym_kl_fwd_guarded_kernel, (n_rows,), a, b, out, stats, n_rows, vocab, *lay_a, *lay_b,
                        LANES=p.lanes, VEC=p.vec, ALIGN=p.align,
                        num_warps=min(2 * p.num_warps, 16))  # its float64 sums: half the lanes per thread
    return out, stats, (n_rows, lay_a, lay_b, p), a, b


def _backward(a, b, mask, stats, g, ga, gb, layout, vocab: int, ce=None) -> None:
    """Launch the backward: ``ga``/``gb`` (contiguous ``(n_rows, V)``, or None) get ``g`` times the gradients
    of KL_S, and with ``ce = (labels, weights, eps)`` ``ga`` also gets ``weights * (p - t)``. ``ga`` may be
    ``a`` and ``gb`` may be ``b`` (in place: each element is read before it is written, by one program)."""
    n_rows, lay_a, lay_b, p = layout
    need_a, need_b = ga is not None, gb is not None
    if not (n_rows > 0 and vocab > 0 and (need_a or need_b)):
        return
    with_ce = ce is not None
    y, w, eps = ce if with_ce else (stats, stats, 0.0)  # never read without WITH_CE
    args = (a, b, mask if mask is not None else stats, stats, g, ga if need_a else stats, gb if need_b else stats,
            y, w, eps / vocab, 1.0 - eps)
    flags = dict(HAS_MASK=mask is not None, NEED_GA=need_a, NEED_GB=need_b, num_warps=p.bwd_warps)
    if with_ce:  # only then: the default specialisation (and its compiled code) stays as it was
        flags["WITH_CE"] = True
    with _device_context(a):
        if p.rows:
            _launch(_sym_kl_bwd_rows_kernel, (triton.cdiv(n_rows, p.rows),), *args, n_rows, vocab,
                    g.stride(0), *lay_a, *lay_b, ROWS=p.rows, BV=p.bv, **flags)
        else:
            _launch(_sym_kl_bwd_kernel, (n_rows, triton.cdiv(vocab, p.chunk)), *args, n_rows, vocab,
                    p.chunk, g.stride(0), *lay_a, *lay_b, BLOCK=p.bwd_block, ALIGN=p.align, **flags)


class SymmetricKLRows(torch.autograd.Function):
    """Per-row KL_S of logits ``(*, V)`` with a flat bool row mask; returns float32 ``(rows,)``."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        shape = a.shape
        out, stats, layout, a, b = _forward(a, b, mask)
        ctx.save_for_backward(a, b, mask, stats)
        ctx.layout = (shape, layout)
        return out

    @staticmethod
    @differentiable_once
    def backward(ctx, grad_rows: torch.Tensor):
        a, b, mask, stats = ctx.saved_tensors
        shape, layout = ctx.layout
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # The aligned path writes the gradients with the inputs' layout, the others contiguous (n_rows, V).
        new = (lambda x: torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)) \
            if layout[3].align > 1 else (lambda x: torch.empty(x.shape, dtype=x.dtype, device=x.device))
        ga = new(a) if need_a else None
        gb = new(b) if need_b else None
        _backward(a, b, mask, stats, grad_rows, ga, gb, layout, shape[-1])
        return ga, gb, None


def kl_ce_grads_(a: torch.Tensor, b: torch.Tensor, g: Optional[torch.Tensor], ce=None, need_b: bool = True):
    """The fused linear head's per-chunk step (``r3f_opt.linear_kl``), in place on two contiguous float32
    ``(n_rows, V)`` logits blocks: returns ``(kl_rows, stats)`` (KL_S per row; the six per-row statistics,
    ``stats[0]`` = m_a and ``stats[2]`` = log Z_a give the CE), then overwrites ``a`` with
    ``g * dKL_S/da`` (plus ``w * (p - t)`` with ``ce = (labels, w, eps)``: int64 labels, -1 for none,
    float32 weights, label smoothing) and ``b`` with ``g * dKL_S/db`` (if ``need_b``; else ``b`` is left as
    it was). ``g``: float32 ``(n_rows,)``, or None for the values alone (nothing overwritten). No row mask:
    a row that counts in no term has ``g = w = 0``."""
    if a.dim() != 2 or not (a.is_contiguous() and b.is_contiguous()) or a.shape != b.shape:
        raise ValueError(f"kl_ce_grads_ works in place on two contiguous (n_rows, V) blocks of one shape, got "
                         f"{tuple(a.shape)} (strides {a.stride()}) and {tuple(b.shape)} (strides {b.stride()})")
    if a.dtype != torch.float32 or b.dtype != torch.float32:
        raise ValueError(f"kl_ce_grads_ takes float32 logits blocks, got {a.dtype} and {b.dtype}")
    if g is not None:  # it overwrites them: behind autograd's back, or one through the other
        if a.requires_grad or b.requires_grad:
            raise ValueError("kl_ce_grads_ overwrites its blocks in place, which autograd would not see; pass "
                             "buffers that do not require grad (e.g. .detach().clone())")
        ends = sorted((x.data_ptr(), x.data_ptr() + x.numel() * x.element_size()) for x in (a, b))
        if a.numel() and a.device.type != "meta" and ends[0][1] > ends[1][0]:  # (meta: bench.sm90's plans)
            raise ValueError("kl_ce_grads_ got two blocks that overlap in memory; pass two separate buffers")
    kl, stats, layout, _, _ = _forward(a, b, None)
    if g is not None:
        _backward(a, b, None, stats, g, a, b if need_b else None, layout, a.shape[-1], ce)
        torch.autograd.graph.increment_version(a)  # written through raw pointers: say so to autograd
        if need_b:
            torch.autograd.graph.increment_version(b)
    return kl, stats


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


# How triton.jit built the kernels when this module was imported (r3f_opt._dispatch reads it): for Triton's CPU
# interpreter (TRITON_INTERPRET=1 then) or compiled for a GPU, whatever the variable says later.
INTERPRETED = type(_sym_kl_fwd_kernel).__name__ == "InterpretedFunction"
