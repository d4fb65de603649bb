"""The layers: the core imports torch alone; integrations and tools load only when asked for."""
import subprocess
import sys

import pytest

CHECK = """
import sys
import r3f_opt
from r3f_opt import RegularizedOptimizer, StepResult, symmetric_kl, apply_r4f, remove_r4f, find_embeddings
from r3f_opt import methods, noise, r4f, spectral_norm, kl, optimizer
heavy = sorted(m for m in ("transformers", "triton", "accelerate", "r3f_opt.integrations",
                           "r3f_opt.experiments", "torch._dynamo") if m in sys.modules)  # dynamo: ~1.5 s
assert not heavy, heavy
"""


def test_core_imports_torch_only():
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", ["R3FTrainer", "R3FTrainerMixin", "R3FTrainingArguments"])
def test_public_trainer_names_resolve_lazily(name):
    import r3f_opt
    from r3f_opt.integrations import trainer

    assert getattr(r3f_opt, name) is getattr(trainer, name)
    assert name in r3f_opt.__all__


def test_unknown_attribute_is_an_attribute_error():
    import r3f_opt

    with pytest.raises(AttributeError, match="no attribute 'R5FTrainer'"):
        r3f_opt.R5FTrainer
