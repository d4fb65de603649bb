"""R3FTrainer: R3F inside the Hugging Face Trainer (accumulation, bf16 on CPU, checkpoints, evaluation)."""
import pytest
import torch
from helpers import tiny_model, toy_batch
from transformers import Trainer, TrainingArguments

from r3f_opt import R3FTrainer, R3FTrainingArguments
from r3f_opt.noise import EmbeddingNoise


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int = 0, kind: str = "bert"):
        self.batch = toy_batch(kind, batch=n, seq=8, seed=seed)

    def __len__(self):
        return self.batch["input_ids"].shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


@pytest.fixture
def content_noise(monkeypatch):
    """Noise that depends only on the embedding values, so it does not depend on how rows are batched."""

    def perturb(self, output, noise_mask, add=None):
        x = output.detach() if self.detach else output
        return x + self.eps * torch.sin(1e3 * output.detach())

    monkeypatch.setattr(EmbeddingNoise, "_perturb", perturb)


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=0.5, optim="sgd",
                lr_scheduler_type="constant", max_steps=2, use_cpu=True, report_to="none", disable_tqdm=True,
                logging_steps=1, save_strategy="no", seed=0)
    if kw.get("r3f_method", "r3f") != "standard":  # standard reads neither (and would say so)
        base.update(r3f_eps=1e-2, r3f_lambda=5.0)
    base.update(kw)
    return R3FTrainingArguments(**base)


def train(training_args, kind="bert", loss_kwargs=None):
    torch.manual_seed(0)
    model = tiny_model(kind, dropout=0.0)
    trainer = R3FTrainer(model=model, args=training_args, train_dataset=Rows(32, kind=kind))
    if loss_kwargs is not None:
        trainer.model_accepts_loss_kwargs = loss_kwargs
    trainer.train()
    return trainer, {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_close_states(a, b, **tol):
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k, **tol)


@pytest.mark.parametrize("method, reduction", [("standard", None), ("r3f", None), ("r3f", "sum")])
@pytest.mark.parametrize("kind", ["bert", "gpt2-lm"])
def test_accumulation_equals_the_big_batch(tmp_path, content_noise, method, reduction, kind):
    """2 micro-batches of 4 == one batch of 8, on both of the Trainer's loss-scaling branches, for a KL that is
    a mean over rows (averaged over micro-batches) and for one that is a sum (R-Drop's; summed over them).

    gpt2-lm: the model normalises its loss by num_items_in_batch (the Trainer does not divide by the
    accumulation steps; R3FTrainer divides the KL term itself). bert: its classification loss ignores
    num_items_in_batch although its forward takes **kwargs, which transformers reads the other way; R3FTrainer
    tells the Trainer, which then divides the loss (the task term of a plain Trainer would be summed over the
    micro-batches, and the KL's weight relative to it halved).
    """
    kw = dict(r3f_method=method, r3f_reduction=reduction) if reduction else dict(r3f_method=method)
    trainer, accum = train(args(tmp_path / "a", gradient_accumulation_steps=2, **kw), kind)
    _, big = train(args(tmp_path / "b", per_device_train_batch_size=8, **kw), kind)
    assert trainer.model_accepts_loss_kwargs is (kind == "gpt2-lm")
    assert_close_states(accum, big, rtol=1e-4, atol=1e-6)


def test_r3f_changes_training_and_logs_the_kl(tmp_path, content_noise):
    trainer, r3f = train(args(tmp_path / "a"))
    _, standard = train(args(tmp_path / "b", r3f_method="standard"))
    assert any(not torch.allclose(r3f[k], standard[k]) for k in r3f)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(h["sym_kl"] > 0 for h in logged)


def test_bf16_accumulation_save_and_resume(tmp_path):
    common = dict(bf16=True, gradient_accumulation_steps=2, max_steps=4, save_strategy="steps", save_steps=2,
                  learning_rate=0.05, r3f_eps=1e-3)
    trainer, full = train(args(tmp_path, **common))
    assert all(torch.isfinite(v).all() for v in full.values() if v.is_floating_point())
    torch.manual_seed(0)
    model = tiny_model("bert", dropout=0.0)
    resumed = R3FTrainer(model=model, args=args(tmp_path, **common), train_dataset=Rows(32))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 4
    # The noise is keyed by step, so the resumed run draws what the uninterrupted one did.
    assert_close_states({k: v.detach() for k, v in model.state_dict().items()}, full, rtol=1e-5, atol=1e-6)


def test_r4f_normalises_the_head(tmp_path):
    trainer, _ = train(args(tmp_path, r3f_method="r4f"))
    assert "classifier.parametrizations.weight.original" in trainer.model.state_dict()


