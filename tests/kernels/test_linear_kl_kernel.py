"""The fused LM head's vocabulary math in the Triton kernels (``kl_ce_grads_``: the symmetric-KL forward, then
its backward with the cross-entropy gradient, in place on the two logits blocks).

On CPU these run in Triton's interpreter (R3F_KERNELS=triton, TRITON_INTERPRET=1 from conftest); the PyTorch
path of the vocabulary math is booby-trapped and the launch counters must move, so a silent fallback fails.
Values and gradients are checked against the float64 materialised reference (F.linear, F.cross_entropy and the
kl_div formula of kl_reference.py, through autograd). Shapes are small: the interpreter is slow.
"""
import pytest
import torch
import torch.nn.functional as F
from kl_plans import lane_vs_row_rows, small_tiles
from kl_reference import reference

import r3f_opt.linear_kl as lk
from r3f_opt import linear_r3f_loss, linear_symmetric_kl, symmetric_kl
from r3f_opt.kernels import sym_kl

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
TOL = dict(rtol=2e-4, atol=2e-6)  # float32 arithmetic against float64


@pytest.fixture
def kernel_only(monkeypatch):
    monkeypatch.setenv("R3F_KERNELS", "triton")

    def trap(*args, **kwargs):
        raise AssertionError("the PyTorch vocabulary math ran under R3F_KERNELS=triton")

    monkeypatch.setattr(lk, "_vocab_math", trap)
    before = dict(sym_kl.kernel_launches)
    yield
    assert sym_kl.kernel_launches != before, "no kernel launched"


def inputs(lead, hidden, vocab, seed=0, neg_inf_bias=False):
    g = torch.Generator().manual_seed(seed)
    hp = torch.randn(*lead, hidden, generator=g)
    hq = hp + 0.3 * torch.randn(*lead, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) / hidden ** 0.5 * 2
    b = torch.randn(vocab, generator=g)
    if neg_inf_bias:
        b[1] = float("-inf")
    return hp, hq, w, b


def leaves(*ts, dtype=torch.float32):
    return [t.detach().to(DEVICE, dtype).requires_grad_() for t in ts]


def ref_r3f(hp, hq, w, b, labels, lam, mask, smoothing, noisy_grad):
    a, bq = F.linear(hp, w, b), F.linear(hq, w, b)
    if not noisy_grad:
        bq = bq.detach()
    shifted = torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], -100)], -1)
    ce = F.cross_entropy(a.reshape(-1, a.shape[-1]), shifted.reshape(-1), label_smoothing=smoothing)
    kl = reference(a, bq, shifted != -100 if mask is None else mask, "batchmean")
    return ce + lam * kl, ce, kl


@pytest.mark.parametrize("vocab, tiles", [(3, None), (37, None), (70, (16, 16))])
@pytest.mark.parametrize("smoothing, noisy_grad, masked", [(0.0, True, False), (0.1, False, True)])
def test_r3f_loss_in_the_kernels_matches_float64(kernel_only, monkeypatch, vocab, tiles, smoothing, noisy_grad,
                                                 masked):
    """V = 3 takes the rows path, 37 the aligned columns path with edges, 70 with 16-column tiles several
    tiles and a split row; chunks of 4 rows over 2 x 5 rows; labels with prompts (-100)."""
    if tiles is not None:
        small_tiles(monkeypatch, *tiles)
    hp, hq, w, b = inputs((2, 5), 6, vocab)
    labels = torch.randint(0, vocab, (2, 5), generator=torch.Generator().manual_seed(1))
    labels[0, :2] = -100
    mask = (torch.rand(2, 5, generator=torch.Generator().manual_seed(2)) > 0.3) if masked else None
    x = leaves(hp, hq, w, b)
    stats = torch.zeros(3, device=DEVICE)
    got = linear_r3f_loss(x[0], x[1], x[2], labels.to(DEVICE), x[3], lam=0.7, label_smoothing=smoothing,
                          shift_labels=True, mask=None if mask is None else mask.to(DEVICE),
                          noisy_grad=noisy_grad, chunk_size=4, token_stats=stats)
    y = leaves(hp, hq, w, b, dtype=torch.float64)
    want = ref_r3f(*y, labels, 0.7, mask, smoothing, noisy_grad)
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double().cpu(), r, **TOL)
    got[0].backward()
    want[0].backward()
    for a, c in zip(x, y):
        if a is x[1] and not noisy_grad:
            assert a.grad is None
            continue
        torch.testing.assert_close(a.grad.double().cpu(), c.grad, **TOL)
    logits = F.linear(hp.double(), w.double(), b.double())
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    valid = shifted != -100
    logp = torch.log_softmax(logits, -1)
    want_stats = [-(logp.exp() * logp).sum(-1)[valid].sum(), (logits.argmax(-1) == shifted)[valid].sum(), valid.sum()]
    torch.testing.assert_close(stats.double().cpu(), torch.stack([torch.as_tensor(v).double() for v in want_stats]),
                               **TOL)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_linear_symmetric_kl_in_the_kernels_with_a_masked_vocabulary_entry(kernel_only, reduction):
    """-inf bias entries (both logits -inf) contribute 0; reduction "none" runs the forward alone, then
    recomputes in the backward."""
    hp, hq, w, b = inputs((7,), 5, 19, seed=3, neg_inf_bias=True)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    x = leaves(hp, hq, w, b)
    got = linear_symmetric_kl(*x, mask=mask.to(DEVICE), reduction=reduction, chunk_size=3)
    y = leaves(hp, hq, w, b, dtype=torch.float64)
    keep = torch.ones(19, dtype=torch.bool)
    keep[1] = False  # the reference differentiates through the -inf entry as NaN: compare without it
    want = reference(F.linear(y[0], y[2][keep], y[3][keep]), F.linear(y[1], y[2][keep], y[3][keep]), mask, reduction)
    torch.testing.assert_close(got.double().cpu(), want, **TOL)
    up = torch.randn(want.shape, dtype=torch.float64)
    (got * up.to(got)).sum().backward()
    (want * up).sum().backward()
    for a, c in zip(x[:2], y[:2]):
        torch.testing.assert_close(a.grad.double().cpu(), c.grad, **TOL)
    torch.testing.assert_close(x[2].grad.double().cpu()[keep], y[2].grad[keep], **TOL)
    assert torch.count_nonzero(x[2].grad[1]) == 0 and x[3].grad[1] == 0


