"""Bad input gets a clear error and changes nothing: no parameter, optimizer state or hook is left behind."""
import warnings

import pytest
import torch
from helpers import kl_mask, tiny_model, toy_batch
from torch import nn

from r3f_opt import RegularizedOptimizer


def snapshot(model, opt):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()})


def assert_unchanged(model, opt, snap):
    params, state = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    assert {id(p): s for p, s in opt.state.items()}.keys() == state.keys()
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k])


def no_hooks_left(model):
    modules_clean = all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    params_clean = all(not p._backward_hooks for p in model.parameters())  # the backward() guard's hooks
    return modules_clean and params_clean


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = tiny_model("bart")
    opt = RegularizedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, eps=1e-3)
    batch = toy_batch("bart")
    opt.step(lambda: model(**batch))  # the optimizer has state to protect
    opt.zero_grad()
    return model, opt, batch


@pytest.mark.parametrize(
    "closure, exc, match",
    [
        (lambda m, b: m(**b).loss, TypeError, "bare tensor"),
        (lambda m, b: {"loss": m(**b).loss}, TypeError, "no logits"),
        (lambda m, b: m(**{k: v for k, v in b.items() if k != "labels"}), TypeError, "no scalar loss"),
        (lambda m, b: m(**b).loss.backward(), RuntimeError, "must only run the forward"),
    ],
)
def test_bad_closure_output(setup, closure, exc, match):
    model, opt, batch = setup
    snap = snapshot(model, opt)
    with pytest.raises(exc, match=match):
        opt.step(lambda: closure(model, batch))
    assert_unchanged(model, opt, snap)
    assert no_hooks_left(model)


def test_closure_calling_backward_is_refused_before_any_gradient(setup):
    model, opt, batch = setup
    snap = snapshot(model, opt)

    def closure():
        out = model(**batch)
        out.loss.backward()
        return out

    with pytest.raises(RuntimeError, match="must only run the forward"):
        opt.step(closure)
    assert all(p.grad is None for p in model.parameters())
    assert_unchanged(model, opt, snap)
    # and the optimizer still works afterwards
    assert opt.step(lambda: model(**batch)).sym_kl > 0


def differing_second_pass(clean, noisy):
    """A closure that runs ``clean()`` on its first call (the clean pass) and ``noisy()`` after."""
    calls = []

    def closure():
        calls.append(1)
        return clean() if len(calls) == 1 else noisy()

    return closure


def test_logits_shape_differs_between_passes(setup):
    model, opt, batch = setup
    snap = snapshot(model, opt)
    shorter = {k: v[:-1] for k, v in batch.items()}
    with pytest.raises(ValueError, match="differ in shape"):
        opt.step(differing_second_pass(lambda: model(**batch), lambda: model(**shorter)))
    assert_unchanged(model, opt, snap)
    assert no_hooks_left(model)


def test_exception_in_noisy_pass_removes_the_hooks(setup):
    model, opt, batch = setup
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            model.model.encoder(input_ids=batch["input_ids"])  # the hooks are live here...
            raise KeyError("boom")
        return model(**batch)

    with pytest.raises(KeyError, match="boom"):
        opt.step(closure)
    assert no_hooks_left(model)  # ...and gone after the exception
    out1 = model.eval()(**batch).logits
    out2 = model(**batch).logits
    assert torch.equal(out1, out2)  # no noise leaks into later forwards


@pytest.mark.parametrize("on_nonfinite", ["skip", "raise"])
def test_nonfinite_loss(setup, on_nonfinite):
    model, opt, batch = setup
    opt.on_nonfinite = on_nonfinite
    snap = snapshot(model, opt)

    def closure():
        out = model(**batch)
        out.loss = out.loss * float("nan")
        return out

    if on_nonfinite == "raise":
        with pytest.raises(FloatingPointError, match="non-finite"):
            opt.step(closure)
    else:
        with pytest.warns(UserWarning, match="non-finite"):
            res = opt.step(closure)
        assert res.skipped and opt.nonfinite_steps == 1
        assert opt.state_dict()["r3f"]["nonfinite_steps"] == 1
    assert all(p.grad is None for p in model.parameters())
    assert_unchanged(model, opt, snap)


