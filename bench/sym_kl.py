"""Symmetric-KL microbenchmarks: the Triton kernel vs eager, torch.compile, the library's PyTorch path, Liger.

    python -m bench.sym_kl                      # default sweep on the device present (CUDA if any)
    python -m bench.sym_kl --vocab 50265 --rows 4096 --dtypes bfloat16 --impls r3f_triton compile

For each (implementation, rows x V, dtype) it times forward (a training forward: saves for backward),
backward alone (forward untimed before each repetition) and forward+backward, and reports the median,
the effective bandwidth (bytes that must move: forward reads a and b; backward reads them again and
writes both gradients) against the device's measured copy bandwidth, and the peak memory beyond the
inputs during forward+backward. JSON and a PNG go to bench/results/, a table to stdout.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import os

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the CPU memory profile otherwise logs every start/stop

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from .common import device_name, peak_extra_bytes, pyplot, save, sync  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VOCABS = (2, 3, 1024, 32000, 50265, 128256, 256000)
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Elements per input (rows * V) above which a shape is left out of the default sweep.
MAX_ELEMENTS = {"cuda": 2**28, "cpu": 2**21}
ROWS = {"cuda": (1, 64, 1024, 2048, 4096, 8192, 16384, 2**20), "cpu": (1, 16, 256, 4096)}


# ------------------------------------------------------------------------------------ implementations
def eager(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The reference formula (fairseq rxf): two kl_div over float32 log_softmax / softmax."""
    return F.kl_div(F.log_softmax(b, -1, dtype=torch.float32), F.softmax(a, -1, dtype=torch.float32),
                    reduction="sum") + F.kl_div(F.log_softmax(a, -1, dtype=torch.float32),
                                                F.softmax(b, -1, dtype=torch.float32), reduction="sum")


def r3f_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from r3f_opt.kl import _SymmetricKLRows

    return _SymmetricKLRows.apply(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), None).sum()


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
    impls["r3f_torch"] = (r3f_torch, "")
    impls["eager"] = (eager, "")
    # Static shapes on CUDA (the fastest kernels; one compilation per shape), dynamic ones on CPU so the
    # default sweep is not spent compiling. Raise the recompile limit: past it dynamo silently runs eager.
    torch._dynamo.config.recompile_limit = 4096
    impls["compile"] = (torch.compile(eager, dynamic=device.type != "cuda"), "")
    try:
        impls["liger"] = (_liger(), "") if device.type == "cuda" else (None, "Liger-Kernel needs CUDA")
    except ImportError:
        impls["liger"] = (None, "liger-kernel not installed")
    return impls


