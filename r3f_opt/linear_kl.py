"""A fused linear head + cross-entropy + symmetric KL that never materialises the logits.

For hidden states ``H_p``, ``H_q`` (the clean and the noisy pass, ``rows x H``) and a head ``W`` (``V x H``),
bias ``b``, the logits are ``A = H_p W^T + b`` and ``B = H_q W^T + b``. :func:`linear_symmetric_kl` is
``symmetric_kl(A, B, mask, reduction)`` and :func:`linear_r3f_loss` adds the clean pass's cross-entropy,
both computed over chunks of rows, so that nothing of size ``rows x V`` is ever alive beyond one chunk.

Per chunk (design notes section 7), with the row-local gradients of the symmetric KL (``r3f_opt.kl``)::

    dA = w_kl * (p (d' - E_p[d'] + 1) - q) + w_ce * (p - t)      t = (1 - eps) onehot(y) + eps / V
    dB = w_kl * (q (E_q[d'] - d' + 1) - p)                        d' = (a - m_a) - (b - m_b)
    dH_p = dA W,  dH_q = dB W,  dW += dA^T H_p + dB^T H_q,  db += sum_rows (dA + dB)

where ``w_kl``, ``w_ce`` are the reductions' per-row weights (0 for rows that do not count). The forward
computes the gradients chunk by chunk and saves only them (rows x H, V x H, V); the backward multiplies
them by the upstream gradient. Six GEMMs per chunk with a trainable head, four with a frozen one.

Memory rule. A call allocates two ``chunk x V`` blocks in the vocabulary-math dtype (float32; float64
for float64 inputs) -- the two logits blocks, overwritten in place by ``d'``, ``dA`` and ``dB`` -- plus one
in the GEMM dtype when that differs (16-bit GEMMs write into it and read from it), and reuses them for
every chunk. The softmaxes, CE, KL and gradients run over a chunk a few rows at a time, with ``p`` and
``q`` in two ``sub x V`` buffers of at most :data:`WORKSPACE_BYTES` each (2 MiB on CPU: in cache). On
CUDA (float32 math; ``R3F_KERNELS`` as for ``symmetric_kl``) the symmetric-KL Triton kernels do a chunk's
vocabulary math instead, in place, without those buffers (``kernels/sym_kl.py``, ``kl_ce_grads_``). The
default chunk is the largest row count whose blocks fit :data:`CHUNK_BUDGET_BYTES`
(:func:`default_chunk_size`); ``chunk_size=`` overrides it.

Precision. The GEMMs run in the inputs' dtype (promoted; under ``torch.autocast`` in its dtype, as
``F.linear`` would), accumulating in float32 inside the GEMM; the logits are then upcast and everything
over the vocabulary (softmax, KL, CE, their gradients) is float32 (float64 if any input is float64).
Gradients come back in each input's dtype. With a 16-bit weight, ``dW`` is accumulated over the chunks in
that dtype (one rounding per chunk, like Liger's fused linear cross-entropy).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import nn

from ._checks import check_flag, check_number
from ._dispatch import use_triton
from .kl import REDUCTIONS, _bool_mask, _row_max, differentiable_once

__all__ = [
    "linear_symmetric_kl",
    "linear_r3f_loss",
    "LinearSymmetricKL",
    "LinearR3FLoss",
    "default_chunk_size",
    "CHUNK_BUDGET_BYTES",
    "WORKSPACE_BYTES",
]

#: Bytes one chunk's ``chunk x V`` blocks may take, by device type (``"default"``: any other device).
#: Edit this dict to change the default for a process; pass ``chunk_size=`` to fix it for one call.
CHUNK_BUDGET_BYTES = {"cpu": 64 * 2**20, "default": 2**30}
#: Bytes of each of the two ``sub x V`` buffers (p and q) the vocabulary math uses inside a chunk, by device
#: type: the chunk is walked ``sub`` rows at a time (at least one row), small enough to stay in cache on CPU.
WORKSPACE_BYTES = {"cpu": 2 * 2**20, "default": 64 * 2**20}


def _budget(table: dict, device: Union[str, torch.device]) -> int:
    return table.get(torch.device(device).type, table["default"])


def default_chunk_size(rows: int, vocab: int, device: Union[str, torch.device] = "cpu",
                       math_dtype: torch.dtype = torch.float32, gemm_dtype: Optional[torch.dtype] = None,
                       budget_bytes: Optional[int] = None) -> int:
    """Rows per chunk: ``max(1, budget // (V * (2 * math_bytes + gemm_bytes)))``, at most ``rows``.

    A chunk holds two ``chunk x V`` blocks in the math dtype (the logits, overwritten by their gradients;
    ``math_bytes`` = 4 for float32, 8 for float64 inputs) and, when the GEMMs run in another dtype (16-bit
    inputs or autocast), one more in the GEMM dtype (``gemm_bytes``; 0 otherwise). ``budget`` is
    ``CHUNK_BUDGET_BYTES[device type]`` (64 MiB on CPU, 1 GiB elsewhere) unless ``budget_bytes`` is given.
    At V = 128,256 in float32 that is 65 rows on CPU and 1,046 on a GPU (837 with bf16 GEMMs). The two
    ``sub x V`` buffers of :data:`WORKSPACE_BYTES` come on top.
    """
    if budget_bytes is None:
        budget_bytes = _budget(CHUNK_BUDGET_BYTES, device)
    gemm_bytes = gemm_dtype.itemsize if gemm_dtype is not None and gemm_dtype != math_dtype else 0
    per_row = max(int(vocab), 1) * (2 * math_dtype.itemsize + gemm_bytes)
    return int(max(1, min(max(int(rows), 1), int(budget_bytes) // per_row)))


def _kernel(math: torch.dtype, hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the vocabulary math runs in the Triton kernels: float32 math, and ``R3F_KERNELS`` (CUDA by
    default; ``R3F_KERNELS=triton`` with ``TRITON_INTERPRET=1`` on CPU, as the tests run it)."""
    return math == torch.float32 and use_triton("linear_r3f_loss", hidden, weight)


def _sub_rows(vocab: int, device: torch.device, math: torch.dtype) -> int:
    """Rows the vocabulary math takes at a time: each of its two buffers within ``WORKSPACE_BYTES``."""
    return max(1, _budget(WORKSPACE_BYTES, device) // (max(vocab, 1) * math.itemsize))


# ------------------------------------------------------------------------------------------- the chunk loop
class _Spec(NamedTuple):
    vocab: int
    chunk: int
    gemm: torch.dtype  # dtype of the GEMMs
    math: torch.dtype  # dtype of everything over the vocabulary
    ignore_index: int
    smoothing: float
    q_grad: bool  # whether the q side's logits carry gradient (False: constants, like noisy_grad=False)
    device_type: str
    sub: int  # rows the vocabulary math takes at a time (_sub_rows)
    kernel: bool = False  # the vocabulary math in the Triton kernels (kernels/sym_kl.py), in place


def _dtypes(device: torch.device, *tensors: Optional[torch.Tensor]) -> tuple[torch.dtype, torch.dtype]:
    """(GEMM dtype, math dtype) for these inputs (see the module docstring)."""
    dts = [t.dtype for t in tensors if t is not None]
    if torch.float64 in dts:
        return torch.float64, torch.float64
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type), torch.float32
    return functools.reduce(torch.promote_types, dts), torch.float32


def _gemm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scratch: Optional[torch.Tensor]) -> None:
    """out = a @ b; through ``scratch`` (a buffer in the GEMM dtype) when ``out`` has another dtype."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    elif scratch is not None:
        torch.mm(a, b, out=scratch)
        out.copy_(scratch)
    else:
        out.copy_(torch.mm(a, b))


def _softmax_(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Centre ``x`` in place (x - m, row max m; 0 for an all -inf row), write softmax(x) into ``p`` and
    return log Z per row (0 for an empty row, whose p is 0, not NaN, like symmetric_kl)."""
    x.sub_(_row_max(x))
    torch.exp(x, out=p)
    z = p.sum(-1, keepdim=True)
    empty = z == 0
    p.div_(torch.where(empty, torch.ones_like(z), z))
    return torch.where(empty, torch.zeros_like(z), torch.log(z))


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(torch.mm(a, b))


