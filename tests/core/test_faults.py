"""Faults that used to train something else silently, or half-change the optimizer (issue 14)."""
import warnings

import pytest
import torch
from helpers import tiny_model, toy_batch
from test_errors import assert_unchanged, snapshot

from r3f_opt import RegularizedOptimizer


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(lam="1.0"), TypeError, "lam must be a real number"),
    (dict(eps="1e-5"), TypeError, "eps must be a real number"),
    (dict(lam=True), TypeError, "lam must be a real number"),
    (dict(eps=float("inf")), ValueError, "eps must be a finite number"),
    (dict(lam=float("inf")), ValueError, "lam must be a finite number"),
    (dict(max_grad_norm=float("inf")), ValueError, "max_grad_norm must be a finite number > 0"),
    (dict(max_grad_norm="1"), TypeError, "max_grad_norm must be a real number"),
    (dict(seed="1"), TypeError, "seed must be an int"),
])
def test_arguments_are_named_and_finite(kwargs, exc, match):
    model = tiny_model("bert")
    with pytest.raises(exc, match=match):
        RegularizedOptimizer(torch.optim.AdamW(model.parameters()), model, **kwargs)


def test_optimizer_over_other_parameters_is_refused_and_partial_one_warns():
    model, other = tiny_model("bert"), tiny_model("bert")
    with pytest.raises(ValueError, match="none of the model's trainable parameters"):
        RegularizedOptimizer(torch.optim.AdamW(other.parameters()), model)
    some = [p for n, p in model.named_parameters() if "classifier" not in n]
    with pytest.warns(UserWarning, match="2 of the model's .* trainable parameters are not in the optimizer"):
        RegularizedOptimizer(torch.optim.AdamW(some), model)
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)  # a frozen encoder: an optimizer over the head alone is right
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RegularizedOptimizer(torch.optim.AdamW(model.classifier.parameters()), model)


def _poison_grad(model):
    return model.bert.encoder.layer[0].output.dense.weight.register_hook(lambda g: torch.full_like(g, float("nan")))


@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_finite_loss_with_nonfinite_gradient_skips(max_grad_norm):
    torch.manual_seed(0)
    model = tiny_model("bert", dropout=0.0)
    opt = RegularizedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, max_grad_norm=max_grad_norm)
    batch = toy_batch("bert")
    opt.step(lambda: model(**batch))
    opt.zero_grad()
    snap = snapshot(model, opt)
    handle = _poison_grad(model)
    with pytest.warns(UserWarning, match="non-finite gradient norm"):
        res = opt.step(lambda: model(**batch))
    handle.remove()
    assert torch.isfinite(res.loss) and res.skipped and opt.nonfinite_steps == 1
    assert_unchanged(model, opt, snap)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    opt.zero_grad()
    assert not opt.step(lambda: model(**batch)).skipped  # the next step trains again


def test_nonfinite_gradient_raises_when_asked():
    model = tiny_model("bert", dropout=0.0)
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, on_nonfinite="raise")
    snap = snapshot(model, opt)
    handle = _poison_grad(model)
    with pytest.raises(FloatingPointError, match="non-finite gradient norm"):
        opt.step(lambda: model(**toy_batch("bert")))
    handle.remove()
    assert_unchanged(model, opt, snap)


def _trained(optimizer_cls=torch.optim.AdamW, **kw):
    torch.manual_seed(0)
    model = tiny_model("bert")
    opt = RegularizedOptimizer(optimizer_cls(model.parameters(), lr=1e-2), model, eps=1e-3, **kw)
    batch = toy_batch("bert")
    opt.step(lambda: model(**batch))
    return model, opt, batch


@pytest.mark.parametrize("corrupt, match", [
    (lambda e: e.update(nonfinite_steps="3"), "nonfinite_steps"),
    (lambda e: e.update(noise={"seed": 1, "generator_state": "x"}), "generator_state"),
    (lambda e: e.update(noise={"generator_state": None}), "seed"),
    (lambda e: e.update(grad_scaler=[1.0]), "grad_scaler"),
    (lambda e: e.update(optimizer_class="SGD"), "saved from a SGD inner optimizer"),
])
def test_load_state_dict_checks_everything_before_changing_anything(corrupt, match):
    model, opt, batch = _trained()
    sd = opt.state_dict()
    opt.zero_grad()
    opt.step(lambda: model(**batch))  # move on from the saved state
    snap, gen = snapshot(model, opt), opt.noise.generator.get_state()
    steps_before = opt.nonfinite_steps
    corrupt(sd["r3f"])
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_unchanged(model, opt, snap)  # the inner AdamW state was not replaced by the saved one
    assert torch.equal(opt.noise.generator.get_state(), gen) and opt.nonfinite_steps == steps_before


def test_a_partial_grad_scaler_entry_is_refused_before_anything_loads():
    model, opt, batch = _trained(grad_scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = 0.5
    sd["r3f"]["nonfinite_steps"] = 9
    for partial in ({"scale": 2.0}, {}):  # a hand-made entry; a disabled scaler's
        sd["r3f"]["grad_scaler"] = partial
        with pytest.raises(ValueError, match="GradScaler.state_dict"):
            opt.load_state_dict(sd)
        assert opt.param_groups[0]["lr"] == 1e-2 and opt.nonfinite_steps == 0 and opt.grad_scaler.get_scale() == 2.0**8


def test_state_dict_of_another_optimizer_class_is_refused():
    _, sgd, _ = _trained(torch.optim.SGD)
    model, adamw, _ = _trained()
    snap = snapshot(model, adamw)
    with pytest.raises(ValueError, match="saved from a SGD inner optimizer"):
        adamw.load_state_dict(sgd.state_dict())
    assert_unchanged(model, adamw, snap)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))


def _grads(kind: str, checkpointing, noisy_grad=True):
    torch.manual_seed(0)
    model = tiny_llama() if kind == "llama" else tiny_model(kind, dropout=0.0)
    model.train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, eps=0.05, lam=10.0, seed=3,
                               noisy_grad=noisy_grad)
    batch = toy_batch("gpt2-lm" if kind == "llama" else kind)
    mask = batch["attention_mask"].bool() if kind == "llama" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note on use_reentrant
        opt.backward(lambda: model(**batch), mask=mask)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_keeps_the_noisy_pass_gradient(kind, reentrant):
    """use_reentrant=True used to drop the noisy pass's gradient silently (= noisy_grad=False)."""
    plain, ckpt = _grads(kind, None), _grads(kind, reentrant)
    assert plain.keys() == ckpt.keys()
    for n, g in plain.items():
        torch.testing.assert_close(ckpt[n], g, rtol=1e-5, atol=1e-7, msg=n)
    one_sided = _grads(kind, None, noisy_grad=False)  # the check above can tell the two apart
    assert any(not torch.allclose(one_sided[n], g, rtol=1e-3, atol=1e-6) for n, g in plain.items())
