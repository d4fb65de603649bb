"""Helpers the benchmarks share: where results go, progress with an ETA, device sync, peak memory of a call,
and matplotlib when it is installed."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

# Kineto (torch.profiler, used by peak_extra_bytes on CPU) logs "USDT ... profiler_start/stop" for every
# profile at any level below 6 (its levels: 0 verbose .. 4 error, 5 USDT); read when the first profile
# starts, so setting it here, before any, is enough.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import torch  # noqa: E402

__all__ = ["RESULTS", "LOCAL_RESULTS", "Progress", "sync", "peak_extra_bytes", "pyplot", "save", "device_name"]

RESULTS = Path(__file__).resolve().parent / "results"  # committed results (written with --save)
LOCAL_RESULTS = RESULTS / "local"  # the default: not tracked (.gitignore)


class Progress:
    """``[done/total] what, elapsed, ETA`` lines on stderr. ``add(n)`` announces n more steps (a caller
    running several benchmarks announces each one's steps as it learns them); the ETA is the mean time per
    step so far times the steps left, optionally seeded by ``estimate_s`` per step before the first one."""

    def __init__(self, estimate_s: Optional[float] = None, stream=None) -> None:
        self.total = self.done_steps = 0
        self.start = time.perf_counter()
        self.estimate_s = estimate_s
        self.stream = stream or sys.stderr

    def add(self, n: int) -> None:
        self.total += n

    def eta_s(self) -> Optional[float]:
        elapsed = time.perf_counter() - self.start
        per_step = elapsed / self.done_steps if self.done_steps else self.estimate_s
        return None if per_step is None else per_step * max(self.total - self.done_steps, 0)

    def step(self, what: str) -> None:
        self.done_steps += 1
        eta = self.eta_s()
        left = "" if eta is None else f", ETA {eta:.0f} s"
        print(f"[{self.done_steps}/{self.total}] {what}: {time.perf_counter() - self.start:.0f} s elapsed{left}",
              file=self.stream, flush=True)

    def done(self) -> float:
        elapsed = time.perf_counter() - self.start
        print(f"done in {elapsed:.0f} s", file=self.stream, flush=True)
        return elapsed


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_extra_bytes(device: torch.device, fn: Callable[[], object]) -> int:
    """Peak bytes allocated while ``fn`` runs, above what was allocated when it started: CUDA's allocator
    statistics, or on CPU the running sum of the torch profiler's memory events. On CPU, ``fn`` must not free
    tensors allocated before it started (e.g. ``zero_grad()`` with ``set_to_none``): the profiler reports such a
    free only when the block's address was seen allocated in an earlier profiling session, i.e. at random."""
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
    """The GPU's name, or the CPU's model name (from /proc/cpuinfo, else what platform says)."""
    from r3f_opt.experiments.cli import cpu_model

    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
