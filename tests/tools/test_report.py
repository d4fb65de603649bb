"""r3f-report on synthetic results files: statistics, table, plot and errors."""
import json
import statistics

import pytest

from r3f_opt.experiments import report


def fake_run(root, task, method, seed, value, f1=None, sps=0.5, lr=1e-4, lam=1.0, official=True):
    metrics = {"accuracy": value, "loss": 0.5, **({"f1": f1} if f1 is not None else {})}
    run = {"task": task, "method": method, "seed": seed, "primary_metric": "accuracy",
           "final": {"step": 10, "metrics": metrics}, "best": {"step": 5, "metrics": {**metrics, "accuracy": value + 0.1}},
           "seconds_per_step": sps, "hyperparameters": {"lr": lr, "max_steps": 10, "lam": lam},
           "data": {"eval_is_full_official_dev": official}}
    d = root / f"{task}-{method}-{seed}"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(run))
    return d


@pytest.fixture
def runs(tmp_path):
    vals = {"standard": [0.60, 0.70, 0.65], "r3f": [0.62, 0.66, 0.80]}
    for method, vs in vals.items():
        for seed, v in enumerate(vs, 1):
            fake_run(tmp_path / "runs", "mrpc", method, seed, v, f1=v + 0.1, sps=1.0 if method == "r3f" else 0.5)
    return tmp_path / "runs", vals


def test_summary_statistics(runs):
    root, vals = runs
    rows = report.summarize(report.load_runs([str(root)]))
    assert [(r["metric"], r["method"]) for r in rows] == [("accuracy", "standard"), ("accuracy", "r3f"),
                                                          ("f1", "standard"), ("f1", "r3f")]
    r3f = rows[1]
    assert r3f["n"] == 3 and r3f["seeds"] == [1, 2, 3]
    assert r3f["median"] == pytest.approx(0.66) and r3f["max"] == pytest.approx(0.80)
    assert r3f["mean"] == pytest.approx(sum(vals["r3f"]) / 3)
    assert r3f["std"] == pytest.approx(statistics.stdev(vals["r3f"]))  # sample std, ddof=1
    assert r3f["seconds_per_step"] == pytest.approx(1.0)
    best = report.summarize(report.load_runs([str(root)]), "best")
    assert best[1]["max"] == pytest.approx(0.90)  # the best evaluation of each run


def test_cli_writes_table_and_plot(runs, tmp_path, capsys):
    root, _ = runs
    out = tmp_path / "rep"
    report.main([str(root), "--output-dir", str(out)])
    text = (out / "report.md").read_text()
    assert "| mrpc | accuracy | r3f | 3 | 0.6600 | 0.6933 ± 0.0945 | 0.8000 | 1.000 |" in text
    assert "Not comparable" not in text and "†" not in text
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert json.loads((out / "report.json").read_text())[0]["task"] == "mrpc"
    assert "| mrpc | accuracy | standard |" in capsys.readouterr().out


def test_single_seed_and_budget_mismatch(tmp_path):
    fake_run(tmp_path, "rte", "standard", 1, 0.5, lr=1e-4)
    fake_run(tmp_path, "rte", "r4f", 1, 0.6, lr=2e-5)
    report.main([str(tmp_path), "--output-dir", str(tmp_path / "rep"), "--no-plot"])
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| rte | accuracy | r4f | 1 | 0.6000 | 0.6000 ± – | 0.6000 |" in text
    assert "rte: runs differ in lr" in text
    assert not (tmp_path / "rep" / "report.png").exists()


def test_one_seed_per_arm_says_it_is_not_compared(tmp_path, capsys):
    fake_run(tmp_path, "rte", "standard", 1, 0.5)
    fake_run(tmp_path, "rte", "r3f", 1, 0.6)
    report.main([str(tmp_path), "--output-dir", str(tmp_path / "rep"), "--no-plot"])
    assert "⚠ Not compared with standard (fewer than 2 seeds in an arm, or no such arm): r3f on rte." in \
        (tmp_path / "rep" / "report.md").read_text()
    assert json.loads((tmp_path / "rep" / "comparison.json").read_text()) == []
    assert "comparison.json" in capsys.readouterr().out.splitlines()[-1]


