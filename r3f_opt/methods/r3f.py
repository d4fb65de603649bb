"""R3F and R4F (Aghajanyan et al., ICLR 2021): a noisy pass and the symmetric KL to the clean one.

    L = L_task(f(x)) + lam * KL_S(f(x) || f(x + z)),   z ~ U(-eps, eps) or N(0, eps^2) on the token embeddings

R4F also spectrally normalises the classification head (:func:`~r3f_opt.apply_r4f`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
from torch import nn
from torch.nn.utils.parametrizations import _SpectralNorm

from ..kl import symmetric_kl
from ..lm_head import CapturedPass, FusedLMHead
from ..noise import EmbeddingNoise, find_embeddings, refuse_other_noise
from ..r4f import _is_normalised, apply_r4f, find_head
from .base import (Passes, Standard, StepResult, check_noise_reached, check_same_shape, global_rng,
                   is_distributed_wrapper, set_global_rng)

__all__ = ["R3F", "R4F", "embedding_noise"]

T = TypeVar("T")


def embedding_noise(model: nn.Module, embeddings: Optional[nn.Module], eps: float, noise: str, detach: bool,
                    seed: int, scale: str = "absolute") -> EmbeddingNoise:
    """The perturbation source on ``model``'s input token embeddings (found unless ``embeddings`` is given)."""
    emb, scope = (embeddings, None) if embeddings is not None else find_embeddings(model)
    refuse_other_noise(emb)
    return EmbeddingNoise(emb, scope, eps, noise, detach, seed, scale)


