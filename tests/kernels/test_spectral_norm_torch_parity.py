"""PyTorch's own spectral-norm parametrization tests, ported and run on torch's implementation and ours.

The checks are those of ``test_new_spectral_norm*`` in PyTorch's test/nn/test_parametrization.py
(registration structure, training updates, backward through two forwards, removal, eval behaviour,
gradcheck in mixed train/eval modes and w.r.t. the weight, state_dict loading, dim, the naive forward,
the value on a diagonal matrix), without DataParallel. Every test runs in four cases:

* ``torch-f64`` / ``ours-f64``: torch's dtype; ours falls back to torch's maths there by design (the test
  asserts that no kernel ran);
* ``torch-f32`` / ``ours-f32``: float32 with ``R3F_KERNELS=triton``: ours runs the Triton kernels (in the
  interpreter on CPU). A trap on torch's forward fails the test if ours silently falls back, and the
  launch counter must move.

gradcheck needs float64 inputs: in float32 the function under test casts them down and runs in float32,
and the tolerances are loosened for float32 rounding (the same loosened check on torch's float32 path).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from spectral_norm_cases import impl_fixture, on_device  # noqa: F401 (on_device: a fixture)

WEIGHT = "parametrizations.weight.original"
pytestmark = pytest.mark.usefixtures("on_device")

impl = impl_fixture([("torch", torch.float64), ("ours", torch.float64), ("torch", torch.float32),
                     ("ours", torch.float32)], ids=["torch-f64", "ours-f64", "torch-f32", "ours-f32"], seed=0)


def gradcheck(dtype, fn, inputs, **kwargs):
    """torch's gradcheck; below float64 ``fn`` runs in ``dtype`` on the float64 inputs cast down."""
    inputs = tuple(x.detach().double().requires_grad_() for x in inputs)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(fn, inputs, **kwargs)
        return

    def cast(*xs):
        return fn(*(x.to(dtype) for x in xs)).double()

    assert torch.autograd.gradcheck(cast, inputs, eps=1e-3, atol=2e-3, rtol=2e-2, **kwargs)


def close(actual, expected):
    torch.testing.assert_close(actual, expected)  # dtype-based tolerances, as torch's assertEqual


def linear(impl, in_features=3, out_features=4, requires_grad=True):
    m = nn.Linear(in_features, out_features, dtype=impl.dtype)
    m.weight.requires_grad_(requires_grad)
    return impl.sn(m)


def test_registration_structure_and_removal(impl):
    m = impl.sn(nn.Linear(5, 7, dtype=impl.dtype))
    snm = m.parametrizations.weight[0]
    assert snm._u.size() == torch.Size([m.weight.size(0)])
    assert "original" in m.parametrizations.weight._parameters  # the trainable weight
    assert "_u" in snm._buffers and "_v" in snm._buffers  # u, v are buffers
    assert "weight" not in m._buffers and "weight" not in m._parameters  # weight: a plain attribute
    assert m.parametrizations.weight.original.size() == m.weight.size()
    assert m.parametrizations.weight.original.stride() == m.weight.stride()

    parametrize.remove_parametrizations(m, "weight")
    assert not hasattr(m, "parametrizations") and "weight" in m._parameters
    # several times on one parameter, and on several parameters of one module
    impl.sn(m, "weight")
    impl.sn(m, "weight")
    impl.sn(m, "bias")
    parametrize.remove_parametrizations(m, "bias")  # runs the forward (leave_parametrized=True)
    assert "bias" in m._parameters and hasattr(m, "parametrizations") and "weight" not in m._parameters
    parametrize.remove_parametrizations(m, "weight")
    assert not hasattr(m, "parametrizations") and "weight" in m._parameters
    assert not parametrize.is_parametrized(m)


@pytest.mark.parametrize("requires_grad", [True, False])
def test_training_updates_u_v_and_backprop_reaches_the_weight(impl, requires_grad):
    m = linear(impl, requires_grad=requires_grad)
    snm = m.parametrizations.weight[0]
    x = torch.randn(2, 3, dtype=impl.dtype)
    u0, v0 = snm._u.clone(), snm._v.clone()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    opt.zero_grad()
    m(x).sum().backward()
    opt.step()
    out = m(x)
    if requires_grad:
        assert not torch.equal(u0, snm._u) and not torch.equal(v0, snm._v)
        torch.autograd.grad(out.sum(), m.parametrizations.weight.original)

    # backward through two training forwards, u and v reset so finite differences see one function
    saved_u, saved_v = snm._u.clone(), snm._v.clone()

    def fn(inp):
        snm._u.data.copy_(saved_u)
        snm._v.data.copy_(saved_v)
        return m(inp) + m(inp)

    fn(x.clone().requires_grad_()).sum().backward()
    gradcheck(impl.dtype, fn, (x,), check_batched_grad=False)


def test_removal_in_eval_keeps_the_output(impl):
    x = torch.randn(2, 3, dtype=impl.dtype)
    m = linear(impl)
    pre_remove = m(x).detach()
    m.eval()
    parametrize.remove_parametrizations(m, "weight")
    close(m(x), pre_remove)

    impl.sn(m)
    for _ in range(3):
        pre_remove = m(x).detach()
    m.eval()
    parametrize.remove_parametrizations(m, "weight")
    close(m(x), pre_remove)


