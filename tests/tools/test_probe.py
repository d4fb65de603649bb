"""r3f-probe: the probe trainer, CKA, weight distance, feature caching and the three subcommands."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from r3f_opt.experiments import finetune as ft
from r3f_opt.experiments import probe
from r3f_opt.experiments.data import load_examples


def test_probe_matches_hand_solved_case():
    # x = ±1 with labels 1/0: by symmetry b = 0 and W = [[-a, a]]; the objective is
    # log(1 + exp(-2a)) + l2·a², stationary where a = 1 / (l2 (1 + exp(2a))). Solve that by bisection.
    l2 = 0.1
    lo, hi = 0.0, 10.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid < 1 / (l2 * (1 + math.exp(2 * mid))) else (lo, mid)
    p = probe.train_probe(torch.tensor([[1.0], [-1.0]]), torch.tensor([1, 0]), 2, l2=l2)
    assert p["w"].flatten().tolist() == pytest.approx([-lo, lo], abs=1e-7)
    assert p["b"].tolist() == pytest.approx([0.0, 0.0], abs=1e-9)


def test_probe_is_a_stationary_point_and_deterministic():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 5, generator=g) * 3 + 1, torch.randint(0, 3, (60,), generator=g)
    p = probe.train_probe(x, y, 3, l2=0.05)
    z = ((x.double() - p["mean"]) / p["std"])
    w, b = p["w"].clone().requires_grad_(), p["b"].clone().requires_grad_()
    loss = torch.nn.functional.cross_entropy(z @ w + b, y) + 0.025 * (w * w).sum()
    gw, gb = torch.autograd.grad(loss, [w, b])
    assert gw.abs().max() < 1e-6 and gb.abs().max() < 1e-6
    q = probe.train_probe(x, y, 3, l2=0.05)
    assert torch.equal(p["w"], q["w"]) and torch.equal(probe.probe_predict(p, x), probe.probe_predict(q, x))
    with pytest.raises(ValueError, match="need features"):
        probe.train_probe(x, y[:3], 3)


def numpy_cka(x, y):
    """CKA from centred Gram matrices, HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    n = len(x)
    h = np.eye(n) - 1 / n
    k, l_ = h @ x @ x.T @ h, h @ y @ y.T @ h
    return np.sum(k * l_) / np.sqrt(np.sum(k * k) * np.sum(l_ * l_))


def test_linear_cka():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 7)), rng.normal(size=(40, 5))
    assert probe.linear_cka(torch.tensor(x), torch.tensor(y)) == pytest.approx(numpy_cka(x, y), rel=1e-10)
    assert probe.linear_cka(torch.tensor(x), torch.tensor(x)) == pytest.approx(1.0, rel=1e-12)
    q, _ = np.linalg.qr(rng.normal(size=(7, 7)))
    assert probe.linear_cka(torch.tensor(x), torch.tensor(3 * x @ q + 5)) == pytest.approx(1.0, rel=1e-10)
    z = rng.normal(size=(40, 6))
    z -= z.mean(0)
    basis, _ = np.linalg.qr(z)  # orthonormal, centred columns: X = basis[:, :3] and Y = basis[:, 3:] are orthogonal
    assert probe.linear_cka(torch.tensor(basis[:, :3]), torch.tensor(basis[:, 3:])) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="same examples"):
        probe.linear_cka(torch.zeros(3, 2), torch.zeros(4, 2))