class R3F(Standard):
    """R3F's term ``KL_S(clean || noisy)``.

    Args:
        model: the model (wrappers are unwrapped to find its input token embeddings).
        eps, noise: the noise scale and distribution (``"uniform"`` or ``"normal"``).
        noisy_grad: whether the noisy pass builds a graph (the KL gradient flows through both passes).
        reduction: the KL's reduction (:func:`~r3f_opt.symmetric_kl`).
        seed: seed of the noise generator.
        embeddings: the module to perturb, when it cannot be found automatically.
        noisy_embed_grad: let the noisy pass train the embedding table (default: the lookup is detached).
        same_dropout: replay the clean pass's dropout masks in the noisy pass (the global RNG is restored to
            its state before the clean pass, then to where the clean pass left it; R4F does the same with the
            head's power-iteration vectors), so the KL measures the noise alone; with ``eps=0`` it is exactly 0.
        noise_scale: ``"absolute"`` (``eps`` in the embeddings' units) or ``"relative"`` (a fraction of each
            token's embedding RMS; see :class:`~r3f_opt.noise.EmbeddingNoise`).
        fused_lm_head: for a Hugging Face causal LM: the task loss and the KL from the hidden states before the
            LM head (:class:`~r3f_opt.lm_head.FusedLMHead`, :func:`~r3f_opt.linear_r3f_loss`), no logits.
    """

    kl_mask = True

    def __init__(self, model: nn.Module, *, eps: float, noise: str, noisy_grad: bool, reduction: str, seed: int,
                 embeddings: Optional[nn.Module] = None, noisy_embed_grad: bool = False,
                 same_dropout: bool = False, noise_scale: str = "absolute", fused_lm_head: bool = False) -> None:
        self.noise = embedding_noise(model, embeddings, eps, noise, not noisy_embed_grad, seed, noise_scale)
        self.fused: Optional[FusedLMHead] = FusedLMHead(model) if fused_lm_head else None
        self.noisy_grad, self.reduction, self.same_dropout = noisy_grad, reduction, same_dropout
        self._before_clean: Optional[dict] = None

    @contextlib.contextmanager
    def step_scope(self) -> Iterator[None]:
        self._before_clean = global_rng() if self.same_dropout else None  # before the clean pass
        try:
            yield
        finally:
            self._before_clean = None

    def step(self, passes: Passes, *, lam: float, mask: Optional[torch.Tensor] = None,
             noise_mask: Optional[torch.Tensor] = None) -> StepResult:
        with self.step_scope():
            if self.fused is None:
                return super().step(passes, lam=lam, mask=mask, noise_mask=noise_mask)
            out, total, ce, kl = self.fused_objective(passes, lam=lam, mask=mask, noise_mask=noise_mask)
            result = StepResult(total.detach(), ce.detach(), kl.detach(), out)
            passes.backward(total, result)  # total's gradients were computed in its forward: only scaled here
            return result

    def fused_objective(self, passes: Passes, *, lam: float, mask: Optional[torch.Tensor] = None,
                        noise_mask: Optional[torch.Tensor] = None, **loss_kwargs: Any) -> tuple[Any, torch.Tensor,
                                                                                               torch.Tensor, torch.Tensor]:
        """Both passes through :class:`~r3f_opt.lm_head.FusedLMHead`: ``(clean output, total, ce, kl)`` with
        ``total = ce + lam * kl`` (``loss_kwargs`` go to :meth:`FusedLMHead.loss`)."""
        with self.fused.capture() as clean:
            out = passes.forward()
        self.fused.check(clean)

        def noisy_pass() -> CapturedPass:
            with self.fused.capture() as rec:
                passes.forward()
            return rec

        noisy = self._noisy(noise_mask, noisy_pass)
        total, ce, kl = self.fused.loss(clean, noisy, lam=lam, mask=mask, reduction=self.reduction,
                                        noisy_grad=self.noisy_grad, **loss_kwargs)
        return out, total, ce, kl

    def _noisy(self, noise_mask: Optional[torch.Tensor], run: Callable[[], T]) -> T:
        """``run()`` with the noise on (and, with same_dropout, the clean pass's dropout masks replayed)."""
        after_clean = None
        if self._before_clean is not None:  # same_dropout: replay the clean pass's dropout masks
            after_clean = global_rng()
            set_global_rng(self._before_clean)
        try:
            with self.noise.active(noise_mask), \
                    torch.set_grad_enabled(self.noisy_grad and torch.is_grad_enabled()):
                result = run()
        finally:
            if after_clean is not None:  # the global RNG ends where one standard forward leaves it
                set_global_rng(after_clean)
        check_noise_reached(self.noise)
        return result

    def term(self, passes: Passes, clean: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
             noise_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        noisy = self._noisy(noise_mask, lambda: passes.run()[2])
        check_same_shape(clean, noisy)
        return symmetric_kl(clean, noisy, mask=mask, reduction=self.reduction)


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
        # Each training forward runs a power iteration on u, v in place: with same_dropout the noisy pass must
        # see the clean pass's u, v too, or the KL is not the noise's alone (see step_scope, _noisy).
        self._norms = [m for m in model.modules() if isinstance(m, _SpectralNorm)]
        self._uv_before: Optional[list] = None

    def _uv(self) -> list:
        return [(m._u.clone(), m._v.clone()) for m in self._norms]

    def _set_uv(self, uv: list) -> None:
        with torch.no_grad():
            for m, (u, v) in zip(self._norms, uv):
                m._u.copy_(u)
                m._v.copy_(v)

    def snapshot(self) -> tuple:
        return super().snapshot(), self._uv()

    def restore(self, snapshot: tuple) -> None:
        super().restore(snapshot[0])
        self._set_uv(snapshot[1])

    @contextlib.contextmanager
    def step_scope(self) -> Iterator[None]:
        with super().step_scope():
            self._uv_before = self._uv() if self.same_dropout else None  # before the clean pass
            try:
                yield
            finally:
                self._uv_before = None

    def _noisy(self, noise_mask: Optional[torch.Tensor], run: Callable[[], T]) -> T:
        """R3F's noisy pass; with same_dropout also from the clean pass's u, v, which it then ends with (as the
        RNG: the state one standard forward leaves)."""
        if self._uv_before is None:
            return super()._noisy(noise_mask, run)
        after_clean = self._uv()
        self._set_uv(self._uv_before)
        try:
            return super()._noisy(noise_mask, run)
        finally:
            self._set_uv(after_clean)
