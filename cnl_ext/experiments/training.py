"""The training and evaluation steps every experiment shares: the optimizer by name, a seeded batch
order, one step, the share of questions answered right.

The paper's protocol (:mod:`.protocol`) and the continual protocol (:mod:`.continual`) train
through these, so a question set seen in the same seeded order takes the same steps in both.
"""
from __future__ import annotations

import random

import torch

import cnl_ext

from .model import MCQEncoder, backward_mean_loss, predict

__all__ = ["OPTIMIZERS", "make_optimizer", "seeded_batches", "train_step", "accuracy"]

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")


def make_optimizer(name: str, params, *, lr: float, momentum: float = 0.9, betas=(0.9, 0.999), eps: float = 1e-8,
                   weight_decay: float = 0.0, **extras):
    """The cnl_ext optimizer ``name`` (one of :data:`OPTIMIZERS`; plain until a reference is set).

    ``extras`` go to the optimizer as they are (``backend``, ``reference_dtype``, ``track_stats``,
    ``importance``, ...).
    """
    if name == "sgd":
        return cnl_ext.FusedCNLSGD(params, lr=lr, **extras)
    if name == "momentum":
        return cnl_ext.FusedCNLSGD(params, lr=lr, momentum=momentum, **extras)
    if name == "adam":
        return cnl_ext.FusedCNLAdam(params, lr=lr, betas=betas, eps=eps, **extras)
    if name == "adamw":
        return cnl_ext.FusedCNLAdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **extras)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def seeded_batches(questions, batch_size: int, seed) -> list:
    """``questions`` in an order shuffled by ``seed`` (any hashable ``random.Random`` seed), cut into batches."""
    order = list(range(len(questions)))
    random.Random(seed).shuffle(order)
    return [[questions[i] for i in order[start:start + batch_size]] for start in range(0, len(order), batch_size)]


def train_step(model, encoder: MCQEncoder, optimizer, batch, *, extra_loss=None, max_grad_norm: float | None = None,
               params=None) -> float:
    """One optimizer step on ``batch``'s mean loss (plus ``extra_loss()``, clipped to ``max_grad_norm``
    over ``params``); returns the batch's mean question loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = backward_mean_loss(model, encoder, batch, batch_size=len(batch))
    if extra_loss is not None:
        extra_loss().backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return loss


def accuracy(model, encoder: MCQEncoder, questions, *, batch_size: int, desc: str = "eval") -> float | None:
    """The share of ``questions`` answered right (None for no questions)."""
    if not questions:
        return None
    answers = predict(model, encoder, questions, batch_size=batch_size, desc=desc)
    return sum(answers.correct(questions)) / len(questions)
