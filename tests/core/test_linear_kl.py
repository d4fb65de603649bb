"""linear_symmetric_kl / linear_r3f_loss (the fused linear head + CE + symmetric KL) against a float64
reference that materialises the logits: F.linear, then the kl_div formula of kl_reference.py (independent
of symmetric_kl) or F.cross_entropy, differentiated by autograd."""
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import TOLERANCES, tol
from kl_reference import reference
from torch.utils._python_dispatch import TorchDispatchMode

import r3f_opt.linear_kl as lk
from r3f_opt import LinearR3FLoss, LinearSymmetricKL, linear_r3f_loss, linear_symmetric_kl, symmetric_kl
from r3f_opt.noise import EmbeddingNoise

REDUCTIONS = ["batchmean", "sum", "mean", "none"]


# ------------------------------------------------------------------------------------------------ helpers
def inputs(lead, hidden, vocab, dtype=torch.float32, bias=True, seed=0, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    hp = torch.randn(*lead, hidden, generator=g)
    hq = hp + spread * torch.randn(*lead, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) / hidden ** 0.5 * 2
    b = torch.randn(vocab, generator=g) if bias else None
    return [t.to(dtype) if t is not None else None for t in (hp, hq, w, b)]


def leaves(*ts, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in ts]


def ref_kl(hp, hq, w, b, mask=None, reduction="batchmean"):
    return reference(F.linear(hp, w, b), F.linear(hq, w, b), None if mask is None else mask.bool(), reduction)


def grad_tol(dtype, want):
    """Tolerance for a gradient returned in ``dtype``: the dtype's table entry, with atol scaled to the
    gradient's size for 16-bit dtypes (their rounding is relative to the largest terms summed)."""
    t = dict(TOLERANCES[dtype])
    if dtype in (torch.float16, torch.bfloat16):
        t["atol"] = max(t["atol"], 2 * t["rtol"] * float(want.abs().max()))
    return t


def check_kl(hp, hq, w, b, mask=None, reduction="batchmean", chunk_size=None, value_tol=None, grad_tolerance=None):
    """Value and every gradient of linear_symmetric_kl vs the float64 reference through autograd."""
    got_in = leaves(hp, hq, w, b)
    want_in = leaves(hp, hq, w, b, dtype=torch.float64)
    got = linear_symmetric_kl(*got_in, mask=mask, reduction=reduction, chunk_size=chunk_size)
    want = ref_kl(*want_in, mask=mask, reduction=reduction)
    dtypes = [t.dtype for t in (hp, hq, w, b) if t is not None]
    assert got.dtype == (torch.float64 if torch.float64 in dtypes else torch.float32)
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, **(value_tol or tol(*dtypes)))
    up = torch.randn(want.shape, dtype=torch.float64)
    (got * up.to(got.dtype)).sum().backward()
    (want * up).sum().backward()
    for x, r in zip(got_in, want_in):
        if x is None:
            continue
        assert x.grad is not None and x.grad.dtype == x.dtype
        torch.testing.assert_close(x.grad.double(), r.grad, **(grad_tolerance or grad_tol(x.dtype, r.grad)))
    return got


class CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched inside the block (GEMMs, host syncs)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    def count(self, *names):
        return sum(op in names for op in self.ops)


GEMMS = ("mm", "addmm", "addmm_", "matmul", "bmm", "baddbmm")


# -------------------------------------------------------------------------------------- linear_symmetric_kl
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("vocab", [1, 3, 1000])
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_matches_materialised_float64(reduction, vocab, chunk_size):
    hp, hq, w, b = inputs((3, 5), 6, vocab, torch.float64)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    check_kl(hp, hq, w, b, mask, reduction, chunk_size)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_materialised_float32(reduction, bias):
    hp, hq, w, b = inputs((2, 9), 8, 257, bias=bias)
    check_kl(hp, hq, w, b, None, reduction, chunk_size=7)


