"""symmetric_kl on hostile inputs (issue 14): NaN / +-inf rows, constant offsets between the two passes,
V = 0, mask dtypes, and the device the Triton launcher runs on.

The tests taking the ``backend`` fixture run on both paths: R3F_KERNELS=torch, and R3F_KERNELS=triton
(on CPU in Triton's interpreter, on the GPU where there is one) with the PyTorch path booby-trapped so
that a silent fallback fails. test_paths_agree_on_edge_rows runs the two paths side by side on the same
rows and asks for identical answers, NaN and inf included. ``tiles`` adds a run with every row split
over several programs (the merge kernel).
"""
import types

import pytest
import torch
from helpers import TOLERANCES
from hypothesis import given, settings
from hypothesis import strategies as st
from kl_plans import lane_vs_row_rows, rows_path, small_tiles
from kl_reference import reference_rows

import r3f_opt.kl
from r3f_opt import RegularizedOptimizer, symmetric_kl
from r3f_opt.kernels import sym_kl

NAN, INF = float("nan"), float("inf")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the kernels run in Triton's interpreter


def dev(*tensors):
    """The tensors on DEVICE (built on CPU, so seeded generators give the same numbers everywhere)."""
    out = tuple(t.to(DEVICE) for t in tensors)
    return out if len(out) > 1 else out[0]


