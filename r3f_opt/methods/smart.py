"""SMART's smoothness-inducing adversarial regulariser (Jiang et al., ACL 2020), as in its Algorithm 1:

    delta_0 ~ N(0, sigma^2)                                   on the input token embeddings
    for k = 1..adv_steps:                                     projected ascent, clean side held constant
        g       = d/d delta  KL_S(f(x) || f(x + delta))
        delta   = clip(delta + step_size * g / ||g||_inf, -epsilon, epsilon)     (||.||_inf per token)
    L = L_task(f(x)) + lam * KL_S(f(x) || f(x + delta))       gradient through both passes

Optionally (``proximal = mu > 0``; off by default) the momentum Bregman proximal point term of SMART:

    L += mu * KL_S(f(x; theta) || f(x; theta_tilde)),   theta_tilde <- beta * theta_tilde + (1 - beta) * theta

with the teacher ``theta_tilde`` (a copy of the trainable parameters, in float32 at least, so that the
moving average moves for bf16 / fp16 parameters too; saved in ``state_dict``; the parameters' values at the
first step) moved towards the parameters after every optimizer update, once per
update however many micro-batches it accumulated, and not for a skipped step. The paper uses mu = 1,
beta = 0.99.

Defaults are the paper's (sigma = eps = 1e-5, step_size = 1e-3, epsilon = 1e-5, one ascent step).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..kl import symmetric_kl
from .base import Passes, Standard, StepResult, check_noise_reached, check_same_shape
from .r3f import embedding_noise

__all__ = ["SMART"]


def _teacher_dtype(p: torch.Tensor) -> torch.dtype:
    """float32 for 16-bit parameters: in their dtype, beta * t + (1 - beta) * p rounds back to t (bf16 keeps 8
    bits), and the teacher would never move."""
    return torch.promote_types(p.dtype, torch.float32)


class SMART(Standard):
    """SMART's adversarial term. ``sigma`` is the optimizer's ``eps``; the start is drawn from the wrapper's
    seeded generator (saved in ``state_dict``), so a resumed run draws the same."""

    kl_mask = True

    def __init__(self, model: nn.Module, *, sigma: float, noisy_grad: bool, reduction: str, seed: int,
                 embeddings: Optional[nn.Module] = None, noisy_embed_grad: bool = False, adv_steps: int = 1,
                 step_size: float = 1e-3, epsilon: Optional[float] = 1e-5, proximal: float = 0.0,
                 proximal_momentum: float = 0.99) -> None:
        if not proximal_momentum <= 1:
            raise ValueError(f"method_kwargs['proximal_momentum'] must be in [0, 1], got {proximal_momentum!r}")
        self.noise = embedding_noise(model, embeddings, sigma, "normal", not noisy_embed_grad, seed)
        self.noisy_grad, self.reduction = noisy_grad, reduction
        self.adv_steps, self.step_size, self.epsilon = adv_steps, step_size, epsilon
        self.proximal, self.momentum = proximal, proximal_momentum
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.teacher: Optional[list[torch.Tensor]] = None
        self.terms: dict = {}

    def step(self, passes: Passes, *, lam: float, mask: Optional[torch.Tensor] = None,
             noise_mask: Optional[torch.Tensor] = None) -> StepResult:
        teacher = self.teacher_logits(passes) if self.proximal > 0 else None  # before any graph exists
        out, task_loss, logits = passes.run()
        adv = self.term(passes, logits, mask=mask, noise_mask=noise_mask)
        if teacher is None:
            return self.finish(passes, out, task_loss, adv, lam)
        prox = self.proximal_kl(logits, teacher, mask)
        return self.finish(passes, out, task_loss, adv, lam, extra=self.proximal * prox,
                           terms={"kl_proximal": prox.detach()})

    def proximal_kl(self, logits: torch.Tensor, teacher: torch.Tensor,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """KL_S(f(x; theta) || f(x; theta_tilde)), the proximal term before mu (``teacher``: teacher_logits)."""
        check_same_shape(logits, teacher)
        return symmetric_kl(logits, teacher, mask=mask, reduction=self.reduction)

    @torch.no_grad()
    def after_update(self) -> None:
        """theta_tilde <- beta * theta_tilde + (1 - beta) * theta, once the optimizer has updated theta."""
        if self.teacher is not None:
            for t, p in zip(self.teacher, self.params):
                t.mul_(self.momentum).add_(p.detach(), alpha=1 - self.momentum)

    @torch.no_grad()
    def teacher_logits(self, passes: Passes) -> torch.Tensor:
        """One pass with the teacher's values (the parameters' own at the first step), no gradient."""
        if self.teacher is None:
            self.teacher = [p.detach().to(_teacher_dtype(p), copy=True) for p in self.params]
        current = [p.detach().clone() for p in self.params]
        for p, t in zip(self.params, self.teacher):
            p.copy_(t)
        try:
            return passes.run()[2].detach()
        finally:
            for p, c in zip(self.params, current):
                p.copy_(c)

    def check_state(self, state: Optional[dict]) -> None:
        teacher = (state or {}).get("teacher")
        if teacher is not None and (not isinstance(teacher, (list, tuple)) or len(teacher) != len(self.params) or any(
                not isinstance(t, torch.Tensor) or t.shape != p.shape for t, p in zip(teacher, self.params))):
            raise ValueError("state_dict['r3f']['noise']['teacher'] does not match this model's trainable parameters")

    def state_dict(self) -> dict:
        return {**self.noise.state_dict(), "teacher": self.teacher}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state is None:
            return
        self.noise.load_state_dict(state)
        teacher = state.get("teacher")
        self.teacher = None if teacher is None else [
            t.detach().to(device=p.device, dtype=_teacher_dtype(p), copy=True) for t, p in zip(teacher, self.params)]

    def term(self, passes: Passes, clean: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
             noise_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        delta: Optional[torch.Tensor] = None

        def perturbation(x: torch.Tensor) -> torch.Tensor:  # delta_0 has the lookup output's shape
            nonlocal delta
            if delta is None:  # the ascent's leaf
                delta = self.noise.sample(x.shape, x.device).requires_grad_(True)
            return delta

        target, kl_start = clean.detach(), None
        for _ in range(self.adv_steps):
            if delta is not None:
                delta = delta.detach().requires_grad_(True)
            # No parameter gets a gradient from the ascent: DDP must not expect (and wait for) one.
            with passes.grad_sync(last=False), self.noise.active(noise_mask, perturbation), torch.enable_grad():
                adv = passes.run()[2]
            check_noise_reached(self.noise)
            check_same_shape(clean, adv)
            kl = symmetric_kl(target, adv, mask=mask, reduction=self.reduction)
            kl_start = kl.detach() if kl_start is None else kl_start
            # the perturbation's gradient only (no parameter is touched), loss-scaled as the backward is: in fp16
            # an unscaled KL's gradient underflows to 0 for most tokens; the scale cancels in g / ||g||_inf
            (g,) = torch.autograd.grad(passes.scale(kl), delta)
            # g / ||g||_inf per token, guarded only against 0 (mt-dnn adds 1e-6, which shrinks steps whose
            # gradients are that small and makes them depend on the batch size and the number of ranks)
            delta = delta.detach() + self.step_size * g / g.abs().amax(-1, keepdim=True).clamp_min(1e-30)
            if self.epsilon is not None:
                delta = delta.clamp(-self.epsilon, self.epsilon)
        with self.noise.active(noise_mask, perturbation), \
                torch.set_grad_enabled(self.noisy_grad and torch.is_grad_enabled()):
            adv = passes.run()[2]
        check_noise_reached(self.noise)
        kl = symmetric_kl(clean, adv, mask=mask, reduction=self.reduction)
        self.terms = {"kl_start": kl_start, "delta_max": delta.abs().max()}
        return kl