def test_double_backward_raises():
    """Both functions' backwards are closed forms: a gradient that would be differentiated again (a gradient
    penalty) raises instead of silently dropping its second-order term."""
    hp, hq, w, b = (t.requires_grad_() for t in inputs((3, 5), 8, 50, torch.float64))
    with pytest.raises(RuntimeError, match="differentiable once: a double backward"):
        torch.autograd.grad(linear_symmetric_kl(hp, hq, w, b), hp, create_graph=True)
    labels = torch.randint(0, 50, (3, 5))
    with pytest.raises(RuntimeError, match="differentiable once: a double backward"):
        torch.autograd.grad(linear_r3f_loss(hp, hq, w, labels, bias=b)[0], w, create_graph=True)  # total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fresh_buffers_are_written_before_they_are_read(poisoned_allocations, dtype):
    """Every chunk buffer, workspace and gradient the path allocates starts as NaN (masked rows included):
    the values and gradients still equal the materialised float64 path."""
    hp, hq, w, b = inputs((3, 5), 8, 257, dtype)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    check_kl(hp, hq, w, b, mask, "batchmean", chunk_size=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_odd_vocab(dtype):
    hp, hq, w, b = inputs((3,), 5, 32003, dtype)
    # float32: dH = dA W sums 32003 products (in the materialised path's GEMM too): ~1e-5 relative
    t = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else None
    check_kl(hp, hq, w, b, reduction="sum", chunk_size=2, value_tol=t, grad_tolerance=t)


def test_one_row_and_no_rows():
    hp, hq, w, b = inputs((), 4, 11, torch.float64)  # 1-D: one row
    check_kl(hp, hq, w, b, reduction="batchmean")
    check_kl(hp, hq, w, b, reduction="none")
    hp, hq, w, b = leaves(*inputs((0,), 4, 11, torch.float64))
    for reduction in ["batchmean", "sum", "mean"]:
        out = linear_symmetric_kl(hp, hq, w, b, reduction=reduction)
        assert out.item() == 0.0
    assert linear_symmetric_kl(hp, hq, w, b, reduction="none").shape == (0,)
    out.backward()
    assert torch.count_nonzero(w.grad) == 0 and hp.grad.shape == (0, 4)


def test_no_label_in_any_micro_batch_gives_a_zero_cross_entropy():
    """num_items_in_batch as a tensor 0 (the Trainer's count when no micro-batch has a label): ce 0, not 0/0."""
    hp, hq, w, b = leaves(*inputs((2, 5), 4, 11, torch.float64))
    labels = torch.full((2, 5), -100)
    total, ce, kl = linear_r3f_loss(hp, hq, w, labels, b, num_items_in_batch=torch.tensor(0))
    assert ce.item() == 0 and torch.isfinite(total) and total.item() == pytest.approx(kl.item())
    total.backward()
    assert all(torch.isfinite(t.grad).all() for t in (hp, hq, w, b))


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_masks_all_none_partial_and_integer(reduction):
    hp, hq, w, b = inputs((4, 3), 5, 13, torch.float64)
    for mask in (torch.ones(4, 3, dtype=torch.bool), torch.zeros(4, 3, dtype=torch.bool),
                 torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]])):
        check_kl(hp, hq, w, b, mask, reduction, chunk_size=5)
    x = leaves(hp, hq, w, b)
    out = linear_symmetric_kl(*x, mask=torch.zeros(4, 3, dtype=torch.bool), reduction=reduction)
    assert torch.count_nonzero(out) == 0
    out.sum().backward()
    assert all(torch.count_nonzero(t.grad) == 0 for t in x)


def test_masked_rows_may_hold_nan():
    hp, hq, w, b = inputs((6,), 4, 9, torch.float64)
    mask = torch.tensor([True, False, True, True, False, True])
    hp[1] = float("nan")
    hq[4] = float("inf")
    x = leaves(hp, hq, w, b)
    out = linear_symmetric_kl(*x, mask=mask, chunk_size=4)
    out.backward()
    assert torch.isfinite(out) and all(torch.isfinite(t.grad).all() for t in x)
    clean = torch.stack([hp[i] if mask[i] else hp[0] for i in range(6)])
    clean_q = torch.stack([hq[i] if mask[i] else hq[0] for i in range(6)])
    check_kl(clean, clean_q, w, b, mask, "batchmean")  # same value as with finite junk in the masked rows
    torch.testing.assert_close(out, linear_symmetric_kl(clean, clean_q, w, b, mask=mask))


def test_nan_in_a_counted_row_is_nan():
    hp, hq, w, b = inputs((3,), 4, 9)
    hq[1, 2] = float("nan")
    x = leaves(hp, hq, w, b)
    out = linear_symmetric_kl(*x, reduction="none")
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
    out.sum().backward()
    assert torch.isnan(x[0].grad[1]).all() and torch.isfinite(x[0].grad[[0, 2]]).all()


