"""RegularizedOptimizer as an optimizer: delegation, schedulers, checkpoints, accumulation, AMP, errors."""
import gc
import io
import warnings

import pytest
import torch
from helpers import kl_mask, tiny_model, toy_batch
from torch import nn

from r3f_opt import RegularizedOptimizer, StepResult


def make(kind="bert", dropout=0.1, lr=1e-3, seed=0, **kw):
    torch.manual_seed(seed)
    model = tiny_model(kind, dropout=dropout)
    opt = RegularizedOptimizer(torch.optim.AdamW(model.parameters(), lr=lr), model, seed=seed, **kw)
    return model, opt


def params_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_step_inside_no_grad_and_the_inner_state_untouched_until_it():
    """The wrapper adds nothing to the inner optimizer's per-parameter state (a state_dict round trip
    included) before the first step, and step() enables grad itself, as torch's optimizers do, so an outer
    torch.no_grad() changes nothing."""
    model, opt = make()
    twin_model, twin = make()
    assert len(opt.optimizer.state) == 0
    opt.load_state_dict(opt.state_dict())
    assert len(opt.optimizer.state) == 0
    batch = toy_batch("bert")
    torch.manual_seed(1)  # the same dropout masks in both
    with torch.no_grad():
        res = opt.step(lambda: model(**batch))
    torch.manual_seed(1)
    ref = twin.step(lambda: twin_model(**batch))
    assert res.sym_kl > 0 and torch.equal(res.loss, ref.loss)
    assert_same_params(params_of(model), params_of(twin_model))
    assert len(opt.optimizer.state) == len(list(model.parameters()))


def test_is_an_optimizer_and_delegates():
    model, opt = make()
    inner = opt.optimizer
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state and opt.defaults is inner.defaults
    batch = toy_batch("bert")
    res = opt.step(lambda: model(**batch))
    assert isinstance(res, StepResult) and res.sym_kl > 0 and not res.loss.requires_grad
    assert len(inner.state) == len(list(model.parameters()))  # AdamW moments exist, in the inner's state
    extra = nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert inner.param_groups[-1]["lr"] == 0.5 and opt.param_groups[-1]["params"][0] is extra
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert "AdamW" not in repr(opt) and "lr: 0.001" in repr(opt)


@pytest.mark.parametrize("inner_cls", ["sgd", "adafactor"])
def test_wraps_other_optimizers(inner_cls):
    from transformers.optimization import Adafactor

    torch.manual_seed(0)
    model = tiny_model("bert", dropout=0.0)
    inner = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if inner_cls == "sgd"
             else Adafactor(model.parameters(), lr=1e-2, relative_step=False, scale_parameter=False))
    opt = RegularizedOptimizer(inner, model, eps=1e-3)
    batch = toy_batch("bert")
    losses = []
    for _ in range(15):
        opt.zero_grad()
        losses.append(opt.step(lambda: model(**batch)).task_loss.item())
    assert losses[-1] < losses[0]


def test_schedulers_drive_the_inner_optimizer():
    from transformers import get_linear_schedule_with_warmup

    model, opt = make(lr=1.0)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=10)
    batch = toy_batch("bert")
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() called before optimizer.step()"
        for _ in range(4):
            seen.append(opt.optimizer.param_groups[0]["lr"])
            opt.zero_grad()
            opt.step(lambda: model(**batch))
            sched.step()
    assert seen == pytest.approx([0.0, 0.5, 1.0, 7 / 8])

    model, opt = make(lr=1.0)
    step_lr = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        opt.step(lambda: model(**batch))
        step_lr.step()
    assert opt.optimizer.param_groups[0]["lr"] == 0.25 and step_lr.get_last_lr() == [0.25]


def test_state_dict_format_is_the_inner_one_plus_one_key():
    model, opt = make()
    batch = toy_batch("bert")
    opt.step(lambda: model(**batch))
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "r3f"}
    assert set(sd["r3f"]) == {"optimizer_class", "noise", "nonfinite_steps", "grad_scaler"}
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)  # a tool that reads optimizer checkpoints
    plain.load_state_dict(sd)
    for p in model.parameters():
        assert torch.equal(plain.state[p]["exp_avg"], opt.state[p]["exp_avg"])


def _run(model, opt, batches):
    out = []
    for b in batches:
        opt.zero_grad()
        out.append(opt.step(lambda: model(**b)).loss.item())
    return out


@pytest.mark.parametrize("method", ["r3f", "r4f"])
def test_resume_is_bit_exact(method):
    batches = [toy_batch("bert", seed=s) for s in range(6)]
    model, opt = make(method=method, eps=1e-2)
    torch.manual_seed(42)
    straight = _run(model, opt, batches)
    final = params_of(model)

    model, opt = make(method=method, eps=1e-2)
    torch.manual_seed(42)
    first = _run(model, opt, batches[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()}, buf)

    # A fresh process would build everything anew, with another seed, and load the checkpoint.
    model, opt = make(method=method, eps=1e-2, seed=7)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    second = _run(model, opt, batches[3:])
    assert first + second == straight
    assert_same_params(params_of(model), final)


