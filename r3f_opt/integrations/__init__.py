"""Integrations with training frameworks; each imports its framework only when it is imported itself.

* :mod:`r3f_opt.integrations.trainer`: ``R3FTrainer``, ``R3FTrainerMixin``, ``R3FTrainingArguments``
  (Hugging Face ``Trainer``).
* :mod:`r3f_opt.integrations.trl`: ``R3FSFTTrainer``, ``R3FSFTConfig`` (TRL's ``SFTTrainer``; the ``[trl]``
  extra: ``pip install -e ".[trl]"`` in the repository).
"""
