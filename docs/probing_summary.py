"""Headline tables of docs/probing.md from r3f-probe's JSON files (the full tables are r3f-probe's own .md).

    python docs/probing_summary.py docs/probing
"""
import json
import statistics
import sys
from pathlib import Path

from r3f_opt.experiments.glue import TASKS

METHODS = ("standard", "r3f", "r4f")  # those present in a file are shown


def ms(vals: list) -> str:
    return f"{statistics.fmean(vals):.3f} ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"


def score(row: dict, task: str) -> float:
    return row["probes"][task][TASKS[task].primary_metric]


def table(header: list, lines: list) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(cells) + " |" for cells in lines]) + "\n"


def by(rows: list, method: str, **where) -> list:
    return [r for r in rows if r["method"] == method and all(r[k] == v for k, v in where.items())]


def generalization(res: dict) -> str:
    rows, tasks = res["rows"], list(res["rows"][0]["probes"])
    head = ["method"] + [f"{t} ({TASKS[t].primary_metric})" for t in tasks] + ["CKA to pretrained"]
    lines = [["pretrained"] + [f"{score(rows[0], t):.3f}" for t in tasks] + ["1"]]
    for m in [m for m in METHODS if by(rows, m)]:
        g = by(rows, m)
        lines.append([m] + [ms([score(r, t) for r in g]) for t in tasks] + [ms([r["cka_to_pretrained"] for r in g])])
    return table(head, lines)


def along_chain(res: dict, task: str, stages: list, value=None, name: str = "") -> str:
    """One row per method, one column per stage: mean ± std over seeds of the task's probe score (or of
    ``value(row)``)."""
    rows, value = res["rows"], value or (lambda r: score(r, task))
    labels = {r["stage"]: f"{r['stage']} ({r['after']})" for r in rows if r["method"] != "pretrained"}
    lines = [["pretrained", f"{value(rows[0]):.3f}"] + [""] * (len(stages) - 1)]
    lines += [[m] + [ms([value(r) for r in by(rows, m, stage=s)]) for s in stages] for m in METHODS if by(rows, m)]
    return table([f"{name or task + ' probe'} after stage"] + [labels[s] for s in stages], lines)


def retention(res: dict) -> str:
    rows, tasks = res["rows"], list(res["rows"][0]["probes"])
    n = len(res["arguments"]["chain"])
    ends = sorted({r["stage"] for r in rows if r["method"] != "pretrained" and r["stage"] % n == 0})
    out = []
    for t in tasks:
        out.append(f"**{t}** ({TASKS[t].primary_metric}), end of each cycle:\n\n"
                   + along_chain(res, t, ends))
    stages = sorted({r["stage"] for r in rows if r["method"] != "pretrained"})
    out.append("**Linear CKA to the pretrained features** (SST-2 dev probe set), every stage:\n\n"
               + along_chain(res, "", stages, lambda r: r["cka_to_pretrained"], "CKA"))
    # Every stage of every seed at once: the mean over the 12 stages per seed, then mean ± std over seeds.
    head = ["method"] + [f"{t}" for t in tasks] + ["CKA", "‖θ−θ₀‖/‖θ₀‖"]
    lines = []
    seeds = sorted({r["seed"] for r in rows if r["seed"] is not None})
    for m in [m for m in METHODS if by(rows, m)]:
        per_seed = lambda f: [statistics.fmean(f(r) for r in by(rows, m, seed=s)) for s in seeds]  # noqa: E731
        lines.append([m] + [ms(per_seed(lambda r, t=t: score(r, t))) for t in tasks]
                     + [ms(per_seed(lambda r: r["cka_to_pretrained"])), ms(per_seed(lambda r: r["param_distance"]["relative"]))])
    out.append("**All stages**: mean over the stages of a seed's chain, then mean ± std over seeds:\n\n" + table(head, lines))
    return "\n".join(out)


def stages(folder: Path) -> str:
    """From each fine-tuned stage's results.json: its own final dev accuracy (mean over seeds), and the
    median s/step, task loss and λ·KL_S term (averaged over a stage's steps) per method."""
    runs = [json.loads(f.read_text()) | {"stage": int(f.parent.name[:2])} for f in folder.glob("runs/*/*/results.json")]
    n = max(r["stage"] for r in runs)
    tasks = {r["stage"]: r["task"] for r in runs}
    acc = [[m] + [f"{statistics.fmean(r['final']['metrics'][r['primary_metric']] for r in runs if r['method'] == m and r['stage'] == s):.3f}"
                  for s in range(1, n + 1)] for m in METHODS]
    med = lambda m, f: statistics.median(f(r) for r in runs if r["method"] == m)  # noqa: E731
    cost = [[m, f"{med(m, lambda r: r['seconds_per_step']):.2f}",
             f"{med(m, lambda r: r['seconds_per_step']) / med('standard', lambda r: r['seconds_per_step']):.2f}×",
             f"{med(m, lambda r: r['evaluations'][-1]['train_task_loss']):.3f}",
             f"{med(m, lambda r: r['evaluations'][-1]['train_sym_kl']):.4f}"] for m in METHODS]
    return (table(["stage"] + [f"{s} {tasks[s]}" for s in range(1, n + 1)], acc) + "\n"
            + table(["method", "s/step", "× standard", "task loss", "sym KL"], cost))


def main(folder: str) -> None:
    d = Path(folder)
    print("## generalization\n\n" + generalization(json.loads((d / "generalization.json").read_text())))
    deg = json.loads((d / "degradation.json").read_text())
    print("## degradation\n\n" + along_chain(deg, deg["arguments"]["chain"][0], sorted(
        {r["stage"] for r in deg["rows"] if r["stage"]})))
    print("## retention\n\n" + retention(json.loads((d / "retention.json").read_text())))
    print("## stages\n\n" + stages(d))


if __name__ == "__main__":
    main(sys.argv[1])
