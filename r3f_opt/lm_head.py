"""A Hugging Face causal LM trained through :func:`~r3f_opt.linear_r3f_loss`, without changing the model.

:class:`FusedLMHead` runs the model with its LM head short-circuited: the head keeps its input (the final
hidden states) and returns a placeholder, the model computes no loss, and the loss and the KL are then
computed from the hidden states and the head's weight in chunks (``r3f_opt/linear_kl.py``). This is what
``RegularizedOptimizer(..., fused_lm_head=True)`` and the Trainer's ``r3f_fused_lm_head`` use.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._source import forward_source
from .linear_kl import linear_r3f_loss
from .noise import unwrap_model

__all__ = ["FusedLMHead", "CapturedPass"]

#: model_type -> the factor a causal LM multiplies its head's output by (config attribute -> factor).
_LOGIT_SCALES = {
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe", "cohere_compass_text"),
                    lambda c: 1.0 if c.logit_scale is None else c.logit_scale),
    **dict.fromkeys(("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared", "granitemoehybrid"),
                    lambda c: 1.0 / c.logits_scaling),
}
_SCALE_ATTRS = ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")
#: config attributes that add to the loss or change the logits when set (non-zero): refused.
_LOSS_ATTRS = ("z_loss_coefficient", "logits_soft_cap", "output_logit_soft_cap", "unpadded_vocab_size")


_CASTS = r"\.float\(\)|\.contiguous\(\)|\.to\([^()]*\)"  # what may follow the head's output unchanged


def _unexpressible(source: str, model_type: Optional[str]) -> Optional[str]:
    """What in a causal LM's forward ``source`` the fused objective (shifted cross-entropy of ``h @ W.T + b``)
    cannot reproduce, or None: a loss that is not ``self.loss_function(...)``, or a change to the logits after the
    LM head other than a cast, Gemma's soft-capping or a known logit multiplier (checked on the config)."""
    if not re.search(r"\bself\.loss_function\(", source):
        return "computes its loss without self.loss_function (e.g. an unshifted cross-entropy)"
    head = re.search(r"^[ \t]*(\w+)\s*=\s*self\.lm_head\(", source, re.M)
    if head is None:
        return None
    line = source[head.start():source.find("\n", head.end())]
    depth, end = 1, line.index("self.lm_head(") + len("self.lm_head(")
    while depth and end < len(line):
        depth += {"(": 1, ")": -1}.get(line[end], 0)
        end += 1
    rest = re.sub(_CASTS + r"|#.*", "", line[end:]).strip()
    if rest and not re.fullmatch(r"[*/]\s*self\.(\w+\.)*(%s)" % "|".join(_SCALE_ATTRS), rest):
        return f"changes its logits after the LM head ({line.strip()!r})"
    var, after = head.group(1), source[head.end():]
    # Gemma's soft-capping block, refused on the config where it is set
    after = re.sub(r"^([ \t]*)if [^\n]*final_logit_softcapping[^\n]*:\n(?:\1[ \t]+[^\n]*\n)+", "", after, flags=re.M)
    for later in re.finditer(rf"^[ \t]*{var} = (.*)$", after, re.M):  # a statement (keyword arguments: var=...)
        text = re.sub(r"#.*", "", later.group(1)).strip()
        if re.fullmatch(rf"{var}({_CASTS})+", text) or re.search("|".join(_SCALE_ATTRS), text):
            continue  # a cast, or a logit multiplier (honoured, or refused on the config below)
        return f"changes its logits after the LM head ({later.group(0).strip()!r})"
    return None


@dataclass
class CapturedPass:
    """What one pass of a causal LM under :meth:`FusedLMHead.capture` left: the LM head's input, the labels
    and loss arguments the model was called with (taken out of the call: the model computed no loss), and
    the autocast state the head ran under."""

    hidden: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    shift_labels: Optional[torch.Tensor] = None
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None
    autocast: Optional[tuple[bool, torch.dtype]] = None
    model_calls: int = 0
    head_calls: int = 0


