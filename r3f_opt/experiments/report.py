"""r3f-report: aggregate r3f-finetune runs across seeds and methods into a Markdown table and a PNG plot.

    r3f-report runs/ --output-dir docs/        # every results.json under runs/

Per task, metric and arm: the number of seeds, median, mean ± sample std and max (the paper reports the
median and max over seeds), and the measured seconds per training step; then every arm against a baseline
arm (default ``standard``). An arm is a method with its own settings: runs of one method whose settings (lam,
eps, same_dropout, ...) differ from r3f-finetune's defaults are their own arm, named after the difference,
e.g. ``r3f (eps=0)``, so an ablation sits beside the main arms:

    r3f-report study/main study/ablation --seeds 11-15 --baseline r3f --primary mrpc=f1   # against r3f, seeds 11-15

Runs are never pooled across budgets (a task whose runs differ in lr, epochs, data, ... gets no comparison), and
the report says which seeds each arm has, where they differ, and which run folders have no results.json yet.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import statistics
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

from . import stats
from .data import FINGERPRINTS, LATER_KEYS, atomic_write, fingerprint
from .glue import TASKS, majority_baseline

__all__ = ["main", "load_runs", "unfinished", "arm", "summarize", "compare", "seed_notes", "comparison_markdown",
           "markdown_table", "baselines", "plot"]

METHOD_ORDER = ("standard", "r3f", "r4f", "rdrop", "smart", "freelb")
# Hyper-parameters that make up a run's budget: the paper's rule is that every method gets the same.
BUDGET_KEYS = ("model", "train_file", "eval_file", "lr", "weight_decay", "fused_adamw", "warmup_ratio", "batch_size",
               "max_length", "epochs", "max_steps", "max_grad_norm", "max_train_examples", "max_eval_examples",
               "reinit_head")

METHOD_KEYS = ("lam", "eps", "noise", "noise_scale", "noisy_grad", "same_dropout", "method_kwargs")


class ReportError(ValueError):
    """A results file that cannot be aggregated."""


def load_runs(paths: Sequence[str]) -> list[dict]:
    """The results.json files at ``paths`` (files, or folders searched recursively), each with ``_path``."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files.extend(sorted(p.rglob("results.json")))
        else:
            raise ReportError(f"{p}: no such file or folder")
    files = list(dict.fromkeys(f.resolve() for f in files))
    if not files:
        raise ReportError(f"no results.json under {list(paths)}; pass r3f-finetune output dirs")
    runs, seen = [], {}
    for f in files:
        try:
            run = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ReportError(f"{f}: not a readable results.json ({e})")
        missing = [k for k in ("task", "method", "seed", "primary_metric", "final", "best") if k not in run] \
            if isinstance(run, dict) else ["everything"]
        if missing:
            raise ReportError(f"{f}: lacks {missing}; is it a results.json written by r3f-finetune?")
        _check_metrics(f, run)
        run["arm"] = arm(run)
        key = (run["task"], run["arm"], run["seed"])
        if key in seen:
            raise ReportError(f"{f} and {seen[key]} are both {key[0]} {key[1]} seed {key[2]}; pass each run once")
        seen[key] = f
        run["_path"] = str(f)
        runs.append(run)
    return runs


def unfinished(paths: Sequence[str]) -> list[str]:
    """Run folders under ``paths`` with a checkpoint but no results.json (a run stopped or still going)."""
    dirs = [Path(p) for p in paths if Path(p).is_dir()]
    found = (c.parent for d in dirs for c in d.rglob("checkpoint.pt"))
    return sorted(str(f) for f in found if not (f / "results.json").exists())


