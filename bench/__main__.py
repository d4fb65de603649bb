"""``python -m bench``: the kernel microbenchmarks with their default sweeps on the device present.

Runs ``bench.spectral_norm`` (R4F head normalisation: fused kernel vs torch's parametrization) and
``bench.sym_kl`` (symmetric KL: Triton kernel, eager, torch.compile, PyTorch path, Liger). Each also runs
alone with its own options (``python -m bench.sym_kl --help``). The training-step cost is
``python -m bench.step_cost`` (standard vs R3F / R4F) and ``python -m bench.methods`` (every regulariser:
R3F, R4F, R-Drop, SMART, FreeLB; seconds, passes counted and peak memory per step).
"""
from . import spectral_norm, sym_kl

if __name__ == "__main__":
    spectral_norm.main([])
    print()
    sym_kl.main([])
