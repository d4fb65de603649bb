"""SMART, FreeLB and R-Drop under RegularizedOptimizer: hand-written float64 references of one step, the
ascent, training on BERT / BART / GPT-2, accumulation, resume and non-finite steps for every method."""
import contextlib
import copy
import inspect
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import kl_mask, settings, tiny_model, toy_batch
from kl_reference import reference as kl_reference
from torch import nn

from r3f_opt import RegularizedOptimizer
from r3f_opt.methods import SETTINGS, USES
from r3f_opt.noise import EmbeddingNoise

METHODS = ["standard", "r3f", "r4f", "rdrop", "smart", "freelb"]
SEED = 7


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got, want, **tol):
    assert got.keys() == want.keys()
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, msg=n, **tol)


def bert64(dropout=0.0):
    torch.manual_seed(0)
    return tiny_model("bert", dropout=dropout).double()


def lookup(model, batch):
    return model.bert.embeddings.word_embeddings(batch["input_ids"])


def run_embeds(model, batch, embeds):
    return model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"])


def test_smart_step_matches_a_hand_written_reference():
    sigma, step_size, epsilon, lam = 1e-3, 1e-2, 5e-3, 2.0
    batch, mask = toy_batch("bert"), toy_batch("bert")["attention_mask"]
    model = bert64()
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, method="smart", eps=sigma,
                               lam=lam, seed=SEED, method_kwargs=dict(step_size=step_size, epsilon=epsilon))
    result = opt.step(lambda: model(**batch), noise_mask=mask)
    got = grads(model)

    ref = bert64()
    clean = ref(**batch)
    g = torch.Generator().manual_seed(SEED)
    x = lookup(ref, batch).detach()
    delta = torch.empty(x.shape, dtype=torch.float32).normal_(0.0, sigma, generator=g).requires_grad_(True)
    m = mask.unsqueeze(-1).double()
    adv = run_embeds(ref, batch, x + delta.double() * m).logits
    kl_start = kl_reference(clean.logits.detach(), adv)
    (gd,) = torch.autograd.grad(kl_start, delta)
    delta = (delta.detach() + step_size * gd / gd.abs().amax(-1, keepdim=True).clamp_min(1e-30)).clamp(-epsilon, epsilon)
    adv = run_embeds(ref, batch, x + delta.double() * m).logits
    kl = kl_reference(clean.logits, adv)
    (clean.loss + lam * kl).backward()
    assert_grads_close(got, grads(ref), rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(result.sym_kl, kl.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(result.terms["kl_start"], kl_start.detach().to(result.terms["kl_start"].dtype),
                               rtol=1e-6, atol=0)
    assert 0 < result.terms["delta_max"] <= epsilon


def test_freelb_step_matches_a_hand_written_reference():
    K, adv_lr, init_mag, max_norm = 3, 0.05, 0.2, 0.04
    batch, mask = toy_batch("bert"), toy_batch("bert")["attention_mask"]
    model = bert64()
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, method="freelb", seed=SEED,
                               method_kwargs=dict(adv_steps=K, adv_lr=adv_lr, init_mag=init_mag, max_norm=max_norm))
    result = opt.step(lambda: model(**batch), noise_mask=mask)
    got = grads(model)

    ref = bert64()
    g = torch.Generator().manual_seed(SEED)
    shape = (*batch["input_ids"].shape, ref.config.hidden_size)
    m = mask.double()
    u = torch.empty(shape, dtype=torch.float32).uniform_(-1.0, 1.0, generator=g).double()
    dims = m.sum(1) * shape[-1]
    delta = (u * m.unsqueeze(-1) * (init_mag / dims.sqrt()).view(-1, 1, 1)).requires_grad_(True)
    losses = []
    for k in range(K):
        out = run_embeds(ref, batch, lookup(ref, batch) + delta * m.unsqueeze(-1))  # the lookup trains too
        (out.loss / K).backward()
        losses.append(out.loss.detach())
        if k == K - 1:
            break
        gd = delta.grad
        delta = delta.detach() + adv_lr * gd / gd.flatten(1).norm(dim=1).clamp_min(1e-8).view(-1, 1, 1)
        norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1)
        delta = (delta * (max_norm / norm).clamp(max=1.0)).requires_grad_(True)
    assert_grads_close(got, grads(ref), rtol=1e-5, atol=1e-9)  # delta is float32 in the optimizer
    torch.testing.assert_close(result.task_loss, torch.stack(losses).mean(), rtol=1e-6, atol=0)
    assert result.terms["delta_norm"] <= max_norm * (1 + 1e-5)