def test_features_cached_and_pooled(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModel, AutoTokenizer

    texts = [("a short one",), ("a somewhat longer sentence than the first",)]
    cache = tmp_path / "cache"
    f1 = probe.extract_features(tiny_model_dir, texts, cache_dir=str(cache))
    # mean pooling over the tokens of each example alone (no padding) gives the same
    tok, model = AutoTokenizer.from_pretrained(tiny_model_dir), AutoModel.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        ref = torch.stack([model(**tok(t[0], return_tensors="pt")).last_hidden_state[0].mean(0) for t in texts])
    assert torch.allclose(f1, ref, atol=1e-5)
    assert len(list(cache.glob("*.pt"))) == 1  # one entry (beside it, its lock file)

    def refuse(*a, **k):
        raise AssertionError("the model was loaded although the features are cached")

    real = probe._feature_model
    monkeypatch.setattr(probe, "_feature_model", refuse)
    assert torch.equal(probe.extract_features(tiny_model_dir, texts, cache_dir=str(cache)), f1)
    for kw in ({"texts": texts[:1]}, {"max_length": 4}, {"pooling": "cls"}):  # other settings: not cached
        with pytest.raises(AssertionError, match="was loaded"):
            probe.extract_features(tiny_model_dir, **{"texts": texts, "cache_dir": str(cache), **kw})
    monkeypatch.setattr(probe, "_feature_model", real)
    with torch.no_grad():  # other weights: a new entry with other features
        model.encoder.layer[0].output.dense.weight.add_(torch.randn(32, 64))  # (a constant shift: LayerNorm removes it)
    model.save_pretrained(tmp_path / "moved")
    tok.save_pretrained(tmp_path / "moved")
    f2 = probe.extract_features(str(tmp_path / "moved"), texts, cache_dir=str(cache))
    assert len(list(cache.glob("*.pt"))) == 2 and not torch.allclose(f1, f2)


def test_param_distance(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    assert probe.param_distance(tiny_model_dir, tiny_model_dir)["l2"] == 0.0
    m = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        m.bert.encoder.layer[0].output.dense.weight.add_(0.5)  # 32 x 64 entries moved by 0.5
        m.bert.pooler.dense.weight.add_(9.0)  # excluded
    m.save_pretrained(tmp_path / "moved")
    d = probe.param_distance(str(tmp_path / "moved"), tiny_model_dir)
    assert d["l2"] == pytest.approx(0.5 * math.sqrt(32 * 64), rel=1e-6) and 0 < d["relative"] < 1
    # A base encoder folder (as all-MiniLM-L6-v2 ships) against a classification checkpoint: all keys match.
    m.bert.save_pretrained(tmp_path / "base")
    n_float = sum(1 for k, v in m.bert.state_dict().items() if "pooler" not in k and v.is_floating_point())
    assert probe.param_distance(str(tmp_path / "moved"), str(tmp_path / "base"))["tensors"] == n_float


TINY = ["--steps", "2", "--batch-size", "4", "--max-length", "24", "--max-train-examples", "24",
        "--stage-eval-examples", "8", "--probe-train-examples", "24", "--probe-eval-examples", "16",
        "--cka-examples", "8", "--seeds", "1", "--methods", "standard", "r3f", "--no-progress"]


@pytest.mark.parametrize("command,extra,n_stages,probed", [
    ("generalization", ["--source", "rte", "--targets", "mrpc", "cola"], 1, {"mrpc", "cola"}),
    ("degradation", ["--chain", "rte", "mnli"], 2, {"rte"}),  # a 3-label stage after a 2-label one
    ("retention", ["--chain", "rte", "mrpc", "--cycles", "2"], 4, {"rte", "mrpc"}),
])
def test_subcommands_end_to_end(glue_dir, tiny_model_dir, tmp_path, monkeypatch, capsys, command, extra, n_stages,
                                probed):
    argv = [command, *extra, "--data-dir", str(glue_dir), "--model", tiny_model_dir, "--output-dir",
            str(tmp_path / "out"), *TINY]
    probe.main(argv)
    res = json.loads((tmp_path / "out" / f"{command}.json").read_text())
    rows = res["rows"]
    assert res["complete"] is True
    assert rows[0]["method"] == "pretrained" and rows[0]["cka_to_pretrained"] == pytest.approx(1.0)
    assert len(rows) == 1 + 2 * n_stages
    for r in rows:
        assert set(r["probes"]) == probed and 0 <= r["cka_to_pretrained"] <= 1 + 1e-9
    tuned = rows[1:]
    assert all(r["param_distance"]["l2"] > 0 for r in tuned)
    assert [r["stage"] for r in tuned[:n_stages]] == list(range(1, n_stages + 1))
    if command == "retention":
        assert [r["cycle"] for r in tuned[:4]] == [1, 1, 2, 2] and [r["after"] for r in tuned[:4]] == ["rte", "mrpc"] * 2
    if n_stages > 1:  # each stage starts from the previous stage's weights
        s1, s2 = tuned[n_stages], tuned[n_stages + 1]  # r3f seed 1, stages 1 and 2
        assert json.loads((Path(s2["checkpoint"]).parent / "results.json").read_text())["hyperparameters"][
            "model"] == s1["checkpoint"]
        assert probe.param_distance(s2["checkpoint"], s1["checkpoint"])["l2"] < s2["param_distance"]["l2"]
    md = (tmp_path / "out" / f"{command}.md").read_text()
    assert "| pretrained | 0 | 0 | – |" in md and "| r3f | 1 | 1 | rte |" in md
    assert (tmp_path / "out" / f"{command}.png").read_bytes()[:4] == b"\x89PNG"

    # A rerun reuses the fine-tuned stages and the cached features: nothing is trained or extracted again,
    # also when the pretrained model is a copy at another path (stages are keyed by weights, not paths).
    real_main = ft.main
    monkeypatch.setattr(ft, "main", lambda *a: pytest.fail("a finished stage was fine-tuned again"))
    monkeypatch.setattr(probe, "_feature_model", lambda *a: pytest.fail("cached features were extracted again"))
    capsys.readouterr()
    probe.main(argv)
    assert json.loads((tmp_path / "out" / f"{command}.json").read_text())["rows"] == rows
    assert capsys.readouterr().out.count("with the same arguments and input: reused") == 2 * n_stages  # said so
    # ... and when the data folder is given by a relative path.
    shutil.copytree(tiny_model_dir, tmp_path / "copy")
    monkeypatch.chdir(glue_dir.parent)
    probe.main([{tiny_model_dir: str(tmp_path / "copy"), str(glue_dir): glue_dir.name}.get(a, a) for a in argv])
    moved = json.loads((tmp_path / "out" / f"{command}.json").read_text())["rows"]
    assert [r["probes"] for r in moved] == [r["probes"] for r in rows]
    # With another budget the stages are fine-tuned afresh, not silently reused.
    monkeypatch.undo()  # new checkpoints need their features extracted
    calls = []
    monkeypatch.setattr(ft, "main", lambda a: (calls.append(a), real_main(a)))
    probe.main(argv + ["--lam", "0.5"])
    # standard reads no lam: its stages are reused (run with the default, as before); r3f's run afresh
    assert len(calls) == n_stages and all("--overwrite" in a and a[a.index("--method") + 1] == "r3f" for a in calls)
    new = json.loads((tmp_path / "out" / f"{command}.json").read_text())["rows"]
    assert new[:1 + n_stages] == rows[:1 + n_stages] and new[1 + n_stages:] != rows[1 + n_stages:]


def test_probe_data_says_when_the_eval_set_is_the_full_official_dev(glue_dir):
    import argparse

    args = lambda k: argparse.Namespace(data_dir=glue_dir, probe_train_examples=8, probe_eval_examples=k)  # noqa: E731
    full = probe._probe_data(args(10_000), "rte")  # a cap above RTE's 277 dev rows keeps them all
    assert full["official_dev"] and len(full["eval"][1]) == 277 and len(full["train"][1]) == 8
    assert probe._probe_data(args(None), "rte")["eval"] == full["eval"]
    part = probe._probe_data(args(50), "rte")
    assert not part["official_dev"] and len(part["eval"][1]) == 50
    assert part["eval"] == load_examples(glue_dir / "RTE" / "dev.tsv", "rte", 50)  # the subset r3f-finetune draws
    assert not probe._probe_data(args(None), "qqp")["official_dev"]  # QQP: a held-out slice of train


def test_a_checkpoint_missing_encoder_weights_is_an_error(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_model_dir, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if "layer.1." not in k}, weights, metadata={"format": "pt"})
    with pytest.raises(SystemExit, match=r"lacks .*encoder.layer.1"):
        probe._load_encoder(str(tmp_path / "m"))
    assert probe._load_encoder(tiny_model_dir).config.num_hidden_layers == 2  # a complete one loads


def test_rows_are_saved_as_they_come(glue_dir, tiny_model_dir, tmp_path, monkeypatch):
    """A crash in stage 2 keeps stage 1's probe row on disk, marked incomplete."""
    real = probe._finetune_stage
    calls = []

    def crash_on_second(*a):
        calls.append(a)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*a)

    monkeypatch.setattr(probe, "_finetune_stage", crash_on_second)
    with pytest.raises(RuntimeError, match="boom"):
        probe.main(["degradation", "--chain", "rte", "mrpc", "--data-dir", str(glue_dir), "--model", tiny_model_dir,
                    "--output-dir", str(tmp_path / "out"), *TINY])
    res = json.loads((tmp_path / "out" / "degradation.json").read_text())
    assert res["complete"] is False and [(r["method"], r["stage"]) for r in res["rows"]] == [
        ("pretrained", 0), ("standard", 1)]
    assert not (tmp_path / "out" / "degradation.md").exists()