def test_method_settings_make_arms_and_unofficial_eval_is_flagged(tmp_path, monkeypatch):
    fake_run(tmp_path, "qqp", "r3f", 1, 0.5, f1=0.4, lam=1.0, official=False)  # QQP runs report f1 too
    fake_run(tmp_path, "qqp", "r3f", 2, 0.6, f1=0.5, lam=0.1, official=False)
    report.main([str(tmp_path), "--output-dir", str(tmp_path / "rep"), "--no-plot"])
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| qqp † | accuracy | r3f | 1 |" in text and "| qqp † | accuracy | r3f (lam=0.1) | 1 |" in text
    assert "Not comparable" not in text and "not a GLUE dev score" in text
    # noise_scale: a run that does not record it (made before the option) counts as "absolute"; so does a
    # run without same_dropout (False)
    for seed, scale in ((3, "absolute"), (4, None), (5, "relative")):
        d = fake_run(tmp_path / "ns", "rte", "r3f", seed, 0.5)
        run = json.loads((d / "results.json").read_text())
        if scale:
            run["hyperparameters"].update(noise_scale=scale, same_dropout=False)
        (d / "results.json").write_text(json.dumps(run))
    arms = {r["seed"]: r["arm"] for r in report.load_runs([str(tmp_path / "ns")])}
    assert arms == {3: "r3f", 4: "r3f", 5: "r3f (noise_scale=relative)"}
    # a setting a run predates takes its value of that time, even when today's default differs
    monkeypatch.setitem(report.LATER_KEYS, "noise_scale", "relative")
    arms = {r["seed"]: r["arm"] for r in report.load_runs([str(tmp_path / "ns")])}
    assert arms == {3: "r3f", 4: "r3f (noise_scale=relative)", 5: "r3f (noise_scale=relative)"}
    monkeypatch.undo()
    # method_kwargs: key order does not matter, {} is no kwargs
    for seed, kw in ((6, {"a": 1, "b": 2}), (7, {"b": 2, "a": 1}), (8, {})):
        d = fake_run(tmp_path / "kw", "rte", "smart", seed, 0.5)
        run = json.loads((d / "results.json").read_text())
        run["hyperparameters"]["method_kwargs"] = kw
        (d / "results.json").write_text(json.dumps(run))
    arms = {r["seed"]: r["arm"] for r in report.load_runs([str(tmp_path / "kw")])}
    assert arms == {6: 'smart (method_kwargs={"a": 1, "b": 2})', 7: 'smart (method_kwargs={"a": 1, "b": 2})', 8: "smart"}


