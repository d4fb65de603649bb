"""R3F / R4F inside the Hugging Face ``Trainer``, which never passes a closure to ``optimizer.step()``.

The two passes run in ``compute_loss``, so the Trainer's own gradient accumulation, mixed precision,
DDP ``no_sync`` and ``accelerator.backward`` apply to them unchanged; evaluation is untouched.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..kl import REDUCTIONS
from ..methods import METHODS, RDrop, Standard, build_method, check_settings
from ..methods.base import check_classes, loss_scaled
from ..noise import NOISE_SCALES, NOISE_TYPES, EmbeddingNoise, guard_hooks_when_compiled, noise_seed, unwrap_model
from ..r4f import r4f_state_dict
from .._checks import check_number
from .._source import forward_source

__all__ = ["R3FTrainer", "R3FTrainerMixin", "R3FTrainingArguments", "R3FArguments"]

TRAINER_METHODS = tuple(m for m in METHODS if m != "freelb")  # FreeLB runs a backward per ascent step
TEACHER_NAME = "r3f_smart_teacher.pt"  # SMART's proximal teacher in a checkpoint folder


@dataclass
class R3FArguments:
    """The R3F options as dataclass fields, mixed before a ``TrainingArguments`` class (:class:`R3FTrainingArguments`,
    ``R3FSFTConfig``); checked in ``__post_init__`` before the arguments class's own checks."""

    r3f_method: str = field(default="r3f", metadata={"help": f"one of {TRAINER_METHODS}"})
    r3f_lambda: float = field(default=1.0, metadata={"help": "weight of the symmetric KL term"})
    r3f_eps: float = field(default=1e-5, metadata={"help": "noise scale sigma"})
    r3f_noise: str = field(default="uniform", metadata={"help": f"one of {NOISE_TYPES}"})
    r3f_noise_scale: str = field(default="absolute", metadata={
        "help": f"one of {NOISE_SCALES}: eps in the embeddings' units, or a fraction of each token's embedding RMS "
                "(noise that survives bf16 embeddings at eps >= 1e-2)"})
    r3f_noisy_grad: bool = field(default=True, metadata={"help": "KL gradient through the noisy pass too"})
    r3f_reduction: Optional[str] = field(default=None, metadata={
        "help": f"KL reduction, one of {REDUCTIONS[:-1]} (default: 'sum' for rdrop, else 'batchmean')"})
    r3f_seed: Optional[int] = field(default=None, metadata={"help": "noise seed, offset per process (default: from --seed)"})
    r3f_noisy_embed_grad: bool = field(default=False, metadata={
        "help": "the noisy pass trains the embedding table too (fairseq's seq2seq criterion); default: detached"})
    r3f_same_dropout: bool = field(default=False, metadata={
        "help": "r3f/r4f: the noisy pass replays the clean pass's dropout masks (the KL measures the noise alone)"})
    r3f_fused_lm_head: bool = field(default=False, metadata={
        "help": "r3f/r4f with a causal LM: task loss and KL from the hidden states before the LM head and its "
                "weight, never materialising the logits (r3f_opt.linear_r3f_loss)"})
    r3f_method_kwargs: Optional[Union[dict, str]] = field(default=None, metadata={
        "help": "the method's own hyper-parameters as a dict or JSON, e.g. '{\"adv_steps\": 2}' for smart"})

    def __post_init__(self) -> None:
        if self.r3f_method not in TRAINER_METHODS:
            raise ValueError(f"r3f_method must be one of {TRAINER_METHODS}, got {self.r3f_method!r}" + (
                ": freelb runs its own backward for each of its ascent steps, which the Trainer's compute_loss "
                "cannot; use RegularizedOptimizer (or r3f-finetune --method freelb)" if self.r3f_method == "freelb"
                else ""))
        if isinstance(self.r3f_method_kwargs, str):
            self.r3f_method_kwargs = json.loads(self.r3f_method_kwargs)
        if self.r3f_reduction is not None and self.r3f_reduction not in REDUCTIONS[:-1]:  # the loss must be a scalar
            raise ValueError(f"r3f_reduction must be one of {REDUCTIONS[:-1]}, got {self.r3f_reduction!r}")
        self.r3f_lambda, self.r3f_eps = check_number("r3f_lambda", self.r3f_lambda), check_number("r3f_eps", self.r3f_eps)
        try:  # everything RegularizedOptimizer refuses, at parse time (its warnings come when the trainer is built)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                check_settings(self.r3f_method, eps=self.r3f_eps, noise=self.r3f_noise, noisy_grad=self.r3f_noisy_grad,
                               reduction=self.r3f_reduction, noisy_embed_grad=self.r3f_noisy_embed_grad,
                               method_kwargs=self.r3f_method_kwargs, same_dropout=self.r3f_same_dropout,
                               noise_scale=self.r3f_noise_scale, fused_lm_head=self.r3f_fused_lm_head,
                               lam=self.r3f_lambda)
        except (TypeError, ValueError) as e:
            raise type(e)(f"the r3f_* arguments (named here without r3f_): {e}") from None
        if self.ddp_find_unused_parameters is None and self.r3f_method != "standard":
            self.ddp_find_unused_parameters = False
        super().__post_init__()


