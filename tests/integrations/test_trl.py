"""R3FSFTTrainer: TRL's SFTTrainer with R3F, on a tiny Llama with PEFT LoRA and gradient checkpointing.

The loss falls; both sides of the KL receive its gradient (checked against a float64 recomputation from the
captured hidden states); each step runs the model exactly twice (clean, noisy: TRL's extra logits forward is
gone); the fused LM head trains as the logits path does; padding-free batches give the right rows."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("trl", reason="TRL is the optional extra [trl]; CI installs it with [test]")
pytest.importorskip("peft", reason="PEFT is the optional extra [trl]; CI installs it with [test]")
import datasets  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig  # noqa: E402

from r3f_opt import symmetric_kl  # noqa: E402
from r3f_opt.integrations.trl import R3FSFTConfig, R3FSFTTrainer  # noqa: E402

V = 64


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, V)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def dataset():
    """Pre-tokenized prompt + completion rows (completion_mask: completion-only loss), of varying lengths; the
    completion is a function of the prompt, so there is something to learn."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(16):
        prompt = torch.randint(2, V, (2 + i % 3,), generator=g).tolist()
        completion = [(t * 7 + 3) % (V - 2) + 2 for t in prompt] + [1]
        rows.append(dict(input_ids=prompt + completion, completion_mask=[0] * len(prompt) + [1] * len(completion)))
    return datasets.Dataset.from_list(rows)


def tiny_llama():
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def trainer(tmp_path, tokenizer, dataset, lora=True, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=2,
                logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                completion_only_loss=True, max_length=None, gradient_checkpointing=True, r3f_eps=1e-2,
                r3f_noise_scale="relative", r3f_lambda=1.0)
    base.update(kw)
    peft = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear") if lora else None
    return R3FSFTTrainer(model=tiny_llama(), args=R3FSFTConfig(**base), train_dataset=dataset,
                         processing_class=tokenizer, peft_config=peft)


@pytest.mark.parametrize("fused", [False, True])
def test_lora_gradient_checkpointing_loss_falls_two_forwards_per_step(tmp_path, tokenizer, dataset, fused):
    tr = trainer(tmp_path, tokenizer, dataset, max_steps=6, learning_rate=3e-2, r3f_fused_lm_head=fused)
    base = tr.model.get_base_model()
    assert type(tr.model).__name__.startswith("PeftModel")
    calls = []
    base.model.register_forward_hook(lambda m, a, o: calls.append(1))  # the decoder stack: one call per pass
    tr.train()
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing  # on in train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert len(losses) == 6 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    assert len(calls) == 2 * 6  # clean + noisy: no extra logits forward (checkpointing re-runs layers, not this)
    logged = [h for h in tr.state.log_history if "loss" in h]
    assert all("sym_kl" in h and "num_tokens" in h for h in logged)
    assert all("mean_token_accuracy" in h and "entropy" in h for h in logged)  # fused: from its chunks
    assert all(not p.requires_grad for n, p in tr.model.named_parameters() if "lora" not in n)


