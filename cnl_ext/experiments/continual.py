"""The continual-learning protocol: one model trained through a sequence of tasks, every method compared.

A task is a set of questions to inject (paper-format JSONL files), as in the CNL paper and the CKL
benchmark. After task j the model answers every task's training questions: ``a[j][i]`` is the share
of task i's training questions answered correctly (row 0: the base model). A seeded share of each
task is held out of training and reported beside it (for a small model it sits near chance).
After each task, ``memory_per_task`` of its training questions (balanced by answer letter) join one
memory buffer, the same questions for every method that uses memory (replay, cnl, recurrent-kif).

Methods (spec: ``docs/kif-spec.md``):

==============  ==============================  =================================================
``ft``          all parameters                  sequential fine-tuning
``replay``      all parameters                  fine-tuning on the task plus the memory
``lora``        one LoRA adapter, whole run     sequential fine-tuning of the adapter
``cnl``         all parameters                  CNL, reference = mean gradient over the memory,
                                                recomputed each epoch (task 1: plain)
``kif``         all parameters                  KIF: unit = tensor (or row), first-order, static
``kif-lora``    LoRA adapter                    KIFLoRA: rank-1 units, param_mix, adaptive, orth loss
``recurrent-kif`` all parameters                Recurrent-KIF with the memory, the authors' rule
==============  ==============================  =================================================

Every method uses AdamW (``cnl_ext.FusedCNLAdamW``), a fresh optimizer per task (spec §6.7), the final
weights of each task (no checkpoint selection). ``run(ContinualConfig(...))`` does all runs (seeds ×
task orders × methods) and writes ``matrices.csv``, ``summary.csv``, ``results.json``, ``tables.md``,
``heatmap_<method>.png`` and ``comparison.png``; every finished run is saved in ``runs/`` and
``resume=True`` skips those.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import cnl_ext

from .. import kif
from ..ops.importance import check_importance_options
from .data import LETTERS, DataError, read_jsonl, sample_n
from .model import MCQEncoder, backward_mean_loss, load_model, lora_adapters, predict, select_trainable
from .options import option
from .progress import bar, note
from .protocol import compute_reference, restore, snapshot
from .report import write_json

__all__ = ["METHODS", "ContinualConfig", "Task", "RunRecord", "continual_metrics", "parse_task", "load_tasks",
           "select_memory", "run", "run_sequence"]

METHODS = ("ft", "replay", "lora", "cnl", "kif", "kif-lora", "recurrent-kif")
LORA_METHODS = ("lora", "kif-lora")
MIN_MEMORY_PER_TASK = 8


@dataclass
class ContinualConfig:
    """The continual protocol: tasks, methods, their settings (each field is an option of `continual`)."""

    tasks: list[str] = option(None, "a task, NAME=FILE[,FILE...] (paper-format JSONL; several files are joined); "
                                    "repeat --task for each, in order", flag="--task", append=True,
                              metavar="NAME=FILE[,FILE...]")
    out_dir: str = option("continual-results", "folder for the results (runs/ holds one file per finished run; "
                                               "a few MB)", flag="--out", metavar="PATH")
    resume: bool = option(False, "skip the runs already saved in OUT/runs (their settings must match)")
    overwrite: bool = option(False, "delete what a non-empty OUT holds, then run (else it is refused)")
    model: str = option("smollm2", "hub id, local folder, .gguf file, or 'smollm2' (the embedded SmolLM2-135M)")
    gguf_file: str | None = option(None, "GGUF file name inside MODEL's folder")
    dtype: str = option("float32", "float32 or bfloat16 weights", choices=("float32", "bfloat16"))
    device: str = option("auto", "auto, cpu, cuda, ...")
    use_chat_template: bool = option(True, "feed the bare prompt, without the tokenizer's chat template (base "
                                           "models)", flag="--no-chat-template")
    methods: list[str] = option(METHODS, f"methods to compare, from {', '.join(METHODS)}")
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

    def __post_init__(self):
        self.methods = [m.strip() for item in self.methods for m in str(item).split(",") if m.strip()]
        self.orders, self.tasks = list(self.orders), list(self.tasks or ())
        self.seeds = [int(s) for s in self.seeds]
        self.betas, self.importance_betas = tuple(self.betas), tuple(self.importance_betas)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty list from {METHODS}, got {self.methods}")
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
        check_importance_options("first", self.importance_betas)
        for spec in self.tasks:
            parse_task(spec)

    def run_settings(self) -> dict:
        """The settings a saved run must share to be resumed (all but where and which runs)."""
        skip = {"out_dir", "resume", "overwrite", "methods", "orders", "seeds", "device", "eval_batch_size"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


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


# ---------------------------------------------------------------------------------- importance

def make_optimizer(params, *, lr: float, config: ContinualConfig, importance: str | None = None):
    """FusedCNLAdamW with the run's settings; with ``importance`` ("first" / "param_mix") it keeps KIF's
    EMAs itself, inside the step (``importance_scores()``, ``importance_state(slot)``)."""
    kwargs = dict(lr=lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay, backend=config.backend)
    if importance is not None:
        kwargs.update(importance=importance, importance_betas=config.importance_betas)
    return cnl_ext.FusedCNLAdamW(params, **kwargs)


# ---------------------------------------------------------------------------------- one run

@dataclass
class RunRecord:
    """One method through one task order with one seed."""

    method: str
    seed: int
    order: list  # task names, in training order
    base: list  # training-question accuracy of the model before training, per task (in order)
    matrix: list  # matrix[j][i]: accuracy on task i's training questions after task j
    heldout_base: list
    heldout_matrix: list  # the same on the held-out questions (None where a task has none)
    train_loss: list  # mean loss of the last epoch of each task
    wall_s: float
    notes: list = field(default_factory=list)  # e.g. fusion coefficients' summary per task

    def metrics(self) -> dict:
        result = continual_metrics(self.matrix, self.base)
        if all(row is not None and None not in row for row in self.heldout_matrix):
            held = continual_metrics(self.heldout_matrix, self.heldout_base)
            result.update({f"heldout_{k}": v for k, v in held.items()})
        return result

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), metrics=self.metrics())


def _accuracy(model, encoder, questions, batch_size):
    if not questions:
        return None
    answers = predict(model, encoder, questions, batch_size=batch_size, desc="eval")
    return sum(answers.correct(questions)) / len(questions)


def _evaluate(model, encoder, tasks, batch_size):
    return ([_accuracy(model, encoder, t.train, batch_size) for t in tasks],
            [_accuracy(model, encoder, t.heldout, batch_size) for t in tasks])


def _lora_pairs(named_params):
    """``[(index of lora_A, index of lora_B)]`` per adapted module, from PEFT's parameter names."""
    index = {name: i for i, (name, _) in enumerate(named_params)}
    pairs = []
    for name, i in index.items():
        if ".lora_A." in name:
            partner = name.replace(".lora_A.", ".lora_B.")
            if partner not in index:
                raise ValueError(f"LoRA parameter {name} has no lora_B partner")
            pairs.append((i, index[partner]))
    if not pairs:
        raise ValueError("no LoRA parameters (lora_A / lora_B) among the trainable parameters")
    return pairs


class _Trainer:
    """The steps of one task: a seeded batch order, the loss (+ KIFLoRA's orthogonality loss), clipping."""

    def __init__(self, model, encoder, params, config, extra_loss=None):
        self.model, self.encoder, self.params, self.config, self.extra_loss = model, encoder, params, config, extra_loss

    def step(self, optimizer, batch) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = backward_mean_loss(self.model, self.encoder, batch, batch_size=len(batch))
        if self.extra_loss is not None:
            self.extra_loss().backward()
        if self.config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        optimizer.step()
        return loss

    def batches(self, questions, seed_text):
        order = list(range(len(questions)))
        random.Random(seed_text).shuffle(order)
        size = self.config.batch_size
        return [[questions[i] for i in order[start:start + size]] for start in range(0, len(order), size)]


def run_sequence(model, encoder, tasks, memories, *, method: str, config: ContinualConfig, seed: int) -> RunRecord:
    """Train ``model`` through ``tasks`` (in order) with ``method``; ``memories[i]``: task i's memory.

    The model's weights change (the caller restores them); LoRA adapters are removed on return.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    start_time = time.perf_counter()
    base, heldout_base = _evaluate(model, encoder, tasks, config.eval_batch_size)
    matrix, heldout_matrix, losses, notes = [], [], [], []
    adapters = (lora_adapters(model, r=config.lora_r, alpha=config.lora_alpha) if method in LORA_METHODS
                else contextlib.nullcontext(model))
    with adapters as trained:
        if method not in LORA_METHODS:
            select_trainable(model, config.trainable)
        named = [(n, p) for n, p in trained.named_parameters() if p.requires_grad]
        params = kif.unique_parameters([p for _, p in named])
        lr = config.lora_lr if method in LORA_METHODS else config.lr
        merger, extra_loss = None, None
        if method == "kif":
            shapes = [p.shape for p in params]
            units = kif.Units.per_row(shapes) if config.kif_unit == "row" else kif.Units.per_tensor(shapes)
            merger = kif.KIFMerger(units, fusion="static", gamma=config.kif_gamma, beta=config.kif_beta,
                                   q=config.kif_quantile, backend=_fusion_backend(config))
        elif method == "kif-lora":
            pairs = _lora_pairs(named)
            units = kif.Units.build([p.shape for p in params], lora_pairs=pairs)
            merger = kif.KIFMerger(units, fusion="adaptive", tau=config.kif_tau, beta=config.kif_beta,
                                   q=config.kif_quantile, backend=_fusion_backend(config))
            lora_as, lora_bs = [params[a] for a, _ in pairs], [params[b] for _, b in pairs]
            extra_loss = lambda: kif.orthogonality_loss(lora_as, lora_bs, weight=config.orth_weight)  # noqa: E731
        trainer = _Trainer(trained, encoder, params, config, extra_loss)
        for k, task in enumerate(tasks):
            memory = [q for m in memories[:k] for q in m]
            summary, loss = _train_task(trained, encoder, trainer, params, task, memory, k=k, method=method,
                                        lr=lr, config=config, seed=seed, merger=merger)
            losses.append(loss)
            notes.append(summary)
            row, heldout_row = _evaluate(trained, encoder, tasks, config.eval_batch_size)
            matrix.append(row)
            heldout_matrix.append(heldout_row)
        for p in model.parameters():
            p.requires_grad_(True)
    return RunRecord(method, seed, [t.name for t in tasks], base, matrix, heldout_base, heldout_matrix, losses,
                     time.perf_counter() - start_time, notes)


def _fusion_backend(config):
    return config.backend if config.backend in ("auto", "torch", "triton") else "auto"


def _train_task(model, encoder, trainer, params, task, memory, *, k, method, lr, config, seed, merger):
    """Train one task; returns (a note for the report, the mean loss of the last epoch)."""
    seed_text = f"{seed}:{task.name}:{k}"
    train = list(task.train) + (memory if method == "replay" else [])
    if method == "recurrent-kif" and memory:
        return _train_task_recurrent_kif(trainer, params, train, memory, lr=lr, config=config, seed_text=seed_text)
    importance = {"kif": "first", "kif-lora": "param_mix"}.get(method)
    optimizer = make_optimizer(params, lr=lr, config=config, importance=importance)
    anchors = [p.detach().to(torch.float32, copy=True) for p in params] if merger is not None else None
    epoch_loss = None
    for epoch in range(1, config.epochs + 1):
        if method == "cnl" and memory:
            compute_reference(optimizer, model, encoder, memory, batch_size=config.reference_batch_size)
        started = time.perf_counter()
        losses = [trainer.step(optimizer, batch)
                  for batch in bar(trainer.batches(train, f"{seed_text}:{epoch}"),
                                   desc=f"{method} {task.name} epoch {epoch}", unit="step")]
        epoch_loss = sum(losses) / len(losses)
        note(f"{method} {task.name} epoch {epoch}/{config.epochs}: loss {epoch_loss:.4f}, "
             f"{time.perf_counter() - started:.0f} s")
    summary = ""
    if merger is not None:
        coefficients = merger.finish_task(params, anchors, optimizer.importance_scores())
        if coefficients is not None:
            summary = (f"fusion: mean share of the new task vector {coefficients.mean().item():.3f} over "
                       f"{coefficients.numel()} units")
    return summary, epoch_loss


def _train_task_recurrent_kif(trainer, params, train, memory, *, lr, config, seed_text):
    """Recurrent-KIF on a task with memory (spec §2.5): Q inner steps, R memory steps, masked fusion."""
    optimizer = make_optimizer(params, lr=lr, config=config, importance="first")  # slots "inner" and "outer"
    anchors = [p.detach().to(torch.float32, copy=True) for p in params]
    rng = random.Random(f"outer:{seed_text}")
    inner_steps, cycles, kept = 0, 0, []
    epoch_loss = None
    for epoch in range(1, config.epochs + 1):
        started, losses = time.perf_counter(), []
        for batch in bar(trainer.batches(train, f"{seed_text}:{epoch}"), desc=f"recurrent-kif epoch {epoch}",
                         unit="step"):
            optimizer.importance_slot = "inner"
            losses.append(trainer.step(optimizer, batch))
            inner_steps += 1
            if inner_steps % config.rkif_inner_steps:
                continue
            inner_ends = [p.detach().to(torch.float32, copy=True) for p in params]
            optimizer.importance_slot = "outer"
            for _ in range(config.rkif_outer_steps):
                trainer.step(optimizer, rng.sample(memory, min(config.batch_size, len(memory))))
            inner, outer = optimizer.importance_state("inner"), optimizer.importance_state("outer")
            delta_in = kif.score_quantile(*inner, config.rkif_quantile)
            delta_out = kif.score_quantile(*outer, config.rkif_quantile)
            kept.append(sum(int((s * u > delta_in).sum()) for s, u in zip(*inner)) / sum(p.numel() for p in params))
            kif.recurrent_fuse_(params, anchors, inner_ends, inner, outer, delta_in, delta_out,
                                rule=config.rkif_rule, backend=_fusion_backend(config))
            optimizer.reset_importance("inner")
            cycles += 1
        epoch_loss = sum(losses) / len(losses)
        note(f"recurrent-kif epoch {epoch}/{config.epochs}: loss {epoch_loss:.4f}, {cycles} fusion cycles so far, "
             f"{time.perf_counter() - started:.0f} s")
    summary = f"{cycles} fusion cycles" + (f", inner mask share {statistics.mean(kept):.3f}" if kept else "")
    return summary, epoch_loss


# ---------------------------------------------------------------------------------- all runs

def _orders(config, names):
    if not config.orders:
        return [list(names)]
    orders = []
    for spec in config.orders:
        order = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec)]
        if sorted(order) != sorted(names):
            raise ValueError(f"order {spec!r} is not a permutation of the tasks {list(names)}")
        orders.append(order)
    return orders


def _claim_out_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> Path:
    """``out_dir``, refused when it holds anything unless ``resume`` (keep its runs) or ``overwrite``
    (empty it first), so that one folder never mixes two runs' results."""
    if resume and overwrite:
        raise ValueError("--resume keeps OUT_DIR's runs and --overwrite deletes them: pass one")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file: name a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not resume:
        if not overwrite:
            raise ValueError(f"--out {out_dir} is not empty: pass --resume to continue its runs, --overwrite "
                             f"to replace them, or name another folder")
        for entry in out_dir.iterdir():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    return out_dir


