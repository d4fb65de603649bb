"""The regularisers, one file each; :class:`~r3f_opt.RegularizedOptimizer` (and ``R3FTrainer``) run them.

A method's :meth:`~base.Standard.step` runs its passes through a :class:`~base.Passes` object (run the
closure; backpropagate a loss) and returns a :class:`~base.StepResult`. Methods that only add a term to
the first pass's loss implement :meth:`~base.Standard.term`.

| method     | passes per step                        | objective                                            |
|------------|----------------------------------------|------------------------------------------------------|
| standard   | 1 fwd + 1 bwd                          | task loss                                            |
| r3f, r4f   | 2 fwd + 1 bwd (through both graphs)    | task + lam * KL_S(clean, noisy)                      |
| rdrop      | 2 fwd + 1 bwd                          | mean of both task losses + lam * KL_S / 2            |
| smart      | (2 + S) fwd + S bwd to delta + 1 bwd   | task + lam * KL_S(clean, adversarial)                |
| freelb     | K fwd + K bwd                          | mean over K perturbed task losses                    |
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

from torch import nn

from .._checks import check_flag
from .._warn import warn_user
from ..noise import NOISE_SCALES, NOISE_TYPES
from .base import Passes, Standard, StepResult, is_distributed_wrapper
from .freelb import FreeLB
from .r3f import R3F, R4F
from .rdrop import RDrop
from .smart import SMART

__all__ = ["METHODS", "METHOD_KWARGS", "DEFAULT_REDUCTION", "build_method", "check_settings", "check_method_kwargs",
           "SETTINGS", "USES", "warn_unused",
           "Standard", "R3F", "R4F", "RDrop", "SMART", "FreeLB", "Passes", "StepResult", "is_distributed_wrapper"]

METHODS = ("r3f", "r4f", "standard", "rdrop", "smart", "freelb")
# method_kwargs each method takes: name -> (type, default, lower bound, whether None is allowed)
METHOD_KWARGS = {
    "smart": {"adv_steps": (int, 1, 1, False), "step_size": (float, 1e-3, 0.0, False),
              "epsilon": (float, 1e-5, 0.0, True), "proximal": (float, 0.0, 0.0, False),
              "proximal_momentum": (float, 0.99, 0.0, False)},
    "freelb": {"adv_steps": (int, 2, 1, False), "adv_lr": (float, 0.1, 0.0, False),
               "init_mag": (float, 0.1, 0.0, False), "max_norm": (float, 0.0, 0.0, False)},
}
DEFAULT_REDUCTION = {"rdrop": "sum"}  # R-Drop's code sums the KL; every other method: "batchmean"
# The wrapper's settings each method reads; set away from its default, one a method does not read is reported.
SETTINGS = {"lam": 1.0, "eps": 1e-5, "noise": "uniform", "noisy_grad": True, "reduction": None}
USES = {"standard": (), "r3f": tuple(SETTINGS), "r4f": tuple(SETTINGS), "rdrop": ("lam", "reduction"),
        "smart": ("lam", "eps", "noisy_grad", "reduction"), "freelb": ()}
WHY_UNUSED = {"standard": "it runs one clean pass and adds no term",
              "rdrop": "it adds no input noise and backpropagates through both passes",
              "smart": "its starting perturbation is always N(0, eps^2)",
              "freelb": "it adds no KL term; its perturbation is set by method_kwargs (adv_steps, adv_lr, "
                        "init_mag, max_norm)"}


def check_method_kwargs(method: str, kwargs: Optional[dict]) -> dict:
    """``kwargs`` checked against :data:`METHOD_KWARGS` for ``method`` (TypeError/ValueError naming the key)."""
    spec = METHOD_KWARGS.get(method, {})
    kwargs = dict(kwargs or {})
    unknown = sorted(set(kwargs) - set(spec))
    if unknown:
        raise TypeError(f"method_kwargs {unknown} are not arguments of method={method!r}; it takes "
                        f"{sorted(spec) or 'none'}")
    for name, value in kwargs.items():
        kind, _, low, nullable = spec[name]
        if value is None and nullable:
            continue
        ok_type = isinstance(value, numbers.Integral) if kind is int else isinstance(value, numbers.Real)
        if isinstance(value, bool) or not ok_type:
            raise TypeError(f"method_kwargs[{name!r}] must be {'an int' if kind is int else 'a real number'}, "
                            f"got {value!r}")
        if not math.isfinite(value) or value < low:
            raise ValueError(f"method_kwargs[{name!r}] must be a finite number >= {low}, got {value!r}")
    return kwargs


def warn_unused(method: str, **settings) -> None:
    """Warn once per call about the :data:`SETTINGS` given away from their defaults that ``method`` never reads
    (e.g. ``eps`` with ``rdrop``): they have no effect, and a sweep over them would compare identical runs."""
    unused = [f"{k}={v!r}" for k, v in settings.items() if k not in USES[method] and v != SETTINGS[k]]
    if unused:
        warn_user(f"method={method!r} does not use {', '.join(unused)}: {WHY_UNUSED[method]}, so "
                  f"{'they have' if len(unused) > 1 else 'it has'} no effect; leave {'them' if len(unused) > 1 else 'it'} "
                  f"at the default to silence this")


def check_settings(method: str, *, eps: float = 1e-5, noise: str = "uniform", noisy_grad: bool = True,
                   reduction: Optional[str] = None, embeddings: Optional[nn.Module] = None,
                   noisy_embed_grad: bool = False, r4f_kwargs: Optional[dict] = None,
                   method_kwargs: Optional[dict] = None, same_dropout: bool = False, noise_scale: str = "absolute",
                   fused_lm_head: bool = False, lam: float = 1.0) -> dict:
    """Every check of the settings for ``method`` that needs no model: a setting of another method, or one
    that cannot take effect with the others, is refused; one the method never reads is reported
    (:func:`warn_unused`). Returns the checked ``method_kwargs``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    kw = check_method_kwargs(method, method_kwargs)
    for name, flag in (("noisy_grad", noisy_grad), ("noisy_embed_grad", noisy_embed_grad),
                       ("same_dropout", same_dropout), ("fused_lm_head", fused_lm_head)):
        check_flag(name, flag)
    if noise not in NOISE_TYPES:
        raise ValueError(f"noise must be one of {NOISE_TYPES}, got {noise!r}")
    if noise_scale not in NOISE_SCALES:
        raise ValueError(f"noise_scale must be one of {NOISE_SCALES}, got {noise_scale!r}")
    if r4f_kwargs is not None and method != "r4f":
        raise ValueError(f"r4f_kwargs configure R4F's spectral normalisation of the head (apply_r4f), which "
                         f"method={method!r} does not apply; use method='r4f', or drop r4f_kwargs")
    if embeddings is not None and method in ("standard", "rdrop"):
        raise ValueError(f"embeddings= names the module whose output is perturbed; method={method!r} perturbs "
                         f"nothing: drop it")
    if same_dropout and method not in ("r3f", "r4f"):
        raise ValueError(f"same_dropout applies to r3f and r4f (a noisy pass replaying the clean pass's dropout), "
                         f"not to method={method!r}")
    if fused_lm_head and method not in ("r3f", "r4f"):
        raise ValueError(f"fused_lm_head applies to r3f and r4f (one clean and one noisy pass of a causal LM), not "
                         f"to method={method!r}; use the logits path (fused_lm_head=False)")
    if noisy_embed_grad and method not in ("r3f", "r4f", "smart"):
        raise ValueError(f"noisy_embed_grad applies to r3f, r4f and smart (whose perturbed lookup is detached by "
                         f"default), not to method={method!r}" + (", whose lookup is never detached"
                                                                   if method == "freelb" else ", which adds no noise"))
    if noisy_embed_grad and not noisy_grad:
        raise ValueError("noisy_embed_grad=True lets the noisy pass's gradient reach the embedding table, but "
                         "noisy_grad=False runs that pass without a graph, so it would do nothing: set "
                         "noisy_grad=True, or drop noisy_embed_grad")
    if noise_scale != "absolute" and method not in ("r3f", "r4f"):
        raise ValueError(f"noise_scale={noise_scale!r} applies to r3f and r4f (their random noise), not to "
                         f"method={method!r}, " + ("whose perturbation scales are its own hyper-parameters"
                                                   if method in ("smart", "freelb") else "which adds no noise"))
    warn_unused(method, lam=lam, eps=eps, noise=noise, noisy_grad=noisy_grad, reduction=reduction)
    if same_dropout and eps == 0:
        warn_user("same_dropout=True with eps=0: both passes are the same forward, so the KL term is exactly 0 and "
                  "every step pays for a second pass that changes nothing; give eps > 0 (the noise is then the "
                  "only difference), or drop same_dropout (eps=0 alone: dropout consistency)")
    if method == "smart" and kw.get("proximal", 0.0) == 0 and "proximal_momentum" in kw:
        warn_user("method_kwargs['proximal_momentum'] moves SMART's teacher, which runs only with proximal > 0; "
                  "it has no effect: set proximal (the paper's mu = 1), or drop proximal_momentum")
    if method == "freelb" and kw.get("adv_steps", 2) == 1 and {"adv_lr", "max_norm"} & set(kw):
        warn_user("method_kwargs adv_lr and max_norm shape FreeLB's ascent, which adv_steps=1 never takes (its one "
                  "pass uses the random start): they have no effect; set adv_steps >= 2, or drop them")
    return kw


