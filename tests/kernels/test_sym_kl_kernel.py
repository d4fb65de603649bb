"""The Triton symmetric-KL kernel itself: tiling and split paths, layouts, long rows, dispatch.

On CPU these run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest); the launch counter and
a booby-trapped PyTorch path prove the kernel ran. test_symmetric_kl.py runs every semantic test on
both paths as well.
"""
import warnings

import pytest
import torch
from helpers import kl_mask, tiny_model, toy_batch
from hypothesis import given, settings
from hypothesis import strategies as st
from kl_plans import rows_path, small_tiles
from kl_reference import check, reference_rows

import r3f_opt._dispatch
import r3f_opt.kl
from r3f_opt import RegularizedOptimizer, symmetric_kl
from r3f_opt.kernels import sym_kl

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# NumPy noise from the interpreter: exp2((m_old - m_new) * log2 e) with m_old = -3.4e38 (nothing read yet)
# overflows to -inf in the multiply, and exp2(-inf) = 0 is what the kernel means.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")


@pytest.fixture
def triton_only(monkeypatch):
    """R3F_KERNELS=triton with the PyTorch path made to fail."""
    monkeypatch.setenv("R3F_KERNELS", "triton")

    def trap(*args):
        raise AssertionError("the PyTorch path ran under R3F_KERNELS=triton")

    monkeypatch.setattr(r3f_opt.kl._SymmetricKLRows, "apply", trap)