def test_nonfinite_kl_is_skipped(setup):
    model, opt, batch = setup
    snap = snapshot(model, opt)

    def noisy():  # the noisy logits forbid a token the clean pass allows: KL = inf
        out = model(**batch)
        out.logits = out.logits.clone()
        out.logits[0, 0] = float("-inf")
        return out

    with pytest.warns(UserWarning, match="non-finite"):
        res = opt.step(differing_second_pass(lambda: model(**batch), noisy))
    assert res.skipped and torch.isinf(res.sym_kl)
    assert_unchanged(model, opt, snap)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lam=-1.0), "lam"),
        (dict(eps=-1e-5), "eps"),
        (dict(lam=float("nan")), "lam"),
        (dict(method="r5f"), "method"),
        (dict(noise="gaussian"), "noise"),
        (dict(reduction="none"), "reduction"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
        (dict(on_nonfinite="ignore"), "on_nonfinite"),
        (dict(backward=lambda loss: loss.backward(), grad_scaler=torch.amp.GradScaler("cpu")), "not both"),
        (dict(seed=2**64), r"seed must be in \[-2\*\*63, 2\*\*64\)"),
        (dict(noisy_grad=False, noisy_embed_grad=True), "noisy_grad=False runs that pass without a graph"),
        (dict(method="r4f", r4f_kwargs={"eps": float("nan")}), "eps must be a finite number > 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = tiny_model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        RegularizedOptimizer(torch.optim.AdamW(model.parameters()), model, **kwargs)
    assert model.state_dict().keys() == before.keys() and no_hooks_left(model)  # R4F registered nothing


@pytest.mark.parametrize("kwargs, match", [
    (dict(noisy_grad="no"), "noisy_grad must be True or False, got 'no'"),
    (dict(same_dropout=1), "same_dropout must be True or False"),
    (dict(noisy_embed_grad="yes"), "noisy_embed_grad must be True or False"),
    (dict(backward=1), "backward must be a callable"),
    (dict(grad_scaler="x"), "grad_scaler must be a torch.amp.GradScaler"),
    (dict(method="r4f", r4f_kwargs={"n_power_iterations": 1.5}), "n_power_iterations must be an int"),
])
def test_bad_argument_types(kwargs, match):
    model = tiny_model("bert")
    with pytest.raises(TypeError, match=match):
        RegularizedOptimizer(torch.optim.AdamW(model.parameters()), model, **kwargs)


def test_bad_step_and_backward_arguments_change_nothing(setup):
    model, opt, batch = setup
    snap = snapshot(model, opt)
    closure = lambda: model(**batch)  # noqa: E731
    for kwargs, exc, match in [
        (dict(weight=-1.0), ValueError, "weight must be a finite number > 0"),
        (dict(weight=float("nan")), ValueError, "weight must be a finite number > 0"),
        (dict(sync="no"), TypeError, "sync must be True or False"),
        (dict(noise_mask=batch["input_ids"]), ValueError, "input_ids are not a mask.*attention_mask != 0"),
        (dict(noise_mask=batch["attention_mask"] * 0.5), ValueError, "noise_mask must hold only 0 and 1"),
        (dict(noise_mask=batch["attention_mask"].to(torch.complex64)), TypeError, "noise_mask must be a bool"),
    ]:
        with pytest.raises(exc, match=match):
            opt.backward(closure, **kwargs)
    with pytest.raises(ValueError, match="pass them to backward"):
        opt.step(mask=torch.ones(16, dtype=torch.bool))  # no closure: the mask would be lost
    assert_unchanged(model, opt, snap)
    assert no_hooks_left(model) and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["r3f", "standard", "rdrop", "smart", "freelb"])
def test_an_attention_mask_as_noise_mask_is_fine_for_every_method(method):
    """Integer 0/1 attention masks pass (one loop serves every method; those without noise ignore it)."""
    model = tiny_model("bert")  # dropout on: R-Drop's passes differ
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, method=method)
    batch = toy_batch("bert")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for mask in (batch["attention_mask"], batch["attention_mask"].float(), batch["attention_mask"].bool()):
            opt.step(lambda: model(**batch), noise_mask=mask)
        opt.backward(lambda: model(**batch), weight=torch.tensor(0.5), sync=torch.tensor(True))  # tensors too


@pytest.mark.parametrize("kwargs, match", [
    (dict(same_dropout=True, eps=0.0), "the KL term is exactly 0"),
    (dict(method="smart", method_kwargs={"proximal_momentum": 0.9}), "runs only with proximal > 0"),
    (dict(method="freelb", method_kwargs={"adv_steps": 1, "adv_lr": 0.5}), "adv_steps=1 never takes"),
])
def test_settings_that_cannot_take_effect_warn(kwargs, match):
    model = tiny_model("bert")
    with pytest.warns(UserWarning, match=match):
        RegularizedOptimizer(torch.optim.AdamW(model.parameters()), model, **kwargs)


def test_bad_types():
    model = tiny_model("bert")
    with pytest.raises(TypeError, match="optimizer"):
        RegularizedOptimizer(model.parameters(), model)
    inner = torch.optim.AdamW(model.parameters())
    with pytest.raises(TypeError, match="model"):
        RegularizedOptimizer(inner, "bert")
    with pytest.raises(TypeError, match="already"):
        RegularizedOptimizer(RegularizedOptimizer(inner, model), model)