# ------------------------------------------------------------------------------------------ measuring
def _timed(device: torch.device, setup: Callable, fn: Callable, budget_s: float, min_reps: int = 5,
           max_reps: int = 100) -> list[float]:
    """Seconds per call of ``fn(setup())``, ``setup`` untimed; L2 flushed before each call on CUDA."""
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device) if device.type == "cuda" else None
    for _ in range(2):  # warm-up (and compilation)
        fn(setup())
    sync(device)
    times: list[float] = []
    while len(times) < max_reps and (len(times) < min_reps or sum(times) < budget_s):
        state = setup()
        if flush is not None:
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(state)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn(state)
            times.append(time.perf_counter() - t0)
    return times


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by ``dst.copy_(src)`` on a buffer far larger than the caches."""
    n = (1024 if device.type == "cuda" else 128) * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    times = _timed(device, lambda: None, lambda _: dst.copy_(src), budget_s=0.5, min_reps=5)
    return 2 * n / statistics.median(times)




def measure(device: torch.device, fn: Callable, rows: int, vocab: int, dtype: torch.dtype, mode: str,
            budget_s: float, n_inputs: int = 2) -> list[float]:
    # Rotate between input pairs so repeated calls do not find their inputs in cache.
    pairs = [(torch.randn(rows, vocab, device=device).to(dtype).requires_grad_(),
              torch.randn(rows, vocab, device=device).to(dtype).requires_grad_()) for _ in range(n_inputs)]
    turn = iter(range(10**9))

    def pair():
        return pairs[next(turn) % n_inputs]

    if mode == "fwd":
        return _timed(device, pair, lambda p: fn(*p), budget_s)
    if mode == "bwd":
        return _timed(device, lambda: (fn(*(p := pair())), p), lambda s: torch.autograd.grad(s[0], s[1]), budget_s)
    return _timed(device, pair, lambda p: torch.autograd.grad(fn(*p), p), budget_s)


def _value_and_grads(fn: Callable, a: torch.Tensor, b: torch.Tensor) -> tuple[float, tuple[torch.Tensor, ...]]:
    a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
    out = fn(a, b)
    return out.item(), tuple(g.float() for g in torch.autograd.grad(out, (a, b)))


def moved_bytes(rows: int, vocab: int, elem: int, mode: str) -> int:
    n = rows * vocab * elem
    return {"fwd": 2 * n, "bwd": 4 * n, "fwd+bwd": 6 * n}[mode]


def sweep(device: torch.device, dtypes: list[str], vocabs: list[int], rows_list: list[int], impls: list[str],
          modes: list[str], budget_s: float, max_elements: int) -> dict:
    available = implementations(device)
    unknown = set(impls) - set(available)
    if unknown:
        raise ValueError(f"unknown implementations {sorted(unknown)}; choose from {sorted(available)}")
    bw = copy_bandwidth(device)
    records, skipped = [], {name: why for name, (fn, why) in available.items() if fn is None and name in impls}
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for vocab in vocabs:
            for rows in rows_list:
                if rows * vocab > max_elements:
                    continue
                a = torch.randn(rows, vocab, device=device).to(dtype)
                b = (a.float() + 0.1 * torch.randn_like(a, dtype=torch.float32)).to(dtype)
                want, want_grads = _value_and_grads(r3f_torch, a, b)
                for name in impls:
                    fn = available[name][0]
                    if fn is None:
                        continue
                    # A wrong implementation must not get a time: value and (but for Liger, whose target
                    # side has no gradient) both gradients against the PyTorch path.
                    got, grads = _value_and_grads(fn, a, b)
                    bad = abs(got - want) > 1e-4 * abs(want) + 1e-7 * rows
                    if name != "liger":
                        bad = bad or any(float((g - w).abs().max()) > 2e-2 * float(w.abs().max()) + 1e-6
                                         for g, w in zip(grads, want_grads))
                    if bad:
                        raise AssertionError(f"{name} gives {got}, the PyTorch path {want} (or their gradients "
                                             f"differ) at {rows}x{vocab} {dtype_name}")
                    timings = {mode: measure(device, fn, rows, vocab, dtype, mode, budget_s) for mode in modes}
                    # After the timings' warm-up, so compilation does not count as the op's memory.
                    peak = fwd_bwd_peak_bytes(device, fn, a.clone().requires_grad_(), b.clone().requires_grad_())
                    for mode, times in timings.items():
                        med = statistics.median(times)
                        q = statistics.quantiles(times, n=5) if len(times) >= 2 else [med] * 4
                        gbps = moved_bytes(rows, vocab, a.element_size(), mode) / med / 1e9
                        records.append(dict(
                            impl=name, mode=mode, rows=rows, vocab=vocab, dtype=dtype_name,
                            median_ms=med * 1e3, p20_ms=q[0] * 1e3, p80_ms=q[3] * 1e3, reps=len(times),
                            gbps=gbps, pct_copy_bw=100 * gbps * 1e9 / bw, peak_extra_bytes=peak,
                            peak_extra_over_input=peak / (rows * vocab * a.element_size()),
                        ))
                    print(_row(records[-1]), flush=True)
    return dict(copy_bandwidth_gbps=bw / 1e9, records=records, not_run=skipped)


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
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=" ".join(["python -m bench.sym_kl", *sys.argv[1:]]))


HEADER = f"{'impl':<11} {'dtype':<8} {'rows':>7} {'V':>7} {'mode':<8} {'median ms':>10} {'GB/s':>8} {'%copy':>6} {'peak/input':>10}"


def fwd_bwd_peak_bytes(device: torch.device, fn: Callable, a: torch.Tensor, b: torch.Tensor) -> int:
    """Peak memory allocated during forward+backward beyond what existed before (gradients included)."""
    return peak_extra_bytes(device, lambda: torch.autograd.grad(fn(a, b), (a, b)))


def _row(r: dict) -> str:
    return (f"{r['impl']:<11} {r['dtype']:<8} {r['rows']:>7} {r['vocab']:>7} {r['mode']:<8} {r['median_ms']:>10.3f} "
            f"{r['gbps']:>8.2f} {r['pct_copy_bw']:>6.1f} {r['peak_extra_over_input']:>10.2f}")


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


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.sym_kl", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    ap.add_argument("--vocab", nargs="+", type=int, default=list(VOCABS))
    ap.add_argument("--rows", nargs="+", type=int, default=None, help="row counts (default: per device)")
    ap.add_argument("--impls", nargs="+", default=["r3f_triton", "r3f_torch", "eager", "compile", "liger"])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--budget", type=float, default=None, help="seconds of timing per measurement")
    ap.add_argument("--max-elements", type=int, default=None, help="largest rows*V in the sweep")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/sym_kl_<device>.json)")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    kind = device.type
    budget = args.budget if args.budget is not None else (0.2 if kind == "cuda" else 0.05)
    print(HEADER)
    result = sweep(device, args.dtypes, args.vocab, args.rows or list(ROWS[kind]), args.impls, args.modes, budget,
                   args.max_elements or MAX_ELEMENTS[kind])
    result["env"] = environment(device)
    for name, why in result["not_run"].items():
        print(f"not run: {name}: {why}")
    print(f"copy bandwidth: {result['copy_bandwidth_gbps']:.1f} GB/s on {result['env']['device_name']}")
    save(result, args.out or RESULTS / f"sym_kl_{kind}.json", None if args.no_plot else plot)
    return result


if __name__ == "__main__":
    main()
