"""The noise reaches the model where it should, and only there."""
import re

import pytest
import torch
from helpers import kl_mask, tiny_model, toy_batch
from torch import nn

from r3f_opt import RegularizedOptimizer, find_embeddings

KINDS = ["bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta-v2", "bart", "gpt2",
         "gpt2-lm", "bart-seq2seq", "t5-seq2seq"]


def kl_once(kind, eps, **kw):
    torch.manual_seed(0)
    model = tiny_model(kind, dropout=0.0)
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, eps=eps, **kw)
    batch = toy_batch(kind)
    return opt.backward(lambda: model(**batch), mask=kl_mask(kind, batch)).sym_kl.item()


@pytest.mark.parametrize("kind", KINDS)
def test_sigma_zero_gives_exactly_zero_and_sigma_positive_gives_positive_kl(kind):
    # With dropout off the two passes differ only by the noise. RoBERTa is here on purpose: the
    # reference implementation drops its noisy embeddings, so its "noisy" pass equals the clean one.
    assert kl_once(kind, 0.0) == 0.0
    assert kl_once(kind, 1e-2) > 0.0
    assert kl_once(kind, 1e-2, noise="normal") > 0.0


@pytest.mark.parametrize("kind", ["bart-seq2seq", "t5-seq2seq"])
@pytest.mark.parametrize("shared_module", [False, True])
def test_encoder_decoder_perturbs_encoder_tokens_only(kind, shared_module):
    torch.manual_seed(0)
    model = tiny_model(kind, dropout=0.0)
    enc, dec = model.get_encoder(), model.get_decoder()
    if shared_module:  # one embedding module called by both (older transformers, custom models): the hard case
        dec.embed_tokens = enc.embed_tokens
    emb, scope = find_embeddings(model)
    assert emb is enc.embed_tokens and scope is enc
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, eps=1e-2)
    enc_in, dec_in = [], []
    # What the encoder's and the decoder's layers receive: the inputs of their first blocks.
    enc_layer = enc.layers[0] if hasattr(enc, "layers") else enc.block[0]
    dec_layer = dec.layers[0] if hasattr(dec, "layers") else dec.block[0]
    h1 = enc_layer.register_forward_pre_hook(lambda m, a, kw: enc_in.append((a[0] if a else kw["hidden_states"]).clone()), with_kwargs=True)
    h2 = dec_layer.register_forward_pre_hook(lambda m, a, kw: dec_in.append((a[0] if a else kw["hidden_states"]).clone()), with_kwargs=True)
    batch = toy_batch(kind)
    res = opt.backward(lambda: model(**batch), mask=kl_mask(kind, batch))
    h1.remove(), h2.remove()
    assert res.sym_kl > 0
    assert len(enc_in) == 2 and len(dec_in) == 2
    assert not torch.equal(enc_in[0], enc_in[1])  # the encoder's inputs are perturbed
    assert torch.equal(dec_in[0], dec_in[1])  # the decoder's inputs are untouched


def test_noise_is_added_before_embed_scale():
    torch.manual_seed(0)
    model = tiny_model("bart-seq2seq", dropout=0.0)
    emb = model.get_encoder().embed_tokens
    emb.embed_scale = 4.0
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, eps=1e-2)
    outs = []
    # What follows the embedding lookup (+ positions, which are the same in both passes).
    ln = model.get_encoder().layernorm_embedding
    h = ln.register_forward_pre_hook(lambda m, a: outs.append(a[0].clone()))
    batch = toy_batch("bart-seq2seq")
    opt.backward(lambda: model(**batch), mask=kl_mask("bart-seq2seq", batch))
    h.remove()
    diff = (outs[1] - outs[0]).abs().max().item()
    assert 1e-2 < diff <= 4.0 * 1e-2 * 1.001  # |z| <= eps before scaling, so <= 4 eps after


def test_noise_stays_within_bounds_and_is_fresh_each_step():
    model = nn.Embedding(10, 6).double()
    wrapper_model = nn.Sequential(model, nn.Linear(6, 3).double())
    opt = RegularizedOptimizer(torch.optim.SGD(wrapper_model.parameters(), lr=0.0), wrapper_model,
                               embeddings=model, eps=0.25, seed=3)
    x = torch.randint(0, 10, (5, 7))
    seen = []
    h = wrapper_model[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    for _ in range(2):
        opt.backward(lambda: (torch.tensor(0.0, dtype=torch.float64, requires_grad=True), wrapper_model(x)))
    h.remove()
    z1, z2 = seen[1] - seen[0], seen[3] - seen[2]
    assert z1.abs().max() <= 0.25 and z1.abs().max() > 0.2  # U(-eps, eps), 210 draws
    assert not torch.equal(z1, z2)


def test_noise_mask_leaves_padding_clean():
    torch.manual_seed(0)
    model = tiny_model("bert", dropout=0.0)
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, eps=1e-2)
    batch = toy_batch("bert")
    outs = []
    h = model.bert.embeddings.LayerNorm.register_forward_pre_hook(lambda m, a: outs.append(a[0].clone()))
    opt.backward(lambda: model(**batch), noise_mask=batch["attention_mask"])
    h.remove()
    changed = (outs[1] != outs[0]).any(-1)
    assert torch.equal(changed, batch["attention_mask"].bool())
    state = opt.noise.generator.get_state()
    with pytest.raises(ValueError, match="noise_mask"):
        opt.backward(lambda: model(**batch), noise_mask=batch["attention_mask"][:, :3])
    assert torch.equal(opt.noise.generator.get_state(), state)  # refused before any noise was drawn


