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


def test_method_settings_and_unofficial_eval_are_flagged(tmp_path):
    fake_run(tmp_path, "qqp", "r3f", 1, 0.5, f1=0.4, lam=1.0, official=False)  # QQP runs report f1 too
    fake_run(tmp_path, "qqp", "r3f", 2, 0.6, f1=0.5, lam=0.1, official=False)
    report.main([str(tmp_path), "--output-dir", str(tmp_path / "rep"), "--no-plot"])
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "qqp r3f: runs differ in lam (0.1, 1.0)" in text
    assert "| qqp † | accuracy | r3f | 2 |" in text and "not a GLUE dev score" in text


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


def test_methods_are_compared_with_welch_bootstrap_and_holm(tmp_path):
    """Two tasks, standard vs r3f: the printed comparison matches the statistics computed by hand, Holm runs
    over the two tasks, and n = 3 is flagged as too small for the paper's effect."""
    from r3f_opt.experiments import stats

    vals = {("mrpc", "standard"): [0.60, 0.70, 0.65], ("mrpc", "r3f"): [0.62, 0.66, 0.80],
            ("rte", "standard"): [0.50, 0.52, 0.51], ("rte", "r3f"): [0.56, 0.58, 0.57]}
    for (task, method), vs in vals.items():
        for seed, v in enumerate(vs, 1):
            fake_run(tmp_path / "runs", task, method, seed, v, f1=v)
    report.main([str(tmp_path / "runs"), "--output-dir", str(tmp_path / "rep"), "--no-plot"])
    comps = {c["task"]: c for c in json.loads((tmp_path / "rep" / "comparison.json").read_text())}
    for task in ("mrpc", "rte"):
        want = stats.welch(vals[task, "standard"], vals[task, "r3f"])
        assert comps[task]["p"] == pytest.approx(want["p"]) and comps[task]["diff"] == pytest.approx(want["diff"])
        assert comps[task]["underpowered"] and comps[task]["seeds_needed"] > 3
    holm = stats.holm([comps["mrpc"]["p"], comps["rte"]["p"]])
    assert [comps["mrpc"]["p_holm"], comps["rte"]["p_holm"]] == pytest.approx(holm)
    assert comps["rte"]["p"] < 0.01 < comps["mrpc"]["p"]
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| rte | accuracy | r3f − standard | +0.0600 |" in text and "n too small" in text