def test_bad_input(glue_dir, tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit, match="bad data: .*no such file"):
        probe.main(["degradation", "--chain", "rte", "mrpc", "--data-dir", str(tmp_path), "--model", tiny_model_dir,
                    "--output-dir", str(tmp_path / "o"), *TINY])
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        probe.main(["generalization", "--source", "sst5", "--targets", "rte", "--output-dir", str(tmp_path)])
    assert "invalid choice: 'sst5'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        probe.main(["retention", "--chain", "rte", "--cycles", "0", "--output-dir", str(tmp_path), "--model",
                    tiny_model_dir])
    assert "--cycles must be a finite number > 0" in capsys.readouterr().err
    for flags, message in ((["--seeds", "1", "1"], "--seeds lists [1] more than once"),
                           (["--methods", "r3f", "r3f"], "--methods lists ['r3f'] more than once"),
                           (["--lr", "inf"], "--lr must be a finite number > 0, got inf")):
        with pytest.raises(SystemExit):
            probe.main(["retention", "--chain", "rte", "--output-dir", str(tmp_path), "--model", tiny_model_dir,
                        *flags])
        assert message in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit):
        probe.main(["retention", "--chain", "rte", "--output-dir", str(tmp_path / "afile"), "--model", tiny_model_dir])
    assert "--output-dir" in capsys.readouterr().err and (tmp_path / "afile").read_text() == "x"


def test_cka_probe_set_is_never_silently_smaller_than_asked(glue_dir, tmp_path):
    import argparse

    def prober(probe_eval, cka):
        return probe.Prober(argparse.Namespace(data_dir=glue_dir, probe_train_examples=8, probe_eval_examples=probe_eval,
                                               cka_task=None, cka_examples=cka, model=None, output_dir=str(tmp_path)),
                            ["rte"], "rte")

    assert len(prober(None, 500).cka_texts) == 277  # RTE's whole dev set is smaller
    assert len(prober(100, 50).cka_texts) == 50
    assert len(prober(277, 300).cka_texts) == 277  # --probe-eval-examples as large as the dev set cuts nothing
    with pytest.raises(SystemExit, match="--cka-examples 60 is more than the 50 rte dev examples --probe-eval-examples"):
        prober(50, 60)