def test_rdrop_step_matches_a_hand_written_reference():
    """Dropout on: both passes are replayed from the same global RNG state."""
    lam = 3.0
    batch = toy_batch("bert")
    model = bert64(dropout=0.2)
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, method="rdrop", lam=lam)
    torch.manual_seed(123)
    result = opt.step(lambda: model(**batch))
    got = grads(model)

    ref = bert64(dropout=0.2)
    torch.manual_seed(123)
    one, two = ref(**batch), ref(**batch)
    rows = kl_reference(one.logits, two.logits, reduction="none")
    kl = rows.sum() / 2  # R-Drop's code: the sum over rows of the two directions' mean
    ((one.loss + two.loss) / 2 + lam * kl).backward()
    assert kl > 0  # dropout made the passes differ
    assert_grads_close(got, grads(ref), rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(result.sym_kl, kl.detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("adv_steps", [1, 2])
def test_smart_ascent_ascends_and_stays_in_the_ball(adv_steps):
    torch.manual_seed(0)
    model = tiny_model("bert", dropout=0.0)
    epsilon = 1e-2
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, method="smart", eps=1e-3,
                               method_kwargs=dict(adv_steps=adv_steps, step_size=1e-2, epsilon=epsilon))
    res = opt.step(lambda: model(**toy_batch("bert")))
    assert res.sym_kl > 2 * res.terms["kl_start"] > 0
    assert res.terms["delta_max"] <= epsilon


def test_freelb_ascent_raises_the_task_loss():
    torch.manual_seed(0)
    model = tiny_model("bert", dropout=0.0)
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, method="freelb",
                               method_kwargs=dict(adv_steps=3, adv_lr=0.05))
    losses = opt.step(lambda: model(**toy_batch("bert"))).terms["task_losses"]
    assert losses[0] < losses[1] < losses[2]


@pytest.mark.parametrize("method", METHODS[3:])
@pytest.mark.parametrize("kind", ["bert", "bart-seq2seq", "gpt2-lm"])
def test_every_method_trains(kind, method):
    torch.manual_seed(0)
    model = tiny_model(kind)
    # HF's token-level CE is a mean over tokens: R-Drop's summed KL would outweigh it T-fold, so "mean" here
    reduction = "mean" if method == "rdrop" and kind != "bert" else None
    opt = RegularizedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, method=method, seed=0,
                               **settings(method, eps=1e-3, reduction=reduction))
    batch = toy_batch(kind)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        losses.append(opt.step(lambda: model(**batch), mask=kl_mask(kind, batch),
                               noise_mask=batch["attention_mask"]).task_loss.item())
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses  # as tests/core/test_models.py asks of R3F


@pytest.mark.parametrize("method", ["smart", "freelb"])
def test_encoder_decoder_perturbs_the_encoder_only(method):
    """BART's encoder and decoder share one embedding module: only the encoder's lookups are perturbed."""
    torch.manual_seed(0)
    model = tiny_model("bart-seq2seq", dropout=0.0)
    seen = {"encoder": [], "decoder": []}
    for part in seen:
        getattr(model.model, part).layers[0].register_forward_pre_hook(
            lambda mod, args, kw, part=part: seen[part].append(args[0].detach().clone() if args else
                                                               kw["hidden_states"].detach().clone()),
            with_kwargs=True)
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, method=method,
                               **settings(method, eps=1e-2))
    batch = toy_batch("bart-seq2seq")
    opt.step(lambda: model(**batch), mask=kl_mask("bart-seq2seq", batch))
    dec, enc = seen["decoder"], seen["encoder"]
    assert len(dec) >= 2 and all(torch.equal(d, dec[0]) for d in dec)
    assert not torch.equal(enc[0], enc[-1])