def _run_path(out_dir, seed, order_index, method):
    return Path(out_dir) / "runs" / f"seed{seed}_order{order_index}_{method}.json"


def run(config: ContinualConfig, *, model=None, tokenizer=None) -> list:
    """Every (seed, order, method) run; writes the outputs to ``config.out_dir``; returns the RunRecords.

    ``model`` / ``tokenizer``: an already loaded pair (else ``config.model`` is loaded).
    """
    if not config.tasks:
        raise ValueError("no tasks: give at least one NAME=FILE[,FILE...]")
    names = [parse_task(spec)[0] for spec in config.tasks]
    orders = _orders(config, names)
    task_sets = {seed: load_tasks(config, seed) for seed in config.seeds}  # reads and checks every file first
    out_dir = _claim_out_dir(Path(config.out_dir), resume=config.resume, overwrite=config.overwrite)
    settings = json.loads(json.dumps(config.run_settings()))
    if model is None:
        model, tokenizer = load_model(config.model, gguf_file=config.gguf_file, dtype=config.dtype, device=config.device)
    elif tokenizer is None:
        raise ValueError("pass the tokenizer with the model")
    encoder = MCQEncoder(tokenizer, use_chat_template=config.use_chat_template)
    start_weights = snapshot(model)
    records = []
    try:
        for seed in config.seeds:
            for order_index, order in enumerate(orders):
                tasks = [task_sets[seed][name] for name in order]
                memories = [select_memory(t.train, config.memory_per_task, f"{seed}:{t.name}") for t in tasks]
                for method in config.methods:
                    path = _run_path(out_dir, seed, order_index, method)
                    if config.resume and path.is_file():
                        records.append(_load_run(path, settings, order))
                        continue
                    restore(model, start_weights)
                    torch.manual_seed(seed)  # LoRA's initialisation
                    record = run_sequence(model, encoder, tasks, memories, method=method, config=config, seed=seed)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_json(path, {"settings": settings, "run": record.to_dict()})
                    metrics = record.metrics()
                    print(f"seed {seed} order {'>'.join(order)} {method}: AP {metrics['AP']:.3f} "
                          f"BWT {_fmt(metrics['BWT'])} FWT {_fmt(metrics['FWT'])} ({record.wall_s:.0f} s)", flush=True)
                    records.append(record)
    finally:
        restore(model, start_weights)
    write_outputs(out_dir, records, config=config, task_sets=task_sets)
    return records