# NumPy noise from the interpreter reducing rows that are NaN on purpose.
# exp2((m_old - m_new) * log2 e) with m_old = -3.4e38 (nothing read yet) overflows to -inf in the multiply.
pytestmark = [pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")]


def _trap(torch_path):
    def trap(a, b, mask):
        assert torch.float64 in (a.dtype, b.dtype), "the PyTorch path ran under R3F_KERNELS=triton"
        return torch_path(a, b, mask)

    return trap


def use_backend(monkeypatch, name: str) -> str:
    monkeypatch.setenv("R3F_KERNELS", name)
    if name == "triton":
        monkeypatch.setattr(r3f_opt.kl._SymmetricKLRows, "apply", _trap(r3f_opt.kl._SymmetricKLRows.apply))
    return name


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    return use_backend(monkeypatch, request.param)


@pytest.fixture(params=[None, (16, 16)], ids=["default-tiles", "split-rows"])
def tiles(request, monkeypatch):
    """Default tiles, or tiny tiles with every row split over programs (the merge kernel's path)."""
    if request.param is not None:
        block, chunk = request.param
        small_tiles(monkeypatch, block, chunk)
    return request.param


def value_and_grads(a, b, upstream, mask=None):
    a1, b1 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    rows = symmetric_kl(a1, b1, mask=mask, reduction="none")
    (rows * upstream.to(rows.dtype)).sum().backward()
    return rows.detach(), a1.grad, b1.grad


def reference_value_and_grads(a, b, upstream):
    a2, b2 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    rows = reference_rows(a2, b2)
    (rows * upstream.double()).sum().backward()
    return rows.detach(), a2.grad, b2.grad


# ------------------------------------------------------------------------------- poisoned fresh buffers
@pytest.mark.parametrize("backend, path", [("torch", "default"), ("triton", "default"), ("triton", "rows"),
                                           ("triton", "split"), ("triton", "strided")])
@pytest.mark.parametrize("shape, masked", [((5, 7), True), ((3, 4, 300), True), ((2, 3000), False), ((9, 2), True)])
def test_fresh_buffers_are_written_before_they_are_read(monkeypatch, poisoned_allocations, backend, path, shape,
                                                        masked):
    use_backend(monkeypatch, backend)
    if path != "default":  # the kernel's tiling paths, forced
        if path == "rows":
            rows_path(monkeypatch, rows=2)
        else:
            small_tiles(monkeypatch, 16, 16 if path == "split" else 48, aligned=path != "strided")
    torch.manual_seed(0)
    a, b = dev(torch.randn(*shape) * 2, torch.randn(*shape) * 2)
    mask = dev(torch.rand(shape[:-1]) > 0.4) if masked else None
    g = dev(torch.rand(shape[:-1]) + 0.5)
    got, ga, gb = value_and_grads(a, b, g, mask)
    m = torch.ones(shape[:-1], dtype=torch.bool) if mask is None else mask.cpu()
    want, wa, wb = reference_value_and_grads(a, b, g)
    want, wa, wb = want * m, wa * m[..., None], wb * m[..., None]  # masked rows: 0 and no gradient
    for x in (got, ga, gb):
        assert not torch.isnan(x).any(), "an unwritten (NaN) entry came out"
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga.double().cpu(), wa, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb.double().cpu(), wb, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- NaN / +inf
POISON = {  # name -> (a entries, b entries) written into row 1 at column 5 (None: leave the entry as is)
    "nan in p": (NAN, None),
    "nan in q": (None, NAN),
    "nan in both": (NAN, NAN),
    "+inf in both": (INF, INF),
    "+inf in p only": (INF, None),
    "+inf in q only": (None, INF),
}


@pytest.mark.parametrize("case", list(POISON))
def test_poisoned_row_is_nan_with_nan_gradients(backend, tiles, case):
    """NaN in, NaN out: the row's value and every gradient entry of the row are NaN, as in the float64
    reference (softmax of a row holding NaN or +inf is NaN); the other rows are untouched. Before the fix
    the kernel gave 0 (or -inf) for the row, and the PyTorch path finite gradients for some entries."""
    torch.manual_seed(0)
    a, b = dev(torch.randn(3, 40) * 2, torch.randn(3, 40) * 2)
    va, vb = POISON[case]
    if va is not None:
        a[1, 5] = va
    if vb is not None:
        b[1, 5] = vb
    g = dev(torch.tensor([0.7, 1.3, -0.4]))
    got, ga, gb = value_and_grads(a, b, g)
    want, wa, wb = reference_value_and_grads(a, b, g)
    assert torch.isnan(want[1]) and torch.isnan(wa[1]).all() and torch.isnan(wb[1]).all()  # the reference's answer
    assert torch.isnan(got[1]), f"{case}: KL {got[1].item()} for a poisoned row"
    assert torch.isnan(ga[1]).all() and torch.isnan(gb[1]).all(), f"{case}: finite gradients in a poisoned row"
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(ga.double(), wa, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(gb.double(), wb, rtol=1e-5, atol=1e-6, equal_nan=True)
    # Reductions see the NaN too (so an optimizer skips the step instead of clipping NaN gradients).
    for reduction in ["batchmean", "sum", "mean"]:
        assert torch.isnan(symmetric_kl(a, b, reduction=reduction))
    # ... unless the row is masked out: masked rows are never read.
    mask = dev(torch.tensor([True, False, True]))
    got, ga, gb = value_and_grads(a, b, g, mask=mask)
    assert got[1].item() == 0.0 and torch.count_nonzero(ga[1]) == 0 and torch.count_nonzero(gb[1]) == 0
    assert torch.isfinite(got).all() and torch.isfinite(ga).all() and torch.isfinite(gb).all()


def test_whole_rows_of_nan_or_inf(backend, tiles):
    """Rows that are NaN / +inf everywhere in both inputs (an overflowed pass): NaN, not the 0 of an
    all -inf row."""
    a, b = dev(torch.randn(4, 20), torch.randn(4, 20))
    a[0], b[0] = NAN, NAN
    a[1], b[1] = INF, INF
    a[2], b[2] = -INF, -INF  # an all -inf row: 0, zero gradient
    got, ga, gb = value_and_grads(a, b, dev(torch.ones(4)))
    assert torch.isnan(got[:2]).all() and torch.isnan(ga[:2]).all() and torch.isnan(gb[:2]).all()
    assert got[2].item() == 0.0 and torch.count_nonzero(ga[2]) == 0 and torch.count_nonzero(gb[2]) == 0
    assert torch.isfinite(got[3]) and torch.isfinite(ga[3]).all()


# pytest.warns re-emits the interpreter's NumPy noise outside the module that pytest.ini filters it by.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_optimizer_skips_a_step_whose_kl_rows_are_nan(backend):
    """The issue's symptom: logits NaN in one row of both passes (the task loss does not see that row).
    The KL must be NaN so that RegularizedOptimizer skips the step; before, the kernel reported a finite
    KL and only NaN gradients, which max_grad_norm clipping would spread over every parameter."""
    from helpers import tiny_model, toy_batch

    torch.manual_seed(0)
    model = tiny_model("bert", dropout=0.0).to(DEVICE)
    batch = {k: dev(v) for k, v in toy_batch("bert", batch=4, seq=6).items()}
    labels = batch.pop("labels")

    def closure():
        logits = model(**batch).logits
        logits = torch.where(dev(torch.arange(4))[:, None] == 0, torch.full_like(logits, NAN), logits)
        return torch.nn.functional.cross_entropy(logits[1:], labels[1:]), logits

    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, eps=1e-2, seed=1,
                               max_grad_norm=1.0)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="skipped"):
        result = opt.step(closure)
    assert torch.isnan(result.sym_kl) and result.skipped
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# -------------------------------------------------------------------------------- constant offsets
@pytest.mark.parametrize("offset", [0.0, 1.0, 30.0, 1e3, 1e6])
@pytest.mark.parametrize("perturbed", [False, True], ids=["b=a+c", "b=a+c+noise"])
def test_constant_offset_costs_no_precision(backend, tiles, offset, perturbed):
    """softmax(a + c) = softmax(a): the two passes may differ by a constant per row (a bias, a shifted
    head) without any loss of precision. Before the fix the kernel gave a negative KL at c = 1e6 and
    large relative errors from c ~ 30; the PyTorch path was worse."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 40, generator=g) * 2
    b = a + offset
    if perturbed:
        b = b + 0.05 * torch.randn(4, 40, generator=g)
    b[1] = b[1] - 7.0  # rows may have different offsets
    a, b, up = dev(a, b, torch.tensor([1.0, -0.5, 2.0, 0.25]))
    got, ga, gb = value_and_grads(a, b, up)
    want, wa, wb = reference_value_and_grads(a, b, up)  # float64 on the same float32 inputs
    assert (got >= 0).all(), f"negative KL {got.tolist()}"
    if perturbed:
        assert (want > 1e-4).all()
    # float32 tolerances (helpers.TOLERANCES), the value's tighter in absolute terms: the KL is ~2e-3 or
    # ~1e-10 and below (not perturbed: the float32 rounding of a + c is all that differs).
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(ga.double(), wa, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb.double(), wb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_constant_offset_in_16_bit(backend, dtype):
    """The 16-bit inputs themselves are rounded; the answer must still be that of the rounded inputs."""
    g = torch.Generator().manual_seed(2)
    a = (torch.randn(3, 30, generator=g) * 2).to(dtype)
    b = (a.float() + 100.0 + 0.3 * torch.randn(3, 30, generator=g)).to(dtype)
    a, b, up = dev(a, b, torch.ones(3))
    got, ga, gb = value_and_grads(a, b, up)
    want, wa, wb = reference_value_and_grads(a, b, up)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    for x, y in ((ga, wa), (gb, wb)):
        assert x.dtype == dtype
        torch.testing.assert_close(x.double(), y, rtol=2e-2, atol=1e-4)


# ----------------------------------------------------------------------------- -inf and underflow
def test_neg_inf_against_an_underflowing_logit_is_zero(backend, tiles):
    """a = [0, -inf], b = [0, -1e30]: both probabilities of the second entry are 0 in float32, so it
    contributes 0 (like -inf in both), with zero gradient. Before: PyTorch NaN, Triton 0 with NaN grads."""
    a = dev(torch.tensor([[0.0, -INF], [0.0, -1e30], [1.0, -INF]]))
    b = dev(torch.tensor([[0.0, -1e30], [0.0, -INF], [1.0, -200.0]]))
    got, ga, gb = value_and_grads(a, b, dev(torch.ones(3)))
    assert got.tolist() == [0.0, 0.0, 0.0]
    assert torch.count_nonzero(ga) == 0 and torch.count_nonzero(gb) == 0


def test_neg_inf_against_a_nonzero_probability_is_inf(backend, tiles):
    """-inf in one input where the other has a nonzero probability: P and Q differ in support, +inf."""
    a = dev(torch.tensor([[0.0, -INF, 1.0], [-INF, -INF, -INF]]))
    b = dev(torch.tensor([[0.0, -5.0, 1.0], [0.0, 1.0, 2.0]]))
    got = symmetric_kl(a, b, reduction="none")
    assert got.tolist() == [INF, INF]
    assert symmetric_kl(b, a, reduction="none").tolist() == [INF, INF]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("path", ["aligned", "strided", "split"])
def test_neg_inf_underflowing_against_the_row_but_not_its_lane(monkeypatch, backend, path, dtype):
    """A -inf facing a logit whose probability underflows against its *row's* maximum (so it contributes 0)
    but not against the maximum of the lane (or part of a split row) that reads it (``lane_vs_row_rows``).
    The kernel used to give +inf (the lane's S went +-inf before the rescaling to the row's maximum could
    scale the entry by 0); now both paths give the row without that entry. A masked row holding such an
    entry gives 0 and zero gradient (the guarded kernel takes no mask: it relies on a masked row's 0)."""
    if backend == "triton":
        small_tiles(monkeypatch, 16, 16 if path == "split" else 48, aligned=path == "aligned")
    a, b = lane_vs_row_rows(dtype)
    up = dev(torch.linspace(0.5, 1.5, 6))
    mask = dev(torch.tensor([True] * 5 + [False]))
    got, ga, gb = value_and_grads(*dev(a, b), up, mask=mask)
    assert got[3] == INF and got[4] == INF and got[5] == 0
    assert torch.count_nonzero(ga[5]) == 0 and torch.count_nonzero(gb[5]) == 0
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for r in range(3):  # the reference without the -inf columns (its NaN there is 0 * inf)
        keep = torch.isfinite(a[r]) & torch.isfinite(b[r])
        want, wa, wb = reference_value_and_grads(a[r:r + 1, keep], b[r:r + 1, keep], up[r:r + 1].cpu())
        torch.testing.assert_close(got[r:r + 1].double().cpu(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ga[r:r + 1, keep].double().cpu(), wa, **tol)
        torch.testing.assert_close(gb[r:r + 1, keep].double().cpu(), wb, **tol)
        assert torch.count_nonzero(ga[r, ~keep]) == 0 and torch.count_nonzero(gb[r, ~keep]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("path", ["aligned", "strided", "split"])
def test_a_whole_lane_facing_neg_inf_on_one_side(monkeypatch, backend, path, dtype):
    """Every column a lane (4 columns here) reads is -inf on one side and far below the row on the other
    (a vocabulary block masked with -inf in one pass, -1e4 in the other), in its first tile or a later one;
    and float32's lowest finite logit facing -1e9, filling a lane or next to another logit (whose sum overflowed
    float32: the guarded pass sums in float64 now). The kernel gave NaN: the lane's maximum on the -inf side
    stayed at the -3.4e38 sentinel, so the rescaling shift was ~3.4e38, times Z overflowed, times the zero
    weight gave NaN; and the shift moved S by mass S did not hold. The entries contribute 0 on both paths."""
    if backend == "triton":
        small_tiles(monkeypatch, 16, 16 if path == "split" else 48, aligned=path == "aligned")
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 40, generator=g)
    b = a + 0.1 * torch.randn(6, 40, generator=g)
    a[0, 0:4], b[0, 0:4] = -INF, -1e4  # lane 0 of the first tile
    b[1, 0:4], a[1, 0:4] = -INF, -1e4  # the other side
    a[2, 16:20], b[2, 16:20] = -INF, -1e4  # lane 0 of the second tile, after finite columns
    b[3, 32:36], a[3, 32:36] = -INF, -1e9
    a[4, 0:4], b[4, 0:4] = torch.finfo(torch.float32).min, -1e9  # no -inf: the sentinel's own value
    a[5, 0:2], a[5, 2:4], b[5, 0:4] = -200.0, torch.finfo(torch.float32).min, -1e9  # mid-lane: S overflows
    a, b = a.to(dtype), b.to(dtype)
    up = dev(torch.linspace(0.5, 1.5, 6))
    got, ga, gb = value_and_grads(*dev(a, b), up)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for r in range(6):  # the reference without those columns: they contribute 0 (their probabilities are 0)
        keep = torch.isfinite(a[r]) & torch.isfinite(b[r]) & (a[r] > -1e3) & (b[r] > -1e3)
        want, wa, wb = reference_value_and_grads(a[r:r + 1, keep], b[r:r + 1, keep], up[r:r + 1].cpu())
        torch.testing.assert_close(got[r:r + 1].double().cpu(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ga[r:r + 1, keep].double().cpu(), wa, **tol)
        torch.testing.assert_close(gb[r:r + 1, keep].double().cpu(), wb, **tol)
        assert torch.count_nonzero(ga[r, ~keep]) == 0 and torch.count_nonzero(gb[r, ~keep]) == 0


# Offsets below the row's maximum for entries facing a -inf: 20 and 80 leave a probability (> 2^-126 even after
# log Z <= log 200), 120 and 200 underflow to 0 in float32; none falls in the windows where the paths may
# differ (87-104 below on the GPU, about 103.6-104 in the interpreter: docs/kernels.md).
FAR = (-20.0, -80.0, -120.0, -200.0)


@settings(max_examples=20, deadline=None)
@given(
    rows=st.integers(1, 6), vocab=st.integers(1, 120), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    path=st.sampled_from(["default", "aligned", "strided", "split", "rows"]), masked=st.booleans(),
    holes=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 119), st.sampled_from(["a", "b", "both"]),
                             st.sampled_from(FAR)), max_size=12),
    sink=st.sampled_from([None, 0, 1, 2, 3]), seed=st.integers(0, 2**31 - 1),
)
def test_property_neg_inf_and_far_entries_agree_with_the_pytorch_path(rows, vocab, dtype, path, masked, holes,
                                                                      sink, seed):
    """Random rows with -inf on one side (facing an entry at a fixed offset below the row's maximum: a
    probability or an underflow) or on both, in any lane, part or tiling path, masked rows among them: the
    kernel's values and gradients (NaN and inf included) are the PyTorch path's. ``sink``: every column of
    one lane of the 16-column test tiles (4 lanes of 4) sits about 150 below the row's maximum on both sides,
    so a -inf there faces a probability that is positive against its lane and 0 against its row."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(rows, vocab, generator=g) * 2, torch.randn(rows, vocab, generator=g) * 2
    if sink is not None and vocab > 4:
        cols = [c for c in range(vocab) if (c % 16) // 4 == sink]
        for x in (a, b):
            x[:, cols] = x.max(-1, keepdim=True).values - 150 + torch.rand(rows, len(cols), generator=g)
    for r, c, side, far in holes:
        r, c = r % rows, c % vocab
        if side in ("a", "both"):
            a[r, c] = float("-inf")
        if side in ("b", "both"):
            b[r, c] = float("-inf")
        if side == "a":
            b[r, c] = b[r].max() + far if vocab > 1 else b[r, c]
        if side == "b":
            a[r, c] = a[r].max() + far if vocab > 1 else a[r, c]
    a, b = dev(a.to(dtype), b.to(dtype))
    mask = dev(torch.rand(rows, generator=g) > 0.3) if masked else None
    up = dev(torch.rand(rows, generator=g) + 0.5)
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        if path == "rows":
            rows_path(mp, rows=2)
        elif path != "default":
            small_tiles(mp, 16, 16 if path == "split" else 128, aligned=None if path == "split" else path == "aligned")
        for mode in ("torch", "triton"):
            mp.setenv("R3F_KERNELS", mode)
            before = sum(sym_kl.kernel_launches.values())
            results[mode] = value_and_grads(a, b, up, mask=mask)
            assert (sum(sym_kl.kernel_launches.values()) > before) == (mode == "triton")
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else TOLERANCES[dtype]
    for i, (want, got) in enumerate(zip(results["torch"], results["triton"])):
        torch.testing.assert_close(got, want, equal_nan=True, **(dict(rtol=1e-5, atol=1e-6) if i == 0 else tol))


EDGE_ROWS = [  # (a row, b row), V = 3
    ([0.0, -INF, 1.0], [0.0, -1e30, 1.0]),  # -inf vs an underflowing logit
    ([-INF, -INF, -INF], [-INF, -INF, -INF]),  # all -inf
    ([-INF, -INF, -INF], [0.0, 1.0, 2.0]),  # all -inf on one side
    ([0.0, -INF, 1.0], [0.0, 0.5, 1.0]),  # -inf on one side
    ([0.0, -INF, 1.0], [-INF, 0.5, 1.0]),  # -inf on both sides, at different entries
    ([0.0, NAN, 1.0], [0.0, 0.5, 1.0]),
    ([0.0, INF, 1.0], [0.0, INF, 1.0]),
    ([0.0, INF, 1.0], [0.0, -INF, 1.0]),
    ([1e6, 1e6 + 1, 1e6 - 2], [-3.0, -2.5, -4.0]),
    ([0.0, -1e30, 0.0], [0.0, 0.0, 0.0]),  # finite but far: a large, finite KL
]


def test_paths_agree_on_edge_rows(monkeypatch, tiles):
    """One answer on both paths, NaN and inf included, values and gradients."""
    a = dev(torch.tensor([r[0] for r in EDGE_ROWS]))
    b = dev(torch.tensor([r[1] for r in EDGE_ROWS]))
    up = dev(torch.linspace(0.5, 1.5, len(EDGE_ROWS)))
    results = {}
    for mode in ["torch", "triton"]:
        monkeypatch.setenv("R3F_KERNELS", mode)
        before = sym_kl.launches["forward"]
        results[mode] = value_and_grads(a, b, up)
        assert (sym_kl.launches["forward"] > before) == (mode == "triton")
    for t, k in zip(results["torch"], results["triton"]):
        torch.testing.assert_close(k, t, rtol=1e-5, atol=1e-6, equal_nan=True)
    rows = results["torch"][0]
    assert rows[0] == 0 and rows[1] == 0 and rows[2] == INF and rows[3] == INF and rows[4] == INF
    assert rows[5].isnan() and rows[6].isnan() and rows[7].isnan()
    assert torch.isfinite(rows[8]) and 1e29 < rows[9] < INF


# ------------------------------------------------------------------------------------------------ V = 0
@pytest.mark.parametrize("shape", [(3, 0), (0,), (0, 0), (2, 0, 0)])
def test_empty_vocabulary_is_a_value_error(backend, shape):
    """V = 0: a softmax over no classes is meaningless, on both paths (before: PyTorch raised a reshape
    error, Triton returned 0)."""
    a, b = dev(torch.zeros(shape), torch.zeros(shape))
    with pytest.raises(ValueError, match=r"V = 0.*at least one"):
        symmetric_kl(a, b)


def test_no_rows_is_zero(backend):
    """No rows (but V >= 1) is fine: an empty sum."""
    for shape in [(0, 5), (2, 0, 4)]:
        a = torch.zeros(shape, device=DEVICE, requires_grad=True)
        b = torch.zeros(shape, device=DEVICE, requires_grad=True)
        for reduction in ["batchmean", "sum", "mean"]:
            assert symmetric_kl(a, b, reduction=reduction).item() == 0.0
        assert symmetric_kl(a, b, reduction="none").shape == shape[:-1]


# ------------------------------------------------------------------------------------------ mask dtypes
def test_labels_as_mask_is_refused(backend):
    """labels (-100 = ignore) cast to bool would count the ignored rows and drop token 0's rows."""
    a, b = dev(torch.randn(2, 3, 5), torch.randn(2, 3, 5))
    labels = dev(torch.tensor([[0, 7, -100], [4, -100, -100]]))
    with pytest.raises(ValueError, match=r"labels != -100"):
        symmetric_kl(a, b, mask=labels)
    with pytest.raises(ValueError, match=r"0 and 1"):
        symmetric_kl(a, b, mask=dev(torch.tensor([[0, 1, 2], [1, 1, 1]])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.complex64])