def _split_invariant_noise(monkeypatch):
    """Noise that depends only on the position and the feature, so it does not depend on the batch split."""
    def sample(self, shape, device):
        t = torch.arange(shape[-2] * shape[-1], dtype=torch.float32).reshape(shape[-2:])
        return (self.eps * torch.sin(t)).expand(shape).contiguous()

    monkeypatch.setattr(EmbeddingNoise, "sample", sample)


@pytest.mark.parametrize("method", [m for m in METHODS[1:] if m != "r4f"])  # R4F: u, v move per micro-batch
def test_accumulation_equals_the_big_batch(method, monkeypatch):
    _split_invariant_noise(monkeypatch)
    batch = toy_batch("bert", batch=8)
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    results = []
    for parts in ([batch], halves):
        torch.manual_seed(0)
        model = tiny_model("bert", dropout=0.0).double()
        opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, method=method, seed=1,
                                   **settings(method, eps=1e-2, reduction="batchmean"))
        for part in parts:
            opt.backward(lambda: model(**part), noise_mask=part["attention_mask"], weight=1 / len(parts))
        results.append(grads(model))
    assert_grads_close(results[1], results[0], rtol=1e-7, atol=1e-12)


def _resume_twice(method: str, method_kwargs=None, corrupt=None):
    """Train 2 steps, save, train 2 more; a fresh run loaded from the save and trained 2 steps must end bit
    for bit where the first did. ``corrupt(saved_opt_state)`` is first refused by the fresh optimizer."""
    batches = [toy_batch("bert", seed=s) for s in range(4)]

    def build():
        torch.manual_seed(0)
        model = tiny_model("bert", dropout=0.1)
        return model, RegularizedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, method=method,
                                           seed=5, method_kwargs=method_kwargs, **settings(method, eps=1e-3))

    def train(model, opt, part):
        for b in part:
            opt.zero_grad()
            opt.step(lambda: model(**b), noise_mask=b["attention_mask"])

    model, opt = build()
    train(model, opt, batches[:2])
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()})
    train(model, opt, batches[2:])
    again, again_opt = build()
    if corrupt is not None:
        bad = copy.deepcopy(saved["opt"])
        corrupt(bad)
        with pytest.raises(ValueError):
            again_opt.load_state_dict(bad)
        assert len(again_opt.state) == 0  # nothing half-loaded
    again.load_state_dict(saved["model"])
    again_opt.load_state_dict(saved["opt"])
    torch.set_rng_state(saved["rng"])
    train(again, again_opt, batches[2:])
    for (n, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), n
    return saved, again_opt


@pytest.mark.parametrize("method", METHODS)
def test_resume_is_bit_exact(method):
    _resume_twice(method)


@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_loss_is_skipped(method):
    torch.manual_seed(0)
    model = tiny_model("bert")
    opt = RegularizedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, method=method)
    before = copy.deepcopy(model.state_dict())
    batch = toy_batch("bert")

    def poisoned():
        out = model(**batch)
        return out.loss * math.nan, out.logits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = opt.step(poisoned)
    assert res.skipped and opt.nonfinite_steps == 1 and len(opt.state) == 0
    for k, v in model.state_dict().items():
        if not k.endswith(("._u", "._v")):  # R4F's power iteration ran in the forward passes (documented)
            assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(method="smart", method_kwargs={"adv_lr": 0.1}), TypeError, r"\['adv_lr'\] are not arguments of method='smart'"),
    (dict(method="freelb", method_kwargs={"adv_steps": 0}), ValueError, "adv_steps.*>= 1"),
    (dict(method="freelb", method_kwargs={"adv_steps": 1.5}), TypeError, "adv_steps.*an int"),
    (dict(method="r3f", method_kwargs={"adv_steps": 2}), TypeError, "takes none"),
])
def test_bad_method_kwargs(kwargs, exc, match):
    model = tiny_model("bert")
    with pytest.raises(exc, match=match):
        RegularizedOptimizer(torch.optim.AdamW(model.parameters()), model, **kwargs)


def test_rdrop_default_reduction_is_r_drops_sum():
    model = tiny_model("bert")
    opt = RegularizedOptimizer(torch.optim.AdamW(model.parameters()), model, method="rdrop")
    assert opt.regularizer.reduction == "sum"
    assert RegularizedOptimizer(torch.optim.AdamW(model.parameters()), model, method="smart").regularizer.reduction \
        == "batchmean"