def test_accumulation_equals_one_big_batch():
    batch = toy_batch("bert", batch=8)
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]

    model, opt = make(dropout=0.0, eps=0.05, lr=1e-2)
    big = opt.step(lambda: model(**batch))
    want = params_of(model)

    model, opt = make(dropout=0.0, eps=0.05, lr=1e-2)
    parts = [opt.backward(lambda h=h: model(**h), weight=0.5) for h in halves]
    opt.step()
    assert big.sym_kl > 0
    torch.testing.assert_close(sum(0.5 * p.loss for p in parts), big.loss, rtol=1e-5, atol=1e-7)
    for k, v in params_of(model).items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6)


def test_autocast_bf16():
    model, opt = make(lr=1e-2, eps=1e-3)
    batch = toy_batch("bert")

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(**batch)

    results = []
    for _ in range(10):
        opt.zero_grad()
        results.append(opt.step(closure))
    assert results[0].output.logits.dtype == torch.bfloat16
    assert results[0].sym_kl.dtype == torch.float32 and results[0].sym_kl > 0
    assert all(torch.isfinite(r.loss) for r in results)
    assert results[-1].task_loss < results[0].task_loss


def _fp16_closure(model, batch):
    def closure():
        with torch.autocast("cpu", dtype=torch.float16):
            return model(**batch)
    return closure


def test_grad_scaler_matches_unscaled_step():
    # Scaling by a power of two is exact in float32, so scale -> backward -> unscale -> clip -> step must
    # give the very parameters of the unscaled step.
    batch = toy_batch("bert")
    model, opt = make(dropout=0.0, max_grad_norm=0.5)
    opt.step(lambda: model(**batch))
    want = params_of(model)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    model, opt = make(dropout=0.0, max_grad_norm=0.5, grad_scaler=scaler)
    opt.step(lambda: model(**batch))
    assert_same_params(params_of(model), want)
    assert scaler.get_scale() == 2.0**12  # no inf: the scale stays (growth interval not reached)


def test_grad_scaler_fp16_autocast_trains():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model, opt = make(lr=1e-2, eps=1e-3, grad_scaler=scaler, max_grad_norm=1.0)
    batch = toy_batch("bert")
    results = []
    for _ in range(10):
        opt.zero_grad()
        results.append(opt.step(_fp16_closure(model, batch)))
    assert results[0].output.logits.dtype == torch.float16
    assert results[-1].task_loss < results[0].task_loss


def test_a_back_off_for_a_non_finite_loss_restarts_growth_as_torchs_own_does():
    """After a back-off the scale grows again only after growth_interval good steps, not at the next one."""
    batch = toy_batch("bert")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    model, opt = make(lr=1e-4, grad_scaler=scaler)

    def nan_loss():
        out = model(**batch)
        out.loss = out.loss * float("nan")
        return out

    scales = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped step's warning
        for closure in [lambda: model(**batch)] * 2 + [nan_loss] + [lambda: model(**batch)] * 3:
            opt.zero_grad()
            opt.step(closure)
            scales.append(scaler.get_scale())
    assert scales == [2.0**10, 2.0**10, 2.0**9, 2.0**9, 2.0**9, 2.0**10]


def test_a_skipped_step_backs_the_scale_off_so_freelb_recovers_from_an_overflow():
    """FreeLB builds its next perturbation from the scaled gradient of the last: at too large a scale it is inf,
    the next pass's loss NaN, and the step is skipped before the GradScaler sees an inf. The skip backs the scale
    off (as an inf gradient would), so training recovers instead of skipping every step at the same scale."""
    batch = toy_batch("bert")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    model, opt = make(lr=1e-3, method="freelb", grad_scaler=scaler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped steps' warnings
        results = []
        for _ in range(24):
            opt.zero_grad()
            results.append(opt.step(_fp16_closure(model, batch)))
    skipped = [r.skipped for r in results]
    assert skipped[0] and not any(skipped[-8:]), skipped  # it overflowed at first, and no longer does
    assert scaler.get_scale() < 2.0**24 and opt.nonfinite_steps == sum(skipped)


def test_grad_scaler_skips_step_on_inf_grad():
    batch = toy_batch("bert")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    model, opt = make(dropout=0.0, grad_scaler=scaler)
    before = params_of(model)
    w = model.classifier.weight
    handle = w.register_hook(lambda g: torch.full_like(g, float("inf")))
    res = opt.step(_fp16_closure(model, batch))
    handle.remove()
    assert res.skipped and opt.nonfinite_steps == 1  # the loss was finite; the scaler skipped the step
    assert_same_params(params_of(model), before)
    assert len(opt.state) == 0  # AdamW never stepped
    assert scaler.get_scale() == 2.0**11


def test_clipping_bounds_the_update():
    torch.manual_seed(0)
    model = tiny_model("bert", dropout=0.0)
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model, max_grad_norm=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(lambda: model(**toy_batch("bert")))
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert update.norm().item() == pytest.approx(1e-3, rel=1e-4)


@pytest.fixture
def dynamo_defaults():
    import torch._dynamo

    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):  # Dynamo's default, restored after
        yield


