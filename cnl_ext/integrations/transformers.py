"""Hugging Face ``transformers``: :class:`CNLTrainer`, a ``Trainer`` that trains with CNL.

Give it the mastered dataset (tokenized like the training set). It recomputes the reference, the
mean loss gradient over that set, at each epoch start (``reference_every="epoch"``) or every N
optimizer steps (``reference_every=N``), and steps with :class:`cnl_ext.FusedCNLAdamW` built from
the ``TrainingArguments`` (``learning_rate``, ``adam_beta1/2``, ``adam_epsilon``, ``weight_decay``
with the Trainer's own no-decay groups for biases and norms). Everything else is the Trainer's:
gradient accumulation, mixed precision (autocast, GradScaler), the LR scheduler, DDP/FSDP through
accelerate. With a PEFT model only the trainable parameters (the adapters) are optimized and
masked. The collaborative share of the last step is logged as ``cnl_collaborative_share``.

DeepSpeed (``TrainingArguments(deepspeed=CONFIG)``, a config without an ``"optimizer"`` section): the
optimizer becomes DeepSpeed's client optimizer, the reference is captured through the engine
(:func:`cnl_ext.integrations.deepspeed.capture_reference`: each rank keeps the part of it that its
ZeRO partition steps) and the logged share is summed over the ranks.
"""
from __future__ import annotations

import functools

import torch
from transformers import Trainer, TrainerCallback

from ..optim import CNLOptimizer, FusedCNLAdamW
from ..optim.wrapper import CNL

__all__ = ["CNLTrainer"]


class _ReferenceSchedule(TrainerCallback):
    """Calls :meth:`CNLTrainer.compute_reference` when the schedule says so."""

    def __init__(self, trainer: "CNLTrainer"):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.trainer.reference_every == "epoch":
            self.trainer.compute_reference()

    def on_step_begin(self, args, state, control, **kwargs):
        # called once per optimizer step, before its first micro-batch (gradient accumulation)
        every = self.trainer.reference_every
        if every != "epoch" and state.global_step % every == 0:
            self.trainer.compute_reference()


def _batch_size(batch) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("CNLTrainer: a mastered batch holds no tensor to count its samples from")


class CNLTrainer(Trainer):
    """``transformers.Trainer`` with CNL. Extra keyword arguments:

    - ``mastered_dataset`` (required): the samples the model already masters;
    - ``reference_every``: ``"epoch"`` (default) or a number of optimizer steps;
    - ``reference_dtype``, ``cnl_backend``: passed to the optimizer (see :class:`FusedCNLAdamW`).

    Another optimizer may be chosen with the Trainer's ``optimizers=`` or
    ``optimizer_cls_and_kwargs=``; one that is not a CNL optimizer is wrapped in :class:`cnl_ext.CNL`.
    """

    def __init__(self, *args, mastered_dataset=None, reference_every="epoch", reference_dtype="float32",
                 cnl_backend="auto", **kwargs):
        if mastered_dataset is None:
            raise ValueError("CNLTrainer needs mastered_dataset= (the samples whose loss the reference is the "
                             "gradient of)")
        if len(mastered_dataset) == 0:
            raise ValueError("CNLTrainer: mastered_dataset is empty")
        if reference_every != "epoch" and not (isinstance(reference_every, int) and reference_every > 0):
            raise ValueError(f"reference_every must be 'epoch' or a positive number of steps, got {reference_every!r}")
        super().__init__(*args, **kwargs)
        self.mastered_dataset = mastered_dataset
        self.reference_every = reference_every
        self.reference_dtype = reference_dtype
        self.cnl_backend = cnl_backend
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            self.optimizer_cls_and_kwargs = (FusedCNLAdamW, dict(
                lr=self.args.learning_rate, betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon, backend=cnl_backend, reference_dtype=reference_dtype,
                track_stats=True))
        self.add_callback(_ReferenceSchedule(self))

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)  # the Trainer's param groups (no decay on biases, norms)
        if not isinstance(optimizer, CNLOptimizer):
            self.optimizer = CNL(optimizer, backend=self.cnl_backend, reference_dtype=self.reference_dtype,
                                 track_stats=True)
        return self.optimizer

    def cnl_optimizer(self) -> CNLOptimizer:
        """The CNL optimizer under accelerate's ``AcceleratedOptimizer`` wrapper."""
        optimizer = self.optimizer
        while not isinstance(optimizer, CNLOptimizer):
            if not hasattr(optimizer, "optimizer"):
                raise RuntimeError(f"CNLTrainer: the optimizer is a {type(optimizer).__name__}, not a CNL optimizer")
            optimizer = optimizer.optimizer
        return optimizer

    def compute_reference(self) -> None:
        """Set the reference to the mean loss gradient over ``mastered_dataset``.

        In eval mode (no dropout), under the Trainer's autocast, through the wrapped model (so DDP
        averages and FSDP reduce-scatters the gradients like in training); each batch is weighted
        by its size, so the mean is over samples. The training gradients are left as they were.
        With fp16 the loss is scaled by the GradScaler's current scale, as in training, so that
        small gradients do not underflow to 0 (which would leave their elements unprotected); if
        that overflows, the pass is repeated unscaled.
        """
        scaler = getattr(self.accelerator, "scaler", None)
        loss_scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        try:
            self._capture_reference(loss_scale)
        except FloatingPointError:
            if loss_scale == 1.0:
                raise
            self._capture_reference(1.0)

    def _deepspeed_engine(self):
        """The DeepSpeed engine when the Trainer runs under DeepSpeed, else None."""
        if not getattr(self, "is_deepspeed_enabled", False):
            return None
        return getattr(self, "deepspeed", None) or self.model_wrapped

    def _capture_reference(self, loss_scale: float) -> None:
        model = self.model_wrapped
        was_training = model.training
        model.eval()
        engine = self._deepspeed_engine()
        if engine is not None:
            from .deepspeed import capture_reference as capture
            capture, loss_scale = functools.partial(capture, engine), 1.0  # the engine scales fp16 losses itself
        else:
            capture = self.cnl_optimizer().capture_reference
        try:
            with capture() as ref:
                for batch in self.get_test_dataloader(self.mastered_dataset):
                    batch = self._prepare_inputs(batch)
                    with self.compute_loss_context_manager():
                        loss = self.compute_loss(model, batch)
                    ref.backward(loss, weight=_batch_size(batch) * loss_scale)  # the scale cancels in the mean
        finally:
            model.train(was_training)

    def log(self, logs, *args, **kwargs):
        # Every rank logs (cnl_stats is a collective with FSDP2); the statistics are of the last step.
        if self.optimizer is not None and "loss" in logs:
            engine = self._deepspeed_engine()
            if engine is not None:
                from .deepspeed import cnl_stats  # summed over the ranks' partitions

                stats = cnl_stats(engine) if hasattr(engine, "_cnl_deepspeed_tracker") else None
            else:
                stats = self.cnl_optimizer().cnl_stats()
            if stats is not None:
                logs["cnl_collaborative_share"] = stats.collaborative_share
        super().log(logs, *args, **kwargs)