def test_ablation_arms_against_a_baseline_arm_on_chosen_seeds(tmp_path):
    """The study's ablation report: main arms (seeds 11-20) and ablation arms (11-15) in one report, restricted
    to the shared seeds, each arm against r3f; standard ignores the method settings it does not use."""
    from r3f_opt.experiments import stats

    def run(folder, method, seed, value, **hp):
        d = fake_run(tmp_path / folder, "mrpc", method, seed, value, f1=value)
        r = json.loads((d / "results.json").read_text())
        r["hyperparameters"].update(hp)
        (d / "results.json").write_text(json.dumps(r))

    main_r3f = {s: 0.80 + 0.01 * (s % 3) for s in range(11, 21)}
    eps0 = {s: 0.78 + 0.01 * (s % 2) for s in range(11, 16)}
    for s in range(11, 21):
        run(f"main/std{s}", "standard", s, 0.79, lam=5.0)  # lam is meaningless for standard: one arm
        run(f"main/r3f{s}", "r3f", s, main_r3f[s], eps=1e-5, same_dropout=False)
    for s in range(11, 16):
        run(f"abl/eps0-{s}", "r3f", s, eps0[s], eps=0.0)
        run(f"abl/same-{s}", "r3f", s, 0.81, same_dropout=True)
        run(f"abl/r4f0-{s}", "r4f", s, 0.80, lam=0.0)
    out = tmp_path / "rep"
    report.main([str(tmp_path / "main"), str(tmp_path / "abl"), "--seeds", "11-15", "--baseline", "r3f",
                 "--output-dir", str(out), "--primary", "mrpc=f1"])
    rows = json.loads((out / "report.json").read_text())
    f1 = [(r["arm"], r["seeds"]) for r in rows if r["metric"] == "f1"]
    assert f1 == [("standard", list(range(11, 16))), ("r3f", list(range(11, 16))),
                  ("r3f (eps=0)", list(range(11, 16))), ("r3f (same_dropout=True)", list(range(11, 16))),
                  ("r4f (lam=0)", list(range(11, 16)))]
    comps = {c["arm"]: c for c in json.loads((out / "comparison.json").read_text())}
    assert comps["r3f (eps=0)"]["method"] == "r3f" and rows[-1]["method"] == "r4f"  # the bare method too
    assert set(comps) == {"standard", "r3f (eps=0)", "r3f (same_dropout=True)", "r4f (lam=0)"}
    want = stats.welch([main_r3f[s] for s in range(11, 16)], [eps0[s] for s in range(11, 16)])
    assert comps["r3f (eps=0)"]["diff"] == pytest.approx(want["diff"]) and comps["r3f (eps=0)"]["baseline"] == "r3f"
    text = (out / "report.md").read_text()
    assert "**Each arm against r3f**" in text and "| mrpc | f1 | r3f (eps=0) − r3f |" in text
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    for bad, match in ((["--baseline", "r3f (lam=5)"], "no run of the baseline arm 'r3f \\(lam=5\\)'"),
                       (["--seeds", "30-31"], "no run has a seed in 30-31")):
        with pytest.raises(SystemExit, match=match):
            report.main([str(tmp_path / "main"), "--output-dir", str(out), "--no-plot", *bad])
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "main"), "--output-dir", str(out), "--seeds", "a-b"])
    assert report.parse_seeds("1-3,7") == {1, 2, 3, 7}


def test_identical_seeds_are_named_and_every_seed_is_listed(tmp_path):
    """Where an arm's models label every eval example as the baseline's do at a seed (R3F with same_dropout at
    sigma 1e-5 against standard), the report says at which seeds; an equal score alone (seed 12: the same
    accuracy, 3 of 4 labels differ) is not called agreement. Every seed is listed."""
    std = {11: 0.61, 12: 0.67, 13: 0.64}
    other = {11: 0.61, 12: 0.67, 13: 0.66}  # the same score at 11 and 12
    for s in std:
        fake_run(tmp_path / "runs", "rte", "standard", s, std[s])
        fake_run(tmp_path / "runs", "rte", "rdrop", s, other[s])
    fake_run(tmp_path / "runs", "rte", "r3f", 14, 0.7)  # one seed only: in the per-seed table, not compared
    preds = {("standard", 11): [0, 1, 1, 0], ("rdrop", 11): [0, 1, 1, 0], ("standard", 12): [1, 1, 1, 0],
             ("rdrop", 12): [0, 0, 1, 1], ("standard", 13): [1, 1, 0, 0]}  # rdrop 13 stored none
    for (method, seed), p in preds.items():
        f = tmp_path / "runs" / f"rte-{method}-{seed}" / "results.json"
        r = json.loads(f.read_text())
        r["final"]["predictions"] = p
        f.write_text(json.dumps(r))
    out = tmp_path / "rep"
    report.main([str(tmp_path / "runs"), "--output-dir", str(out), "--no-plot"])
    (c,) = json.loads((out / "comparison.json").read_text())
    assert c["arm"] == "rdrop" and c["shared_seeds"] == [11, 12, 13] and c["same_score_seeds"] == [11, 12]
    assert c["differing_predictions"] == [{"seed": 11, "differing": 0}, {"seed": 12, "differing": 3}]
    assert c["identical_seeds"] == [11] and c["eval_examples"] == 4
    text = (out / "report.md").read_text()
    assert "≡ rte: rdrop and standard label every eval example alike at 1 of 3 shared seeds (11)." in text
    assert "| rte | rdrop − standard | 11-12 | 0, 3 | 4 |" in text
    # between seeds: standard's pairs (11,12) 1, (11,13) 2, (12,13) 1; rdrop's one pair 2; r3f has one seed
    assert "| rte | standard | 3 | 1 (1–2) | 4 |\n| rte | rdrop | 1 | 2 (2–2) | 4 |\n" in text
    assert "| rte accuracy, seed | standard | r3f | rdrop |" in text
    assert "| 11 | 0.6100 | – | 0.6100 |" in text and "| 14 | – | 0.7000 | – |" in text
    report.main([str(tmp_path / "runs"), "--output-dir", str(out), "--no-plot", "--metric", "best"])
    text = (out / "report.md").read_text()
    assert "Predictions against" not in text and "Predictions between" not in text  # final models only
    # best metrics: no predictions to check, so only the scores are said to match (best = final + 0.1 here)
    assert "≡ rte: rdrop and standard scored the same accuracy at 2 of 3 shared seeds (11-12); no stored" in text
    fake_run(tmp_path / "runs2", "rte", "standard", 1, 0.6)
    fake_run(tmp_path / "runs2", "rte", "standard", 2, 0.7)
    fake_run(tmp_path / "runs2", "rte", "rdrop", 1, 0.65)
    fake_run(tmp_path / "runs2", "rte", "rdrop", 2, 0.75)
    report.main([str(tmp_path / "runs2"), "--output-dir", str(out), "--no-plot", "--primary", "mrpc=f1"])
    text = (out / "report.md").read_text()
    assert "≡" not in text  # equal spreads, no equal values: nothing to say
    assert "⚠ --primary mrpc=f1: no mrpc run in this report, so it chose nothing." in text


