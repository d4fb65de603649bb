"""``python -m bench.methods`` runs and reports what it counted (a tiny BERT, tiny batches; no timing asserted)."""
import json

import pytest

from helpers import REPO

methods = pytest.importorskip("bench.methods", reason="the bench package is not importable")

# name -> (forwards, of them without a graph, parameter backwards, input-only backwards, logits backpropagated)
EXPECTED = {
    "standard": (1, 0, 1, 0, 1),
    "standard_wrapped": (1, 0, 1, 0, 1),
    "r3f": (2, 0, 1, 0, 2),
    "r3f_nograd": (2, 1, 1, 0, 1),
    "r4f": (2, 0, 1, 0, 2),
    "rdrop": (2, 0, 1, 0, 2),
    "smart_s1": (3, 0, 1, 1, 3),
    "smart_s2": (4, 0, 1, 2, 4),
    "freelb_k2": (2, 0, 2, 0, 2),
    "freelb_k3": (3, 0, 3, 0, 3),
}
KEYS = ("forwards", "forwards_no_grad", "param_backwards", "input_backwards", "outputs_backpropagated")


def test_methods_bench_writes_json_table_and_plot(tiny_model_dir, glue_dir, tmp_path, capsys):
    out = tmp_path / "m.json"
    result = methods.main(["--model", tiny_model_dir, "--data-dir", str(glue_dir.parent), "--rounds", "2",
                           "--batch-size", "2", "--max-length", "16", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert set(EXPECTED) == set(methods.METHODS)
    recs = {r["method"]: r for r in result["records"]}
    assert list(recs) == list(methods.METHODS) and result["config"]["tasks"] == ["sst2", "mrpc"]
    for name, rec in recs.items():
        assert rec["counts_constant"], (name, rec["counts_seen"])
        assert tuple(rec["counts"][k] for k in KEYS) == EXPECTED[name], name
        for t in ("sst2", "mrpc"):
            assert len(result["raw_times_s"][t][name]) == 2
            assert rec["per_task"][t]["median_s"] > 0
            assert rec["peak_bytes"][t] > 0  # at least the gradients
        assert rec["all_tasks"]["paired_ratio_min"] <= rec["all_tasks"]["paired_ratio_median"] \
            <= rec["all_tasks"]["paired_ratio_max"]
    assert recs["standard"]["all_tasks"]["paired_ratio_median"] == 1.0
    assert {n: (r["paper"]["forwards"], r["paper"]["backwards"]) for n, r in recs.items()} == {
        "standard": (1, 1), "standard_wrapped": (1, 1), "r3f": (2, 1), "r3f_nograd": (2, 1), "r4f": (2, 1),
        "rdrop": (2, 1), "smart_s1": (2, 2), "smart_s2": (3, 3), "freelb_k2": (3, 3), "freelb_k3": (4, 4)}
    assert recs["r3f"]["paper"]["predicted_ratio"] == pytest.approx(4 / 3)
    # the regulariser is really there: R3F's KL in train mode, SMART's KL at its start and its end
    assert all(x > 0 for x in result["regulariser"]["sst2"]["r3f"])
    assert all(set(t) >= {"kl_start", "delta_max"} for t in result["terms"]["mrpc"]["smart_s1"])
    meta = result["meta"]
    assert meta["command"].startswith("python -m bench.methods") and meta["torch_num_threads"] == 1
    assert {"torch", "transformers", "cpu_model", "date_utc", "git_commit"} <= set(meta)
    assert len(result["round_orders"]) == 2 and len(result["round_orders"][0]) == len(methods.METHODS)
    assert out.with_suffix(".png").stat().st_size > 0
    printed = capsys.readouterr()
    assert "| smart_s2 |" in printed.out and "ETA" in printed.err


def test_methods_bench_defaults_stay_out_of_the_repository():
    assert not str(methods.DEFAULT_OUT).startswith(str(REPO))
    assert methods.SAVED == REPO / "bench" / "results" / "methods_cpu.json"
    with pytest.raises(SystemExit):
        methods.parse_args(["--save", "--out", "x.json"])
    assert methods.parse_args(["--methods", "r3f"]).methods == ["standard", "r3f"]