def test_embedding_table_gets_no_gradient_from_the_noisy_pass_by_default():
    def emb_grad(**kw):
        torch.manual_seed(0)
        model = tiny_model("bert", dropout=0.0)
        opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, eps=1e-2, seed=1, **kw)
        batch = toy_batch("bert")
        opt.backward(lambda: model(**batch))
        return model.bert.embeddings.word_embeddings.weight.grad.clone()

    detached, trained = emb_grad(), emb_grad(noisy_embed_grad=True)
    assert not torch.equal(detached, trained)
    # noisy_grad=False: no graph in the noisy pass at all, so noisy_embed_grad could do nothing: refused
    with pytest.raises(ValueError, match="noisy_grad=False runs that pass without a graph"):
        emb_grad(noisy_grad=False, noisy_embed_grad=True)


def test_noisy_grad_false_builds_no_graph_for_the_noisy_pass():
    torch.manual_seed(0)
    model = tiny_model("bert", dropout=0.0)
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, eps=1e-2, noisy_grad=False)
    flags = []
    h = model.classifier.register_forward_hook(lambda m, i, o: flags.append(o.requires_grad))
    opt.backward(lambda: model(**toy_batch("bert")))
    h.remove()
    assert flags == [True, False]


def test_unwraps_module_wrappers_and_peft_style_models():
    model = tiny_model("bert")
    wrapped = nn.DataParallel(model)  # .module, like DDP / FSDP1
    emb, scope = find_embeddings(wrapped)
    assert emb is model.bert.embeddings.word_embeddings and scope is None

    class PeftLike(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base

        def get_base_model(self):
            return self.base

    assert find_embeddings(PeftLike(wrapped))[0] is model.bert.embeddings.word_embeddings


def test_generator_state_round_trips():
    torch.manual_seed(0)
    model = tiny_model("bert")
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, seed=5)
    opt.noise.sample((3,), torch.device("cpu"))
    sd = opt.state_dict()
    a = opt.noise.sample((4,), torch.device("cpu"))
    other = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, seed=99)
    other.load_state_dict(sd)
    assert torch.equal(other.noise.sample((4,), torch.device("cpu")), a)


def test_low_precision_warning_ignores_masked_out_positions():
    import warnings

    torch.manual_seed(0)
    model = tiny_model("bert").to(torch.bfloat16)
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, eps=0.5)
    batch = toy_batch("bert")
    mask = torch.zeros_like(batch["attention_mask"])
    mask[:, 0] = 1  # most positions unperturbed: bf16 holds eps=0.5 where noise is added, so no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.backward(lambda: model(**batch), noise_mask=mask)


def test_an_active_neftune_hook_is_refused():
    from transformers.integrations.neftune import neftune_post_forward_hook

    model = tiny_model("bert")
    emb = model.get_input_embeddings()
    handle = emb.register_forward_hook(neftune_post_forward_hook)
    emb.neftune_noise_alpha = 5.0
    with pytest.raises(RuntimeError, match="NEFTune"):
        RegularizedOptimizer(torch.optim.SGD(model.parameters()), model)
    handle.remove()
    del emb.neftune_noise_alpha
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    emb.register_forward_hook(neftune_post_forward_hook)  # switched on after the optimizer was built
    emb.neftune_noise_alpha = 5.0
    batch = toy_batch("bert")
    with pytest.raises(RuntimeError, match="NEFTune"):
        opt.step(lambda: model(**batch))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --- noise_scale="relative": eps times each token's embedding RMS ---------------------------------------------
