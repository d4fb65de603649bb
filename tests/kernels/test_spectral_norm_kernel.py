"""The fused spectral-norm kernel and its parametrization against torch's spectral_norm.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest) under
R3F_KERNELS=triton; the launch counter (and, in one test, a booby-trapped torch path) proves they ran.
"""
from collections import Counter

import pytest
import torch
from helpers import tiny_model, toy_batch
from torch import nn
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

from r3f_opt import RegularizedOptimizer, apply_r4f, remove_r4f
from r3f_opt.kernels import spectral_norm as K
from r3f_opt.spectral_norm import FusedSpectralNorm
from r3f_opt.spectral_norm import spectral_norm as fused_spectral_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CS, HS = (1, 2, 3, 7, 1000), (1, 17, 384, 1024)
FUSED = Counter({"_sn_fused_fwd_kernel": 1, "_sn_fused_bwd_kernel": 1})


@pytest.fixture(autouse=True)
def triton_mode(monkeypatch):
    monkeypatch.setenv("R3F_KERNELS", "triton")


@pytest.fixture
def tiled(monkeypatch):
    """Force the multi-program path on every head."""
    monkeypatch.setattr(K, "MAX_FUSED_ELEMENTS", 0)


@pytest.fixture
def tiny_tiles(tiled, monkeypatch):
    """The multi-program path with tiny tiles: several row blocks and K splits on small heads."""
    monkeypatch.setattr(K, "TILE_ROWS", 4)
    monkeypatch.setattr(K, "TILE_COLS", 8)


def pair(C: int, H: int, n_iter: int = 1, dtype=torch.float32, seed: int = 0):
    """torch's and our spectrally normalised Linear(H, C) in one state (ours loads torch's state_dict)."""
    torch.manual_seed(seed)
    theirs = torch_spectral_norm(nn.Linear(H, C, bias=False, device=DEVICE, dtype=dtype), n_power_iterations=n_iter)
    ours = fused_spectral_norm(nn.Linear(H, C, bias=False, device=DEVICE, dtype=dtype), n_power_iterations=n_iter)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def state(m: nn.Module):
    """(original weight, u, v) of a spectrally normalised module."""
    p = m.parametrizations.weight
    return p.original, p[0]._u, p[0]._v


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to ``rel`` of the reference's largest entry (float32 arithmetic, other summation order)."""
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * max(scale, 1e-30))


def forward_backward(m: nn.Module, G: torch.Tensor):
    """The effective weight, u, v after the forward, and dL/dW for L = <G, W_eff>."""
    w = m.weight
    w.backward(G)
    orig, u, v = state(m)
    grad, orig.grad = orig.grad, None
    return w.detach(), u.clone(), v.clone(), grad


def assert_same_steps(theirs: nn.Module, ours: nn.Module, G: torch.Tensor, steps: int) -> None:
    """``steps`` training forwards + backwards, then one in eval: same outputs, u, v and gradients."""
    for i in range(steps + 1):
        training = i < steps
        theirs.train(training)
        ours.train(training)
        want = forward_backward(theirs, G)
        got = forward_backward(ours, G)
        for name, a, b in zip(("output", "u", "v", "grad"), got, want):
            assert a.dtype == b.dtype, name
            close(a, b, rel=1e-4 if name == "grad" else 1e-5)


def launched(fn) -> Counter:
    before = Counter(K.LAUNCHES)
    fn()
    return Counter(K.LAUNCHES) - before


@pytest.mark.parametrize("H", HS)
@pytest.mark.parametrize("C", CS)
def test_matches_torch_after_one_and_k_training_forwards_and_in_eval(C, H):
    theirs, ours = pair(C, H)
    G = torch.randn(C, H, device=DEVICE)
    counts = launched(lambda: assert_same_steps(theirs, ours, G, steps=3))
    if K.fits_one_program(C, H):
        assert counts == Counter({"_sn_fused_fwd_kernel": 4, "_sn_fused_bwd_kernel": 4})
    else:  # 1000 x {17, 384, 1024}: the tiled path, 3 training forwards (5 launches) + 1 eval (3)
        assert counts["_sn_matvec_kernel"] == 3 * 2 + 1 and counts["_sn_fused_fwd_kernel"] == 0
        assert counts["_sn_dot_kernel"] == 4


