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


PROXIMAL = '{"proximal": 2.0, "proximal_momentum": 0.5}'


def _proximal_trainer(tmp_path, **kw):
    torch.manual_seed(0)
    model = tiny_model("bert", dropout=0.0)
    base = dict(r3f_method="smart", r3f_method_kwargs=PROXIMAL, r3f_lambda=0.0, per_device_train_batch_size=8,
                max_steps=3)
    return R3FTrainer(model=model, args=args(tmp_path, **{**base, **kw}), train_dataset=Rows(8))


@pytest.mark.parametrize("accumulation", [1, 2])
def test_smart_proximal_term_trains_as_with_the_optimizer(tmp_path, accumulation):
    """mu * KL_S(f(x; theta) || f(x; theta_tilde)) with the teacher moved once per optimizer update (not per
    micro-batch): 3 Trainer steps over one batch of 8 (or 2 micro-batches of 4) == 3 RegularizedOptimizer steps."""
    from r3f_opt import RegularizedOptimizer

    trainer = _proximal_trainer(tmp_path, per_device_train_batch_size=8 // accumulation,
                                gradient_accumulation_steps=accumulation)
    trainer.train()
    torch.manual_seed(0)
    ref = tiny_model("bert", dropout=0.0)
    opt = RegularizedOptimizer(torch.optim.SGD(ref.parameters(), lr=0.5), ref, method="smart", lam=0.0, eps=1e-2,
                               method_kwargs={"proximal": 2.0, "proximal_momentum": 0.5})
    batch = Rows(8).batch
    for _ in range(3):
        opt.zero_grad()
        opt.step(lambda: ref(**batch))
    for (n, p), q in zip(trainer.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=n)
    for t, u in zip(trainer.r3f_regularizer.teacher, opt.regularizer.teacher):
        torch.testing.assert_close(t, u, rtol=1e-5, atol=1e-6)
    logged = [h["kl_proximal"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and logged[0] == 0 and all(k > 0 for k in logged[1:]), logged  # teacher = theta at 1


def test_smart_proximal_teacher_is_checkpointed_and_resumed(tmp_path):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2)
    full = _proximal_trainer(tmp_path / "a", **common)
    full.train()
    resumed = _proximal_trainer(tmp_path / "a", **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for t, u in zip(full.r3f_regularizer.teacher, resumed.r3f_regularizer.teacher):
        torch.testing.assert_close(t, u, rtol=1e-5, atol=1e-6)
    (tmp_path / "a" / "checkpoint-2" / "r3f_smart_teacher.pt").unlink()
    start = []  # the teacher at the resumed run's first step: the resumed parameters, not the old teacher
    real = full.r3f_regularizer.teacher_logits
    full.r3f_regularizer.teacher_logits = lambda passes: start.append(
        None if full.r3f_regularizer.teacher is None else [t.clone() for t in full.r3f_regularizer.teacher]) or \
        real(passes)
    with pytest.warns(UserWarning, match="no r3f_smart_teacher.pt: SMART's proximal teacher restarts"):
        full.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))  # the same trainer again
    assert start[0] is None


def test_smart_teacher_stays_for_a_skipped_step(tmp_path, monkeypatch):
    trainer = _proximal_trainer(tmp_path, max_steps=2)
    monkeypatch.setattr(type(trainer.accelerator), "optimizer_step_was_skipped", property(lambda self: True))
    start = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert all(torch.equal(t, s) for t, s in zip(trainer.r3f_regularizer.teacher, start))
    assert not all(torch.equal(p, s) for p, s in zip(trainer.model.parameters(), start))


def test_smart_proximal_is_refused_with_sharded_parameters(tmp_path):
    trainer = _proximal_trainer(tmp_path)
    trainer.is_fsdp_enabled = True
    with pytest.raises(ValueError, match="FSDP and DeepSpeed shard: train with DDP, or set proximal to 0"):
        trainer._r3f_refuse()


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
