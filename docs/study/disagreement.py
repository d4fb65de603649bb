"""Do two arms differ in how much the seed moves their models? (docs/results.md, exploratory)

For each arm, the disagreement of two of its runs is the number of eval examples their final models label
differently; an arm's statistic is the mean over every pair of its seeds. The test compares two arms run at
the same seeds: under the null hypothesis the arm does not matter, so at each seed the two runs are
exchangeable, and swapping them at any subset of the seeds gives a statistic as likely as the observed one.
With n seeds that is 2^n relabellings, all enumerated (an exact two-sided p-value; its smallest possible
value is 2 / 2^n). Runs of one seed share the head's initialisation and the data order, which is why the
swap is within a seed and not across all runs.

    python docs/study/disagreement.py docs/results/study/main --task mrpc --arms standard r3f
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
from typing import Sequence

from r3f_opt.experiments.report import load_runs


def disagreement(a: Sequence[int], b: Sequence[int]) -> int:
    if len(a) != len(b):
        raise ValueError(f"predictions of {len(a)} and {len(b)} examples: not the same eval set")
    return sum(x != y for x, y in zip(a, b))


def mean_pairwise(preds: Sequence[Sequence[int]]) -> float:
    return statistics.fmean(disagreement(a, b) for a, b in itertools.combinations(preds, 2))


def within_seed_permutation(first: Sequence[Sequence[int]], second: Sequence[Sequence[int]]) -> dict:
    """``first[i]``, ``second[i]``: the two arms' predictions at seed i. Returns each arm's mean pairwise
    disagreement, their difference (first - second) and the exact two-sided p-value over all 2^n swaps."""
    n = len(first)
    if n != len(second) or n < 3:
        raise ValueError(f"need the same seeds in both arms, at least 3; got {n} and {len(second)}")
    if n > 16:
        raise ValueError(f"{n} seeds: 2^{n} relabellings are too many to enumerate here")
    runs = list(first) + list(second)
    d = [[disagreement(a, b) if i != j else 0 for j, b in enumerate(runs)] for i, a in enumerate(runs)]

    def diff(swap: Sequence[int]) -> float:
        a = [i + n * s for i, s in enumerate(swap)]  # run index of arm "first" at each seed
        b = [i + n * (1 - s) for i, s in enumerate(swap)]
        return (statistics.fmean(d[x][y] for x, y in itertools.combinations(a, 2))
                - statistics.fmean(d[x][y] for x, y in itertools.combinations(b, 2)))

    observed = diff([0] * n)
    every = [diff(swap) for swap in itertools.product((0, 1), repeat=n)]
    extreme = sum(abs(v) >= abs(observed) - 1e-9 for v in every)
    return {"seeds": n, "first": mean_pairwise(first), "second": mean_pairwise(second), "difference": observed,
            "relabellings": len(every), "p": extreme / len(every)}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="r3f-finetune output dirs (searched for results.json)")
    p.add_argument("--task", required=True)
    p.add_argument("--arms", nargs=2, required=True, metavar=("FIRST", "SECOND"), help="e.g. standard r3f")
    args = p.parse_args(argv)
    by = {(r["arm"], r["seed"]): r["final"].get("predictions") for r in load_runs(args.runs) if r["task"] == args.task}
    seeds = sorted({s for a, s in by if a == args.arms[0]} & {s for a, s in by if a == args.arms[1]})
    if any(by[a, s] is None for a in args.arms for s in seeds):
        raise SystemExit("a run stored no predictions (results.json 'final.predictions'); re-run it")
    result = within_seed_permutation([by[args.arms[0], s] for s in seeds], [by[args.arms[1], s] for s in seeds])
    print(json.dumps({"task": args.task, "arms": args.arms, "seed_list": seeds, **result}, indent=2))


if __name__ == "__main__":
    main()
