"""Symmetric-KL microbenchmarks: the Triton kernel vs eager, torch.compile, the library's PyTorch path, Liger.

    python -m bench.sym_kl                      # default sweep on the device present (CUDA if any)
    python -m bench.sym_kl --quick              # a reduced sweep (what ``python -m bench`` runs)
    python -m bench.sym_kl --vocab 50265 --rows 4096 --dtypes bfloat16 --impls r3f_triton compile
    python -m bench.sym_kl --cpu-study --threads 1 --save   # the committed CPU comparison

For each shape (rows x V, dtype) every implementation is first checked against the PyTorch path (value and
both gradients) and its first call timed (for the ``compile*`` ones: the compilation, and how many frames
dynamo compiled for this shape). Then, per mode, the implementations are timed **interleaved**: round
after round each runs once, in a rotated order, so that load on the machine hits all alike; a mode is done
when every implementation has ``--budget`` seconds (at least 5 rounds). Modes: forward (a training forward:
saves for backward), backward alone (forward untimed before each repetition), forward+backward. Reported:
the median with the 20th/80th percentiles, the median of the per-round ratios to ``before`` (the PyTorch
path as it was before chunking, kept here as the baseline) with their min-max, the effective bandwidth
(forward reads a and b; backward reads them again and writes both gradients) against the measured copy
bandwidth, and the peak memory beyond the inputs during forward+backward (CUDA: the allocator's peak; CPU:
the running sum of torch.profiler's allocation events, see ``bench.common.peak_extra_bytes``).

The JSON (environment, command, raw times per round) and a PNG go to ``bench/results/local/`` (not
tracked) unless ``--out PATH``; ``--save`` writes the committed ``bench/results/sym_kl_<device>.json``.
Progress and an ETA go to stderr.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .common import LOCAL_RESULTS, RESULTS, Progress, device_name, peak_extra_bytes, pyplot, save, sync

VOCABS = (2, 3, 1024, 32000, 50265, 128256, 256000)
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Elements per input (rows * V) above which a shape is left out of the default sweep.
MAX_ELEMENTS = {"cuda": 2**28, "cpu": 2**21}
ROWS = {"cuda": (1, 64, 1024, 2048, 4096, 8192, 16384, 2**20), "cpu": (1, 16, 256, 4096)}
DEFAULT_IMPLS = ("r3f_triton", "before", "r3f_torch", "eager", "compile", "compile_closed", "liger")
# The reduced sweep python -m bench runs (under a minute on a loaded 2-core VM; on CPU with one thread: with
# two, a core held by another process stalls every parallel region, see docs/benchmarks.md), and the CPU
# study committed in bench/results/sym_kl_cpu.json.
QUICK = {"cuda": dict(vocab=[32000, 128256], rows=[4096], dtypes=["bfloat16"], modes=["fwd+bwd"],
                      impls=["r3f_triton", "r3f_torch", "compile"], budget=0.1),
         "cpu": dict(vocab=[32000, 128256], rows=[16], dtypes=["float32", "bfloat16"], modes=["fwd+bwd"],
                     impls=["before", "r3f_torch"], budget=0.3, threads=1)}
CPU_STUDY = dict(vocab=[32000, 50257, 128256], rows=[8, 64], dtypes=["float32", "bfloat16"],
                 modes=list(MODES), impls=["before", "r3f_torch", "r3f_torch_save", "r3f_torch_recompute",
                                           "compile_closed"], budget=1.0, max_elements=2**24)


# ------------------------------------------------------------------------------------ implementations
def eager(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The reference formula (fairseq rxf): two kl_div over float32 log_softmax / softmax."""
    return F.kl_div(F.log_softmax(b, -1, dtype=torch.float32), F.softmax(a, -1, dtype=torch.float32),
                    reduction="sum") + F.kl_div(F.log_softmax(a, -1, dtype=torch.float32),
                                                F.softmax(b, -1, dtype=torch.float32), reduction="sum")