def test_non_integer_mask_is_refused(backend, dtype):
    a, b = dev(torch.randn(2, 3, 5), torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match=r"bool"):
        symmetric_kl(a, b, mask=torch.ones(2, 3, dtype=dtype, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.int8])
def test_zero_one_integer_mask_is_a_bool_mask(backend, dtype):
    """An attention_mask (0/1 integers) selects the same rows as its bool."""
    a, b = dev(torch.randn(2, 3, 5), torch.randn(2, 3, 5))
    bool_mask = dev(torch.tensor([[True, False, True], [False, True, True]]))
    for reduction in ["batchmean", "mean", "none"]:
        want = symmetric_kl(a, b, mask=bool_mask, reduction=reduction)
        torch.testing.assert_close(symmetric_kl(a, b, mask=bool_mask.to(dtype), reduction=reduction), want)


def test_kernel_entry_point_wants_a_bool_mask():
    a, b = dev(torch.randn(2, 5), torch.randn(2, 5))
    with pytest.raises(TypeError, match="bool"):
        sym_kl.symmetric_kl_rows(a, b, dev(torch.tensor([1, 0])))


# ------------------------------------------------------------------------------------------ device
def test_launcher_runs_every_kernel_inside_the_device_context(monkeypatch):
    """The kernels launch inside ``_device_context(logits)`` (torch.cuda.device for CUDA logits), forward
    and backward. On CPU the real context is a no-op; the recorder proves each launch happens inside it."""
    monkeypatch.setenv("R3F_KERNELS", "triton")
    small_tiles(monkeypatch, 16, 16)
    real = sym_kl._device_context
    entered = []

    class Recorder:
        def __init__(self, t):
            self.t, self.ctx = t, real(t)

        def __enter__(self):
            self.before = dict(sym_kl.launches)
            self.ctx.__enter__()

        def __exit__(self, *exc):
            self.ctx.__exit__(*exc)
            entered.append((self.t.device, {k: sym_kl.launches[k] - self.before[k] for k in sym_kl.launches}))

    monkeypatch.setattr(sym_kl, "_device_context", Recorder)
    a = torch.randn(2, 40, device=DEVICE, requires_grad=True)
    b = torch.randn(2, 40, device=DEVICE, requires_grad=True)
    symmetric_kl(a, b).backward()
    assert [d for d, _ in entered] == [a.device, a.device]
    assert entered[0][1] == {"forward": 1, "merge": 1, "guarded": 1, "backward": 0}
    assert entered[1][1] == {"forward": 0, "merge": 0, "guarded": 0, "backward": 1}


def test_device_context_of_cuda_logits_is_their_device():
    """The context for logits on cuda:1 is torch.cuda.device(1) (built, not entered: no GPU needed);
    for CPU tensors a no-op context. This is the spectral-norm launcher's rule."""
    fake = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    ctx = sym_kl._device_context(fake)
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    assert not isinstance(sym_kl._device_context(torch.zeros(1)), torch.cuda.device)