def test_neg_inf_bias_entries_contribute_zero():
    hp, hq, w, b = inputs((5,), 4, 12)
    b[[0, 7]] = float("-inf")  # a masked-out vocabulary entry
    x = leaves(hp, hq, w, b)
    y = leaves(hp, hq, w, b)
    got = linear_symmetric_kl(*x, chunk_size=2)
    want = symmetric_kl(F.linear(y[0], y[2], y[3]), F.linear(y[1], y[2], y[3]))
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    for a, c in zip(x[:3], y[:3]):
        assert torch.isfinite(a.grad).all()
        torch.testing.assert_close(a.grad, c.grad)
    torch.testing.assert_close(x[3].grad[1:7], y[3].grad[1:7])  # -inf entries: 0 here, NaN through autograd
    assert x[3].grad[0] == 0 and x[3].grad[7] == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_16bit_inputs(dtype, reduction):
    """16-bit inputs against the float64 reference: the logits are rounded to the input dtype by the GEMM
    (as F.linear's output is), so the errors are those of the materialised path in that dtype."""
    hp, hq, w, b = inputs((4, 6), 16, 300, dtype, spread=1.0)
    fused, mat, ref = leaves(hp, hq, w, b), leaves(hp, hq, w, b), leaves(hp, hq, w, b, dtype=torch.float64)
    up = torch.randn((4, 6) if reduction == "none" else (), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = linear_symmetric_kl(*fused, reduction=reduction, chunk_size=7)
    assert got.dtype == torch.float32
    outs = [got, symmetric_kl(F.linear(mat[0], mat[2], mat[3]), F.linear(mat[1], mat[2], mat[3]), reduction=reduction),
            ref_kl(*ref, reduction=reduction)]
    for out in outs:
        (out * up.to(out.dtype)).sum().backward()

    def err(a, r):  # max error relative to the largest reference entry
        return float((a.double() - r).abs().max() / r.abs().max())

    rt = TOLERANCES[dtype]["rtol"]
    pairs = [(outs[0].detach(), outs[1].detach(), outs[2].detach())]
    pairs += [(f.grad, m.grad, r.grad) for f, m, r in zip(fused, mat, ref)]
    # Bounds with a margin over 60 random draws of inputs and upstream gradients (worst seen: f <= 2.3 m + rt,
    # f <= 2.8 rt): the two paths round differently, so one may be the worse on a given draw.
    for f, m, r in pairs:
        assert f.dtype in (torch.float32, dtype)
        assert err(f, r) <= 3 * err(m, r) + rt, (err(f, r), err(m, r))  # no worse than materialising
        assert err(f, r) <= 4 * rt


@pytest.mark.parametrize("autocast", [False, True])
def test_fp16_with_a_loss_scale_keeps_small_gradients(autocast):
    """fp16 with a GradScaler: the loss scale reaches the backward, so per-row gradients (p - q) / rows, far
    below fp16's smallest number when the passes are close, must be scaled before they are rounded to fp16
    (the materialised path's logits gradients are). Errors against float64, as a fraction of the reference."""
    g = torch.Generator().manual_seed(0)
    n, h, v, scale = 512, 16, 1024, 2.0 ** 16
    hp = torch.randn(n, h, generator=g)
    hq, w = hp + 1e-3 * torch.randn(n, h, generator=g), 0.05 * torch.randn(v, h, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    ref = [t.double().requires_grad_() for t in (hp, hq, w)]
    logits = [F.linear(x, ref[2]) for x in ref[:2]]
    (F.cross_entropy(logits[0], labels) + symmetric_kl(*logits)).backward()
    errors = {}
    for path in ("fused", "materialised"):
        x = [t.clone().requires_grad_() for t in (hp, hq, w)] if autocast else \
            [t.half().requires_grad_() for t in (hp, hq, w)]
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            if path == "fused":
                total = linear_r3f_loss(x[0], x[1], x[2], labels)[0]
            else:
                a, b = F.linear(x[0], x[2]), F.linear(x[1], x[2])
                total = F.cross_entropy(a.float(), labels) + symmetric_kl(a, b)
        (total * scale).backward()
        errors[path] = [float((t.grad.double() / scale - r.grad).norm() / r.grad.norm()) for t, r in zip(x, ref)]
    for f, m in zip(errors["fused"], errors["materialised"]):  # unscaled, the noisy side's gradient was all 0
        assert f <= 2 * m + 1e-3, errors


def test_mixed_dtypes_gradients_in_each_inputs_dtype():
    hp, hq, w, b = inputs((3, 4), 8, 50)
    x = [hp.bfloat16().requires_grad_(), hq.requires_grad_(), w.requires_grad_(), b.double().requires_grad_()]
    out = linear_symmetric_kl(*x)
    assert out.dtype == torch.float64  # a float64 input: everything in float64
    out.backward()
    assert [t.grad.dtype for t in x] == [torch.bfloat16, torch.float32, torch.float32, torch.float64]
    x = leaves(hp.bfloat16(), hq.bfloat16(), w, None)  # 16-bit hidden states, float32 head
    check_kl(*x, reduction="sum")


def test_autocast_runs_the_gemms_in_its_dtype():
    hp, hq, w, b = leaves(*inputs((2, 5), 8, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16), CountOps() as ops:
        got = linear_symmetric_kl(hp, hq, w, b)
    assert got.dtype == torch.float32
    got.backward()
    assert w.grad.dtype == torch.float32 and hp.grad.dtype == torch.float32
    # Same rounding as the materialised path under autocast (F.linear in bf16, symmetric_kl in float32).
    y = leaves(hp, hq, w, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = symmetric_kl(F.linear(y[0], y[2], y[3]), F.linear(y[1], y[2], y[3]))
    want.backward()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    for a, c in zip((hp, hq, w, b), y):
        torch.testing.assert_close(a.grad, c.grad, **grad_tol(torch.bfloat16, c.grad))
    assert ops.count(*GEMMS) > 0


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_q_grad_false_treats_the_noisy_logits_as_constants(reduction):
    hp, hq, w, b = inputs((3, 4), 6, 21, torch.float64)
    x = leaves(hp, hq, w, b)
    y = leaves(hp, hq, w, b)
    got = linear_symmetric_kl(*x, reduction=reduction, q_grad=False, chunk_size=5)
    want = symmetric_kl(F.linear(y[0], y[2], y[3]), F.linear(y[1], y[2], y[3]).detach(), reduction=reduction)
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])
    got.sum().backward()
    want.sum().backward()
    assert x[1].grad is None
    for a, c in zip((x[0], x[2], x[3]), (y[0], y[2], y[3])):
        torch.testing.assert_close(a.grad, c.grad, **TOLERANCES[torch.float64])


def test_frozen_head_gets_no_gradient_and_costs_no_weight_gemm():
    rows, chunk = 10, 4  # 3 chunks
    hp, hq, w, b = inputs((rows,), 6, 33)

    def gemms(w_grad, b_grad, **kw):
        x = [hp.clone().requires_grad_(), hq.clone().requires_grad_(), w.clone().requires_grad_(w_grad),
             b.clone().requires_grad_(b_grad)]
        with CountOps() as ops:
            linear_symmetric_kl(*x, chunk_size=chunk, **kw).backward()
        return ops.count(*GEMMS), x

    n_train, _ = gemms(True, True)
    n_frozen, x = gemms(False, False)
    assert x[2].grad is None and x[3].grad is None and x[0].grad is not None and x[1].grad is not None
    assert n_train == 6 * 3 and n_frozen == 4 * 3  # per chunk: 2 logits, 2 dH (+ 2 dW when trained)
    n_nograd, x = gemms(True, True, q_grad=False)
    assert n_nograd == 4 * 3 and x[1].grad is None  # 2 logits, dH_p, dW from the p side


def test_tied_embeddings_gradients_add_up():
    torch.manual_seed(0)
    vocab, hidden = 37, 8
    emb = torch.nn.Embedding(vocab, hidden).double()
    mix = torch.nn.Linear(hidden, hidden).double()
    ids = torch.randint(0, vocab, (3, 5))
    mask = torch.rand(3, 5) > 0.3

    def run(fused):
        emb.zero_grad(), mix.zero_grad()
        x = emb(ids)
        hp = torch.tanh(mix(x))
        hq = torch.tanh(mix(x + 0.1 * torch.sin(x)))
        if fused:
            kl = linear_symmetric_kl(hp, hq, emb.weight, mask=mask, chunk_size=4)
        else:
            kl = symmetric_kl(hp @ emb.weight.T, hq @ emb.weight.T, mask=mask)
        kl.backward()
        return kl.detach(), emb.weight.grad.clone(), mix.weight.grad.clone()

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])


