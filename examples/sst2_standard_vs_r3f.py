"""Fine-tune all-MiniLM-L6-v2 on real SST-2, standard vs R3F side by side (about 2 minutes on 2 CPU cores).

    python examples/sst2_standard_vs_r3f.py [--data-dir ../shared/data/glue] [--steps 40] [--seed 0]

Both runs start from the same pretrained weights, the same head initialisation and the same batches; the
only difference is the optimizer's ``method``. Prints, per method: dev accuracy on the full official SST-2
dev set (872 sentences), the mean KL term and its share of the loss, and seconds per training step.
One seed and a few dozen steps show what the library does and costs, not whether R3F helps: that needs
many seeds (docs/results.md).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from r3f_opt import RegularizedOptimizer
from r3f_opt.experiments.data import collate, default_model, encode, load_examples
from r3f_opt.experiments.finetune import evaluate

REPO = Path(__file__).resolve().parent.parent


def train(method: str, args: argparse.Namespace, tokenizer, train_f: list, train_y: list) -> dict:
    torch.manual_seed(args.seed)  # the same head initialisation and dropout stream for every method
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    model.train()  # from_pretrained returns the model in eval mode: R3F's passes differ by dropout too
    opt = RegularizedOptimizer(torch.optim.AdamW(model.parameters(), lr=args.lr), model, method=method,
                               lam=1.0, eps=1e-5, max_grad_norm=1.0)
    order = torch.randperm(len(train_f), generator=torch.Generator().manual_seed(args.seed))
    kl_sum = share_sum = seconds = 0.0
    for step in range(args.steps):
        idx = order[step * args.batch_size:(step + 1) * args.batch_size].tolist()
        batch = collate(tokenizer, [train_f[i] for i in idx], [train_y[i] for i in idx])
        t0 = time.perf_counter()
        opt.zero_grad()
        result = opt.step(lambda: model(**batch), noise_mask=batch["attention_mask"])
        seconds += time.perf_counter() - t0
        kl_sum += result.sym_kl.item()
        share_sum += (opt.lam * result.sym_kl / result.loss).item()
        if (step + 1) % 10 == 0 and step + 1 < args.steps:  # a sign of life on a slow machine
            print(f"  {method}: step {step + 1}/{args.steps}, {seconds / (step + 1):.2f} s/step", flush=True)
    return {"model": model, "kl": kl_sum / args.steps, "kl_share": share_sum / args.steps,
            "s_per_step": seconds / args.steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_data = Path(os.environ.get("R3F_DATA_DIR", REPO.parent / "shared" / "data")) / "glue"
    p.add_argument("--data-dir", type=Path, default=default_data, help="folder holding SST-2/")
    p.add_argument("--model", default=None, help="local HF model folder (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=["standard", "r3f"])
    args = p.parse_args()
    args.model = args.model or default_model("sst2_standard_vs_r3f")
    hf_logging.set_verbosity_error()  # the freshly initialised classifier is expected
    hf_logging.disable_progress_bar()

    n_train = args.steps * args.batch_size  # each example seen once
    train_x, train_y = load_examples(args.data_dir / "SST-2" / "train.tsv", "sst2", n_train)
    dev_x, dev_y = load_examples(args.data_dir / "SST-2" / "dev.tsv", "sst2")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train_f, dev_f = encode(tokenizer, train_x, args.max_length), encode(tokenizer, dev_x, args.max_length)
    print(f"SST-2: {len(train_f)} training sentences ({args.steps} steps of {args.batch_size}), "
          f"{len(dev_f)} dev sentences (official dev); torch {torch.__version__}, {torch.get_num_threads()} threads")

    rows = []
    for method in args.methods:
        run = train(method, args, tokenizer, train_f, train_y)
        dev = evaluate(run["model"], tokenizer, dev_f, dev_y, "sst2", batch_size=128)
        rows.append((method, dev["accuracy"], dev["loss"], run["kl"], run["kl_share"], run["s_per_step"]))
        print(f"  {method}: {args.steps} steps at {run['s_per_step']:.2f} s/step, dev accuracy {dev['accuracy']:.4f}")
    majority = max(dev_y.count(0), dev_y.count(1)) / len(dev_y)
    print(f"\n| method | dev accuracy | dev loss | mean KL term | KL share of loss | s/step |")
    print("|---|---|---|---|---|---|")
    for method, acc, loss, kl, share, sps in rows:
        print(f"| {method} | {acc:.4f} | {loss:.4f} | {kl:.2e} | {share:.2%} | {sps:.3f} |")
    print(f"(majority-class dev accuracy {majority:.4f}; seed {args.seed}, one run per method)")


if __name__ == "__main__":
    main()