def _ce_rows(lz_a, a_y, mean_a, valid, eps: float):
    """Per-row CE from the clean row's log Z and its label's and mean logits, all centred on the row max
    (0 on rows without a label)."""
    ce = (lz_a - a_y) * (1.0 - eps)
    if eps:
        ce = ce + eps * (lz_a - mean_a)
    return torch.where(valid, ce, torch.zeros_like(ce))


def _add_token_stats(token_stats: torch.Tensor, entropy, hit, valid) -> None:
    """token_stats += [entropy sum, argmax hits, count] over the labelled rows."""
    token_stats += torch.stack([torch.where(valid, entropy, torch.zeros_like(entropy)).sum(),
                                (hit & valid).sum().to(entropy.dtype), valid.sum().to(entropy.dtype)]).to(token_stats)


def _vocab_math(s: _Spec, la: torch.Tensor, x: torch.Tensor, p: torch.Tensor, q: torch.Tensor,
                b_neginf: Optional[torch.Tensor], y, valid, wc_scale, wk, km, grad_p: bool, grad_q: bool,
                token_stats: Optional[torch.Tensor] = None):
    """Everything over the vocabulary for a few rows, in place: ``la`` and ``x`` hold the logits ``a`` and
    ``b`` and come back holding ``dB`` and ``dA`` (when asked for); ``p``, ``q`` are workspace.

    Returns ``(ce, kl)``, per row (``(n, 1)``; ce None without labels, 0 on ignored rows; kl 0 outside
    ``km``). ``wk``: the rows' KL weights (``(n, 1)``, 0 outside ``km``). ``token_stats`` (3,), if given,
    gets the labelled rows' entropy of p, argmax hits and count added (see linear_r3f_loss)."""
    eps, vocab = s.smoothing, s.vocab
    lz_a = _softmax_(la, p)  # a - m_a in la; p
    ce = wc = None
    if y is not None:
        ce = _ce_rows(lz_a, la.gather(1, y), la.sum(-1, keepdim=True) / vocab if eps else None, valid, eps)
        if grad_p and wc_scale is not None:
            wc = torch.where(valid, wc_scale, torch.zeros_like(wc_scale))
        if token_stats is not None:  # H(p) = log Z - sum_j p_j (a_j - m_a); a -inf entry has p_j = 0: term 0
            centred = la if b_neginf is None else la.masked_fill(b_neginf, 0.0)
            entropy = lz_a - torch.linalg.vecdot(p, centred).unsqueeze(-1)
            _add_token_stats(token_stats, entropy, la.argmax(-1, keepdim=True) == y, valid)
    _softmax_(x, q)  # b - m_b in x; q
    d = la.sub_(x)  # d' = (a - m_a) - (b - m_b); x is free from here on
    if b_neginf is not None:
        d.masked_fill_(b_neginf, 0.0)
    kl = torch.sub(p, q, out=x).mul_(d).sum(-1, keepdim=True)  # sum (p - q) d': accurate when p ~ q
    if km is not None:
        kl = torch.where(km, kl, torch.zeros_like(kl))
    if not (grad_p or grad_q):
        return ce, kl
    e_q = torch.mul(q, d, out=x).sum(-1, keepdim=True) if grad_q else None
    if grad_p:  # dA = p (w_kl (d' - E_p + 1) + w_ce) - w_kl q - w_ce t, in x
        e_p = torch.mul(p, d, out=x).sum(-1, keepdim=True)
        c0 = wk * (1.0 - e_p)
        if wc is not None:
            c0 = c0 + wc
        torch.addcmul(c0, d, wk, out=x).mul_(p).addcmul_(q, wk, value=-1.0)
        if wc is not None:
            x.scatter_add_(1, y, wc * -(1.0 - eps))
            if eps:
                x.sub_(wc * (eps / vocab))
    if grad_q:  # dB = w_kl (q (E_q - d' + 1) - p), in d's buffer (la)
        torch.addcmul(wk * (e_q + 1.0), d, wk, value=-1.0, out=d).mul_(q).addcmul_(p, wk, value=-1.0)
    return ce, kl


