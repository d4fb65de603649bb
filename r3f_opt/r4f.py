"""R4F: spectral normalisation of the classification head, W_SN = W / sigma_max(W)."""
from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

from ._checks import check_number
from ._dispatch import kernel_mode, triton_available
from .noise import unwrap_model
from .spectral_norm import spectral_norm as fused_spectral_norm

__all__ = ["apply_r4f", "remove_r4f", "r4f_state_dict", "find_head"]

SCOPES = ("out_proj", "head")

# model_type -> (output projection, other Linear layers of the head for scope="head"), relative to the
# sequence-classification model. BERT's and DeBERTa's poolers play the role of RoBERTa's head.dense.
_HEADS = {
    "bert": ("classifier", ("bert.pooler.dense",)),
    "roberta": ("classifier.out_proj", ("classifier.dense",)),
    "xlm-roberta": ("classifier.out_proj", ("classifier.dense",)),
    "distilbert": ("classifier", ("pre_classifier",)),
    "electra": ("classifier.out_proj", ("classifier.dense",)),
    "deberta-v2": ("classifier", ("pooler.dense",)),
    "bart": ("classification_head.out_proj", ("classification_head.dense",)),
    "gpt2": ("score", ()),
}
# Tried in order for other models.
_GENERIC = ("classification_head.out_proj", "classifier.out_proj", "classifier", "score")


