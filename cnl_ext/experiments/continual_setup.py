"""The continual protocol's settings, tasks, memory and metrics (:mod:`.continual` runs them).

``ContinualConfig`` holds every option of ``python -m cnl_ext continual``; a task is a set of questions
to inject from paper-format JSONL files; the memory is ``memory_per_task`` training questions of each
finished task, balanced by answer letter; AP, BWT and FWT are computed from the accuracy matrix.
"""
from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass

from .. import kif
from ..ops.importance import check_importance_options
from .adapters import ADAPTER_METHODS
from .methods import DEFAULT_EWC_DECAY, DEFAULT_EWC_LAMBDA, RULE_METHODS
from .data import LETTERS, DataError, read_jsonl, sample_n
from .model import ModelOptions
from .options import option
from .reference_schedule import DEFAULT_TOLERANCE

__all__ = ["CONTINUAL_METHODS", "LORA_METHODS", "MIN_MEMORY_PER_TASK", "ContinualConfig", "Task", "parse_task",
           "load_tasks", "select_memory", "continual_metrics"]

CONTINUAL_METHODS = ("ft", "replay", "lora", "cnl", "kif", "kif-lora", "recurrent-kif", *ADAPTER_METHODS, *RULE_METHODS)
LORA_METHODS = ("lora", "kif-lora")
MIN_MEMORY_PER_TASK = 8
# Settings added after runs were saved, with the values those runs had: a setting at that value is left
# out of run_settings, so the old runs still continue.
LATER_SETTINGS = dict(ewc_lambda=DEFAULT_EWC_LAMBDA, ewc_decay=DEFAULT_EWC_DECAY, adaptive_reference=None)