def test_model_without_embeddings_says_pass_embeddings():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="embeddings="):
        RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)


def test_noise_that_never_reaches_the_model_is_an_error():
    model = tiny_model("bert")
    opt = RegularizedOptimizer(torch.optim.AdamW(model.parameters()), model)
    batch = toy_batch("bert")
    embeds = model.bert.embeddings.word_embeddings(batch["input_ids"])
    with pytest.raises(RuntimeError, match="never called the embedding module"):
        opt.step(lambda: model(inputs_embeds=embeds, labels=batch["labels"]))


def test_r4f_without_a_head_changes_nothing():
    model = tiny_model("gpt2-lm")
    with pytest.raises(ValueError, match="head="):
        RegularizedOptimizer(torch.optim.AdamW(model.parameters()), model, method="r4f")
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


def test_bad_state_dict_changes_nothing(setup):
    model, opt, batch = setup
    snap = snapshot(model, opt)
    sd = opt.state_dict()
    sd["r3f"] = "garbage"
    with pytest.raises(ValueError, match="r3f"):
        opt.load_state_dict(sd)
    assert_unchanged(model, opt, snap)


def test_low_precision_embeddings_warn_once():
    torch.manual_seed(0)
    model = tiny_model("bert").to(torch.bfloat16)
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, eps=1e-5)
    batch = toy_batch("bert")
    with pytest.warns(UserWarning, match="cannot represent noise"):
        opt.step(lambda: model(**batch))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(lambda: model(**batch))


def test_nonfinite_micro_batch_skips_the_accumulated_step(setup):
    model, opt, batch = setup
    snap = snapshot(model, opt)

    def bad():
        out = model(**batch)
        out.loss = out.loss * float("inf")
        return out

    opt.backward(lambda: model(**batch), weight=0.5)
    with pytest.warns(UserWarning, match="non-finite"):
        assert opt.backward(bad, weight=0.5).skipped
    with pytest.warns(UserWarning, match="skipping the optimizer step"):
        opt.step()
    assert_unchanged(model, opt, snap)
    opt.zero_grad()  # the next accumulation cycle steps again
    opt.backward(lambda: model(**batch))
    opt.step()
    assert not torch.equal(model.state_dict()["classification_head.out_proj.bias"],
                           snap[0]["classification_head.out_proj.bias"])


def test_generator_state_of_another_device_type_is_a_clear_error_every_time(setup):
    model, opt, batch = setup
    sd = opt.state_dict()
    sd["r3f"]["noise"]["generator_state"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's size
    opt.load_state_dict(sd)
    for _ in range(2):  # never a silent fallback to a freshly seeded generator
        with pytest.raises(RuntimeError, match="another device type"):
            opt.step(lambda: model(**batch))
    assert no_hooks_left(model)


def test_generator_state_moved_by_map_location_still_loads(setup):
    model, opt, batch = setup
    sd = opt.state_dict()
    want = opt.noise.sample((5,), torch.device("cpu"))
    sd["r3f"]["noise"]["generator_state"] = sd["r3f"]["noise"]["generator_state"].to(torch.float32)
    opt.load_state_dict(sd)
    assert torch.equal(opt.noise.sample((5,), torch.device("cpu")), want)


@pytest.mark.parametrize("kind, method, mask, warns", [
    ("bart-seq2seq", "r3f", False, True), ("gpt2-lm", "rdrop", False, True), ("bart-seq2seq", "r3f", True, False),
    ("bert", "r3f", False, False), ("bart-seq2seq", "standard", False, False),
    ("bart-seq2seq", "freelb", False, False)])  # freelb has no KL term
def test_a_sequence_of_logits_without_a_mask_warns_once(kind, method, mask, warns):
    """Padded target positions in the KL were the reference's seq2seq defect: without mask= every position
    counts, so the wrapper says so (once); with the labels' mask, or for one row per example, it is silent."""
    torch.manual_seed(0)
    model = tiny_model(kind)
    batch = toy_batch(kind)
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, method=method)
    kw = {"mask": kl_mask(kind, batch)} if mask else {}
    for step in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step(lambda: model(**batch), **kw)
        said = [w for w in caught if "no mask= was given" in str(w.message)]
        assert len(said) == (warns and step == 0), [str(w.message) for w in caught]
        assert all(w.filename == __file__ for w in said)  # it points at the user's opt.step(...) line


