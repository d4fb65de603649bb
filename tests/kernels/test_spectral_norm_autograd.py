"""The spectral-norm drop-in beyond first-order backward, on the kernel path, against torch's answers.

gradcheck / gradgradcheck (float64 inputs; the kernel in float32 with loosened tolerances), double
backward, batched gradients, torch.func (grad, jacrev, vmap, jvp, hessian over functional_call), forward-mode
AD, the weight's layout (channels_last, transposed) and torch's argument rules. Tests run on torch's
implementation and on ours in float32 (some in bfloat16 too) with ``R3F_KERNELS=triton`` (the Triton
interpreter on CPU), and compare with torch's implementation in float64 holding the same state. For ours a
trap fails the test if torch's forward runs where the kernel must, and the launch counter must move.
Where torch's implementation raises (training-mode vmap over the weight, forward-mode AD in training) the
test asserts that it does, and checks ours against the answer torch's maths gives there.
"""
from collections import Counter

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, jvp, vmap
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

from spectral_norm_cases import impl_fixture, on_device  # noqa: F401 (on_device: a fixture)

from r3f_opt.kernels import spectral_norm as K
from r3f_opt.spectral_norm import spectral_norm as our_spectral_norm

WEIGHT = "parametrizations.weight.original"
U, V = "parametrizations.weight.0._u", "parametrizations.weight.0._v"
# torch's forward-mode AD loads its decompositions with torch.jit.script, deprecated in recent torch
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
              pytest.mark.usefixtures("on_device")]


impl = impl_fixture([("torch", torch.float32), ("ours", torch.float32)])
impl_half = impl_fixture([("torch", torch.float32), ("ours", torch.float32), ("torch", torch.bfloat16),
                           ("ours", torch.bfloat16)])


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_tiles(monkeypatch):
    """The multi-program path with tiny tiles on every head."""
    monkeypatch.setattr(K, "MAX_FUSED_ELEMENTS", 0)
    monkeypatch.setattr(K, "TILE_ROWS", 4)
    monkeypatch.setattr(K, "TILE_COLS", 8)


def pair(impl, C=3, H=5, training=True, module=None):
    """(module under test, torch's float64 module) in one state; ``module``: a factory taking a dtype."""
    module = module or (lambda dtype: nn.Linear(H, C, bias=False, dtype=dtype))
    ref = torch_spectral_norm(module(torch.float64))
    m = impl.sn(module(impl.dtype))
    m.load_state_dict(ref.state_dict())
    ref.load_state_dict(m.state_dict())  # both hold the values rounded to impl.dtype
    return m.train(training), ref.train(training)


def close(actual, expected, rel):
    """Equal up to ``rel`` of the reference's largest entry."""
    expected = expected.detach().double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.detach().double(), expected, rtol=rel, atol=rel * max(scale, 1e-30))


def buffers(m):
    return {k: b.detach().clone() for k, b in m.named_buffers()}


def params(m, dtype=None):
    return {k: p.detach().to(dtype or p.dtype) for k, p in m.named_parameters()}


# ----------------------------------------------------------------------------------------------------
# gradcheck / gradgradcheck
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["fused", "tiled"])
def test_gradcheck_and_gradgradcheck_of_the_kernel(path):
    """All of gradcheck's checks (batched gradients, forward mode, batched forward mode) and
    gradgradcheck's (reverse over reverse, forward over reverse), eval (u, v fixed, so W -> W / sigma is
    one function). float64 inputs; the kernel runs in float32 on them."""
    C, H = 2, 3  # (gradgradcheck's cost grows with the square of the size; the interpreter is slow)
    W = torch.randn(C, H, dtype=torch.float64, requires_grad=True)
    u = torch.nn.functional.normalize(torch.randn(C), dim=0)
    v = torch.nn.functional.normalize(torch.randn(H), dim=0)
    limit = None if path == "fused" else 0

    def kernel(w):
        return K.spectral_normalize(w.float(), u, v, 0, max_fused_elements=limit).double()

    def reference(w):
        return w / (u.double() @ w @ v.double())

    loose = dict(eps=1e-3, atol=2e-3, rtol=2e-2)
    before = Counter(K.LAUNCHES)
    assert torch.autograd.gradcheck(reference, (W,), check_batched_grad=True, check_forward_ad=True)
    assert torch.autograd.gradcheck(kernel, (W,), check_batched_grad=True, check_forward_ad=True,
                                    check_batched_forward_grad=True, **loose)
    assert torch.autograd.gradgradcheck(kernel, (W,), check_batched_grad=True, check_fwd_over_rev=True, **loose)
    launched = Counter(K.LAUNCHES) - before
    if path == "fused":
        assert launched["_sn_fused_fwd_kernel"] > 0 and launched["_sn_fused_bwd_kernel"] > 0
    else:
        assert launched["_sn_matvec_kernel"] > 0 and launched["_sn_dot_kernel"] > 0
    # and the first derivatives are the float64 reference's
    G = torch.randn(C, H, dtype=torch.float64)
    (want,) = torch.autograd.grad(reference(W), W, G)
    (got,) = torch.autograd.grad(kernel(W), W, G)
    close(got, want, 1e-5)