def _load_run(path, settings, order) -> RunRecord:
    saved = json.loads(Path(path).read_text(encoding="utf-8"))
    if saved.get("settings") != settings:
        differ = sorted(k for k in set(settings) | set(saved.get("settings", {}))
                        if settings.get(k) != saved.get("settings", {}).get(k))
        raise ValueError(f"--resume: {path} was made with other settings ({', '.join(differ)}); "
                         f"use another --out or drop --resume")
    run_dict = {k: v for k, v in saved["run"].items() if k != "metrics"}
    record = RunRecord(**run_dict)
    if record.order != list(order):
        raise ValueError(f"--resume: {path} trained the order {record.order}, this run {list(order)}")
    return record


# ---------------------------------------------------------------------------------- outputs

def _fmt(x, digits=3):
    return "n/a" if x is None else f"{x:+.{digits}f}" if x < 0 else f"{x:.{digits}f}"


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


METRIC_COLUMNS = ("AP", "BWT", "FWT", "FWT_gem", "heldout_AP", "heldout_BWT")


def summary_table(records) -> str:
    """Mean ± standard deviation over runs of each metric, one row per method (Markdown)."""
    methods = list(dict.fromkeys(r.method for r in records))
    lines = ["| method | runs | " + " | ".join(METRIC_COLUMNS) + " | wall s (mean) |",
             "|---|---|" + "---|" * len(METRIC_COLUMNS) + "---|"]
    for method in methods:
        runs = [r for r in records if r.method == method]
        cells = []
        for column in METRIC_COLUMNS:
            mean, std = _mean_std([r.metrics().get(column) for r in runs])
            cells.append("n/a" if mean is None else f"{mean:.3f} ± {std:.3f}")
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) +
                     f" | {statistics.mean(r.wall_s for r in runs):.0f} |")
    return "\n".join(lines) + "\n"