@pytest.mark.parametrize("requires_grad", [True, False])
def test_eval_repeats_the_last_training_forward(impl, requires_grad):
    x = torch.randn(2, 3, dtype=impl.dtype)
    m = linear(impl, requires_grad=requires_grad)
    snm = m.parametrizations.weight[0]
    m(x)
    last_train_out = m(x)
    last_u, last_v = snm._u.clone(), snm._v.clone()
    m.zero_grad()
    m.eval()
    eval_out = m(x)
    close(eval_out, last_train_out)
    close(eval_out, m(x))  # more eval forwards change nothing
    assert torch.equal(last_u, snm._u) and torch.equal(last_v, snm._v)

    # backward through forwards in mixed training and eval modes (batched gradients checked too)
    saved_u, saved_v = snm._u.clone(), snm._v.clone()

    def fn(inp):
        snm._u.data.copy_(saved_u)
        snm._v.data.copy_(saved_v)
        outs = []
        for training in (True, False, True, False):
            m.train(training)
            outs.append(m(inp))
        return sum(outs)

    gradcheck(impl.dtype, fn, (x,), check_batched_grad=True)
    if requires_grad:  # backprop reaches the weight in eval
        m.eval()
        w = m.parametrizations.weight.original
        gradcheck(impl.dtype, lambda w: functional_call(m, {WEIGHT: w}, (x,)), (w,), check_batched_grad=True)


@pytest.mark.parametrize("activate_times", [0, 3])
def test_load_state_dict(impl, activate_times):
    x = torch.randn(2, 3, dtype=impl.dtype)
    snm = impl.sn(nn.Linear(3, 5, dtype=impl.dtype))
    snm.train()
    for _ in range(activate_times):
        snm(x)
    state_dict = copy.deepcopy(snm.state_dict())
    assert set(state_dict) == {WEIGHT, "bias", "parametrizations.weight.0._v", "parametrizations.weight.0._u"}

    # non-strict loading
    loose = copy.deepcopy(state_dict)
    loose["nonsense"] = "nonsense"
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "nonsense"'):
        snm.load_state_dict(loose, strict=True)
    snm.load_state_dict(loose, strict=False)
    for key in (WEIGHT, "parametrizations.weight.0._u", "parametrizations.weight.0._v"):
        del loose[key]
        snm.load_state_dict(loose, strict=False)
    loose["weight"] = snm.weight.detach().clone()  # W as a buffer
    snm.load_state_dict(loose, strict=False)
    del loose._metadata["parametrizations.weight.0"]
    snm.load_state_dict(loose, strict=False)
    del loose["weight"]
    snm.load_state_dict(loose, strict=False)
    del loose["bias"]
    snm.load_state_dict(loose, strict=False)

    def rewrap(module):  # re-wrapping does not matter
        return impl.sn(parametrize.remove_parametrizations(module, "weight"))

    def outputs(module):
        module.load_state_dict(state_dict)
        with torch.no_grad():
            module.eval()
            out = [module(x)]
            module.train()
            out += [module(x), module(x)]
            module.eval()
            return out + [module(x)]

    want = outputs(rewrap(snm))
    for a, b in zip(outputs(rewrap(snm)), want):
        close(a, b)


def test_dim(impl):
    x = torch.randn(2, 3, 10, 12, dtype=impl.dtype)
    m = impl.sn(nn.ConvTranspose2d(3, 4, (5, 6), dtype=impl.dtype))  # dim 1 (torch's maths for ours)
    snm = m.parametrizations.weight[0]
    m(x)  # no incompatible shapes
    assert snm._u.shape == m.parametrizations.weight.original[0, :, 0, 0].shape
    conv = impl.sn(nn.Conv2d(3, 4, (2, 3), dtype=impl.dtype))  # dim 0 of a 4-D weight: the kernel
    conv(x)
    assert conv.parametrizations.weight[0]._u.shape == conv.parametrizations.weight.original[:, 0, 0, 0].shape


def test_forward_matches_the_naive_computation(impl):
    x = torch.randn(3, 5, dtype=impl.dtype)
    m = impl.sn(nn.Linear(5, 7, dtype=impl.dtype))
    snm = m.parametrizations.weight[0]
    weight = m.parametrizations.weight.original.detach().clone()
    u = F.normalize(weight @ snm._v, dim=0, eps=1e-12)
    v = F.normalize(weight.t() @ u, dim=0, eps=1e-12)
    want = F.linear(x, weight / torch.dot(u, weight @ v), m.bias)
    close(m(x), want)


@pytest.mark.parametrize("complex_", [False, True])
def test_value_on_a_diagonal_matrix(impl, complex_):
    """sigma is the top singular value: a diagonal weight is divided by its largest |entry|."""
    dtype = impl.dtype.to_complex() if complex_ else impl.dtype
    m = nn.Linear(2, 2, dtype=dtype)
    with torch.no_grad():
        # (torch's test takes the init's diagonal; entries far apart in modulus make the 16 power iterations
        # converge in float64 too)
        x = torch.tensor([0.6, -0.25], dtype=dtype)
        m.weight = nn.Parameter(torch.diag(x))
        impl.sn(m)
        impl.expect_launches &= not complex_  # complex weights: torch's maths in ours too, by design
        close(m.weight.data, torch.diag(x / x.abs().max()))
