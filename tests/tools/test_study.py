"""The study's tools (docs/study): the pilot's pre-registered rule (choose.py) and run.sh's job lists."""
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("study_choose", ROOT / "docs" / "study" / "choose.py")
choose = importlib.util.module_from_spec(spec)
spec.loader.exec_module(choose)


LR_NAME = {5e-5: "5e-5", 1e-4: "1e-4", 2e-4: "2e-4"}


def _run(pilot: Path, task: str, lr: float, seed: int, curve, batch=None, method="standard"):
    d = pilot / f"{task}-{method}-lr{LR_NAME[lr]}-seed{seed}"  # run.sh's folder names
    d.mkdir(parents=True, exist_ok=True)
    metric = choose.PRIMARY[task]
    evals = [{"step": 10 * e, "epoch": float(e), "metrics": {metric: v, "loss": 0.5}} for e, v in enumerate(curve, 1)]
    evals.append({"step": 999, "metrics": {metric: curve[-1]}})  # a non-epoch evaluation is ignored
    (d / "results.json").write_text(json.dumps({
        "task": task, "method": method, "seed": seed, "evaluations": evals,
        "hyperparameters": {"lr": lr, "batch_size": batch or choose.BATCH[task]}}))


def _pilot(tmp_path, mrpc=None, cola=None):
    """Every pilot run; by default MRPC peaks at lr 1e-4 epoch 3 (epoch 2 within the tie), CoLA at 2e-4 epoch 4
    (at epoch 5 2e-4 is best, though 1e-4 peaks higher at epoch 2)."""
    pilot = tmp_path / "pilot"
    base = {"mrpc": mrpc or {5e-5: [0.80, 0.82, 0.83, 0.84, 0.845], 1e-4: [0.82, 0.858, 0.862, 0.85, 0.86],
                             2e-4: [0.81, 0.82, 0.83, 0.83, 0.84]},
            "cola": cola or {5e-5: [0.1, 0.2, 0.25, 0.28, 0.30], 1e-4: [0.2, 0.4, 0.38, 0.3, 0.31],
                             2e-4: [0.2, 0.3, 0.35, 0.36, 0.34]}}  # 1e-4 peaks higher, but not at epoch 5
    for task, curves in base.items():
        for lr, curve in curves.items():
            for seed, shift in ((1, -0.01), (2, 0.01)):  # seed sd = 0.01 * sqrt(2)
                _run(pilot, task, lr, seed, [v + shift for v in curve])
    return pilot


def test_rule_picks_lr_at_last_epoch_and_earliest_tied_epoch(tmp_path, capsys):
    pilot = _pilot(tmp_path)
    out = tmp_path / "plan.env"
    assert choose.main([str(pilot), "--write", "--plan", str(out)]) == 0
    text = out.read_text()
    assert "LR_MRPC=0.0001\nEPOCHS_MRPC=2\n" in text  # epoch 2 (0.858) is within 0.005 of epoch 3 (0.862)
    assert "LR_COLA=0.0002\nEPOCHS_COLA=4\n" in text  # highest at epoch 5 is 2e-4 (0.34 > 0.31), best epoch 4
    assert 'MAIN_SEEDS="11 12 13 14 15 16 17 18 19 20"' in text and 'ABLATION_SEEDS="11 12 13 14 15"' in text
    c = choose.choose(choose.load(pilot), "mrpc")
    assert c["sd"] == pytest.approx(0.02 / 2 ** 0.5) and c["mean"] == pytest.approx(0.858)
    assert c["seeds_needed"] > 2
    assert "chosen: lr 0.0001, 2 epochs" in capsys.readouterr().out
    # the plan is fixed once
    assert choose.main([str(pilot), "--write", "--plan", str(out)]) == 1


@pytest.mark.parametrize("case", ["lr_tie", "boundary", "learns_at_chosen_epoch"])
def test_rule_edge_cases(tmp_path, case):
    cola = {5e-5: [0.1, 0.2, 0.25, 0.28, 0.30], 1e-4: [0.1, 0.2, 0.25, 0.28, 0.30], 2e-4: [0.1, 0.2, 0.2, 0.2, 0.2]}
    if case == "boundary":  # 0.300 is exactly 0.005 below 0.305: inclusive, so epoch 4
        cola[1e-4] = [0.1, 0.2, 0.25, 0.300, 0.305]
    if case == "learns_at_chosen_epoch":  # below 0.20 at epoch 5, above at the chosen epoch 2
        cola = {lr: [0.15, 0.25 if lr == 1e-4 else 0.2, 0.2, 0.19, 0.19 if lr == 1e-4 else 0.18] for lr in choose.LRS}
    c = choose.choose(choose.load(_pilot(tmp_path, cola=cola)), "cola")
    want = {"lr_tie": (5e-5, 5, True), "boundary": (1e-4, 4, True), "learns_at_chosen_epoch": (1e-4, 2, True)}[case]
    assert (c["lr"], c["epochs"], c["learns"]) == want


