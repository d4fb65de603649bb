"""Spectral-norm parametrization that runs the fused Triton kernel when it can (R4F head).

:class:`FusedSpectralNorm` subclasses torch's ``_SpectralNorm``: registration (random u, v and 15
warm-up power iterations), buffers, ``state_dict`` keys, ``eval`` behaviour and constructor arguments are
torch's, so checkpoints move between the two both ways. Only ``forward`` differs: on every call it asks
:func:`r3f_opt._dispatch.use_triton` (``R3F_KERNELS``) whether to run
:func:`r3f_opt.kernels.spectral_norm.spectral_normalize` on this weight, so a model moved to CUDA after
registration gets the kernel; otherwise (CPU under ``auto``, ``R3F_KERNELS=torch``, float64 weights,
``dim != 0``, 1-D weights) it runs torch's own forward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

from ._dispatch import use_triton

__all__ = ["FusedSpectralNorm", "spectral_norm"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class FusedSpectralNorm(_SpectralNorm):
    """torch's ``_SpectralNorm`` whose forward runs the fused power-iteration kernel when dispatched."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if (weight.ndim > 1 and self.dim == 0 and weight.dtype in _KERNEL_DTYPES
                and use_triton("spectral_norm", weight)):
            from .kernels.spectral_norm import spectral_normalize

            n = self.n_power_iterations if self.training else 0
            return spectral_normalize(weight.flatten(1), self._u, self._v, n, self.eps).view_as(weight)
        return super().forward(weight)


def spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1, eps: float = 1e-12,
                  dim: Optional[int] = None) -> nn.Module:
    """Drop-in for ``torch.nn.utils.parametrizations.spectral_norm`` registering :class:`FusedSpectralNorm`.

    Same arguments, defaults and state_dict layout (``parametrizations.<name>.original``,
    ``parametrizations.<name>.0._u`` / ``._v``). Returns ``module``.
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"module {type(module).__name__} has no parameter or buffer named {name!r}")
    if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, int) or n_power_iterations < 1:
        raise ValueError(f"n_power_iterations must be an int >= 1, got {n_power_iterations!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if dim is None:
        dim = 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
    parametrize.register_parametrization(module, name, FusedSpectralNorm(weight, n_power_iterations, dim, eps))
    return module
