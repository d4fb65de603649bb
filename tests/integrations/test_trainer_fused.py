"""R3FTrainer with r3f_fused_lm_head=True: the same training as the logits path (accumulation with the model's
num_items_in_batch, label smoothing), the right rows, and same_dropout honoured in compute_loss."""
import pytest
import torch
import transformers

from r3f_opt import R3FTrainer, R3FTrainingArguments

VOCAB = 97


def tiny_llama(dropout: float = 0.0, tied: bool = False) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      attention_dropout=dropout, tie_word_embeddings=tied, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).train()


class LMRows(torch.utils.data.Dataset):
    """Rows of 10 tokens, every other one right-padded by 3, a 2-token prompt (labels -100) on each."""

    def __init__(self, n: int = 16):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, VOCAB, (n, 10), generator=g)
        self.attn = torch.ones(n, 10, dtype=torch.long)
        self.attn[::2, -3:] = 0
        self.ids = self.ids.masked_fill(self.attn == 0, 0)
        self.labels = self.ids.masked_fill(self.attn == 0, -100)
        self.labels[:, :2] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return dict(input_ids=self.ids[i], attention_mask=self.attn[i], labels=self.labels[i])


def train(tmp_path, fused: bool, dropout: float = 0.0, tied: bool = False, **kw):
    base = dict(output_dir=str(tmp_path / f"fused{fused}"), per_device_train_batch_size=4, learning_rate=0.1,
                optim="sgd", lr_scheduler_type="constant", max_steps=2, use_cpu=True, report_to="none",
                disable_tqdm=True, logging_steps=1, save_strategy="no", seed=0, r3f_eps=1e-2, r3f_lambda=2.0,
                r3f_fused_lm_head=fused)
    base.update(kw)
    model = tiny_llama(dropout, tied)
    trainer = R3FTrainer(model=model, args=R3FTrainingArguments(**base), train_dataset=LMRows())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, logs


def test_fused_trainer_equals_the_logits_path(tmp_path):
    """Accumulation over 2 micro-batches (the model's loss normalised by num_items_in_batch, the KL divided by
    the steps), tied embeddings, label smoothing, noisy_grad=False."""
    kw = dict(gradient_accumulation_steps=2, tied=True, label_smoothing_factor=0.1, r3f_noisy_grad=False)
    logits_state, logits_logs = train(tmp_path, False, **kw)
    fused_state, fused_logs = train(tmp_path, True, **kw)
    for k in logits_state:
        torch.testing.assert_close(fused_state[k], logits_state[k], rtol=1e-4, atol=1e-6, msg=k)
    assert len(fused_logs) == 2
    for a, b in zip(fused_logs, logits_logs):
        assert a["sym_kl"] > 0
        assert a["sym_kl"] == pytest.approx(b["sym_kl"], rel=1e-3)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_same_dropout_in_the_trainer(tmp_path, fused):
    """eps = 0 with dropout on: the KL is exactly 0 only if the noisy pass replays the clean pass's masks."""
    with pytest.warns(UserWarning, match="exactly 0"):  # the library says the second pass is wasted
        _, logs = train(tmp_path, fused, dropout=0.3, r3f_eps=0.0, r3f_same_dropout=True, max_steps=1)
    assert logs[0]["sym_kl"] == 0.0
    if fused:  # the control: without it, dropout alone makes the KL positive
        _, logs = train(tmp_path, fused, dropout=0.3, r3f_eps=0.0, max_steps=1)
        assert logs[0]["sym_kl"] > 0.0


def test_fused_trainer_refusals(tmp_path):
    with pytest.raises(ValueError, match=r"r3f_\* arguments.*fused_lm_head applies to"):
        R3FTrainingArguments(output_dir=str(tmp_path), r3f_method="rdrop", r3f_fused_lm_head=True, use_cpu=True)
    args = R3FTrainingArguments(output_dir=str(tmp_path), r3f_fused_lm_head=True, use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="compute_loss_func"):
        R3FTrainer(model=tiny_llama(), args=args, train_dataset=LMRows(), compute_loss_func=lambda *a, **k: 0)
    model = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        vocab_size=50, n_embd=16, n_layer=1, n_head=2, pad_token_id=0))
    with pytest.raises(ValueError, match="causal LM"):
        R3FTrainer(model=model, args=args, train_dataset=LMRows())
