"""The regularisers, one small unit each; :class:`RegularizedOptimizer` and ``R3FTrainer`` run the passes.

A method sees the clean pass's logits and a ``rerun`` callable that runs the model once more and returns
its logits. It returns its regularisation term (added to the task loss with weight ``lam``), or ``None``
when it adds nothing. Setting a method up may change the model (R4F normalises the head), so every check
that can fail runs first.

* ``standard``: no second pass, no term.
* ``r3f``: a second pass with noise ``z`` on the input token embeddings; the term is
  ``KL_S(softmax(clean) || softmax(noisy))`` (:func:`~r3f_opt.symmetric_kl`).
* ``r4f``: R3F with the classification head spectrally normalised (:func:`~r3f_opt.apply_r4f`).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .kl import symmetric_kl
from .noise import EmbeddingNoise, find_embeddings, refuse_other_noise
from .r4f import _is_normalised, apply_r4f, find_head

__all__ = ["METHODS", "Standard", "R3F", "R4F", "build_method"]

METHODS = ("r3f", "r4f", "standard")


class Standard:
    """Plain fine-tuning under the same API: one clean pass, no regularisation term."""

    noise: Optional[EmbeddingNoise] = None

    def term(self, rerun: Callable[[], torch.Tensor], clean: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
             noise_mask: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        return None

    def state_dict(self) -> Optional[dict]:
        return None

    def load_state_dict(self, state: Optional[dict]) -> None:
        pass


class R3F(Standard):
    """R3F's term: ``KL_S(clean || noisy)`` with ``z ~ U(-eps, eps)`` or ``N(0, eps^2)`` on the embeddings.

    Args:
        model: the model (wrappers are unwrapped to find its input token embeddings).
        eps, noise: the noise scale and distribution (``"uniform"`` or ``"normal"``).
        noisy_grad: whether the noisy pass builds a graph (the KL gradient flows through both passes).
        reduction: the KL's reduction (:func:`~r3f_opt.symmetric_kl`).
        seed: seed of the noise generator.
        embeddings: the module to perturb, when it cannot be found automatically.
        noisy_embed_grad: let the noisy pass train the embedding table (default: the lookup is detached).
    """

    def __init__(self, model: nn.Module, *, eps: float, noise: str, noisy_grad: bool, reduction: str, seed: int,
                 embeddings: Optional[nn.Module] = None, noisy_embed_grad: bool = False) -> None:
        emb, scope = (embeddings, None) if embeddings is not None else find_embeddings(model)
        refuse_other_noise(emb)
        self.noise = EmbeddingNoise(emb, scope, eps, noise, not noisy_embed_grad, seed)
        self.noisy_grad, self.reduction = noisy_grad, reduction

    def term(self, rerun: Callable[[], torch.Tensor], clean: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
             noise_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        with self.noise.active(noise_mask), torch.set_grad_enabled(self.noisy_grad and torch.is_grad_enabled()):
            noisy = rerun()
        if self.noise.calls == 0:
            raise RuntimeError(
                f"the noisy pass never called the embedding module {type(self.noise.module).__name__} (did the "
                "closure pass inputs_embeds?); pass embeddings= the module the model calls on its input ids"
            )
        if noisy.shape != clean.shape:
            raise ValueError(
                f"the logits of the two passes differ in shape: clean {tuple(clean.shape)}, noisy "
                f"{tuple(noisy.shape)}; the closure must run the same batch both times"
            )
        return symmetric_kl(clean, noisy, mask=mask, reduction=self.reduction)

    def state_dict(self) -> dict:
        return self.noise.state_dict()

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state is not None:
            self.noise.load_state_dict(state)


def is_distributed_wrapper(model: nn.Module) -> bool:
    """Whether ``model`` is wrapped for data parallelism (DDP, FSDP1 or FSDP2)."""
    return isinstance(model, DistributedDataParallel) or callable(getattr(model, "set_requires_gradient_sync", None)) \
        or type(model).__name__ == "FullyShardedDataParallel"


class R4F(R3F):
    """R3F with the head spectrally normalised at construction (``r4f_kwargs`` go to :func:`apply_r4f`)."""

    def __init__(self, model: nn.Module, *, r4f_kwargs: Optional[dict] = None, **r3f_kwargs) -> None:
        kw = dict(r4f_kwargs or {})
        if is_distributed_wrapper(model) and not all(
                _is_normalised(m) for m in find_head(model, kw.get("head"), kw.get("scope", "out_proj"))):
            raise ValueError(
                f"the model is already wrapped ({type(model).__name__}): call apply_r4f(model) before wrapping "
                "it in DDP/FSDP. A parametrization registered afterwards re-registers the head's weight, which "
                "the wrapper then never synchronises."
            )
        super().__init__(model, **r3f_kwargs)
        apply_r4f(model, **kw)  # last: raises before anything changes if there is no head


def build_method(method: str, model: nn.Module, *, r4f_kwargs: Optional[dict] = None, **r3f_kwargs) -> Standard:
    """The unit for ``method`` (one of :data:`METHODS`); ``r3f_kwargs`` as :class:`R3F` takes them."""
    if method == "standard":
        return Standard()
    if method == "r3f":
        return R3F(model, **r3f_kwargs)
    if method == "r4f":
        return R4F(model, r4f_kwargs=r4f_kwargs, **r3f_kwargs)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