def _kernel_vocab_math(s: _Spec, la: torch.Tensor, x: torch.Tensor, y, valid, wc_scale, wk, km, grad_p: bool,
                       grad_q: bool, token_stats: Optional[torch.Tensor]):
    """``_vocab_math`` for a whole chunk through the Triton kernels, in place and without workspace: ``la``
    and ``x`` hold the logits and come back holding ``dA`` and ``dB`` (the other way round from
    ``_vocab_math``). Returns ``(ce, kl)`` per row."""
    from .kernels.sym_kl import kl_ce_grads_

    eps = s.smoothing
    ce = a_y = mean_a = None
    if y is not None:  # what the CE needs of the logits, before they are overwritten
        a_y = la.gather(1, y)
        mean_a = la.sum(-1, keepdim=True) / s.vocab if eps else None
        if token_stats is not None:
            for r0 in range(0, la.shape[0], s.sub):  # a few rows at a time: sub x V temporaries
                blk, v = la[r0:r0 + s.sub], valid[r0:r0 + s.sub]
                logp = torch.log_softmax(blk, -1)
                entropy = -(logp.exp() * logp.masked_fill(logp.isneginf(), 0.0)).sum(-1, keepdim=True)
                _add_token_stats(token_stats, entropy, blk.argmax(-1, keepdim=True) == y[r0:r0 + s.sub], v)
    g = ce_args = None
    if grad_p or grad_q:
        g = wk.reshape(-1).to(torch.float32).contiguous()
        if y is not None and grad_p and wc_scale is not None:
            w = torch.where(valid, wc_scale, torch.zeros_like(wc_scale)).reshape(-1).to(torch.float32)
            ce_args = (torch.where(valid, y, torch.full_like(y, -1)).reshape(-1).contiguous(), w.contiguous(), eps)
    kl, stats = kl_ce_grads_(la, x, g, ce_args, need_b=grad_q)
    kl = kl.unsqueeze(-1)
    if km is not None:
        kl = torch.where(km, kl, torch.zeros_like(kl))
    if y is not None:
        m_a, lz_a = stats[0].unsqueeze(-1), stats[2].unsqueeze(-1)
        ce = _ce_rows(lz_a, a_y - m_a, None if mean_a is None else mean_a - m_a, valid, eps)
    return ce, kl