def test_prediction_tables_skip_budget_mismatches_and_other_eval_sets(tmp_path):
    """Seed-to-seed disagreement pools only runs of one budget and one eval set."""
    for seed, (lr, p) in enumerate([(1e-4, [0, 0, 1]), (1e-4, [0, 1, 1]), (2e-4, [1, 1, 0])], 1):
        d = fake_run(tmp_path / "a", "rte", "standard", seed, 0.5, lr=lr)
        r = json.loads((d / "results.json").read_text())
        r["final"]["predictions"] = p
        (d / "results.json").write_text(json.dumps(r))
    assert report.seed_disagreement(report.load_runs([str(tmp_path / "a")]), skip=["rte"]) == []
    runs = report.load_runs([str(tmp_path / "a")])
    runs[2]["final"]["predictions"] = [1, 1, 0, 0]  # another eval set: left out of the pairs
    (row,) = report.seed_disagreement(runs)
    assert (row["pairs"], row["eval_examples"], row["median"]) == (1, 3, 1)


def test_errors(tmp_path):
    with pytest.raises(SystemExit, match="no results.json"):
        report.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="no such file or folder"):
        report.main([str(tmp_path / "missing")])
    a = fake_run(tmp_path / "a", "rte", "r3f", 1, 0.5)
    fake_run(tmp_path / "b", "rte", "r3f", 1, 0.5)
    with pytest.raises(SystemExit, match="both rte r3f seed 1"):
        report.main([str(tmp_path / "a"), str(tmp_path / "b")])
    report.load_runs([str(a), str(a / "results.json")])  # the same file twice counts once
    (a / "results.json").write_text("{not json")
    with pytest.raises(SystemExit, match="not a readable results.json"):
        report.main([str(a)])
    (a / "results.json").write_text(json.dumps({"task": "rte"}))
    with pytest.raises(SystemExit, match=r"lacks \['method', 'seed'"):
        report.main([str(a)])