def randn(*shape, dtype=torch.float32, scale=3.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def test_kernel_runs_and_counts_launches(triton_only):
    a, b = randn(4, 50, scale=1.0).requires_grad_(), randn(4, 50, scale=1.0).requires_grad_()
    before = dict(sym_kl.launches)
    symmetric_kl(a, b).backward()
    assert sym_kl.launches["forward"] == before["forward"] + 1
    assert sym_kl.launches["backward"] == before["backward"] + 1


def test_torch_mode_never_launches(monkeypatch):
    monkeypatch.setenv("R3F_KERNELS", "torch")
    before = dict(sym_kl.launches)
    a = randn(3, 9).requires_grad_()
    symmetric_kl(a, randn(3, 9)).backward()
    assert sym_kl.launches == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_split_rows_and_many_tiles(monkeypatch, triton_only, dtype, reduction):
    small_tiles(monkeypatch)
    a, b = randn(3, 2, 101, dtype=dtype), randn(3, 2, 101, dtype=dtype)
    mask = torch.tensor([[True, False], [True, True], [False, True]], device=DEVICE)
    a[0, 1] = float("nan")  # a masked row is never read
    check(a, b, mask=mask, reduction=reduction, rtol=1e-4, atol=1e-5)


def test_split_path_launches_merge(monkeypatch, triton_only):
    small_tiles(monkeypatch)
    before = dict(sym_kl.launches)
    symmetric_kl(randn(2, 100), randn(2, 100))
    assert sym_kl.launches["merge"] == before["merge"] + 1  # 100 columns / chunk 32 = 4 parts per row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_very_long_row(triton_only, dtype):
    # V = 262,144: 32-64 tiles, split over programs by the default config when there are few rows.
    a = randn(1, 262_144, dtype=dtype)
    b = (a.float() + 0.1 * randn(1, 262_144)).to(dtype)
    got = symmetric_kl(a.requires_grad_(), b.requires_grad_(), reduction="sum")
    want = reference_rows(a.detach().cpu(), b.detach().cpu()).sum()
    torch.testing.assert_close(got.double().cpu(), want, rtol=2e-4, atol=1e-6)
    got.backward()
    assert torch.isfinite(a.grad.float()).all() and a.grad.dtype == dtype


@pytest.mark.parametrize("vocab", [1, 2, 3, 1000, 4097, 8193])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_vocab_sizes_and_dtypes(triton_only, vocab, dtype):
    # 4097 (fp32) and 8193 (16-bit) are one column beyond the default tile.
    check(randn(3, vocab, dtype=dtype), randn(3, vocab, dtype=dtype), rtol=1e-4, atol=1e-5)


VIEWS = {  # name -> (base shape, view of the base)
    "sliced vocab": ((4, 6, 30), lambda t: t[:, :, ::2]),
    "transposed rows": ((4, 6, 30), lambda t: t.transpose(0, 1)),
    "vocab not last in memory": ((30, 5), lambda t: t.t()),
    "broadcast rows": ((1, 30), lambda t: t.expand(5, 30)),
    "row slice": ((4, 6, 30), lambda t: t[1:3, ::2, 3:25]),
    "three groups (copied)": ((3, 4, 5, 7), lambda t: t.permute(2, 0, 1, 3)[:, ::2]),
}


@pytest.mark.parametrize("name", list(VIEWS))
def test_strided_views(triton_only, name):
    """The views themselves go to the kernel (check() would clone them contiguous)."""
    shape, view = VIEWS[name]
    base = randn(*shape).requires_grad_()
    x = view(base)
    assert (sym_kl._rows_layout(x)[0] is x) == (name != "three groups (copied)")
    y = randn(*x.shape).requires_grad_()
    g = randn(*x.shape[:-1])
    (symmetric_kl(x, y, reduction="none") * g).sum().backward()
    base64, y64 = base.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    (reference_rows(view(base64), y64) * g.double()).sum().backward()
    torch.testing.assert_close(base.grad.double(), base64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.grad.double(), y64.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_columns_path_one_column_per_lane(monkeypatch, triton_only, dtype):
    """The launcher's own plan for a row slice against contiguous logits, V = 62 (rows at odd offsets: not
    16-byte aligned): the strided columns path with one column per lane; values and gradients."""
    plans = []
    real = sym_kl._plan
    monkeypatch.setattr(sym_kl, "_plan", lambda *args: plans.append(real(*args)) or plans[-1])
    base = randn(4, 6, 70, dtype=dtype).requires_grad_()
    x = base[1:3, ::2, 3:65]
    y = randn(*x.shape, dtype=dtype).requires_grad_()
    g = randn(*x.shape[:-1])
    (symmetric_kl(x, y, reduction="none") * g).sum().backward()
    assert (plans[0].rows, plans[0].align, plans[0].vec) == (0, 1, 1)
    base64, y64 = base.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    (reference_rows(base64[1:3, ::2, 3:65], y64) * g.double()).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(base.grad.double(), base64.grad, **tol)
    torch.testing.assert_close(y.grad.double(), y64.grad, **tol)


def test_empty_inputs(triton_only):
    """No rows: 0. V = 0 (no classes) is a ValueError on both paths (test_sym_kl_faults.py)."""
    for shape in [(0, 5), (2, 0, 4)]:
        a = torch.zeros(shape, device=DEVICE, requires_grad=True)
        b = torch.zeros(shape, device=DEVICE, requires_grad=True)
        out = symmetric_kl(a, b, reduction="sum")
        assert out.item() == 0.0
        out.backward()
        assert a.grad.shape == a.shape and torch.count_nonzero(a.grad) == 0
    with pytest.raises(ValueError, match="V = 0"):
        sym_kl.symmetric_kl_rows(torch.zeros(3, 0, device=DEVICE), torch.zeros(3, 0, device=DEVICE))


def test_gradient_for_one_input_only(triton_only):
    a, b = randn(4, 19), randn(4, 19)
    a1 = a.clone().requires_grad_()
    symmetric_kl(a1, b, reduction="sum").backward()
    a2 = a.double().requires_grad_()
    reference_rows(a2, b.double()).sum().backward()
    torch.testing.assert_close(a1.grad.double(), a2.grad, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    vocab=st.integers(1, 200),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    reduction=st.sampled_from(["batchmean", "sum", "mean", "none"]),
    masked=st.booleans(),
    tiles=st.sampled_from([None, (16, 16), (16, 48)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_random_shapes_tiles_dtypes(lead, vocab, dtype, reduction, masked, tiles, seed):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(*lead, vocab, generator=g) * 2).to(dtype)
    b = (torch.randn(*lead, vocab, generator=g) * 2).to(dtype)
    mask = torch.rand(*lead, generator=g) > 0.5 if masked else None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("R3F_KERNELS", "triton")
        mp.setattr(r3f_opt.kl._SymmetricKLRows, "apply", None)  # calling the PyTorch path would fail
        if tiles is not None:
            small_tiles(mp, *tiles)
        check(a.to(DEVICE), b.to(DEVICE), mask=None if mask is None else mask.to(DEVICE),
              reduction=reduction, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------- dispatch
def test_bad_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("R3F_KERNELS", "cuda")
    with pytest.raises(ValueError, match="R3F_KERNELS must be one of"):
        symmetric_kl(torch.randn(2, 3), torch.randn(2, 3))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks CPU tensors outside the interpreter")
def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("R3F_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        symmetric_kl(torch.randn(2, 3), torch.randn(2, 3))


def test_auto_mode_uses_pytorch_on_cpu(monkeypatch):
    monkeypatch.delenv("R3F_KERNELS", raising=False)
    before = dict(sym_kl.launches)
    symmetric_kl(torch.randn(2, 3), torch.randn(2, 3))
    assert sym_kl.launches == before


def test_missing_triton_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv("R3F_KERNELS", "triton")
    monkeypatch.setattr(r3f_opt._dispatch, "triton_available", lambda: False)
    r3f_opt._dispatch._warn_missing.cache_clear()
    before = dict(sym_kl.launches)
    with pytest.warns(RuntimeWarning, match="Triton is not available"):
        symmetric_kl(torch.randn(2, 3), torch.randn(2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        symmetric_kl(torch.randn(2, 3), torch.randn(2, 3))
    assert sym_kl.launches == before
    r3f_opt._dispatch._warn_missing.cache_clear()


def test_float64_takes_the_pytorch_path(monkeypatch):
    monkeypatch.setenv("R3F_KERNELS", "triton")
    before = dict(sym_kl.launches)
    out = symmetric_kl(torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3))
    assert out.dtype == torch.float64 and sym_kl.launches == before


@pytest.mark.parametrize("kind", ["bert", "gpt2-lm"])
def test_optimizer_steps_match_the_pytorch_path(monkeypatch, kind):
    """RegularizedOptimizer needs no change: the same steps on either path give the same parameters."""
    batch = {k: v.to(DEVICE) for k, v in toy_batch(kind, batch=4, seq=6).items()}
    mask = kl_mask(kind, batch)
    results = {}
    for mode in ["torch", "triton"]:
        monkeypatch.setenv("R3F_KERNELS", mode)
        torch.manual_seed(0)
        model = tiny_model(kind, dropout=0.0).to(DEVICE)  # on CUDA: the kernel compiled, not interpreted
        # SGD, not Adam: Adam would blow rounding noise in exactly-zero gradients (attention key bias) up to lr.
        opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, eps=1e-2, seed=1)
        before = dict(sym_kl.launches)
        kls = [opt.step(lambda: model(**batch), mask=mask).sym_kl.item() for _ in range(3)]
        launched = sym_kl.launches["forward"] - before["forward"]
        assert launched == (3 if mode == "triton" else 0)
        results[mode] = (kls, {k: v.detach().clone() for k, v in model.state_dict().items()})
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-4, atol=1e-7)
    for k, v in results["torch"][1].items():
        torch.testing.assert_close(results["triton"][1][k], v, rtol=1e-4, atol=1e-5, msg=k)


# ------------------------------------------------------------------------------------------ tiling paths
def test_plan_paths_for_an_h200():
    """The launcher's plan (a pure function, the one bench.sm90 inspects) for realistic shapes."""
    p = sym_kl.plan(8192, 50257, (2, 2), True, 132)
    assert (p.rows, p.vec, p.align, p.lanes * p.vec, p.chunk) == (0, 8, 8, 2048, 51200)  # aligned body + edges
    assert sym_kl.plan(8192, 50257, (2, 2), False, 132).align == 1  # strided inputs: no alignment claim
    strided = sym_kl.plan(8192, 50257, (2, 2), False, 132, rows_aligned=False)  # rows not 16-byte aligned
    assert (strided.align, strided.vec, strided.lanes) == (1, 1, 512)  # scalar loads: one column per lane
    assert sym_kl.plan(8192, 32000, (4, 4), True, 132).vec == 4  # 16 bytes of float32 per lane
    assert sym_kl.plan(8192, 32000, (4, 2), True, 132).vec == 8  # mixed: 16 bytes of the narrower
    few = sym_kl.plan(4, 262144, (2, 2), True, 132)
    assert 262144 // few.chunk >= 64  # few rows: each split over programs (merge kernel)
    tiny = sym_kl.plan(8192, 2, (2, 2), True, 132)
    assert tiny.rows * tiny.bv >= 32 * tiny.num_warps  # every thread of a program holds an entry
    assert triton_cdiv(8192, tiny.rows) >= 132  # and every SM gets a program


def triton_cdiv(a, b):
    return -(-a // b)


@pytest.mark.parametrize("vocab", [2, 3])
def test_tiny_vocabularies_take_the_rows_path_by_default(triton_only, vocab):
    before = dict(sym_kl.kernel_launches)
    check(randn(300, vocab), randn(300, vocab), rtol=1e-4, atol=1e-5)
    assert sym_kl.kernel_launches["_sym_kl_fwd_rows_kernel"] == before.get("_sym_kl_fwd_rows_kernel", 0) + 1
    assert sym_kl.kernel_launches["_sym_kl_bwd_rows_kernel"] == before.get("_sym_kl_bwd_rows_kernel", 0) + 1
    assert sym_kl.kernel_launches["_sym_kl_fwd_kernel"] == before.get("_sym_kl_fwd_kernel", 0)


@pytest.mark.parametrize("vocab, dtype", [(1, torch.float32), (2, torch.bfloat16), (3, torch.float32),
                                          (5, torch.bfloat16), (17, torch.float32)])
def test_rows_path_forced(monkeypatch, triton_only, vocab, dtype):
    """Several rows per program (4 here, 7 rows: a partial last program) and masks (edge values: below)."""
    rows_path(monkeypatch, rows=4)
    a, b = randn(7, vocab, dtype=dtype), randn(7, vocab, dtype=dtype)
    mask = torch.tensor([True, True, True, False, True, False, True], device=DEVICE)
    a[3] = float("nan")  # masked: never read
    before = sym_kl.kernel_launches["_sym_kl_fwd_rows_kernel"]
    check(a, b, mask=mask, reduction="none", rtol=1e-4, atol=1e-5)
    assert sym_kl.kernel_launches["_sym_kl_fwd_rows_kernel"] == before + 1


def test_rows_path_strided_views(monkeypatch, triton_only):
    rows_path(monkeypatch, rows=2)
    base = randn(3, 5, 6)
    x = base.transpose(0, 1)[:, :, ::2]  # (5, 3, 3), non-contiguous rows and columns
    y = randn(5, 3, 3)
    check(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("vocab, dtype", [(3, torch.float32), (16, torch.float16), (45, torch.float32),
                                          (61, torch.float16)])
def test_aligned_body_and_edges_forced(monkeypatch, triton_only, vocab, dtype):
    """Odd V: row r starts at r * V, so rows have heads and tails of 1-3 columns around a body whose ends
    are multiples of 4 (V = 3: no body at all; V = 16: no edges), with tiles of 16 and parts of 32 (V = 45,
    61: rows split over programs, each part with its own head and tail)."""
    small_tiles(monkeypatch, 16, 32, aligned=True)
    a, b = randn(5, vocab, dtype=dtype), randn(5, vocab, dtype=dtype)
    mask = torch.tensor([True, False, True, True, True], device=DEVICE)
    a[1] = float("nan")  # masked: never read (it would make the row NaN)
    before = sym_kl.kernel_launches["_sym_kl_fwd_kernel"]
    check(a, b, mask=mask, reduction="none", rtol=1e-4, atol=1e-5)
    assert sym_kl.kernel_launches["_sym_kl_fwd_kernel"] == before + 1


@pytest.mark.parametrize("vocab", [45, 61])
def test_causal_lm_slices_take_the_aligned_path(monkeypatch, triton_only, vocab):
    """Both inputs the slice logits[:, :-1] of (3, 5, V) logits (rows 5 V apart per sequence, odd V): one
    layout with contiguous rows, so the aligned body + edges path with the slices' own row offsets, and
    gradients written in that layout; values and gradients against float64. Broadcast rows (stride 0: the
    gradients would overlap) and two different layouts take the strided path."""
    small_tiles(monkeypatch, 16, 32)  # the launcher's own choice of path, small tiles
    base_a, base_b = randn(3, 5, vocab).requires_grad_(), randn(3, 5, vocab).requires_grad_()
    x, y = base_a[:, :-1], base_b[:, :-1]
    assert not x.is_contiguous() and sym_kl._one_layout(x, y)
    plans = []
    real = sym_kl._plan
    monkeypatch.setattr(sym_kl, "_plan", lambda *args: plans.append(real(*args)) or plans[-1])
    g = randn(3, 4)
    (symmetric_kl(x, y, reduction="none") * g).sum().backward()
    assert plans and plans[0].align == 4
    a64, b64 = base_a.detach().double().requires_grad_(), base_b.detach().double().requires_grad_()
    (reference_rows(a64[:, :-1], b64[:, :-1]) * g.double()).sum().backward()
    torch.testing.assert_close(base_a.grad.double(), a64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base_b.grad.double(), b64.grad, rtol=1e-5, atol=1e-5)
    row = randn(1, vocab)
    assert not sym_kl._one_layout(row.expand(4, vocab), row.expand(4, vocab))  # overlapping rows
    assert not sym_kl._one_layout(x, y.contiguous())
    assert sym_kl._one_layout(base_a.transpose(0, 1), base_b.transpose(0, 1))  # interleaved, not overlapping
    # the last position of each sequence: rows 5 V apart, so gradients in that layout would span the whole
    # base (5x the view): the strided path, with compact gradients
    assert not sym_kl._one_layout(base_a[:, -1], base_b[:, -1])


def test_aligned_and_strided_paths_agree(monkeypatch, triton_only):
    """The same rows through the aligned path and the strided path: the same statistics and value (the
    lanes see the columns in other groupings, so only up to float32 rounding)."""
    a, b = randn(4, 53), randn(4, 53)
    got = {}
    for aligned in (True, False):
        small_tiles(monkeypatch, 16, 64, aligned=aligned)
        got[aligned] = symmetric_kl(a, b, reduction="none")
    torch.testing.assert_close(got[True], got[False], rtol=1e-6, atol=1e-6)


NAN, INF = float("nan"), float("inf")
EDGE = [  # (column, a value, b value) written into one row each; V = 7, so rows start at 7r: with ALIGN 4
    # a row's entries fall in its head, its body or its tail depending on the row
    [(1, -INF, -INF)], [(5, -INF, -INF), (6, -INF, 0.5)], [(0, 1.0, -INF)], [(3, -INF, 2.0)],
    [(6, -INF, -INF)], [(2, NAN, 0.0)], [(4, INF, INF)], [(0, 0.0, -1e30), (1, -INF, -INF)],
    [(c, -INF, -INF) for c in range(7)], [(c, -INF, 0.0) for c in range(7)], [(3, 1e6, 1e6 + 1)],
]


@pytest.mark.parametrize("path", ["rows", "aligned", "strided"])
def test_forced_paths_agree_with_pytorch_on_edge_values(monkeypatch, path):
    """-inf on one or both sides, NaN, +inf, underflow, whole -inf rows: in heads, bodies and tails of the
    aligned path, in the strided path and in the rows path, values and gradients as the PyTorch path
    gives them (NaN and inf included)."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(len(EDGE), 7, generator=g), torch.randn(len(EDGE), 7, generator=g)
    for r, entries in enumerate(EDGE):
        for c, x, y in entries:
            a[r, c], b[r, c] = x, y
    a, b, up = a.to(DEVICE), b.to(DEVICE), torch.linspace(0.5, 1.5, len(EDGE), device=DEVICE)
    if path == "rows":
        rows_path(monkeypatch, rows=4)
    else:
        small_tiles(monkeypatch, 8, 16, aligned=path == "aligned")
    results = {}
    for mode in ["torch", "triton"]:
        monkeypatch.setenv("R3F_KERNELS", mode)
        a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
        before = sum(sym_kl.kernel_launches.values())
        rows = symmetric_kl(a1, b1, reduction="none")
        (rows * up).sum().backward()
        assert (sum(sym_kl.kernel_launches.values()) > before) == (mode == "triton")
        results[mode] = (rows.detach(), a1.grad, b1.grad)
    for want, got in zip(results["torch"], results["triton"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert results["triton"][0][2] == INF and results["triton"][0][5].isnan()


class _PassSpy:
    """Records the SAFE flag of every _fwd_pass call (the interpreter resolves the jitted helper by name at
    each call, so a wrapper in the module sees them; compiled on a GPU it would not)."""

    def __init__(self, real):
        self.real, self.safe = real, []

    def __call__(self, *args, **kwargs):
        self.safe.append(bool(getattr(args[-1], "value", args[-1])))
        return self.real(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.mark.skipif(DEVICE == "cuda", reason="counts the interpreter's calls of a jitted helper")
@pytest.mark.parametrize("vocab, dtype, view", [(1030, torch.float32, None), (2055, torch.bfloat16, None),
                                                (61, torch.float16, None), (70, torch.float32, "slice")])
def test_finite_rows_are_read_once_whatever_their_tiling(monkeypatch, triton_only, vocab, dtype, view):
    """A row without -inf takes the fast, unguarded pass only, also when its last tile is partial or it has
    unaligned edges (past-the-end positions read as -inf on both sides must not make it look like one), and so
    does a masked vocabulary entry (-inf on both sides); a row with a one-sided -inf is redone with the guard.
    Every value is the reference's."""
    spy = _PassSpy(sym_kl._fwd_pass)
    monkeypatch.setattr(sym_kl, "_fwd_pass", spy)
    base_a, base_b = randn(4, vocab, dtype=dtype), randn(4, vocab, dtype=dtype)
    a, b = (base_a[:, 3:-2], base_b[:, 3:-2]) if view == "slice" else (base_a, base_b)  # unaligned rows
    check(a, b, reduction="none", rtol=1e-4, atol=1e-5)
    assert spy.safe and not any(spy.safe), spy.safe
    spy.safe.clear()
    a, b = a.clone(), b.clone()
    a[2, 5] = b[2, 5] = float("-inf")  # a masked vocabulary entry: contributes 0, no second pass either
    a[3, 7] = float("-inf")  # on one side only, where b's probability underflows: 0, after a guarded pass
    b[3, 7] = -1e4  # (representable in float16 too)
    got = symmetric_kl(a, b, reduction="none").double()
    want = reference_rows(a.double(), b.double())
    for row, col in ((2, 5), (3, 7)):  # the reference's NaN there: compare with the row without the column
        keep = torch.arange(a.shape[-1], device=a.device) != col
        want[row] = reference_rows(a[row:row + 1, keep].double(), b[row:row + 1, keep].double())[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert spy.safe.count(True) == 1  # row 3 only


@pytest.mark.parametrize("before, after, match", [
    ("0", "1", "imported before TRITON_INTERPRET=1 was set, so they were built for a GPU"),
    ("1", "0", "TRITON_INTERPRET=1 was unset after the kernels were built for the interpreter"),
])
def test_interpreter_set_or_unset_after_the_kernels_were_built_is_a_clear_error(before, after, match):
    """triton.jit builds the kernels for the interpreter or a GPU when their module is imported, and Triton reads
    TRITON_INTERPRET again at each launch: a change in between was Triton's own "0 active drivers" error."""
    import os
    import subprocess
    import sys

    code = ("import os, torch\n"
            "import r3f_opt.kernels.sym_kl\n"
            f"os.environ['TRITON_INTERPRET'] = {after!r}\n"
            "from r3f_opt import symmetric_kl\n"
            "try:\n"
            "    symmetric_kl(torch.randn(2, 40), torch.randn(2, 40))\n"
            "except RuntimeError as e:\n"
            "    print(e)\n")
    env = {**os.environ, "TRITON_INTERPRET": before, "R3F_KERNELS": "triton"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert match in out.stdout and "unset R3F_KERNELS" in out.stdout, (out.stdout, out.stderr[-2000:])
