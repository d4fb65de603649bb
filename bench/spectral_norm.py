"""R4F head spectral normalisation: the fused Triton kernel vs torch's parametrization.

    python -m bench.spectral_norm                         # default heads on the device present
    python -m bench.spectral_norm --heads 2x768 1000x4096 --reps 50

One call = a training forward of the spectrally normalised weight (one power iteration, then W / sigma)
and the backward of ``<G, W_SN>``, float32 weight, from the same state for both implementations:

* ``torch``: ``torch.nn.utils.parametrizations.spectral_norm``;
* ``triton``: ``r3f_opt.spectral_norm`` (the fused one-program kernels, or the tiled multi-program path
  for heads above ``MAX_FUSED_ELEMENTS``; the ``path`` column says which).

Reported per head and implementation: the median latency (two rounds, to show the spread), the
launches per call, and the largest difference to torch's output and gradient (relative to their largest
entry). On CUDA the latency comes from ``triton.testing.do_bench`` (median, L2 flushed) and the launches
are the GPU kernels (and memsets/copies) ``torch.profiler`` records.

On CPU only correctness counts (the output says so): torch's parametrization is timed with the wall
clock and its top-level ATen operators are counted; the kernel runs in Triton's interpreter
(``TRITON_INTERPRET=1``, set here) only for heads of at most ``--cpu-kernel-max`` elements (the
interpreter is slow), with its Triton launch count and no timing; the largest default head
(32000x4096) is left out on CPU. JSON goes to ``bench/results/local/spectral_norm_<cpu|cuda>.json`` (not
tracked) unless ``--out PATH``; ``--save`` writes the committed ``bench/results/spectral_norm_<device>.json``.
``--quick`` (what ``python -m bench`` runs): the two small heads and 1000x4096, 5 timed calls per round.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

if not torch.cuda.is_available():  # before anything imports triton: the kernels' CPU path is the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch import nn  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from r3f_opt.spectral_norm import spectral_norm as fused_spectral_norm  # noqa: E402

from .common import LOCAL_RESULTS, RESULTS, Progress, sync  # noqa: E402

HEADS = ((2, 768), (3, 1024), (1000, 4096), (32000, 4096))
CPU_MAX_ELEMENTS = 2**23  # heads above this are left out of the CPU default (torch alone takes seconds)
IMPLS = ("torch", "triton")


@contextlib.contextmanager
def kernels(mode: str) -> Iterator[None]:
    """``R3F_KERNELS=mode`` for the duration."""
    old = os.environ.get("R3F_KERNELS")
    os.environ["R3F_KERNELS"] = mode
    try:
        yield
    finally:
        if old is None:
            del os.environ["R3F_KERNELS"]
        else:
            os.environ["R3F_KERNELS"] = old


def make_heads(C: int, H: int, device: torch.device, seed: int = 0) -> dict[str, nn.Module]:
    """torch's and our spectrally normalised ``Linear(H, C)``, in one state."""
    torch.manual_seed(seed)
    theirs = torch_spectral_norm(nn.Linear(H, C, bias=False, device=device))
    with kernels("torch"):  # registration's check forward: torch's maths, so both states stay equal
        ours = fused_spectral_norm(nn.Linear(H, C, bias=False, device=device))
    ours.load_state_dict(theirs.state_dict())
    return {"torch": theirs, "triton": ours}