def _compare(tmp_path, vals: dict) -> dict:
    """Fake runs of ``{(task, method): [value per seed 1, 2, ...]}``, reported: the comparisons by task."""
    for (task, method), vs in vals.items():
        for seed, v in enumerate(vs, 1):
            fake_run(tmp_path / "runs", task, method, seed, v, f1=v)
    report.main([str(tmp_path / "runs"), "--output-dir", str(tmp_path / "rep"), "--no-plot"])
    return {c["task"]: c for c in json.loads((tmp_path / "rep" / "comparison.json").read_text())}


def test_methods_are_compared_with_welch_bootstrap_and_holm(tmp_path):
    """Two tasks, standard vs r3f: the printed comparison matches the statistics computed by hand, Holm runs
    over the two tasks, and n = 3 is flagged as too small for the paper's effect."""
    from r3f_opt.experiments import stats

    vals = {("mrpc", "standard"): [0.60, 0.70, 0.65], ("mrpc", "r3f"): [0.62, 0.66, 0.80],
            ("rte", "standard"): [0.50, 0.52, 0.51], ("rte", "r3f"): [0.56, 0.58, 0.57]}
    comps = _compare(tmp_path, vals)
    for task in ("mrpc", "rte"):
        want = stats.welch(vals[task, "standard"], vals[task, "r3f"])
        assert comps[task]["p"] == pytest.approx(want["p"]) and comps[task]["diff"] == pytest.approx(want["diff"])
        assert comps[task]["underpowered"] and comps[task]["seeds_needed"] > 3
    holm = stats.holm([comps["mrpc"]["p"], comps["rte"]["p"]])
    assert [comps["mrpc"]["p_holm"], comps["rte"]["p_holm"]] == pytest.approx(holm)
    assert comps["rte"]["p"] < 0.01 < comps["mrpc"]["p"]
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| rte | accuracy | r3f − standard | +0.0600 |" in text and "n too small" in text


def test_arms_without_spread_get_no_p_value(tmp_path):
    """Both arms constant across seeds (e.g. stuck at the majority class) with different means: no test
    (p and Holm's p None, printed as such), and Holm over the other task counts it as p = 1."""
    vals = {("mrpc", "standard"): [0.60, 0.70, 0.65], ("mrpc", "r3f"): [0.62, 0.66, 0.80],
            ("rte", "standard"): [0.50, 0.50, 0.50], ("rte", "r3f"): [0.53, 0.53, 0.53]}
    comps = _compare(tmp_path, vals)
    assert comps["rte"]["p"] is None and comps["rte"]["p_holm"] is None
    assert comps["mrpc"]["p_holm"] == pytest.approx(min(1.0, 2 * comps["mrpc"]["p"]))
    assert "| rte | accuracy | r3f − standard | +0.0300 |" in (tmp_path / "rep" / "report.md").read_text()
    assert "no spread" in (tmp_path / "rep" / "report.md").read_text()


