"""Helpers the benchmarks share: device sync, peak memory of a call, and matplotlib when it is installed."""
from __future__ import annotations

import sys
from typing import Callable

import torch

__all__ = ["sync", "peak_extra_bytes", "pyplot", "save", "device_name"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_extra_bytes(device: torch.device, fn: Callable[[], object]) -> int:
    """Peak bytes allocated while ``fn`` runs, above what was allocated when it started: CUDA's allocator
    statistics, or on CPU the running sum of the torch profiler's memory events."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None (with a note on stderr) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def save(result: dict, out, plot=None) -> None:
    """Write ``result`` as JSON to ``out`` and, unless ``plot`` is None, ``plot(result, out.png)``."""
    import json
    from pathlib import Path

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    if plot is not None and (png := plot(result, out.with_suffix(".png"))):
        print(f"wrote {png}")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo (else what platform says)."""
    import platform

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
