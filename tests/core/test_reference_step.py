"""One R3F step against a hand-written float64 reference of the reference implementation's formulas."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from r3f_opt import RegularizedOptimizer

V, H, C, B, T = 11, 5, 3, 4, 6


class Tiny(nn.Module):
    def __init__(self, token_level: bool):
        super().__init__()
        self.token_level = token_level
        self.emb = nn.Embedding(V, H)
        self.proj = nn.Linear(H, H)
        self.head = nn.Linear(H, C)

    def forward(self, x, y, mask=None):
        h = torch.tanh(self.proj(self.emb(x)))
        if self.token_level:
            logits = self.head(h)
            loss = F.cross_entropy(logits[mask], y[mask])
        else:
            logits = self.head(h.mean(1))
            loss = F.cross_entropy(logits, y)
        return {"loss": loss, "logits": logits}


def reference_loss(params, x, y, z, lam, mask, token_level, noisy_grad):
    """fairseq rxf: CE on the clean pass + lam * (KL(P||Q) + KL(Q||P)) summed over rows / batch size.

    The noisy branch adds z to a detached embedding lookup (classification semantics)."""
    emb, pw, pb, hw, hb = params

    def f(e):
        h = torch.tanh(e @ pw.T + pb)
        return h @ hw.T + hb if token_level else h.mean(1) @ hw.T + hb

    e = emb[x]
    clean, noisy = f(e), f(e.detach() + z)
    if not noisy_grad:
        noisy = noisy.detach()
    if token_level:
        task = F.cross_entropy(clean[mask], y[mask])
        clean, noisy = clean[mask], noisy[mask]  # the KL counts target tokens only
    else:
        task = F.cross_entropy(clean, y)
    kl = (F.kl_div(F.log_softmax(noisy, -1), F.softmax(clean, -1), reduction="sum")
          + F.kl_div(F.log_softmax(clean, -1), F.softmax(noisy, -1), reduction="sum")) / B
    return task + lam * kl, task, kl


@pytest.mark.parametrize("token_level", [False, True])
@pytest.mark.parametrize("noise", ["uniform", "normal"])
@pytest.mark.parametrize("noisy_grad", [True, False])
def test_one_step_equals_float64_reference(token_level, noise, noisy_grad):
    torch.manual_seed(1)
    model = Tiny(token_level).double()
    x = torch.randint(0, V, (B, T))
    y = torch.randint(0, C, (B, T) if token_level else (B,))
    mask = torch.rand(B, T) > 0.3 if token_level else None
    eps, lam, seed = 0.3, 0.7, 1234
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, eps=eps, lam=lam,
                               noise=noise, noisy_grad=noisy_grad, seed=seed, embeddings=model.emb)
    params = [p.detach().clone().requires_grad_() for p in
              (model.emb.weight, model.proj.weight, model.proj.bias, model.head.weight, model.head.bias)]

    result = opt.backward(lambda: model(x, y, mask), mask=mask)

    g = torch.Generator().manual_seed(seed)  # the wrapper draws float32 noise from its own generator
    z = torch.empty(B, T, H, dtype=torch.float32)
    z = (z.uniform_(-eps, eps, generator=g) if noise == "uniform" else z.normal_(0, eps, generator=g)).double()
    want, task, kl = reference_loss(params, x, y, z, lam, mask, token_level, noisy_grad)
    want.backward()

    assert kl.item() > 1e-6  # the test is not vacuous
    torch.testing.assert_close(result.loss, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.task_loss, task.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.sym_kl, kl.detach(), rtol=1e-12, atol=1e-12)
    got = (model.emb.weight, model.proj.weight, model.proj.bias, model.head.weight, model.head.bias)
    for p, ref in zip(got, params):
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-10, atol=1e-12)

    before = [p.detach().clone() for p in got]
    opt.step()  # no closure: the inner SGD step on the gradients above
    for p, b, ref in zip(got, before, params):
        torch.testing.assert_close(p.detach(), b - 0.1 * ref.grad, rtol=1e-10, atol=1e-12)