def test_plot_axes_start_at_the_majority_baseline_drawn_dashed(runs, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure plot() would close
    rows = report.summarize(report.load_runs([str(runs[0])]))
    report.plot(rows, tmp_path / "p.png", base={"mrpc": {"f1": 0.65}})  # accuracy has no baseline here
    (fig,) = figures
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert set(panels) == {"mrpc: accuracy", "mrpc: f1"}
    f1 = panels["mrpc: f1"]
    lo, hi = f1.get_ylim()
    values = [v + 0.1 for vs in runs[1].values() for v in vs]  # the f1 values of fake_run
    pad = 0.08 * (max(values) - 0.65)
    assert min(values) > 0.65  # the axis starts at the baseline, not at 0
    assert lo == pytest.approx(0.65 - pad) and hi == pytest.approx(max(values) + pad)
    (line,) = [ln for ln in f1.get_lines() if ln.get_label() == "majority class"]
    assert set(line.get_ydata()) == {0.65} and line.get_linestyle() == "--"
    assert not [ln for ln in panels["mrpc: accuracy"].get_lines() if ln.get_label() == "majority class"]
    # a seed below the baseline stays visible: the axis then starts below it
    report.plot(rows, tmp_path / "q.png", base={"mrpc": {"f1": 0.75}})
    lo = figures[-1].axes[1].get_ylim()[0]
    assert lo < min(values) < 0.75
    for fig in figures:
        close(fig)


def test_majority_baseline_recorded_or_from_files(tmp_path, glue_dir):
    from r3f_opt.experiments.data import load_examples
    from r3f_opt.experiments.glue import majority_baseline

    d = fake_run(tmp_path / "a", "mrpc", "standard", 1, 0.7, f1=0.8)
    run = json.loads((d / "results.json").read_text())
    run["data"]["majority_baseline"] = {"label": 1, "accuracy": 0.684, "f1": 0.812}
    (d / "results.json").write_text(json.dumps(run))
    assert report.baselines(report.load_runs([str(d)])) == {"mrpc": {"accuracy": 0.684, "f1": 0.812}}
    # An older run without the field: recomputed from its train and eval files (the same subsets)
    train, dev = glue_dir / "RTE" / "train.tsv", glue_dir / "RTE" / "dev.tsv"
    d = fake_run(tmp_path / "b", "rte", "standard", 1, 0.5)
    run = json.loads((d / "results.json").read_text())
    run["data"].update(train_file=str(train), eval_file=str(dev), n_train=20, n_eval=10)
    (d / "results.json").write_text(json.dumps(run))
    _, ty = load_examples(train, "rte", 20)
    _, ey = load_examples(dev, "rte", 10)
    expected = majority_baseline("rte", ty, ey)
    assert report.baselines(report.load_runs([str(d)])) == {"rte": {"accuracy": expected["accuracy"]}}
    report.main([str(tmp_path / "b"), "--output-dir", str(tmp_path / "rep")])
    assert f"Majority-class baseline on the eval set: rte accuracy {expected['accuracy']:.4f}" in \
        (tmp_path / "rep" / "report.md").read_text()
    # Files that are gone: no baseline, and the report still works
    run["data"].update(train_file=str(tmp_path / "gone.tsv"))
    (d / "results.json").write_text(json.dumps(run))
    assert report.baselines(report.load_runs([str(d)])) == {}


def test_majority_baseline_picks_the_train_majority():
    from r3f_opt.experiments.glue import majority_baseline

    base = majority_baseline("cola", [1, 1, 0], [0, 0, 1, 1, 1])
    assert base == {"label": 1, "mcc": 0.0, "accuracy": 0.6}
    assert majority_baseline("mrpc", [0, 1], [1, 1])["label"] == 0  # a tie: the lower id


def test_older_runs_without_a_secondary_metric(tmp_path):
    for seed, metrics in [(1, {"mcc": 0.3, "accuracy": 0.7}), (2, {"mcc": 0.2})]:  # seed 2 predates accuracy
        d = tmp_path / f"cola-{seed}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps({
            "task": "cola", "method": "standard", "seed": seed, "primary_metric": "mcc",
            "final": {"metrics": metrics}, "best": {"metrics": metrics}}))
    rows = report.summarize(report.load_runs([str(tmp_path)]))
    assert [(r["metric"], r["n"]) for r in rows] == [("mcc", 2), ("accuracy", 1)]
    d = tmp_path / "cola-3"
    d.mkdir()
    (d / "results.json").write_text(json.dumps({
        "task": "cola", "method": "standard", "seed": 3, "primary_metric": "mcc",
        "final": {"metrics": {"accuracy": 0.7}}, "best": {"metrics": {"mcc": 0.1}}}))
    with pytest.raises(report.ReportError, match="final metric 'mcc' is None"):
        report.load_runs([str(d)])


def test_primary_metric_override(runs, tmp_path):
    root, _ = runs
    rows = report.summarize(report.load_runs([str(root)]), primary={"mrpc": "f1"})
    assert [r["metric"] for r in rows][:2] == ["f1", "f1"]
    assert {c["metric"] for c in report.compare(rows)} == {"f1"}  # the comparison tests F1, not accuracy
    out = tmp_path / "rep"
    report.main([str(root), "--output-dir", str(out), "--no-plot", "--primary", "mrpc=f1"])
    assert "| mrpc | f1 | r3f − standard |" in (out / "report.md").read_text()
    for bad in ("mrpc=mcc", "mrpc", "nope=f1"):
        with pytest.raises(SystemExit):
            report.main([str(root), "--output-dir", str(out), "--no-plot", "--primary", bad])
    with pytest.raises(ValueError, match="mrpc has no metric 'mcc'"):
        report.summarize(report.load_runs([str(root)]), primary={"mrpc": "mcc"})