def build_method(method: str, model: nn.Module, *, eps: float, noise: str, noisy_grad: bool,
                 reduction: Optional[str], seed: int, embeddings: Optional[nn.Module] = None,
                 noisy_embed_grad: bool = False, r4f_kwargs: Optional[dict] = None,
                 method_kwargs: Optional[dict] = None, same_dropout: bool = False,
                 noise_scale: str = "absolute", fused_lm_head: bool = False, lam: float = 1.0) -> Standard:
    """The unit for ``method`` (one of :data:`METHODS`). Checks everything (:func:`check_settings`) before
    changing the model; ``lam`` is only checked for use (the optimizer applies it)."""
    kw = check_settings(method, eps=eps, noise=noise, noisy_grad=noisy_grad, reduction=reduction,
                        embeddings=embeddings, noisy_embed_grad=noisy_embed_grad, r4f_kwargs=r4f_kwargs,
                        method_kwargs=method_kwargs, same_dropout=same_dropout, noise_scale=noise_scale,
                        fused_lm_head=fused_lm_head, lam=lam)
    reduction = reduction or DEFAULT_REDUCTION.get(method, "batchmean")
    common = dict(noisy_grad=noisy_grad, reduction=reduction, seed=seed, embeddings=embeddings,
                  noisy_embed_grad=noisy_embed_grad)
    if method == "standard":
        return Standard()
    if method == "r3f":
        return R3F(model, eps=eps, noise=noise, same_dropout=same_dropout, noise_scale=noise_scale,
                   fused_lm_head=fused_lm_head, **common)
    if method == "r4f":
        return R4F(model, r4f_kwargs=r4f_kwargs, eps=eps, noise=noise, same_dropout=same_dropout,
                   noise_scale=noise_scale, fused_lm_head=fused_lm_head, **common)
    if method == "rdrop":
        return RDrop(reduction=reduction)
    if method == "smart":
        return SMART(model, sigma=eps, **common, **kw)
    return FreeLB(model, seed=seed, embeddings=embeddings, **kw)
