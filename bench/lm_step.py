"""One training step of a causal LM with a large vocabulary: peak memory and time of standard fine-tuning,
R3F on the logits path and R3F through the fused linear head + CE + symmetric KL (``linear_r3f_loss``).

Model: a tiny Llama (``--hidden`` 64, 2 layers) with the Llama-3 vocabulary, V = 128,256, so the head and
its logits dominate as they do at scale. The batch (``--batch`` x ``--seq``) has right padding on half the
rows and a prompt (labels -100) on every row; the KL counts the rows whose shifted label counts.

Methods, each with its own model copy (same seed, same initial weights) and its own AdamW:

* ``standard``         -- ``model(**batch, labels).loss.backward()``, ``step()`` (Hugging Face's causal-LM loss)
* ``r3f_logits``       -- ``RegularizedOptimizer(AdamW, model, method="r3f").step(closure, mask=...)`` as it is
  today: two full forwards (both with the model's loss), ``symmetric_kl`` on the logits, gradient through both
* ``r3f_fused``        -- ``RegularizedOptimizer(AdamW, model, method="r3f", fused_lm_head=True).step(closure)``
  with the same closure: the model runs without computing its logits or its loss, and ``linear_r3f_loss`` takes
  the two passes' hidden states and ``lm_head.weight`` (the KL's rows: those whose shifted label counts, as
  ``mask=`` above), gradient through both passes
* ``r3f_fused_nograd`` -- the same with ``noisy_grad=False`` (the noisy pass runs without a graph)

Memory: for each dtype of ``--memory-dtypes``, one step per method in a fresh set of models whose AdamW state
already exists (steady state), under the torch profiler's memory events (CPU) or the CUDA allocator's peak:
the peak bytes allocated during the step above those allocated before it, reported in bytes and as a
multiple of one bf16 logits tensor (rows x V x 2 bytes) and of one logits tensor of the model's dtype.
Also, in the timed dtype, the objective alone (hidden states -> loss, forward + backward): materialised logits (``F.linear`` x 2,
``F.cross_entropy`` on float32 logits, ``symmetric_kl``) vs ``linear_r3f_loss``, and the fused objective at
``--rows-factor`` times the rows, to show that its extra memory follows the chunk, not the rows.

Time (``--dtype``): ``--warmup`` untimed rounds then ``--steps`` timed rounds; each round runs every method
once on a new batch (shared by all methods), the order rotated every round; the objective alone is timed
the same way. Medians, spreads, paired ratios. The first round also checks that the fused and the logits
path compute the same CE and KL (a wrong implementation gets no time).

    python -m bench.lm_step                                   # float32 steps, float32 memory
    python -m bench.lm_step --threads 1 --memory-dtypes float32 bfloat16 --save   # the committed run
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # below 6 the CPU memory profile logs every start/stop

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from .common import device_name, peak_extra_bytes, pyplot, save, sync  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
METHODS = ("standard", "r3f_logits", "r3f_fused", "r3f_fused_nograd")
OBJECTIVES = ("objective_logits", "objective_fused")
LIGER = "objective_liger_ce"  # Liger's fused linear cross-entropy alone (the floor; CUDA with liger-kernel)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.lm_step", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the timed steps")
    ap.add_argument("--memory-dtypes", nargs="*", default=None, choices=list(DTYPES),
                    help="dtypes whose step memory is measured (default: --dtype); none: skip")
    ap.add_argument("--steps", type=int, default=5, help="timed rounds (0: memory only)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: os.cpu_count())")
    ap.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: the library's rule)")
    ap.add_argument("--rows-factor", type=int, default=4,
                    help="the fused objective's memory is also measured at this many times the rows")
    ap.add_argument("--eps", type=float, default=1e-5)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--objective-only", action="store_true",
                    help="no model steps: the objective alone (hidden states -> loss), e.g. a real-size head on a "
                         "GPU: --hidden 4096 --batch 8 --seq 1024 --dtype bfloat16")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (a PNG is written beside it)")
    ap.add_argument("--save", action="store_true", help="write bench/results/lm_step_<device>.json/.png")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    for name in ("vocab", "hidden", "layers", "heads", "batch", "seq", "rows_factor"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.steps < 0 or args.warmup < 0:
        ap.error("--steps and --warmup must be >= 0")
    if args.memory_dtypes is None:
        args.memory_dtypes = [args.dtype]
    return args


# ------------------------------------------------------------------------------------------------- setup
def make_batch(args, device, seed: int) -> dict:
    """Random tokens; rows 0, 2, ... padded on the right (last seq/8 positions); a prompt of seq/8 tokens
    (labels -100) on every row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    attn = torch.ones(args.batch, args.seq, dtype=torch.long)
    pad = max(1, args.seq // 8)
    attn[::2, -pad:] = 0
    labels = ids.masked_fill(attn == 0, -100)
    labels[:, :pad] = -100
    shifted = torch.cat([labels[:, 1:], torch.full((args.batch, 1), -100)], 1)
    batch = dict(input_ids=ids, attention_mask=attn, labels=labels, kl_mask=shifted != -100)
    return {k: v.to(device) for k, v in batch.items()}


def make_model(args, device, dtype):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.heads, max_position_embeddings=args.seq)
    torch.manual_seed(args.seed)
    return transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype).train()


