"""The chunked PyTorch path of symmetric_kl (r3f_opt.kl._SymmetricKLRows): chunk boundaries, both
gradient strategies, masks, edge rows inside chunks, mixed dtypes, retain_graph, no_grad, memory."""
import pytest
import torch
from kl_reference import reference, reference_rows

import r3f_opt.kl as K
from r3f_opt import symmetric_kl

STRATEGIES = {"save": True, "recompute": False, "auto": None}


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    monkeypatch.setenv("R3F_KERNELS", "torch")


def run(a, b, mask=None, chunk_rows=None, save_grads=None, upstream=None):
    """Per-row values and both gradients of the chunked path, for an upstream gradient (default random)."""
    a1, b1 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    m = None if mask is None else mask.reshape(-1)
    rows = K._SymmetricKLRows.apply(a1.reshape(-1, a.shape[-1]), b1.reshape(-1, b.shape[-1]), m, chunk_rows, save_grads)
    g = torch.randn(rows.shape, dtype=torch.float64) if upstream is None else upstream
    (rows * g.to(rows.dtype)).sum().backward()
    return rows, a1.grad, b1.grad, g


def want(a, b, mask, g):
    """float64 reference rows and gradients (masked rows: 0 and zero gradient, never looked at)."""
    a2, b2 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    rows = reference(a2, b2, mask=mask, reduction="none")
    (rows * g).sum().backward()
    return rows, a2.grad, b2.grad