def _perturbation(emb: nn.Module, ids: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean embeddings, noisy - clean) of one pass through EmbeddingNoise on ``emb``."""
    from r3f_opt.noise import EmbeddingNoise

    noise = EmbeddingNoise(emb, None, detach=True, seed=7, **kw)
    clean = emb(ids).detach()
    with noise.active():
        noisy = emb(ids).detach()
    return clean, noisy - clean


@pytest.mark.parametrize("kind", ["uniform", "normal"])
def test_relative_noise_is_eps_times_each_rows_rms(kind):
    torch.manual_seed(0)
    emb = nn.Embedding(20, 8).double()
    with torch.no_grad():
        emb.weight.mul_(torch.logspace(-3, 1, 20, dtype=torch.float64)[:, None])  # rows of very different sizes
    ids = torch.arange(20).reshape(4, 5)
    clean, z_rel = _perturbation(emb, ids, eps=0.1, noise=kind, scale="relative")
    _, z_abs = _perturbation(emb, ids, eps=0.1, noise=kind)  # the same draw, seed 7
    rms = clean.pow(2).mean(-1, keepdim=True).sqrt()  # float64 reference
    torch.testing.assert_close(z_rel, z_abs * rms, rtol=1e-12, atol=0)
    # so the noise-to-signal ratio is the same for every token, whatever its size
    ratio = (z_rel.pow(2).mean(-1).sqrt() / rms.squeeze(-1)).flatten()
    assert ratio.max() / ratio.min() < 3


def test_relative_noise_ignores_embed_scale_which_is_in_the_rms():
    emb = nn.Embedding(10, 16)
    ids = torch.arange(10)[None]
    clean, z = _perturbation(emb, ids, eps=0.1, noise="uniform", scale="relative")
    emb.embed_scale = 4.0  # as BART's scaled embeddings: a module whose output is scaled would be 4x larger
    _, z_flagged = _perturbation(emb, ids, eps=0.1, noise="uniform", scale="relative")
    torch.testing.assert_close(z_flagged, z)  # the RMS of the output already carries the scale


@pytest.mark.parametrize("dtype, std, eps, least", [(torch.bfloat16, 0.02, 1e-2, 0.7),
                                                    (torch.float16, 1.0, 1e-3, 0.65)])
def test_relative_noise_survives_16bit_embeddings_where_absolute_noise_does_not(dtype, std, eps, least):
    import warnings

    torch.manual_seed(0)
    emb = nn.Embedding(1000, 64)
    nn.init.normal_(emb.weight, std=std)  # bf16: a typical LLM embedding table
    emb.to(dtype)
    ids = torch.randint(0, 1000, (8, 32))
    with pytest.warns(UserWarning, match="noise_scale='relative'") as caught:
        _, z = _perturbation(emb, ids, eps=1e-5, noise="uniform")
    assert (z != 0).float().mean() < 0.15 and "r3f_noise_scale" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the noise is representable
        _, z = _perturbation(emb, ids, eps=eps, noise="uniform", scale="relative")
    assert (z != 0).float().mean() > least
    with pytest.warns(UserWarning, match="raise eps"):  # relative but too small: the hint says what to do
        _perturbation(emb, ids, eps=1e-5, noise="uniform", scale="relative")


@pytest.mark.parametrize("std, warns", [(0.02, True), (0.005, False)])
def test_float16_warns_when_rounding_loses_half_the_noise(std, warns):
    """fp16 at eps=1e-5: with entries of std 0.02 (a common init) half of them still change, but the rounding
    error is 63 % of the noise: warned; at std 0.005 the spacing is finer than eps (17 % lost): silent."""
    import warnings

    torch.manual_seed(0)
    emb = nn.Embedding(1000, 64)
    nn.init.normal_(emb.weight, std=std)
    emb.half()
    ids = torch.randint(0, 1000, (8, 32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, z = _perturbation(emb, ids, eps=1e-5, noise="uniform")
    messages = [str(w.message) for w in caught if "cannot represent noise" in str(w.message)]
    assert bool(messages) == warns
    assert (z != 0).float().mean() > (0.4 if warns else 0.8)  # many entries change either way
    if warns:
        assert re.search(r"rounding changed the noise by (5[1-9]|[6-9]\d)% of its size", messages[0])


def test_relative_noise_through_the_optimizer_on_a_bf16_model():
    """A bf16 GPT-2: absolute eps=1e-5 changes few of the entries the first block receives (token + position
    embeddings), relative eps=1e-2 most of them."""
    import warnings

    def changed(**kw):
        torch.manual_seed(0)
        model = tiny_model("gpt2-lm", dropout=0.0).to(torch.bfloat16)
        opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, **kw)
        batch = toy_batch("gpt2-lm")
        seen = []
        h = model.transformer.drop.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = opt.backward(lambda: model(**batch), mask=kl_mask("gpt2-lm", batch))
        h.remove()
        return (seen[1] != seen[0]).float().mean().item(), res.sym_kl.item()

    few, kl_absolute = changed(eps=1e-5)
    most, kl_relative = changed(eps=1e-2, noise_scale="relative")
    assert few < 0.15 and most > 0.5, (few, most)  # measured: 2 % and 63 %
    assert kl_relative > 10 * kl_absolute


def test_noise_scale_errors():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="noise_scale must be one of"):
        RegularizedOptimizer(torch.optim.SGD(model.parameters()), model, noise_scale="rms")
    for method in ("smart", "freelb", "rdrop"):
        with pytest.raises(ValueError, match="applies to r3f and r4f"):
            RegularizedOptimizer(torch.optim.SGD(model.parameters()), model, method=method, noise_scale="relative")
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters()), model, noise_scale="relative")
    assert opt.noise.scale == "relative"