def matrix_table(record: RunRecord) -> str:
    header = "| after \\ task | " + " | ".join(record.order) + " |"
    lines = [header, "|---|" + "---|" * len(record.order),
             "| base | " + " | ".join(f"{x:.3f}" for x in record.base) + " |"]
    for j, row in enumerate(record.matrix):
        lines.append(f"| {record.order[j]} | " + " | ".join(f"{x:.3f}" for x in row) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir, records, *, config: ContinualConfig, task_sets: dict) -> None:
    """``matrices.csv``, ``summary.csv``, ``results.json``, ``tables.md``, heat maps and the comparison chart."""
    import csv

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "matrices.csv", "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["seed", "order", "method", "after_task_index", "after_task", "task", "train_accuracy",
                         "heldout_accuracy"])
        for r in records:
            order = ">".join(r.order)
            for i, name in enumerate(r.order):
                writer.writerow([r.seed, order, r.method, 0, "base", name, r.base[i], r.heldout_base[i]])
            for j, (row, held) in enumerate(zip(r.matrix, r.heldout_matrix), start=1):
                for i, name in enumerate(r.order):
                    writer.writerow([r.seed, order, r.method, j, r.order[j - 1], name, row[i], held[i]])
    with open(out_dir / "summary.csv", "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["seed", "order", "method", *METRIC_COLUMNS, "wall_s"])
        for r in records:
            m = r.metrics()
            writer.writerow([r.seed, ">".join(r.order), r.method, *(m.get(c) for c in METRIC_COLUMNS),
                             round(r.wall_s, 1)])
    sizes = {seed: {name: {"train": len(t.train), "heldout": len(t.heldout)} for name, t in tasks.items()}
             for seed, tasks in task_sets.items()}
    write_json(out_dir / "results.json", {"config": json.loads(json.dumps(dataclasses.asdict(config))),
                                          "task_sizes": sizes, "runs": [r.to_dict() for r in records]})
    parts = ["## Continual learning: summary", "",
             f"a[j][i] = share of task i's training questions answered correctly after task j; AP, BWT, FWT and "
             f"FWT_gem as in docs/kif-spec.md §5; held-out columns: the same on each task's held-out questions "
             f"(near chance for a small model). Mean ± standard deviation over each method's runs "
             f"(seeds × task orders).", "", summary_table(records), "## Accuracy matrices", ""]
    for r in records:
        parts += [f"### {r.method}, seed {r.seed}, order {' > '.join(r.order)}", "", matrix_table(r)]
        parts += [f"- {r.order[k]}: {text}" for k, text in enumerate(r.notes) if text] + [""]
    (out_dir / "tables.md").write_text("\n".join(parts), encoding="utf-8")
    plot_heatmaps(out_dir, records)
    plot_comparison(out_dir / "comparison.png", records)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmaps(out_dir, records) -> None:
    """``heatmap_<method>.png``: the accuracy matrix of each of the method's runs (base row on top)."""
    plt = _pyplot()
    for method in dict.fromkeys(r.method for r in records):
        runs = [r for r in records if r.method == method]
        figure, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs) + 1, 3.4), squeeze=False)
        for ax, r in zip(axes[0], runs):
            data = [r.base] + r.matrix
            image = ax.imshow(data, vmin=0, vmax=1, cmap="viridis")
            k = len(r.order)
            ax.set_xticks(range(k), r.order, rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(k + 1), ["base"] + [f"after {n}" for n in r.order], fontsize=7)
            for j, row in enumerate(data):
                for i, value in enumerate(row):
                    ax.text(i, j, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if value < 0.5 else "black")
            ax.set_title(f"seed {r.seed}: {' > '.join(r.order)}", fontsize=8)
        figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
        figure.suptitle(f"{method}: accuracy on each task's training questions")
        figure.savefig(Path(out_dir) / f"heatmap_{method}.png", dpi=110, bbox_inches="tight")
        plt.close(figure)


def plot_comparison(path, records) -> None:
    """AP, BWT and FWT per method (mean over runs, standard deviation as error bars)."""
    plt = _pyplot()
    methods = list(dict.fromkeys(r.method for r in records))
    metrics = ("AP", "BWT", "FWT")
    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6))
    for ax, metric in zip(axes, metrics):
        stats = [_mean_std([r.metrics()[metric] for r in records if r.method == m]) for m in methods]
        ax.bar(range(len(methods)), [s[0] if s[0] is not None else math.nan for s in stats],
               yerr=[s[1] if s[1] is not None else 0 for s in stats], capsize=3, color="tab:blue")
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=8)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    figure.suptitle("Continual learning: methods compared (mean ± std over seeds and orders)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
