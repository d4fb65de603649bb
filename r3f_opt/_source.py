"""Reading a model's ``forward`` source, for what its signature does not say (how it computes its loss)."""
from __future__ import annotations

import inspect
import re
from typing import Optional


def forward_source(cls: type) -> Optional[str]:
    """The source of ``cls.forward``, followed up the MRO while a forward defers to ``super().forward(``
    (a subclass that only adds a step); None where a forward in that chain has no readable source."""
    parts = []
    for klass in (c for c in cls.__mro__ if "forward" in vars(c)):
        try:
            source = inspect.getsource(vars(klass)["forward"])
        except (OSError, TypeError):
            return None
        parts.append(source)
        if not re.search(r"super\(.*\)\.forward\(", source):
            break
    return "\n".join(parts) if parts else None