def test_runs_of_different_budgets_are_not_pooled_into_a_comparison(tmp_path):
    for seed, (s, r) in enumerate([(0.60, 0.62), (0.70, 0.66), (0.65, 0.80)], 1):
        fake_run(tmp_path / "runs", "mrpc", "standard", seed, s)
        fake_run(tmp_path / "runs", "mrpc", "r3f", seed, r)
    fake_run(tmp_path / "runs", "mrpc", "standard", 4, 0.9, lr=2e-4)  # another budget: would be pooled
    report.main([str(tmp_path / "runs"), "--output-dir", str(tmp_path / "rep"), "--no-plot"])
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "r3f − standard" not in text and "no comparison for mrpc" in text and "runs differ in lr" in text
    assert json.loads((tmp_path / "rep" / "comparison.json").read_text()) == []


def test_a_reinitialised_head_is_another_budget(tmp_path):
    """--reinit-head changes every method's starting point; runs that predate the option did not reinitialise."""
    for seed in (1, 2):
        fake_run(tmp_path / "runs", "mrpc", "standard", seed, 0.6 + seed / 100)  # no reinit_head recorded
        run = fake_run(tmp_path / "runs", "mrpc", "r3f", seed, 0.7) / "results.json"
        data = json.loads(run.read_text())
        data["hyperparameters"]["reinit_head"] = seed == 2
        run.write_text(json.dumps(data))
    report.main([str(tmp_path / "runs"), "--output-dir", str(tmp_path / "rep"), "--no-plot"])
    assert "mrpc: runs differ in reinit_head (false, true)" in (tmp_path / "rep" / "report.md").read_text()


def test_seed_gaps_unfinished_runs_and_holm_families_are_reported(tmp_path):
    """An arm lacking a seed (of the others', or of --seeds), a folder with only a checkpoint, and a task that
    cannot be compared (one seed) are all said; Holm's family is the tasks actually compared."""
    for seed in (11, 12, 13):
        fake_run(tmp_path / "runs", "mrpc", "standard", seed, 0.6 + seed / 100)
        if seed != 12:
            fake_run(tmp_path / "runs", "mrpc", "r3f", seed, 0.62 + seed / 100)
    fake_run(tmp_path / "runs", "rte", "standard", 11, 0.5)
    fake_run(tmp_path / "runs", "rte", "standard", 12, 0.52)
    fake_run(tmp_path / "runs", "rte", "r3f", 11, 0.55)  # one seed: no test possible
    (tmp_path / "runs" / "mrpc-r3f-12").mkdir()
    (tmp_path / "runs" / "mrpc-r3f-12" / "checkpoint.pt").write_bytes(b"")
    report.main([str(tmp_path / "runs"), "--output-dir", str(tmp_path / "rep"), "--no-plot", "--seeds", "11-14"])
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "mrpc standard 11-13; mrpc r3f 11, 13" in text
    assert "mrpc: the arms' seeds differ: standard lacks 14; r3f lacks 12, 14" in text
    assert "unfinished): " + str(tmp_path / "runs" / "mrpc-r3f-12") in text
    assert "Holm over the tasks compared: r3f: mrpc)" in text
    assert ("Not compared with standard (fewer than 2 seeds in an arm, or no such arm): r3f on rte; Holm covers "
            "fewer tasks for r3f.") in text
    comps = json.loads((tmp_path / "rep" / "comparison.json").read_text())
    assert [c["task"] for c in comps] == ["mrpc"] and comps[0]["p_holm"] == comps[0]["p"]  # a family of one


