"""r3f-opt: R3F / R4F fine-tuning regularisers (Aghajanyan et al., ICLR 2021) for PyTorch."""
from .kl import symmetric_kl
from .noise import find_embeddings
from .optimizer import RegularizedOptimizer, StepResult
from .r4f import apply_r4f, remove_r4f

__version__ = "0.1.0"

__all__ = [
    "RegularizedOptimizer",
    "StepResult",
    "symmetric_kl",
    "apply_r4f",
    "remove_r4f",
    "find_embeddings",
    "__version__",
]