def test_kl_ce_grads_refuses_blocks_it_cannot_overwrite_in_place():
    buf = torch.randn(4, 8, device=DEVICE)
    for a, b in ((buf[:, :5], buf[:, 3:]), (torch.randn(2, 3, 5, device=DEVICE),) * 2,
                 (torch.randn(4, 5, device=DEVICE), torch.randn(3, 5, device=DEVICE))):
        before = buf.clone()
        with pytest.raises(ValueError, match="two contiguous"):
            sym_kl.kl_ce_grads_(a, b, torch.ones(a.shape[0], device=DEVICE))
        assert torch.equal(buf, before)
    g = torch.ones(4, device=DEVICE)
    x = torch.randn(4, 5, device=DEVICE, requires_grad=True)
    for a, b, match in ((x.exp(), torch.randn(4, 5, device=DEVICE), "autograd"),  # exp saved its output
                        (buf[:, :5].contiguous(),) * 2 + ("overlap",),
                        (torch.randn(4, 5, device=DEVICE).double(), torch.randn(4, 5, device=DEVICE).double(),
                         "float32")):
        with pytest.raises(ValueError, match=match):
            sym_kl.kl_ce_grads_(a, b, g)
    a, b = torch.randn(4, 5, device=DEVICE), torch.randn(4, 5, device=DEVICE)
    versions = a._version, b._version
    sym_kl.kl_ce_grads_(a, b, g)
    assert a._version > versions[0] and b._version > versions[1]  # autograd sees the writes


@pytest.mark.parametrize("split", [False, True], ids=["whole-rows", "split-rows"])
def test_kl_ce_grads_decides_one_sided_neg_inf_against_the_row(monkeypatch, split):
    """The in-place step on rows whose -inf (one side only) faces a probability that underflows against the row
    but not against its lane: the guarded kernel redoes them between the forward and the in-place backward, and
    values and both gradients equal the PyTorch path's."""
    a, b = (x[:5].to(DEVICE) for x in lane_vs_row_rows())
    g = torch.linspace(0.5, 1.5, 5, device=DEVICE)
    monkeypatch.setenv("R3F_KERNELS", "torch")
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    want = symmetric_kl(a1, b1, reduction="none")
    (want * g).sum().backward()
    small_tiles(monkeypatch, 16, 16 if split else 48)
    before = sym_kl.launches["guarded"]
    ka, kb = a.clone(), b.clone()
    kl, _ = sym_kl.kl_ce_grads_(ka, kb, g)
    assert sym_kl.launches["guarded"] == before + 1
    torch.testing.assert_close(kl, want.detach(), rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(ka, a1.grad, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(kb, b1.grad, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_the_kernel_path_holds_two_blocks_and_no_workspace(monkeypatch):
    """The dispatch: float32 math under R3F_KERNELS=triton takes the kernels (no p, q buffers); float64 and
    R3F_KERNELS=torch take the PyTorch path."""
    hp, hq, w, b = inputs((4,), 3, 11)
    monkeypatch.setenv("R3F_KERNELS", "triton")
    assert lk._kernel(torch.float32, hp, w) and not lk._kernel(torch.float64, hp, w)
    monkeypatch.setenv("R3F_KERNELS", "torch")
    assert not lk._kernel(torch.float32, hp, w)
