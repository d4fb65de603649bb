"""RegularizedOptimizer(fused_lm_head=True): a Hugging Face causal LM trained through the fused linear head +
cross-entropy + symmetric KL equals the logits path step for step, gives the right rows to both terms, never
materialises the logits, and refuses what it cannot honour with nothing changed."""
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from r3f_opt import RegularizedOptimizer
from r3f_opt.linear_kl import CHUNK_BUDGET_BYTES
from r3f_opt.lm_head import FusedLMHead

VOCAB = 97


def tiny_lm(kind: str = "llama", tied: bool = False, dropout: float = 0.0, vocab: int = VOCAB, dtype=torch.float64,
            **extra) -> nn.Module:
    common = dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=tied,
                  attention_dropout=dropout, pad_token_id=0, **extra)
    config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
              "cohere": transformers.CohereConfig, "granite": transformers.GraniteConfig,
              "gemma2": transformers.Gemma2Config}[kind](**common)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).train()
    if tied:
        assert model.lm_head.weight is model.get_input_embeddings().weight
    return model


def padded_batch(seed: int, batch: int = 3, seq: int = 12) -> dict:
    """Right padding on row 0, left padding on row 2, a 3-token prompt (labels -100) on every row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    attn = torch.ones(batch, seq, dtype=torch.long)
    attn[0, -4:] = 0
    attn[2, :2] = 0
    ids = ids.masked_fill(attn == 0, 0)
    labels = ids.masked_fill(attn == 0, -100)
    labels[:, :3] = -100
    return dict(input_ids=ids, attention_mask=attn, labels=labels)


def packed_batch(seed: int) -> dict:
    """Padding-free: three sequences (5, 4, 6 tokens) in one row, positions restarting at each, the first
    label of each sequence -100 (as TRL's and transformers' flattening collators write them)."""
    g = torch.Generator().manual_seed(seed)
    lengths = (5, 4, 6)
    ids = torch.randint(1, VOCAB, (1, sum(lengths)), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    labels[position_ids == 0] = -100
    return dict(input_ids=ids, position_ids=position_ids, labels=labels)


def shifted(labels: torch.Tensor) -> torch.Tensor:
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)


def shifted_mask(labels: torch.Tensor) -> torch.Tensor:
    """The logits rows whose next-token label counts: what the logits path must be given to compare."""
    return shifted(labels) != -100


def reference_closure(model, batch: dict, num_items_in_batch=None):
    """The logits path in float64 throughout: the model's logits and its causal-LM loss (shifted labels,
    ignore_index -100, mean or sum / num_items_in_batch) computed here, since Hugging Face's loss casts the
    logits to float32."""
    def closure():
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        ce = F.cross_entropy(out.logits.flatten(0, -2), shifted(batch["labels"]).flatten(), ignore_index=-100,
                             reduction="mean" if num_items_in_batch is None else "sum")
        return (ce if num_items_in_batch is None else ce / num_items_in_batch), out.logits

    return closure


def train(fused: bool, batches, model_fn=tiny_lm, steps: int = 3, lr: float = 1e-2, closure_kwargs=None, **kw):
    model = model_fn()
    opt = RegularizedOptimizer(torch.optim.AdamW(model.parameters(), lr=lr), model, eps=1e-2, lam=2.0, seed=0,
                               fused_lm_head=fused, **kw)
    torch.manual_seed(1)  # dropout
    results = []
    for step in range(steps):
        batch = batches(step)
        opt.zero_grad()
        if fused:  # the closure as users write it; the KL's rows default to those whose shifted label counts
            closure, mask = (lambda: model(**batch, **(closure_kwargs or {}))), None
        else:
            closure, mask = reference_closure(model, batch, **(closure_kwargs or {})), shifted_mask(batch["labels"])

        results.append(opt.step(closure, mask=mask))
    return model, results


def assert_same_training(a, b, rtol=1e-9, atol=1e-11):
    (model_a, res_a), (model_b, res_b) = a, b
    for ra, rb in zip(res_a, res_b):
        torch.testing.assert_close(ra.task_loss, rb.task_loss.to(ra.task_loss.dtype), rtol=rtol, atol=atol)
        torch.testing.assert_close(ra.sym_kl, rb.sym_kl.to(ra.sym_kl.dtype), rtol=1e-7, atol=1e-12)
        assert rb.sym_kl > 0
    sa, sb = model_a.state_dict(), model_b.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol, msg=k)


@pytest.mark.parametrize("kind, tied, noisy_grad, dropout", [
    ("llama", False, True, 0.0), ("llama", True, False, 0.1), ("qwen2", True, True, 0.0), ("qwen2", False, False, 0.0),
])
def test_fused_equals_the_logits_path_step_for_step(kind, tied, noisy_grad, dropout):
    """Same parameters after 3 AdamW steps (float64), with padding on both sides and -100 prompt labels."""
    def model_fn():
        return tiny_lm(kind, tied, dropout)

    logits = train(False, padded_batch, model_fn, noisy_grad=noisy_grad)
    fused = train(True, padded_batch, model_fn, noisy_grad=noisy_grad)
    assert_same_training(logits, fused)
    before = tiny_lm(kind, tied, dropout).state_dict()
    assert any(not torch.equal(before[k], v) for k, v in fused[0].state_dict().items())  # it did train
    assert fused[1][0].output.loss is None  # the model computed no loss ...
    assert fused[1][0].output.logits.stride()[-1] == 0  # ... and no logits: a zero-stride placeholder


def test_fused_padding_free_packed_batch():
    """Packed sequences (position_ids, no attention mask): the last position of each sequence predicts the
    next sequence's first label, -100, so it counts in neither term."""
    logits = train(False, packed_batch)
    fused = train(True, packed_batch)
    assert_same_training(logits, fused)


