"""GLUE tasks as they are in the original TSV files: readers with clear errors, and the GLUE metrics."""
from __future__ import annotations

import codecs
import csv
import io
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

__all__ = ["TASKS", "Task", "GlueDataError", "read_examples", "accuracy", "f1", "mcc", "compute_metrics",
           "majority_baseline"]


class GlueDataError(ValueError):
    """A GLUE data file that cannot be read: the message names the file and line."""


@dataclass(frozen=True)
class Task:
    name: str
    folder: str
    text_columns: tuple  # header names, or column indices for a file without header (CoLA)
    label_column: Union[str, int]
    labels: tuple  # label strings in id order
    train_file: str
    eval_file: str
    eval_official: bool  # is eval_file the official GLUE dev set?
    metrics: tuple  # GLUE metrics of the task, the first is the primary one
    header: bool = True
    n_columns: Optional[int] = None  # exact column count for a file without header

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]


_NLI2 = ("entailment", "not_entailment")
TASKS = {t.name: t for t in [
    Task("sst2", "SST-2", ("sentence",), "label", ("0", "1"), "train.tsv", "dev.tsv", True, ("accuracy",)),
    # CoLA: no header; columns source, label, original annotation (often blank), sentence.
    Task("cola", "CoLA", (3,), 1, ("0", "1"), "train.tsv", "dev.tsv", True, ("mcc", "accuracy"), header=False,
         n_columns=4),
    Task("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), "train.tsv", "dev.tsv", True,
         ("accuracy", "f1")),
    Task("rte", "RTE", ("sentence1", "sentence2"), "label", _NLI2, "train.tsv", "dev.tsv", True, ("accuracy",)),
    Task("qnli", "QNLI", ("question", "sentence"), "label", _NLI2, "train_subset9k.tsv", "dev.tsv", True,
         ("accuracy",)),
    Task("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction"),
         "train_subset9k.tsv", "dev_matched.tsv", True, ("accuracy",)),
    # No official QQP dev set is available here: the default eval file is a held-out slice of train.
    Task("qqp", "QQP", ("question1", "question2"), "is_duplicate", ("0", "1"), "train_subset9k.tsv",
         "heldout1k_from_train.tsv", False, ("accuracy", "f1")),
]}


def default_data_dir() -> Optional[str]:
    """The CLIs' default ``--data-dir``: ``$R3F_GLUE_DIR``, else ``$R3F_DATA_DIR/glue`` (the shared data
    folder's GLUE part), else None."""
    if os.environ.get("R3F_GLUE_DIR"):
        return os.environ["R3F_GLUE_DIR"]
    return os.path.join(os.environ["R3F_DATA_DIR"], "glue") if os.environ.get("R3F_DATA_DIR") else None


def resolve(path: Union[str, os.PathLike], data_dir: Optional[Union[str, os.PathLike]],
            from_cwd: bool = False) -> Path:
    """``path`` as given if absolute or if there is no ``data_dir``, else relative to ``data_dir``. With
    ``from_cwd`` (a file the user named, e.g. ``--train-file ../data/MRPC/train.tsv``), a path that exists
    only relative to the current folder is taken from there, made absolute."""
    p = Path(path)
    if p.is_absolute() or data_dir is None:
        return p
    joined = Path(data_dir) / p
    return p.absolute() if from_cwd and p.is_file() and not joined.exists() else joined


def _rows(path: Path) -> list[tuple[int, list[str]]]:
    """The non-blank rows of a TSV file with their 1-based line numbers; undecodable bytes and csv errors
    (a field over the csv size limit) become :class:`GlueDataError` with the file and line."""
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):  # MRPC starts with a BOM
        data = data[len(codecs.BOM_UTF8):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise GlueDataError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}); GLUE files are UTF-8: "
                            "convert the file (e.g. iconv -t utf-8) or pass another one") from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)  # GLUE rows hold bare '"'
    rows = []
    try:
        for row in reader:
            if row != [] and row != [""]:  # skip blank lines
                rows.append((reader.line_num, row))
    except csv.Error as e:
        raise GlueDataError(f"{path}:{reader.line_num}: {e}; is this a tab-separated GLUE file?") from None
    return rows