@pytest.mark.parametrize("method, kwargs, named", [
    ("rdrop", dict(eps=1e-3, noise="normal"), "eps=0.001, noise='normal'"),
    ("freelb", dict(lam=5.0), "lam=5.0"),
    ("smart", dict(noise="normal"), "noise='normal'"),
    ("standard", dict(noisy_grad=False, reduction="sum"), "noisy_grad=False, reduction='sum'"),
])
def test_a_setting_the_method_never_reads_is_reported(method, kwargs, named):
    model = tiny_model("bert")
    with pytest.warns(UserWarning, match=f"method='{method}' does not use {re.escape(named)}:") as caught:
        RegularizedOptimizer(torch.optim.AdamW(model.parameters()), model, method=method, **kwargs)
    assert caught[0].filename == __file__  # the user's line, not the library's


@pytest.mark.parametrize("method, kwargs, match", [
    ("r3f", dict(r4f_kwargs={"scope": "head"}), "r4f_kwargs configure R4F"),
    ("smart", dict(r4f_kwargs={}), "r4f_kwargs configure R4F"),
    ("rdrop", dict(embeddings=nn.Identity()), "perturbs nothing"),
    ("standard", dict(embeddings=nn.Identity()), "perturbs nothing"),
])
def test_an_argument_for_another_method_is_refused_before_anything_changes(method, kwargs, match):
    model = tiny_model("bert")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        RegularizedOptimizer(torch.optim.AdamW(model.parameters()), model, method=method, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not model._forward_hooks


@pytest.mark.parametrize("method", ["r3f", "rdrop", "standard"])
def test_an_unknown_noise_type_is_refused_even_where_unread(method):
    """A misspelt value is an error for every method, not an "unused setting" warning for some."""
    model = tiny_model("bert")
    with pytest.raises(ValueError, match=r"noise must be one of \('uniform', 'normal'\), got 'gaussian'"):
        RegularizedOptimizer(torch.optim.AdamW(model.parameters()), model, method=method, noise="gaussian")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("method", ["r3f", "r4f", "rdrop", "smart", "freelb", "standard"])
def test_defaults_and_read_settings_are_quiet(method):
    """The wrapper's defaults are the ones the check compares with; each method's own settings never warn."""
    defaults = {k: v.default for k, v in inspect.signature(RegularizedOptimizer).parameters.items() if k in SETTINGS}
    assert defaults == SETTINGS
    changed = dict(lam=2.0, eps=1e-3, noise="normal", noisy_grad=False, reduction="mean")
    model = tiny_model("bert")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RegularizedOptimizer(torch.optim.AdamW(model.parameters()), model, method=method,
                             **{k: v for k, v in changed.items() if k in USES[method]})


CUDA = [pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", ["cpu", *CUDA])
@pytest.mark.parametrize("method", ["r3f", "r4f"])
def test_same_dropout_measures_the_noise_alone(method, device):
    """Train mode, dropout 0.3: with same_dropout and eps = 0 the KL is exactly 0; with eps > 0 it is the
    noise's alone (tiny); the global RNG ends where one plain forward leaves it. R4F: each training forward runs
    a power iteration on the head's u, v (random here, far from converged, so it moves the head): the noisy pass
    starts from the clean pass's u, v too, and the step ends with the u, v one plain forward leaves. On CUDA
    dropout draws from the device's generator, which is replayed and left where one forward leaves it too."""
    batch = {k: v.to(device) for k, v in toy_batch("bert").items()}
    rng_states = (lambda: [torch.get_rng_state(), torch.cuda.get_rng_state()]) if device == "cuda" else \
        (lambda: [torch.get_rng_state()])
    kls = {}
    for same, eps in [(True, 0.0), (True, 1e-3), (False, 0.0)]:
        torch.manual_seed(0)
        model = tiny_model("bert", dropout=0.3).to(device)
        with pytest.warns(UserWarning, match="exactly 0") if same and eps == 0 else contextlib.nullcontext():
            opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, method=method, eps=eps,
                                       same_dropout=same, seed=1)
        norms = [m for m in model.modules() if hasattr(m, "_u")]
        assert len(norms) == (method == "r4f")
        with torch.no_grad():
            for m in norms:
                m._u.copy_(torch.nn.functional.normalize(torch.randn_like(m._u), dim=0))
                m._v.copy_(torch.nn.functional.normalize(torch.randn_like(m._v), dim=0))
        uv = [(m._u.clone(), m._v.clone()) for m in norms]
        torch.manual_seed(5)
        kls[same, eps] = opt.step(lambda: model(**batch)).sym_kl.item()
        if eps > 0:  # the noise is drawn where the embeddings are, from the wrapper's own generator
            assert opt.noise.generator.device.type == model.get_input_embeddings().weight.device.type == device
        if same:
            after_step, after_uv = rng_states(), [(m._u.clone(), m._v.clone()) for m in norms]
            with torch.no_grad():
                for m, (u, v) in zip(norms, uv):
                    m._u.copy_(u)
                    m._v.copy_(v)
            torch.manual_seed(5)
            model(**batch)  # one plain forward
            assert all(map(torch.equal, after_step, rng_states()))
            for m, (u, v) in zip(norms, after_uv):
                assert torch.equal(m._u, u) and torch.equal(m._v, v)
    assert kls[True, 0.0] == 0.0
    assert 0 < kls[True, 1e-3] < kls[False, 0.0]  # dropout differences dominate the KL otherwise


def test_same_dropout_is_refused_where_it_means_nothing():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="same_dropout applies to r3f and r4f"):
        RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, method="rdrop", same_dropout=True)


