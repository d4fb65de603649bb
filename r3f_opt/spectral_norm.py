"""Spectral-norm parametrization that runs the fused Triton kernel when it can (R4F head).

:class:`FusedSpectralNorm` subclasses torch's ``_SpectralNorm``: registration (random u, v and 15
warm-up power iterations), buffers, ``state_dict`` keys, ``eval`` behaviour and constructor arguments are
torch's, so checkpoints move between the two both ways. Only ``forward`` differs: on every call it asks
:func:`r3f_opt._dispatch.use_triton` (``R3F_KERNELS``) whether to run
:func:`r3f_opt.kernels.spectral_norm.spectral_normalize` on this weight, so a model moved to CUDA after
registration gets the kernel; otherwise it runs torch's own forward. torch's forward runs for: CPU under
``auto``, ``R3F_KERNELS=torch``, float64 and complex weights, ``dim != 0`` (ConvTranspose), 1-D and empty
weights, weights on other devices (meta) or of tensor subclasses, under ``torch.compile``, and when u or v
require grad.

On the kernel path the result keeps the weight's strides (channels_last, transposed) as torch's does, and
the autograd function supports what torch's maths supports: backward, double backward, batched gradients,
forward-mode AD and the torch.func transforms (``grad``, ``vjp``, ``jacrev``, ``jvp``, ``jacfwd``,
``vmap``, ``functional_call``); see :class:`r3f_opt.kernels.spectral_norm.SpectralNormFunction` for which
derivatives run the kernels and which run the same formula in PyTorch operations.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

from ._dispatch import use_triton

__all__ = ["FusedSpectralNorm", "spectral_norm"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PLAIN = (torch.Tensor, nn.Parameter)


class FusedSpectralNorm(_SpectralNorm):
    """torch's ``_SpectralNorm`` whose forward runs the fused power-iteration kernel when dispatched."""

    def _kernel_applies(self, weight: torch.Tensor) -> bool:
        u, v = getattr(self, "_u", None), getattr(self, "_v", None)
        return (weight.ndim > 1 and self.dim == 0 and weight.numel() > 0
                and weight.dtype in _KERNEL_DTYPES and weight.device.type in ("cpu", "cuda")
                and type(weight) in _PLAIN and type(u) in _PLAIN and type(v) in _PLAIN
                and u.dtype in _KERNEL_DTYPES and v.dtype in _KERNEL_DTYPES
                and not (u.requires_grad or v.requires_grad)
                and self.eps == self.eps  # a NaN eps: torch's NaN result
                and not torch.compiler.is_compiling()
                and use_triton("spectral_norm", weight))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self._kernel_applies(weight):
            from .kernels.spectral_norm import spectral_normalize

            n = operator.index(self.n_power_iterations) if self.training else 0
            return spectral_normalize(weight, self._u, self._v, n, self.eps)
        return super().forward(weight)


def spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1, eps: float = 1e-12,
                  dim: Optional[int] = None) -> nn.Module:
    """Drop-in for ``torch.nn.utils.parametrizations.spectral_norm`` registering :class:`FusedSpectralNorm`.

    Same arguments, defaults and state_dict layout (``parametrizations.<name>.original``,
    ``parametrizations.<name>.0._u`` / ``._v``). As in torch, ``n_power_iterations`` is any integer >= 1
    (numpy integers included), ``eps`` any float (0 included) and ``dim`` any valid dimension (negative
    too; IndexError otherwise). Returns ``module``.
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"module {type(module).__name__} has no parameter or buffer named {name!r}")
    try:
        n = operator.index(n_power_iterations)
    except TypeError:
        raise ValueError(f"n_power_iterations must be an integer >= 1, got {n_power_iterations!r}") from None
    if n < 1:
        raise ValueError(f"n_power_iterations must be an integer >= 1, got {n_power_iterations!r}")
    if dim is None:
        dim = 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
    parametrize.register_parametrization(module, name, FusedSpectralNorm(weight, n, dim, eps))
    return module