def test_no_host_sync_in_the_step():
    hp, hq, w, b = leaves(*inputs((2, 6), 5, 17))
    labels = torch.randint(0, 17, (2, 6))
    labels[0, :3] = -100
    for reduction in ["batchmean", "mean"]:
        with CountOps() as ops:
            total, _, _ = linear_r3f_loss(hp, hq, w, labels, b, shift_labels=True, reduction=reduction, chunk_size=4)
            total.backward()
            linear_symmetric_kl(hp, hq, w, b, mask=labels != -100, reduction="none", chunk_size=4).sum().backward()
        assert ops.count("_local_scalar_dense", "item", "is_nonzero") == 0, ops.ops


def test_peak_memory_is_bounded_by_the_chunk_not_the_rows():
    """V = 128,256, tiny hidden: the extra memory of forward + backward is two chunk x V float32 blocks
    (the logits, overwritten by their gradients) plus two few-row p, q buffers (the CPU workspace bound)
    and the dW accumulator, at 16 rows as at 128."""
    from bench.common import peak_extra_bytes

    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    vocab, hidden, chunk = 128256, 4, 8
    w = torch.randn(vocab, hidden, requires_grad=True)
    block = chunk * vocab * 4

    def peak(rows):
        hp, hq = torch.randn(rows, hidden, requires_grad=True), torch.randn(rows, hidden, requires_grad=True)
        labels = torch.randint(0, vocab, (rows,))

        def step():
            total, _, _ = linear_r3f_loss(hp, hq, w, labels, chunk_size=chunk)
            torch.autograd.grad(total, (hp, hq, w))

        return peak_extra_bytes(torch.device("cpu"), step)  # the profiler's memory events, as bench/ measures

    small, large = peak(2 * chunk), peak(16 * chunk)
    dw = vocab * hidden * 4
    work = 2 * lk._sub_rows(vocab, torch.device("cpu"), torch.float32) * vocab * 4
    assert work <= 2 * lk.WORKSPACE_BYTES["cpu"] and work <= block  # p, q: 4 rows each here, the chunk 8
    bound = 2 * block + work + dw + 2**16
    assert small <= bound and large <= bound, (small / block, large / block)
    assert large - small <= 2**16  # rows x H gradients only: nothing rows x V
    assert large < 0.3 * 16 * block  # one float32 logits tensor of the 128 rows is 16 blocks
    assert lk.default_chunk_size(10**6, vocab) * 2 * vocab * 4 <= lk.CHUNK_BUDGET_BYTES["cpu"]


