"""How much of R3F's KL term comes from the noise, and how much from dropout? (docs/results.md, the study)

R3F's two passes differ in the noise on the embeddings *and*, in train mode, in their dropout masks. This
measures the symmetric KL between them on real MRPC training batches with all-MiniLM-L6-v2 under four
settings, on the same batches and the same model state:

- ``r3f``: train mode, sigma = 1e-5, independent dropout (what R3F trains with);
- ``dropout_only``: train mode, sigma = 0 (the KL of dropout alone);
- ``noise_only``: train mode, sigma = 1e-5, ``same_dropout`` (both passes use the same dropout masks);
- ``noise_eval``: eval mode (no dropout), sigma = 1e-5.

at two model states: the pretrained encoder with a fresh head, and after ``--train-steps`` standard AdamW
steps (lr 1e-4, batch 16) on MRPC. Nothing is updated while measuring (``RegularizedOptimizer.backward``
then ``zero_grad``). Writes JSON with the per-batch values and their means.

    python docs/study/kl_decomposition.py --out docs/results/study/kl_decomposition.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import r3f_opt
from r3f_opt import RegularizedOptimizer
from r3f_opt.experiments.data import atomic_write, collate, default_model, encode, load_examples

SETTINGS = {  # name: (train mode, eps, same_dropout)
    "r3f": (True, 1e-5, False),
    "dropout_only": (True, 0.0, False),
    "noise_only": (True, 1e-5, True),
    "noise_eval": (False, 1e-5, False),
}


def measure(model, batches: list[dict]) -> dict:
    out = {}
    for name, (train, eps, same) in SETTINGS.items():
        model.train(train)
        opt = RegularizedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.0), model, eps=eps, same_dropout=same,
                                   seed=0)
        kls, losses = [], []
        for b in batches:
            res = opt.backward(lambda b=b: model(**b), noise_mask=b["attention_mask"])
            opt.zero_grad(set_to_none=True)
            kls.append(res.sym_kl.item())
            losses.append(res.task_loss.item())
        out[name] = {"sym_kl": kls, "mean_sym_kl": statistics.fmean(kls), "mean_task_loss": statistics.fmean(losses)}
    model.train()
    r3f = out["r3f"]["mean_sym_kl"]
    out["share_of_r3f_kl"] = {k: out[k]["mean_sym_kl"] / r3f for k in ("dropout_only", "noise_only", "noise_eval")}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.path.join(os.environ.get("R3F_DATA_DIR", "../shared/data"), "glue"))
    p.add_argument("--batches", type=int, default=16, help="measurement batches of 16")
    p.add_argument("--train-steps", type=int, default=230, help="standard steps before the second measurement")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    path = default_model("kl_decomposition")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    texts, labels = load_examples(os.path.join(a.data_dir, "MRPC/train.tsv"), "mrpc")
    feats = encode(tok, texts, 128)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(a.seed)).tolist()

    def batch(i: int) -> dict:
        idx = [order[(i * 16 + j) % len(order)] for j in range(16)]
        return collate(tok, [feats[k] for k in idx], [labels[k] for k in idx])

    probe = [batch(i) for i in range(a.batches)]  # the same measurement batches at both states
    t0 = time.time()
    result = {"at_init": measure(model, probe)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    model.train()
    for s in range(a.train_steps):
        opt.zero_grad()
        model(**batch(a.batches + s)).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    result[f"after_{a.train_steps}_steps"] = measure(model, probe)
    result["setup"] = {
        "model": path, "task": "mrpc (train batches of 16, max length 128)", "seed": a.seed,
        "batches": a.batches, "train_steps": a.train_steps, "settings": {k: dict(zip(("train_mode", "eps",
                                                                                         "same_dropout"), v))
                                                                         for k, v in SETTINGS.items()},
        "versions": {"r3f_opt": r3f_opt.__version__, "torch": torch.__version__},
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - t0, 1),
        "command": "python docs/study/kl_decomposition.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(a.out, lambda t: t.write_text(json.dumps(result, indent=1)))
    for state in ("at_init", f"after_{a.train_steps}_steps"):
        r = result[state]
        print(state, {k: f"{r[k]['mean_sym_kl']:.3e}" for k in SETTINGS}, "share:",
              {k: f"{v:.3g}" for k, v in r["share_of_r3f_kl"].items()})


if __name__ == "__main__":
    main()