def test_smart_proximal_term_matches_a_hand_written_reference():
    """mu * KL_S(f(x; theta) || f(x; theta_tilde)), the teacher moved by momentum before each step."""
    mu, beta = 2.0, 0.5
    model = bert64()
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), model, method="smart", lam=0.0,
                               eps=1e-3, method_kwargs=dict(proximal=mu, proximal_momentum=beta))
    b1, b2 = toy_batch("bert", seed=1), toy_batch("bert", seed=2)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step(lambda: model(**b1))  # the teacher starts as theta0; the step moves theta
    theta1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    res = opt.backward(lambda: model(**b2))
    got = grads(model)

    ref, teacher = bert64(), bert64()
    ref.load_state_dict(theta1, strict=False)
    teacher.load_state_dict({n: beta * theta0[n] + (1 - beta) * theta1[n] for n in theta0}, strict=False)
    out = ref(**b2)
    prox = kl_reference(out.logits, teacher(**b2).logits.detach())
    (out.loss + mu * prox).backward()
    assert_grads_close(got, grads(ref), rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(res.terms["kl_proximal"], prox.detach(), rtol=1e-6, atol=0)
    for t, (n, p) in zip(opt.regularizer.teacher, model.named_parameters()):
        torch.testing.assert_close(t, beta * theta0[n] + (1 - beta) * theta1[n], msg=n)


def test_smart_teacher_of_bfloat16_parameters_is_float32_and_moves():
    """In bf16, beta * t + (1 - beta) * p with p 1 % away rounds back to t: the teacher would never move."""
    model = bert64().to(torch.bfloat16)
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, method="smart", lam=0.0,
                               eps=1e-3, method_kwargs=dict(proximal=1.0, proximal_momentum=0.99))
    opt.step(lambda: model(**toy_batch("bert")))
    teacher = opt.regularizer.teacher
    assert {t.dtype for t in teacher} == {torch.float32}
    with torch.no_grad():
        for p in opt.regularizer.params:
            p.mul_(1.01)
    gap = sum(float((t - p.float()).norm()) for t, p in zip(teacher, opt.regularizer.params))
    for _ in range(100):
        opt.regularizer.after_update()
    after = sum(float((t - p.float()).norm()) for t, p in zip(teacher, opt.regularizer.params))
    assert after == pytest.approx(gap * 0.99 ** 100, rel=0.05)
    state = opt.state_dict()
    opt.load_state_dict(state)
    assert {t.dtype for t in opt.regularizer.teacher} == {torch.float32}