@pytest.mark.parametrize("method, kind, fused", [("r3f", "bert", False), ("smart", "bert", False),
                                                 ("r3f", "gpt2-lm", False), ("r3f", "gpt2-lm", True)])
@pytest.mark.usefixtures("dynamo_defaults")
def test_a_compiled_model_steps_as_the_eager_one(method, kind, fused):
    """torch.compile(model): the noise hook reaches the compiled forward (a graph break at the seeded draw,
    without Dynamo's "does not know how to trace" warning), and the steps equal the eager model's. The
    aot_eager backend traces as inductor does, without needing a C++ compiler. GPT-2's lookup sits inside
    the compiled graph: Dynamo must guard on hooks (the optimizer turns that on), or it runs without noise."""
    import torch._dynamo

    batch, result = toy_batch(kind), {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = tiny_model(kind, dropout=0.0)  # no dropout: the KL is the noise's alone
        run = torch.compile(model, backend="aot_eager") if compiled else model
        opt = RegularizedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), run, method=method, eps=1e-2,
                                   seed=3, fused_lm_head=fused)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kls = [opt.step(lambda: run(**batch)).sym_kl for _ in range(3) if opt.zero_grad() is None]
        assert torch._dynamo.config.skip_nnmodule_hook_guards is not compiled
        assert not [w for w in caught if "Dynamo" in str(w.message) or "r3f_opt" in w.filename], caught
        result[compiled] = kls, [p.detach().clone() for p in model.parameters()]
    assert all(k > 0 for k in result[True][0])  # the noise reached the compiled model
    # GPT-2's attention key bias has a gradient of 0 up to rounding, which AdamW normalises: its compiled and
    # eager updates differ by a few 1e-6
    torch.testing.assert_close(result[True], result[False], rtol=1e-5, atol=1e-7 if kind == "bert" else 1e-5)


@pytest.mark.parametrize("how", ["called before", "compiled in place"])
@pytest.mark.usefixtures("dynamo_defaults")
def test_a_compiled_gpt2_gets_its_noise_however_it_was_compiled(how):
    """A graph compiled before the optimizer turned hook guards on has none (the model was already called),
    and nn.Module.compile() leaves no _orig_mod to recognise: both ran the noisy pass without noise."""
    batch = toy_batch("gpt2-lm")
    model = tiny_model("gpt2-lm", dropout=0.0)
    if how == "called before":
        run = torch.compile(model, backend="aot_eager")
    else:
        model.compile(backend="aot_eager")
        run = model
    run(**batch)  # e.g. an evaluation before training
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-2), run, eps=1e-2)
    mask = batch["attention_mask"].bool()
    assert all(opt.step(lambda: run(**batch), mask=mask).sym_kl > 0 for _ in range(2))


