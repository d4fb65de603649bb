"""R-Drop (Liang et al., NeurIPS 2021): two passes that differ only by dropout, pulled together.

    L = (CE_1 + CE_2) / 2 + alpha * (KL(P_1||P_2) + KL(P_2||P_1)) / 2

``alpha`` is the optimizer's ``lam``. R-Drop's code sums the KL over every row (``reduction="sum"``, the
default here); ``"batchmean"`` divides that by the batch size, as R3F does.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._warn import warn_user
from ..kl import symmetric_kl
from .base import Passes, Standard, StepResult, check_same_shape

__all__ = ["RDrop"]


class RDrop(Standard):
    """R-Drop: no input noise; both passes run in the model's mode (train mode: independent dropout)."""

    kl_mask = True

    def __init__(self, *, reduction: str = "sum") -> None:
        self.reduction = reduction
        self._checked = False  # whether the two passes were seen to differ (checked once: one host sync)

    def combine(self, task_1: torch.Tensor, logits_1: torch.Tensor, task_2: torch.Tensor, logits_2: torch.Tensor,
                *, mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """R-Drop's task loss (the mean of both passes') and its KL term from two passes."""
        check_same_shape(logits_1, logits_2)
        if not self._checked:
            self._checked = True
            if torch.equal(logits_1, logits_2):
                warn_user("R-Drop's two passes gave identical logits, so its KL term is 0 and the second pass is "
                          "wasted: no dropout is active (the model is in eval mode, or has no dropout, as Llama "
                          "and Qwen2 configs by default). Call model.train(), or set the config's dropout (e.g. "
                          "attention_dropout / hidden_dropout), or train without R-Drop")
        return (task_1 + task_2) / 2, symmetric_kl(logits_1, logits_2, mask=mask, reduction=self.reduction) / 2

    def step(self, passes: Passes, *, lam: float, mask: Optional[torch.Tensor] = None,
             noise_mask: Optional[torch.Tensor] = None) -> StepResult:
        out, task_1, logits_1 = passes.run()
        _, task_2, logits_2 = passes.run()
        task, kl = self.combine(task_1, logits_1, task_2, logits_2, mask=mask)
        return self.finish(passes, out, task, kl, lam,
                           terms={"task_loss_1": task_1.detach(), "task_loss_2": task_2.detach()})