def test_best_is_taken_by_the_reported_primary_metric(tmp_path):
    """--metric best with --primary mrpc=f1: each run's evaluation with the best F1 (not the best accuracy's)."""
    d = fake_run(tmp_path, "mrpc", "standard", 1, 0.7, f1=0.8)
    run = json.loads((d / "results.json").read_text())
    run["evaluations"] = [{"step": 5, "metrics": {"accuracy": 0.80, "f1": 0.81}},
                          {"step": 10, "metrics": {"accuracy": 0.70, "f1": 0.85}}]
    run["best"] = {"step": 5, "metrics": run["evaluations"][0]["metrics"]}  # chosen by accuracy
    (d / "results.json").write_text(json.dumps(run))
    rows = report.summarize(report.load_runs([str(tmp_path)]), "best", primary={"mrpc": "f1"})
    assert {r["metric"]: r["values"] for r in rows} == {"f1": [0.85], "accuracy": [0.70]}  # both at step 10
    rows = report.summarize(report.load_runs([str(tmp_path)]), "best")
    assert {r["metric"]: r["values"] for r in rows} == {"accuracy": [0.80], "f1": [0.81]}


def test_power_uses_the_pooled_sd_and_small_p_is_printed_as_such(tmp_path):
    from r3f_opt.experiments import stats

    rows = [{"task": "mrpc", "metric": "accuracy", "arm": a, "method": a, "n": 3, "values": v}
            for a, v in (("standard", [0.700, 0.702, 0.704]), ("r3f", [0.70, 0.76, 0.82]))]
    (c,) = report.compare(rows)
    sd = (statistics.fmean([statistics.variance(r["values"]) for r in rows])) ** 0.5  # RMS, not the mean sd
    assert c["seeds_needed"] == stats.seeds_needed(sd, stats.PAPER_EFFECT["mrpc"])
    assert c["seeds_needed"] > stats.seeds_needed(statistics.fmean(statistics.stdev(r["values"]) for r in rows),
                                                  stats.PAPER_EFFECT["mrpc"])
    c.update(p=1e-5, p_holm=2e-5)
    assert "| <0.001 | <0.001 |" in report.comparison_markdown([c])


def test_best_metrics_of_runs_that_evaluated_at_different_steps_are_not_compared():
    def run(steps, every):
        return {"task": "rte", "hyperparameters": {"lr": 1e-4}, "settings": {"eval_every": every},
                "evaluations": [{"step": s} for s in steps]}

    runs = [run([10, 20, 30], 10), run([30], 0)]
    assert report.budget_mismatches(runs) == []
    assert report.budget_mismatches(runs, "best") == ["rte: runs evaluated at different steps, which the best "
                                                      "evaluation depends on (--eval-every)"]
    assert report.budget_mismatches([run([15, 30], "epoch"), run([15, 30], 15)], "best") == []  # the same steps


def test_runs_recorded_before_fingerprints_compare_by_what_their_paths_hold_now(tmp_path, monkeypatch):
    """An older run recorded a path as given (relative here) and no SHA-256: it compares by the content of that
    path now, against a new run's recorded SHA-256; a path that no longer exists falls back to the paths."""
    from r3f_opt.experiments.data import fingerprint

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.tsv").write_text("a\t1\n")
    monkeypatch.chdir(tmp_path)
    old = {"task": "rte", "hyperparameters": {"train_file": "d/train.tsv"}}
    new = {"task": "rte", "hyperparameters": {"train_file": str(tmp_path / "d" / "train.tsv"),
                                               "train_sha256": fingerprint(tmp_path / "d" / "train.tsv")}}
    assert report.budget_mismatches([old, new]) == []
    changed = {"task": "rte", "hyperparameters": {**new["hyperparameters"], "train_sha256": "0" * 64}}
    assert [m for m in report.budget_mismatches([old, changed]) if "train_file (its content" in m]
    gone = {"task": "rte", "hyperparameters": {"train_file": "elsewhere/train.tsv"}}
    assert [m for m in report.budget_mismatches([gone, new]) if m.startswith("rte: runs differ in train_file (")]