def closed_form(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL_S = sum (p - q)(log p - log q) in float32, differentiated by autograd (what ``compile_closed``
    compiles: the closed form the library's paths use, without their edge-case guards)."""
    la, lb = F.log_softmax(a.float(), -1), F.log_softmax(b.float(), -1)
    return ((la.exp() - lb.exp()) * (la - lb)).sum()


def r3f_torch(a: torch.Tensor, b: torch.Tensor, save_grads: Optional[bool] = None) -> torch.Tensor:
    """The library's PyTorch path (chunked over rows); ``save_grads`` forces a gradient strategy."""
    from r3f_opt.kl import _SymmetricKLRows

    return _SymmetricKLRows.apply(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), None, None,
                                  save_grads).sum()


class _BeforeRows(torch.autograd.Function):
    """The PyTorch path before it was chunked (r3f_opt/kl.py at 66b7dab), kept as the baseline: whole-tensor
    float32 temporaries (p, q, d' and the guards' products), statistics saved, p, q recomputed in backward."""

    @staticmethod
    def forward(ctx, a, b):
        from r3f_opt.kl import _compute_dtype, _log_z, _probs, _row_max, _times

        dtype = _compute_dtype(a, b)
        a32, b32 = a.to(dtype), b.to(dtype)
        m_a, m_b = _row_max(a32), _row_max(b32)
        lz_a, lz_b = _log_z(a32, m_a), _log_z(b32, m_b)
        p, q, d = _probs(a32, b32, m_a, m_b, lz_a, lz_b)
        kl = torch.where(p == q, torch.zeros_like(d), (p - q) * d).sum(-1, keepdim=True)
        e_p, e_q = _times(p, d).sum(-1, keepdim=True), _times(q, d).sum(-1, keepdim=True)
        ctx.save_for_backward(a, b, m_a, m_b, lz_a, lz_b, e_p, e_q)
        return kl.squeeze(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows):
        from r3f_opt.kl import _probs, _times

        a, b, m_a, m_b, lz_a, lz_b, e_p, e_q = ctx.saved_tensors
        dtype = lz_a.dtype
        p, q, d = _probs(a.to(dtype), b.to(dtype), m_a, m_b, lz_a, lz_b)
        g = grad_rows.to(dtype).unsqueeze(-1)
        grad_a = (g * (_times(p, d - e_p + 1.0) - q)).to(a.dtype) if ctx.needs_input_grad[0] else None
        grad_b = (g * (_times(q, e_q - d + 1.0) - p)).to(b.dtype) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def before(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _BeforeRows.apply(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])).sum()


def r3f_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from r3f_opt.kernels.sym_kl import symmetric_kl_rows

    return symmetric_kl_rows(a, b).sum()