class Setup:
    """A method's model, optimizer and step function."""

    def __init__(self, method: str, args, device, dtype):
        from r3f_opt import RegularizedOptimizer

        self.method, self.args = method, args
        self.model = make_model(args, device, dtype)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr)
        self.inner = self.opt
        if method == "r3f_logits":
            self.opt = RegularizedOptimizer(self.inner, self.model, method="r3f", lam=args.lam, eps=args.eps,
                                            seed=args.seed)
        if method.startswith("r3f_fused"):
            self.opt = RegularizedOptimizer(self.inner, self.model, method="r3f", lam=args.lam, eps=args.eps,
                                            seed=args.seed, fused_lm_head=True, noisy_grad=method == "r3f_fused")
            self.opt.regularizer.fused.chunk_size = args.chunk_size

    def init_state(self) -> None:
        """Create AdamW's state without a forward (zero gradients): the step then runs in steady state."""
        for p in self.model.parameters():
            p.grad = torch.zeros_like(p)
        self.inner.step()
        self.inner.zero_grad(set_to_none=True)

    def step(self, batch: dict) -> tuple[float, float]:
        """One training step; returns (ce, kl) as tensors' values after the step (no sync inside it)."""
        m = self.model
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        self.opt.zero_grad(set_to_none=True)
        if self.method == "standard":
            loss = m(**inputs, labels=batch["labels"]).loss
            loss.backward()
            self.opt.step()
            return loss.detach(), None
        if self.method == "r3f_logits":
            res = self.opt.step(lambda: m(**inputs, labels=batch["labels"]), mask=batch["kl_mask"])
            return res.task_loss, res.sym_kl
        res = self.opt.step(lambda: m(**inputs, labels=batch["labels"]))  # fused: the KL's rows default to kl_mask's
        return res.task_loss, res.sym_kl


# ------------------------------------------------------------------------------------------- measuring