def _check_metrics(f: Path, run: dict) -> None:
    """Under ``final`` and ``best``, the task's primary metric is a finite number, and so is every other metric
    the run has (runs written before a secondary metric was added, e.g. CoLA's accuracy, lack it)."""
    task = TASKS.get(run["task"])
    if task is None:
        raise ReportError(f"{f}: unknown task {run['task']!r}; expected one of {sorted(TASKS)}")
    for which in ("final", "best"):
        metrics = run[which].get("metrics") if isinstance(run[which], dict) else None
        if not isinstance(metrics, dict):
            raise ReportError(f"{f}: '{which}' has no 'metrics'; is it a results.json written by r3f-finetune?")
        for name in dict.fromkeys([task.primary_metric, *metrics]):
            value = metrics.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ReportError(f"{f}: {which} metric {name!r} is {value!r}, not a finite number; re-run that "
                                  "run, or leave its folder out of the report")


@functools.lru_cache(maxsize=None)
def _defaults() -> dict:
    from .finetune import build_parser  # the CLI's defaults are the reference

    parser = build_parser()
    return {k: parser.get_default(k) for k in METHOD_KEYS}


def _setting(hp: dict, key: str):
    """A method setting as recorded, the value of its time where the run predates it (``LATER_KEYS``), or the
    default; an empty ``method_kwargs`` is no kwargs."""
    value = hp.get(key, LATER_KEYS.get(key, _defaults()[key]))
    return None if key == "method_kwargs" and not value else value


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)


def arm(run: dict) -> str:
    """The run's arm: its method, followed by the method settings that differ from r3f-finetune's defaults,
    e.g. ``r3f (eps=0, same_dropout=True)``. ``standard`` ignores the settings (it uses none). A setting the
    run does not record (made before it existed) takes its value of that time (:data:`data.LATER_KEYS`)."""
    if run["method"] == "standard":
        return "standard"
    hp, defaults = run.get("hyperparameters", {}), _defaults()
    settings = {k: _setting(hp, k) for k in METHOD_KEYS}
    diff = [f"{k}={_show(v)}" for k, v in settings.items() if v != defaults[k]]
    return run["method"] + (f" ({', '.join(diff)})" if diff else "")


def _arms(runs: list[dict]) -> list[str]:
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    present = {(r["method"], r["arm"]) for r in runs}
    return [a for _, a in sorted(present, key=lambda ma: (rank.get(ma[0], len(rank)), ma[0], ma[1] != ma[0], ma[1]))]


def parse_seeds(spec: str) -> set[int]:
    """``"11-15"``, ``"1,3,5"`` or a mix (``"1-3,7"``) as a set of seeds."""
    seeds: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            seeds.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"seeds must look like 11-15 or 1,3,5 (or 1-3,7), got {spec!r}") from None
    return seeds


def _chosen(run: dict, which: str, primary: str) -> dict:
    """The metrics of a run at the end of training, or at its best evaluation by ``primary``: the run's own
    ``best`` when it chose by that metric, else its evaluation with the highest ``primary`` (the earliest of
    ties), so ``--metric best --primary mrpc=f1`` is the best F1, not F1 at the best accuracy."""
    if which == "final" or primary == run["primary_metric"]:
        return run[which]["metrics"]
    evals = [e["metrics"] for e in run.get("evaluations", []) if primary in e.get("metrics", {})]
    return max(evals, key=lambda m: m[primary]) if evals else run[which]["metrics"]


