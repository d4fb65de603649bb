"""RegularizedOptimizer: R3F / R4F around any torch optimizer."""
from __future__ import annotations

import contextlib
import numbers
import warnings
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from ._checks import check_flag, check_number
from ._warn import warn_user
from .kl import REDUCTIONS, _bool_mask
from .methods import Standard, StepResult, build_method, is_distributed_wrapper
from .methods.base import check_classes, global_rng, loss_scaled, set_global_rng
from .noise import EmbeddingNoise, default_seed, guard_hooks_when_compiled

__all__ = ["RegularizedOptimizer", "StepResult"]

ON_NONFINITE = ("skip", "raise")


def _loss_and_logits(out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(out, torch.Tensor):
        raise TypeError(
            "the closure returned a bare tensor; R3F needs the logits too: return the model output "
            "(with .loss and .logits), a (loss, logits) tuple, or a dict with 'loss' and 'logits'"
        )
    if isinstance(out, Mapping):
        loss, logits = out.get("loss"), out.get("logits")
    elif isinstance(out, (tuple, list)) and len(out) >= 2:
        loss, logits = out[0], out[1]
    else:
        loss, logits = getattr(out, "loss", None), getattr(out, "logits", None)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(
            f"the closure's output has no scalar loss (got {type(loss).__name__}); pass labels to the "
            "model or return (loss, logits)"
        )
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"the closure's output has no logits tensor (got {type(logits).__name__}); return the model "
            "output, (loss, logits) or {'loss': ..., 'logits': ...}"
        )
    return loss.reshape(()), logits


@contextlib.contextmanager
def _grad_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce inside the block unless ``sync``: DDP / FSDP1 ``no_sync()``, FSDP2
    ``set_requires_gradient_sync(False)``; a no-op for a model that is not distributed."""
    if sync:
        yield
    elif callable(getattr(model, "no_sync", None)):
        with model.no_sync():
            yield
    elif callable(getattr(model, "set_requires_gradient_sync", None)):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def _check_params(optimizer: Optimizer, model: nn.Module) -> None:
    """Refuse an optimizer that holds none of the model's trainable parameters; warn if it misses some."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [p for p in trainable if id(p) not in held]
    if trainable and len(missing) == len(trainable):
        raise ValueError(
            "the optimizer holds none of the model's trainable parameters, so nothing would train; build it "
            "from the model you pass (e.g. torch.optim.AdamW(model.parameters())), after any wrapping that "
            "replaces parameters (FSDP)"
        )
    if missing:
        warnings.warn(f"{len(missing)} of the model's {len(trainable)} trainable parameters are not in the "
                      "optimizer: they get gradients but are never updated", stacklevel=3)