def test_gradcheck_and_gradgradcheck_of_the_module_in_eval(impl):
    m, ref = pair(impl, C=2, H=3, training=False)
    x = torch.randn(2, 3, dtype=torch.float64)
    W = m.parametrizations.weight.original.detach().double().requires_grad_()

    def f(w):
        return functional_call(m, {WEIGHT: w.float()}, (x.float(),)).double()

    loose = dict(eps=1e-3, atol=2e-3, rtol=2e-2)
    assert torch.autograd.gradcheck(f, (W,), check_batched_grad=True, check_forward_ad=True, **loose)
    assert torch.autograd.gradgradcheck(f, (W,), check_batched_grad=True, check_fwd_over_rev=True, **loose)


# ----------------------------------------------------------------------------------------------------
# double backward, batched gradients
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False])
def test_double_backward(impl_half, training):
    impl = impl_half
    m, ref = pair(impl, training=training)
    x = torch.randn(4, 5, dtype=torch.float64)
    results = []
    for mod in (m, ref):
        w = mod.parametrizations.weight.original
        y = mod(x.to(w.dtype)).pow(2).sum()
        (g,) = torch.autograd.grad(y, w, create_graph=True)
        (gg,) = torch.autograd.grad(g.pow(2).sum() + (g * w).sum(), w)
        results.append((g, gg, *buffers(mod).values()))
    for got, want in zip(*results):
        close(got, want, impl.rel)


def test_batched_gradients(impl):
    m, ref = pair(impl)
    x = torch.randn(4, 5, dtype=torch.float64)
    G = torch.randn(6, 4, 3, dtype=torch.float64)
    results = []
    for mod in (m, ref):
        w = mod.parametrizations.weight.original
        y = mod(x.to(w.dtype))
        (g,) = torch.autograd.grad(y, w, G.to(w.dtype), is_grads_batched=True)
        results.append(g)
    close(*results, impl.rel)


# ----------------------------------------------------------------------------------------------------
# torch.func over functional_call
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False])
def test_func_grad_jacrev_and_per_sample_gradients(impl, training):
    m, ref = pair(impl, training=training)
    x = torch.randn(4, 5, dtype=torch.float64)
    results = []
    for mod in (m, ref):
        dtype = mod.parametrizations.weight.original.dtype
        W, xs = params(mod)[WEIGHT], x.to(dtype)

        def loss(w, inp):
            return functional_call(mod, {WEIGHT: w}, (inp,)).pow(2).sum()

        results.append((grad(loss)(W, xs), *buffers(mod).values()))  # training: u, v updated, as in torch
        results[-1] += (jacrev(lambda w: functional_call(mod, {WEIGHT: w}, (xs,)))(W),
                        vmap(grad(loss), in_dims=(None, 0))(W, xs[:, None]),  # per-sample gradients
                        *buffers(mod).values())
    for got, want in zip(*results):
        close(got, want, impl.rel)


@pytest.mark.parametrize("training", [True, False])
def test_func_vmap_over_weights(impl, training):
    m, ref = pair(impl, training=training)
    x = torch.randn(4, 5, dtype=torch.float64)
    Ws = params(ref)[WEIGHT] + 0.1 * torch.randn(2, 3, 5, dtype=torch.float64)
    if training:  # each weight would update the one pair of buffers: torch raises, so do we
        for mod in (m, ref):
            dtype = mod.parametrizations.weight.original.dtype
            with pytest.raises(RuntimeError):
                vmap(lambda w: functional_call(mod, {WEIGHT: w}, (x.to(dtype),)))(Ws.to(dtype))
        if impl.kernel:
            m.eval()
            m.weight  # (the trap and counter still see the kernel run on this module)
        return
    got, want = (vmap(lambda w: functional_call(mod, {WEIGHT: w}, (x.to(w.dtype),)))(Ws.to(dtype))
                 for mod, dtype in ((m, impl.dtype), (ref, torch.float64)))
    close(got, want, impl.rel)


