"""Do two arms differ in dev loss (mean cross-entropy of the final model)? (docs/results.md, exploratory)

Not an endpoint of the plan: the same statistics as its primary analysis (Welch's t, a 95 % percentile
bootstrap interval of the difference of means) applied to ``final.metrics.loss`` of each run, per task.

    python docs/study/dev_loss.py docs/results/study/main --arms standard r3f
"""
from __future__ import annotations

import argparse
import json
import statistics
from typing import Sequence

from r3f_opt.experiments.report import load_runs
from r3f_opt.experiments.stats import bootstrap_ci, welch


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="r3f-finetune output dirs (searched for results.json)")
    p.add_argument("--arms", nargs=2, required=True, metavar=("BASELINE", "ARM"), help="e.g. standard r3f")
    args = p.parse_args(argv)
    loss: dict = {}
    for r in load_runs(args.runs):
        loss.setdefault((r["task"], r["arm"]), []).append(r["final"]["metrics"]["loss"])
    for task in sorted({t for t, _ in loss}):
        base, arm = (loss.get((task, a), []) for a in args.arms)
        if len(base) < 2 or len(arm) < 2:
            continue
        w = welch(base, arm)  # w["diff"] = mean(arm) - mean(base)
        lo, hi = bootstrap_ci(base, arm)
        print(json.dumps({"task": task, "arms": args.arms, "n": [len(base), len(arm)],
                          "mean": [statistics.fmean(base), statistics.fmean(arm)],
                          "sd": [statistics.stdev(base), statistics.stdev(arm)],
                          "difference": w["diff"], "ci95": [lo, hi], "t": w["t"], "df": w["df"], "p": w["p"]}))


if __name__ == "__main__":
    main()
