"""R3F / R4F in TRL's ``SFTTrainer``: supervised fine-tuning of causal LMs (LoRA, gradient checkpointing,
completion-only loss, padding-free batches) with the symmetric-KL term.

The ``[trl]`` extra (``pip install -e ".[trl]"`` in the repository). TRL's own training loss runs the model
through its fused LM head, which returns per-token log-probabilities and no logits, and it recomputes the logits
without gradient where it needs them. R3F needs the clean pass's output *with* gradient, so during training
:class:`R3FSFTTrainer` runs the clean pass itself, once: with the logits (the model's own causal-LM loss and the
KL on them), or, with ``r3f_fused_lm_head=True``, without any (the fused linear head + cross-entropy + symmetric
KL of :func:`~r3f_opt.linear_r3f_loss` on the hidden states). Then one noisy pass. Evaluation is TRL's, unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from transformers import Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

from ..methods import DEFAULT_REDUCTION
from .trainer import _FLATTENED, R3FArguments, R3FTrainerMixin

__all__ = ["R3FSFTTrainer", "R3FSFTConfig"]

METRIC_TOKENS = 1024  # logits positions per float32 log-softmax of the logits path's entropy metric


@dataclass
class R3FSFTConfig(R3FArguments, SFTConfig):
    """TRL's ``SFTConfig`` plus the R3F options of :class:`~r3f_opt.R3FTrainingArguments` (``r3f_method``,
    ``r3f_lambda``, ``r3f_eps``, ``r3f_noise``, ``r3f_noise_scale``, ``r3f_noisy_grad``, ``r3f_reduction``,
    ``r3f_seed``, ``r3f_same_dropout``, ``r3f_fused_lm_head``, ``r3f_method_kwargs``)."""


class R3FSFTTrainer(R3FTrainerMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` training with R3F / R4F; the arguments are ``SFTTrainer``'s, with
    :class:`R3FSFTConfig` (a plain ``TrainingArguments``, or ``R3FTrainingArguments``, is converted to it).

    Per training step: one clean pass (the task loss and TRL's ``entropy`` and ``mean_token_accuracy`` metrics:
    on the logits path from its logits, under no_grad; with ``r3f_fused_lm_head=True``, where neither pass
    computes logits, inside the fused objective's chunks) and one noisy pass, then one backward; ``num_tokens``,
    ``loss`` and ``sym_kl`` are logged too. Refused: ``loss_type="dft"``, an MoE router loss, padding-free batches
    (``padding_free``, ``packing`` with BFD) with ``r3f_reduction="batchmean"`` (use ``"mean"``), and with the fused
    head a ``compute_loss_func``. ``label_smoothing_factor`` is applied to the clean pass's CE.

    Example:
        >>> args = R3FSFTConfig("out", r3f_lambda=1.0, r3f_eps=1e-2, r3f_noise_scale="relative",
        ...                     r3f_fused_lm_head=True, gradient_checkpointing=True)
        >>> R3FSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
        ...               peft_config=LoraConfig(r=8, target_modules="all-linear")).train()
    """

    _r3f_supports_sft = True  # lifts R3FTrainerMixin's refusal of SFTTrainer subclasses

    def __init__(self, model: Any, args: Optional[TrainingArguments] = None, *rest: Any, **kwargs: Any) -> None:
        if isinstance(args, TrainingArguments) and not isinstance(args, SFTConfig):
            fields = args.to_dict()
            fields["hub_token"] = args.hub_token  # to_dict hides it
            args = R3FSFTConfig(**fields)
        if args is not None and getattr(args, "loss_type", "nll") != "nll" and getattr(args, "r3f_method", "r3f") != \
                "standard":
            raise ValueError(f"R3FSFTTrainer supports loss_type='nll' (the model's causal-LM cross-entropy), not "
                             f"{args.loss_type!r}; use r3f_method='standard' with it, or loss_type='nll'")
        super().__init__(model, args, *rest, **kwargs)

    def _r3f_refuse(self) -> None:
        super()._r3f_refuse()
        if getattr(self, "aux_loss_enabled", False):
            raise ValueError("the MoE router's auxiliary loss is on (router_aux_loss_coef="
                             f"{self.router_aux_loss_coef}): R3F's clean pass computes the model's own loss, which "
                             "adds that term at the coefficient the model was loaded with and scales it as a "
                             "token-averaged loss (not as TRL does), and the fused head would drop it; set "
                             "router_aux_loss_coef=0.0, or r3f_method='standard'")
        reduction = self.args.r3f_reduction or DEFAULT_REDUCTION.get(self.r3f_method, "batchmean")
        if getattr(self, "padding_free", False) and reduction == "batchmean":
            raise ValueError("padding_free (or packing with packing_strategy 'bfd'): " + _FLATTENED)

    def compute_loss(self, model: torch.nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: Optional[Any] = None):
        if not self._active or self.r3f_regularizer is None:  # evaluation, or r3f_method="standard": TRL's own
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        inputs["use_cache"] = False  # as TRL: no KV cache in training (gradient checkpointing warns otherwise)
        # The fused head computes no logits: it adds TRL's two logits metrics' sums here instead.
        self._r3f_token_stats = None
        if self.r3f_fused_lm_head:
            self._r3f_token_stats = torch.zeros(3, device=self.r3f_regularizer.fused.head.weight.device)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        self._r3f_sft_metrics(inputs, outputs)
        self._r3f_token_stats = None
        return (loss, outputs) if return_outputs else loss

    def _r3f_task_loss(self, model: torch.nn.Module, inputs: dict, num_items_in_batch: Optional[Any]) -> tuple:
        # transformers.Trainer's loss (the model's causal-LM loss on its logits, label smoothing, the token average
        # across processes), not SFTTrainer's, whose fused head returns no logits to take the KL of.
        return Trainer.compute_loss(self, model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)

    @torch.no_grad()
    def _r3f_sft_metrics(self, inputs: dict, outputs: Any) -> None:
        """TRL's training metrics: num_tokens always; entropy and mean_token_accuracy when there are logits."""
        mode = "train" if self.model.training else "eval"
        gather = self.accelerator.gather_for_metrics
        logits = outputs.get("logits") if isinstance(outputs, dict) else None
        labels = inputs.get("shift_labels")
        if labels is None and isinstance(inputs.get("labels"), torch.Tensor):
            labels = inputs["labels"]
            labels = torch.cat([labels[..., 1:], labels.new_full((*labels.shape[:-1], 1), -100)], -1)
        sums = self._r3f_token_stats  # the fused head's [entropy sum, argmax hits, labelled tokens]
        if sums is None and isinstance(logits, torch.Tensor) and logits.stride()[-1] != 0 and labels is not None \
                and labels.shape == logits.shape[:-1]:
            valid = labels != -100
            sums = torch.zeros(3, device=logits.device)
            chunks = (logits.flatten(0, -2), labels.reshape(-1), valid.reshape(-1))
            for row, lab, ok in zip(*(t.split(METRIC_TOKENS) for t in chunks)):  # no rows x V float32 copy
                logp = torch.log_softmax(row.float(), -1)
                sums[0] += (-(logp.exp() * logp).sum(-1) * ok).sum()
                sums[1] += ((row.argmax(-1) == lab) & ok).sum()
            sums[2] = valid.sum()
        if sums is not None:
            entropy, correct, n = gather(sums.reshape(1, 3)).sum(0).tolist()
            self._metrics[mode]["entropy"].append(entropy / n if n > 0 else 0.0)
            self._metrics[mode]["mean_token_accuracy"].append(correct / n if n > 0 else 0.0)
        if "attention_mask" in inputs:
            tokens = gather(inputs["attention_mask"].sum()).sum().item()
        elif "position_ids" in inputs:
            ids = inputs["position_ids"]
            tokens = gather(torch.tensor(ids.size(1), device=ids.device)).sum().item()
        else:
            tokens = 0
        self._total_train_tokens += tokens // getattr(self, "_tp_size", 1)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