def _liger() -> Callable:
    from liger_kernel.ops.kl_div import LigerKLDivLossFunction as K

    def liger(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # Liger's KL has no gradient for its target: each term differentiates its log-prob input only,
        # so this is the cost of the composition a user would write, not an exact symmetric-KL gradient.
        lp = F.log_softmax(a, -1, dtype=torch.float32)
        lq = F.log_softmax(b, -1, dtype=torch.float32)
        return K.apply(lq, lp, "sum", True) + K.apply(lp, lq, "sum", True)

    return liger


@functools.lru_cache(maxsize=None)
def implementations(device: torch.device) -> dict[str, tuple[Optional[Callable], str]]:
    """name -> (function, "") or (None, why it is not run here)."""
    impls: dict[str, tuple[Optional[Callable], str]] = {}
    if device.type == "cuda":
        impls["r3f_triton"] = (r3f_triton, "")
    else:
        impls["r3f_triton"] = (None, "no GPU: on CPU Triton runs only in its interpreter (tests check it there)")
    impls["before"] = (before, "")
    impls["r3f_torch"] = (r3f_torch, "")
    impls["r3f_torch_save"] = (functools.partial(r3f_torch, save_grads=True), "")
    impls["r3f_torch_recompute"] = (functools.partial(r3f_torch, save_grads=False), "")
    impls["eager"] = (eager, "")
    # Static shapes on CUDA (the fastest kernels; one compilation per shape), dynamic ones on CPU so the
    # default sweep is not spent compiling. Raise the recompile limit: past it dynamo silently runs eager.
    torch._dynamo.config.recompile_limit = 4096
    impls["compile"] = (torch.compile(eager, dynamic=device.type != "cuda"), "")
    impls["compile_closed"] = (torch.compile(closed_form, dynamic=device.type != "cuda"), "")
    try:
        impls["liger"] = (_liger(), "") if device.type == "cuda" else (None, "Liger-Kernel needs CUDA")
    except ImportError:
        impls["liger"] = (None, "liger-kernel not installed")
    return impls


# ------------------------------------------------------------------------------------------ measuring
def _once(device: torch.device, fn: Callable, state, flush: Optional[torch.Tensor]) -> float:
    """Seconds for one ``fn(state)``; L2 flushed first and CUDA events on CUDA."""
    if flush is not None:
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(state)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn(state)
    return time.perf_counter() - t0


def _timed(device: torch.device, setup: Callable, fn: Callable, budget_s: float, min_reps: int = 5,
           max_reps: int = 100) -> list[float]:
    """Seconds per call of ``fn(setup())``, ``setup`` untimed; L2 flushed before each call on CUDA."""
    return interleaved(device, {"x": (setup, fn)}, budget_s, min_reps, max_reps)["x"]


def interleaved(device: torch.device, calls: dict[str, tuple[Callable, Callable]], budget_s: float,
                min_reps: int = 5, max_reps: int = 100) -> dict[str, list[float]]:
    """Round-robin timing: per round every ``name: (setup, fn)`` runs ``fn(setup())`` once (``setup``
    untimed), in an order rotated each round; rounds until each has ``budget_s`` seconds and ``min_reps``
    calls, or ``max_reps``. Two untimed warm-up rounds. Returns name -> seconds per round."""
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device) if device.type == "cuda" else None
    names = list(calls)
    for _ in range(2):
        for name in names:
            setup, fn = calls[name]
            fn(setup())
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    r = 0
    while r < max_reps and (r < min_reps or min(sum(t) for t in times.values()) < budget_s):
        for name in names[r % len(names):] + names[: r % len(names)]:
            setup, fn = calls[name]
            times[name].append(_once(device, fn, setup(), flush))
        r += 1
    return times


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by ``dst.copy_(src)`` on a buffer far larger than the caches."""
    n = (1024 if device.type == "cuda" else 128) * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    times = _timed(device, lambda: None, lambda _: dst.copy_(src), budget_s=0.5, min_reps=5)
    return 2 * n / statistics.median(times)


def _mode_call(fn: Callable, mode: str, pair: Callable) -> tuple[Callable, Callable]:
    """(setup, timed call) of ``fn`` in ``mode``; ``pair()`` hands out input pairs in rotation."""
    if mode == "fwd":
        return pair, lambda p: fn(*p)
    if mode == "bwd":
        return (lambda: (fn(*(p := pair())), p)), (lambda s: torch.autograd.grad(s[0], s[1]))
    return pair, lambda p: torch.autograd.grad(fn(*p), p)


def measure(device: torch.device, fn: Callable, rows: int, vocab: int, dtype: torch.dtype, mode: str,
            budget_s: float, n_inputs: int = 2) -> list[float]:
    """Seconds per call of one implementation alone (``sweep`` times them interleaved)."""
    pairs = _pairs(device, rows, vocab, dtype, n_inputs)
    turn = iter(range(10**9))
    setup, call = _mode_call(fn, mode, lambda: pairs[next(turn) % n_inputs])
    return _timed(device, setup, call, budget_s)


def _pairs(device, rows, vocab, dtype, n):
    # Rotate between input pairs so repeated calls do not find their inputs in cache.
    return [(torch.randn(rows, vocab, device=device).to(dtype).requires_grad_(),
             torch.randn(rows, vocab, device=device).to(dtype).requires_grad_()) for _ in range(n)]


def _value_and_grads(fn: Callable, a: torch.Tensor, b: torch.Tensor) -> tuple[float, tuple[torch.Tensor, ...]]:
    a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
    out = fn(a, b)
    return out.item(), tuple(g.float() for g in torch.autograd.grad(out, (a, b)))


def moved_bytes(rows: int, vocab: int, elem: int, mode: str) -> int:
    n = rows * vocab * elem
    return {"fwd": 2 * n, "bwd": 4 * n, "fwd+bwd": 6 * n}[mode]


def _frames_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def sweep(device: torch.device, dtypes: list[str], vocabs: list[int], rows_list: list[int], impls: list[str],
          modes: list[str], budget_s: float, max_elements: int, progress: Optional[Progress] = None) -> dict:
    available = implementations(device)
    unknown = set(impls) - set(available)
    if unknown:
        raise ValueError(f"unknown implementations {sorted(unknown)}; choose from {sorted(available)}")
    bw = copy_bandwidth(device)
    records, first_calls = [], []
    skipped = {name: why for name, (fn, why) in available.items() if fn is None and name in impls}
    runnable = [name for name in impls if available[name][0] is not None]
    shapes = [(d, v, r) for d in dtypes for v in vocabs for r in rows_list if r * v <= max_elements]
    if progress is not None:
        progress.add(len(shapes))
    for dtype_name, vocab, rows in shapes:
        dtype = DTYPES[dtype_name]
        a = torch.randn(rows, vocab, device=device).to(dtype)
        b = (a.float() + 0.1 * torch.randn_like(a, dtype=torch.float32)).to(dtype)
        want, want_grads = _value_and_grads(r3f_torch, a, b)
        for name in runnable:
            fn = available[name][0]
            # A wrong implementation must not get a time: value and (but for Liger, whose target side has
            # no gradient) both gradients against the PyTorch path. This is also the first call, timed: for
            # the compiled ones the compilation (none when an earlier shape's graph is reused).
            frames = _frames_compiled()
            sync(device)
            t0 = time.perf_counter()
            got, grads = _value_and_grads(fn, a, b)
            sync(device)
            first_calls.append(dict(impl=name, rows=rows, vocab=vocab, dtype=dtype_name,
                                    first_call_ms=(time.perf_counter() - t0) * 1e3,
                                    frames_compiled=_frames_compiled() - frames))
            bad = abs(got - want) > 1e-4 * abs(want) + 1e-7 * rows
            if name != "liger":
                bad = bad or any(float((g - w).abs().max()) > 2e-2 * float(w.abs().max()) + 1e-6
                                 for g, w in zip(grads, want_grads))
            if bad:
                raise AssertionError(f"{name} gives {got}, the PyTorch path {want} (or their gradients "
                                     f"differ) at {rows}x{vocab} {dtype_name}")
        pairs = _pairs(device, rows, vocab, dtype, 2)
        timings: dict[str, dict[str, list[float]]] = {}
        for mode in modes:
            turns = {name: iter(range(10**9)) for name in runnable}
            calls = {name: _mode_call(available[name][0], mode, lambda t=turns[name]: pairs[next(t) % 2])
                     for name in runnable}
            timings[mode] = interleaved(device, calls, budget_s)
        del pairs
        for name in runnable:
            # After the warm-up, so compilation does not count as the op's memory.
            peak = fwd_bwd_peak_bytes(device, available[name][0], a.clone().requires_grad_(), b.clone().requires_grad_())
            for mode in modes:
                times = timings[mode][name]
                med = statistics.median(times)
                q = statistics.quantiles(times, n=5) if len(times) >= 2 else [med] * 4
                gbps = moved_bytes(rows, vocab, a.element_size(), mode) / med / 1e9
                rec = dict(impl=name, mode=mode, rows=rows, vocab=vocab, dtype=dtype_name,
                           median_ms=med * 1e3, p20_ms=q[0] * 1e3, p80_ms=q[3] * 1e3, reps=len(times),
                           gbps=gbps, pct_copy_bw=100 * gbps * 1e9 / bw, peak_extra_bytes=peak,
                           peak_extra_over_input=peak / (rows * vocab * a.element_size()),
                           times_ms=[t * 1e3 for t in times])
                if "before" in timings[mode]:  # paired per round: load at that moment hits both
                    ratios = sorted(x / t for x, t in zip(timings[mode]["before"], times))
                    rec.update(speedup_vs_before=statistics.median(ratios), speedup_min=ratios[0],
                               speedup_max=ratios[-1])
                records.append(rec)
        for rec in records[-len(runnable) * len(modes):]:
            if rec["mode"] == modes[-1]:
                print(_row(rec), flush=True)
        if progress is not None:
            progress.step(f"{rows}x{vocab} {dtype_name}")
    return dict(copy_bandwidth_gbps=bw / 1e9, records=records, first_calls=first_calls, not_run=skipped)


# ------------------------------------------------------------------------------------------- reporting
def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = device_name(device)
    return dict(device=str(device), device_name=name, threads=torch.get_num_threads(), torch=torch.__version__,
                triton=triton_version, cuda=torch.version.cuda, python=platform.python_version(),
                cpus=os.cpu_count(), load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=" ".join(["python -m bench.sym_kl", *sys.argv[1:]]))


HEADER = (f"{'impl':<20} {'dtype':<8} {'rows':>7} {'V':>7} {'mode':<8} {'median ms':>10} {'p20-p80':>15} "
          f"{'vs before':>16} {'GB/s':>7} {'peak/input':>10}")


def fwd_bwd_peak_bytes(device: torch.device, fn: Callable, a: torch.Tensor, b: torch.Tensor) -> int:
    """Peak memory allocated during forward+backward beyond what existed before (gradients included)."""
    return peak_extra_bytes(device, lambda: torch.autograd.grad(fn(a, b), (a, b)))


def _row(r: dict) -> str:
    ratio = (f"{r['speedup_vs_before']:.2f}x [{r['speedup_min']:.1f}-{r['speedup_max']:.1f}]"
             if "speedup_vs_before" in r else "")
    return (f"{r['impl']:<20} {r['dtype']:<8} {r['rows']:>7} {r['vocab']:>7} {r['mode']:<8} {r['median_ms']:>10.2f} "
            f"{r['p20_ms']:>7.1f}-{r['p80_ms']:<7.1f} {ratio:>16} {r['gbps']:>7.2f} {r['peak_extra_over_input']:>10.2f}")


def table(result: dict, mode: str = "fwd+bwd") -> str:
    """A Markdown table of one mode: time, spread, paired ratio to ``before``, peak memory over one input."""
    lines = ["| dtype | rows x V | impl | median ms [p20–p80] | vs before: median [min–max] | peak extra / input |",
             "|---|---|---|---|---|---|"]
    for r in result["records"]:
        if r["mode"] != mode:
            continue
        ratio = (f"{r['speedup_vs_before']:.2f}× [{r['speedup_min']:.2f}–{r['speedup_max']:.2f}]"
                 if "speedup_vs_before" in r else "")
        lines.append(f"| {r['dtype']} | {r['rows']} × {r['vocab']} | {r['impl']} | {r['median_ms']:.1f} "
                     f"[{r['p20_ms']:.1f}–{r['p80_ms']:.1f}] | {ratio} | {r['peak_extra_over_input']:.2f} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Optional[Path]:
    """Effective bandwidth of forward+backward vs elements per input, one panel per dtype."""
    plt = pyplot()
    if plt is None:
        return None
    recs = [r for r in result["records"] if r["mode"] == "fwd+bwd"]
    dtypes = sorted({r["dtype"] for r in recs})
    if not recs:
        return None
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        for impl in sorted({r["impl"] for r in recs}):
            pts = sorted((r["rows"] * r["vocab"], r["gbps"]) for r in recs if r["impl"] == impl and r["dtype"] == dtype)
            if pts:
                ax.plot(*zip(*pts), "o-", label=impl, alpha=0.8)
        ax.axhline(result["copy_bandwidth_gbps"], color="grey", ls="--", label="copy bandwidth")
        ax.set(xscale="log", yscale="log", xlabel="rows x V", ylabel="effective GB/s (fwd+bwd)",
               title=f"symmetric KL, {dtype}, {result['env']['device_name']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.sym_kl", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="the reduced sweep python -m bench runs")
    ap.add_argument("--cpu-study", action="store_true", help="the committed CPU comparison (docs/benchmarks.md)")
    ap.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES))
    ap.add_argument("--vocab", nargs="+", type=int, default=None)
    ap.add_argument("--rows", nargs="+", type=int, default=None, help="row counts (default: per device)")
    ap.add_argument("--impls", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_IMPLS)}")
    ap.add_argument("--modes", nargs="+", default=None, choices=MODES)
    ap.add_argument("--budget", type=float, default=None, help="seconds of timing per implementation and mode")
    ap.add_argument("--max-elements", type=int, default=None, help="largest rows*V in the sweep")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's; 1 with --quick on CPU)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"JSON path (default {LOCAL_RESULTS.relative_to(RESULTS.parent.parent)}/sym_kl_<device>.json)")
    ap.add_argument("--save", action="store_true", help="write the committed bench/results/sym_kl_<device>.json")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    if args.save and args.out is not None:
        ap.error("--save writes the committed results; give either --save or --out")
    if args.quick and args.cpu_study:
        ap.error("--quick and --cpu-study are two different sweeps; give one")
    return args


def main(argv: Optional[list[str]] = None, progress: Optional[Progress] = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    kind = device.type
    preset = QUICK[kind] if args.quick else (CPU_STUDY if args.cpu_study else {})
    pick = lambda name, default: (getattr(args, name) if getattr(args, name) is not None  # noqa: E731
                                  else preset.get(name, default))
    threads = pick("threads", None)
    if threads is not None:
        torch.set_num_threads(threads)
    budget = pick("budget", 0.2 if kind == "cuda" else 0.05)
    print(HEADER)
    own = progress is None
    progress = progress or Progress()
    result = sweep(device, pick("dtypes", ["float32", "bfloat16"]), pick("vocab", list(VOCABS)),
                   pick("rows", list(ROWS[kind])), pick("impls", list(DEFAULT_IMPLS)), pick("modes", list(MODES)),
                   budget, pick("max_elements", MAX_ELEMENTS[kind]), progress)
    if own:
        progress.done()
    result["env"] = environment(device)
    for name, why in result["not_run"].items():
        print(f"not run: {name}: {why}")
    print(f"copy bandwidth: {result['copy_bandwidth_gbps']:.1f} GB/s on {result['env']['device_name']}")
    for fc in result["first_calls"]:
        if fc["frames_compiled"]:
            print(f"first call of {fc['impl']} at {fc['rows']}x{fc['vocab']} {fc['dtype']}: "
                  f"{fc['first_call_ms'] / 1e3:.1f} s ({fc['frames_compiled']} frame(s) compiled)")
    out = RESULTS / f"sym_kl_{kind}.json" if args.save else (args.out or LOCAL_RESULTS / f"sym_kl_{kind}.json")
    save(result, out, None if args.no_plot else plot)
    return result


if __name__ == "__main__":
    main()