@dataclass
class R3FTrainingArguments(R3FArguments, TrainingArguments):
    """``TrainingArguments`` plus the R3F options (also as ``--r3f_*`` flags through ``HfArgumentParser``).

    ``ddp_find_unused_parameters`` defaults to False here: DDP with True fails when two forwards precede
    one backward.
    """


def _kl_mask(inputs: dict, logits: torch.Tensor, causal_lm: bool) -> Optional[torch.Tensor]:
    """Token-level logits: count the positions that predict a label (labels != -100), else the attended ones.

    A causal LM's logits at t predict the label at t + 1: the model shifts ``labels`` itself, and a collator's
    ``shift_labels`` (padding-free, context parallelism) are already aligned with the logits, as the model's loss
    takes them. Labels or a mask whose shape is not the logits' (e.g. prompt tuning's virtual tokens) are
    ignored with a warning: the KL then counts every position.
    """
    if logits.dim() < 3:
        return None
    lead = logits.shape[:-1]
    labels, shifted, attention = inputs.get("labels"), inputs.get("shift_labels"), inputs.get("attention_mask")
    if causal_lm and isinstance(shifted, torch.Tensor) and shifted.shape == lead:
        return shifted != -100
    if isinstance(labels, torch.Tensor) and labels.shape == lead:
        if causal_lm:
            return torch.cat([labels[:, 1:] != -100, labels.new_zeros(labels.shape[0], 1, dtype=torch.bool)], 1)
        return labels != -100
    if isinstance(attention, torch.Tensor) and attention.shape == lead:
        return attention.bool()
    given = {k: tuple(v.shape) for k, v in (("labels", labels), ("attention_mask", attention))
             if isinstance(v, torch.Tensor)}
    if given:
        warnings.warn(f"R3F: the logits have positions {tuple(lead)} but {given}: the symmetric KL counts every "
                      "position, padding included (prompt tuning's virtual tokens?)", stacklevel=3)
    return None


def _flattened(inputs: dict) -> bool:
    """Whether the batch is one row holding several sequences (padding-free / flattening collators: position_ids
    restarting at 0 within the row). Only a one-row batch with position_ids is looked at (one host sync)."""
    ids = inputs.get("position_ids")
    return isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[0] == 1 and bool((ids == 0).sum() > 1)


_FLATTENED = ("r3f_reduction='batchmean' divides the KL by the batch's rows, and a padding-free (flattened) batch is "
              "one row holding every sequence, so the KL would be summed over all of them (its scale would grow with "
              "the batch size); set r3f_reduction='mean' (the mean over the labelled tokens, whatever the layout; "
              "lam then weighs a per-token KL) or 'sum', or pad the batches")


