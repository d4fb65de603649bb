"""What every method shares: the step's result, the passes a method may run, plain fine-tuning."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ContextManager, Optional, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..noise import EmbeddingNoise

__all__ = ["StepResult", "Passes", "Standard", "is_distributed_wrapper", "check_classes", "check_same_shape",
           "check_noise_reached", "global_rng", "set_global_rng"]


@dataclass
class StepResult:
    """What one step computed. ``loss``, ``task_loss`` and ``sym_kl`` are detached; ``output`` is the first
    pass's model output as the closure returned it (detach its tensors before keeping them)."""

    loss: torch.Tensor  # the objective: task_loss + lam * sym_kl
    task_loss: torch.Tensor  # the task loss (R-Drop: the mean of both passes'; FreeLB: the mean over its steps)
    sym_kl: torch.Tensor  # the regulariser lam multiplies (0 for "standard" and "freelb")
    output: Any  # the first pass's model output, for metrics
    skipped: bool = False  # True when the loss or the gradient was not finite and nothing was changed
    terms: dict = field(default_factory=dict)  # method-specific values (e.g. SMART's KL at the random start)


class Passes(Protocol):
    """What a method may do within one (micro-)step; :class:`RegularizedOptimizer` provides it."""

    def run(self) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """One pass of the closure: (model output, scalar task loss, logits)."""

    def forward(self) -> Any:
        """One pass of the closure, its output unchecked (the fused LM-head path reads neither loss nor logits)."""

    def backward(self, loss: torch.Tensor, result: StepResult) -> None:
        """Backpropagate ``loss`` (weighted, scaled) into the parameters; a non-finite loss skips the step
        (``result`` is what is reported then)."""

    def grad_sync(self, last: bool) -> ContextManager:
        """Inside it, a backward all-reduces gradients (DDP/FSDP) only if ``last`` and the step syncs."""

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the fp16 loss scale the backward uses (a GradScaler's), for a method's own
        ``autograd.grad`` whose gradients would underflow in fp16 otherwise; ``loss`` itself without one."""


def loss_scaled(scaler: Any, loss: torch.Tensor) -> torch.Tensor:
    """``loss`` times the loss scale of ``scaler`` (a ``GradScaler``) when it is enabled, else ``loss``."""
    return scaler.scale(loss) if scaler is not None and scaler.is_enabled() else loss


def is_distributed_wrapper(model: nn.Module) -> bool:
    """Whether ``model`` is wrapped for data parallelism (DDP, FSDP1 or FSDP2)."""
    return isinstance(model, DistributedDataParallel) or callable(getattr(model, "set_requires_gradient_sync", None)) \
        or type(model).__name__ == "FullyShardedDataParallel"


def global_rng() -> dict:
    """The global RNG states dropout draws from: CPU, and every initialised CUDA device."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def set_global_rng(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def check_classes(logits: torch.Tensor) -> None:
    """Refuse logits with one class: a softmax over one logit is always 1, so every KL between two passes is 0."""
    if logits.dim() == 0 or logits.shape[-1] == 1:
        raise ValueError(
            f"the logits have shape {tuple(logits.shape)}: one output per row (a regression head, e.g. num_labels=1 "
            "for STS-B), whose softmax is always 1, so the KL term would be 0 and every step would pay for passes "
            "that change nothing; use method='standard' (or 'freelb', which needs no distributions) for regression")


def check_same_shape(clean: torch.Tensor, other: torch.Tensor) -> None:
    if other.shape != clean.shape:
        raise ValueError(f"the logits of the two passes differ in shape: first {tuple(clean.shape)}, second "
                         f"{tuple(other.shape)}; the closure must run the same batch every time")


def check_noise_reached(noise: EmbeddingNoise) -> None:
    if noise.calls == 0:
        raise RuntimeError(
            f"the perturbed pass never called the embedding module {type(noise.module).__name__} (did the closure "
            "pass inputs_embeds?); pass embeddings= the module the model calls on its input ids. A torch.compile'd "
            "model that the optimizer was not given (the closure calls it) needs torch._dynamo.config."
            "skip_nnmodule_hook_guards = False before its first call, or its graph runs without the noise hook")


class Standard:
    """Plain fine-tuning under the same API: one pass, no regulariser.

    Subclasses that add a term to the first pass's loss override :meth:`term`; those that run their passes
    differently override :meth:`step`.
    """

    noise: Optional[EmbeddingNoise] = None
    kl_mask = False  # whether step()'s mask selects rows of a KL term (r3f, r4f, rdrop, smart)
    terms: dict = {}  # what the last term() measured besides its value (read-only here; methods rebind it)

    def step_scope(self) -> ContextManager:
        """Wrap one (micro-)step's passes in it when calling :meth:`term` directly (a Trainer's compute_loss):
        r3f/r4f take the RNG snapshot ``same_dropout`` replays there; a no-op for the others."""
        return contextlib.nullcontext()

    def step(self, passes: Passes, *, lam: float, mask: Optional[torch.Tensor] = None,
             noise_mask: Optional[torch.Tensor] = None) -> StepResult:
        """Run the method's passes and its backward for one (micro-)batch."""
        out, task_loss, logits = passes.run()
        return self.finish(passes, out, task_loss, self.term(passes, logits, mask=mask, noise_mask=noise_mask), lam)

    def finish(self, passes: Passes, out: Any, task_loss: torch.Tensor, term: Optional[torch.Tensor], lam: float,
               extra: Optional[torch.Tensor] = None, terms: Optional[dict] = None) -> StepResult:
        """``loss = task_loss + lam * term (+ extra)``, reported and backpropagated."""
        reg = task_loss.new_zeros((), dtype=torch.float32) if term is None else term
        loss = task_loss + lam * reg  # float32 at least
        if extra is not None:
            loss = loss + extra
        result = StepResult(loss.detach(), task_loss.detach(), reg.detach(), out, terms={**self.terms, **(terms or {})})
        passes.backward(loss, result)
        return result

    def term(self, passes: Passes, clean: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
             noise_mask: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The regulariser for the first pass's ``clean`` logits (runs more passes if it needs them)."""
        return None

    def snapshot(self) -> Any:
        """What a (micro-)step may move besides the gradients (the noise stream; R4F's power-iteration vectors),
        for :meth:`restore` when the step raises."""
        return self.noise.snapshot() if self.noise is not None else None

    def restore(self, snapshot: Any) -> None:
        if snapshot is not None:
            self.noise.restore(snapshot)

    def after_update(self) -> None:
        """Called once the inner optimizer has updated the parameters (not for a skipped step)."""

    def check_state(self, state: Optional[dict]) -> None:
        """Raise ValueError if ``state`` cannot be loaded (called before anything is changed)."""

    def state_dict(self) -> Optional[dict]:
        return self.noise.state_dict() if self.noise is not None else None

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state is not None and self.noise is not None:
            self.noise.load_state_dict(state)