@pytest.mark.parametrize("n_iter", [2, 5])
@pytest.mark.parametrize("C, H", [(3, 17), (1000, 17)])
def test_several_power_iterations_per_forward(C, H, n_iter):
    theirs, ours = pair(C, H, n_iter=n_iter)
    assert_same_steps(theirs, ours, torch.randn(C, H, device=DEVICE), steps=2)


def test_the_kernel_runs_not_torchs_power_iteration(monkeypatch):
    theirs, ours = pair(7, 384)
    G = torch.randn(7, 384, device=DEVICE)
    want_train = forward_backward(theirs, G)
    theirs.eval()
    want_eval = forward_backward(theirs, G)

    def trap(*args, **kwargs):
        raise AssertionError("torch's spectral-norm path ran")

    monkeypatch.setattr(_SpectralNorm, "_power_method", trap)
    monkeypatch.setattr(_SpectralNorm, "forward", trap)
    u_version = state(ours)[1]._version
    got = {}
    assert launched(lambda: got.setdefault("train", forward_backward(ours, G))) == FUSED
    assert state(ours)[1]._version > u_version  # in-place update seen by autograd's version counter
    ours.eval()
    assert launched(lambda: got.setdefault("eval", forward_backward(ours, G))) == FUSED
    for a, b in zip(got["train"] + got["eval"], want_train + want_eval):
        close(a, b, rel=1e-4)
    monkeypatch.setenv("R3F_KERNELS", "torch")  # the trap does catch the fallback
    with pytest.raises(AssertionError, match="torch's spectral-norm path ran"):
        ours.weight


def test_fused_threshold_splits_the_bench_heads():
    assert K.fits_one_program(2, 768) and K.fits_one_program(3, 1024) and K.fits_one_program(7, 1024)
    assert K.fits_one_program(8192, 1) and not K.fits_one_program(9, 1024)
    assert not K.fits_one_program(1000, 4096) and not K.fits_one_program(32000, 4096)
    assert not K.fits_one_program(3, 1024, max_fused_elements=4095)


@pytest.mark.parametrize("n_iter", [1, 2])
@pytest.mark.parametrize("C, H", [(1, 1), (3, 17), (7, 33), (2, 100)])
def test_tiled_path_with_a_forced_threshold(tiny_tiles, C, H, n_iter):
    theirs, ours = pair(C, H, n_iter=n_iter)
    G = torch.randn(C, H, device=DEVICE)
    counts = launched(lambda: assert_same_steps(theirs, ours, G, steps=2))
    # per training forward: 2n matvec + 2n reduce + 1 write; eval: 1 + 1 + 1; backward: 1 dot + 1 write
    assert counts == Counter({"_sn_matvec_kernel": 2 * 2 * n_iter + 1, "_sn_reduce_kernel": 2 * 2 * n_iter + 1,
                              "_sn_rank1_kernel": 3 + 3, "_sn_dot_kernel": 3})


@pytest.mark.parametrize("path", ["fused", "tiled"])
@pytest.mark.parametrize("C, H", [(1, 17), (3, 1024), (7, 384), (1000, 17)])
def test_gradient_against_float64_autograd(request, C, H, path):
    if path == "tiled":
        request.getfixturevalue("tiled")
    _, ours = pair(C, H)
    G = torch.randn(C, H, device=DEVICE)
    w_eff, u, v, grad = forward_backward(ours, G)
    W64 = state(ours)[0].detach().double().requires_grad_()
    u64, v64 = u.double(), v.double()  # the values this forward used, held constant
    out64 = W64 / (u64 @ W64 @ v64)
    out64.backward(G.double())
    close(w_eff.double(), out64.detach(), rel=2e-6)
    close(grad.double(), W64.grad, rel=2e-5)