def objective_inputs(args, device, dtype, rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, args.hidden, generator=g)
    w = (torch.randn(args.vocab, args.hidden, generator=g) * 0.02).to(device, dtype).requires_grad_()
    hc = h.to(device, dtype).requires_grad_()
    hn = (h + 1e-2 * torch.randn(rows, args.hidden, generator=g)).to(device, dtype).requires_grad_()
    labels = torch.randint(0, args.vocab, (rows,), generator=g)
    labels[: rows // 8] = -100
    return hc, hn, w, labels.to(device)


def objective(name: str, chunk_size: Optional[int]) -> Callable:
    from r3f_opt import linear_r3f_loss, symmetric_kl

    def logits_path(hc, hn, w, labels):
        a, b = F.linear(hc, w), F.linear(hn, w)
        ce = F.cross_entropy(a.float(), labels)  # as Hugging Face's loss: float32 logits
        total = ce + symmetric_kl(a, b, mask=labels != -100)
        return torch.autograd.grad(total, (hc, hn, w)), ce.detach()

    def fused(hc, hn, w, labels):
        total, ce, _ = linear_r3f_loss(hc, hn, w, labels, chunk_size=chunk_size)
        return torch.autograd.grad(total, (hc, hn, w)), ce.detach()

    def liger_ce(hc, hn, w, labels):  # the clean pass's CE alone, through Liger's fused linear CE
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        ce = LigerFusedLinearCrossEntropyLoss()(w, hc, labels)
        return torch.autograd.grad(ce, (hc, w)), ce.detach()

    return {"objective_logits": logits_path, "objective_fused": fused, LIGER: liger_ce}[name]


@functools.lru_cache(maxsize=None)  # one import attempt per device, asked by memory, time and the report
def objectives_available(device) -> tuple[list[str], dict]:
    """The objectives this device can time, and why any other is not run."""
    if device.type != "cuda":
        return list(OBJECTIVES), {LIGER: "Liger's kernels need a CUDA GPU"}
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError as e:
        return list(OBJECTIVES), {LIGER: f"liger-kernel is not installed ({e})"}
    return [*OBJECTIVES, LIGER], {}


def measure_memory(args, device, dtype, objectives: bool = True) -> dict:
    rows = args.batch * args.seq
    bf16_logits = rows * args.vocab * 2
    own_logits = rows * args.vocab * dtype.itemsize
    out = {"rows": rows, "bf16_logits_bytes": bf16_logits, "dtype_logits_bytes": own_logits, "steps": {},
           "objective": {}}
    batch = make_batch(args, device, args.seed + 10**6)
    for method in args.methods:
        s = Setup(method, args, device, dtype)
        s.init_state()
        resident = _allocated(device)
        peak = peak_extra_bytes(device, lambda: s.step(batch))
        out["steps"][method] = dict(peak_extra_bytes=peak, x_bf16_logits=peak / bf16_logits,
                                    x_dtype_logits=peak / own_logits, resident_before_bytes=resident)
        print(f"  memory {dtype_name(dtype):<8} {method:<17} {peak / 2**20:9.1f} MiB = "
              f"{peak / bf16_logits:5.2f} x bf16 logits", flush=True)
        del s
    if not objectives:
        return out
    from r3f_opt.linear_kl import _dtypes, default_chunk_size

    names = [(n, 1) for n in objectives_available(device)[0]] + [("objective_fused", args.rows_factor)]
    for name, factor in names:
        n = rows * factor
        hc, hn, w, labels = objective_inputs(args, device, dtype, n, args.seed)
        gemm, math = _dtypes(device, hc, hn, w, None)
        chunk = args.chunk_size or default_chunk_size(n, args.vocab, device, math, gemm)
        chunk_bytes = chunk * args.vocab * (2 * math.itemsize + (gemm.itemsize if gemm != math else 0))
        fn = objective(name, args.chunk_size)
        peak = peak_extra_bytes(device, lambda: fn(hc, hn, w, labels))
        grads = 2 * hc.numel() * hc.element_size() + w.numel() * w.element_size()
        rec = dict(rows=n, peak_extra_bytes=peak, gradient_bytes=grads, x_bf16_logits=peak / (n * args.vocab * 2))
        if name == "objective_fused":
            rec.update(chunk_rows=chunk, chunk_bytes=chunk_bytes, working_set_bytes=peak - grads,
                       working_set_x_chunk=(peak - grads) / chunk_bytes,
                       working_set_x_chunk_logits_block=(peak - grads) / (chunk * args.vocab * 4))
        out["objective"][f"{name}@{n}"] = rec
        print(f"  memory {dtype_name(dtype):<8} {name + f' ({n} rows)':<30} {peak / 2**20:9.1f} MiB"
              + (f" = {rec['working_set_x_chunk']:.2f} chunks beyond its gradients" if "chunk_bytes" in rec else ""),
              flush=True)
    return out


def _allocated(device) -> Optional[int]:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_same_objective(first: dict) -> None:
    """The fused and the logits path must compute the same CE and KL on the same first batch (and the
    objectives alone the same CE)."""
    if "objective_logits" in first:
        ce0 = first["objective_logits"][0]
        for o in ("objective_fused", LIGER):
            if o in first and abs(first[o][0] - ce0) > 1e-2 * abs(ce0) + 1e-6:
                raise AssertionError(f"{o} computes CE {first[o][0]}; the logits path {ce0}")
    if "r3f_logits" not in first:
        return
    ce0, kl0 = first["r3f_logits"]
    for m in ("r3f_fused", "r3f_fused_nograd"):
        if m not in first:
            continue
        ce, kl = first[m]
        if abs(ce - ce0) > 1e-3 * abs(ce0) + 1e-6 or abs(kl - kl0) > 1e-2 * abs(kl0) + 1e-6:
            raise AssertionError(f"{m} computes CE {ce}, KL {kl}; the logits path CE {ce0}, KL {kl0}")


def time_steps(args, device, dtype) -> dict:
    setups = {m: Setup(m, args, device, dtype) for m in args.methods}
    objectives = {o: objective(o, args.chunk_size) for o in objectives_available(device)[0]}
    obj_in = objective_inputs(args, device, dtype, args.batch * args.seq, args.seed)
    names = list(args.methods) + list(objectives)
    times = {n: [] for n in names}
    values = {m: [] for m in args.methods}
    orders = []
    other_cpu = []
    t_start = time.perf_counter()
    for r in range(args.warmup + args.steps):
        batch = make_batch(args, device, args.seed + r)
        k = r % len(names)
        order = names[k:] + names[:k]
        timed = r >= args.warmup
        busy0, own0 = busy_cpu_s(), own_cpu_s()
        first = {}
        for n in order:
            sync(device)
            t0 = time.perf_counter()
            if n in setups:
                ce, kl = setups[n].step(batch)
            else:
                _, obj_ce = objectives[n](*obj_in)
            sync(device)
            dt = time.perf_counter() - t0
            if n in setups:
                first[n] = (float(ce), float(kl) if kl is not None else 0.0)
            else:
                first[n] = (float(obj_ce), None)
            if timed:
                times[n].append(dt)
        if r == 0:
            check_same_objective(first)
        busy1, own1 = busy_cpu_s(), own_cpu_s()
        other = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0) - (own1 - own0))
        if timed:
            orders.append(order)
            other_cpu.append(other)
            for m in args.methods:
                values[m].append(first[m])
        label = "warmup" if not timed else f"round {r - args.warmup + 1}/{args.steps}"
        note = "" if other is None else f", other processes used {other:.1f} CPU-s"
        print(f"  [{label}] {time.perf_counter() - t_start:7.1f}s elapsed{note}", file=sys.stderr, flush=True)
    summary = {}
    for n in names:
        xs = times[n]
        if not xs:
            continue
        base = times["standard"] if n in setups and "standard" in times else None
        rec = dict(median_s=statistics.median(xs), min_s=min(xs), max_s=max(xs), q1_s=quartiles(xs)[0],
                   q3_s=quartiles(xs)[1])
        if base:
            rec["paired_ratio_to_standard"] = statistics.median(a / b for a, b in zip(xs, base))
        if n.startswith("r3f_fused") and "r3f_logits" in times:
            rec["paired_ratio_to_r3f_logits"] = statistics.median(a / b for a, b in zip(xs, times["r3f_logits"]))
        if n in ("objective_fused", LIGER):
            rec["paired_ratio_to_objective_logits"] = statistics.median(
                a / b for a, b in zip(xs, times["objective_logits"]))
        if n == "objective_fused" and LIGER in times:
            rec["paired_ratio_to_liger_ce"] = statistics.median(a / b for a, b in zip(xs, times[LIGER]))
        summary[n] = rec
    return dict(summary=summary, raw_times_s=times, round_orders=orders, other_processes_cpu_s_per_round=other_cpu,
                ce_kl_per_round=values, total_wall_s=time.perf_counter() - t_start)


