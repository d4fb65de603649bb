"""The benchmark code runs and reports what it measured (tiny shapes; no timing is asserted)."""
import json

import pytest
import torch

from bench import sym_kl


def test_sym_kl_sweep_writes_json_table_and_plot(tmp_path, capsys):
    out = tmp_path / "kl.json"
    sym_kl.main(["--device", "cpu", "--vocab", "3", "50", "--rows", "2", "--dtypes", "float32", "bfloat16",
                 "--impls", "r3f_triton", "r3f_torch", "eager", "--budget", "0.001", "--out", str(out)])
    result = json.loads(out.read_text())
    recs = result["records"]
    assert {(r["impl"], r["mode"], r["vocab"], r["dtype"]) for r in recs} == {
        (i, m, v, d) for i in ("r3f_torch", "eager") for m in sym_kl.MODES for v in (3, 50)
        for d in ("float32", "bfloat16")}
    for r in recs:
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["pct_copy_bw"] > 0 and r["reps"] >= 5
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["peak_extra_bytes"] > 0
    bf = next(r for r in recs if r["dtype"] == "bfloat16" and r["mode"] == "fwd+bwd" and r["vocab"] == 50)
    assert bf["gbps"] == pytest.approx(6 * 2 * 50 * 2 / (bf["median_ms"] / 1e3) / 1e9)  # 6 moves, 2 bytes
    assert "interpreter" in result["not_run"]["r3f_triton"]
    assert result["copy_bandwidth_gbps"] > 0 and result["env"]["torch"] == torch.__version__
    assert out.with_suffix(".png").stat().st_size > 0
    assert "eager" in capsys.readouterr().out


def test_sym_kl_sweep_refuses_a_wrong_implementation(monkeypatch, tmp_path):
    sym_kl.implementations.cache_clear()
    monkeypatch.setattr(sym_kl, "eager", lambda a, b: 2 * sym_kl.r3f_torch(a, b) + 1)
    try:
        with pytest.raises(AssertionError, match="eager gives"):
            sym_kl.main(["--device", "cpu", "--vocab", "7", "--rows", "3", "--impls", "eager", "--modes", "fwd",
                         "--out", str(tmp_path / "x.json"), "--no-plot"])
    finally:
        sym_kl.implementations.cache_clear()


def test_cpu_memory_profile_sees_the_gradients():
    a = torch.randn(8, 1000, requires_grad=True)
    b = torch.randn(8, 1000, requires_grad=True)
    peak = sym_kl.fwd_bwd_peak_bytes(torch.device("cpu"), sym_kl.r3f_torch, a, b)
    assert peak >= 2 * a.numel() * 4  # at least the two float32 gradients


def test_the_pytest_benchmark_files_run():
    """bench/test_*_bench.py (``pytest bench/``) each run once, untimed, so they cannot rot unseen (one once
    compared a tuple with its JSON list and failed whenever it ran)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                           "bench/"], cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout
