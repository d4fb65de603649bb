"""Torch's spectral norm and ours, case by case, for the drop-in tests: the implementation under test, a
trap that fails a test if ours silently runs torch's forward where the kernel must run, and the check
that the kernel launched exactly where it should."""
from collections import Counter

import pytest
import torch
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

from r3f_opt.kernels import spectral_norm as K
from r3f_opt.spectral_norm import FusedSpectralNorm
from r3f_opt.spectral_norm import spectral_norm as our_spectral_norm

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the kernels run in Triton's interpreter
REL = {torch.float64: 1e-7, torch.float32: 1e-4, torch.bfloat16: 3e-2}  # relative tolerance vs float64


@pytest.fixture
def on_device():
    """Every tensor and module of a test on DEVICE (use with ``pytest.mark.usefixtures``)."""
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(None)


class Impl:
    """One implementation in one dtype; ``kernel``: whether ours must run the Triton kernels."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype
        self.sn = torch_spectral_norm if name == "torch" else our_spectral_norm
        self.kernel = name == "ours" and dtype in KERNEL_DTYPES
        self.expect_launches = self.kernel  # a test of a case outside the kernel's reach sets it False
        self.rel = REL[dtype]


def impl_fixture(cases, ids=None, seed=None):
    """A fixture over ``cases`` ((name, dtype) pairs) yielding an :class:`Impl`, with ``R3F_KERNELS=triton``."""
    ids = ids or [f"{n}-{str(d)[6:]}" for n, d in cases]

    @pytest.fixture(params=cases, ids=ids)
    def fixture(request, monkeypatch):
        monkeypatch.setenv("R3F_KERNELS", "triton")
        if seed is not None:
            torch.manual_seed(seed)
        case = Impl(*request.param)
        real_forward = _SpectralNorm.forward

        def trapped(self, weight):
            if (case.kernel and type(self) is FusedSpectralNorm and weight.ndim > 1 and self.dim == 0
                    and weight.dtype in KERNEL_DTYPES and not torch.compiler.is_compiling()):
                raise AssertionError("FusedSpectralNorm fell back to torch's forward where the kernel must run")
            return real_forward(self, weight)

        monkeypatch.setattr(_SpectralNorm, "forward", trapped)
        before = Counter(K.LAUNCHES)
        yield case
        launched = sum((Counter(K.LAUNCHES) - before).values())
        assert (launched > 0) == case.expect_launches, f"{launched} kernel launches in {case.name}/{case.dtype}"

    return fixture