def test_default_chunk_rule():
    assert lk.default_chunk_size(10**6, 128256, "cpu") == 64 * 2**20 // (2 * 128256 * 4) == 65
    assert lk.default_chunk_size(10**6, 128256, "cuda") == 2**30 // (2 * 128256 * 4) == 1046
    assert lk.default_chunk_size(10**6, 128256, "cuda", gemm_dtype=torch.bfloat16) == 2**30 // (10 * 128256) == 837
    assert lk.default_chunk_size(5, 3) == 5 and lk.default_chunk_size(0, 3) == 1
    assert lk.default_chunk_size(10**6, 10**9) == 1
    assert lk.default_chunk_size(100, 1000, math_dtype=torch.float64, budget_bytes=8 * 2 * 1000 * 10) == 10


# ------------------------------------------------------------------------------------------ linear_r3f_loss
def ref_r3f(hp, hq, w, b, labels, *, lam=1.0, mask=None, ignore_index=-100, label_smoothing=0.0,
             shift_labels=False, reduction="batchmean", num_items_in_batch=None, noisy_grad=True):
    a, bq = F.linear(hp, w, b), F.linear(hq, w, b)
    if not noisy_grad:
        bq = bq.detach()
    if shift_labels:
        labels = torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], ignore_index)], -1)
    flat = a.reshape(-1, a.shape[-1])
    if num_items_in_batch is None:
        ce = F.cross_entropy(flat, labels.reshape(-1), ignore_index=ignore_index, label_smoothing=label_smoothing)
    else:
        ce = F.cross_entropy(flat, labels.reshape(-1), ignore_index=ignore_index, label_smoothing=label_smoothing,
                             reduction="sum") / num_items_in_batch
    kl = reference(a, bq, (labels != ignore_index) if mask is None else mask, reduction)
    return ce + lam * kl, ce, kl