@pytest.mark.parametrize("fused", [False, True])
def test_both_sides_of_the_kl_receive_gradient(tmp_path, tokenizer, dataset, fused):
    """The gradients reaching the final hidden states of the clean and the noisy pass (LoRA + checkpointing)
    equal those of CE + lam * KL_S recomputed in float64 from them; the KL's share is not negligible."""
    lam = 20.0
    tr = trainer(tmp_path, tokenizer, dataset, max_steps=1, r3f_lambda=lam, r3f_eps=0.1, r3f_fused_lm_head=fused,
                 bf16=False)  # SFTConfig's default is bf16 autocast (on CPU too): float32 here, for the comparison
    base = tr.model.get_base_model()
    hidden, grads, seen = [], [], []

    def keep(module, args, out):
        hidden.append(out.detach())
        out.register_hook(lambda g: grads.append(g.detach()))

    base.model.norm.register_forward_hook(keep)
    compute_loss = tr.compute_loss
    tr.compute_loss = lambda model, inputs, *a, **k: (seen.append(dict(inputs)), compute_loss(model, inputs, *a, **k))[1]
    tr.train()
    assert len(hidden) == 2 and len(grads) == 2
    g_noisy, g_clean = grads  # the backward reaches the later (noisy) pass's output first
    h_c, h_n = (h.double().requires_grad_() for h in hidden)
    w = base.lm_head.weight.detach().double()
    labels = seen[0]["labels"]
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    a, b = h_c @ w.T, h_n @ w.T
    ce = F.cross_entropy(a.flatten(0, 1), shifted.flatten(), ignore_index=-100)
    kl = symmetric_kl(a, b, mask=shifted != -100)
    ref_c, ref_n = torch.autograd.grad(ce + lam * kl, (h_c, h_n), retain_graph=True)
    ce_only = torch.autograd.grad(ce, h_c, retain_graph=True)[0]
    torch.testing.assert_close(g_clean.double(), ref_c, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(g_noisy.double(), ref_n, rtol=1e-4, atol=1e-7)
    assert (ref_c - ce_only).norm() > 1e-3 * ce_only.norm()  # the clean side gets the KL's gradient too
    assert g_noisy.norm() > 1e-3 * ce_only.norm()  # and the noisy side (only the KL reaches it)


def test_fused_trains_as_the_logits_path_on_padding_free_batches(tmp_path, tokenizer, dataset, monkeypatch):
    """padding_free=True packs each batch into one row (position_ids, first label of each sequence -100): the
    fused head and the logits path give the same LoRA weights (SGD: equal gradients give equal steps), and log
    the same entropy and mean token accuracy (the fused head's from its chunks, the logits path's from the logits,
    5 positions at a time here). The KL's reduction is "mean": "batchmean" is refused on such batches (below)."""
    monkeypatch.setattr("r3f_opt.integrations.trl.METRIC_TOKENS", 5)
    states, logs = [], []
    for fused in (False, True):
        tr = trainer(tmp_path / str(fused), tokenizer, dataset, padding_free=True, optim="sgd", learning_rate=0.1,
                     r3f_fused_lm_head=fused, gradient_checkpointing=False, bf16=False, r3f_reduction="mean")
        tr.train()
        states.append({n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad})
        logs.append([(h["entropy"], h["mean_token_accuracy"]) for h in tr.state.log_history if "loss" in h])
    for n in states[0]:
        torch.testing.assert_close(states[1][n], states[0][n], rtol=1e-4, atol=1e-6, msg=n)
    assert len(logs[0]) == 2 and logs[0][0][0] > 1.0  # nats: a near-uniform model over 64 tokens at first
    torch.testing.assert_close(torch.tensor(logs[1]), torch.tensor(logs[0]), rtol=1e-5, atol=1e-6)


def test_arguments_and_refusals(tmp_path, tokenizer, dataset):
    from r3f_opt import R3FTrainingArguments

    args = R3FTrainingArguments(output_dir=str(tmp_path), r3f_lambda=3.0, use_cpu=True, report_to="none")
    tr = R3FSFTTrainer(model=tiny_llama(), args=args, train_dataset=dataset, processing_class=tokenizer)
    assert isinstance(tr.args, R3FSFTConfig) and tr.args.r3f_lambda == 3.0 == tr.r3f_lambda
    with pytest.raises(ValueError, match="loss_type='nll'"):
        trainer(tmp_path, tokenizer, dataset, lora=False, loss_type="dft")
    # A padding-free batch is one row: "batchmean" would sum the KL over every sequence of it.
    for flat in (dict(padding_free=True), dict(packing=True, packing_strategy="bfd", max_length=16)):
        with pytest.raises(ValueError, match="r3f_reduction='mean'"):
            trainer(tmp_path, tokenizer, dataset, lora=False, **flat)


def test_moe_router_loss_is_refused_before_the_model_changes(tmp_path, tokenizer, dataset):
    """R3F's clean pass takes the model's own loss, which would add the router loss at the model's load-time
    coefficient and scale it unlike TRL: refused, on both paths, before the noise or R4F touch the model (R4F
    would fail here otherwise: a causal LM has no classification head)."""
    config = transformers.MixtralConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                                        num_experts_per_tok=1, max_position_embeddings=32, pad_token_id=0,
                                        eos_token_id=1, output_router_logits=True, router_aux_loss_coef=0.02)
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_length=None, r3f_method="r4f")
    for fused in (False, True):
        model = transformers.MixtralForCausalLM(config)
        with pytest.raises(ValueError, match="router_aux_loss_coef=0.0"):
            R3FSFTTrainer(model=model, args=R3FSFTConfig(**base, r3f_fused_lm_head=fused), train_dataset=dataset,
                          processing_class=tokenizer)
        assert not model.get_input_embeddings()._forward_hooks  # no noise hook
        assert not any("parametrizations" in n for n, _ in model.named_modules())  # no spectral norm
    args = R3FSFTConfig(**dict(base, r3f_method="r3f"), router_aux_loss_coef=0.0)
    tr = R3FSFTTrainer(model=transformers.MixtralForCausalLM(config), args=args, train_dataset=dataset,
                       processing_class=tokenizer)
    assert tr.r3f_regularizer is not None and not tr.aux_loss_enabled


def test_lazy_import_and_a_clear_error_without_trl(monkeypatch):
    code = "import sys, r3f_opt; assert 'trl' not in sys.modules and 'peft' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)  # importing r3f_opt imports no TRL
    import r3f_opt
    import r3f_opt.integrations as integrations

    assert r3f_opt.R3FSFTTrainer is R3FSFTTrainer
    monkeypatch.setitem(sys.modules, "trl", None)  # as if TRL were not installed
    monkeypatch.delitem(sys.modules, "r3f_opt.integrations.trl")
    monkeypatch.delattr(integrations, "trl")
    with pytest.raises(ImportError, match=r"the \[trl\] extra: pip install -e '\.\[trl\]'"):
        r3f_opt.R3FSFTConfig