def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def busy_cpu_s() -> Optional[float]:
    """Busy CPU seconds of the whole machine since boot (/proc/stat), for a contention check."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


# ------------------------------------------------------------------------------------------- reporting
def environment(device, command: str) -> dict:
    import transformers

    import r3f_opt

    name = device_name(device)
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
        commit = rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if rev.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return dict(device=str(device), device_name=name, cpu_count=os.cpu_count(), threads=torch.get_num_threads(),
                torch=torch.__version__, transformers=transformers.__version__, r3f_opt=r3f_opt.__version__,
                cuda=torch.version.cuda, python=platform.python_version(), platform=platform.platform(),
                git_commit=commit, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=command, loadavg=os.getloadavg() if hasattr(os, "getloadavg") else None)


def targets(result: dict) -> dict:
    """The issue's targets, evaluated on this run's numbers (None where not measured)."""
    out = {}
    for dt, mem in result.get("memory", {}).items():
        st = mem["steps"]
        if "standard" in st and "r3f_fused" in st:
            ratio = st["r3f_fused"]["peak_extra_bytes"] / st["standard"]["peak_extra_bytes"]
            out[f"r3f_fused_peak_le_1.3x_standard[{dt}]"] = dict(value=ratio, met=ratio <= 1.3)
        fused = [v for k, v in mem["objective"].items() if k.startswith("objective_fused")]
        if fused:
            worst = max(v["working_set_x_chunk"] for v in fused)
            out[f"fused_objective_extra_le_2_chunks[{dt}]"] = dict(
                value=worst, rows=[v["rows"] for v in fused], met=worst <= 2.0,
                unit="chunk = the per-chunk budget of default_chunk_size (2 float32 chunk x V blocks, + 1 bf16 for bf16 GEMMs)")
            worst = max(v["working_set_x_chunk_logits_block"] for v in fused)
            out[f"fused_objective_extra_le_2_chunk_logits_blocks[{dt}]"] = dict(
                value=worst, rows=[v["rows"] for v in fused], met=worst <= 2.0,
                unit="one float32 chunk x V logits block (the stricter reading of 'chunk size')")
    summ = result.get("time", {}).get("summary", {})
    if "r3f_fused" in summ and "paired_ratio_to_r3f_logits" in summ["r3f_fused"]:
        v = summ["r3f_fused"]["paired_ratio_to_r3f_logits"]
        out["r3f_fused_step_time_le_1.2x_logits_path"] = dict(value=v, met=v <= 1.2)
    if "objective_fused" in summ:
        v = summ["objective_fused"]["paired_ratio_to_objective_logits"]
        out["fused_objective_time_le_1.2x_logits_objective"] = dict(value=v, met=v <= 1.2)
    return out


def print_tables(result: dict) -> None:
    cfg = result["config"]
    print(f"\nLM step, tiny Llama (hidden {cfg['hidden']}, {cfg['layers']} layers), V = {cfg['vocab']}, batch "
          f"{cfg['batch']} x seq {cfg['seq']} = {cfg['batch'] * cfg['seq']} rows, {result['env']['device_name']}, "
          f"{result['env']['threads']} threads\n")
    for dt, mem in result.get("memory", {}).items():
        print(f"Peak memory of one step beyond what was allocated before it ({dt} model); one bf16 logits tensor "
              f"= {mem['bf16_logits_bytes'] / 2**20:.1f} MiB\n")
        print("| method | peak MiB | x bf16 logits | x standard |")
        print("|---|---|---|---|")
        base = mem["steps"].get("standard", {}).get("peak_extra_bytes")
        for m, r in mem["steps"].items():
            rel = f"{r['peak_extra_bytes'] / base:.2f}" if base else "-"
            print(f"| {m} | {r['peak_extra_bytes'] / 2**20:.1f} | {r['x_bf16_logits']:.2f} | {rel} |")
        if mem["objective"]:
            print("\n| objective alone (fwd+bwd) | rows | peak MiB | x bf16 logits | beyond its gradients, in chunks |")
            print("|---|---|---|---|---|")
        for k, r in mem["objective"].items():
            chunks = f"{r['working_set_x_chunk']:.2f} (chunk {r['chunk_rows']} rows)" if "chunk_rows" in r else "-"
            print(f"| {k.split('@')[0]} | {r['rows']} | {r['peak_extra_bytes'] / 2**20:.1f} | {r['x_bf16_logits']:.2f} | {chunks} |")
        print()
    tm = result.get("time")
    if tm and tm["summary"]:
        print(f"Time per step ({cfg['dtype']}), {cfg['steps']} rounds after {cfg['warmup']} warmup\n")
        print("| method | median s | IQR s | paired ratio to standard | paired ratio to the logits path |")
        print("|---|---|---|---|---|")
        for n, s in tm["summary"].items():
            std = s.get("paired_ratio_to_standard")
            lp = s.get("paired_ratio_to_r3f_logits", s.get("paired_ratio_to_objective_logits"))
            print(f"| {n} | {s['median_s']:.3f} | {s['q1_s']:.3f}-{s['q3_s']:.3f} | "
                  f"{f'{std:.2f}x' if std else '-'} | {f'{lp:.2f}x' if lp else '-'} |")
        fused = tm["summary"].get("objective_fused", {})
        if "paired_ratio_to_liger_ce" in fused:
            print(f"\nobjective_fused (CE + KL_S, both passes) / Liger's fused linear CE alone (one pass, the floor): "
                  f"{fused['paired_ratio_to_liger_ce']:.2f}x")
        oc = [x for x in tm["other_processes_cpu_s_per_round"] if x is not None]
        if oc:
            print(f"\nother processes' CPU during the timed rounds: {sum(oc):.1f} CPU-s in {len(oc)} rounds "
                  f"(~0 means no contention)")
    for name, why in result.get("not_run", {}).items():
        print(f"not run: {name}: {why}")
    print("\nTargets (issue 16):")
    for k, v in result["targets"].items():
        print(f"  {k}: {v['value']:.3f} -> {'met' if v['met'] else 'NOT met'}")


def plot(result: dict, path: Path) -> Optional[Path]:
    plt = pyplot()
    if plt is None:
        return None
    mem = result.get("memory", {})
    summ = result.get("time", {}).get("summary", {})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    ax = axes[0]
    methods = result["config"]["methods"]
    width = 0.8 / max(len(mem), 1)
    for i, (dt, m) in enumerate(mem.items()):
        xs = [j + i * width for j in range(len(methods))]
        ax.bar(xs, [m["steps"][k]["x_bf16_logits"] for k in methods], width, label=f"{dt} model")
    ax.set_xticks([j + width * (len(mem) - 1) / 2 for j in range(len(methods))], methods, rotation=15)
    ax.set(ylabel="peak step memory / one bf16 logits tensor", title=f"V = {result['config']['vocab']}, "
           f"{result['config']['batch'] * result['config']['seq']} rows")
    ax.legend(fontsize=8)
    ax = axes[1]
    names = [n for n in summ]
    if names:
        med = [summ[n]["median_s"] for n in names]
        err = [[summ[n]["median_s"] - summ[n]["q1_s"] for n in names], [summ[n]["q3_s"] - summ[n]["median_s"] for n in names]]
        ax.bar(range(len(names)), med, yerr=err, color="tab:gray")
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set(ylabel="seconds (median, IQR)", title=f"time, {result['config']['dtype']}, {result['env']['device_name']}, "
               f"{result['env']['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    if args.objective_only:
        args.methods = []
    command = shlex.join(["python", "-m", "bench.lm_step", *(sys.argv[1:] if argv is None else argv)])
    import transformers

    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    result = dict(benchmark="lm_step", description=__doc__.split("\n\n")[0], config=dict(
        vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads, batch=args.batch, seq=args.seq,
        dtype=args.dtype, memory_dtypes=args.memory_dtypes, steps=args.steps, warmup=args.warmup, eps=args.eps,
        lam=args.lam, lr=args.lr, seed=args.seed, chunk_size=args.chunk_size, rows_factor=args.rows_factor,
        methods=list(args.methods), objective_only=args.objective_only), env=environment(device, command),
        not_run=objectives_available(device)[1])
    with warnings.catch_warnings():
        # bf16 embeddings cannot hold noise of scale 1e-5 (EmbeddingNoise warns): irrelevant to memory and time
        warnings.filterwarnings("ignore", message=".*cannot represent noise.*")
        result["memory"] = {}
        for dt in args.memory_dtypes:  # the objective alone: in the timed dtype (16-bit CPU GEMMs are slow)
            result["memory"][dt] = measure_memory(args, device, DTYPES[dt], objectives=dt == args.dtype)
        if args.steps:
            result["time"] = time_steps(args, device, DTYPES[args.dtype])
    result["targets"] = targets(result)
    out = RESULTS / f"lm_step_{device.type}.json" if args.save else args.out
    print_tables(result)
    if out is not None:
        print()
        save(result, out, None if args.no_plot else plot)
    return result


if __name__ == "__main__":
    main()
