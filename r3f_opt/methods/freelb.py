"""FreeLB (Zhu et al., ICLR 2020): "free" large-batch adversarial training on the token embeddings.

    delta_0 = U(-1, 1) * m * init_mag / sqrt(L * d)          per example: m its mask, L its length, d the width
    for k = 1..adv_steps:
        grad_theta += d/d theta  L_task(f(x + delta_{k-1})) / adv_steps           (accumulated: the "free" part)
        delta_k = delta_{k-1} + adv_lr * g / ||g||_F,  g = d/d delta L_task(...)   (||.||_F per example)
        delta_k = delta_k * min(1, max_norm / ||delta_k||_F)                        (if max_norm > 0)

There is no clean pass and no KL term: every pass is perturbed, and the embedding table trains through
all of them (the lookup is not detached). As in the authors' code, the K passes share one set of dropout
masks (the global RNG is replayed for passes 2..K and left where the first pass left it), so they differ
only by delta. ``lam`` and ``eps`` are unused.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import Passes, Standard, StepResult, check_noise_reached, global_rng, set_global_rng
from .r3f import embedding_noise

__all__ = ["FreeLB"]


def _per_example_norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).float().norm(dim=1).view(-1, *[1] * (x.dim() - 1))


class FreeLB(Standard):
    """FreeLB with the defaults of its GLUE scripts' range: 2 steps, adv_lr 0.1, init_mag 0.1, no norm bound."""

    def __init__(self, model: nn.Module, *, seed: int, embeddings: Optional[nn.Module] = None, adv_steps: int = 2,
                 adv_lr: float = 0.1, init_mag: float = 0.1, max_norm: float = 0.0) -> None:
        self.noise = embedding_noise(model, embeddings, 1.0, "uniform", False, seed)  # U(-1, 1) for delta_0
        self.adv_steps, self.adv_lr, self.init_mag, self.max_norm = adv_steps, adv_lr, init_mag, max_norm

    def _start(self, x: torch.Tensor, noise_mask: Optional[torch.Tensor]) -> torch.Tensor:
        m = torch.ones(x.shape[:-1], device=x.device) if noise_mask is None else noise_mask.to(x.device).float()
        dims = (m.flatten(1).sum(1) * x.shape[-1]).clamp_min(1)
        mag = (self.init_mag / dims.sqrt()).view(-1, *[1] * (x.dim() - 1))
        return (self.noise.sample(x.shape, x.device) * m.unsqueeze(-1) * mag).requires_grad_(True)

    def step(self, passes: Passes, *, lam: float, mask: Optional[torch.Tensor] = None,
             noise_mask: Optional[torch.Tensor] = None) -> StepResult:
        delta: Optional[torch.Tensor] = None

        def perturbation(x: torch.Tensor) -> torch.Tensor:
            nonlocal delta
            if delta is None:
                delta = self._start(x, noise_mask)
            return delta

        first, losses, result = None, [], None
        before, after = global_rng(), None
        for k in range(self.adv_steps):
            last = k == self.adv_steps - 1
            if k > 0:
                set_global_rng(before)  # the first pass's dropout masks again
            with passes.grad_sync(last):
                with self.noise.active(noise_mask, perturbation):
                    out, task, _ = passes.run()
                after = global_rng() if k == 0 else after
                check_noise_reached(self.noise)
                first = out if first is None else first
                losses.append(task.detach())
                mean = torch.stack(losses).mean()
                result = StepResult(mean, mean, mean.new_zeros(()), first, terms={
                    "task_losses": list(losses), "delta_norm": _per_example_norm(delta.detach()).max()})
                try:
                    passes.backward(task / self.adv_steps, result)  # parameters and delta get their gradients
                finally:
                    set_global_rng(after)  # the global RNG ends where one forward leaves it
            if last:
                break
            g = delta.grad
            delta = delta.detach() + self.adv_lr * g / _per_example_norm(g).clamp_min(1e-8)
            if self.max_norm > 0:
                delta = delta * (self.max_norm / _per_example_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
            delta.requires_grad_(True)
        return result