def test_evaluation_is_untouched(tmp_path):
    torch.manual_seed(0)
    model = tiny_model("bert", dropout=0.0)
    r3f = R3FTrainer(model=model, args=args(tmp_path), eval_dataset=Rows(12, seed=3))
    plain = Trainer(model=model, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to="none"),
                    eval_dataset=Rows(12, seed=3))
    assert r3f.evaluate()["eval_loss"] == pytest.approx(plain.evaluate()["eval_loss"], rel=1e-6)


def test_kl_mask_of_a_causal_lm_is_shifted():
    from r3f_opt.integrations.trainer import _kl_mask

    labels = torch.tensor([[-100, -100, 5, 6, -100]])  # logits at t predict the label at t + 1
    got = _kl_mask({"labels": labels}, torch.zeros(1, 5, 7), causal_lm=True)
    assert got.tolist() == [[False, True, True, False, False]]
    assert _kl_mask({"labels": labels}, torch.zeros(1, 5, 7), causal_lm=False).tolist() == [[False, False, True, True, False]]


def test_kl_mask_takes_shift_labels_and_warns_on_a_shape_mismatch():
    from r3f_opt.integrations.trainer import _kl_mask

    labels = torch.tensor([[-100, -100, 5, 6, -100]])
    shifted = torch.tensor([[-100, 5, -100, -100, 7]])  # a collator's shift_labels: aligned with the logits already
    got = _kl_mask({"labels": labels, "shift_labels": shifted}, torch.zeros(1, 5, 7), causal_lm=True)
    assert got.tolist() == [[False, True, False, False, True]]
    with pytest.warns(UserWarning, match="counts every position"):  # e.g. prompt tuning's virtual tokens
        assert _kl_mask({"labels": labels}, torch.zeros(1, 8, 7), causal_lm=True) is None


def test_vision_language_decoders_count_as_shifting(tmp_path):
    """The Trainer's _loss_shifts_labels (from the model's loss function) also covers *ForConditionalGeneration
    decoders that are not in the causal-LM mapping; a causal-LM class shifts whatever it says."""
    tr = R3FTrainer(model=tiny_model("gpt2-lm"), args=args(tmp_path))
    assert tr._r3f_shifts_labels(tr.model)
    tr._loss_shifts_labels = True
    bert = tiny_model("bert")
    assert tr._r3f_shifts_labels(bert)
    tr._loss_shifts_labels = False
    assert not tr._r3f_shifts_labels(bert) and tr._r3f_shifts_labels(tr.model)


def test_model_init_and_flattened_batches_are_refused(tmp_path):
    with pytest.raises(ValueError, match="model_init"):
        R3FTrainer(model_init=lambda: tiny_model("bert"), args=args(tmp_path))
    R3FTrainer(model_init=lambda: tiny_model("bert"), args=args(tmp_path, r3f_method="standard"))
    # One row holding three sequences (a flattening collator's position_ids): batchmean would sum the KL over all.
    tr = R3FTrainer(model=tiny_model("gpt2-lm"), args=args(tmp_path))
    batch = {k: v[:1] for k, v in toy_batch("gpt2-lm", batch=1, seq=8).items()}
    batch["position_ids"] = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    tr._active = True
    with pytest.raises(ValueError, match="r3f_reduction='mean'"):
        tr.compute_loss(tr.model, dict(batch))
    mean = R3FTrainer(model=tiny_model("gpt2-lm"), args=args(tmp_path, r3f_reduction="mean"))
    mean._active = True
    assert torch.isfinite(mean.compute_loss(mean.model, dict(batch)))
    one = dict(batch, position_ids=torch.arange(8).unsqueeze(0))  # one sequence: batchmean is fine
    assert torch.isfinite(tr.compute_loss(tr.model, one))


def test_find_unused_parameters_and_neftune_are_refused(tmp_path):
    assert args(tmp_path).ddp_find_unused_parameters is False  # R3F's default
    # Plain TrainingArguments: the Trainer's accelerator was built with None (= True for pretrained
    # models); the DDP handler it will wrap the model with must say False.
    plain = R3FTrainer(model=tiny_model("bert"), args=TrainingArguments(str(tmp_path), use_cpu=True, report_to="none"))
    handler = plain.accelerator.ddp_handler
    assert handler is None or handler.find_unused_parameters is False
    with pytest.raises(ValueError, match="find_unused_parameters"):
        R3FTrainer(model=tiny_model("bert"), args=args(tmp_path, ddp_find_unused_parameters=True))
    with pytest.raises(ValueError, match="NEFTune"):
        R3FTrainer(model=tiny_model("bert"), args=args(tmp_path, neftune_noise_alpha=5.0))