def _run(s: _Spec, hp: torch.Tensor, hq: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
         labels: Optional[torch.Tensor], kmask: Optional[torch.Tensor], wc_scale: Optional[torch.Tensor],
         wk_scale: torch.Tensor, wk_rows: Optional[torch.Tensor], need: tuple[bool, bool, bool, bool],
         kl_rows_out: Optional[torch.Tensor] = None, token_stats: Optional[torch.Tensor] = None):
    """One pass over the chunks of ``hp``, ``hq`` (both ``(N, H)``).

    Returns ``(ce_sum, kl_sum, (dHp, dHq, dW, db))``: the sums of the counted rows' CE and KL values, and
    the gradients of ``sum_rows w_ce * ce + w_kl * kl`` for the inputs flagged in ``need`` (else None),
    where ``w_ce = wc_scale`` on rows whose label counts and ``w_kl = wk_scale (* wk_rows)`` on rows of
    ``kmask``. ``kl_rows_out`` (N,), if given, receives the per-row KL values (0 where masked);
    ``token_stats`` (3,), if given, the labelled rows' entropy sum, argmax hits and count (added).

    The two ``chunk x V`` logits blocks (and one in the GEMM dtype if it differs) are allocated once and
    reused by every chunk; the vocabulary math walks each chunk a few rows at a time (``_vocab_math``) with
    two small ``sub x V`` buffers for p and q. Rows that count in no term are zeroed in the hidden states
    before the GEMMs, so whatever they hold (NaN in padding) reaches neither the values nor the gradients.
    """
    n_rows, hidden = hp.shape
    math, gemm, vocab = s.math, s.gemm, s.vocab
    dev = hp.device
    with_ce = labels is not None
    grad_p = need[0] or need[2] or need[3]
    grad_q = s.q_grad and (need[1] or need[2] or need[3])
    w = weight.to(gemm)
    b = bias.to(math) if bias is not None else None
    # A -inf bias entry (a vocabulary entry masked out) is -inf in both logits: its d' is -inf - -inf = NaN,
    # but its probability is 0 on both sides, so it must contribute 0 (as in symmetric_kl).
    b_neginf = torch.isneginf(b) if b is not None else None
    dhp = torch.empty(n_rows, hidden, dtype=hp.dtype, device=dev) if need[0] else None
    dhq = torch.empty(n_rows, hidden, dtype=hq.dtype, device=dev) if need[1] and s.q_grad else None
    dw = None
    if need[2]:
        dw = torch.zeros(weight.shape, dtype=torch.promote_types(gemm, weight.dtype), device=dev)
    db = torch.zeros(vocab, dtype=math, device=dev) if need[3] else None
    ce_sum = torch.zeros((), dtype=math, device=dev)
    kl_sum = torch.zeros((), dtype=math, device=dev)
    rows_c = min(s.chunk, n_rows)
    sub = max(1, min(rows_c, s.sub))
    if rows_c > 0:
        blocks = [torch.empty(rows_c, vocab, dtype=math, device=dev) for _ in range(2)]
        pq_ws = None if s.kernel else [torch.empty(sub, vocab, dtype=math, device=dev) for _ in range(2)]
        scratch = torch.empty(rows_c, vocab, dtype=gemm, device=dev) if gemm != math else None
    for s0 in range(0, n_rows, s.chunk):
        s1 = min(n_rows, s0 + s.chunk)
        n = s1 - s0
        la, x = (t[:n] for t in blocks)
        sc = scratch[:n] if scratch is not None else None
        hpc, hqc = hp[s0:s1].to(gemm), hq[s0:s1].to(gemm)
        km = kmask[s0:s1, None] if kmask is not None else None
        y = valid = None
        if with_ce:
            y = labels[s0:s1, None]
            valid = y != s.ignore_index
            y = torch.where(valid, y, torch.zeros_like(y))  # a valid label out of range fails in gather
        if km is not None:  # rows outside a term see zero hidden states there: finite, weight 0
            hpc = torch.where(km | valid if with_ce else km, hpc, torch.zeros_like(hpc))
            hqc = torch.where(km, hqc, torch.zeros_like(hqc))
        _gemm_into(la, hpc, w.t(), sc)  # a; after _vocab_math, dB
        _gemm_into(x, hqc, w.t(), sc)  # b; after _vocab_math, dA
        if b is not None:
            la.add_(b)
            x.add_(b)
        wk = wk_scale if wk_rows is None else wk_scale * wk_rows[s0:s1, None].to(math)
        if km is not None:
            wk = torch.where(km, wk, torch.zeros_like(wk))
        wk = wk.expand(n, 1)
        if s.kernel:  # the whole chunk in the Triton kernels
            parts = [(slice(0, n), *_kernel_vocab_math(s, la, x, y, valid, wc_scale, wk, km, grad_p, grad_q,
                                                       token_stats))]
        else:  # a few rows at a time, p and q in the workspace
            parts = ((rs, *_vocab_math(s, la[rs], x[rs], pq_ws[0][: rs.stop - rs.start], pq_ws[1][: rs.stop - rs.start],
                                       b_neginf, None if y is None else y[rs], None if valid is None else valid[rs],
                                       wc_scale, wk[rs], None if km is None else km[rs], grad_p, grad_q, token_stats))
                     for rs in (slice(r0, min(n, r0 + sub)) for r0 in range(0, n, sub)))
        for rs, ce, kl in parts:
            if ce is not None:
                ce_sum += ce.sum()
            kl_sum += kl.sum()
            if kl_rows_out is not None:
                kl_rows_out[s0 + rs.start:s0 + rs.stop] = kl.squeeze(-1)
        if not (grad_p or grad_q):
            continue
        grad_a, grad_b = (la, x) if s.kernel else (x, la)
        for wanted, grad, dh, h, need_h in ((grad_p, grad_a, dhp, hpc, need[0]), (grad_q, grad_b, dhq, hqc, need[1])):
            if not wanted:
                continue
            g = grad if sc is None else sc.copy_(grad)  # in the GEMM dtype
            if need_h:
                _gemm_into(dh[s0:s1], g, w, None)
            if need[2]:
                _accumulate(dw, g.t(), h)
            if need[3]:
                db.add_(grad.sum(0))
    if dw is not None:
        dw = dw.to(weight.dtype)
    if db is not None:
        db = db.to(bias.dtype)
    return ce_sum, kl_sum, (dhp, dhq, dw, db)


