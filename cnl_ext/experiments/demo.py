"""The demo: FT vs CNL (AdamW) on a small generated question set and the embedded SmolLM2.

The questions are about invented people (favorite color, pet, home city, ...), so no model knows
them beforehand: the demo uses the "taught first" variant (teach half of them, then inject the
rest) and so has a mastered set with a real margin, which FT can forget and CNL should keep.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .data import MCQuestion, format_prompt, read_jsonl, write_jsonl
from .options import option
from .outputs import write_json
from .progress import note
from .protocol import BACKEND_HELP, InjectConfig, backend_choices, compare
from .reference_schedule import DEFAULT_TOLERANCE
from .teach import TeachSettings, teach_first, teach_summary
from .report import write_run_outputs

__all__ = ["make_demo_questions", "DemoSettings", "run_demo"]

_FIRST = ("Zor", "Vel", "Kai", "Mir", "Tal", "Bex", "Quo", "Ryn", "Oda", "Fen", "Lu", "Sab")
_LAST = ("ax", "ith", "on", "ura", "el", "is", "ando", "ek")
_FACTS = {  # question template -> the 8 possible answers
    "What is {name}'s favorite color?": ("red", "blue", "green", "yellow", "purple", "orange", "white", "black"),
    "Which animal does {name} keep as a pet?": ("cat", "dog", "parrot", "rabbit", "turtle", "horse", "goat", "owl"),
    "In which city was {name} born?": ("Lisbon", "Oslo", "Lima", "Cairo", "Dublin", "Quito", "Perth", "Seoul"),
    "Which instrument does {name} play?": ("violin", "drum", "flute", "piano", "harp", "trumpet", "guitar", "cello"),
    "Which fruit does {name} eat every morning?": ("apple", "mango", "pear", "plum", "cherry", "lemon", "banana", "grape"),
}


def make_demo_questions(n: int = 32, seed: int = 0) -> list:
    """``n`` 4-option questions about invented people, in the paper's prompt format (seeded)."""
    rng = random.Random(seed)
    names = [first + last for first in _FIRST for last in _LAST]
    pairs = [(name, template) for name in names for template in _FACTS]
    if not 1 <= n <= len(pairs):
        raise ValueError(f"the demo generator makes 1 to {len(pairs)} questions, asked for {n}")
    questions = []
    for index, (name, template) in enumerate(rng.sample(pairs, n)):
        options = rng.sample(_FACTS[template], 4)  # the first is the true answer before shuffling
        answer = options[0]
        rng.shuffle(options)
        questions.append(MCQuestion(format_prompt(template.format(name=name), options),
                                    "ABCD"[options.index(answer)], f"demo#{index}"))
    return questions


@dataclass
class DemoSettings:
    """The demo: what it generates, teaches and injects (the defaults take about 7 minutes on 2 CPU cores)."""

    questions: int = option(32, "how many questions to generate")
    teach_fraction: float = option(0.5, "fraction of the questions taught first")
    teach_lr: float = option(2e-4, "learning rate of teaching (AdamW)")
    teach_epochs: int = option(6, "at most this many teaching epochs")
    teach_margin: float = option(1.0, "stop teaching once every taught answer leads by this logit margin")
    epochs: int = option(3, "injection epochs")
    lr: float = option(1e-4, "learning rate of the injection (AdamW, FT and CNL)")
    # Every parameter: with only the last 4 decoder layers, CNL found too few collaborative
    # elements and learned 4 of 15 questions (docs/results.md, 2a); with all, 14 of 15.
    trainable: str = option("all", "'all' parameters or 'last:N' decoder layers (faster; CNL learns less)")
    seed: int = option(0, "seed of the generated questions, of the taught half and of the training order")
    backend: str = option("auto", BACKEND_HELP, choices=backend_choices)
    adaptive_reference: float | None = option(DEFAULT_TOLERANCE, "CNL's reference taken as often as its age "
                                              "requires, to TOL nats (as inject); off: once per epoch, the paper's",
                                              metavar="TOL")

    def __post_init__(self):
        if not 1 <= self.questions <= len(_FIRST) * len(_LAST) * len(_FACTS):
            raise ValueError(f"questions must be 1 to {len(_FIRST) * len(_LAST) * len(_FACTS)}, got {self.questions}")
        TeachSettings(teach_fraction=self.teach_fraction, teach_lr=self.teach_lr, teach_epochs=self.teach_epochs,
                      teach_margin=self.teach_margin, trainable=self.trainable, backend=self.backend)  # checks them
        InjectConfig(optimizer="adamw", lr=self.lr, epochs=self.epochs, trainable=self.trainable,
                     adaptive_reference=self.adaptive_reference)


def run_demo(model, encoder, out_dir, settings: DemoSettings = DemoSettings(), *, backend: str | None = None,
             checkpoints=None, provenance=None) -> str:
    """Teach half the generated questions, inject the rest with FT and CNL; write outputs, return the table.

    ``checkpoints``: a :class:`~.checkpoints.RunCheckpoints`; with its starting weights and this
    folder's ``teach.json`` from an interrupted demo, teaching is not repeated. ``provenance``: a
    function returning what ``results.json`` records about how it was made (the CLI's).
    """
    out_dir = Path(out_dir)
    backend = settings.backend if backend is None else backend
    started = time.perf_counter()
    questions = make_demo_questions(settings.questions, settings.seed)
    write_jsonl(out_dir / "questions.jsonl", questions)
    taught = out_dir / "teach.json"
    if checkpoints is not None and checkpoints.has_start_weights and taught.is_file():
        teach = json.loads(taught.read_text(encoding="utf-8"))
        mastered, injection = read_jsonl(out_dir / "mastered.jsonl"), read_jsonl(out_dir / "injection.jsonl")
        note("teaching: done before the interruption, its weights and split reused")
    else:
        split, teach_log = teach_first(model, encoder, questions, fraction=settings.teach_fraction,
                                       seed=settings.seed, lr=settings.teach_lr, max_epochs=settings.teach_epochs,
                                       margin=settings.teach_margin, trainable=settings.trainable, backend=backend)
        n_taught = round(settings.questions * settings.teach_fraction)
        summary = teach_summary(split, teach_log, n_taught=n_taught, margin=settings.teach_margin,
                                max_epochs=settings.teach_epochs)
        for line in summary:
            note(line)
        mastered, injection = split.mastered, split.injection
        write_jsonl(out_dir / "mastered.jsonl", mastered)
        write_jsonl(out_dir / "injection.jsonl", injection)
        teach = dict(teach_log=teach_log, n_excluded=len(split.excluded), summary=summary,
                     margin_reached=teach_log[-1]["min_margin"] >= settings.teach_margin)
        write_json(taught, teach)
    if not mastered or not injection:
        raise RuntimeError(f"teaching left {len(mastered)} mastered and {len(injection)} injection "
                           "questions; the demo needs both (try more questions or teach epochs)")
    config = InjectConfig(optimizer="adamw", lr=settings.lr, epochs=settings.epochs, trainable=settings.trainable,
                          seed=settings.seed, backend=backend, adaptive_reference=settings.adaptive_reference)
    runs = compare(model, encoder, methods=["ft", "cnl"], optimizers=["adamw"], config=config,
                   train=injection, reference=mastered, checkpoints=checkpoints)
    meta = dict(step="demo", settings=asdict(settings), **teach, n_mastered=len(mastered),
                n_injection=len(injection), wall_s=round(time.perf_counter() - started, 1),
                **(provenance() if provenance else {}))
    return write_run_outputs(out_dir, runs, title="Demo: FT vs CNL (AdamW), taught first", meta=meta)