@dataclass
class ContinualConfig:
    """The continual protocol: tasks, methods, their settings (each field is an option of `continual`)."""

    tasks: list[str] = option(None, "a task, NAME=FILE[,FILE...] (paper-format JSONL; several files are joined); "
                                    "repeat --task for each, in order", flag="--task", append=True,
                              metavar="NAME=FILE[,FILE...]")
    methods: list[str] = option(CONTINUAL_METHODS, f"methods to compare, from {', '.join(CONTINUAL_METHODS)}")
    orders: list[str] = option((), "task orders, each a comma-separated permutation of the task names (default: "
                                   "as given)")
    seeds: list[int] = option((0,), "seeds: each picks the questions, held-out share, memory and batch order")
    questions_per_task: int | None = option(None, "seeded sample of N questions per task (default: all)")
    heldout_fraction: float = option(0.2, "seeded share of each task kept out of training (reported beside)")
    memory_per_task: int = option(16, f"memory questions per finished task, balanced by answer letter "
                                      f"(at least {MIN_MEMORY_PER_TASK})")
    epochs: int = option(3, "epochs per task")
    batch_size: int = option(4, "questions per optimizer step (also the memory batch of recurrent-kif)")
    lr: float = option(1e-5, "AdamW learning rate of the full-parameter methods")
    lora_lr: float = option(3e-4, "AdamW learning rate of the LoRA methods (P1/P2: 3e-4)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas")
    eps: float = option(1e-8, "AdamW eps")
    max_grad_norm: float | None = option(None, "clip the gradient norm of every step (the authors: 1.0); "
                                               "default: no clip")
    trainable: str = option("all", "full-parameter methods: 'all' or 'last:N' decoder layers")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha")
    backend: str = option("auto", "cnl_ext backend of the optimizer and the fusion passes")
    eval_batch_size: int = option(16, "batch size when answering")
    reference_batch_size: int = option(16, "batch size of the CNL reference pass")
    adaptive_reference: float | None = option(
        DEFAULT_TOLERANCE, "cnl, agem: adapt the reference's period to TOL (nats of mean memory loss): start at every "
                           "step, halve the period when the memory loss rose more than TOL beyond CNL's first-order "
                           "prediction, double it (up to an epoch) when within TOL/4; off: one reference per epoch "
                           "(the paper's)", metavar="TOL")
    importance_betas: tuple[float, float] = option((0.85, 0.85), "KIF's sensitivity and uncertainty EMA factors (alpha1, alpha2)")
    kif_unit: str = option("tensor", "kif's skill unit: 'tensor' (the paper's) or 'row' (each output row)")
    kif_gamma: float = option(0.7, "static fusion: share of the old weights where both tasks find a unit important")
    kif_beta: float = option(0.7, "weight of the past in the accumulated unit importance (Eq 13)")
    kif_tau: float = option(0.15, "adaptive fusion temperature of kif-lora (P1: 0.15; the authors' code: 0.25)")
    kif_quantile: float = option(0.8, "a unit is important above this quantile of the unit scores")
    orth_weight: float = option(0.1, "kif-lora's orthogonality loss weight")
    rkif_inner_steps: int = option(8, "recurrent-kif: inner steps per fusion cycle (Q)")
    rkif_outer_steps: int = option(4, "recurrent-kif: memory steps per cycle (R)")
    rkif_rule: str = option("code", "recurrent-kif fusion rule: 'code' (the authors') or 'paper' (binary masks)")
    rkif_quantile: float = option(0.8, "recurrent-kif: an element is important above this quantile")
    ewc_lambda: float = option(DEFAULT_EWC_LAMBDA, "ewc: the penalty weight λ (the gradient gets 2λ·F⊙(θ−θ*))")
    ewc_decay: float = option(DEFAULT_EWC_DECAY, "ewc: online EWC's γ, F ← γ·F + F_task after each task")

    def __post_init__(self):
        self.methods = [m.strip() for item in self.methods for m in str(item).split(",") if m.strip()]
        self.orders, self.tasks = list(self.orders), list(self.tasks or ())
        self.seeds = [int(s) for s in self.seeds]
        self.betas, self.importance_betas = tuple(self.betas), tuple(self.importance_betas)
        unknown = [m for m in self.methods if m not in CONTINUAL_METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty list from {CONTINUAL_METHODS}, got {self.methods}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods repeat: {self.methods}")
        if not self.seeds:
            raise ValueError("give at least one seed")
        if self.memory_per_task < MIN_MEMORY_PER_TASK:
            raise ValueError(f"memory_per_task must be at least {MIN_MEMORY_PER_TASK}, got {self.memory_per_task}")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must lie in [0, 1), got {self.heldout_fraction}")
        if self.questions_per_task is not None and self.questions_per_task < 2:
            raise ValueError(f"questions_per_task must be at least 2, got {self.questions_per_task}")
        for name in ("epochs", "batch_size", "eval_batch_size", "reference_batch_size", "lora_r", "rkif_inner_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rkif_outer_steps < 0:
            raise ValueError(f"rkif_outer_steps must be >= 0, got {self.rkif_outer_steps}")
        if self.kif_unit not in ("tensor", "row"):
            raise ValueError(f"kif_unit must be 'tensor' or 'row', got {self.kif_unit!r}")
        if self.rkif_rule not in kif.FUSION_RULES:
            raise ValueError(f"rkif_rule must be one of {kif.FUSION_RULES}, got {self.rkif_rule!r}")
        for name in ("kif_quantile", "rkif_quantile", "kif_gamma", "kif_beta"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if not self.kif_tau > 0:
            raise ValueError(f"kif_tau must be > 0, got {self.kif_tau}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.adaptive_reference is not None and not self.adaptive_reference > 0:
            raise ValueError(f"adaptive_reference must be > 0 (a tolerance in nats), got {self.adaptive_reference}")
        check_importance_options("first", self.importance_betas)
        if not self.ewc_lambda >= 0 or not 0 <= self.ewc_decay <= 1:
            raise ValueError(f"ewc_lambda must be >= 0 and ewc_decay in [0, 1], got {self.ewc_lambda} and "
                             f"{self.ewc_decay}")
        for spec in self.tasks:
            parse_task(spec)

    def run_settings(self, model: ModelOptions) -> dict:
        """The settings a saved run must share to be continued: all but which runs, with the model's
        (the same keys as the runs saved when the model options were this dataclass's own)."""
        skip = {"methods", "orders", "seeds", "eval_batch_size"}
        settings = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        for name, default in LATER_SETTINGS.items():  # runs saved before these existed used their defaults
            if settings[name] == default:
                del settings[name]
        settings.update(model=model.model, gguf_file=model.gguf_file, dtype=model.dtype,
                        use_chat_template=model.chat_template)
        return json.loads(json.dumps(settings))


# ---------------------------------------------------------------------------------- tasks and memory

@dataclass
class Task:
    name: str
    train: list  # the questions to inject (a[j][i] is measured on these)
    heldout: list  # kept out of training, reported beside


def parse_task(spec: str) -> tuple[str, list]:
    """``"NAME=FILE[,FILE...]"`` -> ``(name, [files])``."""
    name, sep, files = str(spec).partition("=")
    paths = [f.strip() for f in files.split(",") if f.strip()]
    if not sep or not name.strip() or not paths:
        raise ValueError(f"task {spec!r}: expected NAME=FILE[,FILE...]")
    if "," in name:
        raise ValueError(f"task {spec!r}: the name may not contain a comma")
    return name.strip(), paths


def load_tasks(config: ContinualConfig, seed: int) -> dict:
    """``{name: Task}``: the files joined, a seeded sample, a seeded held-out share."""
    tasks = {}
    for spec in config.tasks:
        name, paths = parse_task(spec)
        if name in tasks:
            raise ValueError(f"task name {name!r} is given twice")
        questions = [q for path in paths for q in read_jsonl(path)]
        questions = sample_n(questions, config.questions_per_task, seed)
        order = list(range(len(questions)))
        random.Random(f"heldout:{seed}:{name}").shuffle(order)
        n_heldout = round(len(questions) * config.heldout_fraction)
        if len(questions) - n_heldout < 1:
            raise DataError(f"task {name}: {len(questions)} questions leave none to train on")
        heldout_ids = set(order[:n_heldout])
        tasks[name] = Task(name, [q for i, q in enumerate(questions) if i not in heldout_ids],
                           [q for i, q in enumerate(questions) if i in heldout_ids])
    return tasks


def select_memory(questions, n: int, seed) -> list:
    """``n`` questions (all if fewer), balanced by answer letter: a seeded round robin over A-D."""
    by_letter = {letter: [q for q in questions if q.label == letter] for letter in LETTERS}
    rng = random.Random(f"memory:{seed}")
    for group in by_letter.values():
        rng.shuffle(group)
    chosen = []
    while len(chosen) < min(n, len(questions)):
        for letter in LETTERS:
            if by_letter[letter] and len(chosen) < n:
                chosen.append(by_letter[letter].pop())
    return chosen


# ---------------------------------------------------------------------------------- metrics

def continual_metrics(matrix, base=None) -> dict:
    """AP, BWT and FWT (spec §5) of ``matrix[j][i]`` = score on task i after task j (0-based rows).

    AP = mean of the last row; BWT = mean over i < K of (a[K][i] − a[i][i]); FWT = mean over i ≥ 2 of
    a[i−1][i] (P1, raw); FWT_gem = mean over i ≥ 2 of (a[i−1][i] − base[i]) with ``base`` the scores
    of the model before training. BWT and FWT are None for one task.
    """
    k = len(matrix)
    if k == 0 or any(len(row) != k for row in matrix):
        raise ValueError(f"expected a square K x K matrix, got {[len(row) for row in matrix]}")
    result = {"AP": sum(matrix[-1]) / k, "BWT": None, "FWT": None, "FWT_gem": None}
    if k > 1:
        result["BWT"] = sum(matrix[-1][i] - matrix[i][i] for i in range(k - 1)) / (k - 1)
        result["FWT"] = sum(matrix[i - 1][i] for i in range(1, k)) / (k - 1)
        if base is not None:
            result["FWT_gem"] = sum(matrix[i - 1][i] - base[i] for i in range(1, k)) / (k - 1)
    return result
