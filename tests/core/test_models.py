"""Tiny randomly initialised HF models learn a toy task with R3F and R4F."""
import pytest
import torch
from helpers import kl_mask, tiny_model, toy_batch

from r3f_opt import RegularizedOptimizer

CASES = [(k, m) for k in ["bert", "roberta", "distilbert", "bart", "gpt2"] for m in ["r3f", "r4f"]]
CASES += [("bart-seq2seq", "r3f"), ("gpt2-lm", "r3f")]


@pytest.mark.parametrize("kind, method", CASES)
def test_loss_falls(kind, method):
    torch.manual_seed(0)
    model = tiny_model(kind)
    opt = RegularizedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, method=method,
                               eps=1e-3, noise="normal" if kind.endswith("seq2seq") else "uniform", seed=0)
    batch = toy_batch(kind, batch=16)
    mask = kl_mask(kind, batch)
    losses, kls = [], []
    for _ in range(25):
        opt.zero_grad()
        res = opt.step(lambda: model(**batch), mask=mask)
        losses.append(res.task_loss.item())
        kls.append(res.sym_kl.item())
    assert all(k > 0 for k in kls)  # dropout + noise: the KL term is live throughout
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, losses