def step(head: nn.Module, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One training forward + backward of ``<G, W_SN>``: (W_SN, dL/dW)."""
    original = head.parametrizations.weight.original
    original.grad = None
    w = head.weight
    w.backward(G)
    return w.detach(), original.grad


def latency_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median milliseconds per call."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=max(reps, 20), return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def launches(fn: Callable[[], object], device: torch.device) -> dict[str, int]:
    """Per call: GPU kernels (CUDA) or top-level ATen operators, and the Triton kernels we launched."""
    from r3f_opt.kernels import spectral_norm as K

    before = Counter(K.LAUNCHES)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    events = prof.events()
    out = {"triton_launches": sum((Counter(K.LAUNCHES) - before).values())}
    if device.type == "cuda":
        out["cuda_kernels"] = sum(1 for e in events if e.device_type == DeviceType.CUDA)
    out["aten_ops"] = sum(1 for e in events if e.name.startswith("aten::") and e.device_type == DeviceType.CPU
                          and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")))
    if device.type == "cpu" and out["triton_launches"]:
        out["aten_ops"] = None  # the interpreter's own tensor copies: not the kernel's cost
    return out


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def bench_head(C: int, H: int, device: torch.device, reps: int, rounds: int, cpu_kernel_max: int) -> list[dict]:
    from r3f_opt.kernels import spectral_norm as K

    heads = make_heads(C, H, device)
    G = torch.randn(C, H, device=device)
    run_kernel = device.type == "cuda" or C * H <= cpu_kernel_max
    results, ref = [], None
    for impl in IMPLS:
        row = dict(head=f"{C}x{H}", C=C, H=H, impl=impl)
        if impl == "triton":
            row["path"] = "fused" if K.fits_one_program(C, H) else "tiled"
            if not run_kernel:
                results.append(dict(row, skipped=f"CPU: the interpreter is too slow above {cpu_kernel_max} elements"))
                continue
        else:
            row["path"] = "torch"
        mode = "triton" if impl == "triton" else "torch"
        with kernels(mode):
            call = lambda: step(heads[impl], G)  # noqa: E731
            w, g = call()  # from the shared initial state: compare before timing moves u, v on
            if ref is None:
                ref = (w.clone(), g.clone())
            row.update(output_rel_diff=rel_diff(w, ref[0]), grad_rel_diff=rel_diff(g, ref[1]))
            row.update(launches(call, device))
            if device.type == "cuda" or impl == "torch":
                row["median_ms"] = [latency_ms(call, device, reps) for _ in range(rounds)]
                if device.type == "cuda":  # minimal traffic: fwd reads W, writes W_SN; bwd reads G, W, writes dW
                    row["gb_per_s_at_min_traffic"] = [5 * C * H * 4 / (t * 1e-3) / 1e9 for t in row["median_ms"]]
            else:
                row["median_ms"] = None
                row["note"] = "Triton interpreter (CPU): correctness only, no timing"
        results.append(row)
    return results


def parse_head(text: str) -> tuple[int, int]:
    try:
        C, H = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a head is CxH, e.g. 3x1024; got {text!r}") from None
    if C < 1 or H < 1:
        raise argparse.ArgumentTypeError(f"C and H must be >= 1, got {text!r}")
    return C, H


def main(argv: Optional[list[str]] = None, progress: Optional[Progress] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--heads", nargs="+", type=parse_head, default=None,
                    help="CxH heads (default: 2x768 3x1024 1000x4096 32000x4096; on CPU without the last)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per round (default: 100 CUDA, 10 CPU)")
    ap.add_argument("--rounds", type=int, default=2, help="timing rounds per implementation (spread)")
    ap.add_argument("--cpu-kernel-max", type=int, default=4096,
                    help="CPU: largest C*H the kernel runs on in the interpreter (default 4096)")
    ap.add_argument("--quick", action="store_true", help="the small heads and 1000x4096, fewer calls")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/local/spectral_norm_<device>.json)")
    ap.add_argument("--save", action="store_true", help="write the committed bench/results/spectral_norm_<device>.json")
    args = ap.parse_args(argv)
    if args.save and args.out is not None:
        ap.error("--save writes the committed results; give either --save or --out")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.type == "cuda"
    heads = args.heads or [h for h in HEADS if (on_cuda and not args.quick) or h[0] * h[1] <= CPU_MAX_ELEMENTS]
    reps = args.reps or (100 if on_cuda else (5 if args.quick else 10))
    if reps < 1 or args.rounds < 1:
        ap.error("--reps and --rounds must be >= 1")

    from bench.sym_kl import environment

    env = dict(environment(device), command=" ".join(["python -m bench.spectral_norm", *sys.argv[1:]]))
    note = ("CUDA: latency = triton.testing.do_bench median; launches = GPU kernels recorded by torch.profiler"
            if on_cuda else
            "CPU: only correctness counts. torch's path is timed (wall clock) and its top-level ATen ops "
            "counted; the Triton kernel runs in the interpreter (no timing) for heads up to "
            f"{args.cpu_kernel_max} elements. No GPU figures here.")
    print(note)
    rows = []
    own = progress is None
    progress = progress or Progress()
    progress.add(len(heads))
    for C, H in heads:
        rows += bench_head(C, H, device, reps, args.rounds, args.cpu_kernel_max)
        progress.step(f"spectral norm {C}x{H}")
    if own:
        progress.done()
    kernels_col = "GPU kernels" if on_cuda else "Triton launches"
    print(f"{'head':<11} {'impl':<7} {'path':<6} {'median ms (rounds)':<22} {kernels_col:>15} {'ATen ops':>8} "
          f"{'out diff':>9} {'grad diff':>9}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['head']:<11} {r['impl']:<7} {r['path']:<6} skipped: {r['skipped']}")
            continue
        ms = " / ".join(f"{t:.4f}" for t in r["median_ms"]) if r["median_ms"] else "(interpreter)"
        n = r.get("cuda_kernels", r["triton_launches"])
        aten = "-" if r["aten_ops"] is None else r["aten_ops"]
        print(f"{r['head']:<11} {r['impl']:<7} {r['path']:<6} {ms:<22} {n:>15} {aten:>8} "
              f"{r['output_rel_diff']:>9.1e} {r['grad_rel_diff']:>9.1e}")
    result = dict(environment=env, note=note, results=rows)
    out = RESULTS / f"spectral_norm_{device.type}.json" if args.save else (
        Path(args.out) if args.out else LOCAL_RESULTS / f"spectral_norm_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