def _grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The total 2-norm of ``grads`` (a DTensor for sharded gradients, as ``clip_grad_norm_`` computes it)."""
    if hasattr(torch.nn.utils, "get_total_norm"):
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))


def _refuse_backward(grad: torch.Tensor) -> None:
    raise RuntimeError(
        "the closure called backward(); with RegularizedOptimizer it must only run the forward pass and "
        "return the output: the optimizer runs both passes and one backward itself"
    )


class _NonFinite(Exception):
    def __init__(self, result: StepResult, where: str) -> None:
        self.result, self.where = result, where


class _Passes:
    """The passes a method runs within one (micro-)step of :class:`RegularizedOptimizer`."""

    def __init__(self, opt: "RegularizedOptimizer", closure: Callable[[], Any], weight: float, sync: bool) -> None:
        self.opt, self.closure, self.weight, self.sync = opt, closure, weight, sync
        self.logits_shape: Optional[tuple] = None  # of the last run() (None: the method never read logits)

    def run(self) -> tuple[Any, torch.Tensor, torch.Tensor]:
        out = self.opt._forward(self.closure)
        loss, logits = _loss_and_logits(out)
        if self.opt.regularizer.kl_mask:  # a KL between the passes' distributions
            check_classes(logits)
        self.logits_shape = tuple(logits.shape)
        return out, loss, logits

    def forward(self) -> Any:
        return self.opt._forward(self.closure)

    def backward(self, loss: torch.Tensor, result: StepResult) -> None:
        finite = torch.isfinite(loss.detach())
        if not self.opt._on_all_ranks(finite):  # every rank skips together: none waits in a collective
            raise _NonFinite(result, "" if not bool(finite) else " on another rank")
        scaled = loss * self.weight
        if self.opt.grad_scaler is not None:
            scaled = self.opt.grad_scaler.scale(scaled)
        if self.opt._backward is not None:
            self.opt._backward(scaled)
        else:
            scaled.backward()

    def grad_sync(self, last: bool):
        return _grad_sync(self.opt.model, self.sync and last)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss_scaled(self.opt.grad_scaler, loss)


class RegularizedOptimizer(Optimizer):
    r"""Wraps an optimizer instance to train with R3F or R4F (Aghajanyan et al., ICLR 2021).

    Each :meth:`step` runs the closure twice, clean and with noise ``z`` on the input token embeddings,
    and minimises

    .. math::
        L = L_\text{task}(f(x)) + \lambda \, KL_S\big(f(x) \,\|\, f(x + z)\big), \quad
        z \sim \mathcal{U}(-\epsilon, \epsilon) \text{ or } \mathcal{N}(0, \epsilon^2),

    with ``KL_S = KL(P||Q) + KL(Q||P)`` over the last dimension of the logits (:func:`symmetric_kl`,
    reduction ``"batchmean"``). ``param_groups``, ``state`` and ``defaults`` are those of the inner
    optimizer, so LR schedulers, ``zero_grad`` and checkpoints work as usual.

    Args:
        optimizer: the inner optimizer instance (AdamW, SGD, Adafactor, ...).
        model: the model the closure runs; its input embeddings are found automatically (HF models,
            DDP/FSDP/PEFT wrappers unwrapped). ``method="r4f"`` normalises its head at construction.
        method: ``"r3f"``, ``"r4f"`` (R3F + spectral norm on the head), ``"standard"`` (one clean pass), or
            the rivals ``"rdrop"``, ``"smart"``, ``"freelb"`` (one file each in ``r3f_opt/methods/``).
        lam: weight lambda of the KL term (>= 0).
        eps: noise scale sigma (>= 0): half-width for ``"uniform"``, std for ``"normal"``.
        noise: ``"uniform"`` or ``"normal"``.
        noise_scale: ``"absolute"`` (``eps`` in the embeddings' units, the paper's) or ``"relative"`` (``eps``
            times each token's embedding RMS: noise that survives bf16 embeddings at ``eps >= 1e-2``).
        noisy_grad: if True (the paper), the KL gradient flows through both passes (cost ~2x a
            standard step); if False, the noisy pass runs without a graph (~4/3x, less memory).
        embeddings: the module whose output is perturbed, if it cannot be found automatically.
        noisy_embed_grad: let the noisy pass train the embedding table (default False: the reference's
            classification semantics, where the noisy branch detaches the lookup).
        reduction: reduction of the KL term (see :func:`symmetric_kl`); None: the method's own ("sum" for
            rdrop, as R-Drop's code; "batchmean" otherwise, as the R3F reference).
        max_grad_norm: clip the total gradient norm to this value before stepping, if given.
        grad_scaler: a ``torch.amp.GradScaler`` for fp16 (scaled backward, unscale, skip on inf/NaN).
        backward: a callable replacing ``loss.backward()``, e.g. ``accelerator.backward``.
        on_nonfinite: ``"skip"`` (warn, count in ``nonfinite_steps``, change nothing) or ``"raise"``.
        seed: seed of the wrapper's own noise generator (default: derived from ``torch.initial_seed()``,
            so ``torch.manual_seed`` fixes it; the global RNG stream is not consumed).
        r4f_kwargs: extra arguments for :func:`apply_r4f` (``head``, ``scope``, ...).
        method_kwargs: the method's own hyper-parameters (``smart``, ``freelb``; see ``r3f_opt.methods``).
        same_dropout: r3f/r4f: the noisy pass replays the clean pass's dropout masks, so the KL measures the
            noise alone (the default lets dropout differ, as the reference does).
        fused_lm_head: r3f/r4f with a Hugging Face causal LM: compute the task loss and the KL from the hidden
            states before the LM head and its weight (:func:`linear_r3f_loss`), never materialising the logits.
            The closure calls the model with ``labels=`` as usual; the model computes no loss and no logits
            (``StepResult.output.logits`` is a placeholder). ``mask`` defaults to the rows whose shifted label
            counts. See :class:`~r3f_opt.lm_head.FusedLMHead` for what is refused.

    Example:
        >>> opt = RegularizedOptimizer(torch.optim.AdamW(model.parameters(), lr=2e-5), model)
        >>> for batch in loader:
        ...     opt.zero_grad()
        ...     result = opt.step(lambda: model(**batch))  # forward only: no backward in the closure
        ...     print(result.task_loss.item(), result.sym_kl.item())
    """

    def __init__(
        self,
        optimizer: Optimizer,
        model: nn.Module,
        *,
        method: str = "r3f",
        lam: float = 1.0,
        eps: float = 1e-5,
        noise: str = "uniform",
        noisy_grad: bool = True,
        embeddings: Optional[nn.Module] = None,
        noisy_embed_grad: bool = False,
        reduction: Optional[str] = None,
        max_grad_norm: Optional[float] = None,
        grad_scaler: Optional["torch.amp.GradScaler"] = None,
        backward: Optional[Callable[[torch.Tensor], Any]] = None,
        on_nonfinite: str = "skip",
        seed: Optional[int] = None,
        r4f_kwargs: Optional[dict] = None,
        method_kwargs: Optional[dict] = None,
        same_dropout: bool = False,
        noise_scale: str = "absolute",
        fused_lm_head: bool = False,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer instance, got {type(optimizer).__name__}")
        if isinstance(optimizer, RegularizedOptimizer):
            raise TypeError("optimizer is already a RegularizedOptimizer; wrap the inner optimizer once")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        lam, eps = check_number("lam", lam), check_number("eps", eps)  # method, noise, ...: check_settings
        if reduction is not None and (reduction not in REDUCTIONS or reduction == "none"):
            raise ValueError(f"reduction must be one of {REDUCTIONS[:-1]}, got {reduction!r}")
        if max_grad_norm is not None:
            max_grad_norm = check_number("max_grad_norm", max_grad_norm, positive=True)
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}")
        if backward is not None and grad_scaler is not None:
            raise ValueError("pass either backward= (e.g. accelerator.backward, which scales the loss itself) or "
                             "grad_scaler=, not both: the loss would be scaled twice")
        if embeddings is not None and not isinstance(embeddings, nn.Module):
            raise TypeError(f"embeddings must be an nn.Module, got {type(embeddings).__name__}")
        if method != "standard" and getattr(model, "find_unused_parameters", False) and hasattr(model, "no_sync"):
            raise ValueError(
                "the model is DistributedDataParallel with find_unused_parameters=True, which fails when two "
                "forwards (clean and noisy) precede one backward ('Expected to mark a variable ready only "
                "once'); wrap it with DDP(model, find_unused_parameters=False)"
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        if seed is not None and not -2**63 <= seed < 2**64:
            raise ValueError(f"seed must be in [-2**63, 2**64), what torch.Generator.manual_seed takes; got {seed}")
        if backward is not None and not callable(backward):
            raise TypeError(f"backward must be a callable taking the loss (e.g. accelerator.backward), got "
                            f"{type(backward).__name__}")
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
        _check_params(optimizer, model)
        seed = default_seed() if seed is None else int(seed)
        # Last of the checks: R4F normalises the head, and raises before changing anything if it cannot.
        self.regularizer: Standard = build_method(method, model, eps=eps, noise=noise, noisy_grad=noisy_grad,
                                        reduction=reduction, seed=seed, embeddings=embeddings,
                                        noisy_embed_grad=noisy_embed_grad, r4f_kwargs=r4f_kwargs,
                                        method_kwargs=method_kwargs, same_dropout=same_dropout,
                                        noise_scale=noise_scale, fused_lm_head=fused_lm_head, lam=lam)
        if method != "standard":
            guard_hooks_when_compiled(model)  # a compiled model must see the noise hook added per pass
        self.optimizer = optimizer
        self.model, self.method, self.lam, self.noisy_grad = model, method, lam, noisy_grad
        self._warned_unmasked = False
        self.reduction = getattr(self.regularizer, "reduction", reduction)  # None resolved by the method
        self.max_grad_norm, self.on_nonfinite = max_grad_norm, on_nonfinite
        self.grad_scaler, self._backward = grad_scaler, backward
        self.nonfinite_steps = 0
        self._skip_pending = False  # a micro-batch since zero_grad() had a non-finite loss
        self._initialized = False
        super().__init__(optimizer.param_groups, optimizer.defaults)  # hooks; groups stay the inner's
        self._initialized = True

    # -- delegation: the inner optimizer owns param_groups, state and defaults -------------------
    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        if self._initialized:
            self.optimizer.param_groups = value

    @property
    def state(self) -> dict:
        return self.optimizer.state

    @state.setter
    def state(self, value: dict) -> None:
        if self._initialized:
            self.optimizer.state = value

    @property
    def defaults(self) -> dict:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict) -> None:
        if self.__dict__.get("_initialized"):
            self.optimizer.defaults = value

    @property
    def noise(self) -> Optional[EmbeddingNoise]:
        """The embedding-noise source of ``r3f``/``r4f`` (its generator is saved in ``state_dict``)."""
        return self.regularizer.noise

    def add_param_group(self, param_group: dict) -> None:
        if self._initialized:
            self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.__dict__.get("_in_closure"):
            raise RuntimeError("zero_grad() was called inside the closure; with RegularizedOptimizer the closure must "
                               "only run the forward pass (the optimizer runs it several times per step, and "
                               "accumulates micro-batches with backward()): call opt.zero_grad() before opt.step()")
        self._skip_pending = False
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __getstate__(self) -> dict:  # the whole wrapper (Optimizer's keeps only defaults, state, param_groups)
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def state_dict(self) -> dict:
        """The inner optimizer's state_dict plus this wrapper's entries under the key ``"r3f"`` (the state-dict
        hooks registered on this wrapper run as torch's ``Optimizer.state_dict`` runs them)."""
        for pre in self._optimizer_state_dict_pre_hooks.values():
            pre(self)
        sd = self.optimizer.state_dict()
        sd["r3f"] = {
            "optimizer_class": type(self.optimizer).__name__,
            "noise": self.regularizer.state_dict(),
            "nonfinite_steps": self.nonfinite_steps,
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
        }
        for post in self._optimizer_state_dict_post_hooks.values():
            sd = post(self, sd) or sd
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict of this wrapper, or a plain one of the inner optimizer's type.

        Everything is checked before anything changes: a malformed ``"r3f"`` entry, a state_dict of another
        optimizer class, or one the inner optimizer refuses leaves the wrapper, the inner optimizer, the
        noise generator and the GradScaler as they were.
        """
        for pre in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = pre(self, state_dict) or state_dict
        sd = dict(state_dict)
        extra = sd.pop("r3f", None)
        if extra is not None:
            self._check_entry(extra)
        self.optimizer.load_state_dict(sd)  # torch validates the groups before it changes anything
        if extra is not None:
            if extra.get("noise") is not None and self.noise is not None:
                self.regularizer.load_state_dict(extra["noise"])
            self.nonfinite_steps = int(extra.get("nonfinite_steps", self.nonfinite_steps))
            if extra.get("grad_scaler") is not None and self.grad_scaler is not None:
                self.grad_scaler.load_state_dict(extra["grad_scaler"])
        for post in self._optimizer_load_state_dict_post_hooks.values():
            post(self)

    def _back_off(self) -> None:
        """A step skipped for a non-finite loss backs a GradScaler's scale off, as an overflowing gradient would:
        in fp16 the non-finite loss may come from an earlier backward that overflowed (FreeLB's perturbation is
        built from such a gradient), and a scale that never backs off would overflow every step. Only once the
        scaler has scaled a loss (before that no backward ran under it)."""
        scaler = self.grad_scaler
        if scaler is not None and scaler.is_enabled() and getattr(scaler, "_scale", None) is not None:
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
            tracker = getattr(scaler, "_growth_tracker", None)  # as torch's own back-off: growth starts over
            if isinstance(tracker, torch.Tensor):
                tracker.zero_()

    def _check_entry(self, extra: Any) -> None:
        def bad(why: str) -> ValueError:
            return ValueError(f"state_dict['r3f'] is not an entry written by RegularizedOptimizer.state_dict() "
                              f"({why}); remove it to load only the inner optimizer's state")

        if not isinstance(extra, Mapping):
            raise bad(f"a {type(extra).__name__}, not a dict")
        saved = extra.get("optimizer_class")
        if saved is not None and saved != type(self.optimizer).__name__:
            raise ValueError(f"the state_dict was saved from a {saved} inner optimizer; this wrapper holds a "
                             f"{type(self.optimizer).__name__}: build the wrapper around a {saved} to resume it")
        noise = extra.get("noise")
        if noise is not None:
            state = noise.get("generator_state") if isinstance(noise, Mapping) else None
            if not isinstance(noise, Mapping) or isinstance(noise.get("seed"), bool) or not isinstance(
                    noise.get("seed"), int) or not (state is None or (isinstance(state, torch.Tensor)
                                                                     and state.dim() == 1 and state.numel() > 0)):
                raise bad("'noise' must hold an int 'seed' and a 1-D 'generator_state' tensor or None")
        self.regularizer.check_state(noise)
        steps = extra.get("nonfinite_steps", 0)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise bad(f"'nonfinite_steps' must be an int >= 0, got {steps!r}")
        scaler = extra.get("grad_scaler")
        if scaler is not None and (not isinstance(scaler, Mapping) or (
                self.grad_scaler is not None and self.grad_scaler.is_enabled()
                and not set(self.grad_scaler.state_dict()) <= set(scaler))):  # {}: a disabled one's, refused too
            raise bad("'grad_scaler' must be a GradScaler.state_dict() (scale, growth_factor, backoff_factor, "
                      "growth_interval, _growth_tracker)")

    # -- the two passes ----------------------------------------------------------------------
    def _forward(self, closure: Callable[[], Any]) -> Any:
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        handles = [p.register_hook(_refuse_backward) for p in params]
        self._in_closure = True
        try:
            return closure()
        finally:
            self._in_closure = False
            for h in handles:
                h.remove()

    def backward(self, closure: Callable[[], Any], *, mask: Optional[torch.Tensor] = None,
                 noise_mask: Optional[torch.Tensor] = None, weight: float = 1.0, sync: bool = True) -> StepResult:
        """Run the clean and the noisy pass and one backward of ``weight * loss``, without stepping.

        For gradient accumulation: call it once per micro-batch (``weight=1/accumulation_steps``), then
        :meth:`step` with no closure. ``mask`` selects the logits rows that count in the KL (e.g. the
        labels' non-padding tokens); ``noise_mask`` (batch, seq) leaves padding positions unperturbed.
        ``sync=False`` runs both passes and the backward inside the model's ``no_sync()`` (DDP, FSDP):
        pass it for every micro-batch but the last of an accumulated step.
        """
        if not (isinstance(weight, torch.Tensor) and weight.numel() == 1 and weight.is_floating_point()):
            weight = check_number("weight", weight, positive=True)  # a one-element tensor: not read (no sync)
        sync = check_flag("sync", sync)
        # dtypes and values checked before any pass (shapes need the logits / the embeddings' output)
        mask = None if mask is None else _bool_mask(mask)
        noise_mask = None if noise_mask is None else _bool_mask(noise_mask, "noise_mask")
        before = global_rng(), self.regularizer.snapshot()
        with torch.enable_grad(), _grad_sync(self.model, sync):
            try:
                passes = _Passes(self, closure, weight, sync)
                result = self.regularizer.step(passes, lam=self.lam, mask=mask, noise_mask=noise_mask)
            except _NonFinite as e:
                if self.on_nonfinite == "raise":  # raised below: as any other error, nothing has moved
                    self._roll_back(before)
                return self._nonfinite(e.result, e.where)
            except BaseException:  # bad input found by a pass: the RNGs and R4F's u, v as they were
                self._roll_back(before)
                raise
        shape = passes.logits_shape
        if mask is None and self.regularizer.kl_mask and shape is not None and len(shape) >= 3 \
                and not self._warned_unmasked:
            self._warned_unmasked = True  # the reference's seq2seq defect: padded targets in the KL
            warn_user(f"the logits have a sequence dimension {shape} and no mask= was given, so every position "
                      "counts in the KL term, padding included; pass the rows that count (mask=labels != -100 for "
                      "a seq2seq model's targets, mask=attention_mask.bool() for a causal LM), or an all-True mask "
                      "to count every position and silence this warning")
        return result

    def _roll_back(self, before: tuple) -> None:
        set_global_rng(before[0])
        self.regularizer.restore(before[1])

    def _on_all_ranks(self, ok: torch.Tensor) -> bool:
        """``ok`` on every rank of a data-parallel model (an all-reduce of the flag), else on this one."""
        if is_distributed_wrapper(self.model) and dist.is_available() and dist.is_initialized() \
                and dist.get_world_size() > 1:
            flag = ok.to(torch.float32).reshape(1).clone()
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            return bool(flag)
        return bool(ok)

    def _clip(self, max_norm: Optional[float]) -> Optional[str]:
        """Clip the total gradient norm to ``max_norm`` (if given); return the norm as text if it is not finite."""
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return None
        norm = _grad_norm([p.grad for p in params])
        full = norm.full_tensor() if callable(getattr(norm, "full_tensor", None)) else norm
        if not bool(torch.isfinite(full)):
            return f"{full.item()}"
        if max_norm is not None:
            if hasattr(torch.nn.utils, "clip_grads_with_norm_"):  # torch >= 2.6: foreach, one kernel per device
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
            else:  # as torch.nn.utils.clip_grad_norm_ scales
                coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
                for p in params:
                    p.grad.mul_(coef.to(p.grad.device))
        return None

    def _nonfinite(self, result: Optional[StepResult], what: str, gradient: bool = False) -> Optional[StepResult]:
        if gradient:
            msg = f"non-finite gradient norm ({what}); the step was skipped"
        else:
            msg = (f"non-finite loss{what} (task loss {result.task_loss.item()}, sym KL {result.sym_kl.item()}); "
                   "the step was skipped")
        if self.on_nonfinite == "raise":
            raise FloatingPointError(msg + " (on_nonfinite='raise')")
        self.nonfinite_steps += 1
        self._skip_pending = not gradient
        warnings.warn(f"{msg}: parameters and optimizer state are unchanged "
                      f"({self.nonfinite_steps} skipped so far)", stacklevel=3)
        if result is not None:
            result.skipped = True
        return result

    def step(self, closure: Optional[Callable[[], Any]] = None, *, mask: Optional[torch.Tensor] = None,
             noise_mask: Optional[torch.Tensor] = None) -> Optional[StepResult]:
        """One R3F/R4F step: both passes, backward, clip, inner step. Returns a :class:`StepResult`.

        Without a closure, finishes a step whose gradients are already there (after :meth:`backward`,
        or a framework's own backward): unscale (GradScaler), clip (``max_grad_norm``), inner step. With
        ``on_nonfinite="skip"``, a non-finite loss in any pass since the last :meth:`zero_grad`, or a
        non-finite total gradient norm, skips it (``"raise"``: ``FloatingPointError``); a step the
        GradScaler skips (inf/NaN in the scaled gradients) is counted in ``nonfinite_steps`` too.
        """
        result = None
        if closure is not None:
            result = self.backward(closure, mask=mask, noise_mask=noise_mask)
        elif mask is not None or noise_mask is not None:
            raise ValueError("mask= and noise_mask= are read by the passes, which step() runs only with a closure; "
                             "pass them to backward(closure, mask=..., noise_mask=...) instead")
        if self._skip_pending:  # this step, or a micro-batch accumulated into it, had a non-finite loss
            self._skip_pending = False
            if closure is None:
                warnings.warn("skipping the optimizer step: a micro-batch accumulated since zero_grad() had a "
                              "non-finite loss", stacklevel=2)
            self._back_off()
            return result
        scaler = self.grad_scaler
        if scaler is not None and scaler.is_enabled():
            if self.max_grad_norm is not None:
                scaler.unscale_(self.optimizer)
                self._clip(self.max_grad_norm)
            scale = scaler.get_scale()
            scaler.step(self.optimizer)  # skipped by the scaler when a gradient is inf/NaN
            scaler.update()
            if scaler.get_scale() < scale:  # the scale backs off exactly when the scaler skipped the step
                self.nonfinite_steps += 1
                if result is not None:
                    result.skipped = True
            else:
                self.regularizer.after_update()
            return result
        norm = self._clip(self.max_grad_norm)
        if norm is not None:
            return self._nonfinite(result, norm, gradient=True)
        self.optimizer.step()
        self.regularizer.after_update()  # SMART's proximal teacher follows the parameters
        return result