def _scaled(grads, g: torch.Tensor):
    return tuple(None if t is None else t * g.to(t.dtype) for t in grads)


class _LinearR3F(torch.autograd.Function):
    """(total, ce, kl) = (ce + lam * kl, ce, kl), gradients of ``total`` computed in the forward.

    The backward scales the saved gradients by the upstream gradient of ``total``. If ``ce`` or ``kl`` is
    itself backpropagated (e.g. ``(ce + 2 * kl).backward()``), it recomputes chunk by chunk with the
    combined per-term weights instead (correct, and about 1.7x the cost). So it does whenever float16 is
    involved (GEMMs, hidden states or weight): the upstream gradient carries a GradScaler's loss scale, and
    per-row gradients of size p / rows rounded to float16 before it is applied would underflow to 0.
    """

    @staticmethod
    def forward(ctx, hp, hq, weight, bias, labels, kmask, spec, lam, ce_scale, kl_scale, need, token_stats=None):
        ctx.set_materialize_grads(False)
        ctx.defer = torch.float16 in (spec.gemm, hp.dtype, hq.dtype, weight.dtype)
        with torch.autocast(spec.device_type, enabled=False):
            ce_sum, kl_sum, grads = _run(spec, hp, hq, weight, bias, labels, kmask, ce_scale, kl_scale * lam,
                                         None, (False,) * 4 if ctx.defer else need, token_stats=token_stats)
        ce = ce_sum * ce_scale if labels is not None else ce_sum
        kl = kl_sum * kl_scale
        total = ce + lam * kl
        ctx.spec, ctx.lam, ctx.need = spec, lam, need
        ctx.save_for_backward(hp, hq, weight, bias, labels, kmask, ce_scale, kl_scale, *grads)
        return total, ce, kl

    @staticmethod
    @differentiable_once
    def backward(ctx, g_total, g_ce, g_kl):
        hp, hq, weight, bias, labels, kmask, ce_scale, kl_scale, *grads = ctx.saved_tensors
        none = (None,) * 8
        if g_ce is None and g_kl is None and g_total is None:
            return (None,) * 4 + none
        if g_ce is None and g_kl is None and not ctx.defer:
            return (*_scaled(grads, g_total), *none)
        zero = kl_scale.new_zeros(())
        g_total = zero if g_total is None else g_total.to(zero.dtype)
        g_ce = zero if g_ce is None else g_ce.to(zero.dtype)
        g_kl = zero if g_kl is None else g_kl.to(zero.dtype)
        with torch.autocast(ctx.spec.device_type, enabled=False):
            _, _, grads = _run(ctx.spec, hp, hq, weight, bias, labels, kmask,
                               ce_scale * (g_total + g_ce) if labels is not None else None,
                               kl_scale * (ctx.lam * g_total + g_kl), None, ctx.need)
        return (*grads, *none)


class _LinearSymKLRows(torch.autograd.Function):
    """Per-row KL_S (reduction "none"): values in the forward, gradients recomputed chunk by chunk in the
    backward with the per-row upstream gradient folded into the row weights (nothing rows x V saved)."""

    @staticmethod
    def forward(ctx, hp, hq, weight, bias, kmask, spec, need):
        rows = torch.zeros(hp.shape[0], dtype=spec.math, device=hp.device)
        with torch.autocast(spec.device_type, enabled=False):
            _run(spec, hp, hq, weight, bias, None, kmask, None, rows.new_ones(()), None, (False,) * 4, rows)
        ctx.spec, ctx.need = spec, need
        ctx.save_for_backward(hp, hq, weight, bias, kmask)
        return rows

    @staticmethod
    @differentiable_once
    def backward(ctx, g_rows):
        hp, hq, weight, bias, kmask = ctx.saved_tensors
        with torch.autocast(ctx.spec.device_type, enabled=False):
            _, _, grads = _run(ctx.spec, hp, hq, weight, bias, None, kmask, None, g_rows.new_ones(()).to(ctx.spec.math),
                               g_rows, ctx.need)
        return (*grads, None, None, None)