def assert_matches(a, b, mask=None, rtol=1e-5, atol=1e-6, **kw):
    rows, ga, gb, g = run(a, b, mask, **kw)
    w_rows, w_ga, w_gb = want(a, b, mask, g)
    torch.testing.assert_close(rows.double(), w_rows, rtol=rtol, atol=atol)
    grad_tol = dict(rtol=1.6e-2, atol=1e-5) if a.dtype == torch.bfloat16 else dict(rtol=rtol, atol=atol)
    torch.testing.assert_close(ga.double(), w_ga, **grad_tol)
    torch.testing.assert_close(gb.double(), w_gb, **(grad_tol if b.dtype == torch.bfloat16 else dict(rtol=rtol, atol=atol)))
    assert ga.dtype == a.dtype and gb.dtype == b.dtype
    return rows, ga, gb


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 5, 13, 100, None])
def test_every_chunk_size_matches_the_reference(chunk_rows, strategy):
    torch.manual_seed(chunk_rows or 0)
    a = torch.randn(13, 37) * 3  # 13 rows: chunks of 2, 3, 5 leave a short last chunk
    b = a + 0.3 * torch.randn(13, 37)
    assert_matches(a, b, chunk_rows=chunk_rows, save_grads=STRATEGIES[strategy])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_chunking_of_a_long_vocabulary(dtype):
    rows, vocab = 11, 40009  # default: 0.1875 (0.09375 for bf16) of 11 x 40009 elements -> 2 (1) rows per chunk
    assert K.default_chunk_rows(rows, vocab) == 2 and K.default_chunk_rows(rows, vocab, torch.float32, torch.bfloat16) == 1
    a = torch.randn(rows, vocab).to(dtype)
    b = (a.float() + 0.1 * torch.randn(rows, vocab)).to(dtype)
    assert_matches(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_forward_takes_larger_chunks_than_its_backward(monkeypatch):
    """The recompute strategy's forward holds no gradient, so its chunks may be larger (STATS_PASS_FRACTION):
    8 x 32000 bf16 is 2-row chunks in the forward and 1-row chunks in the backward (peak 3x: test below)."""
    seen = []
    real = K._fast_chunk

    def spy(x, y, dtype, ws, stats=None):
        seen.append(("forward" if stats is None else "backward", x.shape[0]))
        return real(x, y, dtype, ws, stats)

    monkeypatch.setattr(K, "_fast_chunk", spy)
    a = torch.randn(8, 32000).to(torch.bfloat16).requires_grad_()
    b = torch.randn(8, 32000).to(torch.bfloat16).requires_grad_()
    symmetric_kl(a, b).backward()
    assert seen == [("forward", 2)] * 4 + [("backward", 1)] * 8


def test_default_chunk_rows_budget():
    big = K.CHUNK_BYTES // 4  # float32 elements per buffer
    assert K.default_chunk_rows(10**7, 2) == big // 2
    assert K.default_chunk_rows(10**7, 2, torch.float64) == K.CHUNK_BYTES // 8 // 2
    # four float32 buffers within 0.75 of one input: 0.1875 N elements (float32 input), 0.09375 N (bfloat16)
    assert K.default_chunk_rows(1_000_000, 2) == int(0.1875 * 2_000_000) // 2
    assert K.default_chunk_rows(1_000_000, 2, torch.float32, torch.bfloat16) == int(0.09375 * 2_000_000) // 2
    assert K.default_chunk_rows(4096, 3) == 4096 and K.default_chunk_rows(3000, 50) == 2**15 // 50  # floor
    assert K.default_chunk_rows(64, 128256) == big // 128256 and K.default_chunk_rows(4, 128256) == 1  # a row is never split
    assert K.default_chunk_rows(3, 5) == 3 and K.default_chunk_rows(1, 1) == 1  # a tiny input is one chunk
    assert K.default_chunk_rows(4096, 32000) == big // 32000 == 16
    with pytest.raises(ValueError, match="chunk_rows must be a positive number of rows"):
        K._SymmetricKLRows.apply(torch.randn(2, 3), torch.randn(2, 3), None, 0)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("chunk_rows", [1, 2, 4, None])
def test_masks_with_whole_chunks_masked(chunk_rows, strategy):
    a, b = torch.randn(11, 9), torch.randn(11, 9)
    mask = torch.tensor([1, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0], dtype=torch.bool)  # chunks of 2 and 4 all masked
    a[~mask] = float("-inf")  # masked rows may hold anything, NaN included
    b[1] = float("nan")
    rows, ga, gb = assert_matches(a, b, mask, chunk_rows=chunk_rows, save_grads=STRATEGIES[strategy])
    assert (rows[~mask] == 0).all()
    assert torch.count_nonzero(ga[~mask]) == 0 and torch.count_nonzero(gb[~mask]) == 0
    # every row masked, NaN upstream on the masked rows: still zero
    none = torch.zeros(11, dtype=torch.bool)
    rows, ga, gb, _ = run(a, b, none, chunk_rows=chunk_rows, save_grads=STRATEGIES[strategy],
                          upstream=torch.full((11,), float("nan"), dtype=torch.float64))
    assert (rows == 0).all() and torch.count_nonzero(ga) == 0 and torch.count_nonzero(gb) == 0


@pytest.mark.parametrize("fast", [True, False], ids=["chunked-cpu", "guarded-one-chunk"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("chunk_rows", [1, 3, None])
def test_edge_rows_inside_chunks(monkeypatch, chunk_rows, strategy, fast):
    """-inf columns, an all -inf row, one-sided -inf, NaN and +inf rows between ordinary ones: each edge row
    gets its documented value and gradient, and its chunk's other rows are untouched by it."""
    monkeypatch.setattr(K, "_chunked", lambda device: fast)
    torch.manual_seed(1)
    a, b = torch.randn(9, 7), torch.randn(9, 7)
    a[1, :2] = b[1, :2] = float("-inf")  # a masked vocabulary: contributes 0
    a[3] = b[3] = float("-inf")  # an empty row: 0, zero gradient
    b[4, 0] = float("-inf")  # supports differ: +inf
    a[5, 3] = float("nan")  # NaN row
    b[7, 6] = float("inf")  # +inf: NaN row
    rows, ga, gb, g = run(a, b, chunk_rows=chunk_rows, save_grads=STRATEGIES[strategy])
    assert rows[3] == 0 and torch.count_nonzero(ga[3]) == 0 and torch.count_nonzero(gb[3]) == 0
    assert rows[4] == float("inf")
    for r in (5, 7):
        assert rows[r].isnan() and ga[r].isnan().all() and gb[r].isnan().all()
    fine = [0, 2, 6, 8]
    w_rows, w_ga, w_gb = want(a[fine], b[fine], None, g[fine])
    torch.testing.assert_close(rows[fine].double(), w_rows, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga[fine].double(), w_ga, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb[fine].double(), w_gb, rtol=1e-5, atol=1e-6)
    fa, fb = a[1:2, 2:].double().requires_grad_(), b[1:2, 2:].double().requires_grad_()  # row 1, finite columns
    (reference_rows(fa, fb) * g[1]).sum().backward()
    torch.testing.assert_close(rows[1].double(), reference_rows(fa, fb)[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga[1, 2:].double(), fa.grad[0], rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(ga[1, :2]) == 0 and torch.count_nonzero(gb[1, :2]) == 0


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.float16, torch.float32), (torch.float32, torch.float64)])
def test_mixed_dtypes(dtypes, strategy):
    a = torch.randn(7, 300).to(dtypes[0])
    b = (a.double() + 0.1 * torch.randn(7, 300, dtype=torch.float64)).to(dtypes[1])
    rows, ga, gb, g = run(a, b, chunk_rows=3, save_grads=STRATEGIES[strategy])
    w_rows, w_ga, w_gb = want(a, b, None, g)
    assert rows.dtype == (torch.float64 if torch.float64 in dtypes else torch.float32)
    torch.testing.assert_close(rows.double(), w_rows, rtol=1e-4, atol=1e-6)
    for got, ref in ((ga, w_ga), (gb, w_gb)):
        tol = {torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=1e-6)}
        torch.testing.assert_close(got.double(), ref, **tol.get(got.dtype, dict(rtol=1e-4, atol=1e-6)))
    assert (ga.dtype, gb.dtype) == dtypes


def test_low_precision_gradient_is_rounded_once():
    """bf16 inputs take the recompute strategy by default: the gradient is the float32 gradient of the same
    maths times the upstream gradient, rounded once. Forcing 'save' rounds twice (unscaled, then scaled)
    and a quarter of the entries come out one bf16 step off."""
    torch.manual_seed(3)
    a = torch.randn(16, 500, dtype=torch.bfloat16)
    b = (a.float() + 0.05 * torch.randn(16, 500)).to(torch.bfloat16)
    g = torch.full((16,), 1 / 3, dtype=torch.float64)  # not a power of two: a second rounding shows
    _, ga32, gb32, _ = run(a.float(), b.float(), upstream=g)
    for save_grads, most in ((None, 0.005), (True, 1.0)):
        _, ga, gb, _ = run(a, b, save_grads=save_grads, upstream=g)
        off = [(x != y.to(torch.bfloat16)).float().mean().item() for x, y in ((ga, ga32), (gb, gb32))]
        assert max(off) <= most and (save_grads is None or min(off) > 0.1), (save_grads, off)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_retain_graph_second_backward_is_the_same(strategy):
    a = torch.randn(6, 40, requires_grad=True)
    b = torch.randn(6, 40, requires_grad=True)
    rows = K._SymmetricKLRows.apply(a, b, None, 4, STRATEGIES[strategy])
    g = torch.randn(6)
    first = torch.autograd.grad(rows, (a, b), g, retain_graph=True)
    second = torch.autograd.grad(rows, (a, b), 2 * g)  # the saved gradients were handed over: recomputed
    torch.testing.assert_close(second[0], 2 * first[0])
    torch.testing.assert_close(second[1], 2 * first[1])


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("which", [0, 1])
def test_one_input_requires_grad(which, strategy):
    a, b = torch.randn(5, 30), torch.randn(5, 30)
    x = (a, b)[which].clone().requires_grad_()
    args = (x, b) if which == 0 else (a, x)
    rows = K._SymmetricKLRows.apply(*args, None, 2, STRATEGIES[strategy])
    (grad,) = torch.autograd.grad(rows.sum(), x)
    a2, b2 = a.double().requires_grad_(), b.double().requires_grad_()
    reference_rows(a2, b2).sum().backward()
    torch.testing.assert_close(grad.double(), (a2.grad, b2.grad)[which], rtol=1e-5, atol=1e-6)


def test_no_grad_computes_no_gradient(monkeypatch):
    calls = []
    real = K._pass
    monkeypatch.setattr(K, "_pass", lambda *args, **kw: calls.append(args[6:8]) or real(*args, **kw))
    a, b = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10, requires_grad=True)
    with torch.no_grad():
        out = symmetric_kl(a, b)
    assert calls == [(False, False)] and not out.requires_grad
    symmetric_kl(a, b).backward()
    assert calls[1] == (True, True) and len(calls) == 2  # float32: gradients in the forward, none after


def test_double_backward_fails_loudly_in_float32():
    a, b = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="differentiable once: a double backward"):
        torch.autograd.grad(symmetric_kl(a, b), a, create_graph=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extra_memory_is_the_gradients_and_a_small_workspace(dtype):
    """Peak bytes allocated during forward + backward (torch profiler memory events, as bench/ measures)
    over one input's bytes: <= 3 (two gradients + chunk workspace), against 8-16 before chunking."""
    from bench.common import peak_extra_bytes

    a = torch.randn(64, 8000).to(dtype).requires_grad_()  # 1 MiB in bf16: above the chunk floor
    b = (a.detach().float() + 0.1 * torch.randn(64, 8000)).to(dtype).requires_grad_()
    peak = peak_extra_bytes(torch.device("cpu"), lambda: torch.autograd.grad(symmetric_kl(a, b), (a, b)))
    assert 2 <= peak / (a.numel() * a.element_size()) <= 3
