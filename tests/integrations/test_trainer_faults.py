"""R3FTrainer under faults (issue 14): SFTTrainer mixed in directly refused, tiny KLs logged, bad arguments named."""
import pytest
import torch
from helpers import tiny_model
from test_trainer import Rows, args
from transformers import Trainer

from r3f_opt import R3FTrainerMixin, R3FTrainingArguments


def test_sft_trainer_mixed_in_directly_is_refused(tmp_path):
    """TRL's SFTTrainer returns no logits with gradient: mixing R3FTrainerMixin into it yourself is refused (use
    R3FSFTTrainer). TRL's class is stood in for by one with its name and module."""
    SFTTrainer = type("SFTTrainer", (Trainer,), {"__module__": "trl.trainer.sft_trainer"})
    Mixed = type("R3FSFT", (R3FTrainerMixin, SFTTrainer), {})
    with pytest.raises(TypeError, match="cannot be mixed into TRL's SFTTrainer.*R3FSFTTrainer"):
        Mixed(model=tiny_model("bert"), args=args(tmp_path), train_dataset=Rows(8))


def test_tiny_kl_is_logged_unrounded(tmp_path, monkeypatch):
    from r3f_opt import R3FTrainer

    trainer = R3FTrainer(model=tiny_model("bert"), args=args(tmp_path), train_dataset=Rows(8))
    logged = []
    monkeypatch.setattr(Trainer, "log", lambda self, logs, *a, **k: logged.append(dict(logs)))
    trainer._kl_sum, trainer._kl_count = torch.tensor(3e-12), 1
    trainer.log({"loss": 0.5})
    assert logged[-1]["sym_kl"] == pytest.approx(3e-12, rel=1e-5)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(r3f_reduction="none"), ValueError, "r3f_reduction"),
    (dict(r3f_lambda=float("inf")), ValueError, "r3f_lambda must be a finite number"),
    (dict(r3f_eps="1e-5"), TypeError, "r3f_eps must be a real number"),
])
def test_bad_r3f_arguments(tmp_path, kw, exc, match):
    with pytest.raises(exc, match=match):
        R3FTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kw)