def _logits(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, dict):
        logits = outputs.get("logits")
    else:  # a tuple: (loss, logits, ...) when the model computed a loss, else (logits, ...)
        logits = outputs[1] if outputs[0].dim() == 0 and len(outputs) > 1 else outputs[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"R3F needs the model's logits; its output has none ({type(outputs).__name__})")
    return logits


def _noisy_inputs(model: torch.nn.Module, inputs: dict) -> dict:
    """The inputs of a pass whose only use is its logits: without ``labels`` where the model needs them for
    nothing but its loss (every model but an encoder-decoder without ``decoder_input_ids``, which builds its
    decoder inputs from the labels). The model then computes no loss: no cross-entropy, no float32
    log-softmax of the logits, not even transiently."""
    if "labels" not in inputs:
        return inputs
    config = getattr(unwrap_model(model), "config", None)
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" not in inputs:
        return inputs
    return {k: v for k, v in inputs.items() if k != "labels"}


def _passes_num_items(source: str) -> bool:
    """Whether a forward's source hands ``num_items_in_batch`` to its loss: it names it, or calls
    ``self.loss_function(...)`` with ``**kwargs`` (causal LMs); Llama-style classifiers call it without."""
    if "num_items_in_batch" in source:
        return True
    for start in (m.end() for m in re.finditer(r"loss_function\(", source)):
        depth, end = 1, start
        while depth and end < len(source):
            depth += {"(": 1, ")": -1}.get(source[end], 0)
            end += 1
        if "**" in source[start:end]:
            return True
    return False