def summarize(runs: list[dict], which: str = "final", primary: Optional[dict] = None) -> list[dict]:
    """One row per (task, metric, arm): n, seeds, values, median, mean, std (sample; None for n=1), max,
    and the mean seconds per step. ``which``: "final" (end of training) or "best" (the evaluation with the best
    primary metric; every metric of the row is taken at it).
    Each task's primary metric comes first (the task's own, or ``primary[task]``, e.g. ``{"mrpc": "f1"}``)."""
    if which not in ("final", "best"):
        raise ValueError(f"which must be 'final' or 'best', got {which!r}")
    primary = primary or {}
    for task, metric in primary.items():
        if task in TASKS and metric not in TASKS[task].metrics:
            raise ValueError(f"{task} has no metric {metric!r}; it has {list(TASKS[task].metrics)}")
    groups: dict = defaultdict(list)
    for r in runs:
        groups[r["task"], r["arm"]].append(r)
    rows = []
    for task in sorted({r["task"] for r in runs}):
        task_runs = [r for r in runs if r["task"] == task]
        first = primary.get(task, task_runs[0]["primary_metric"])
        metrics = [first] + sorted({k for r in task_runs for k in r[which]["metrics"]} - {first, "loss"})
        chosen = {id(r): _chosen(r, which, first) for r in task_runs}
        for metric in metrics:
            for name in _arms(task_runs):
                group = sorted(groups[task, name], key=lambda r: r["seed"])
                vals = [chosen[id(r)][metric] for r in group if metric in chosen[id(r)]]
                if not vals:
                    continue
                sps = [r["seconds_per_step"] for r in group if "seconds_per_step" in r]
                official = all(r.get("data", {}).get("eval_is_full_official_dev", True) for r in group)
                rows.append({"task": task, "metric": metric, "arm": name, "method": group[0]["method"],
                             "n": len(vals),
                             "seeds": [r["seed"] for r in group if metric in chosen[id(r)]], "values": vals,
                             "official_dev": official,
                             "median": statistics.median(vals), "mean": statistics.fmean(vals),
                             "std": statistics.stdev(vals) if len(vals) > 1 else None, "max": max(vals),
                             "seconds_per_step": statistics.fmean(sps) if sps else None})
    return rows


def compare(rows: list[dict], baseline: str = "standard", skip: Sequence[str] = ()) -> list[dict]:
    """Every arm against the arm ``baseline`` on each task's primary metric: the difference of means, Welch's t,
    a 95 % bootstrap interval, Holm's correction over the tasks (per arm), and the seeds per arm needed
    to detect the paper's effect (:data:`stats.PAPER_EFFECT`) at the measured seed spread (the two arms'
    pooled sd). Tasks in ``skip`` (their runs differ in budget) get no comparison."""
    primary = _primary(rows)
    by = {(r["task"], r["metric"], r["arm"]): r for r in rows}
    out = []
    for (task, metric, name), r in by.items():
        base = by.get((task, metric, baseline))
        if name == baseline or metric != primary[task] or base is None or task in skip:
            continue
        test = stats.welch(base["values"], r["values"])
        if test is None:
            continue
        sd = math.sqrt(statistics.fmean([statistics.variance(base["values"]), statistics.variance(r["values"])]))
        effect = stats.PAPER_EFFECT.get(task)
        need = stats.seeds_needed(sd, effect) if effect else None
        mine, theirs = (dict(zip(x.get("seeds", ()), x["values"])) for x in (r, base))  # rows without seeds: none
        shared = sorted(set(mine) & set(theirs))
        out.append({"task": task, "metric": metric, "arm": name, "method": r["method"], "baseline": baseline,
                    "shared_seeds": shared, "same_score_seeds": [s for s in shared if mine[s] == theirs[s]],
                    "n": [base["n"], r["n"]], **test, "ci95": stats.bootstrap_ci(base["values"], r["values"]),
                    "paper_effect": effect, "seeds_needed": need,
                    "underpowered": need is not None and min(base["n"], r["n"]) < need})
    for name in {c["arm"] for c in out}:  # Holm over the tasks of this report, per comparison
        group = [c for c in out if c["arm"] == name]
        # a comparison without a test (no spread in either arm: p None) stays in the family as p = 1
        for c, adjusted in zip(group, stats.holm([1.0 if c["p"] is None else c["p"] for c in group])):
            c["p_holm"] = None if c["p"] is None else adjusted
    return out


def _p(p: Optional[float]) -> str:
    if p is None:
        return "– (no spread)"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def seed_notes(rows: list[dict], wanted: Optional[set] = None) -> list[str]:
    """Per task, the seeds of each arm (primary metric), and a note where the arms' seed sets differ or lack
    seeds of ``wanted`` (``--seeds``): a comparison is then on different or fewer seeds than planned."""
    notes = []
    for task, metric in _primary(rows).items():
        arms = {r["arm"]: set(r["seeds"]) for r in rows if r["task"] == task and r["metric"] == metric}
        every = set().union(*arms.values()) | (wanted or set())
        gaps = {a: sorted(every - s) for a, s in arms.items() if every - s}
        if gaps:
            notes.append(f"{task}: the arms' seeds differ: " + "; ".join(
                f"{a} lacks {', '.join(map(str, g))}" for a, g in gaps.items()))
    return notes