@pytest.mark.parametrize("kind, noisy_has_labels", [("gpt2-lm", False), ("bert", False), ("bart-seq2seq", True)])
def test_the_noisy_pass_computes_no_loss(tmp_path, kind, noisy_has_labels):
    """Only the noisy pass's logits are used: it runs without labels (no cross-entropy, no float32 log-softmax),
    except for an encoder-decoder model, which builds its decoder inputs from them."""
    torch.manual_seed(0)
    model = tiny_model(kind, dropout=0.0)
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append("labels" in kw), with_kwargs=True)
    R3FTrainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=Rows(4, kind=kind)).train()
    assert seen == [True, noisy_has_labels]


@pytest.mark.parametrize("kw, match", [
    (dict(r3f_method="r5f"), r"r3f_method must be one of \('r3f', 'r4f', 'standard', 'rdrop', 'smart'\), got 'r5f'$"),
    (dict(r3f_noise="gaussian"), r"the r3f_\* arguments \(named here without r3f_\): noise must be one of"),
    (dict(r3f_method="standard", r3f_noise="gaussian"), r"the r3f_\* arguments .*: noise must be one of"),
])
def test_bad_r3f_arguments_are_refused_at_parse_time(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        args(tmp_path, **kw)


def test_relative_noise_scale_argument(tmp_path):
    with pytest.raises(ValueError, match=r"r3f_\* arguments.*noise_scale must be one of"):
        args(tmp_path, r3f_noise_scale="rms")
    trainer = R3FTrainer(model=tiny_model("bert"), args=args(tmp_path, r3f_noise_scale="relative"),
                         train_dataset=Rows(4))
    assert trainer.r3f_noise.scale == "relative"


def test_noisy_embed_grad_reaches_the_trainer(tmp_path):
    """r3f_noisy_embed_grad=True: the noise is added to the lookup without detaching it, so the noisy pass
    trains the word embeddings too and they end elsewhere than with the default (detached)."""
    tables = {}
    for flag in (False, True):
        trainer, state = train(args(tmp_path / str(flag), r3f_noisy_embed_grad=flag))
        assert trainer.r3f_noise.detach is not flag
        tables[flag] = state["bert.embeddings.word_embeddings.weight"]
    assert not torch.equal(tables[False], tables[True])


def test_r4f_save_model_exports_a_plain_model_and_checkpoints_keep_the_parametrization(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    trainer, _ = train(args(tmp_path, r3f_method="r4f", save_strategy="steps", save_steps=1))
    checkpoint = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    assert "classifier.parametrizations.weight.original" in checkpoint  # resume continues R4F with its u, v
    trainer.save_model(str(tmp_path / "export"))
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert "classifier.weight" in exported and not any("parametrizations" in k for k in exported)
    reloaded, info = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "export"),
                                                                        output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    batch = {k: v for k, v in toy_batch("bert").items() if k != "labels"}
    model = trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**batch).logits, model(**batch).logits, rtol=1e-6, atol=1e-7)
    assert "classifier.parametrizations.weight.original" in model.state_dict()  # the live model is untouched


def test_which_models_hand_num_items_in_batch_to_their_loss(tmp_path):
    """Read from the forward's source: a causal LM passes **kwargs to self.loss_function; BERT's classifier
    computes its own mean and Llama's calls self.loss_function without them. A compiled model is read through."""
    import inspect

    import transformers as tf

    from r3f_opt.integrations.trainer import _passes_num_items

    for cls, passes in [(tf.BertForSequenceClassification, False), (tf.LlamaForSequenceClassification, False),
                        (tf.GPT2ForSequenceClassification, False), (tf.LlamaForCausalLM, True),
                        (tf.GPT2LMHeadModel, True)]:
        assert _passes_num_items(inspect.getsource(cls.forward)) is passes, cls.__name__
    class Subclass(tf.GPT2LMHeadModel):  # a forward that defers to its parent's
        def forward(self, *a, **k):
            return super().forward(*a, **k)

    torch.manual_seed(0)
    sub = Subclass(tiny_model("gpt2-lm").config)
    assert R3FTrainer(model=sub, args=args(tmp_path), train_dataset=Rows(8, kind="gpt2-lm")).model_accepts_loss_kwargs
    compiled = torch.compile(tiny_model("gpt2-lm"))
    trainer = R3FTrainer(model=compiled, args=args(tmp_path), train_dataset=Rows(8, kind="gpt2-lm"))
    assert trainer.model_accepts_loss_kwargs is True
