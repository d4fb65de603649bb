"""r3f-opt: R3F / R4F fine-tuning regularisers (Aghajanyan et al., ICLR 2021) for PyTorch.

The core (this package's top level) imports torch only; ``transformers`` is imported where a function
needs it. ``r3f_opt.integrations`` holds the framework integrations (the Hugging Face Trainer), loaded on
first use of their names; ``r3f_opt.experiments`` the GLUE tools and command lines.
"""
from .kl import symmetric_kl
from .linear_kl import LinearR3FLoss, LinearSymmetricKL, linear_r3f_loss, linear_symmetric_kl
from .noise import find_embeddings
from .optimizer import RegularizedOptimizer, StepResult
from .r4f import apply_r4f, r4f_state_dict, remove_r4f

__version__ = "0.2.0"


def __getattr__(name: str):
    # The Trainer integration imports transformers.Trainer (slow), the TRL one trl (optional): on first use only.
    if name in ("R3FTrainer", "R3FTrainerMixin", "R3FTrainingArguments"):
        from .integrations import trainer

        return getattr(trainer, name)
    if name in ("R3FSFTTrainer", "R3FSFTConfig"):
        try:
            from .integrations import trl
        except ImportError as e:
            raise ImportError(f"{name} needs TRL ({e}); install it with the [trl] extra: pip install -e '.[trl]' "
                              "in the r3f-opt repository") from e
        return getattr(trl, name)
    raise AttributeError(f"module 'r3f_opt' has no attribute {name!r}")


__all__ = [
    "RegularizedOptimizer",
    "StepResult",
    "symmetric_kl",
    "linear_symmetric_kl",
    "linear_r3f_loss",
    "LinearSymmetricKL",
    "LinearR3FLoss",
    "apply_r4f",
    "remove_r4f",
    "r4f_state_dict",
    "find_embeddings",
    "R3FTrainer",
    "R3FTrainerMixin",
    "R3FTrainingArguments",
    "R3FSFTTrainer",
    "R3FSFTConfig",
    "__version__",
]
