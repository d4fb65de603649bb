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
from kl_reference import check, reference_rows

import r3f_opt._dispatch
import r3f_opt.kl
from r3f_opt import RegularizedOptimizer, symmetric_kl
from r3f_opt.kernels import sym_kl

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_only(monkeypatch):
    """R3F_KERNELS=triton with the PyTorch path made to fail."""
    monkeypatch.setenv("R3F_KERNELS", "triton")

    def trap(*args):
        raise AssertionError("the PyTorch path ran under R3F_KERNELS=triton")

    monkeypatch.setattr(r3f_opt.kl._SymmetricKLRows, "apply", trap)


def small_tiles(monkeypatch, block=16, chunk=32):
    """Force tiny tiles (many loop iterations) and a split of each row over programs (the merge path)."""
    monkeypatch.setattr(sym_kl, "_config", lambda *args: sym_kl.Config(block=block, chunk=chunk, num_warps=4))


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
    batch = toy_batch(kind, batch=4, seq=6)
    mask = kl_mask(kind, batch)
    results = {}
    for mode in ["torch", "triton"]:
        monkeypatch.setenv("R3F_KERNELS", mode)
        torch.manual_seed(0)
        model = tiny_model(kind, dropout=0.0)
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