def test_fused_num_items_in_batch_and_shift_labels():
    """The loss arguments the closure passes reach the fused CE as they reach the model's own loss."""
    logits = train(False, padded_batch, closure_kwargs=dict(num_items_in_batch=40))
    fused = train(True, padded_batch, closure_kwargs=dict(num_items_in_batch=40))
    assert_same_training(logits, fused)

    def pre_shifted(step):  # labels already shifted (context parallelism passes them so): no shift
        b = padded_batch(step)
        return {**b, "labels": None, "shift_labels": shifted(b["labels"])}

    assert_same_training(train(True, padded_batch, steps=2), train(True, pre_shifted, steps=2))


@pytest.mark.parametrize("kind, extra", [("cohere", dict(logit_scale=0.5)), ("granite", dict(logits_scaling=4.0))])
def test_fused_honours_a_logit_multiplier(kind, extra):
    def model_fn():
        return tiny_lm(kind, True, **extra)

    assert FusedLMHead(model_fn()).scale == (0.5 if kind == "cohere" else 0.25)
    assert_same_training(train(False, padded_batch, model_fn, steps=2), train(True, padded_batch, model_fn, steps=2))


def test_fused_never_materialises_the_logits(monkeypatch):
    """Peak memory of a whole SGD step through the fused path stays below one float32 logits tensor (chunks of
    8 rows); the logits path holds several."""
    from bench.common import peak_extra_bytes

    vocab, rows = 32_768, 4 * 32
    monkeypatch.setitem(CHUNK_BUDGET_BYTES, "cpu", 8 * vocab * 8)  # 8 rows: 2 float32 blocks
    ids = torch.randint(1, vocab, (4, 32))
    peaks = {}
    for fused in (False, True):
        model = tiny_lm(vocab=vocab, dtype=torch.float32)
        opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, eps=1e-2, fused_lm_head=fused)

        def step():
            opt.zero_grad(set_to_none=False)  # gradients stay allocated: the step's peak is its own
            opt.step(lambda: model(input_ids=ids, labels=ids))

        step()
        peaks[fused] = peak_extra_bytes(torch.device("cpu"), step)
    logits = rows * vocab * 4
    assert peaks[True] < 0.5 * logits < 3 * logits < peaks[False], {k: v / logits for k, v in peaks.items()}