def check_r3f(hp, hq, w, b, labels, chunk_size=None, grad_of=lambda t, c, k: t, **kw):
    x = leaves(hp, hq, w, b)
    y = leaves(hp, hq, w, b, dtype=torch.float64)
    got = linear_r3f_loss(*x[:3], labels, x[3], chunk_size=chunk_size, **kw)
    want = ref_r3f(*y[:3], y[3], labels, **kw)
    t = tol(*[t.dtype for t in (hp, hq, w, b) if t is not None])
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, **t)
    grad_of(*got).backward()
    grad_of(*want).backward()
    for a, c in zip(x, y):
        if a is None:
            continue
        if not kw.get("noisy_grad", True) and a is x[1]:
            assert a.grad is None
            continue
        want = c.grad if c.grad is not None else torch.zeros_like(c)  # e.g. the CE alone: none to hq
        torch.testing.assert_close(a.grad.double(), want, **grad_tol(a.dtype, want))
    return got


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("shift_labels", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 100])
def test_r3f_loss_matches_materialised(reduction, shift_labels, chunk_size):
    hp, hq, w, b = inputs((3, 6), 5, 23, torch.float64)
    labels = torch.randint(0, 23, (3, 6), generator=torch.Generator().manual_seed(2))
    labels[0, :2] = -100  # a prompt
    labels[2, -3:] = -100  # padding
    check_r3f(hp, hq, w, b, labels, chunk_size, lam=0.7, shift_labels=shift_labels, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_r3f_loss_label_smoothing_ignore_index_and_bias(dtype):
    hp, hq, w, b = inputs((4, 5), 8, 1000, dtype, spread=1.0)
    labels = torch.randint(0, 1000, (4, 5), generator=torch.Generator().manual_seed(3))
    labels[1] = 7
    labels[:, 0] = -1
    if dtype == torch.float32:
        check_r3f(hp, hq, w, b, labels, 6, lam=2.0, ignore_index=-1, label_smoothing=0.1)
        check_r3f(hp, hq, w, None, labels, 6, label_smoothing=1.0, ignore_index=-1, shift_labels=True)
    else:  # the bf16 logits' rounding (as F.linear's output) moves the values by ~1e-2 relative
        x = leaves(hp, hq, w, b)
        got = linear_r3f_loss(*x[:3], labels, x[3], lam=2.0, ignore_index=-1, label_smoothing=0.1, chunk_size=6)
        want = ref_r3f(*leaves(hp, hq, w, b, dtype=torch.float64)[:3], b.double(), labels, lam=2.0, ignore_index=-1,
                       label_smoothing=0.1)
        for g, r in zip(got, want):
            torch.testing.assert_close(g.double(), r, rtol=5e-2, atol=5e-2)
        got[0].backward()
        assert [t.grad.dtype for t in x] == [dtype] * 4


@pytest.mark.parametrize("sub", [1, 2, 5])
def test_chunks_walked_a_few_rows_at_a_time(monkeypatch, sub):
    """The vocabulary math takes ``sub`` rows of a 7-row chunk at a time (the CPU workspace bound, forced
    small): the same values and gradients, with labels, smoothing, masks, noisy_grad=False."""
    vocab = 23
    monkeypatch.setitem(lk.WORKSPACE_BYTES, "cpu", sub * vocab * 8)  # float64: 8 bytes per entry
    assert lk._sub_rows(vocab, torch.device("cpu"), torch.float64) == sub
    hp, hq, w, b = inputs((3, 6), 5, vocab, torch.float64)
    labels = torch.randint(0, vocab, (3, 6), generator=torch.Generator().manual_seed(8))
    labels[0, :2] = -100
    mask = torch.rand(3, 6, generator=torch.Generator().manual_seed(9)) > 0.4
    check_r3f(hp, hq, w, b, labels, 7, lam=0.7, label_smoothing=0.1, shift_labels=True)
    check_r3f(hp, hq, w, b, labels, 7, mask=mask, noisy_grad=False, reduction="mean")
    for reduction in ("none", "sum"):
        check_kl(hp, hq, w, b, mask, reduction, chunk_size=7)


@pytest.mark.parametrize("sub", [2, None])
def test_token_stats_are_the_logits_metrics(monkeypatch, sub):
    """token_stats gets [entropy sum, argmax hits, count] over the labelled rows, as computed from the
    materialised clean logits (-inf vocabulary entries included); a backward that recomputes adds nothing."""
    vocab = 29
    if sub:
        monkeypatch.setitem(lk.WORKSPACE_BYTES, "cpu", sub * vocab * 4)
    hp, hq, w, b = inputs((3, 7), 6, vocab, spread=0.2)
    b[3] = float("-inf")
    labels = torch.randint(0, vocab, (3, 7), generator=torch.Generator().manual_seed(10))
    labels[labels == 3] = 4
    logits = F.linear(hp, w, b).double()
    labels[:, 1::2] = logits.argmax(-1)[:, :-1:2]  # every other target is the previous row's argmax: hits
    labels[1, 4:] = -100
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    valid = shifted != -100
    logp = torch.log_softmax(logits, -1)
    ent = -(logp.exp() * torch.where(logp.isneginf(), torch.zeros_like(logp), logp)).sum(-1)
    want = torch.tensor([ent[valid].sum(), (logits.argmax(-1) == shifted)[valid].sum(), valid.sum()],
                        dtype=torch.float64)
    stats = torch.zeros(3)
    x = leaves(hp, hq, w, b)
    _, ce, kl = linear_r3f_loss(*x[:3], labels, x[3], shift_labels=True, chunk_size=5, token_stats=stats)
    torch.testing.assert_close(stats.double(), want, rtol=1e-5, atol=1e-5)
    assert 0 < want[1] < want[2]  # some hits, some misses: the count is not trivially right
    (ce - kl).backward()  # recomputes the chunks with the combined weights
    torch.testing.assert_close(stats.double(), want, rtol=1e-5, atol=1e-5)
    for bad in (torch.zeros(3, dtype=torch.float64), torch.zeros(2), [0.0, 0.0, 0.0], torch.zeros(3).requires_grad_()):
        with pytest.raises(ValueError, match="token_stats must be a float32 tensor of shape"):
            linear_r3f_loss(hp, hq, w, labels, b, token_stats=bad)


def test_r3f_loss_backward_through_ce_and_kl_separately():
    hp, hq, w, b = inputs((2, 7), 6, 31, torch.float64)
    labels = torch.randint(0, 31, (2, 7), generator=torch.Generator().manual_seed(4))
    labels[1, 4:] = -100
    for grad_of in (lambda t, c, k: c, lambda t, c, k: k, lambda t, c, k: 3 * c - k + 0.5 * t):
        check_r3f(hp, hq, w, b, labels, 3, grad_of=grad_of, lam=0.3, shift_labels=True)


def test_r3f_loss_options():
    hp, hq, w, b = inputs((2, 6), 4, 19, torch.float64)
    labels = torch.randint(0, 19, (2, 6), generator=torch.Generator().manual_seed(5))
    labels[0, 3:] = -100
    mask = torch.ones(2, 6, dtype=torch.bool)  # every position in the KL, whatever the labels
    check_r3f(hp, hq, w, b, labels, 5, mask=mask, shift_labels=True)
    check_r3f(hp, hq, w, b, labels, 5, num_items_in_batch=torch.tensor(20), shift_labels=True)
    check_r3f(hp, hq, w, b, labels, 5, noisy_grad=False, reduction="mean")
    check_r3f(hp, hq, w, b, labels, 5, lam=0.0)
    x = leaves(hp, hq, w, b)  # no counted label: CE 0 (F.cross_entropy: NaN), KL mask empty by default
    total, ce, kl = linear_r3f_loss(*x[:3], torch.full((2, 6), -100), x[3])
    assert total.item() == ce.item() == kl.item() == 0.0
    total.backward()
    assert all(torch.count_nonzero(t.grad) == 0 for t in x)


def test_r3f_loss_padding_may_hold_nan():
    """Rows without a label (padding) count in neither term: NaN there (as some attention kernels leave in
    padded positions) reaches neither the loss nor any gradient, the head's included."""
    hp, hq, w, b = inputs((2, 6), 4, 19, torch.float64)
    labels = torch.randint(0, 19, (2, 6), generator=torch.Generator().manual_seed(6))
    labels[1, 3:] = -100
    hp[1, 3:] = float("nan")
    hq[1, 3:] = float("nan")
    x = leaves(hp, hq, w, b)
    total, _, _ = linear_r3f_loss(*x[:3], labels, x[3], chunk_size=4)
    total.backward()
    assert torch.isfinite(total) and all(torch.isfinite(t.grad).all() for t in x)
    hp[1, 3:], hq[1, 3:] = 0.0, 0.0
    check_r3f(hp, hq, w, b, labels, 4)
    torch.testing.assert_close(total, linear_r3f_loss(hp, hq, w, labels, b)[0])


def test_r3f_loss_shift_drops_each_sequences_last_position():
    hp, hq, w, b = leaves(*inputs((2, 4), 4, 9, torch.float64))
    labels = torch.randint(0, 9, (2, 4))
    rows = linear_symmetric_kl(hp, hq, w, b, reduction="none")
    _, _, kl = linear_r3f_loss(hp, hq, w, labels, b, shift_labels=True, reduction="sum")
    torch.testing.assert_close(kl, rows[:, :-1].sum())
    _, ce, _ = linear_r3f_loss(hp, hq, w, labels, b, shift_labels=True)
    logits = F.linear(hp, w, b)
    torch.testing.assert_close(ce, F.cross_entropy(logits[:, :-1].reshape(-1, 9), labels[:, 1:].reshape(-1)))


def test_modules_equal_the_functions():
    hp, hq, w, b = inputs((2, 3), 4, 10)
    labels = torch.randint(0, 10, (2, 3))
    m = LinearSymmetricKL("sum", chunk_size=2)
    assert torch.equal(m(hp, hq, w, b), linear_symmetric_kl(hp, hq, w, b, reduction="sum"))
    loss = LinearR3FLoss(0.5, shift_labels=True, label_smoothing=0.1)
    for got, want in zip(loss(hp, hq, w, labels, b),
                         linear_r3f_loss(hp, hq, w, labels, b, lam=0.5, shift_labels=True, label_smoothing=0.1)):
        torch.testing.assert_close(got, want)
    assert "shift_labels=True" in repr(loss) and "reduction='sum'" in repr(m)


def test_errors():
    hp, hq, w, b = inputs((2, 3), 4, 10)
    labels = torch.randint(0, 10, (2, 3))
    with pytest.raises(ValueError, match="reduction"):
        linear_symmetric_kl(hp, hq, w, reduction="avg")
    with pytest.raises(ValueError, match="none"):
        linear_r3f_loss(hp, hq, w, labels, reduction="none")
    with pytest.raises(ValueError, match="one shape"):
        linear_symmetric_kl(hp, hq[:1], w)
    with pytest.raises(ValueError, match="H = 4"):
        linear_symmetric_kl(hp, hq, w[:, :3])
    with pytest.raises(ValueError, match="V = 0"):
        linear_symmetric_kl(hp, hq, w[:0])
    with pytest.raises(ValueError, match="bias"):
        linear_symmetric_kl(hp, hq, w, b[:3])
    with pytest.raises(ValueError, match="chunk_size"):
        linear_symmetric_kl(hp, hq, w, chunk_size=0)
    with pytest.raises(ValueError, match="mask must have"):
        linear_symmetric_kl(hp, hq, w, mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        linear_symmetric_kl(hp, hq, w, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="0 and 1"):
        linear_symmetric_kl(hp, hq, w, mask=labels + 2)
    with pytest.raises(TypeError, match="integer"):
        linear_r3f_loss(hp, hq, w, labels.float())
    with pytest.raises(ValueError, match="labels must have"):
        linear_r3f_loss(hp, hq, w, labels[:, :2])
    with pytest.raises(ValueError, match="lam"):
        linear_r3f_loss(hp, hq, w, labels, lam=float("nan"))
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_r3f_loss(hp, hq, w, labels, label_smoothing=1.5)
    with pytest.raises((IndexError, RuntimeError)):  # a label out of range fails like F.cross_entropy
        linear_r3f_loss(hp, hq, w, labels + 10)
    for kwargs, exc, match in [
        (dict(lam=-1.0), ValueError, "lam must be a finite number >= 0"),
        (dict(lam="2"), TypeError, "lam must be a real number"),
        (dict(lam=True), TypeError, "lam must be a real number"),
        (dict(num_items_in_batch=0), ValueError, "num_items_in_batch must be a finite number > 0"),
        (dict(num_items_in_batch=float("nan")), ValueError, "num_items_in_batch"),
        (dict(shift_labels="no"), TypeError, "shift_labels must be True or False, got 'no'"),
        (dict(noisy_grad=1), TypeError, "noisy_grad must be True or False"),
    ]:
        with pytest.raises(exc, match=match):
            linear_r3f_loss(hp, hq, w, labels, **kwargs)
    with pytest.raises(TypeError, match="q_grad must be True or False"):
        linear_symmetric_kl(hp, hq, w, q_grad="no")
    # the module forms check at construction, not at the first forward
    for make, exc, match in [
        (lambda: LinearSymmetricKL(chunk_size=-1), ValueError, "chunk_size"),
        (lambda: LinearSymmetricKL(q_grad=0), TypeError, "q_grad"),
        (lambda: LinearR3FLoss(reduction="none"), ValueError, "reduction"),
        (lambda: LinearR3FLoss(chunk_size=0), ValueError, "chunk_size"),
        (lambda: LinearR3FLoss(lam=float("nan")), ValueError, "lam"),
        (lambda: LinearR3FLoss(label_smoothing=-0.1), ValueError, "label_smoothing"),
    ]:
        with pytest.raises(exc, match=match):
            make()


# ------------------------------------------------------------------------------------------- tiny Llama
@pytest.mark.parametrize("tied, noisy_grad", [(False, True), (True, True), (True, False)])
def test_tiny_llama_r3f_fused_equals_the_logits_path(tied, noisy_grad):
    """3 AdamW steps of R3F in float64: RegularizedOptimizer on the model's logits vs the fused objective on
    its hidden states and lm_head.weight, the same noise (same seed) on the input embeddings."""
    transformers = pytest.importorskip("transformers")
    from r3f_opt import RegularizedOptimizer

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=tied)
    torch.manual_seed(0)
    model_a = transformers.LlamaForCausalLM(cfg).double().train()
    model_b = transformers.LlamaForCausalLM(cfg).double().train()
    model_b.load_state_dict(model_a.state_dict())
    start = model_a.lm_head.weight.detach().clone()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, 64, (2, 7), generator=g)
        attn = torch.ones(2, 7, dtype=torch.long)
        attn[1, -2:] = 0
        labels = ids.masked_fill(attn == 0, -100)
        labels[0, :2] = -100  # a prompt (completion-only loss)
        batches.append((ids, attn, labels))
    eps, lam, seed = 0.05, 0.8, 123

    opt_a = RegularizedOptimizer(torch.optim.AdamW(model_a.parameters(), lr=1e-2), model_a, lam=lam, eps=eps,
                                 seed=seed, noisy_grad=noisy_grad)
    for ids, attn, labels in batches:
        shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1)

        def closure():
            logits = model_a(input_ids=ids, attention_mask=attn).logits
            return F.cross_entropy(logits.reshape(-1, 64), shifted.reshape(-1)), logits

        opt_a.zero_grad()
        opt_a.step(closure, mask=shifted != -100)

    opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-2)
    noise = EmbeddingNoise(model_b.model.embed_tokens, None, eps, "uniform", True, seed)
    for ids, attn, labels in batches:
        opt_b.zero_grad()
        h_clean = model_b.model(input_ids=ids, attention_mask=attn).last_hidden_state
        with noise.active(), torch.set_grad_enabled(noisy_grad):
            h_noisy = model_b.model(input_ids=ids, attention_mask=attn).last_hidden_state
        total, ce, kl = linear_r3f_loss(h_clean, h_noisy, model_b.lm_head.weight, labels, lam=lam, shift_labels=True,
                                        noisy_grad=noisy_grad, chunk_size=5)
        assert kl > 0
        total.backward()
        opt_b.step()

    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-9, atol=1e-11, msg=name)
    assert float((model_a.lm_head.weight.detach() - start).abs().max()) > 1e-3  # it trained