def test_step_without_closure_only_steps_the_inner_optimizer():
    model, opt = make(dropout=0.0, lr=1e-2)
    out = model(**toy_batch("bert"))
    out.loss.backward()  # a framework's own backward
    before = params_of(model)
    assert opt.step() is None
    after = params_of(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_custom_backward_callable():
    calls = []
    model, opt = make(backward=lambda loss: (calls.append(loss.item()), loss.backward()))
    res = opt.step(lambda: model(**toy_batch("bert")))
    assert calls == [pytest.approx(res.loss.item())]


def test_standard_method_runs_one_pass():
    model, opt = make(method="standard")
    n = []
    res = opt.step(lambda: (n.append(1), model(**toy_batch("bert")))[1])
    assert len(n) == 1 and res.sym_kl == 0 and res.loss == res.task_loss


@pytest.mark.parametrize("kind", ["gpt2-lm", "bart-seq2seq"])
def test_token_level_kl_uses_the_mask(kind):
    model, opt = make(kind, dropout=0.0, eps=1e-2)
    batch = toy_batch(kind)
    mask = kl_mask(kind, batch)
    res = opt.step(lambda: model(**batch), mask=mask)
    assert res.sym_kl > 0 and res.output.logits.shape[:-1] == mask.shape
    calls, state = [], opt.noise.generator.get_state()
    for bad, error in ((mask.float(), TypeError), (torch.where(mask, 5, 0), ValueError)):  # labels are not a mask
        with pytest.raises(error, match="mask"):
            opt.step(lambda: (calls.append(1), model(**batch))[1], mask=bad)
    assert not calls and torch.equal(opt.noise.generator.get_state(), state)  # refused before any pass


def test_default_seed_follows_manual_seed_without_consuming_the_global_rng():
    model = tiny_model("bert")
    torch.manual_seed(3)
    a = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    after = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(torch.rand(1), after)  # constructing the wrapper drew nothing
    torch.manual_seed(3)
    b = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    torch.manual_seed(4)
    c = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    assert a.noise.seed == b.noise.seed != c.noise.seed


def _live_bytes_at_backward(monkeypatch, step) -> tuple[int, int]:
    """(bytes alive when the step's backward starts, peak bytes of the step) above those alive before it, from
    the torch profiler's memory events; the backward start is marked by a small allocation of a unique size.
    ``step`` must not free tensors allocated before it (see ``bench.common.peak_extra_bytes``)."""
    import r3f_opt.optimizer as optimizer_module
    from torch.profiler import ProfilerActivity, profile

    marker = 1_234_567
    backward = optimizer_module._Passes.backward

    def marked(self, loss, result):
        torch.empty(marker, dtype=torch.uint8)
        return backward(self, loss, result)

    if not getattr(backward, "marked", False):
        marked.marked = True
        monkeypatch.setattr(optimizer_module._Passes, "backward", marked)
    # Garbage of earlier steps or tests (reference cycles) freed by a collection inside the measured step would
    # count as this step's frees: collect it first, and let no collection run during the step.
    gc.collect()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    finally:
        gc.enable()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    at_backward = None
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
        if at_backward is None and e.nbytes() == marker:
            at_backward = live - marker
    return at_backward, peak


def test_logits_path_holds_nothing_of_the_noisy_loss_at_the_backward(monkeypatch):
    """The noisy pass's model output (its loss, the loss's float32 log-softmax) is freed before the KL and the
    backward: what is alive when the backward starts is the same whether the noisy pass computed a loss or not."""
    import transformers

    vocab, rows = 16_384, 2 * 32
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).train()
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, eps=1e-3)
    ids = torch.randint(0, vocab, (2, 32))
    logits_bytes = rows * vocab * 4

    def closure_for(noisy_labels: bool):
        calls = []

        def closure():  # the clean pass always computes the loss; the noisy one only if noisy_labels
            calls.append(1)
            return model(input_ids=ids, labels=ids) if len(calls) == 1 or noisy_labels else (
                torch.zeros(()), model(input_ids=ids).logits)
        return closure

    def measured(noisy_labels: bool) -> int:
        opt.zero_grad()  # outside the profiled window: it frees the last step's gradients (1 MiB here)
        closure = closure_for(noisy_labels)
        return _live_bytes_at_backward(monkeypatch, lambda: opt.step(closure))[0]

    opt.step(closure_for(True))  # warm up (lazy initialisations)
    with_loss = measured(True)
    opt.step(closure_for(False))  # what the previous step leaves behind must be the same in both
    without = measured(False)
    # At least the clean logits, the clean loss's log-softmax and the noisy logits are alive; a kept noisy loss
    # graph would add one more logits-sized tensor (its log-softmax).
    assert with_loss >= 3 * logits_bytes
    assert abs(with_loss - without) < 0.05 * logits_bytes, (with_loss - without) / logits_bytes


def test_state_dict_hooks_run_and_the_wrapper_deep_copies():
    import copy

    model, opt = make(dropout=0.0, eps=1e-2)
    batch = toy_batch("bert")
    opt.step(lambda: model(**batch))
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: (seen.append("post"), {**sd, "tag": 1})[1])
    opt.register_load_state_dict_pre_hook(lambda o, sd: (seen.append("load pre"), {k: v for k, v in sd.items()
                                                                                  if k != "tag"})[1])
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load post"))
    sd = opt.state_dict()
    assert sd["tag"] == 1 and "r3f" in sd
    opt.load_state_dict(sd)  # the pre hook removes "tag", which the inner AdamW would not know
    assert seen == ["pre", "post", "load pre", "load post"]
    twin = copy.deepcopy(opt)  # the wrapper, its model and its inner optimizer, together
    assert twin.model is not model and twin.optimizer.param_groups[0]["params"][0] is next(twin.model.parameters())
    opt.zero_grad()  # deepcopy does not copy a Parameter's .grad
    r1, r2 = opt.step(lambda: model(**batch)), twin.step(lambda: twin.model(**batch))
    assert r1.loss == r2.loss  # the same state, the same noise: the same step
    assert_same_params(params_of(twin.model), params_of(model))
