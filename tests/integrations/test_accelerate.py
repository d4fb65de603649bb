"""RegularizedOptimizer in an Accelerate loop: accelerator.backward passed in, the step under accumulate()."""
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from helpers import tiny_model, toy_batch

from r3f_opt import RegularizedOptimizer

MICRO, ACCUM, STEPS = 4, 2, 3


@pytest.fixture
def accelerator():
    acc = Accelerator(gradient_accumulation_steps=ACCUM, cpu=True)
    yield acc
    AcceleratorState._reset_state(True)  # the state is a process-wide singleton
    GradientState._reset_state()


def micro_batches():
    full = toy_batch("bert", batch=MICRO * ACCUM * STEPS, seq=6, seed=5)
    return [{k: v[i:i + MICRO] for k, v in full.items()} for i in range(0, MICRO * ACCUM * STEPS, MICRO)]


def test_accelerate_loop_equals_manual_accumulation(accelerator):
    torch.manual_seed(0)
    model = tiny_model("bert", dropout=0.0)
    inner = torch.optim.SGD(model.parameters(), lr=0.5)
    model, inner = accelerator.prepare(model, inner)
    opt = RegularizedOptimizer(inner, model, eps=1e-2, seed=1, backward=accelerator.backward)
    kls = []
    for batch in micro_batches():  # the documented loop
        with accelerator.accumulate(model):
            result = opt.step(lambda: model(**batch))
            opt.zero_grad()
        kls.append(result.sym_kl.item())
    assert all(k > 0 for k in kls)

    torch.manual_seed(0)
    ref = tiny_model("bert", dropout=0.0)
    ref_opt = RegularizedOptimizer(torch.optim.SGD(ref.parameters(), lr=0.5), ref, eps=1e-2, seed=1)
    batches = micro_batches()
    for s in range(STEPS):
        for batch in batches[s * ACCUM:(s + 1) * ACCUM]:
            ref_opt.backward(lambda: ref(**batch), weight=1.0 / ACCUM)
        ref_opt.step()
        ref_opt.zero_grad()
    got = accelerator.unwrap_model(model).state_dict()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
    torch.manual_seed(0)
    start = tiny_model("bert", dropout=0.0).state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in got.items())
