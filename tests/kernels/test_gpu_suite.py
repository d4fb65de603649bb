"""bench/gpu_suite.sh, which cannot run here (no GPU): its syntax, its dry run, and its handling of a
failing step, with a stand-in python that fails one benchmark and passes everything else."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "bench" / "gpu_suite.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="bash and coreutils' timeout are needed")


def test_syntax():
    subprocess.run(["bash", "-n", str(SUITE)], check=True)


def test_dry_run_lists_every_step_within_eight_minutes(tmp_path):
    out = subprocess.run(["bash", str(SUITE), "--dry-run", "--out", str(tmp_path / "r")], check=True,
                         capture_output=True, text=True).stdout
    for step in ("environment", "tests", "sm90", "sym_kl", "spectral_norm"):
        assert f"\n{step} " in out
    assert "bench.sm90 --gpu" in out and "tests/kernels/test_sym_kl_faults.py" in out
    total = int(out.split("time limits add up to ")[1].split("s")[0])
    assert total <= 8 * 60
    assert not (tmp_path / "r").exists()  # a dry run creates nothing


def run_with_stub(tmp_path, fails: str, status: int):
    """The suite with a stand-in python that echoes its arguments and exits ``status`` when they match ``fails``."""
    stub = tmp_path / "python"
    stub.write_text(f'#!/usr/bin/env bash\necho "stub python $*"\ncase "$*" in *{fails}*) exit {status};; esac\n')
    stub.chmod(0o755)
    out = tmp_path / "results"
    proc = subprocess.run(["bash", str(SUITE), "--out", str(out)], env={**os.environ, "PYTHON": str(stub)},
                          capture_output=True, text=True, timeout=120)
    return proc, out


def test_a_failing_step_is_reported_and_the_next_steps_still_run(tmp_path):
    proc, out = run_with_stub(tmp_path, "bench.sym_kl", 3)
    assert proc.returncode == 1
    assert "1 step(s) failed: sym_kl" in proc.stderr
    summary = (out / "summary.md").read_text()
    assert "| sym_kl | FAILED (exit 3) |" in summary
    for step in ("environment", "tests", "sm90", "spectral_norm", "lm_head"):
        assert f"| {step} | ok |" in summary
    assert "command: bash bench/gpu_suite.sh --out" in summary
    assert "stub python -m bench.sym_kl" in (out / "logs" / "4-sym_kl.log").read_text()
    assert "stub python -m bench.spectral_norm" in (out / "logs" / "5-spectral_norm.log").read_text()
    assert "git " in (out / "environment.txt").read_text()


def test_test_files_run_side_by_side_and_a_failing_one_fails_the_step(tmp_path):
    """The tests step runs one pytest process per file; a failing file makes the step fail, the others' logs
    and results are kept."""
    proc, out = run_with_stub(tmp_path, "test_linear_kl_kernel", 1)
    assert proc.returncode == 1 and "1 step(s) failed: tests" in proc.stderr
    log = (out / "logs" / "2-tests.log").read_text()
    assert "== test_linear_kl_kernel: FAILED" in log and "== test_sym_kl_faults: passed" in log
    own_log = (out / "logs" / "tests-test_sym_kl_faults.log").read_text()
    assert "--junitxml=" + str(out / "tests-test_sym_kl_faults.xml") in own_log