class _ModelPasses:
    """More passes of the model on the Trainer's inputs: ``run`` for a method's term (its logits only, no
    labels), ``forward`` with the inputs as they are (the fused LM-head path takes the labels out itself)."""

    def __init__(self, model: torch.nn.Module, inputs: dict, scaler: Optional[Any] = None) -> None:
        self.model, self.all_inputs, self.inputs = model, inputs, _noisy_inputs(model, inputs)
        self.scaler = scaler  # the accelerator's fp16 GradScaler, if any

    def run(self) -> tuple[Any, Optional[torch.Tensor], torch.Tensor]:
        out = self.model(**self.inputs)
        return out, None, _logits(out)

    def forward(self) -> Any:
        return self.model(**self.all_inputs)

    def grad_sync(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the Trainer's accumulation decides on gradient sync

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss_scaled(self.scaler, loss)


class R3FTrainerMixin:
    """Adds the R3F/R4F term to a ``Trainer`` subclass's training loss.

    Tested with ``transformers.Trainer`` (as :class:`R3FTrainer`) and TRL's ``SFTTrainer`` (as
    :class:`~r3f_opt.integrations.trl.R3FSFTTrainer`, which adapts it; mixing this class into ``SFTTrainer``
    yourself is refused); other subclasses are untested.

    Options come from :class:`R3FTrainingArguments`; with plain ``TrainingArguments`` the defaults apply
    (``r3f``, lambda 1, eps 1e-5, uniform noise). The KL term is logged as ``sym_kl`` with the loss.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        sft = next((c for c in type(self).__mro__ if c.__name__ == "SFTTrainer" and c.__module__.startswith("trl")), None)
        if sft is not None and not getattr(type(self), "_r3f_supports_sft", False):
            raise TypeError(
                f"R3FTrainerMixin cannot be mixed into TRL's SFTTrainer ({sft.__module__}) directly: its compute_loss "
                "returns no logits with gradient (its fused LM head), so the clean side would get no KL gradient and "
                "every step would run an extra forward. Use r3f_opt.integrations.trl.R3FSFTTrainer (the [trl] "
                "extra: pip install -e '.[trl]'), which runs the clean pass itself."
            )
        super().__init__(*args, **kwargs)
        self._r3f_check_loss_kwargs()
        a = self.args
        handler = getattr(getattr(self, "accelerator", None), "ddp_handler", None)
        if handler is not None and getattr(a, "r3f_method", "r3f") != "standard" and not a.ddp_find_unused_parameters:
            # The Trainer built its accelerator from the arguments before we could set them (None means
            # True for pretrained models there): DDP wraps the model later, in train(), with this handler.
            handler.find_unused_parameters = False
        self.r3f_method = getattr(a, "r3f_method", "r3f")
        self.r3f_lambda, self.r3f_eps = getattr(a, "r3f_lambda", 1.0), getattr(a, "r3f_eps", 1e-5)
        self.r3f_noisy_grad = getattr(a, "r3f_noisy_grad", True)
        self.r3f_reduction = getattr(a, "r3f_reduction", None)
        self.r3f_fused_lm_head = getattr(a, "r3f_fused_lm_head", False)
        self.r3f_noise: Optional[EmbeddingNoise] = None
        self.r3f_regularizer: Optional[Standard] = None
        self._kl_sum, self._kl_count, self._active, self._micro = None, 0, False, (-1, 0)
        self._prox_sum: Optional[torch.Tensor] = None
        if self.r3f_method == "standard":  # a plain Trainer; its settings checked as the optimizer checks them
            check_settings("standard", **self._r3f_settings())
            return
        self._r3f_refuse()
        if a.ddp_find_unused_parameters is None:
            a.ddp_find_unused_parameters = False
        seed = getattr(a, "r3f_seed", None)
        seed = noise_seed(a.seed) if seed is None else seed
        seed = (seed + 104_729 * a.process_index) % 2**63  # each process draws its own noise
        self._r3f_seed = seed
        self.r3f_regularizer = build_method(self.r3f_method, unwrap_model(self.model), seed=seed,
                                            **self._r3f_settings())
        self.r3f_noise = self.r3f_regularizer.noise
        guard_hooks_when_compiled(self.model, compiling=bool(getattr(a, "torch_compile", False)))
        if self._r3f_proximal:
            self.add_callback(_TeacherFollows(self))

    def _r3f_check_loss_kwargs(self) -> None:
        """transformers' Trainer takes a model whose forward has ``**kwargs`` for one that divides its loss by
        ``num_items_in_batch`` (the items of all accumulated micro-batches and processes), so it neither divides
        that loss by the accumulation steps nor averages it over the processes. Classification heads such as
        BERT's, RoBERTa's or GPT-2's compute a per-micro-batch mean and ignore it: their task gradient would be
        summed over micro-batches and processes while the KL is averaged, so lambda would shrink by both
        factors. When the model's forward hands ``num_items_in_batch`` to no loss (:func:`_passes_num_items`
        reads its source, through torch.compile, DDP and PEFT wrappers), the Trainer is told so
        (``model_accepts_loss_kwargs = False``), for every method, standard included: 2 micro-batches of 4 then
        give what one batch of 8 gives. A model that declares ``accepts_loss_kwargs`` is left as it says."""
        if not getattr(self, "model_accepts_loss_kwargs", False) or getattr(self, "compute_loss_func", None):
            return
        base = unwrap_model(self.model)  # torch.compile, DDP, PEFT
        if hasattr(base, "accepts_loss_kwargs"):  # the model says so itself (the Trainer read it)
            return
        source = forward_source(type(base))  # a subclass may defer to its parent's
        if source is not None and not _passes_num_items(source):  # no source to read: the Trainer's reading stands
            self.model_accepts_loss_kwargs = False

    def _r3f_settings(self) -> dict:
        a = self.args
        return dict(eps=self.r3f_eps, noise=getattr(a, "r3f_noise", "uniform"), noisy_grad=self.r3f_noisy_grad,
                    reduction=self.r3f_reduction, method_kwargs=getattr(a, "r3f_method_kwargs", None),
                    same_dropout=getattr(a, "r3f_same_dropout", False),
                    noise_scale=getattr(a, "r3f_noise_scale", "absolute"), fused_lm_head=self.r3f_fused_lm_head,
                    noisy_embed_grad=getattr(a, "r3f_noisy_embed_grad", False), lam=self.r3f_lambda)

    def _r3f_refuse(self) -> None:
        """The settings R3F cannot train with, checked before it touches the model (subclasses add theirs)."""
        a = self.args
        if a.ddp_find_unused_parameters:
            raise ValueError("R3F runs two forwards before one backward, which DDP cannot do with "
                             "find_unused_parameters=True: set ddp_find_unused_parameters=False")
        if getattr(a, "neftune_noise_alpha", None) is not None:
            raise ValueError("neftune_noise_alpha is set: NEFTune would make R3F's clean pass noisy too; use one "
                             "of the two (neftune_noise_alpha=None for R3F)")
        if getattr(self, "model_init", None) is not None:
            raise ValueError("model_init rebuilds the model in train(), but R3F attaches its embedding noise (and "
                             "R4F its spectral norm, the fused head its capture) to the model it is given; pass "
                             "model= instead (hyper-parameter search: r3f_method='standard')")
        if self.r3f_fused_lm_head and getattr(self, "compute_loss_func", None) is not None:
            raise ValueError("r3f_fused_lm_head computes the model's causal-LM loss itself from the hidden states; "
                             "a compute_loss_func would need the logits. Drop one of the two")
        if self._r3f_proximal and (getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False)):
            raise ValueError("SMART's proximal term (r3f_method_kwargs['proximal'] > 0) keeps its teacher as a full "
                             "copy of the trainable parameters, which FSDP and DeepSpeed shard: train with DDP, or "
                             "set proximal to 0")
        if self.r3f_fused_lm_head and a.n_gpu > 1:
            raise ValueError(f"r3f_fused_lm_head with {a.n_gpu} GPUs in one process (nn.DataParallel): its replicas "
                             "would bypass the fused head's capture; launch one process per GPU (torchrun, "
                             "accelerate launch), or use the logits path")

    def training_step(self, model: torch.nn.Module, inputs: dict, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._active = True
        try:
            return super().training_step(model, inputs, *args, **kwargs)
        finally:
            self._active = False

    def _step_seed(self) -> int:
        # Noise keyed by (optimizer step, micro-batch): a resumed run draws what the uninterrupted one did.
        step = self.state.global_step
        micro = self._micro[1] + 1 if self._micro[0] == step else 0
        self._micro = (step, micro)
        return (self._r3f_seed + 1_000_003 * step + 7919 * micro) % 2**63

    def _r3f_task_loss(self, model: torch.nn.Module, inputs: dict, num_items_in_batch: Optional[Any]) -> tuple:
        """The clean pass: ``(task loss, model output)`` as the parent Trainer computes them (with the logits)."""
        return super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)

    def _r3f_kl_factor(self, num_items_in_batch: Optional[Any]) -> float:
        """What the KL is multiplied by before the Trainer scales the loss, so that accumulated micro-batches give
        the big batch's term: a mean over rows ("batchmean", "mean") is averaged over the micro-batches, a "sum"
        (R-Drop's) is summed over them. The Trainer divides the loss by the accumulation steps itself unless the
        task loss is already divided over the accumulated micro-batches (num_items_in_batch)."""
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or (
                getattr(self, "compute_loss_func", None) is not None)
        summed = getattr(self.r3f_regularizer, "reduction", None) == "sum"
        return (steps if summed else 1) / (steps if scaled else 1)

    def compute_loss(self, model: torch.nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: Optional[Any] = None):
        if not self._active or self.r3f_regularizer is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if getattr(self.r3f_regularizer, "reduction", None) == "batchmean" and _flattened(inputs):
            raise ValueError(_FLATTENED)
        with self.r3f_regularizer.step_scope():
            if self.r3f_fused_lm_head:
                loss, kl, outputs = self._r3f_fused_loss(model, inputs, num_items_in_batch)
            else:
                loss, kl, outputs = self._r3f_logits_loss(model, inputs, num_items_in_batch)
        kl = kl.detach()
        self._kl_sum = kl if self._kl_sum is None else self._kl_sum + kl
        self._kl_count += 1
        return (loss, outputs) if return_outputs else loss

    @property
    def _r3f_proximal(self) -> bool:
        """SMART with its proximal term (mu > 0): a teacher copy of the parameters follows them after each update."""
        kw = getattr(self.args, "r3f_method_kwargs", None)
        mu = kw.get("proximal", 0) if isinstance(kw, dict) else 0
        return self.r3f_method == "smart" and isinstance(mu, (int, float)) and mu > 0

    def _r3f_logits_loss(self, model: torch.nn.Module, inputs: dict, num_items_in_batch: Optional[Any]) -> tuple:
        teacher = None
        if self._r3f_proximal:  # SMART's teacher pass, before any graph exists (as RegularizedOptimizer runs it)
            teacher = self.r3f_regularizer.teacher_logits(_ModelPasses(model, inputs))
        # The parent may pop "labels" (label smoothing); the noisy pass needs them (seq2seq decoder inputs).
        loss, outputs = self._r3f_task_loss(model, dict(inputs), num_items_in_batch)
        clean = _logits(outputs)
        check_classes(clean)  # every method here has a KL term between two distributions
        if self.r3f_noise is not None:
            self.r3f_noise.reseed(self._step_seed())
        mask = _kl_mask(inputs, clean, self._r3f_shifts_labels(model))
        if isinstance(self.r3f_regularizer, RDrop):  # the second pass's task loss counts too, the Trainer's way
            loss_2, outputs_2 = self._r3f_task_loss(model, dict(inputs), num_items_in_batch)
            loss, kl = self.r3f_regularizer.combine(loss, clean, loss_2, _logits(outputs_2), mask=mask)
        else:
            passes = _ModelPasses(model, inputs, getattr(self.accelerator, "scaler", None))
            kl = self.r3f_regularizer.term(passes, clean, mask=mask)
        term = self.r3f_lambda * kl
        if teacher is not None:  # + mu * KL_S(f(x; theta) || f(x; theta_tilde))
            prox = self.r3f_regularizer.proximal_kl(clean, teacher, mask)
            term = term + self.r3f_regularizer.proximal * prox
            self._prox_sum = prox.detach() if self._prox_sum is None else self._prox_sum + prox.detach()
        return loss + term * self._r3f_kl_factor(num_items_in_batch), kl, outputs

    def _r3f_shifts_labels(self, model: torch.nn.Module) -> bool:
        """Whether the model's loss shifts the labels: a causal-LM class, or what the Trainer found from the model's
        loss function (``_loss_shifts_labels``: also vision-language *ForConditionalGeneration decoders)."""
        return bool(getattr(self, "_loss_shifts_labels", False)) or \
            unwrap_model(model)._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()

    def _r3f_fused_loss(self, model: torch.nn.Module, inputs: dict, num_items_in_batch: Optional[Any]) -> tuple:
        """The fused LM-head path: the model's causal-LM loss (as the Trainer computes it: num_items_in_batch when
        the model accepts loss kwargs, label smoothing, the token average across processes) plus the KL, from the
        hidden states of both passes; ``loss = tokens * (ce + lam / (ga * tokens) * kl)``."""
        a = self.args
        nib = num_items_in_batch if getattr(self, "model_accepts_loss_kwargs", False) else None
        tokens = 1
        if getattr(a, "average_tokens_across_devices", False) and nib is not None:
            tp = self.get_tp_size() if callable(getattr(self, "get_tp_size", None)) else 1
            tokens = self.accelerator.num_processes // tp  # one process per GPU: DataParallel is refused
        smoothing = a.label_smoothing_factor if getattr(self, "label_smoother", None) is not None else 0.0
        self.r3f_noise.reseed(self._step_seed())
        lam = self.r3f_lambda * self._r3f_kl_factor(num_items_in_batch) / tokens
        outputs, total, _, kl = self.r3f_regularizer.fused_objective(
            _ModelPasses(model, inputs), lam=lam, label_smoothing=smoothing, num_items_in_batch=nib,
            token_stats=getattr(self, "_r3f_token_stats", None))
        return total * tokens if tokens != 1 else total, kl, outputs

    @contextlib.contextmanager
    def _r3f_exporting(self, on: bool) -> Iterator[None]:
        """Inside it (``on``), ``_save`` writes R4F's head with W / sigma baked in; nested calls keep the outer state."""
        before = self.__dict__.get("_r3f_export", False)
        self._r3f_export = before or on
        try:
            yield
        finally:
            self._r3f_export = before

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """R4F: what you save (and push) is a plain model, the head's W / sigma baked in, which ``from_pretrained``
        loads; the Trainer's own checkpoints keep the parametrization (and u, v), so resuming continues it."""
        with self._r3f_exporting(not _internal_call):
            super().save_model(output_dir, _internal_call=_internal_call)

    def push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
        with self._r3f_exporting(True):
            return super().push_to_hub(*args, **kwargs)

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        if state_dict is None and self.__dict__.get("_r3f_export") and self.r3f_method == "r4f":
            if callable(getattr(self.model, "get_base_model", None)):  # PEFT saves the live modules' own keys
                warnings.warn("R4F with a PEFT model: the saved adapter keeps the head's spectral-norm "
                              "parametrization; call r3f_opt.remove_r4f(model) before the final save for a plain "
                              "one", stacklevel=3)
            else:
                state_dict = r4f_state_dict(self.model)  # the model the parent would save, as it would
        super()._save(output_dir, state_dict=state_dict)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self._r3f_proximal and self.r3f_regularizer.teacher is not None and self.args.should_save:
            torch.save(self.r3f_regularizer.state_dict(), os.path.join(output_dir, TEACHER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or not self._r3f_proximal:
            return
        path = os.path.join(checkpoint, TEACHER_NAME)
        if not os.path.isfile(path):
            warnings.warn(f"{checkpoint} has no {TEACHER_NAME}: SMART's proximal teacher restarts from the resumed "
                          "parameters", stacklevel=2)
            self.r3f_regularizer.teacher = None  # not one from an earlier train() of this trainer
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.r3f_regularizer.check_state(state)
        self.r3f_regularizer.load_state_dict(state)

    def log(self, logs: dict, *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._kl_count:  # training logs: mean KL since the last one, over processes
            mean = self._kl_sum / self._kl_count
            logs["sym_kl"] = self.accelerator.gather(mean.reshape(1)).mean().item()  # unrounded: 1e-12 is not 0
            if self._prox_sum is not None:
                prox = self._prox_sum / self._kl_count
                logs["kl_proximal"] = self.accelerator.gather(prox.reshape(1)).mean().item()
            self._kl_sum, self._kl_count, self._prox_sum = None, 0, None
        super().log(logs, *args, **kwargs)


class _TeacherFollows(TrainerCallback):
    """SMART's teacher moves towards the parameters once per optimizer update (not for a skipped fp16 step)."""

    def __init__(self, trainer: R3FTrainerMixin) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.trainer.accelerator.optimizer_step_was_skipped:
            self.trainer.r3f_regularizer.after_update()


class R3FTrainer(R3FTrainerMixin, Trainer):
    """``transformers.Trainer`` training with R3F / R4F (see :class:`R3FTrainerMixin`).

    Example:
        >>> args = R3FTrainingArguments("out", r3f_method="r3f", r3f_lambda=1.0, r3f_eps=1e-5)
        >>> R3FTrainer(model=model, args=args, train_dataset=train, eval_dataset=dev).train()
    """
