"""Choosing between the Triton kernels and the PyTorch path.

``R3F_KERNELS`` (read on every call, so tests and users can switch it at run time):

* unset / ``auto``: Triton for CUDA tensors when Triton imports, PyTorch otherwise;
* ``torch``: always the PyTorch path;
* ``triton``: always the Triton kernels; CPU tensors need ``TRITON_INTERPRET=1`` set before Triton
  is imported (the interpreter runs the real kernel code with NumPy: this is how CI checks them).

When Triton is wanted but cannot be imported, the PyTorch path runs after a one-time warning.
"""
from __future__ import annotations

import functools
import os
import sys
import warnings
from contextlib import nullcontext
from typing import Optional

import torch

__all__ = ["use_triton", "triton_available", "kernel_mode", "device_context"]

_MODES = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising something else at import
        return False
    return True


@functools.lru_cache(maxsize=None)
def _warn_missing(op: str) -> None:
    warnings.warn(
        f"r3f_opt: Triton is not available, so {op} uses the PyTorch path. Install triton (Linux) for "
        "the fused kernels, or set R3F_KERNELS=torch to silence this warning.",
        RuntimeWarning,
        stacklevel=3,
    )


_KERNEL_MODULES = ("r3f_opt.kernels.sym_kl", "r3f_opt.kernels.spectral_norm")


def _interpreter_problem() -> Optional[str]:
    """Why the kernels cannot run in Triton's interpreter now, or None. ``triton.jit`` builds them for it (or
    for a GPU) when a kernel module is imported, reading ``TRITON_INTERPRET`` then, and Triton reads it again
    at every launch: it must be set before the first import and stay set."""
    now = os.environ.get("TRITON_INTERPRET", "0") == "1"
    built = [getattr(sys.modules[n], "INTERPRETED", now) for n in _KERNEL_MODULES if n in sys.modules]
    if not now and not any(built):
        return "set TRITON_INTERPRET=1 before r3f_opt's kernels are first imported (used)"
    if not now:
        return "TRITON_INTERPRET=1 was unset after the kernels were built for the interpreter: keep it set"
    if not all(built):
        return ("r3f_opt's kernels were imported before TRITON_INTERPRET=1 was set, so they were built for a GPU: "
                "set it at the start of the process")
    return None


def kernel_mode() -> str:
    """``R3F_KERNELS`` normalised: ``"auto"``, ``"torch"`` or ``"triton"`` (ValueError otherwise)."""
    mode = os.environ.get("R3F_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"R3F_KERNELS must be one of {_MODES}, got {os.environ['R3F_KERNELS']!r}")
    return mode


def use_triton(op: str, *tensors: torch.Tensor) -> bool:
    """Whether ``op`` should run its Triton kernel on ``tensors`` (see the module docstring)."""
    mode = kernel_mode()
    if mode == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if mode == "auto" and not on_cuda:
        return False
    if not triton_available():
        _warn_missing(op)
        return False
    problem = None if on_cuda else _interpreter_problem()
    if problem is not None:
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(f"R3F_KERNELS=triton asks for the Triton {op} kernel on {devices} tensors; Triton runs on "
                           f"CPU only in its interpreter: {problem}; or unset R3F_KERNELS.")
    return True


def device_context(t: torch.Tensor):
    """``torch.cuda.device(t.device)`` for a CUDA tensor, else a no-op context. Triton launches on the
    current device (and its current stream): a kernel on tensors of cuda:1 while cuda:0 is current must
    switch to cuda:1 first."""
    return torch.cuda.device(t.device) if t.is_cuda else nullcontext()
