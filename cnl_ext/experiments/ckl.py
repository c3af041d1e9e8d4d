"""CKL's update task (Jang et al., ICLR 2022, "Towards Continual Knowledge Learning of Language Models";
code github.com/joeljang/continual-knowledge-learning) on the paper's split of a taught model.

From the split (mastered M, injection I of a taught model, as ``teach`` writes it): a seeded share
of M gets a *changed* answer (another letter, seeded): the **updated** knowledge; I is the **new**
knowledge; the rest of M is the **invariant** knowledge, which every method keeps as its memory
(CNL's and A-GEM's reference, EWC's Fisher, KORE's and CorDA's covariance, replay's data). Every
method trains on updated + new; after each epoch:

* forgotten: invariant questions answered wrongly;
* updated: updated questions answered with the new letter;
* acquired: new questions answered right;
* FUAR = forgotten / (updated + acquired), lower is better; undefined (None) when nothing was
  updated or acquired (CKL's Forgotten / (Updated + Acquired) Ratio, here with question counts: by
  construction all three start at 0 on the taught model).
"""
from __future__ import annotations

import csv
import io
import random
from dataclasses import dataclass

from .data import LETTERS, MCQuestion
from .options import option
from .outputs import write_text
from .protocol import compare
from .report import markdown_table

__all__ = ["CKLSettings", "UpdateTask", "make_update_task", "fuar", "ckl_rows", "ckl_table", "write_ckl_csv", "run_ckl"]

CKL_COLUMNS = ["run", "optimizer", "method", "epoch", "forgotten", "n_invariant", "updated", "n_updated", "acquired",
               "n_new", "fuar"]


@dataclass
class CKLSettings:
    """CKL's update task: which mastered questions get a changed answer."""

    update_fraction: float = option(0.25, "seeded share of the mastered questions whose answer changes to another "
                                          "letter (the knowledge to update); the rest is the invariant knowledge")
    update_seed: int = option(0, "seed of the updated questions and of their new letters")

    def __post_init__(self):
        if not 0 < self.update_fraction < 1:
            raise ValueError(f"update_fraction must lie in (0, 1), got {self.update_fraction}")


@dataclass
class UpdateTask:
    updated: list  # the chosen mastered questions with their new letter
    outdated: list  # the same questions with the answer the model learned (for the record)
    invariant: list  # the rest of the mastered set: the memory of every method
    new: list  # the injection set


def make_update_task(mastered, injection, *, fraction: float, seed: int) -> UpdateTask:
    """Pick ``round(fraction·|M|)`` mastered questions (at least 1, leaving at least 1 invariant) and a new,
    different letter for each, seeded."""
    mastered = list(mastered)
    if len(mastered) < 2:
        raise ValueError(f"CKL needs at least 2 mastered questions (some to update, some invariant), got {len(mastered)}")
    rng = random.Random(f"ckl:{seed}")
    order = list(range(len(mastered)))
    rng.shuffle(order)
    n = min(max(1, round(len(mastered) * fraction)), len(mastered) - 1)
    chosen = sorted(order[:n])
    updated = [MCQuestion(mastered[i].prompt, rng.choice([c for c in LETTERS if c != mastered[i].label]),
                          mastered[i].source) for i in chosen]
    return UpdateTask(updated, [mastered[i] for i in chosen],
                      [q for i, q in enumerate(mastered) if i not in set(chosen)], list(injection))


def fuar(forgotten: int, updated: int, acquired: int) -> float | None:
    """forgotten / (updated + acquired); None when nothing was updated or acquired."""
    gained = updated + acquired
    return forgotten / gained if gained else None


def ckl_rows(runs, n_updated: int) -> list:
    """Per run and epoch: forgotten, updated, acquired, FUAR (the runs trained on updated + new, evaluated
    in that order: a learned index below ``n_updated`` is an updated question)."""
    rows = []
    for run in runs:
        n_new = run.n_injection - n_updated
        for e in run.epochs:
            updated = sum(1 for i in e.learned_ids if i < n_updated)
            acquired = len(e.learned_ids) - updated
            rows.append(dict(run=run.label, optimizer=run.optimizer, method=run.method, epoch=e.epoch,
                             forgotten=e.forgot, n_invariant=run.n_mastered, updated=updated, n_updated=n_updated,
                             acquired=acquired, n_new=n_new, fuar=fuar(e.forgot, updated, acquired)))
    return rows


def _format_fuar(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def ckl_table(rows) -> str:
    """The Markdown table of every run's last epoch."""
    last = {}
    for row in rows:
        last[row["run"]] = row
    return ("### CKL: invariant knowledge forgotten, knowledge updated and acquired (FUAR = forgotten / (updated + "
            "acquired), lower is better)\n\n"
            + markdown_table(["Optimizer", "Method", "Forgotten", "Updated", "Acquired", "FUAR"],
                             [[r["optimizer"], r["method"].upper(), f"{r['forgotten']}/{r['n_invariant']}",
                               f"{r['updated']}/{r['n_updated']}", f"{r['acquired']}/{r['n_new']}",
                               _format_fuar(r["fuar"])] for r in last.values()], align="llrrrr"))


def write_ckl_csv(path, rows) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CKL_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(dict(row, fuar="" if row["fuar"] is None else f"{row['fuar']:.6f}"))
    write_text(path, text.getvalue())


def run_ckl(model, encoder, task: UpdateTask, *, methods, optimizers, config, lrs=None, checkpoints=None):
    """Every (optimizer, method) run on updated + new, the invariant set as the memory; returns
    ``(runs, rows)``."""
    train = task.updated + task.new
    runs = compare(model, encoder, methods=methods, optimizers=optimizers, config=config, train=train,
                   reference=task.invariant, eval_injection=train, eval_mastered=task.invariant, lrs=lrs,
                   checkpoints=checkpoints)
    return runs, ckl_rows(runs, len(task.updated))