# ---------------------------------------------------------------------------------------------- checks
def _check_head(hidden_p, hidden_q, weight, bias):
    for name, t in (("hidden_p", hidden_p), ("hidden_q", hidden_q), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if hidden_p.shape != hidden_q.shape:
        raise ValueError(f"the two passes' hidden states must have one shape, got {tuple(hidden_p.shape)} and "
                         f"{tuple(hidden_q.shape)}")
    if hidden_p.dim() == 0:
        raise ValueError("hidden states must have at least one dimension (the hidden size)")
    if weight.dim() != 2:
        raise ValueError(f"weight must be the head's (V, H) matrix, got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden_p.shape[-1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)} (V, H) but the hidden states have H = "
                         f"{hidden_p.shape[-1]} (shape {tuple(hidden_p.shape)})")
    if weight.shape[0] == 0:
        raise ValueError(f"weight of shape {tuple(weight.shape)} has V = 0 classes: a softmax over no classes "
                         "is undefined")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise TypeError(f"bias must be a floating-point tensor or None, got {getattr(bias, 'dtype', type(bias))}")
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    devices = {t.device for t in (hidden_p, hidden_q, weight, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"hidden states, weight and bias must be on one device, got {sorted(map(str, devices))}")


def _check_mask(mask, lead, device):
    if mask is None:
        return None
    mask = _bool_mask(mask)  # integer masks: values checked (one device sync); bool masks: none
    if mask.shape != lead:
        raise ValueError(f"mask must have the hidden states' shape without the last dimension, {tuple(lead)}, "
                         f"got {tuple(mask.shape)}")
    return mask.to(device).reshape(-1)


def _check_chunk(chunk_size, rows=None, vocab=None, device=None, math=None, gemm=None) -> Optional[int]:
    """``chunk_size`` checked; None becomes the default for the call's shape (when given)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (rows per chunk) or None, got {chunk_size!r}")
    if chunk_size is None and rows is not None:
        return default_chunk_size(rows, vocab, device, math, gemm)
    return chunk_size


def _check_options(lam: Any, label_smoothing: Any, shift_labels: Any, noisy_grad: Any) -> tuple[float, float]:
    for name, flag in (("shift_labels", shift_labels), ("noisy_grad", noisy_grad)):
        check_flag(name, flag)
    if isinstance(lam, torch.Tensor) and lam.numel() == 1 and lam.is_floating_point():
        lam = lam.item()  # as float(lam) took it before: one sync
    return check_number("lam", lam), check_number("label_smoothing", label_smoothing, at_most=1.0)


def _describe(t: Any) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{t.dtype} of shape {tuple(t.shape)} on {t.device}" + (" requiring grad" if t.requires_grad else "")


def _need(*tensors) -> tuple[bool, ...]:
    on = torch.is_grad_enabled()
    return tuple(bool(on and t is not None and t.requires_grad) for t in tensors)


# ------------------------------------------------------------------------------------------- public API
def linear_symmetric_kl(
    hidden_p: torch.Tensor,
    hidden_q: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    reduction: str = "batchmean",
    *,
    chunk_size: Optional[int] = None,
    q_grad: bool = True,
) -> torch.Tensor:
    r"""``symmetric_kl(hidden_p @ weight.T + bias, hidden_q @ weight.T + bias, mask, reduction)``, chunked.

    The same value and gradients (to both hidden states, to ``weight`` and ``bias``) as the materialised
    expression, without ever holding ``rows x V`` logits: rows are processed ``chunk_size`` at a time.
    Inputs that do not require grad get no gradient computation (a frozen head costs no ``dW`` GEMM).

    Args:
        hidden_p, hidden_q: hidden states of shape ``(*, H)`` (any leading shape; a 1-D tensor is one row),
            float32, bfloat16, float16 or float64.
        weight: the head's weight, ``(V, H)`` (as ``nn.Linear.weight``; tied embeddings work: the gradient
            adds to the table's).
        bias: optional ``(V,)``.
        mask: optional bool tensor of shape ``hidden_p.shape[:-1]`` (or 0/1 integers, checked at the cost
            of a device sync); rows where it is False count 0 and get zero gradient.
        reduction: as :func:`~r3f_opt.symmetric_kl`: ``"batchmean"`` (sum / ``hidden_p.shape[0]``), ``"sum"``,
            ``"mean"`` (sum / number of counted rows) or ``"none"`` (shape ``hidden_p.shape[:-1]``).
        chunk_size: rows per chunk (default: :func:`default_chunk_size`, from a memory budget).
        q_grad: if False, ``hidden_q``'s logits are treated as constants (``symmetric_kl(A, B.detach())``):
            no gradient reaches ``hidden_q``, and ``weight``/``bias`` get only the ``p`` side's.

    Returns:
        The KL in float32 (float64 if an input is float64); per row for ``"none"``.

    ``"none"`` computes the values in the forward and recomputes each chunk's logits in the backward (its
    upstream gradient is per row); the scalar reductions compute the gradients in the forward.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_flag("q_grad", q_grad)
    _check_head(hidden_p, hidden_q, weight, bias)
    lead = hidden_p.shape[:-1]
    device = weight.device
    gemm, math = _dtypes(device, hidden_p, hidden_q, weight, bias)
    hp, hq = hidden_p.reshape(-1, hidden_p.shape[-1]), hidden_q.reshape(-1, hidden_q.shape[-1])
    kmask = _check_mask(mask, lead, device)
    vocab, rows = weight.shape[0], hp.shape[0]
    spec = _Spec(vocab, _check_chunk(chunk_size, rows, vocab, device, math, gemm), gemm, math, -100, 0.0,
                 bool(q_grad), device.type, _sub_rows(vocab, device, math), _kernel(math, hidden_p, weight))
    need = _need(hp, hq, weight, bias)
    if reduction == "none":
        return _LinearSymKLRows.apply(hp, hq, weight, bias, kmask, spec, need).reshape(lead)
    if reduction == "sum":
        scale = torch.ones((), dtype=math, device=device)
    elif reduction == "batchmean":
        scale = torch.full((), 1.0 / max(lead[0] if len(lead) > 0 else 1, 1), dtype=math, device=device)
    else:
        counted = kmask.sum() if kmask is not None else torch.full((), rows, device=device)
        scale = 1.0 / counted.clamp(min=1).to(math)
    total, _, _ = _LinearR3F.apply(hp, hq, weight, bias, None, kmask, spec, 1.0, scale.new_zeros(()), scale, need)
    return total


def linear_r3f_loss(
    hidden_clean: torch.Tensor,
    hidden_noisy: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    lam: float = 1.0,
    mask: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    shift_labels: bool = False,
    reduction: str = "batchmean",
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
    noisy_grad: bool = True,
    chunk_size: Optional[int] = None,
    token_stats: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""R3F's objective from the hidden states before the head: ``(total, ce, kl)``, never holding the logits.

    ``ce`` is the clean pass's cross-entropy as ``F.cross_entropy(A, labels, ignore_index=...,
    label_smoothing=...)`` (mean over the rows whose label counts), ``kl`` is
    ``symmetric_kl(A, B, mask, reduction)`` and ``total = ce + lam * kl``, with ``A``, ``B`` the clean and
    noisy logits ``hidden @ weight.T + bias``. One pass over chunks of rows computes the clean logits
    once for both terms, and all gradients. Backpropagate ``total``: its gradients are computed in the
    forward and only scaled in the backward (backpropagating ``ce`` or ``kl`` themselves works too, but
    recomputes the chunks).

    Args:
        hidden_clean, hidden_noisy: the two passes' final hidden states (input of the LM head), ``(*, H)``.
        weight, bias: the head, ``(V, H)`` and optional ``(V,)``.
        labels: integer targets of shape ``hidden_clean.shape[:-1]``; ``ignore_index`` marks rows without one.
        lam: weight of the KL term.
        mask: rows (positions of the hidden states, not shifted) counted in the KL; bool (or 0/1 integers).
            Default: the rows whose (shifted) label counts, ``labels != ignore_index`` -- padding, prompt
            tokens under completion-only loss and the boundaries of packed sequences drop out of both terms.
        ignore_index, label_smoothing: as ``F.cross_entropy``.
        shift_labels: causal-LM shift (as Hugging Face's causal-LM loss): the row at position ``t`` predicts
            ``labels[..., t + 1]``; the last position of each sequence has no target.
        reduction: of the KL term: ``"batchmean"``, ``"sum"`` or ``"mean"`` (``"none"`` is refused: a per-row
            KL cannot be added to a scalar CE; use :func:`linear_symmetric_kl`).
        num_items_in_batch: if given, ``ce = sum / num_items_in_batch`` (Hugging Face's normaliser for
            gradient accumulation) instead of the mean over this batch's counted rows.
        noisy_grad: if False, the noisy logits are constants (as ``RegularizedOptimizer(noisy_grad=False)``):
            run the noisy pass under ``torch.no_grad()``; the head gets only the clean side's KL gradient.
        chunk_size: rows per chunk (default: :func:`default_chunk_size`).
        token_stats: optional float32 tensor of shape ``(3,)`` on the head's device, for the training metrics
            a logits path would compute from the clean logits: the forward adds to it ``[sum of the entropy of
            softmax(A) over the rows whose label counts, how many of those rows have argmax A == label, how
            many rows count]`` (TRL's ``entropy`` and ``mean_token_accuracy`` are the first two over the third).
            No host sync; it costs two more reads of each chunk's clean probabilities.

    With no counted label, ``ce`` is 0 (``F.cross_entropy`` would give NaN) and its gradient is 0.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if reduction == "none":
        raise ValueError("reduction='none' is not supported by linear_r3f_loss (a per-row KL cannot be added to "
                         "the scalar cross-entropy); use linear_symmetric_kl(..., reduction='none')")
    _check_head(hidden_clean, hidden_noisy, weight, bias)
    lam, label_smoothing = _check_options(lam, label_smoothing, shift_labels, noisy_grad)
    if num_items_in_batch is not None and not isinstance(num_items_in_batch, torch.Tensor):
        check_number("num_items_in_batch", num_items_in_batch, positive=True)  # a tensor: not read (no sync)
    lead = hidden_clean.shape[:-1]
    device = weight.device
    if not isinstance(labels, torch.Tensor) or labels.dtype in (torch.bool,) or labels.is_floating_point() \
            or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.shape != lead:
        raise ValueError(f"labels must have the hidden states' shape without the last dimension, {tuple(lead)}, "
                         f"got {tuple(labels.shape)}")
    labels = labels.to(device=device, dtype=torch.long)
    if shift_labels:
        if labels.dim() == 0:
            raise ValueError("shift_labels=True needs a sequence dimension (labels of shape (..., T))")
        labels = torch.cat([labels[..., 1:], labels.new_full((*labels.shape[:-1], 1), ignore_index)], dim=-1)
    labels = labels.reshape(-1)
    kmask = _check_mask(mask, lead, device)
    if kmask is None:
        kmask = labels != ignore_index
    gemm, math = _dtypes(device, hidden_clean, hidden_noisy, weight, bias)
    hp, hq = hidden_clean.reshape(-1, hidden_clean.shape[-1]), hidden_noisy.reshape(-1, hidden_noisy.shape[-1])
    vocab, rows = weight.shape[0], hp.shape[0]
    spec = _Spec(vocab, _check_chunk(chunk_size, rows, vocab, device, math, gemm), gemm, math, int(ignore_index),
                 label_smoothing, bool(noisy_grad), device.type, _sub_rows(vocab, device, math),
                 _kernel(math, hidden_clean, weight))
    if num_items_in_batch is None:
        ce_scale = 1.0 / (labels != ignore_index).sum().clamp(min=1).to(math)
    else:
        # a tensor 0 (no label in any micro-batch: the sum is 0 too) gives ce 0, as with no counted label here
        n_items = torch.as_tensor(num_items_in_batch, device=device).to(math)
        ce_scale = torch.where(n_items > 0, 1.0 / n_items, torch.zeros_like(n_items))
    if reduction == "sum":
        kl_scale = torch.ones((), dtype=math, device=device)
    elif reduction == "batchmean":
        kl_scale = torch.full((), 1.0 / max(lead[0] if len(lead) > 0 else 1, 1), dtype=math, device=device)
    else:
        kl_scale = 1.0 / kmask.sum().clamp(min=1).to(math)
    if token_stats is not None and (not isinstance(token_stats, torch.Tensor) or token_stats.shape != (3,)
                                    or token_stats.dtype != torch.float32 or token_stats.device != device
                                    or token_stats.requires_grad):
        raise ValueError(f"token_stats must be a float32 tensor of shape (3,) on {device} that does not require "
                         f"grad, e.g. torch.zeros(3, device=weight.device); got {_describe(token_stats)}")
    need = _need(hp, hq, weight, bias)
    return _LinearR3F.apply(hp, hq, weight, bias, labels, kmask, spec, lam, ce_scale, kl_scale, need, token_stats)


class LinearSymmetricKL(nn.Module):
    """Module form of :func:`linear_symmetric_kl`: ``LinearSymmetricKL(reduction)(h_p, h_q, weight, bias, mask)``."""

    def __init__(self, reduction: str = "batchmean", *, chunk_size: Optional[int] = None, q_grad: bool = True):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        _check_chunk(chunk_size)
        self.reduction, self.chunk_size, self.q_grad = reduction, chunk_size, check_flag("q_grad", q_grad)

    def forward(self, hidden_p, hidden_q, weight, bias=None, mask=None):
        return linear_symmetric_kl(hidden_p, hidden_q, weight, bias, mask, self.reduction,
                                   chunk_size=self.chunk_size, q_grad=self.q_grad)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, chunk_size={self.chunk_size}, q_grad={self.q_grad}"


class LinearR3FLoss(nn.Module):
    """Module form of :func:`linear_r3f_loss`; its keyword options are fixed at construction.

    ``LinearR3FLoss(lam=1.0, shift_labels=True)(h_clean, h_noisy, lm_head.weight, labels)`` returns
    ``(total, ce, kl)``.
    """

    def __init__(self, lam: float = 1.0, *, ignore_index: int = -100, label_smoothing: float = 0.0,
                 shift_labels: bool = False, reduction: str = "batchmean", noisy_grad: bool = True,
                 chunk_size: Optional[int] = None):
        super().__init__()
        if reduction not in REDUCTIONS[:-1]:
            raise ValueError(f"reduction must be one of {REDUCTIONS[:-1]} (a per-row KL cannot be added to the "
                             f"scalar cross-entropy), got {reduction!r}")
        lam, label_smoothing = _check_options(lam, label_smoothing, shift_labels, noisy_grad)
        _check_chunk(chunk_size)
        self.options = dict(lam=lam, ignore_index=ignore_index, label_smoothing=label_smoothing,
                            shift_labels=shift_labels, reduction=reduction, noisy_grad=noisy_grad,
                            chunk_size=chunk_size)

    def forward(self, hidden_clean, hidden_noisy, weight, labels, bias=None, mask=None, num_items_in_batch=None):
        return linear_r3f_loss(hidden_clean, hidden_noisy, weight, labels, bias, mask=mask,
                               num_items_in_batch=num_items_in_batch, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