@pytest.mark.parametrize("path", ["fused", "tiled"])
@pytest.mark.parametrize("C, H", [(1, 17), (7, 33), (3, 100)])
def test_fresh_buffers_are_written_before_they_are_read(request, C, H, path):
    """Every buffer the launchers allocate starts as NaN (u, v, sigma, partial sums, the output and dW): none
    comes out unwritten, and the weight and its gradient equal float64 autograd."""
    if path == "tiled":
        request.getfixturevalue("tiny_tiles")
    _, ours = pair(C, H)
    G = torch.randn(C, H, device=DEVICE)
    request.getfixturevalue("poisoned_allocations")
    w_eff, u, v, grad = forward_backward(ours, G)
    for x in (w_eff, u, v, grad):
        assert not torch.isnan(x).any(), "an unwritten (NaN) entry came out"
    W64 = state(ours)[0].detach().double().requires_grad_()
    out64 = W64 / (u.double() @ W64 @ v.double())
    out64.backward(G.double())
    close(w_eff.double(), out64.detach(), rel=2e-6)
    close(grad.double(), W64.grad, rel=2e-5)


@pytest.mark.parametrize("path", ["fused", "tiled"])
def test_two_training_forwards_then_one_backward(request, path):
    """The R3F pattern: the second forward updates u, v before the first forward's backward."""
    if path == "tiled":
        request.getfixturevalue("tiny_tiles")
    theirs, ours = pair(7, 33)
    x1, x2 = torch.randn(5, 33, device=DEVICE), torch.randn(5, 33, device=DEVICE)
    results = []
    for m in (theirs, ours):
        y1, y2 = m(x1), m(x2)
        ((y1 - y2).pow(2).sum() + y1.sin().sum()).backward()
        results.append((y1.detach(), y2.detach(), *state(m)[1:], state(m)[0].grad))
    for a, b in zip(results[1], results[0]):
        close(a, b, rel=1e-4)


def test_state_dict_from_torch_to_ours_and_back():
    theirs, _ = pair(7, 384, seed=0)
    theirs(torch.randn(2, 384, device=DEVICE))  # move u, v off their registration values
    _, ours = pair(7, 384, seed=1)  # another registration: other u, v
    assert not torch.equal(state(ours)[1], state(theirs)[1])
    sd = theirs.state_dict()
    assert sorted(sd) == ["parametrizations.weight.0._u", "parametrizations.weight.0._v",
                          "parametrizations.weight.original"]
    ours.load_state_dict(sd)  # torch's -> ours
    assert_same_steps(theirs, ours, torch.randn(7, 384, device=DEVICE), steps=2)

    ours.train()
    ours(torch.randn(2, 384, device=DEVICE))  # a kernel update
    back, _ = pair(7, 384, seed=2)
    back.load_state_dict(ours.state_dict())  # ours -> torch's
    assert type(back.parametrizations.weight[0]) is _SpectralNorm
    for a, b in zip(state(back), state(ours)):
        assert torch.equal(a, b)
    assert_same_steps(back, ours, torch.randn(7, 384, device=DEVICE), steps=1)


