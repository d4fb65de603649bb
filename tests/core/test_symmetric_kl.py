"""symmetric_kl against a plain float64 reference, on the PyTorch path and on the Triton kernel.

Every test here runs twice: with R3F_KERNELS=torch, and with R3F_KERNELS=triton (on CPU in Triton's
interpreter; on a CUDA machine, where the interpreter is off, with CUDA as the default device, so the compiled
kernel runs), where the PyTorch path is booby-trapped so a silent fallback fails the test.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kl_reference import check, reference_rows

import r3f_opt.kl
from r3f_opt import symmetric_kl


@pytest.fixture(scope="module", autouse=True, params=["torch", "triton"])
def backend(request):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("R3F_KERNELS", request.param)
        if request.param == "triton":
            torch_path = r3f_opt.kl._SymmetricKLRows.apply

            def trap(a, b, mask):
                assert torch.float64 in (a.dtype, b.dtype), "the PyTorch path ran under R3F_KERNELS=triton"
                return torch_path(a, b, mask)  # float64 is documented to take the PyTorch path

            mp.setattr(r3f_opt.kl._SymmetricKLRows, "apply", trap)
        on_gpu = request.param == "triton" and torch.cuda.is_available()
        if on_gpu:  # tensors made without a device land on the GPU
            torch.set_default_device("cuda")
        try:
            yield request.param
        finally:
            if on_gpu:
                torch.set_default_device(None)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("vocab", [1, 2, 3, 1000, 4097])
def test_matches_reference(reduction, vocab):
    a, b = torch.randn(5, vocab) * 3, torch.randn(5, vocab) * 3
    check(a, b, reduction=reduction)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_token_level_mask(reduction):
    a, b = torch.randn(3, 7, 11), torch.randn(3, 7, 11)
    mask = torch.rand(3, 7) > 0.4
    a[~mask] = float("-inf")  # padded rows may hold anything, even all -inf: they must not leak NaN
    check(a, b, mask=mask, reduction=reduction)


def test_all_rows_masked_is_zero_with_zero_grad():
    a, b = torch.randn(4, 9, requires_grad=True), torch.randn(4, 9, requires_grad=True)
    for reduction in ["batchmean", "sum", "mean"]:
        out = symmetric_kl(a, b, mask=torch.zeros(4, dtype=torch.bool), reduction=reduction)
        assert out.item() == 0.0
        out.backward()
        assert torch.count_nonzero(a.grad) == 0 and torch.count_nonzero(b.grad) == 0


def test_neg_inf_in_both_contributes_zero_not_nan():
    a, b = torch.randn(6, 13), torch.randn(6, 13)
    a[:, :4] = b[:, :4] = float("-inf")  # a masked vocabulary
    a[2] = b[2] = float("-inf")  # a whole row masked out
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    got = symmetric_kl(a1, b1, reduction="none")
    g = torch.randn(6)
    (got * g).sum().backward()
    assert got[2].item() == 0.0 and torch.isfinite(got).all()
    # Reference: the same rows over the finite columns only (p = q = 0 elsewhere), zero gradient there.
    keep = [0, 1, 3, 4, 5]
    fa = a[keep, 4:].double().requires_grad_()
    fb = b[keep, 4:].double().requires_grad_()
    want = reference_rows(fa, fb)
    (want * g[keep].double()).sum().backward()
    torch.testing.assert_close(got[keep].double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a1.grad[keep, 4:].double(), fa.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b1.grad[keep, 4:].double(), fb.grad, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(a1.grad[:, :4]) == 0 and torch.count_nonzero(a1.grad[2]) == 0
    assert torch.count_nonzero(b1.grad[:, :4]) == 0 and torch.count_nonzero(b1.grad[2]) == 0


def test_neg_inf_in_one_side_only_is_infinite_like_the_reference():
    a, b = torch.randn(2, 5), torch.randn(2, 5)
    b[0, 1] = float("-inf")
    got = symmetric_kl(a, b, reduction="none")
    assert got[0].item() == float("inf") and torch.isfinite(got[1])
    assert reference_rows(a, b)[0].item() == float("inf")


def test_identical_and_zero_rows_give_zero():
    a = torch.randn(4, 33)
    assert symmetric_kl(a, a.clone()).item() == 0.0
    z = torch.zeros(3, 8)
    check(z, z.clone())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_compute_in_float32(dtype):
    a, b = torch.randn(6, 50).to(dtype), torch.randn(6, 50).to(dtype)
    check(a, b, rtol=1e-4, atol=1e-5)  # reference is fed the same rounded inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_does_not_lower_the_compute_dtype(dtype):
    """Under CPU bf16 autocast (vecdot is on its lower-precision list) the value and the gradients are the
    ones computed without it, bit for bit."""
    a, b = torch.randn(8, 300).to(dtype), torch.randn(8, 300).to(dtype)
    results = []
    for on in (False, True):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
            kl = symmetric_kl(x, y)
            kl.backward()
        results.append((kl.detach(), x.grad, y.grad))
    for plain, under in zip(*results):
        assert torch.equal(plain, under)


def test_mixed_input_dtypes():
    a, b = torch.randn(6, 50, dtype=torch.bfloat16), torch.randn(6, 50)
    check(a, b, rtol=1e-4, atol=1e-5)
    check(torch.randn(3, 5), torch.randn(3, 5, dtype=torch.float64))


def test_close_distributions_keep_precision_in_bf16():
    # R3F's regime: the two logits differ by ~1e-3; the KL is ~1e-6 and must not be lost to rounding.
    a = torch.randn(8, 300, dtype=torch.bfloat16)
    b = (a.float() + 1e-2 * torch.randn(8, 300)).to(torch.bfloat16)
    got = symmetric_kl(a, b, reduction="none").double()
    want = reference_rows(a, b)
    assert (want > 0).all()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-9)


def test_non_contiguous_and_1d_inputs():
    big_a, big_b = torch.randn(5, 20), torch.randn(20, 5)
    a, b = big_a[:, ::2], big_b.t()[:, 1::2]
    assert not a.is_contiguous() and not b.is_contiguous()
    check(a, b)
    check(torch.randn(7), torch.randn(7))


def test_upstream_gradient_scales():
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    check(a, b, reduction="none", upstream=torch.tensor([0.5, -2.0, 3.0, 0.0], dtype=torch.float64))
    check(a, b, reduction="sum", upstream=torch.tensor(7.5, dtype=torch.float64))


def test_gradcheck_float64():
    a = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, False, True])
    assert torch.autograd.gradcheck(lambda x, y: symmetric_kl(x, y, mask=mask, reduction="none"), (a, b))
    # The closed-form backward is not itself differentiable: a double backward must fail loudly, also when the
    # logits come from a matmul (the second-order term would otherwise flow through the matmul alone, wrong).
    with pytest.raises(RuntimeError, match="differentiable once: a double backward"):
        torch.autograd.grad(symmetric_kl(a, b), a, create_graph=True)
    w = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="differentiable once: a double backward"):
        torch.autograd.grad(symmetric_kl(a @ w, b @ w), a, create_graph=True)
    torch.autograd.grad(symmetric_kl(a @ w, b @ w), a, retain_graph=True)  # a first-order gradient is fine


def test_symmetric_and_nonnegative():
    a, b = torch.randn(10, 17), torch.randn(10, 17)
    ab, ba = symmetric_kl(a, b, reduction="none"), symmetric_kl(b, a, reduction="none")
    torch.testing.assert_close(ab, ba)
    assert (ab >= 0).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reduction="avg"), "reduction"),
        (dict(mask=torch.ones(4, dtype=torch.bool)), "mask"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        symmetric_kl(torch.randn(3, 5), torch.randn(3, 5), **kwargs)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        symmetric_kl(torch.randn(3, 5), torch.randn(3, 6))


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    vocab=st.integers(1, 70),
    scale=st.floats(0.01, 20.0),
    reduction=st.sampled_from(["batchmean", "sum", "mean", "none"]),
    masked=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_random_shapes(lead, vocab, scale, reduction, masked, seed):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    a = torch.randn(*lead, vocab, generator=g) * scale
    b = torch.randn(*lead, vocab, generator=g) * scale
    mask = torch.rand(*lead, generator=g) > 0.5 if masked else None
    check(a, b, mask=mask, reduction=reduction, rtol=1e-4, atol=1e-5 * max(1.0, scale))  # float32 error grows with |d|