# --- what it refuses, with nothing changed ------------------------------------------------------------------
class LoraLikeHead(nn.Module):
    """A head wrapping its Linear (as PEFT's LoRA layer does): its forward adds something W does not hold."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base_layer = base
        self.extra = nn.Linear(base.in_features, base.out_features, bias=False).to(base.weight.dtype)
        self.weight = base.weight

    def forward(self, x):
        return self.base_layer(x) + self.extra(x)


def new_opt(model, **kw):
    return RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, fused_lm_head=True, **kw)


def test_refuses_what_it_cannot_express():
    with pytest.raises(ValueError, match="soft-caps its logits"):
        new_opt(tiny_lm("gemma2", True, final_logit_softcapping=30.0))
    moe = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
                                     num_experts_per_tok=1, output_router_logits=True, router_aux_loss_coef=0.02)
    with pytest.raises(ValueError, match="MoE router loss"):  # the fused objective would drop it
        new_opt(transformers.MixtralForCausalLM(moe))
    moe.output_router_logits = False
    new_opt(transformers.MixtralForCausalLM(moe))
    with pytest.raises(ValueError, match="causal LM"):
        new_opt(transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)))
    with pytest.raises(ValueError, match="applies to r3f and r4f"):
        new_opt(tiny_lm(), method="smart")
    model = tiny_lm()
    with pytest.raises(TypeError, match="True or False"):
        RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, fused_lm_head="yes")
    model = tiny_lm()
    model.lm_head = LoraLikeHead(model.lm_head)
    with pytest.raises(ValueError, match="not a plain nn.Linear"):
        new_opt(model)
    model = tiny_lm()
    model.lm_head.weight = nn.Parameter(torch.zeros(VOCAB, 16, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="quantised or sharded"):
        new_opt(model)
    model = tiny_lm()
    model.lm_head.register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(ValueError, match="patched or hooked"):
        new_opt(model)

    class FullyShardedDataParallel(nn.Module):  # the name FSDP1 wrappers have
        def __init__(self, module):
            super().__init__()
            self.module = module

    with pytest.raises(ValueError, match="FSDP"):
        FusedLMHead(FullyShardedDataParallel(tiny_lm()))


def test_refuses_a_loss_or_logits_it_would_not_reproduce():
    """Models whose loss is not transformers' shifted causal-LM cross-entropy of hidden @ W.T + b."""
    bart = transformers.BartConfig(vocab_size=VOCAB, d_model=16, decoder_layers=1, decoder_attention_heads=2,
                                   decoder_ffn_dim=32, max_position_embeddings=64)
    with pytest.raises(ValueError, match="BartForCausalLM computes its loss without self.loss_function"):
        new_opt(transformers.BartForCausalLM(bart))  # an unshifted cross-entropy
    for attr, value in (("z_loss_coefficient", 1e-4), ("logits_soft_cap", 30.0), ("unpadded_vocab_size", 90)):
        with pytest.raises(ValueError, match=f"changes its logits or adds to its loss .*'{attr}'"):
            new_opt(tiny_lm(**{attr: value}))
    new_opt(tiny_lm(z_loss_coefficient=0.0))  # off: nothing to refuse
    model = tiny_lm()
    model._loss_function = lambda logits, labels, **kw: F.cross_entropy(logits.flatten(0, -2), labels.flatten())
    with pytest.raises(ValueError, match="computes its loss with <lambda>"):
        new_opt(model)

    class LlamaForCausalLM(transformers.LlamaForCausalLM):  # a forward that changes the logits after the head
        def forward(self, input_ids=None, labels=None, **kwargs):
            hidden = self.model(input_ids=input_ids, **kwargs).last_hidden_state
            logits = self.lm_head(hidden)
            logits = 30 * torch.tanh(logits / 30)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=VOCAB) if labels is not None else None
            return transformers.modeling_outputs.CausalLMOutput(loss=loss, logits=logits)

    with pytest.raises(ValueError, match=r"changes its logits after the LM head \('logits = 30 \* torch.tanh"):
        new_opt(LlamaForCausalLM(tiny_lm().config))


def unchanged(model, opt, closure, error, match):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        opt.step(closure)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert "forward" not in model.__dict__ and "forward" not in model.lm_head.__dict__  # patches removed
    logits = model(input_ids=torch.ones(1, 3, dtype=torch.long)).logits  # the model works as before
    assert logits.shape == (1, 3, VOCAB) and logits.stride()[-1] == 1


def test_errors_in_a_step_change_nothing():
    model = tiny_lm()
    opt = new_opt(model)
    b = padded_batch(0)
    unchanged(model, opt, lambda: model(input_ids=b["input_ids"]), ValueError, "without labels")
    unchanged(model, opt, lambda: model(**b, logits_to_keep=1), ValueError, "logits_to_keep")
    unchanged(model, opt, lambda: (model(**b), model(**b))[0], RuntimeError, "once per pass")
    model.lm_head = LoraLikeHead(model.lm_head)  # wrapped after the optimizer was built
    unchanged(model, opt, lambda: model(**b), ValueError, "not a plain nn.Linear")


def test_peft_and_ddp_style_wrappers_are_unwrapped():
    class PeftLike(nn.Module):  # PEFT's LoraModel calls the base model's forward method directly, not __call__
        def __init__(self, base):
            super().__init__()
            self.base = base

        def get_base_model(self):
            return self.base

        def forward(self, **kw):
            return self.base.forward(**kw)

    logits = train(False, padded_batch, steps=2)
    fused = train(True, padded_batch, lambda: PeftLike(tiny_lm()), steps=2)
    assert_same_training(logits, (fused[0].base, fused[1]))


def test_r4f_on_the_lm_head_runs_one_power_iteration_per_step(monkeypatch):
    """Each read of a spectrally normalised weight in training mode runs a power iteration over V x H: the
    fused objective reads it once per step (the logits path once per pass)."""
    from torch.nn.utils.parametrizations import _SpectralNorm

    model = tiny_lm(dtype=torch.float32)
    opt = new_opt(model, method="r4f", eps=1e-2, r4f_kwargs={"head": model.lm_head})
    calls = []
    norm = next(m for m in model.modules() if isinstance(m, _SpectralNorm))
    monkeypatch.setattr(norm, "forward", lambda w, real=norm.forward: calls.append(1) or real(w))
    batch = padded_batch(0)
    result = opt.step(lambda: model(**batch))
    assert len(calls) == 1 and torch.isfinite(result.loss)
