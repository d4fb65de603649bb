"""The experiment tools under faults (issue 14): unsafe or foreign files, concurrent runs, interrupts, bad data."""
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from test_finetune import SLICE, run, same_history

from r3f_opt.experiments import finetune as ft
from r3f_opt.experiments import probe, report
from r3f_opt.experiments.data import atomic_write
from r3f_opt.experiments.glue import GlueDataError, read_examples


class _RunsCode:
    """A pickle that runs code when loaded without weights_only: it creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _args(glue_dir, out, model, *extra):
    return ["--task", "rte", "--data-dir", str(glue_dir), "--output-dir", str(out), "--model", model, *SLICE,
            "--max-steps", "8", "--seed", "1", *extra]


def test_resume_never_runs_code_from_a_crafted_checkpoint(glue_dir, tiny_model_dir, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    out.mkdir()
    torch.save({"format": ft.CHECKPOINT_FORMAT, "config": _RunsCode(marker)}, out / "checkpoint.pt")
    with pytest.raises(SystemExit, match="not a checkpoint written by r3f-finetune.*nothing in it was run"):
        ft.main(_args(glue_dir, out, tiny_model_dir, "--resume"))
    assert not marker.exists()
    torch.save({"step": 3}, out / "checkpoint.pt")  # loadable, but not ours
    with pytest.raises(SystemExit, match="not a checkpoint of this r3f-finetune version"):
        ft.main(_args(glue_dir, out, tiny_model_dir, "--resume"))


def test_atomic_write_never_follows_a_planted_temp_name(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "checkpoint.pt"
    for name in ("checkpoint.pt.tmp", ".checkpoint.pt.tmp"):
        (tmp_path / name).symlink_to(victim)
    atomic_write(target, lambda p: p.write_text("new"))
    assert victim.read_text() == "precious" and target.read_text() == "new" and not target.is_symlink()
    with pytest.raises(RuntimeError):  # a failed write leaves no temporary file behind
        atomic_write(target, lambda p: (_ for _ in ()).throw(RuntimeError("disk full")))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".checkpoint.pt.tmp", "checkpoint.pt", "checkpoint.pt.tmp", "victim.txt"])


def test_second_run_on_a_locked_output_dir_is_refused(glue_dir, tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    monkeypatch.setattr(ft, "_load_model", lambda *a: pytest.fail("the model must not load"))
    with FileLock(str(out / ".r3f-finetune.lock")):  # what a running r3f-finetune holds
        with pytest.raises(SystemExit, match="another r3f-finetune is running in"):
            ft.main(_args(glue_dir, out, tiny_model_dir))
    assert sorted(p.name for p in out.iterdir()) == [".r3f-finetune.lock"]


def test_output_dir_that_is_a_file_is_refused_before_loading(glue_dir, tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "a-file"
    out.write_text("not a folder")
    monkeypatch.setattr(ft, "_load_model", lambda *a: pytest.fail("the model must not load"))
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        ft.main(_args(glue_dir, out, tiny_model_dir))
    assert out.read_text() == "not a folder"


def test_ctrl_c_during_a_step_finishes_it_and_checkpoints(glue_dir, tiny_model_dir, tmp_path, monkeypatch, request):
    """A real SIGINT inside optimizer step 5: the step completes, the checkpoint is at step 5, resume is exact."""
    # A known handler to start from: a job started in the background (nohup ... &) begins with SIGINT ignored.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, before))
    straight = run(glue_dir, tmp_path / "a", *_args(glue_dir, tmp_path / "a", tiny_model_dir)[:0], "--task", "rte",
                   "--max-steps", "8", "--seed", "1", model=tiny_model_dir)
    real, calls = ft.RegularizedOptimizer.step, []

    def step(self, *a, **k):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGINT)  # arrives while the step runs
        return real(self, *a, **k)

    monkeypatch.setattr(ft.RegularizedOptimizer, "step", step)
    with pytest.raises(KeyboardInterrupt):
        ft.main(_args(glue_dir, tmp_path / "b", tiny_model_dir))
    monkeypatch.setattr(ft.RegularizedOptimizer, "step", real)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 5
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler was restored
    resumed = run(glue_dir, tmp_path / "b", "--task", "rte", "--max-steps", "8", "--seed", "1", "--resume",
                  model=tiny_model_dir)
    assert resumed["steps"] == 8
    same_history(straight, resumed)


@pytest.mark.parametrize("content, match", [
    (b"sentence\tlabel\nfine \t1\nbad \xff\xfe bytes \t0\n", r"train.tsv:3: not UTF-8 text \(byte 0xff\)"),
    (b"sentence\tlabel\nfine \t1\n" + b"x" * 200_000 + b"\t0\n", r"train.tsv:3: field larger than field limit"),
    (b"sentence\tlabel\nfine \t1\nshifted \textra\t0\n", r"train.tsv:3: expected 2 tab-separated columns"),
])
def test_glue_reader_errors_name_file_and_line(tmp_path, content, match):
    path = tmp_path / "train.tsv"
    path.write_bytes(content)
    with pytest.raises(GlueDataError, match=match):
        read_examples(path, "sst2")


def _results(path: Path, **final):
    path.mkdir(parents=True)
    metrics = {"accuracy": 0.6, "loss": 0.7, **final}
    run = {"task": "rte", "method": "r3f", "seed": 1, "primary_metric": "accuracy", "hyperparameters": {},
           "final": {"step": 2, "metrics": metrics}, "best": {"step": 2, "metrics": metrics}, "seconds_per_step": 1}
    (path / "results.json").write_text(json.dumps(run))


@pytest.mark.parametrize("final, match", [
    (dict(accuracy=None), "final metric 'accuracy' is None"),
    (dict(accuracy="0.6"), "final metric 'accuracy' is '0.6'"),
    (dict(accuracy=float("nan")), "final metric 'accuracy' is nan"),
])
def test_report_refuses_missing_or_non_numeric_metrics(tmp_path, final, match):
    _results(tmp_path / "runs" / "a", **final)
    with pytest.raises(SystemExit, match=match):
        report.main([str(tmp_path / "runs"), "--output-dir", str(tmp_path / "out"), "--no-plot"])
    assert not (tmp_path / "out").exists()


def test_report_outputs_are_replaced_atomically(tmp_path, monkeypatch):
    _results(tmp_path / "runs" / "a")
    out = tmp_path / "out"
    report.main([str(tmp_path / "runs"), "--output-dir", str(out)])
    before = (out / "report.png").read_bytes()

    def broken_plot(rows, path, title="", base=None):
        Path(path).write_bytes(b"half a png")
        raise RuntimeError("killed while plotting")

    monkeypatch.setattr(report, "plot", broken_plot)
    with pytest.raises(RuntimeError):
        report.main([str(tmp_path / "runs"), "--output-dir", str(out)])
    assert (out / "report.png").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["comparison.json", "report.json", "report.md", "report.png"]


@pytest.mark.parametrize("poison", [b"garbage, not a torch file", "pickle", "wrong shape"])
def test_feature_cache_entry_that_cannot_be_used_is_a_miss(tiny_model_dir, tmp_path, poison):
    texts = [("a fine film",), ("a dull one",), ("plain",)]
    fresh = probe.extract_features(tiny_model_dir, texts, max_length=16)
    cache = tmp_path / "features"
    probe.extract_features(tiny_model_dir, texts, max_length=16, cache_dir=str(cache))
    (entry,) = cache.glob("*.pt")
    marker = tmp_path / "pwned"
    if poison == "pickle":
        torch.save(_RunsCode(marker), entry)
    elif poison == "wrong shape":
        torch.save(torch.zeros(2, 5), entry)
    else:
        entry.write_bytes(poison)
    got = probe.extract_features(tiny_model_dir, texts, max_length=16, cache_dir=str(cache))
    torch.testing.assert_close(got, fresh)
    assert not marker.exists()
    torch.testing.assert_close(torch.load(entry, weights_only=True), fresh)  # rewritten


def test_stage_spec_is_recorded_only_after_the_old_stage_is_invalidated(tmp_path, tiny_model_dir, monkeypatch):
    """A crash right after a stage's settings change must not let the old results pass for the new ones."""
    calls = []

    def fake_finetune(argv):  # what r3f-finetune leaves behind, without training
        out = Path(argv[argv.index("--output-dir") + 1])
        if "crash" in calls:
            calls.remove("crash")
            raise KeyboardInterrupt
        calls.append(argv[argv.index("--lr") + 1])
        (out / "model").mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"lr": argv[argv.index("--lr") + 1]}))

    monkeypatch.setattr(probe.ft, "main", fake_finetune)
    args = probe.build_parser().parse_args(["generalization", "--source", "rte", "--targets", "rte",
                                            "--output-dir", str(tmp_path)])
    args.model, args.data_dir, args.lr = tiny_model_dir, None, 1e-4
    out = tmp_path / "stage"
    probe._finetune_stage(args, "rte", "r3f", 1, tiny_model_dir, out)
    assert calls == ["0.0001"]
    args.lr = 3e-4
    calls.append("crash")
    with pytest.raises(KeyboardInterrupt):
        probe._finetune_stage(args, "rte", "r3f", 1, tiny_model_dir, out)
    probe._finetune_stage(args, "rte", "r3f", 1, tiny_model_dir, out)  # must fine-tune, not reuse lr 1e-4
    assert calls == ["0.0001", "0.0003"]
    assert json.loads((out / "results.json").read_text()) == {"lr": "0.0003"}
    (out / "stage.json").write_text('{"argv": ["--tas')  # truncated: re-run the stage, no crash
    probe._finetune_stage(args, "rte", "r3f", 1, tiny_model_dir, out)
    assert calls == ["0.0001", "0.0003", "0.0003"]