def _span(seeds: Sequence[int]) -> str:
    """1, 2, 3, 5 -> '1-3, 5'."""
    out, seeds = [], sorted(seeds)
    for s in seeds:
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def comparison_markdown(comparisons: list[dict]) -> str:
    lines = ["| task | metric | arm − baseline | Δ mean | 95 % bootstrap CI | Welch t (df) | p | p, Holm | "
             "seeds/arm for the paper's effect |", "|---|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        df = "–" if c["df"] is None else f"{c['df']:.1f}"
        need = "–" if c["seeds_needed"] is None else (
            f"{c['seeds_needed']} (Δ {c['paper_effect']:.3f})" + (" ⚠ n too small" if c["underpowered"] else ""))
        lines.append(f"| {c['task']} | {c['metric']} | {c['arm']} − {c['baseline']} | {c['diff']:+.4f} | "
                     f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] | {c['t']:.2f} ({df}) | {_p(c['p'])} | "
                     f"{_p(c['p_holm'])} | {need} |")
    return "\n".join(lines)


def per_seed_markdown(rows: list[dict]) -> str:
    """Per task, the primary metric of every arm at every seed (a seed's runs share the head's initialisation
    and the data order, so a column that repeats another seed by seed is visible at a glance)."""
    parts = []
    for task, metric in _primary(rows).items():
        arms = [r for r in rows if r["task"] == task and r["metric"] == metric]
        seeds = sorted({s for r in arms for s in r["seeds"]})
        by_seed = [dict(zip(r["seeds"], r["values"])) for r in arms]
        lines = [f"| {task} {metric}, seed | " + " | ".join(r["arm"] for r in arms) + " |",
                 "|---" * (len(arms) + 1) + "|"]
        lines += [f"| {s} | " + " | ".join(f"{v[s]:.4f}" if s in v else "–" for v in by_seed) + " |" for s in seeds]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def add_prediction_differences(runs: list[dict], comparisons: list[dict]) -> None:
    """Per comparison, ``differing_predictions``: ``[{"seed", "differing"}]`` for each shared seed whose two
    runs both stored final per-example predictions of one eval set (``eval_examples`` long), ``differing``
    the number of examples the two models label differently; and ``identical_seeds``, those with none.
    How far apart two arms' models are, beyond what a metric shows."""
    final = {(r["task"], r["arm"], r["seed"]): r["final"].get("predictions") for r in runs}
    for c in comparisons:
        diffs, n = [], None
        for seed in c["shared_seeds"]:
            a, b = final.get((c["task"], c["arm"], seed)), final.get((c["task"], c["baseline"], seed))
            if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and n in (None, len(a)):
                diffs.append({"seed": seed, "differing": sum(x != y for x, y in zip(a, b))})
                n = len(a)
        c["differing_predictions"], c["eval_examples"] = diffs, n
        c["identical_seeds"] = [d["seed"] for d in diffs if d["differing"] == 0]