def read_examples(path: Union[str, os.PathLike], task: Union[str, Task]) -> tuple[list[tuple[str, ...]], list[int]]:
    """Read a task's TSV file: (texts per example, label ids). Raises :class:`GlueDataError` naming the file
    and line for a missing file, an empty file, bytes that are not UTF-8, a field over the csv size limit, a
    row with more or fewer columns than the task's or an unknown label."""
    task = TASKS[task] if isinstance(task, str) else task
    path = Path(path)
    if not path.is_file():
        raise GlueDataError(f"{path}: no such file (pass --data-dir with the folder holding {task.folder}/, "
                            "or name a file that exists)")
    rows = _rows(path)
    if not rows:
        raise GlueDataError(f"{path}: the file is empty; expected the GLUE {task.folder} TSV format")
    if task.header:
        line, header = rows.pop(0)
        missing = [c for c in (*task.text_columns, task.label_column) if c not in header]
        if missing:
            raise GlueDataError(f"{path}:{line}: the header lacks column(s) {missing} of GLUE {task.folder} "
                                f"(found {header}); is this a {task.folder} file?")
        cols = [header.index(c) for c in task.text_columns]
        label_col, width = header.index(task.label_column), len(header)
    else:
        cols, label_col, width = list(task.text_columns), task.label_column, task.n_columns
    if not rows:
        raise GlueDataError(f"{path}:{line}: the file holds only the header line, no examples; give a file "
                            f"with at least one {task.folder} example")
    label_ids = {name: i for i, name in enumerate(task.labels)}
    texts, labels = [], []
    for line, row in rows:
        if len(row) != width:
            raise GlueDataError(f"{path}:{line}: expected {width} tab-separated columns for GLUE {task.folder}, "
                                f"found {len(row)}")
        label = row[label_col].strip()
        if label not in label_ids:
            raise GlueDataError(f"{path}:{line}: unknown label {label!r} for task {task.name}; expected one of "
                                f"{list(task.labels)}")
        texts.append(tuple(row[c] for c in cols))
        labels.append(label_ids[label])
    return texts, labels


# -- metrics (binary f1 and mcc take label 1 as the positive class, as GLUE does) ----------------------
def _check(preds: Sequence[int], labels: Sequence[int]) -> None:
    if len(preds) != len(labels) or not labels:
        raise ValueError(f"need as many predictions as labels, and at least one (got {len(preds)}, {len(labels)})")


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    _check(preds, labels)
    return sum(int(p) == int(y) for p, y in zip(preds, labels)) / len(labels)


def _confusion(preds: Sequence[int], labels: Sequence[int]) -> tuple[int, int, int, int]:
    _check(preds, labels)
    pairs = [(int(p), int(y)) for p, y in zip(preds, labels)]
    tp = sum(p == 1 and y == 1 for p, y in pairs)
    fp = sum(p == 1 and y != 1 for p, y in pairs)
    fn = sum(p != 1 and y == 1 for p, y in pairs)
    return tp, fp, fn, len(pairs) - tp - fp - fn


def f1(preds: Sequence[int], labels: Sequence[int]) -> float:
    """F1 of class 1: 2TP / (2TP + FP + FN), 0 when there is no positive prediction or label."""
    tp, fp, fn, _ = _confusion(preds, labels)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def mcc(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)); 0 if a factor is 0."""
    tp, fp, fn, tn = _confusion(preds, labels)
    den = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return (tp * tn - fp * fn) / math.sqrt(den) if den else 0.0


_METRICS = {"accuracy": accuracy, "f1": f1, "mcc": mcc}


def compute_metrics(task: Union[str, Task], preds: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """The task's GLUE metrics: ``accuracy``; ``accuracy`` and ``f1`` (MRPC, QQP); ``mcc`` (CoLA, with
    ``accuracy`` as a secondary metric)."""
    task = TASKS[task] if isinstance(task, str) else task
    return {name: _METRICS[name](preds, labels) for name in task.metrics}


def majority_baseline(task: Union[str, Task], train_labels: Sequence[int], eval_labels: Sequence[int]) -> dict:
    """The metrics of always predicting the most frequent class of ``train_labels`` (ties: the lower id) on
    ``eval_labels``, with that class as ``label``: the floor a fine-tuned model must clear."""
    counts = Counter(train_labels)
    label = min(counts, key=lambda k: (-counts[k], k))
    return {"label": label, **compute_metrics(task, [label] * len(eval_labels), eval_labels)}
