"""One warning helper: name the user's line, not ours."""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings


def _package_dirs(*names: str) -> tuple[str, ...]:
    """The folders of the installed packages ``names`` (found without importing them)."""
    specs = (importlib.util.find_spec(n) for n in names)
    return tuple(os.path.dirname(os.path.abspath(s.origin)) for s in specs if s is not None and s.origin)


# Frames in these are never the user's line: ours, torch's (hooks, Optimizer.step's wrapper), and the model
# code the user's closure calls into (transformers, peft, accelerate).
_INSIDE = (os.path.dirname(os.path.abspath(__file__)),) + _package_dirs("torch", "transformers", "peft", "accelerate")


def warn_user(message: str) -> None:
    """``warnings.warn(message)`` attributed to the first frame outside r3f_opt and torch: the user's
    ``opt.step(...)`` or closure line, however deep inside the library (or the model's code) it was raised."""
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)