def test_plan_env_drives_run_sh(tmp_path):
    pilot = _pilot(tmp_path)
    study = tmp_path / "study"
    study.mkdir()
    for f in ("run.sh",):
        (study / f).write_text((ROOT / "docs" / "study" / f).read_text())
    assert choose.main([str(pilot), "--write", "--plan", str(study / "plan.env")]) == 0
    env = dict(os.environ, R3F_STUDY_OUT=str(tmp_path / "out"), R3F_GLUE_DIR=str(tmp_path))
    out = subprocess.run(["bash", str(study / "run.sh"), "main", "--dry-run", "--lane", "2/2"], env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    # each lane: one standard and one R3F run of every seed (R3F costs about twice as much)
    assert len(out) == 20 and out[0].endswith("main/mrpc-r3f-seed11") and out[1].endswith("main/cola-standard-seed11")
    assert out[-1].endswith("main/cola-standard-seed20")
    assert sum("-r3f-" in line for line in out) == 10
    out = subprocess.run(["bash", str(study / "run.sh"), "ablation", "--dry-run"], env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 25 and out[0].endswith("ablation/mrpc-r3f-eps0-seed11")
    out = subprocess.run(["bash", str(study / "run.sh"), "confirm", "--dry-run"], env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 40 and out[0].endswith("confirm/mrpc-standard-seed21") and out[-1].endswith(
        "confirm/cola-standard-seed30")


def test_no_plan_when_a_run_is_missing_or_malformed(tmp_path):
    pilot = _pilot(tmp_path)
    (pilot / "cola-standard-lr2e-4-seed2" / "results.json").unlink()
    with pytest.raises(SystemExit, match="missing or unfinished: cola lr 0.0002 seed 2"):
        choose.main([str(pilot), "--write", "--plan", str(tmp_path / "plan.env")])
    _run(pilot, "cola", 2e-4, 2, [0.3] * 5, batch=16)
    with pytest.raises(SystemExit, match="at batch 32, got epochs .* at batch 16"):
        choose.load(pilot)
    assert not (tmp_path / "plan.env").exists()


@pytest.mark.parametrize("bad", ["duplicate", "half_epoch", "not_json", "no_metric"])
def test_load_refuses_duplicated_or_malformed_runs(tmp_path, bad):
    pilot = _pilot(tmp_path)
    f = pilot / "mrpc-standard-lr1e-4-seed1" / "results.json"
    r = json.loads(f.read_text())
    if bad == "duplicate":
        (pilot / "copy").mkdir()
        (pilot / "copy" / "results.json").write_text(json.dumps(r))
        match = "are both mrpc lr 0.0001 seed 1"
    elif bad == "half_epoch":
        r["evaluations"].insert(2, {"epoch": 2.5, "metrics": {"f1": 0.9}})
        match = r"got epochs \[1.0, 2.0, 2.5"
    elif bad == "not_json":
        r = None
        match = "not a finished r3f-finetune results.json"
    else:
        del r["evaluations"][0]["metrics"]["f1"]
        match = "KeyError: 'f1'"
    if bad != "duplicate":
        f.write_text("{oops" if r is None else json.dumps(r))
    with pytest.raises(SystemExit, match=match):
        choose.load(pilot)


def test_no_plan_when_a_task_does_not_learn(tmp_path, capsys):
    flat = {lr: [0.1, 0.12, 0.15, 0.18, 0.19] for lr in choose.LRS}  # CoLA MCC below 0.20 everywhere
    pilot = _pilot(tmp_path, cola=flat)
    assert choose.main([str(pilot), "--write", "--plan", str(tmp_path / "plan.env")]) == 1
    assert "DOES NOT LEARN" in capsys.readouterr().out
    assert not (tmp_path / "plan.env").exists()


def test_all_runs_the_phases_with_the_rule_between(tmp_path):
    """run.sh all: the pilot's jobs, then choose.py writes plan.env (the pilot is complete here), then the main
    and ablation jobs; when the rule fixes no plan it stops before main with the rule's message."""
    out = tmp_path / "out"
    pilot = _pilot(out)  # finished pilot runs where run.sh looks: $R3F_STUDY_OUT/pilot
    study = tmp_path / "study"
    study.mkdir()
    for f in ("run.sh", "choose.py"):
        (study / f).write_text((ROOT / "docs" / "study" / f).read_text())
    bindir = tmp_path / "bin"  # a fake r3f-finetune: the runs are already done, it must not be called
    bindir.mkdir()
    (bindir / "r3f-finetune").write_text("#!/bin/sh\necho called >&2; exit 9\n")
    (bindir / "r3f-finetune").chmod(0o755)
    import sys
    env = dict(os.environ, R3F_STUDY_OUT=str(out), R3F_GLUE_DIR=str(tmp_path), PYTHON=sys.executable,
               PATH=f"{bindir}:{os.environ['PATH']}", PYTHONPATH=str(ROOT))
    res = subprocess.run(["bash", str(study / "run.sh"), "all", "--dry-run"], env=env, capture_output=True, text=True)
    assert res.returncode == 0 and "then: python" in res.stdout and not (study / "plan.env").exists()
    res = subprocess.run(["bash", str(study / "run.sh"), "all", "--lane", "1/2", "--dry-run"], env=env,
                         capture_output=True, text=True)
    assert res.stdout.count("done ") == 6  # the pilot's jobs of lane 1
    good = out / "pilot-good"
    pilot.rename(good)  # a finished pilot whose CoLA runs did not learn: no plan, no main run
    _pilot(out, cola={lr: [0.1, 0.12, 0.15, 0.18, 0.19] for lr in choose.LRS})
    res = subprocess.run(["bash", str(study / "run.sh"), "all"], env=env, capture_output=True, text=True)
    assert res.returncode == 3 and "fixed no plan" in res.stderr and "DOES NOT LEARN" in res.stdout
    assert not (study / "plan.env").exists()
    import shutil
    shutil.rmtree(out / "pilot")
    good.rename(out / "pilot")
    res = subprocess.run(["bash", str(study / "run.sh"), "all"], env=env, capture_output=True, text=True)
    # plan written, then the first main job calls the (fake) r3f-finetune, which fails: set -e stops there
    assert (study / "plan.env").exists() and "LR_MRPC=0.0001" in (study / "plan.env").read_text()
    assert res.returncode == 9 and "called" in res.stderr and res.stdout.rstrip().endswith("main/mrpc-standard-seed11")


spec = importlib.util.spec_from_file_location("study_disagreement", ROOT / "docs" / "study" / "disagreement.py")
disagreement = importlib.util.module_from_spec(spec)
spec.loader.exec_module(disagreement)


def test_disagreement_permutation_is_exact(tmp_path, capsys):
    """Arm A's four models agree everywhere; arm B's are one-hot at different examples (pairwise 2 apart, 1
    from A's). Of the 2^4 within-seed swaps only the observed split and its mirror reach |difference| 2
    (a 3-1 split gives 0.5 - 1.5), so p = 2/16; identical arms give p = 1."""
    zeros, onehot = [0] * 6, [[int(i == k) for i in range(6)] for k in range(4)]
    r = disagreement.within_seed_permutation([zeros] * 4, onehot)
    assert (r["first"], r["second"], r["difference"], r["relabellings"], r["p"]) == (0, 2, -2, 16, 2 / 16)
    assert disagreement.within_seed_permutation(onehot, onehot)["p"] == 1.0
    with pytest.raises(ValueError, match="not the same eval set"):
        disagreement.within_seed_permutation([zeros] * 3, [[0] * 5] * 3)
    with pytest.raises(ValueError, match="at least 3"):
        disagreement.within_seed_permutation([zeros] * 2, [zeros] * 2)
    for arm, preds in (("standard", [zeros] * 4), ("r3f", onehot)):
        for seed, p in enumerate(preds, 11):
            d = tmp_path / f"rte-{arm}-{seed}"
            d.mkdir()
            final = {"metrics": {"accuracy": 0.5}, "predictions": p}
            (d / "results.json").write_text(json.dumps({"task": "rte", "method": arm, "seed": seed,
                                                        "primary_metric": "accuracy", "final": final, "best": final}))
    disagreement.main([str(tmp_path), "--task", "rte", "--arms", "standard", "r3f"])
    out = json.loads(capsys.readouterr().out)
    assert out["seed_list"] == [11, 12, 13, 14] and out["p"] == 2 / 16