def test_smart_teacher_moves_once_per_update_not_per_micro_batch_nor_for_a_skipped_step():
    beta = 0.5
    model = bert64()
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), model, method="smart", lam=0.0,
                               eps=1e-3, method_kwargs=dict(proximal=1.0, proximal_momentum=beta))
    batch = toy_batch("bert", seed=1)
    halves = [{k: v[i * 8:(i + 1) * 8] for k, v in batch.items()} for i in range(2)]
    opt.step(lambda: model(**batch))
    teacher = [t.clone() for t in opt.regularizer.teacher]
    opt.zero_grad()
    for half in halves:  # two micro-batches accumulated into one update
        opt.backward(lambda: model(**half), weight=0.5)
        assert all(torch.equal(t, u) for t, u in zip(teacher, opt.regularizer.teacher))
    opt.step()
    for t, u, p in zip(teacher, opt.regularizer.teacher, opt.regularizer.params):
        torch.testing.assert_close(u, beta * t + (1 - beta) * p.detach(), rtol=1e-12, atol=0)
    teacher = [t.clone() for t in opt.regularizer.teacher]

    def nan_loss():
        out = model(**batch)
        out.loss = out.loss * float("nan")
        return out

    opt.zero_grad()
    with pytest.warns(UserWarning, match="non-finite loss"):
        assert opt.step(nan_loss).skipped
    assert all(torch.equal(t, u) for t, u in zip(teacher, opt.regularizer.teacher))


def test_smart_ascent_under_fp16_is_loss_scaled(monkeypatch):
    """The ascent's autograd.grad runs through fp16 activations: unscaled, the KL's gradient (~1e-5 / rows)
    underflows to 0 for most tokens and the adversarial step does nothing there. Scaled as the backward is, it
    reaches the tokens it reaches in float32."""
    seen = []
    grad = torch.autograd.grad

    def spy(outputs, inputs, *a, **k):
        g = grad(outputs, inputs, *a, **k)
        seen.append(g[0].detach().clone())
        return g

    monkeypatch.setattr(torch.autograd, "grad", spy)
    batch = toy_batch("roberta")
    reached = {}
    for dtype in (torch.float32, torch.float16):
        torch.manual_seed(0)
        model = tiny_model("roberta")
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16) if dtype == torch.float16 else None
        opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, method="smart",
                                   grad_scaler=scaler)
        seen.clear()
        with torch.autocast("cpu", dtype=torch.float16, enabled=dtype == torch.float16):
            opt.step(lambda: model(**batch))
        reached[dtype] = (seen[0].abs().amax(-1) > 0).float().mean().item()
    assert reached[torch.float32] > 0.8 and reached[torch.float16] == reached[torch.float32], reached


def test_smart_proximal_teacher_resumes_and_is_checked():
    def drop_one(state):
        state["r3f"]["noise"]["teacher"] = state["r3f"]["noise"]["teacher"][:-1]

    saved, _ = _resume_twice("smart", {"proximal": 1.0}, corrupt=drop_one)
    assert len(saved["opt"]["r3f"]["noise"]["teacher"]) == len(saved["model"])  # every parameter has a copy


def test_freelb_passes_share_one_set_of_dropout_masks():
    """With delta held at 0 the K passes are identical even with dropout on, as in the authors' code; the
    global RNG ends where one forward leaves it."""
    batch = toy_batch("bert")
    torch.manual_seed(0)
    model = tiny_model("bert", dropout=0.3)
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, method="freelb",
                               method_kwargs=dict(adv_steps=3, adv_lr=0.0, init_mag=0.0))
    torch.manual_seed(5)
    losses = opt.step(lambda: model(**batch)).terms["task_losses"]
    after = torch.get_rng_state()
    assert losses[0] == losses[1] == losses[2]
    torch.manual_seed(5)
    plain = model(**batch).loss
    assert torch.equal(after, torch.get_rng_state()) and plain == losses[0]


@pytest.mark.parametrize("method", METHODS)
def test_grad_scaler_gives_the_unscaled_step(method):
    """A GradScaler's power-of-two scale is undone exactly: every method steps as it does without one."""
    batch = toy_batch("bert")
    params = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        torch.manual_seed(0)
        model = tiny_model("bert", dropout=0.0)
        opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), model, method=method,
                                   seed=1, grad_scaler=scaler, max_grad_norm=1.0, **settings(method, eps=1e-2))
        for _ in range(2):
            opt.zero_grad()
            assert not opt.step(lambda: model(**batch), noise_mask=batch["attention_mask"]).skipped
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