def test_lm_step_benchmark_runs_and_reports(tmp_path, capsys):
    """bench/lm_step.py at toy sizes: every method's memory and time, the targets, JSON and plot."""
    pytest.importorskip("transformers")
    import json

    from bench import lm_step

    out = tmp_path / "lm.json"
    lm_step.main(["--device", "cpu", "--vocab", "500", "--hidden", "16", "--heads", "2", "--batch", "2", "--seq", "8",
                  "--steps", "1", "--warmup", "0", "--rows-factor", "2", "--threads", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    steps = result["memory"]["float32"]["steps"]
    assert set(steps) == set(lm_step.METHODS) and all(r["peak_extra_bytes"] > 0 for r in steps.values())
    assert {"objective_logits@16", "objective_fused@16", "objective_fused@32"} <= set(result["memory"]["float32"]["objective"])
    assert set(result["time"]["summary"]) == set(lm_step.METHODS) | set(lm_step.OBJECTIVES)
    assert "r3f_fused_peak_le_1.3x_standard[float32]" in result["targets"]
    assert result["env"]["torch"] == torch.__version__ and "bench.lm_step" in result["env"]["command"]
    assert out.with_suffix(".png").stat().st_size > 0
    assert "Targets (issue 16)" in capsys.readouterr().out


def test_lm_step_objective_only_times_the_objectives_and_names_what_did_not_run(tmp_path, capsys):
    """``--objective-only`` (the GPU suite's real-size head): no model steps, the objectives alone; Liger's
    fused linear CE is listed as not run where there is no CUDA GPU (or no liger-kernel)."""
    import json

    from bench import lm_step

    out = tmp_path / "lm.json"
    lm_step.main(["--device", "cpu", "--objective-only", "--vocab", "300", "--hidden", "16", "--batch", "2", "--seq",
                  "8", "--steps", "1", "--warmup", "0", "--threads", "1", "--no-plot", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["memory"]["float32"]["steps"] == {} and result["config"]["objective_only"]
    assert set(result["time"]["summary"]) == set(lm_step.OBJECTIVES)
    assert lm_step.LIGER in result["not_run"] and f"not run: {lm_step.LIGER}" in capsys.readouterr().out
