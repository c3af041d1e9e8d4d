"""The demo: FT vs CNL (AdamW) on a small generated question set and the embedded SmolLM2.

The questions are about invented people (favorite color, pet, home city, ...), so no model knows
them beforehand: the demo uses the "taught first" variant (teach half of them, then inject the
rest) and so has a mastered set with a real margin, which FT can forget and CNL should keep.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

from .data import MCQuestion, format_prompt, write_jsonl
from .protocol import InjectConfig, compare, teach_first
from .report import write_json, write_run_outputs

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
    """What the demo runs; the defaults take about 8 minutes on 2 CPU cores."""

    questions: int = 32
    teach_fraction: float = 0.5
    teach_lr: float = 2e-4
    teach_epochs: int = 6
    teach_margin: float = 1.0
    epochs: int = 3
    lr: float = 1e-4
    # Every parameter: with only the last 4 decoder layers, CNL found too few collaborative
    # elements and learned 4 of 15 questions (docs/results.md, 2a); with all, 14 of 15.
    trainable: str = "all"
    seed: int = 0


def run_demo(model, encoder, out_dir, settings: DemoSettings = DemoSettings(), *, backend: str = "auto") -> str:
    """Teach half the generated questions, inject the rest with FT and CNL; write outputs, return the table."""
    out_dir = Path(out_dir)
    started = time.perf_counter()
    questions = make_demo_questions(settings.questions, settings.seed)
    write_jsonl(out_dir / "questions.jsonl", questions)
    split, teach_log = teach_first(model, encoder, questions, fraction=settings.teach_fraction, seed=settings.seed,
                                   lr=settings.teach_lr, max_epochs=settings.teach_epochs,
                                   margin=settings.teach_margin, trainable=settings.trainable, backend=backend)
    write_jsonl(out_dir / "mastered.jsonl", split.mastered)
    write_jsonl(out_dir / "injection.jsonl", split.injection)
    if not split.mastered or not split.injection:
        raise RuntimeError(f"teaching left {len(split.mastered)} mastered and {len(split.injection)} injection "
                           "questions; the demo needs both (try more questions or teach epochs)")
    config = InjectConfig(optimizer="adamw", lr=settings.lr, epochs=settings.epochs, trainable=settings.trainable,
                          seed=settings.seed, backend=backend)
    runs = compare(model, encoder, methods=["ft", "cnl"], optimizers=["adamw"], config=config,
                   train=split.injection, reference=split.mastered)
    meta = dict(step="demo", settings=vars(settings), teach_log=teach_log, n_mastered=len(split.mastered),
                n_injection=len(split.injection), n_excluded=len(split.excluded),
                wall_s=round(time.perf_counter() - started, 1))
    table = write_run_outputs(out_dir, runs, title="Demo: FT vs CNL (AdamW), taught-first SmolLM2", meta=meta)
    write_json(out_dir / "teach_log.json", teach_log)
    return table