def _get(model: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return _active_copy(model.get_submodule(path))
    except AttributeError:
        return None


def _active_copy(module: nn.Module) -> nn.Module:
    """The module the forward runs: for PEFT's ``ModulesToSaveWrapper`` (a LoRA classifier's trained head,
    ``modules_to_save``), the active adapter's copy; any other module itself."""
    copies = getattr(module, "modules_to_save", None)
    if type(module).__name__ == "ModulesToSaveWrapper" and isinstance(copies, nn.ModuleDict):
        name = getattr(module, "active_adapter", None)
        name = name[0] if isinstance(name, (list, tuple)) and len(name) == 1 else name
        if isinstance(name, str) and name in copies:
            return copies[name]
    return module


def _is_normalised(linear: nn.Module) -> bool:
    """Whether ``weight`` carries torch's spectral norm or ours (a subclass of it)."""
    return parametrize.is_parametrized(linear, "weight") and any(
        isinstance(p, _SpectralNorm) for p in linear.parametrizations["weight"]
    )


def find_head(model: nn.Module, head: Optional[nn.Module] = None, scope: str = "out_proj") -> list[nn.Linear]:
    """The Linear layers that R4F normalises: the head's output projection, or all of the head's."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if head is not None:
        if isinstance(head, nn.Linear):
            layers = [head]
        elif scope == "head":
            layers = [m for m in head.modules() if isinstance(m, nn.Linear)]
        else:
            out = getattr(head, "out_proj", None)
            layers = [out] if isinstance(out, nn.Linear) else []
        if not layers:
            raise ValueError(
                f"head {type(head).__name__} has no nn.Linear output projection; pass the nn.Linear "
                "itself, or scope='head' to normalise every Linear inside it"
            )
        return layers
    m = unwrap_model(model)
    model_type = getattr(getattr(m, "config", None), "model_type", None)
    if model_type in _HEADS:
        out_path, extra = _HEADS[model_type]
        candidates = [out_path, *_GENERIC]  # e.g. RobertaForTokenClassification: a plain `classifier`
    else:
        extra, candidates = None, list(_GENERIC)
    for path in candidates:
        out = _get(m, path)
        if isinstance(out, nn.Linear):
            if scope == "out_proj":
                return [out]
            if extra is not None:
                return [lin for p in extra if isinstance(lin := _get(m, p), nn.Linear)] + [out]
            if path.endswith(".out_proj"):  # a RoBERTa-style head module: every Linear inside it
                return [lin for lin in _get(m, path.rsplit(".", 1)[0]).modules() if isinstance(lin, nn.Linear)]
            raise ValueError(
                f"scope='head' on {type(m).__name__} (model_type={model_type!r}): its head's output projection is "
                f"{path}, but which other layers belong to the head (a pooler?) is not known for this model type; "
                "pass them: apply_r4f(model, head=<the head module>, scope='head'), or use scope='out_proj'")
    raise ValueError(
        f"could not find the classification head of {type(m).__name__} (model_type={model_type!r}); "
        "R4F needs a sequence-classification head. Pass it explicitly: apply_r4f(model, head=<nn.Linear>)"
    )


def apply_r4f(model: nn.Module, head: Optional[nn.Module] = None, scope: str = "out_proj", *,
              n_power_iterations: Optional[int] = None, eps: Optional[float] = None) -> list[nn.Linear]:
    """Spectrally normalise the classification head of ``model`` in place (R4F).

    Registers :class:`r3f_opt.spectral_norm.FusedSpectralNorm` (torch's parametrization whose forward runs
    the fused Triton kernel whenever ``R3F_KERNELS`` dispatches this weight to it: CUDA under ``auto``,
    also CPU under ``triton`` with ``TRITON_INTERPRET=1``; torch's maths otherwise, decided per forward so
    ``model.to("cuda")`` afterwards still gets the kernel). With ``R3F_KERNELS=torch``, or without Triton,
    it registers ``torch.nn.utils.parametrizations.spectral_norm`` itself. Either way the state_dict holds
    ``parametrizations.weight.original`` and ``..._u``/``..._v``, and the weight Parameter object is kept
    (optimizers built before this call still update it). Layers already normalised are left alone.

    Args:
        model: a sequence-classification model (BERT, RoBERTa, XLM-R, DistilBERT, ELECTRA, DeBERTa-v2,
            BART, GPT-2 are found automatically; others through ``classifier``/``score`` attributes).
        head: the head module or its output ``nn.Linear``, if it cannot be found automatically.
        scope: ``"out_proj"`` (the reference: only the output projection) or ``"head"`` (every Linear of
            the head, the paper's wording).
        n_power_iterations, eps: as in torch's ``spectral_norm`` (None: the reference's 1 and 1e-12). A layer
            normalised before keeps its own; giving other values for it is an error (``remove_r4f`` first).

    Returns:
        the normalised Linear layers.
    """
    asked = {k: v for k, v in (("n_power_iterations", n_power_iterations), ("eps", eps)) if v is not None}
    if n_power_iterations is not None and (isinstance(n_power_iterations, bool)
                                           or not isinstance(n_power_iterations, numbers.Integral)):
        raise TypeError(f"n_power_iterations must be an int >= 1, got {n_power_iterations!r}")
    if n_power_iterations is not None and n_power_iterations < 1:
        raise ValueError(f"n_power_iterations must be an int >= 1, got {n_power_iterations!r}")
    if eps is not None:
        check_number("eps", eps, positive=True)
    layers = find_head(model, head, scope)
    register = torch_spectral_norm if kernel_mode() == "torch" or not triton_available() else fused_spectral_norm
    before = [next(p for p in layer.parametrizations["weight"] if isinstance(p, _SpectralNorm))
              for layer in layers if _is_normalised(layer)]
    for sn in before:  # a layer normalised before keeps its settings: refuse to pretend others apply
        if any(getattr(sn, k) != v for k, v in asked.items()):
            raise ValueError(f"the head is already spectrally normalised with n_power_iterations="
                             f"{sn.n_power_iterations}, eps={sn.eps:g}, not the "
                             + ", ".join(f"{k}={v:g}" for k, v in asked.items())
                             + " asked for; remove_r4f(model) first to change them")
    # new layers of a head normalised before (scope="head" after "out_proj") get its settings unless asked
    n_power_iterations = asked.get("n_power_iterations", before[0].n_power_iterations if before else 1)
    eps = asked.get("eps", before[0].eps if before else 1e-12)
    new = [layer for layer in layers if not _is_normalised(layer)]
    for layer in new:
        register(layer, "weight", n_power_iterations=n_power_iterations, eps=eps)
    if new and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # Registration drew u, v from each rank's own RNG. Start every rank from rank 0's: when R4F is
        # applied after DDP wrapping, DDP does not know (or broadcast) these buffers, and identical W, u, v
        # then keep them identical.
        nccl = dist.get_backend() == "nccl"  # NCCL moves CUDA tensors only (the model may still be on CPU)
        for layer in new:
            for buf in layer.parametrizations["weight"][0].buffers():
                if nccl and buf.device.type != "cuda":
                    on_gpu = buf.to(torch.device("cuda", torch.cuda.current_device()))
                    dist.broadcast(on_gpu, src=0)
                    buf.copy_(on_gpu)
                else:
                    dist.broadcast(buf, src=0)
    return layers


def _baked_weight(layer: nn.Module) -> torch.Tensor:
    """``W / sigma`` of a normalised layer with sigma from its current u, v (eval mode: no power iteration)."""
    norm = layer.parametrizations["weight"]
    was_training = norm.training
    norm.eval()
    try:
        with torch.no_grad():
            return layer.weight.detach().clone()
    finally:
        norm.train(was_training)


def r4f_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` as :func:`remove_r4f` would leave it, the model untouched: every spectrally
    normalised weight is a plain ``<layer>.weight`` holding ``W / sigma`` (sigma from the current u, v), and
    its ``parametrizations.weight.*`` entries are gone. For exporting a model still being trained
    (``save_pretrained(dir, state_dict=r4f_state_dict(model))``). Not for a PEFT model's ``save_pretrained``,
    which looks up its live modules' own keys: call :func:`remove_r4f` there."""
    state = model.state_dict()
    for name, layer in model.named_modules():
        if not _is_normalised(layer):
            continue
        prefix = f"{name}." if name else ""
        for key in [k for k in state if k.startswith(f"{prefix}parametrizations.weight.")]:
            del state[key]
        state[f"{prefix}weight"] = _baked_weight(layer)
    return state


def remove_r4f(model: nn.Module) -> int:
    """Bake ``W / sigma`` into every spectrally normalised weight of ``model`` and drop the parametrization.

    sigma comes from the current u, v (no extra power iteration), so outputs equal those of the model in
    eval mode before the call, and ``save_pretrained`` writes a plain checkpoint. Returns the count.
    """
    layers = [m for m in unwrap_model(model).modules() if _is_normalised(m)]
    for layer in layers:
        was_training = layer.training
        layer.eval()  # eval: sigma = u^T W v from the stored u, v, no update
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        layer.train(was_training)
    return len(layers)
