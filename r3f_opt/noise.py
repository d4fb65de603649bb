"""Finding a model's input token embeddings and perturbing their output during the noisy pass."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from ._warn import warn_user
from .kl import _bool_mask

__all__ = ["EmbeddingNoise", "find_embeddings", "unwrap_model", "default_seed", "noise_seed", "NOISE_TYPES",
           "NOISE_SCALES"]

NOISE_TYPES = ("uniform", "normal")
#: What ``eps`` is measured in: ``"absolute"`` (the embeddings' units, the paper's sigma) or ``"relative"``
#: (a fraction of each token's embedding RMS, so that the noise survives 16-bit embeddings).
NOISE_SCALES = ("absolute", "relative")


def _inner(model: nn.Module) -> Optional[nn.Module]:
    """The module a wrapper wraps, or None: DDP / DataParallel / FSDP1 (``.module``), ``torch.compile``
    (``._orig_mod``), PEFT (``get_base_model()``)."""
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module) and inner is not model:
        return inner
    compiled = model.__dict__.get("_modules", {}).get("_orig_mod")
    if isinstance(compiled, nn.Module):
        return compiled
    if callable(getattr(model, "get_base_model", None)) and model.get_base_model() is not model:
        return model.get_base_model()
    return None


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / FSDP1 (``.module``), ``torch.compile`` (``._orig_mod``) and PEFT
    (``get_base_model()``) wrappers."""
    while (inner := _inner(model)) is not None:
        model = inner
    return model


def guard_hooks_when_compiled(model: nn.Module, compiling: bool = False) -> None:
    """When ``model`` is ``torch.compile``d (``torch.compile(model)``, or ``compile()`` on it or a submodule), or
    will be (``compiling``), make Dynamo guard on module hooks (``torch._dynamo.config.skip_nnmodule_hook_guards
    = False``). The noise hook is added for each perturbed pass, after compilation; by default Dynamo does not
    check hooks, and a model whose embedding lookup sits inside a compiled graph (GPT-2) would run the graph
    compiled without it: no noise. Graphs compiled before (the model already called) lack those guards, so
    turning the setting on also clears Dynamo's caches (``torch._dynamo.reset()``: one recompilation)."""
    # wrappers are submodules too (DDP's .module, torch.compile's ._orig_mod, PEFT's base model)
    if compiling or any("_orig_mod" in sub._modules or getattr(sub, "_compiled_call_impl", None) is not None
                        for sub in model.modules()):
        import torch._dynamo

        if torch._dynamo.config.skip_nnmodule_hook_guards:
            torch._dynamo.config.skip_nnmodule_hook_guards = False
            torch._dynamo.reset()


def find_embeddings(model: nn.Module) -> tuple[nn.Module, Optional[nn.Module]]:
    """Return ``(embedding module, scope)`` for a Hugging Face model.

    ``scope`` is the encoder of an encoder-decoder model (noise is added only while it runs, so a table
    shared with the decoder leaves the decoder's inputs clean) and ``None`` otherwise. The module is
    the one forward actually calls: for BART in transformers 5 that is ``encoder.embed_tokens``, not
    the shared table returned by ``get_input_embeddings()``.
    """
    m = unwrap_model(model)
    config = getattr(m, "config", None)
    scope = None
    if getattr(config, "is_encoder_decoder", False) and callable(getattr(m, "get_encoder", None)):
        encoder = m.get_encoder()
        if encoder is not m:
            scope, m = encoder, encoder
    emb = getattr(m, "embed_tokens", None)
    if not isinstance(emb, nn.Module) and callable(getattr(m, "get_input_embeddings", None)):
        try:
            emb = m.get_input_embeddings()
        except (NotImplementedError, AttributeError):  # transformers' base class raises for models without
            emb = None  # one: handled below with a clear error that says to pass embeddings=
    if not isinstance(emb, nn.Module):
        raise ValueError(
            f"could not find the input token-embedding module of {type(model).__name__}; pass it "
            "explicitly: RegularizedOptimizer(..., embeddings=model.<path to the nn.Embedding>)"
        )
    return emb, scope


def noise_seed(seed: int, rank: int = 0) -> int:
    """The noise generator's seed for a run seeded with ``seed``: mixed, so that the noise is not the stream
    that ``torch.manual_seed(seed)`` gives the global RNG (which initialises the model's new weights)."""
    return (seed * 0x9E3779B97F4A7C15 + 1 + rank) % 2**63


def default_seed() -> int:
    """A noise seed that follows ``torch.manual_seed`` without drawing from (and shifting) the global RNG.

    Distributed ranks, which usually share one seed, get distinct noise streams.
    """
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return noise_seed(torch.initial_seed(), rank)