def predictions_markdown(comparisons: list[dict]) -> str:
    """The comparisons with stored predictions: eval examples labelled differently, per shared seed."""
    lines = ["| task | arm − baseline | seeds | examples labelled differently, per seed | of |", "|---|---|---|---|---|"]
    for c in comparisons:
        d = c.get("differing_predictions")
        if d:
            lines.append(f"| {c['task']} | {c['arm']} − {c['baseline']} | {_span([x['seed'] for x in d])} | "
                         f"{', '.join(str(x['differing']) for x in d)} | {c['eval_examples']} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def seed_disagreement(runs: list[dict], skip: Sequence[str] = ()) -> list[dict]:
    """Per task (not in ``skip``: runs of different budgets) and arm, over every pair of its seeds whose runs
    stored final predictions of one eval set: the number of eval examples the two models label differently
    (median, min, max): how much the seed alone moves an arm's model, the yardstick for an arm-to-arm
    difference at one seed."""
    groups: dict = defaultdict(list)
    for r in sorted(runs, key=lambda r: r["seed"]):
        p = r["final"].get("predictions")
        if isinstance(p, list) and r["task"] not in skip:
            groups[r["task"], r["arm"]].append(p)
    out = []
    for (task, name), preds in sorted(groups.items(), key=lambda kv: (kv[0][0], _arms(runs).index(kv[0][1]))):
        n = statistics.mode(len(p) for p in preds)  # the eval set most runs used; any other is left out
        counts = [sum(x != y for x, y in zip(a, b)) for a, b in itertools.combinations(preds, 2)
                  if len(a) == len(b) == n]
        if counts:
            out.append({"task": task, "arm": name, "pairs": len(counts), "eval_examples": n,
                        "median": statistics.median(counts), "min": min(counts), "max": max(counts)})
    return out


def disagreement_markdown(rows: list[dict]) -> str:
    lines = ["| task | arm | seed pairs | examples labelled differently: median (min–max) | of |", "|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['arm']} | {r['pairs']} | {r['median']:g} ({r['min']}–{r['max']}) | "
              f"{r['eval_examples']} |" for r in rows]
    return "\n".join(lines)


def identical_notes(comparisons: list[dict]) -> list[str]:
    """Where an arm's models label every eval example as the baseline's do at some shared seeds (from the
    stored predictions); without predictions, where it scored exactly the baseline's value (which on a small
    eval set can happen by chance, so it is said as no more than that)."""
    notes = []
    for c in comparisons:
        where = f"{{}} of {len(c['shared_seeds'])} shared seeds"
        if c.get("identical_seeds"):
            notes.append(f"{c['task']}: {c['arm']} and {c['baseline']} label every eval example alike at "
                         + where.format(len(c["identical_seeds"])) + f" ({_span(c['identical_seeds'])})")
        elif not c.get("differing_predictions") and c["same_score_seeds"]:
            notes.append(f"{c['task']}: {c['arm']} and {c['baseline']} scored the same {c['metric']} at "
                         + where.format(len(c["same_score_seeds"])) + f" ({_span(c['same_score_seeds'])}); "
                         "no stored predictions tell whether the models agree")
    return notes


def _primary(rows: list[dict]) -> dict:
    """Each task's primary metric in ``rows`` (summarize() lists it first)."""
    first: dict = {}
    for r in rows:
        first.setdefault(r["task"], r["metric"])
    return first


def budget_mismatches(runs: list[dict], which: str = "final") -> list[str]:
    """Runs that should not be compared, as messages: a task whose runs differ in budget (lr, steps, data,
    ...; with ``which="best"`` also how often they evaluated, as more evaluations raise the best score).
    (Runs of one method that differ in its own settings, lam, eps, ..., are different arms.)"""
    def differing(group: list[dict], keys: Sequence[str], what: str) -> list[str]:
        msgs = []
        for key in keys:
            values = {json.dumps(r.get("hyperparameters", {}).get(key, LATER_KEYS.get(key))) for r in group}
            if len(values) > 1:
                msgs.append(f"{what}: runs differ in {key} ({', '.join(sorted(values))})")
        return msgs

    out = []
    for task in sorted({r["task"] for r in runs}):
        task_runs = [r for r in runs if r["task"] == task]
        for key in BUDGET_KEYS:
            content = [_content(r, key) for r in task_runs] if key in FINGERPRINTS else [None]
            if None not in content:  # files by content: the same data reached by other paths is the same
                if len(set(content)) > 1:
                    paths = sorted({json.dumps(r.get("hyperparameters", {}).get(key)) for r in task_runs})
                    out.append(f"{task}: runs differ in {key} (its content; {', '.join(paths)})")
            else:  # a file recorded by neither fingerprint nor an existing path: by path as recorded
                out += differing(task_runs, [key], task)
        schedules = {json.dumps([e.get("step") for e in r.get("evaluations", [])]) for r in task_runs}
        if which == "best" and len(schedules) > 1:
            out.append(f"{task}: runs evaluated at different steps, which the best evaluation depends on "
                       "(--eval-every)")
    return out


_FINGERPRINT_CACHE: dict = {}


def _content(run: dict, key: str) -> Optional[str]:
    """The SHA-256 of a run's file ``key`` (model, train_file, eval_file): as recorded, else (a run made before
    r3f-finetune recorded it) that of the recorded path as it is now, if it exists; else None."""
    hp = run.get("hyperparameters", {})
    if hp.get(FINGERPRINTS[key]):
        return hp[FINGERPRINTS[key]]
    path = hp.get(key)
    if not isinstance(path, str) or not os.path.exists(path):
        return None
    real = os.path.realpath(path)
    files = [real] if os.path.isfile(real) else sorted(e.path for e in os.scandir(real) if e.is_file())
    key = (real, *((f, st.st_mtime_ns, st.st_size) for f in files for st in (os.stat(f),)))  # rewritten: a miss
    if key not in _FINGERPRINT_CACHE:
        _FINGERPRINT_CACHE[key] = fingerprint(real)
    return _FINGERPRINT_CACHE[key]


def markdown_table(rows: list[dict]) -> str:
    def f(x: Optional[float], digits: int = 4) -> str:
        return "–" if x is None else f"{x:.{digits}f}"

    lines = ["| task | metric | arm | seeds | median | mean ± std | max | s/step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        task = r["task"] + ("" if r.get("official_dev", True) else " †")
        lines.append(f"| {task} | {r['metric']} | {r['arm']} | {r['n']} | {f(r['median'])} | "
                     f"{f(r['mean'])} ± {f(r['std'])} | {f(r['max'])} | {f(r['seconds_per_step'], 3)} |")
    if not all(r.get("official_dev", True) for r in rows):
        lines.append("\n† not the full official GLUE dev set (a held-out slice of train, or a subset): not a "
                     "GLUE dev score.")
    return "\n".join(lines)


def baselines(runs: list[dict]) -> dict:
    """Per task, the majority-class baseline's metrics on the eval set (``{task: {metric: value}}``): from
    the runs' ``data.majority_baseline``, or, for runs written before it was recorded, from their train and
    eval files (the same subsets) where those files are readable here; tasks with neither are left out."""
    out: dict = {}
    for r in runs:
        if r["task"] in out:
            continue
        data = r.get("data", {})
        base = data.get("majority_baseline")
        if base is None:
            try:
                from .data import load_examples
                _, train_y = load_examples(data["train_file"], r["task"], data.get("n_train"))
                _, eval_y = load_examples(data["eval_file"], r["task"], data.get("n_eval"))
            except (KeyError, TypeError, OSError, ValueError):
                continue
            base = majority_baseline(r["task"], train_y, eval_y)
        out[r["task"]] = {k: v for k, v in base.items() if k != "label"}
    return out


def baselines_markdown(base: dict) -> str:
    return "Majority-class baseline on the eval set: " + "; ".join(
        f"{task} " + ", ".join(f"{m} {v:.4f}" for m, v in sorted(metrics.items())) for task, metrics in sorted(base.items()))


def plot(rows: list[dict], path: Path, title: str = "", base: Optional[dict] = None) -> None:
    """One panel per task and metric: each seed's value as a point, the mean per method as a bar with ± one
    sample std; the y-axis starts at the majority-class baseline (drawn dashed) where ``base`` has it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = base or {}
    panels = list(dict.fromkeys((r["task"], r["metric"]) for r in rows))
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (task, metric) in zip(axes.flat, panels):
        group = [r for r in rows if r["task"] == task and r["metric"] == metric]
        for x, r in enumerate(group):
            n = len(r["values"])
            xs = [x + (i - (n - 1) / 2) * 0.6 / max(n, 1) for i in range(n)]
            ax.scatter(xs, r["values"], s=14, color=f"C{x}", alpha=0.8, zorder=3)
            ax.hlines(r["mean"], x - 0.35, x + 0.35, color=f"C{x}", lw=2.5)
            if r["std"]:
                ax.errorbar(x, r["mean"], yerr=r["std"], color=f"C{x}", capsize=4, lw=1)
        floor = base.get(task, {}).get(metric)
        if floor is not None:
            ax.axhline(floor, color="gray", ls="--", lw=1, label="majority class")
            values = [v for r in group for v in r["values"]]
            lo, hi = min([floor, *values]), max([floor, *values])
            pad = 0.08 * (hi - lo) or 0.01
            ax.set_ylim(lo - pad, hi + pad)
        names = [r["arm"] for r in group]
        long = max(map(len, names)) > 8  # arms with settings, e.g. "r3f (eps=0)": slanted
        ax.set_xticks(range(len(group)), names, rotation=30 if long else 0, ha="right" if long else "center",
                      fontsize=8 if long else None)
        ax.set_xlim(-0.6, len(group) - 0.4)
        ax.set_title(f"{task}: {metric}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles = [h for ax in axes.flat for h in ax.get_lines() if h.get_label() == "majority class"][:1]
    if handles:  # below the panels, where it covers neither a title nor a point
        fig.legend(handles=handles, loc="lower right", fontsize=8, frameon=False)
    fig.suptitle(textwrap.fill(title or "points: seeds; bars: mean ± std", max(40, int(12 * fig.get_figwidth()))),
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.25 / fig.get_figheight() if handles else 0, 1, 1))
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="r3f-report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="r3f-finetune output dirs or results.json files (searched recursively)")
    p.add_argument("--output-dir", default=".", help="where report.md and report.png are written")
    p.add_argument("--metric", choices=("final", "best"), default="final",
                   help="final: the metrics at the end of training; best: the best evaluation of each run "
                   "(chosen on the eval set, so optimistic)")
    p.add_argument("--primary", action="append", default=[], metavar="TASK=METRIC",
                   help="the metric the comparison tests for TASK, e.g. mrpc=f1 (default: the task's first GLUE "
                   "metric); repeatable")
    p.add_argument("--baseline", metavar="ARM", help="the arm every other arm is compared with, e.g. r3f or "
                   "'r3f (eps=0)' (default: standard)")
    p.add_argument("--seeds", metavar="SEEDS", help="only these seeds, e.g. 11-15 or 1,3,5 (paired ablations)")
    p.add_argument("--no-plot", action="store_true", help="write the table only (no matplotlib needed)")
    args = p.parse_args(argv)
    primary = {}
    for item in args.primary:
        task, _, metric = item.partition("=")
        if task not in TASKS or metric not in TASKS[task].metrics:
            p.error(f"--primary {item!r}: expected TASK=METRIC with a GLUE task and one of its metrics, e.g. "
                    "mrpc=f1 or cola=mcc")
        primary[task] = metric
    try:
        seeds = parse_seeds(args.seeds) if args.seeds else None
    except ValueError as e:
        p.error(f"--seeds: {e}")
    try:
        runs = load_runs(args.runs)
    except ReportError as e:
        raise SystemExit(f"r3f-report: {e}")
    if seeds is not None:
        runs = [r for r in runs if r["seed"] in seeds]
        if not runs:
            raise SystemExit(f"r3f-report: no run has a seed in {args.seeds}")
    if args.baseline is not None and args.baseline not in {r["arm"] for r in runs}:
        raise SystemExit(f"r3f-report: no run of the baseline arm {args.baseline!r}; the arms are "
                         f"{_arms(runs)}: pass one with --baseline")
    rows = summarize(runs, args.metric, primary)
    warnings = budget_mismatches(runs, args.metric)
    mismatched = sorted({w.split(":")[0] for w in warnings})
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = baselines(runs)
    text = (f"{len(runs)} runs, {args.metric} metrics; median, mean ± sample std and max over seeds.\n\n"
            + markdown_table(rows) + "\n" + (f"\n{baselines_markdown(base)}.\n" if base else ""))
    first = _primary(rows)
    text += "\nSeeds per arm: " + "; ".join(
        f"{r['task']} {r['arm']} {_span(r['seeds'])}" for r in rows if r["metric"] == first[r["task"]]) + ".\n"
    notes = seed_notes(rows, seeds) + [f"--primary {t}={m}: no {t} run in this report, so it chose nothing"
                                       for t, m in primary.items() if t not in {r["task"] for r in runs}]
    left = unfinished(args.runs)
    if notes or left:
        text += "".join(f"\n⚠ {n}." for n in notes) + (
            f"\n⚠ Left out, no results.json yet (unfinished): {', '.join(left)}." if left else "") + "\n"
    baseline = args.baseline or "standard"
    comparisons = compare(rows, baseline, skip=mismatched)
    if args.metric == "final":
        add_prediction_differences(runs, comparisons)
    if comparisons:
        families = defaultdict(list)
        for c in comparisons:
            families[c["arm"]].append(c["task"])
        text += (f"\n**Each arm against {baseline}** ({args.metric} primary metric; Δ = arm − baseline; Welch's t, "
                 "95 % bootstrap interval of the difference of means; Holm over the tasks compared: "
                 + "; ".join(f"{a}: {', '.join(t)}" for a, t in families.items()) + "):\n\n"
                 + comparison_markdown(comparisons) + "\n")
        text += "".join(f"\n≡ {n}.\n" for n in identical_notes(comparisons))
        if any(c["underpowered"] for c in comparisons):
            text += ("\n⚠ Too few seeds to detect the paper's effect at this seed spread (80 % power, α = 0.05): "
                     "a non-significant difference here says little.\n")
    compared = {(c["arm"], c["task"]) for c in comparisons}
    missing = [(r["arm"], r["task"]) for r in rows if r["metric"] == first[r["task"]] and
               r["arm"] != baseline and r["task"] not in mismatched and (r["arm"], r["task"]) not in compared]
    if missing:
        partly = sorted({a for a, _ in compared} & {a for a, _ in missing})  # compared on other tasks only
        text += (f"\n⚠ Not compared with {baseline} (fewer than 2 seeds in an arm, or no such arm): "
                 + ", ".join(f"{a} on {t}" for a, t in missing)
                 + (f"; Holm covers fewer tasks for {', '.join(partly)}" if partly else "") + ".\n")
    text += f"\n**Per seed** ({args.metric} primary metric):\n\n" + per_seed_markdown(rows) + "\n"
    table = predictions_markdown(comparisons)
    if table:
        text += (f"\n**Predictions against {baseline}** (final models, at the seeds both arms share):\n\n"
                 + table + "\n")
    between = seed_disagreement(runs, skip=mismatched) if args.metric == "final" else []
    if between:
        text += ("\n**Predictions between the seeds of one arm** (final models, every pair of seeds):\n\n"
                 + disagreement_markdown(between) + "\n")
    if warnings:
        text += ("\n**Not comparable: settings differ** (no comparison for "
                 + ", ".join(mismatched) + ": runs of different budgets are not pooled)\n"
                 + "".join(f"- {w}\n" for w in warnings))
    atomic_write(out / "report.md", lambda p: p.write_text(text))
    atomic_write(out / "report.json", lambda p: p.write_text(json.dumps(rows, indent=2)))
    atomic_write(out / "comparison.json", lambda p: p.write_text(json.dumps(comparisons, indent=2)))
    if not args.no_plot:
        try:
            atomic_write(out / "report.png", lambda p: plot(rows, p, f"{args.metric} metrics: points = seeds, "
                                                                    "bars = mean ± std, dashed = majority class",
                                                                 base))
        except ImportError:
            raise SystemExit("r3f-report: the plot needs matplotlib: `pip install matplotlib`, or pass --no-plot")
    print(text, end="")
    print(f"-> {out / 'report.md'}, {out / 'report.json'}, {out / 'comparison.json'}"
          + ("" if args.no_plot else f", {out / 'report.png'}"))


if __name__ == "__main__":
    main()
