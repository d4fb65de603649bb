"""R3FTrainer with the other methods: SMART and R-Drop train inside compute_loss; FreeLB is refused."""
import pytest
import torch
from helpers import tiny_model, toy_batch
from test_trainer import Rows, args
from transformers import TrainerCallback

from r3f_opt import R3FTrainer, R3FTrainingArguments


class Logs(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, a, state, control, logs=None, **kw):
        self.logs.append(dict(logs or {}))


@pytest.mark.parametrize("method, kwargs", [("rdrop", None), ("smart", '{"adv_steps": 2, "step_size": 0.01}')])
def test_method_trains_and_logs_its_term(tmp_path, method, kwargs):
    torch.manual_seed(0)
    logs = Logs()
    trainer = R3FTrainer(model=tiny_model("bert"), train_dataset=Rows(16), callbacks=[logs],
                         args=args(tmp_path, r3f_method=method, r3f_method_kwargs=kwargs, max_steps=24,
                                   learning_rate=1e-2, optim="adamw_torch", r3f_lambda=1.0,
                                   r3f_eps=1e-3 if method == "smart" else 1e-5))  # rdrop reads no eps
    trainer.train()
    losses = [entry["loss"] for entry in logs.logs if "loss" in entry]
    kls = [entry["sym_kl"] for entry in logs.logs if "sym_kl" in entry]
    assert len(losses) == 24 and sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    assert all(k > 0 for k in kls)
    assert trainer.r3f_regularizer.reduction == ("sum" if method == "rdrop" else "batchmean")


def test_freelb_is_refused_with_the_way_out(tmp_path):
    with pytest.raises(ValueError, match="freelb.*use RegularizedOptimizer"):
        R3FTrainingArguments(output_dir=str(tmp_path), r3f_method="freelb", use_cpu=True, report_to="none")


@pytest.mark.parametrize("kwargs", [{"proximal": 1.0}, '{"proximal": 0.5, "proximal_momentum": 0.9}'])
def test_smart_proximal_term_is_refused_with_the_way_out(tmp_path, kwargs):
    """Its teacher follows the parameters after each optimizer update, which compute_loss never sees."""
    with pytest.raises(ValueError, match=r"proximal'\] > 0.*use RegularizedOptimizer"):
        R3FTrainingArguments(output_dir=str(tmp_path), r3f_method="smart", r3f_method_kwargs=kwargs, use_cpu=True,
                             report_to="none")


def test_a_regression_head_is_refused(tmp_path):
    model = tiny_model("bert")
    model.classifier = torch.nn.Linear(16, 1)  # STS-B: num_labels=1, mean squared error
    model.config.num_labels, model.num_labels = 1, 1
    rows = [{**{k: v[i] for k, v in toy_batch("bert").items()}, "labels": float(i % 3)} for i in range(8)]
    trainer = R3FTrainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=rows)
    with pytest.raises(ValueError, match=r"one output per row \(a regression head"):
        trainer.train()


def test_standard_trainer_names_the_settings_it_ignores(tmp_path):
    with pytest.warns(UserWarning, match=r"method='standard' does not use lam=5.0, reduction='sum'"):
        R3FTrainer(model=tiny_model("bert"), args=args(tmp_path, r3f_method="standard", r3f_lambda=5.0,
                                                       r3f_reduction="sum"))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(r3f_same_dropout=True), ValueError, "same_dropout applies to r3f and r4f"),
    (dict(r3f_noisy_embed_grad=True), ValueError, "noisy_embed_grad applies to"),
    (dict(r3f_method_kwargs='{"bogus": 1}'), TypeError, "not arguments of method='standard'"),
    (dict(r3f_noisy_grad="no"), TypeError, "noisy_grad must be True or False"),
])
def test_standard_trainer_checks_its_settings_as_the_optimizer_does(tmp_path, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        R3FTrainer(model=tiny_model("bert"), args=args(tmp_path, r3f_method="standard", **kwargs))