def refuse_other_noise(module: nn.Module) -> None:
    """Raise if another embedding-noise method (NEFTune) is hooked on ``module``: the clean pass would be noisy."""
    hooks = [getattr(h, "__name__", "") for h in module._forward_hooks.values()]
    if getattr(module, "neftune_noise_alpha", None) is not None or "neftune_post_forward_hook" in hooks:
        raise RuntimeError(
            f"NEFTune noise is active on {type(module).__name__}: R3F's clean pass would be noisy too. Turn it "
            "off (TrainingArguments(neftune_noise_alpha=None), or remove the neftune_post_forward_hook)."
        )


class EmbeddingNoise:
    """Adds ``z ~ U(-eps, eps)`` or ``N(0, eps^2)`` to an embedding module's output while active.

    The noise is drawn in float32 on the output's device from this object's own seeded generator and
    added in (at least) float32 before casting back to the output's dtype. A module with an
    ``embed_scale`` (BART's scaled embeddings) gets ``embed_scale * z``, which equals adding ``z``
    before the scaling, as the reference does.

    With ``scale="relative"``, each token's noise is multiplied by the RMS of its own embedding vector
    (``sqrt(mean_i x_i^2)`` over the hidden dimension, from the detached output, in float32): ``eps`` is then
    a fraction of the embeddings' size (``embed_scale`` is already in the RMS), and noise of ``eps >= 1e-2``
    changes most entries of bf16 embeddings, where an absolute ``eps = 1e-5`` changes almost none.
    """

    def __init__(self, module: nn.Module, scope: Optional[nn.Module], eps: float, noise: str,
                 detach: bool, seed: int, scale: str = "absolute") -> None:
        if scale not in NOISE_SCALES:
            raise ValueError(f"noise_scale must be one of {NOISE_SCALES}, got {scale!r}")
        if noise not in NOISE_TYPES:
            raise ValueError(f"noise must be one of {NOISE_TYPES}, got {noise!r}")
        self.module, self.scope, self.eps, self.noise, self.detach = module, scope, eps, noise, detach
        self.scale = scale
        self.seed = seed
        self.generator: Optional[torch.Generator] = None
        self._pending_state: Optional[torch.Tensor] = None
        self._checked_dtypes: set[torch.dtype] = set()
        self._depth = 0
        self.calls = 0

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator is not None and self.generator.device != device:
            raise RuntimeError(
                f"the embeddings moved from {self.generator.device} to {device} after the noise generator "
                "was created; move the model before building RegularizedOptimizer (or before its first step)"
            )
        if self.generator is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            if self._pending_state is not None:
                try:
                    gen.set_state(self._pending_state)
                except RuntimeError as e:
                    raise RuntimeError(
                        f"the noise generator state in the loaded checkpoint does not fit a {device.type} "
                        f"generator ({e}); it was saved with the embeddings on another device type"
                    ) from e
                self._pending_state = None
            self.generator = gen  # only once fully set up: a failure above leaves nothing half-done
        return self.generator

    def sample(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """Noise of ``shape`` in float32 from this object's generator. Inside a ``torch.compile``d forward it
        is drawn eagerly (one graph break): Dynamo cannot trace a seeded generator."""
        if torch.compiler.is_compiling():
            return _eager_draw()(self, shape, device)
        return self._draw(shape, device)

    def _draw(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        z = torch.empty(shape, dtype=torch.float32, device=device)
        if self.noise == "uniform":
            return z.uniform_(-self.eps, self.eps, generator=self._generator(device))
        return z.normal_(0.0, self.eps, generator=self._generator(device))

    def _perturb(self, output: torch.Tensor, noise_mask: Optional[torch.Tensor],
                 add: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        x = output.detach() if self.detach else output
        if noise_mask is not None and noise_mask.shape != x.shape[:-1]:  # before any noise is drawn
            raise ValueError(
                f"noise_mask has shape {tuple(noise_mask.shape)} but the embeddings' output has "
                f"shape {tuple(x.shape)}; pass the (batch, seq) attention mask of the perturbed input"
            )
        wide = torch.promote_types(x.dtype, torch.float32)
        if add is None and self.scale == "relative":  # a fraction of each token's RMS (embed_scale included)
            z = self.sample(x.shape, x.device) * x.detach().to(wide).pow(2).mean(-1, keepdim=True).sqrt()
        else:
            z = self.sample(x.shape, x.device) if add is None else add(x)
            scale = getattr(self.module, "embed_scale", None)
            if isinstance(scale, (int, float, torch.Tensor)):
                z = z * scale
        if noise_mask is not None:
            z = z * noise_mask.to(device=z.device, dtype=z.dtype).unsqueeze(-1)
        noisy = (x.to(wide) + z.to(wide)).to(x.dtype)
        if x.dtype != wide and x.dtype not in self._checked_dtypes and self.eps > 0:
            self._check_precision(x, z, noisy, wide)
        if torch.is_grad_enabled() and not noisy.requires_grad:
            # Reentrant activation checkpointing (use_reentrant=True) records a graph only for segments
            # whose inputs require grad: with the lookup detached, the noisy pass's gradient would vanish.
            noisy.requires_grad_(True)
        return noisy

    @torch.no_grad()
    def _check_precision(self, x: torch.Tensor, z: torch.Tensor, noisy: torch.Tensor, wide: torch.dtype) -> None:
        """Warn (once per dtype) when x's dtype cannot hold the noise: the noise actually added, noisy - x,
        against the noise drawn, z. Above 1/2 the rounding error rivals the noise, i.e. the dtype's spacing
        near x is about eps or more. Positions without noise (z = 0: noise_mask) add 0 to both norms; a batch
        with none leaves the check to the next one."""
        z = z.detach().to(wide)
        drawn = z.norm()
        if not bool(drawn > 0):
            return
        self._checked_dtypes.add(x.dtype)
        lost = ((noisy.to(wide) - x.detach().to(wide) - z).norm() / drawn).item()
        if lost <= 0.5:
            return
        kept = (noisy != x.detach())[z != 0].float().mean().item()
        hint = ("raise eps (with 16-bit embeddings, relative eps >= 1e-2 for bfloat16, >= 1e-3 for float16)"
                if self.scale == "relative" else
                "scale the noise to the embeddings: noise_scale='relative' (R3FTrainingArguments.r3f_noise_scale) "
                "with eps >= 1e-2 for bfloat16, >= 1e-3 for float16")
        warn_user(f"the embeddings' output is {x.dtype}, which cannot represent noise of scale eps={self.eps:g} "
                  f"({self.scale}): rounding changed the noise by {lost:.0%} of its size and only {kept:.0%} of "
                  f"entries changed. Keep the embeddings in float32 (use torch.autocast for mixed precision), "
                  f"or {hint}.")

    @contextlib.contextmanager
    def active(self, noise_mask: Optional[torch.Tensor] = None,
               add: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Iterator["EmbeddingNoise"]:
        """Perturb the embeddings inside this block; hooks are removed on exit, also on an exception.

        By default the perturbation is fresh noise; ``add(x)`` (``x``: the lookup's output) supplies it
        instead, e.g. an adversarial tensor that requires grad (SMART, FreeLB). Either way it is added in
        the raw lookup's space (scaled by ``embed_scale``), masked by ``noise_mask``, in float32 or wider.
        """
        refuse_other_noise(self.module)
        if noise_mask is not None:  # an attention mask: bool, or 0/1 integers (one device sync; bool: none)
            noise_mask = _bool_mask(noise_mask, "noise_mask")
        self.calls, self._depth = 0, 0

        def on_output(module, inputs, output):
            if self.scope is not None and self._depth == 0:
                return None
            if not isinstance(output, torch.Tensor) or not output.is_floating_point():
                raise TypeError(
                    f"the embedding module {type(module).__name__} returned {type(output).__name__}, "
                    "not a floating-point tensor; pass embeddings= the module that returns token vectors"
                )
            self.calls += 1
            return self._perturb(output, noise_mask, add)

        def enter(*_):
            self._depth += 1

        def leave(*_):
            self._depth -= 1

        handles = [self.module.register_forward_hook(on_output)]
        if self.scope is not None:
            handles.append(self.scope.register_forward_pre_hook(enter))
            handles.append(self.scope.register_forward_hook(leave, always_call=True))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._depth = 0

    def reseed(self, seed: int) -> None:
        """Restart the noise stream from ``seed`` (the generator is re-created at the next draw)."""
        self.seed, self.generator, self._pending_state = int(seed), None, None

    def snapshot(self) -> tuple:
        """Where the noise stream stands, for :meth:`restore` (a step that raises leaves the stream as it was)."""
        gen = self.generator
        return self.seed, gen, gen.get_state() if gen is not None else None, self._pending_state

    def restore(self, snapshot: tuple) -> None:
        self.seed, self.generator, state, self._pending_state = snapshot
        if self.generator is not None:
            self.generator.set_state(state)

    def state_dict(self) -> dict:
        state = self.generator.get_state() if self.generator is not None else self._pending_state
        return {"seed": self.seed, "generator_state": state}

    def load_state_dict(self, state: dict) -> None:
        gen_state = state.get("generator_state")
        if gen_state is not None:  # torch.load(map_location=...) may have moved it: set_state wants CPU uint8
            gen_state = gen_state.detach().to("cpu", torch.uint8)
        self.seed = int(state["seed"])
        self.generator, self._pending_state = None, gen_state


_EAGER: dict = {}


def _eager_draw() -> Callable:
    """``EmbeddingNoise._draw`` under ``torch.compiler.disable``, made on first use: decorating at import
    would import torch._dynamo with r3f_opt (over a second) for users who never compile."""
    if "draw" not in _EAGER:
        _EAGER["draw"] = torch.compiler.disable(EmbeddingNoise._draw)
    return _EAGER["draw"]