@pytest.mark.parametrize("training", [True, False])
def test_func_vmap_over_an_ensemble(impl, training):
    """Stacked parameters and buffers (torch.func's model ensembling): in training each member's power
    iteration updates its own u, v, as running the members one by one does (torch's parametrization
    cannot vmap a training forward: it raises)."""
    members = [pair(impl, training=training) for _ in range(3)]
    x = torch.randn(4, 5, dtype=torch.float64)
    base = members[0][0]

    def stacked(mods, dtype):
        return ({WEIGHT: torch.stack([params(m)[WEIGHT] for m in mods]).to(dtype)},
                {k: torch.stack([buffers(m)[k] for m in mods]) for k in (U, V)})

    p, b = stacked([m for m, _ in members], impl.dtype)
    initial = {k: t.clone() for k, t in b.items()}
    call = vmap(lambda p_, b_: functional_call(base, (p_, b_), (x.to(impl.dtype),)))
    if training and not impl.kernel:
        with pytest.raises(RuntimeError):
            call(p, b)
        return
    got = call(p, b)
    want = torch.stack([ref(x) for _, ref in members])  # one by one, float64
    close(got, want, impl.rel)
    for k in (U, V):  # the stacked buffers were updated in place (training) or left alone (eval)
        close(b[k], torch.stack([buffers(ref)[k] for _, ref in members]), impl.rel)
        assert torch.equal(b[k], initial[k]) != training


@pytest.mark.parametrize("training", [True, False])
def test_forward_mode_jvp_and_forward_ad(impl, training):
    m, ref = pair(impl, training=training)
    x = torch.randn(4, 5, dtype=torch.float64)
    T = torch.randn(3, 5, dtype=torch.float64)

    def func_jvp(mod, dtype):
        return jvp(lambda w: functional_call(mod, {WEIGHT: w}, (x.to(dtype),)), (params(mod)[WEIGHT],),
                   (T.to(dtype),))

    def dual(mod, dtype):
        with fwAD.dual_level():
            out = functional_call(mod, {WEIGHT: fwAD.make_dual(params(mod)[WEIGHT], T.to(dtype))}, (x.to(dtype),))
            return fwAD.unpack_dual(out)

    if training and not impl.kernel:  # torch's power iteration writes with out=: no forward-mode AD
        for fn in (func_jvp, dual):
            with pytest.raises(NotImplementedError):
                fn(m, impl.dtype)
        return
    state = {k: t.clone() for k, t in m.state_dict().items()}
    for fn in (func_jvp, dual):
        got = [*fn(m, impl.dtype), *buffers(m).values()]
        if training:  # torch's maths: this forward's power iteration, then u, v constant
            with torch.no_grad():
                ref(x)
        want = [*fn(ref.eval(), torch.float64), *buffers(ref).values()]
        for a, b in zip(got, want):
            close(a, b, impl.rel)
        m.load_state_dict(state)
        ref.load_state_dict(state)
        ref.train(training)


def test_hessian(impl):
    m, ref = pair(impl, training=False)
    x = torch.randn(4, 5, dtype=torch.float64)
    got, want = (hessian(lambda w: functional_call(mod, {WEIGHT: w}, (x.to(w.dtype),)).pow(3).sum())(params(mod)[WEIGHT])
                 for mod in (m, ref))
    close(got, want, impl.rel)


def test_torch_compile_traces_torchs_maths(impl):
    """Under torch.compile ours takes torch's forward (the compiler fuses it); same outputs, gradients."""
    m, ref = pair(impl)
    x = torch.randn(4, 5, dtype=impl.dtype)
    if impl.kernel:
        m.weight  # (one kernel forward outside the compiled call, for the fixture's counter)
        ref(x.double())
    before = Counter(K.LAUNCHES)
    got = torch.compile(m, backend="eager")(x)
    assert Counter(K.LAUNCHES) == before
    want = ref(x.double())
    close(got, want, impl.rel)
    got.sum().backward()
    want.sum().backward()
    close(m.parametrizations.weight.original.grad, ref.parametrizations.weight.original.grad, impl.rel)


# ----------------------------------------------------------------------------------------------------
# layout
# ----------------------------------------------------------------------------------------------------
def transposed_linear(dtype):
    m = nn.Linear(5, 3, bias=False, dtype=dtype)
    m.weight = nn.Parameter(torch.randn(5, 3, dtype=dtype).T)  # stride (1, 3)
    return m


def channels_last_conv(dtype):
    return nn.Conv2d(3, 4, (2, 3), bias=False, dtype=dtype).to(memory_format=torch.channels_last)


def transposed_channels_last_conv(dtype):
    m = nn.Conv2d(3, 4, (2, 3), bias=False, dtype=dtype)  # memory order (kh, kw, in, out): dim 0 innermost
    m.weight = nn.Parameter(torch.randn(2, 3, 3, 4, dtype=dtype).permute(3, 2, 0, 1))
    return m


