"""pytest-benchmark view of the symmetric-KL implementations: ``pytest bench/ --benchmark-sort=name``.

Forward+backward per call; implementations that cannot run here (Triton and Liger without CUDA) are
skipped with that reason. ``python -m bench`` is the fuller sweep (bandwidth, memory, JSON, plot).
"""
import pytest
import torch

from bench.sym_kl import DTYPES, implementations

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = [(16, 32000), (2, 128256)] + ([(4096, 50265), (1024, 256000)] if DEVICE.type == "cuda" else [])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", ["r3f_triton", "before", "r3f_torch", "eager", "compile", "compile_closed", "liger"])
def test_sym_kl_fwd_bwd(benchmark, impl, shape, dtype):
    fn, why = implementations(DEVICE)[impl]
    if fn is None:
        pytest.skip(why)
    a = torch.randn(*shape, device=DEVICE).to(DTYPES[dtype]).requires_grad_()
    b = torch.randn(*shape, device=DEVICE).to(DTYPES[dtype]).requires_grad_()

    def run():
        grads = torch.autograd.grad(fn(a, b), (a, b))
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return grads

    ga, gb = benchmark(run)
    assert ga.shape == a.shape and torch.isfinite(ga.float()).all()