def planted(C: int, H: int, top: float = 50.0) -> torch.Tensor:
    """A C x H matrix with singular values top, top/2, top/4, ..."""
    k = min(C, H)
    U = torch.linalg.qr(torch.randn(C, k, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(H, k, dtype=torch.float64))[0]
    s = top * 0.5 ** torch.arange(k, dtype=torch.float64)
    return (U * s) @ V.T


@pytest.mark.parametrize("path", ["fused", "tiled"])
@pytest.mark.parametrize("C, H", [(2, 768), (7, 384), (1000, 17)])
def test_training_forwards_drive_sigma_max_to_one(request, C, H, path):
    if path == "tiled":
        request.getfixturevalue("tiled")
    torch.manual_seed(0)
    _, ours = pair(C, H)
    with torch.no_grad():
        state(ours)[0].copy_(planted(C, H))
        ours.eval()
        assert torch.linalg.matrix_norm(ours.weight.double(), ord=2).item() > 1.5  # stale u, v
        ours.train()
        for _ in range(20):
            ours.weight
        ours.eval()
        assert torch.linalg.matrix_norm(ours.weight.double(), ord=2).item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("dtype, rel", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("path", ["fused", "tiled"])
def test_half_precision_weights(request, dtype, rel, path):
    """Float32 arithmetic, results in the weight's dtype, against the same maths in float64."""
    if path == "tiled":
        request.getfixturevalue("tiny_tiles")
    _, ours = pair(7, 33, dtype=dtype)
    W, u0, v0 = (t.detach().double() for t in state(ours))
    G = torch.randn(7, 33, device=DEVICE, dtype=dtype)
    w_eff, u, v, grad = forward_backward(ours, G)
    assert w_eff.dtype == u.dtype == v.dtype == grad.dtype == dtype
    u64 = torch.nn.functional.normalize(W @ v0, dim=0, eps=1e-12)
    v64 = torch.nn.functional.normalize(W.T @ u64, dim=0, eps=1e-12)
    W64 = W.clone().requires_grad_()
    out64 = W64 / (u.double() @ W64 @ v.double())  # backward: the stored (rounded) u, v held constant
    out64.backward(G.double())
    close(u.double(), u64, rel)
    close(v.double(), v64, rel)
    close(w_eff.double(), W / (u64 @ W @ v64), rel)
    close(grad.double(), W64.grad, rel)


@pytest.mark.parametrize("fused", [True, False])
def test_sigma_is_computed_from_the_stored_buffers(fused):
    """u, v pass through the buffers' dtype after each normalisation (torch's out=buffer), so sigma is
    u^T W v of the stored vectors; float16 buffers beside a float32 weight make that visible."""
    torch.manual_seed(0)
    W = torch.randn(7, 33, device=DEVICE, requires_grad=True)
    u = torch.nn.functional.normalize(torch.randn(7, device=DEVICE), dim=0).half()
    v = torch.nn.functional.normalize(torch.randn(33, device=DEVICE), dim=0).half()
    out = K.spectral_normalize(W, u, v, 2, max_fused_elements=None if fused else 0)
    assert u.dtype == v.dtype == torch.float16 and out.dtype == torch.float32
    W64 = W.detach().double()
    close(out.detach().double(), W64 / (u.double() @ W64 @ v.double()), rel=1e-6)


def test_float64_and_non_default_dim_use_torchs_maths():
    theirs, ours = pair(3, 17, dtype=torch.float64)
    G = torch.randn(3, 17, device=DEVICE, dtype=torch.float64)
    assert launched(lambda: assert_same_steps(theirs, ours, G, steps=1)) == {}
    conv = fused_spectral_norm(nn.ConvTranspose1d(4, 3, 2).to(DEVICE))
    assert conv.parametrizations.weight[0].dim == 1
    assert launched(lambda: conv(torch.randn(1, 4, 5, device=DEVICE))) == {}


def test_dispatch_is_decided_per_forward(monkeypatch):
    monkeypatch.setenv("R3F_KERNELS", "auto")
    theirs, ours = pair(3, 17)
    G = torch.randn(3, 17, device=DEVICE)
    want = Counter() if DEVICE == "cpu" else FUSED  # auto: the kernel on CUDA only
    assert launched(lambda: close(forward_backward(ours, G)[0], forward_backward(theirs, G)[0])) == want
    monkeypatch.setenv("R3F_KERNELS", "triton")
    assert launched(lambda: close(forward_backward(ours, G)[0], forward_backward(theirs, G)[0])) == FUSED
    monkeypatch.setenv("R3F_KERNELS", "torch")
    assert launched(lambda: close(forward_backward(ours, G)[0], forward_backward(theirs, G)[0])) == {}


@pytest.mark.parametrize("mode, cls", [("torch", _SpectralNorm), ("triton", FusedSpectralNorm),
                                       ("auto", FusedSpectralNorm)])
def test_apply_r4f_registers_by_mode_idempotent_and_removable(monkeypatch, mode, cls):
    monkeypatch.setenv("R3F_KERNELS", mode)
    model = tiny_model("roberta", dropout=0.0)
    apply_r4f(model, scope="head")
    apply_r4f(model, scope="head")  # no stacking
    for layer in (model.classifier.dense, model.classifier.out_proj):
        (param,) = layer.parametrizations.weight
        assert type(param) is cls
    batch = toy_batch("roberta")
    model(**batch)
    model.eval()
    with torch.no_grad():
        want = model(**batch).logits
    assert remove_r4f(model) == 2
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, want)


def test_apply_r4f_without_triton_registers_torchs_module(monkeypatch):
    import r3f_opt.r4f

    monkeypatch.setattr(r3f_opt.r4f, "triton_available", lambda: False)
    model = tiny_model("bert")
    apply_r4f(model)
    assert type(model.classifier.parametrizations.weight[0]) is _SpectralNorm


def test_conv_weight_is_flattened_like_torch():
    torch.manual_seed(0)
    theirs = torch_spectral_norm(nn.Conv2d(3, 4, 3, device=DEVICE))
    ours = fused_spectral_norm(nn.Conv2d(3, 4, 3, device=DEVICE))
    ours.load_state_dict(theirs.state_dict())
    G = torch.randn(4, 3, 3, 3, device=DEVICE)
    assert launched(lambda: assert_same_steps(theirs, ours, G, steps=2))["_sn_fused_fwd_kernel"] == 3


def test_r3f_step_with_the_kernel_gives_the_parameters_of_the_torch_path(monkeypatch):
    def train(mode: str) -> nn.Module:
        monkeypatch.setenv("R3F_KERNELS", mode)
        torch.manual_seed(0)
        model = tiny_model("roberta")
        opt = RegularizedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, method="r4f",
                                   r4f_kwargs=dict(scope="head"))
        for step in range(3):
            opt.zero_grad()
            opt.step(lambda: model(**toy_batch("roberta", seed=step)))
        return model

    models = []
    counts = launched(lambda: models.append(train("triton")))
    # registration's check forward (a training forward, as in torch) + 3 steps x 2 forwards, 2 Linear layers
    assert counts["_sn_fused_fwd_kernel"] == (1 + 3 * 2) * 2
    assert counts["_sn_fused_bwd_kernel"] == 3 * 2 * 2  # noisy_grad=True: both passes are differentiated
    assert launched(lambda: models.append(train("torch")))["_sn_fused_fwd_kernel"] == 0
    torch.manual_seed(0)
    initial = dict(tiny_model("roberta").named_parameters())
    (kernel, reference) = models
    moved = 0.0
    for (name, a), (_, b) in zip(kernel.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
        key = name.replace("parametrizations.weight.original", "weight")
        moved = max(moved, (b - initial[key]).abs().max().item())
    assert moved > 1e-3  # the steps did change the parameters
    for a, b in zip(kernel.buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bad_arguments():
    W = torch.randn(3, 5, device=DEVICE, requires_grad=True)
    u, v = torch.randn(3, device=DEVICE), torch.randn(5, device=DEVICE)
    with pytest.raises(ValueError, match="2-D"):
        K.spectral_normalize(W[0], u, v, 1)
    with pytest.raises(ValueError, match="2-D"):
        K.spectral_normalize(torch.empty(0, 5, device=DEVICE), torch.empty(0, device=DEVICE), v, 1)
    with pytest.raises(ValueError, match="dtype"):
        K.spectral_normalize(W.double(), u, v, 1)
    with pytest.raises(ValueError, match="u must be a vector of length 3"):
        K.spectral_normalize(W, v, v, 1)
    with pytest.raises(ValueError, match="v must be"):
        K.spectral_normalize(W, u, torch.randn(5, device=DEVICE, requires_grad=True), 1)
    with pytest.raises(ValueError, match="n_power_iterations"):
        K.spectral_normalize(W, u, v, -1)
    with pytest.raises(ValueError, match="n_power_iterations"):
        K.spectral_normalize(W, u, v, 1.0)
    with pytest.raises(ValueError, match="eps"):
        K.spectral_normalize(W, u, v, 1, eps=float("nan"))
    with pytest.raises(ValueError, match="max_fused_elements"):
        K.spectral_normalize(W, u, v, 1, max_fused_elements=-1)
    lin = nn.Linear(5, 3)
    with pytest.raises(ValueError, match="no parameter or buffer named 'kernel'"):
        fused_spectral_norm(lin, "kernel")
    with pytest.raises(ValueError, match="n_power_iterations"):
        fused_spectral_norm(lin, n_power_iterations=0)
    with pytest.raises(ValueError, match="n_power_iterations"):
        fused_spectral_norm(lin, n_power_iterations=1.5)
    assert not hasattr(lin, "parametrizations")  # nothing registered by the failed calls