class FusedLMHead:
    """Runs a Hugging Face causal LM without materialising its logits, for :func:`linear_r3f_loss`.

    Inside :meth:`capture`, the causal LM's ``forward`` runs without ``labels`` (so the model computes no loss;
    ``labels``, ``shift_labels`` and ``num_items_in_batch`` are kept), and its output-embedding ``nn.Linear``
    returns a zero-stride placeholder of the logits' shape instead of computing them, keeping its input (the
    final hidden states). :meth:`loss` then computes the clean pass's cross-entropy (the model's causal-LM
    loss: shifted labels, ``ignore_index=-100``, mean or ``/ num_items_in_batch``) and the symmetric KL from
    the two passes' hidden states and the head's weight (tied embeddings included), chunk by chunk.

    A logit multiplier is honoured by scaling the hidden states (Cohere's ``logit_scale``, Granite's
    ``1 / logits_scaling``); what cannot be expressed as ``h @ W.T + b`` is refused with a message: final-logit
    soft-capping (Gemma 2), other logit multipliers, a head that is not a plain ``nn.Linear`` (LoRA on the
    ``lm_head``, quantised heads), a patched or hooked head (``device_map`` offload), a head sharded by FSDP,
    an encoder-decoder or a model that is not a causal LM.

    Args:
        model: the model the closure calls (DDP and PEFT wrappers are unwrapped; FSDP is refused).
        chunk_size: rows per chunk of :func:`linear_r3f_loss` (default: :func:`~r3f_opt.linear_kl.default_chunk_size`); also an
            attribute, e.g. ``opt.regularizer.fused.chunk_size = 64``.
    """

    def __init__(self, model: nn.Module, chunk_size: Optional[int] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model, self.chunk_size = model, chunk_size
        self.base = unwrap_model(model)
        self.scale = self._check_model()
        self.head = self._check_head()

    def _check_model(self) -> float:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if type(self.model).__name__ == "FullyShardedDataParallel" or any(
                type(m).__name__.startswith("FSDP") for m in (self.model, self.base)):
            raise ValueError("fused_lm_head does not support FSDP: the LM head's weight is sharded, and the fused "
                             "objective needs all of it on every rank; use the logits path (fused_lm_head=False)")
        config = getattr(self.base, "config", None)
        name = self.base._get_name()
        if config is None or getattr(config, "is_encoder_decoder", False) or \
                name not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            raise ValueError(f"fused_lm_head needs a Hugging Face causal LM (a *ForCausalLM model, decoder-only); "
                             f"got {name}. Use the logits path (fused_lm_head=False), or call linear_r3f_loss on "
                             "your model's hidden states yourself")
        text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
        if getattr(text, "final_logit_softcapping", None) is not None:
            raise ValueError(f"{name} soft-caps its logits (final_logit_softcapping="
                             f"{text.final_logit_softcapping}), which the fused objective cannot express "
                             "(its logits are hidden @ W.T + b); use the logits path (fused_lm_head=False)")
        if getattr(text, "output_router_logits", False) and getattr(text, "router_aux_loss_coef", 0.0):
            raise ValueError(f"{name} adds an MoE router loss to its causal-LM loss (output_router_logits=True, "
                             f"router_aux_loss_coef={text.router_aux_loss_coef}), which the fused objective, computed "
                             "from the hidden states, would drop; set config.output_router_logits=False (TRL: "
                             "router_aux_loss_coef=0.0), or use the logits path (fused_lm_head=False)")
        model_type = getattr(text, "model_type", None)
        set_ = {a: getattr(text, a) for a in _LOSS_ATTRS if getattr(text, a, None) not in (None, 0, 0.0)}
        if set_:
            raise ValueError(f"{name} changes its logits or adds to its loss ({set_}), which the fused objective "
                             "cannot express (its loss is the shifted cross-entropy of hidden @ W.T + b); use the "
                             "logits path (fused_lm_head=False)")
        source = forward_source(type(self.base))
        reason = _unexpressible(source, model_type) if source is not None else None
        from transformers.loss.loss_utils import LOSS_MAPPING

        if reason is None and self.base.loss_function is not LOSS_MAPPING["ForCausalLM"]:
            reason = f"computes its loss with {getattr(self.base.loss_function, '__name__', self.base.loss_function)}"
        if reason is not None:
            raise ValueError(f"{name} {reason}, which the fused objective (the shifted cross-entropy of hidden @ W.T "
                             "+ b) would not reproduce; use the logits path (fused_lm_head=False)")
        if model_type in _LOGIT_SCALES:
            return float(_LOGIT_SCALES[model_type](text))
        scaled = {a: getattr(text, a) for a in _SCALE_ATTRS if getattr(text, a, None) not in (None, 1, 1.0)}
        if scaled:
            raise ValueError(f"{name} scales its logits ({scaled}), which fused_lm_head does not know how to honour "
                             f"for model_type={model_type!r}; use the logits path (fused_lm_head=False)")
        return 1.0

    def _check_head(self) -> nn.Linear:
        get = getattr(self.base, "get_output_embeddings", None)
        head = get() if callable(get) else None
        name = self.base._get_name()
        if not isinstance(head, nn.Module):
            raise ValueError(f"{name} has no output embeddings (get_output_embeddings() returned "
                             f"{type(head).__name__}); fused_lm_head needs its LM head")
        plain = isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward
        if not plain or hasattr(head, "base_layer"):
            raise ValueError(f"the LM head of {name} is a {type(head).__name__}, not a plain nn.Linear (a LoRA adapter "
                             "or a quantised layer?): the fused objective computes hidden @ W.T + b from its weight "
                             "and would skip the rest. Leave lm_head out of the adapter's target_modules, or use the "
                             "logits path (fused_lm_head=False)")
        if "forward" in head.__dict__ or head._forward_hooks or head._forward_pre_hooks:
            raise ValueError(f"the LM head of {name} has its forward patched or hooked (accelerate's device_map "
                             "offloading?), which the fused objective would bypass; load the model on one device "
                             "without offloading, remove the hooks, or use the logits path (fused_lm_head=False)")
        # the stored weight: reading a spectrally normalised head's weight (R4F) would run its power iteration
        parametrized = parametrize.is_parametrized(head, "weight")
        w = head.parametrizations.weight.original if parametrized else head.weight
        if not w.is_floating_point() or type(w).__name__ == "DTensor" or type(w.data).__name__ == "DTensor":
            raise ValueError(f"the LM head's weight is a {type(w).__name__} of {w.dtype} (quantised or sharded); "
                             "fused_lm_head needs a plain floating-point weight: use the logits path")
        return head

    @contextlib.contextmanager
    def capture(self) -> Iterator[CapturedPass]:
        """One pass of the model inside this block computes no logits and no loss; see the class docstring."""
        head, base = self._check_head(), self.base
        self.head = head
        rec = CapturedPass()
        inner = base.forward  # the bound method, or an instance attribute (TRL's fused-head patch)
        had_forward = "forward" in base.__dict__

        def forward(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("fused_lm_head"):
                raise ValueError("the model was called with fused_lm_head=True (TRL's own fused head) inside "
                                 "R3F's fused objective; call it without")
            kwargs.pop("fused_lm_head", None)
            keep = kwargs.get("logits_to_keep", 0)
            if not (keep is None or (isinstance(keep, int) and keep == 0)):
                raise ValueError(f"logits_to_keep={keep!r}: the fused objective needs the hidden states of every "
                                 "position; call the model without logits_to_keep")
            rec.model_calls += 1
            for key in ("labels", "shift_labels", "num_items_in_batch"):
                if key in kwargs:
                    setattr(rec, key, kwargs.pop(key))
            return inner(*args, **kwargs)

        def head_forward(hidden: torch.Tensor) -> torch.Tensor:
            rec.head_calls += 1
            rec.hidden = hidden
            kind = hidden.device.type
            rec.autocast = (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
            # The logits' shape at no cost (stride 0): the model returns it as its logits; nothing reads it.
            return hidden.new_zeros(()).expand(*hidden.shape[:-1], head.out_features)

        base.forward, head.forward = forward, head_forward
        try:
            yield rec
        finally:
            del head.forward
            if had_forward:
                base.forward = inner
            else:
                del base.forward

    def check(self, clean: CapturedPass, noisy: Optional[CapturedPass] = None) -> None:
        """Raise if a pass did not run the model and its head exactly once, or the clean one had no labels."""
        for what, rec in (("clean", clean), ("noisy", noisy)):
            if rec is None:
                continue
            if rec.model_calls != 1 or rec.head_calls != 1:
                raise RuntimeError(
                    f"the {what} pass called the causal LM {rec.model_calls} and its LM head {rec.head_calls} times; "
                    "with fused_lm_head the closure must call the model once per pass, on its input ids (no "
                    "generate(), no second model)")
        if clean.labels is None and clean.shift_labels is None:
            raise ValueError("the closure called the model without labels=; fused_lm_head computes the model's "
                             "causal-LM loss itself and needs them: model(input_ids=..., labels=...)")
        if noisy is not None and noisy.hidden.shape != clean.hidden.shape:
            raise ValueError(f"the hidden states of the two passes differ in shape: clean "
                             f"{tuple(clean.hidden.shape)}, noisy {tuple(noisy.hidden.shape)}; the closure must run "
                             "the same batch every time")

    def loss(self, clean: CapturedPass, noisy: CapturedPass, *, lam: float = 1.0,
             mask: Optional[torch.Tensor] = None, reduction: str = "batchmean", noisy_grad: bool = True,
             label_smoothing: float = 0.0, num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
             chunk_size: Optional[int] = None, token_stats: Optional[torch.Tensor] = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``linear_r3f_loss`` of the two captured passes: ``(total, ce, kl)``, ``total = ce + lam * kl``.

        ``ce`` is the model's own causal-LM loss (``num_items_in_batch``: this argument, else the one the model
        was called with); ``mask`` (default: the rows whose shifted label counts) selects the KL's rows. The
        head's GEMMs run under the autocast state the model's head ran under.
        """
        self.check(clean, noisy)
        if clean.shift_labels is not None:
            labels, shift = clean.shift_labels, False
        else:
            labels, shift = clean.labels, True
        if num_items_in_batch is None:
            num_items_in_batch = clean.num_items_in_batch
        hc, hn = clean.hidden, noisy.hidden
        chunk_size = self.chunk_size if chunk_size is None else chunk_size
        if self.scale != 1.0:
            hc, hn = hc * self.scale, hn * self.scale
        weight = self.head.weight  # read once: with R4F each read runs a power iteration (one per step here)
        enabled, dtype = clean.autocast
        with torch.autocast(weight.device.type, dtype=dtype, enabled=enabled):
            return linear_r3f_loss(hc, hn, weight, labels.to(hc.device), self.head.bias, lam=lam,
                                   mask=mask, label_smoothing=label_smoothing, shift_labels=shift,
                                   reduction=reduction, num_items_in_batch=num_items_in_batch,
                                   noisy_grad=noisy_grad, chunk_size=chunk_size, token_stats=token_stats)
