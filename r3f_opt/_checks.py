"""Argument checks shared by the public functions: a clear TypeError/ValueError naming the argument."""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import torch


def check_number(name: str, value: Any, *, positive: bool = False, at_most: Optional[float] = None) -> float:
    """``value`` as a finite float >= 0 (> 0 if ``positive``; <= ``at_most`` if given), else a TypeError or
    ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value < 0 or (positive and value == 0) or (at_most is not None and value > at_most):
        bound = f"{'>' if positive else '>='} 0" + (f" and <= {at_most:g}" if at_most is not None else "")
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def check_flag(name: str, value: Any) -> bool:
    """``value`` as a bool if it is one (a numpy or 0-d torch bool too): a string such as "no" would read as True."""
    if isinstance(value, bool):
        return value
    if getattr(value, "shape", None) in ((), torch.Size([])) and str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")