def middle_conv(dtype):
    m = nn.Conv1d(3, 4, 2, bias=False, dtype=dtype)  # memory order (in, out, k): dim 0 in the middle
    m.weight = nn.Parameter(torch.randn(3, 4, 2, dtype=dtype).permute(1, 0, 2))
    return m


def strided_linear(dtype):
    m = nn.Linear(5, 3, bias=False, dtype=dtype)
    m.weight = nn.Parameter(torch.randn(3, 10, dtype=dtype)[:, ::2])  # not dense
    return m


LAYOUTS = {"transposed": transposed_linear, "channels_last": channels_last_conv,
           "transposed_channels_last": transposed_channels_last_conv, "dim0_in_the_middle": middle_conv,
           "not_dense": strided_linear}


@pytest.mark.parametrize("path", ["fused", "tiled"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_weight_keeps_its_layout(impl, request, layout, path):
    """torch's ``weight / sigma`` has the weight's strides; so does ours (computed in that layout), with
    torch's u, v updates (a transposed weight runs the iteration on W^T in swapped order), outputs and
    gradients."""
    if path == "tiled":
        request.getfixturevalue("tiny_tiles")
    m, ref = pair(impl, module=LAYOUTS[layout])
    original = m.parametrizations.weight.original
    if layout in ("transposed", "channels_last", "transposed_channels_last"):
        assert not original.is_contiguous()
    G = torch.randn(original.shape, dtype=torch.float64)
    for step in range(3):  # two training forwards + backwards, then eval
        for mod in (m, ref):
            mod.train(step < 2)
        w, w_ref = m.weight, ref.weight
        # torch's `weight / sigma` layout: the weight's strides when it is dense (all but not_dense)
        assert w_ref.stride() == torch.empty_like(ref.parametrizations.weight.original).stride()
        assert w.stride() == torch.empty_like(original).stride() == w_ref.stride()
        assert (w.stride() == original.stride()) == (layout != "not_dense")
        w.backward(G.to(w.dtype))
        w_ref.backward(G)
        for got, want in [(w, w_ref), *zip(buffers(m).values(), buffers(ref).values()),
                          (original.grad, ref.parametrizations.weight.original.grad)]:
            close(got, want, impl.rel)
        original.grad = ref.parametrizations.weight.original.grad = None


def test_a_transposed_weight_is_read_in_place(monkeypatch):
    """No copy of the weight: the fused kernel reads the transposed weight's own memory; one launch
    forward, one backward."""
    monkeypatch.setenv("R3F_KERNELS", "triton")
    m = our_spectral_norm(transposed_linear(torch.float32))
    original = m.parametrizations.weight.original
    seen = []
    real = K._launch

    def spy(kernel, grid, *args, **meta):
        seen.append((kernel.fn.__name__, args[0].data_ptr(), args[1].data_ptr()))
        return real(kernel, grid, *args, **meta)

    monkeypatch.setattr(K, "_launch", spy)
    m.weight.backward(torch.randn(3, 5))
    assert [name for name, *_ in seen] == ["_sn_fused_fwd_kernel", "_sn_fused_bwd_kernel"]
    assert seen[0][1] == original.data_ptr() and seen[1][2] == original.data_ptr()  # W in forward, backward


# ----------------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------------
def test_torchs_argument_rules(impl):
    x = torch.randn(2, 5, dtype=impl.dtype)
    for kwargs in (dict(eps=0.0), dict(n_power_iterations=np.int64(3)), dict(n_power_iterations=2, eps=1e-3)):
        torch.manual_seed(0)
        ref = torch_spectral_norm(nn.Linear(5, 3, dtype=impl.dtype), **kwargs)
        torch.manual_seed(0)
        m = impl.sn(nn.Linear(5, 3, dtype=impl.dtype), **kwargs)
        m.load_state_dict(ref.state_dict())
        for _ in range(2):
            close(m(x), ref(x), 1e-5)
    # a zero weight with eps=0: 0/0, NaN in both
    m = impl.sn(nn.Linear(5, 3, dtype=impl.dtype), eps=0.0)
    with torch.no_grad():
        m.parametrizations.weight.original.zero_()
    assert m.weight.isnan().all()
    assert impl.sn(nn.Linear(5, 3), dim=-1).parametrizations.weight[0].dim == 1  # negative dim
    with pytest.raises(IndexError):
        impl.sn(nn.Linear(5, 3), dim=2)
    with pytest.raises(ValueError):
        impl.sn(nn.Linear(5, 3), n_power_iterations=0)
    with pytest.raises(ValueError):
        impl.sn(nn.Linear(5, 3), "kernel")