@pytest.mark.parametrize("method", ["standard", "rdrop", "freelb"])
def test_noisy_embed_grad_is_refused_where_nothing_is_detached(method):
    model = tiny_model("bert")
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="noisy_embed_grad applies to r3f, r4f and smart"):
        RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, method=method, noisy_embed_grad=True)
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dropout, train, warns", [(0.1, True, False), (0.0, True, True), (0.1, False, True)])
def test_rdrop_without_active_dropout_warns_once(dropout, train, warns):
    """R-Drop's passes differ only by dropout: with none active (eval mode, or a model without dropout) its KL
    is 0 and the second pass is wasted, which it says once."""
    torch.manual_seed(0)
    model = tiny_model("bert", dropout=dropout).train(train)
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, method="rdrop")
    batch = toy_batch("bert")
    for step in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = opt.step(lambda: model(**batch))
        said = [w for w in caught if "identical logits" in str(w.message)]
        assert len(said) == (warns and step == 0)
        assert (res.sym_kl == 0) == warns


@pytest.mark.parametrize("method", ["r3f", "r4f", "smart"])
def test_shapes_refused_inside_a_pass_leave_every_stream_as_it_was(method):
    """A mask or noise_mask of the wrong shape is found only once the logits / the embeddings' output exist,
    after passes that ran R4F's power iteration and drew noise and dropout: all of it is rolled back."""
    torch.manual_seed(0)
    model = tiny_model("roberta" if method == "r4f" else "bert")
    opt = RegularizedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, method=method, eps=1e-3)
    batch = toy_batch("roberta" if method == "r4f" else "bert")
    opt.step(lambda: model(**batch))  # the noise generator exists and has moved
    opt.zero_grad()
    snap, noise, rng = snapshot(model, opt), opt.noise.state_dict(), torch.get_rng_state()
    for kwargs, match in [(dict(mask=torch.ones(3, dtype=torch.bool)), "mask must have the logits' shape"),
                          (dict(noise_mask=torch.ones(16, 5, dtype=torch.bool)), "noise_mask has shape")]:
        with pytest.raises(ValueError, match=match):
            opt.step(lambda: model(**batch), **kwargs)
        assert_unchanged(model, opt, snap)  # R4F's u and v are in the state_dict
        assert torch.equal(opt.noise.state_dict()["generator_state"], noise["generator_state"])
        assert torch.equal(torch.get_rng_state(), rng)
        assert no_hooks_left(model) and all(p.grad is None for p in model.parameters())
    opt.step(lambda: model(**batch))  # and the next step draws what it would have drawn
    assert not torch.equal(opt.noise.state_dict()["generator_state"], noise["generator_state"])


@pytest.mark.parametrize("method", ["r3f", "r4f", "rdrop", "smart"])
def test_a_regression_head_is_refused_by_methods_with_a_kl_term(method):
    """One output per row: its softmax is 1, so the KL between the passes is 0 whatever they do."""
    torch.manual_seed(0)
    model = tiny_model("roberta")
    model.classifier.out_proj = nn.Linear(16, 1)  # an STS-B head: num_labels=1, mean squared error
    model.config.num_labels, model.num_labels = 1, 1
    batch = {**toy_batch("roberta"), "labels": torch.randn(16)}
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, method=method)
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"one output per row \(a regression head.*method='standard'"):
        opt.step(lambda: model(**batch))
    assert_unchanged(model, opt, snap)
    assert no_hooks_left(model)
    for ok in ("standard", "freelb"):
        RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, method=ok).step(
            lambda: model(**batch))


def test_zero_grad_inside_the_closure_is_refused(setup):
    """torch's closure habit (zero_grad, forward, backward) would erase FreeLB's earlier passes and accumulated
    micro-batches; the backward is refused already, and so is the zero_grad."""
    model, opt, batch = setup
    snap = snapshot(model, opt)

    def closure():
        opt.zero_grad()
        return model(**batch)

    with pytest.raises(RuntimeError, match=r"zero_grad\(\) was called inside the closure"):
        opt.step(closure)
    assert_unchanged(model, opt, snap)
    assert no_hooks_left(model)
    opt.zero_grad()  # outside it, as usual


def test_on_nonfinite_raise_leaves_every_stream_as_it_was():
    torch.manual_seed(0)
    model = tiny_model("bert")
    opt = RegularizedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, eps=1e-3, on_nonfinite="raise")
    batch = toy_batch("bert")
    opt.step(lambda: model(**batch))
    opt.zero_grad()
    snap, noise, rng = snapshot(model, opt), opt.noise.state_dict(), torch.get_rng_state()

    def nan_loss():
        out = model(**batch)
        out.loss = out.loss * float("nan")
        return out

    with pytest.raises(FloatingPointError, match="on_nonfinite='raise'"):
        opt.step(nan_loss)
    assert_unchanged(model, opt, snap)
    assert torch.equal(opt.noise.state_dict()["generator_state"], noise["generator_state"])
    assert torch.equal(torch.get_rng_state(), rng) and all(p.grad is None for p in model.parameters())
