"""The pilot's pre-registered rule (docs/results.md, "Analysis plan"): the main runs' learning rate and epochs.

Per task, from the standard pilot runs (seeds 1 and 2, lr in {5e-5, 1e-4, 2e-4}, 5 epochs, an evaluation at
the end of every epoch):

1. for each lr, the mean over the seeds of the primary metric (MRPC F1, CoLA MCC) at each epoch;
2. the lr with the highest mean at the last epoch; at that lr, the epoch with the highest mean, or the earliest
   epoch within ``TIE`` of it;
3. the models must clearly learn there (``LEARNS``: CoLA MCC >= 0.20, MRPC F1 >= 0.832, means over seeds);
4. the seed spread (sample std over the seeds at the chosen lr and epoch) and the seeds per arm it implies for
   the paper's effect (``r3f_opt.experiments.stats``).

Prints the table and the choice; with ``--write`` writes ``docs/study/plan.env`` (``--plan`` elsewhere;
refused if it exists: the plan is fixed once), which ``run.sh main`` / ``run.sh ablation`` read. Exits 1,
writing nothing, when a pilot run is missing or unfinished, or when a task does not learn (the plan then says:
extend the pilot, record a deviation). ``BATCH`` and ``LRS`` restate run.sh's pilot grid, against which the
runs are checked.

    python docs/study/choose.py docs/results/study/pilot --write
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Optional, Sequence

from r3f_opt.experiments.stats import PAPER_EFFECT, seeds_needed

PRIMARY = {"mrpc": "f1", "cola": "mcc"}
LEARNS = {"mrpc": 0.832, "cola": 0.20}
BATCH = {"mrpc": 16, "cola": 32}
LRS = (5e-5, 1e-4, 2e-4)
SEEDS = (1, 2)
EPOCHS = 5
TIE = 0.005
EXACT = 1e-9  # two means this close are equal (they are averages of the same few decimals)
MAIN_SEEDS = tuple(range(11, 21))
ABLATION_SEEDS = tuple(range(11, 16))


def load(pilot: Path) -> dict:
    """``{(task, lr, seed): [metric at epoch 1, ..., 5]}`` from ``pilot/*/results.json``; raises
    ``SystemExit`` naming every missing, duplicated or malformed run."""
    found, where, problems = {}, {}, []
    for f in sorted(pilot.glob("*/results.json")):
        try:
            r = json.loads(f.read_text())
            task, hp = r["task"], r["hyperparameters"]
            if task not in PRIMARY or r["method"] != "standard":
                continue
            key = (task, hp["lr"], r["seed"])
            epochs = [e for e in r["evaluations"] if e.get("epoch") is not None]
            curve = {int(e["epoch"]): e["metrics"][PRIMARY[task]] for e in epochs if float(e["epoch"]).is_integer()}
            batch = hp["batch_size"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{f}: not a finished r3f-finetune results.json ({type(e).__name__}: {e})")
            continue
        if sorted(curve) != list(range(1, EPOCHS + 1)) or len(epochs) != EPOCHS or batch != BATCH[task]:
            problems.append(f"{f}: expected one evaluation at each of epochs 1..{EPOCHS} at batch {BATCH[task]}, "
                            f"got epochs {[e['epoch'] for e in epochs]} at batch {batch}")
        elif key in found:
            problems.append(f"{f} and {where[key]} are both {task} lr {key[1]:g} seed {key[2]}: keep one")
        else:
            found[key], where[key] = [curve[e] for e in range(1, EPOCHS + 1)], f
    missing = [f"{t} lr {lr:g} seed {s}" for t in PRIMARY for lr in LRS for s in SEEDS if (t, lr, s) not in found]
    if missing or problems:
        raise SystemExit("choose.py: the pilot is not complete, nothing chosen:\n  "
                         + "\n  ".join(problems + [f"missing or unfinished: {m}" for m in missing]))
    return found


def choose(runs: dict, task: str) -> dict:
    """Apply rules 1-4 to one task's runs (``load``'s format). Equal means (within ``EXACT``, float rounding)
    go to the smaller lr; "within ``TIE``" includes ``TIE`` itself."""
    means = {lr: [statistics.fmean(runs[(task, lr, s)][e] for s in SEEDS) for e in range(EPOCHS)] for lr in LRS}
    best = max(means[x][-1] for x in LRS)
    lr = next(x for x in LRS if means[x][-1] >= best - EXACT)  # LRS ascending: a tie goes to the smaller lr
    top = max(means[lr])
    epochs = next(e + 1 for e in range(EPOCHS) if top - means[lr][e] <= TIE + EXACT)
    at = [runs[(task, lr, s)][epochs - 1] for s in SEEDS]
    sd = statistics.stdev(at)
    return {"task": task, "metric": PRIMARY[task], "means": means, "lr": lr, "epochs": epochs,
            "mean": statistics.fmean(at), "learns": statistics.fmean(at) >= LEARNS[task], "threshold": LEARNS[task],
            "sd": sd, "paper_effect": PAPER_EFFECT[task], "seeds_needed": seeds_needed(sd, PAPER_EFFECT[task])}


def report(c: dict) -> str:
    lines = [f"{c['task']} ({c['metric']}, mean of seeds {', '.join(map(str, SEEDS))})",
             "  lr      " + "".join(f"  epoch {e}" for e in range(1, EPOCHS + 1))]
    lines += [f"  {lr:<6g}  " + "".join(f"  {m:7.4f}" for m in c["means"][lr]) for lr in LRS]
    need = c["seeds_needed"]
    lines.append(f"  chosen: lr {c['lr']:g}, {c['epochs']} epochs: mean {c['mean']:.4f} "
                 f"({'learns' if c['learns'] else 'DOES NOT LEARN'}: threshold {c['threshold']}); seed sd "
                 f"{c['sd']:.4f} -> {need if need else 'n/a'} seeds per arm for the paper's effect "
                 f"{c['paper_effect']} (80 % power, alpha 0.05)")
    return "\n".join(lines)


def plan_env(choices: Sequence[dict]) -> str:
    lines = ["# Fixed by docs/study/choose.py from the pilot (docs/results.md, Analysis plan); not to be changed."]
    for c in choices:
        need = c["seeds_needed"] or "n/a (no spread)"
        lines.append(f"# {c['task']}: mean {c['metric']} {c['mean']:.4f} over the pilot seeds, seed sd {c['sd']:.4f}, "
                     f"{need} seeds per arm for the paper's effect {c['paper_effect']}")
    lines += [f'MAIN_SEEDS="{" ".join(map(str, MAIN_SEEDS))}"', f'ABLATION_SEEDS="{" ".join(map(str, ABLATION_SEEDS))}"']
    for c in choices:
        lines += [f"LR_{c['task'].upper()}={c['lr']:g}", f"EPOCHS_{c['task'].upper()}={c['epochs']}"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pilot", type=Path, help="folder of the pilot runs (docs/results/study/pilot)")
    ap.add_argument("--write", action="store_true", help="write the plan to --plan; refused if that file exists")
    ap.add_argument("--plan", type=Path, default=Path(__file__).with_name("plan.env"),
                    help="where --write writes (default: docs/study/plan.env, which run.sh reads)")
    args = ap.parse_args(argv)
    choices = [choose(load(args.pilot), t) for t in PRIMARY]
    print("\n\n".join(report(c) for c in choices))
    if not all(c["learns"] for c in choices):
        print("\nchoose.py: a task does not learn at its chosen setting: extend the pilot and record a deviation "
              "(docs/results.md); no plan written", file=sys.stderr)
        return 1
    if args.write:
        # written whole to a temporary file, then linked into place: a crash leaves no half-written plan, and
        # of two lanes writing at once one wins and the other finds the file (os.link refuses to replace it)
        tmp = args.plan.with_name(f".{args.plan.name}.{os.getpid()}")
        tmp.write_text(plan_env(choices))
        try:
            os.link(tmp, args.plan)
        except FileExistsError:
            print(f"\nchoose.py: {args.plan} exists; the plan is fixed once (delete it only to record a "
                  "deviation)", file=sys.stderr)
            return 1
        finally:
            tmp.unlink()
        print(f"\nwrote {args.plan}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
