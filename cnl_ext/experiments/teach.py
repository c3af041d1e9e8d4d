"""The "taught first" variant of the protocol: fine-tune part of the questions until they are
answered with a margin, then split (mastered = taught and right, injection = untaught and wrong)."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

from .model import MCQEncoder, check_trainable, predict, select_trainable
from .options import option
from .progress import note
from .protocol import BACKEND_HELP, InjectConfig, Split, _train_epoch, backend_choices, make_optimizer

__all__ = ["teach_first", "teach_summary", "TeachSettings"]


def teach_first(model, encoder: MCQEncoder, questions, *, fraction: float = 0.5, seed: int = 0, lr: float = 1e-5,
                max_epochs: int = 10, margin: float = 1.0, batch_size: int = 1, trainable: str = "all",
                eval_batch_size: int = 16, backend: str = "auto"):
    """The "taught first" variant: fine-tune (AdamW, FT) on a seeded ``fraction`` of the questions
    until each is answered with a letter-logit margin of at least ``margin`` (or ``max_epochs``).

    Then mastered = taught questions answered correctly, injection = the other questions answered
    wrongly; untaught questions answered correctly by chance are excluded (no margin to lose).
    The model keeps the taught weights. Returns ``(Split, teach_log)``.
    """
    questions = list(questions)
    if not 0 < fraction < 1:
        raise ValueError(f"teach fraction must be in (0, 1), got {fraction}")
    order = list(range(len(questions)))
    random.Random(seed).shuffle(order)
    taught_ids = set(order[:round(len(questions) * fraction)])
    taught = [q for i, q in enumerate(questions) if i in taught_ids]
    config = InjectConfig(optimizer="adamw", lr=lr, weight_decay=0.0, trainable=trainable, backend=backend)
    select_trainable(model, trainable)
    optimizer = make_optimizer(config, [p for p in model.parameters() if p.requires_grad])
    log = []
    started = time.perf_counter()
    for epoch in range(1, max_epochs + 1):
        loss, _ = _train_epoch(model, encoder, optimizer, taught, batch_size=batch_size,
                               order_seed=seed * 100_003 + epoch, desc=f"teach epoch {epoch}")
        margins = predict(model, encoder, taught, batch_size=eval_batch_size, desc="check taught").margins
        log.append(dict(epoch=epoch, train_loss=loss, min_margin=min(margins),
                        correct=sum(m > 0 for m in margins)))
        note(f"teach epoch {epoch}/{max_epochs}: {log[-1]['correct']}/{len(taught)} taught questions answered right, "
             f"smallest margin {min(margins):.2f} (target {margin:g}), loss {loss:.4f}, "
             f"{time.perf_counter() - started:.0f} s")
        if min(margins) >= margin:
            break
    for p in model.parameters():
        p.requires_grad_(True)
    answers = predict(model, encoder, questions, batch_size=eval_batch_size, desc="split after teaching")
    correct = answers.correct(questions)
    split = Split(
        mastered=[q for i, q in enumerate(questions) if i in taught_ids and correct[i]],
        injection=[q for i, q in enumerate(questions) if i not in taught_ids and not correct[i]],
        predictions=answers.letters,
        excluded=[q for i, q in enumerate(questions) if correct[i] != (i in taught_ids)],
    )
    return split, log


def teach_summary(split: Split, log: list, *, n_taught: int, margin: float, max_epochs: int) -> list:
    """What a person needs to know about a teach-first run: whether the margin was reached, and the split."""
    last = log[-1]
    if last["min_margin"] >= margin:
        lines = [f"teaching reached the margin {margin:g} after {last['epoch']} epoch(s) "
                 f"(smallest taught margin {last['min_margin']:.2f})"]
    else:
        lines = [f"teaching did NOT reach the margin {margin:g}: it stopped at the epoch limit ({max_epochs}) with "
                 f"the smallest taught margin {last['min_margin']:.2f} and {last['correct']}/{n_taught} taught "
                 "questions answered right; mastered questions with a small margin are easily forgotten (more "
                 "teach epochs or a higher teach lr give a real margin)"]
    taught_wrong = n_taught - len(split.mastered)
    lines.append(f"split: mastered {len(split.mastered)} (taught, answered right), injection {len(split.injection)} "
                 f"(not taught, answered wrong), excluded {len(split.excluded)} = {taught_wrong} taught but still "
                 f"answered wrong + {len(split.excluded) - taught_wrong} not taught but answered right by chance "
                 "(in neither set)")
    return lines


@dataclass
class TeachSettings:
    """Teaching first: fine-tune part of the questions before the split."""

    teach_fraction: float = option(0.5, "fraction of the questions taught")
    teach_lr: float = option(1e-5, "learning rate of teaching (AdamW)")
    teach_epochs: int = option(10, "at most this many teaching epochs")
    teach_margin: float = option(1.0, "stop once every taught answer leads the other letters by this logit margin")
    trainable: str = option("all", "'all' parameters or 'last:N' decoder layers")
    backend: str = option("auto", BACKEND_HELP, choices=backend_choices)

    def __post_init__(self):
        if not 0 < self.teach_fraction < 1:
            raise ValueError(f"teach_fraction must be in (0, 1), got {self.teach_fraction}")
        if self.teach_epochs < 1 or not self.teach_lr > 0:
            raise ValueError(f"teach_epochs must be >= 1 and teach_lr > 0, got {self.teach_epochs} and {self.teach_lr}")
        check_trainable(self.trainable)
