"""GLUE readers (formats and bad files) and metric functions against hand-computed values."""
import math
from pathlib import Path

import pytest

from r3f_opt.experiments.glue import TASKS, GlueDataError, accuracy, compute_metrics, f1, mcc, read_examples, resolve

# preds/labels: TP = 2 (0, 3), FP = 1 (2), FN = 1 (4), TN = 2 (1, 5)
PREDS, LABELS = [1, 0, 1, 1, 0, 0], [1, 0, 0, 1, 1, 0]


def test_metrics_hand_computed():
    assert accuracy(PREDS, LABELS) == pytest.approx(4 / 6)
    assert f1(PREDS, LABELS) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert mcc(PREDS, LABELS) == pytest.approx((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3))
    assert mcc([1, 0, 1], [1, 0, 1]) == pytest.approx(1.0)
    assert mcc([0, 1, 0], [1, 0, 1]) == pytest.approx(-1.0)
    # Degenerate: no positive prediction -> f1 0 and mcc 0 (a zero factor), as sklearn/GLUE.
    assert f1([0, 0, 0], [1, 0, 1]) == 0.0 and mcc([0, 0, 0], [1, 0, 1]) == 0.0
    assert accuracy([2, 1, 0], [2, 0, 0]) == pytest.approx(2 / 3)  # multi-class (MNLI)


def test_compute_metrics_keys_per_task():
    assert set(compute_metrics("mrpc", PREDS, LABELS)) == {"accuracy", "f1"}
    assert set(compute_metrics("qqp", PREDS, LABELS)) == {"accuracy", "f1"}
    assert list(compute_metrics("cola", PREDS, LABELS)) == ["mcc", "accuracy"]  # the primary metric first
    assert set(compute_metrics("sst2", PREDS, LABELS)) == {"accuracy"}
    with pytest.raises(ValueError, match="as many predictions"):
        accuracy([1], [1, 0])


def write(path, text, bom=False):
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def test_formats(tmp_path):
    texts, labels = read_examples(write(tmp_path / "c.tsv", "gj04\t1\t\tThe \"sailors\" rode.\ngj04\t0\t*\tRode sailors the.\n"), "cola")
    assert texts == [('The "sailors" rode.',), ("Rode sailors the.",)] and labels == [1, 0]
    mrpc = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t7\t8\tA \"b\tC d\n"
    assert read_examples(write(tmp_path / "m.tsv", mrpc, bom=True), "mrpc") == ([('A "b', "C d")], [1])
    rte = "index\tsentence1\tsentence2\tlabel\n0\tx\ty\tnot_entailment\n1\tu\tv\tentailment\n"
    assert read_examples(write(tmp_path / "r.tsv", rte), "rte") == ([("x", "y"), ("u", "v")], [1, 0])
    # MNLI: columns found by header name, so the original 12-column layout reads too.
    mnli = "index\tgenre\tsentence1\tsentence2\tgold_label\n0\tfic\ta\tb\tcontradiction\n"
    assert read_examples(write(tmp_path / "n.tsv", mnli), "mnli") == ([("a", "b")], [2])


@pytest.mark.parametrize("name,text,match", [
    ("empty", "", "empty"),
    ("blank", "\n\n", "empty"),
    ("header_only", "sentence\tlabel\n", r"h\.tsv:1: the file holds only the header line"),
    ("tabs_only_row", "sentence\tlabel\na\t1\n\t\n", r"h\.tsv:3: unknown label '' for task sst2"),
    ("wrong_header", "text\tlabel\na\t1\n", r"h\.tsv:1: the header lacks column\(s\) \['sentence'\]"),
    ("short_row", "sentence\tlabel\na\t1\nb\n", r"h\.tsv:3: expected 2 tab-separated columns .* found 1"),
    ("unknown_label", "sentence\tlabel\na\t1\nb\tpositive\n", r"h\.tsv:3: unknown label 'positive' for task sst2"),
])
def test_bad_files(tmp_path, name, text, match):
    with pytest.raises(GlueDataError, match=match):
        read_examples(write(tmp_path / "h.tsv", text), "sst2")


def test_bad_cola_and_missing(tmp_path):
    with pytest.raises(GlueDataError, match=r"c\.tsv:2: expected 4 tab-separated columns"):
        read_examples(write(tmp_path / "c.tsv", "s\t1\t\ta\ns\t1\ta\n"), "cola")
    with pytest.raises(GlueDataError, match="no such file.*--data-dir"):
        read_examples(tmp_path / "nope.tsv", "rte")


def test_real_files_match_published_counts(glue_dir):
    counts = {"sst2": (872, 428), "rte": (277, 146), "mrpc": (408, 129), "cola": (1043, 322), "qnli": (5463, 2702)}
    for name, (n, n0) in counts.items():
        task = TASKS[name]
        _, labels = read_examples(glue_dir / task.folder / task.eval_file, name)
        assert (len(labels), labels.count(0)) == (n, n0), name


def test_resolve_relative_to_the_data_dir_or_for_a_named_file_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "data" / "RTE").mkdir(parents=True)
    (tmp_path / "RTE").mkdir()
    for f in ("data/RTE/both.tsv", "RTE/both.tsv", "RTE/cwd_only.tsv"):
        (tmp_path / f).write_text("x")
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    assert resolve("RTE/both.tsv", data, from_cwd=True) == data / "RTE" / "both.tsv"  # the data folder wins
    assert resolve("RTE/cwd_only.tsv", data, from_cwd=True) == tmp_path / "RTE" / "cwd_only.tsv"  # made absolute
    assert resolve("RTE/cwd_only.tsv", data) == data / "RTE" / "cwd_only.tsv"  # a task's own file: never the cwd
    assert resolve("RTE/neither.tsv", data, from_cwd=True) == data / "RTE" / "neither.tsv"  # the error names this
    assert resolve(tmp_path / "RTE" / "both.tsv", data) == tmp_path / "RTE" / "both.tsv"
    assert resolve("RTE/both.tsv", None) == Path("RTE/both.tsv")
