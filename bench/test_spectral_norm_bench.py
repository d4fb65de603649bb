"""pytest-benchmark view of the R4F head normalisation: ``pytest bench/ -k spectral_norm``.

Forward+backward per call (a training forward of the normalised weight, then the backward of <G, W_SN>).
On CPU the Triton kernel runs in its interpreter, only on the small heads and for a few rounds: those
numbers measure the interpreter, not the kernel. ``python -m bench.spectral_norm`` is the fuller report.
"""
import json

import pytest
import torch

from bench.spectral_norm import HEADS, kernels, main, make_heads, step  # sets TRITON_INTERPRET on CPU

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMALL = [(C, H) for C, H in HEADS if C * H <= 4096]


@pytest.mark.parametrize("head", HEADS if DEVICE.type == "cuda" else SMALL, ids=lambda h: f"{h[0]}x{h[1]}")
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_spectral_norm_fwd_bwd(benchmark, impl, head):
    heads = make_heads(*head, DEVICE)
    G = torch.randn(*head, device=DEVICE)
    with kernels("torch"):
        want = step(heads["torch"], G)
    with kernels(impl):
        got = step(heads["triton"], G)  # ours (kernel, or torch's maths under "torch"), from the same state

        def run():
            out = step(heads[impl], G)
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            return out

        if DEVICE.type == "cpu" and impl == "triton":
            benchmark.pedantic(run, rounds=3, iterations=1)
        else:
            benchmark(run)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item())


def test_report_runs_and_writes_json(tmp_path):
    out = tmp_path / "sn.json"
    result = main(["--heads", "2x768", "3x1024", "--reps", "2", "--rounds", "1", "--cpu-kernel-max", "1536",
                   "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))  # tuples (load average) are lists in JSON
    rows = {(r["head"], r["impl"]): r for r in result["results"]}
    assert set(rows) == {(h, i) for h in ("2x768", "3x1024") for i in ("torch", "triton")}
    kernel = rows["2x768", "triton"]
    assert kernel["path"] == "fused" and kernel["output_rel_diff"] < 1e-6 and kernel["grad_rel_diff"] < 1e-5
    if DEVICE.type == "cpu":
        assert kernel["triton_launches"] == 2 and kernel["median_ms"] is None  # one launch fwd, one bwd
        assert "skipped" in rows["3x1024", "triton"]  # 3072 elements > --cpu-kernel-max
