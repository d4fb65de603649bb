"""Shared test helpers: tiny randomly initialised Hugging Face models, toy batches, the real-data folder
and the per-dtype tolerance table. Fixtures live in conftest.py."""
import os
from pathlib import Path

import torch
from torch import nn

VOCAB = 64
REPO = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """Real GLUE data: $R3F_DATA_DIR, else ../shared/data beside the repository."""
    return Path(os.environ.get("R3F_DATA_DIR", REPO.parent / "shared" / "data"))


def _small(**extra):
    return dict(vocab_size=VOCAB, max_position_embeddings=64, **extra)


def tiny_model(kind: str, dropout: float = 0.1) -> nn.Module:
    """A tiny model of the given kind: bert, roberta, xlm-roberta, distilbert, electra, deberta-v2,
    bart (classification), bart-seq2seq, gpt2 (classification), gpt2-lm, t5-seq2seq."""
    import transformers as tf

    enc = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
               hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, num_labels=2)
    bart = _small(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, dropout=dropout,
                  attention_dropout=dropout, activation_dropout=dropout, classifier_dropout=dropout,
                  num_labels=2)
    gpt2 = _small(n_embd=16, n_layer=2, n_head=2, n_positions=64, resid_pdrop=dropout, embd_pdrop=dropout,
                  attn_pdrop=dropout, summary_first_dropout=dropout, num_labels=2, pad_token_id=0)
    builders = {
        "bert": lambda: tf.BertForSequenceClassification(tf.BertConfig(**_small(**enc))),
        "roberta": lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(**_small(**enc), pad_token_id=1)),
        "xlm-roberta": lambda: tf.XLMRobertaForSequenceClassification(
            tf.XLMRobertaConfig(**_small(**enc), pad_token_id=1)),
        "electra": lambda: tf.ElectraForSequenceClassification(tf.ElectraConfig(**_small(**enc), embedding_size=16)),
        "deberta-v2": lambda: tf.DebertaV2ForSequenceClassification(
            tf.DebertaV2Config(**_small(**enc), pooler_hidden_size=16, pooler_dropout=dropout)),
        "distilbert": lambda: tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            **_small(dim=16, n_layers=2, n_heads=2, hidden_dim=32, dropout=dropout, attention_dropout=dropout,
                     seq_classif_dropout=dropout, num_labels=2))),
        "bart": lambda: tf.BartForSequenceClassification(tf.BartConfig(**bart)),
        "bart-seq2seq": lambda: tf.BartForConditionalGeneration(tf.BartConfig(**bart)),
        "gpt2": lambda: tf.GPT2ForSequenceClassification(tf.GPT2Config(**gpt2)),
        "gpt2-lm": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(**gpt2)),
        "t5-seq2seq": lambda: tf.T5ForConditionalGeneration(tf.T5Config(
            vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
            dropout_rate=dropout, decoder_start_token_id=0, pad_token_id=0)),
    }
    model = builders[kind]()
    model.train()
    return model


def toy_batch(kind: str, batch: int = 16, seq: int = 8, seed: int = 0) -> dict:
    """A learnable batch for ``kind``: classification label = whether token 3 is in the sequence's first
    position half the time; LM / seq2seq: copy the input. Input ids avoid the special ids 0-3."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (batch, seq), generator=g)
    attn = torch.ones(batch, seq, dtype=torch.long)
    attn[: batch // 2, -2:] = 0  # some padding
    if kind.endswith("seq2seq"):
        labels = ids[:, : seq - 2].clone()
        labels[: batch // 2, -1] = -100
        return dict(input_ids=ids, attention_mask=attn, labels=labels)
    if kind == "gpt2-lm":
        labels = ids.masked_fill(attn == 0, -100)
        return dict(input_ids=ids, attention_mask=attn, labels=labels)
    labels = (ids[:, 0] >= (VOCAB + 4) // 2).long()
    if kind == "gpt2":  # GPT-2 classifies from the last non-pad token: put the signal there
        attn[:] = 1
        labels = (ids[:, -1] >= (VOCAB + 4) // 2).long()
    if kind == "bart":  # BART classifies from the last <eos> (id 2) of each example
        attn[:] = 1
        ids[:, -1] = 2
    return dict(input_ids=ids, attention_mask=attn, labels=labels)


def kl_mask(kind: str, batch: dict):
    """Rows of the logits that count in the KL: target tokens (seq2seq), real tokens (LM), none (cls)."""
    if kind.endswith("seq2seq"):
        return batch["labels"] != -100
    if kind == "gpt2-lm":
        return batch["attention_mask"].bool()
    return None


# Tolerances of a float64 reference comparison, by the dtype the tested computation ran in (its inputs'
# dtype; arithmetic is float32 for every dtype but float64). 16-bit entries bound the rounding of the
# result to the dtype (bf16 has 8 mantissa bits: 2^-8 = 3.9e-3 relative; fp16 has 11: 4.9e-4).
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
}


def tol(*dtypes: torch.dtype) -> dict:
    """The loosest tolerance of ``dtypes`` (e.g. ``tol(a.dtype, b.dtype)`` for mixed inputs)."""
    rows = [TOLERANCES[d] for d in dtypes]
    return {k: max(r[k] for r in rows) for k in ("rtol", "atol")}


def settings(method: str, **kw) -> dict:
    """The wrapper settings in ``kw`` that ``method`` reads: a parametrised test passes only those (the others
    have no effect, and the wrapper warns about them)."""
    from r3f_opt.methods import USES

    return {k: v for k, v in kw.items() if k in USES[method]}
