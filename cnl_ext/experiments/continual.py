"""The continual-learning protocol: one model trained through a sequence of tasks, every method compared.

A task is a set of questions to inject (paper-format JSONL files), as in the CNL paper and the CKL
benchmark. After task j the model answers every task's training questions: ``a[j][i]`` is the share
of task i's training questions answered correctly (row 0: the base model). A seeded share of each
task is held out of training and reported beside it (for a small model it sits near chance).
After each task, ``memory_per_task`` of its training questions (balanced by answer letter) join one
memory buffer, the same questions for every method that uses memory (replay, cnl, recurrent-kif, kore,
corda, ewc, agem).

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
``kore``        a fresh adapter per task        KORE's null-space adapter from the memory (task 1:
                                                plain LoRA), merged after the task (:mod:`.adapters`)
``corda``       a fresh adapter per task        CorDA (PEFT, kpm) from the memory, likewise
``ewc``         all parameters                  online EWC: F over each task's memory, carried on
``agem``        all parameters                  A-GEM: reference as CNL's, gradient projected
==============  ==============================  =================================================

Every method uses AdamW (``cnl_ext.FusedCNLAdamW``), a fresh optimizer per task (spec §6.7; EWC carries only
F and θ* into it, :mod:`.methods`), the final
weights of each task (no checkpoint selection). :func:`run` does all runs (seeds × task orders ×
methods) on a loaded model and writes ``matrices.csv``, ``summary.csv``, ``results.json``,
``tables.md``, ``heatmap_<method>.png`` and ``comparison.png`` (:mod:`.continual_report`); every
finished run is saved in ``runs/`` (a few kB each, so a continued command skips it); the command line
(``python -m cnl_ext continual``) gives it the model, the output folder and ``--resume``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import kif
from .adapters import ADAPTER_METHODS, knowledge_adapters
from .continual_report import format_metric, write_outputs
from .continual_setup import (CONTINUAL_METHODS, LORA_METHODS, MIN_MEMORY_PER_TASK, ContinualConfig, Task,  # noqa: F401
                              continual_metrics, load_tasks, parse_task, select_memory)
from .methods import REFERENCE_METHODS, capture_fisher, carry_ewc, optimizer_options
from .model import MCQEncoder, ModelOptions, lora_adapters, select_trainable
from .outputs import write_json
from .progress import bar, note
from .protocol import compute_reference, restore, snapshot
from .reference_schedule import ReferenceSchedule, predicted_change
from .training import accuracy, make_optimizer, seeded_batches, train_step

__all__ = ["CONTINUAL_METHODS", "ContinualConfig", "Task", "RunRecord", "continual_metrics", "parse_task",
           "load_tasks", "select_memory", "task_optimizer", "run", "run_sequence", "saved_runs"]

# ---------------------------------------------------------------------------------- importance

def task_optimizer(params, *, lr: float, config: ContinualConfig, importance: str | None = None, method: str = ""):
    """FusedCNLAdamW with the run's settings; with ``importance`` ("first" / "param_mix") it keeps KIF's
    EMAs itself, inside the step (``importance_scores()``, ``importance_state(slot)``); ``method``
    "agem" / "ewc": A-GEM's rule, EWC's λ and γ (:mod:`.methods`)."""
    kwargs = dict(importance=importance, importance_betas=config.importance_betas) if importance is not None else {}
    kwargs.update(optimizer_options(method, ewc_lambda=config.ewc_lambda, ewc_decay=config.ewc_decay))
    track_stats = method == "cnl" and config.adaptive_reference is not None  # the first-order prediction
    return make_optimizer("adamw", params, lr=lr, betas=config.betas, eps=config.eps,
                          weight_decay=config.weight_decay, backend=config.backend, track_stats=track_stats, **kwargs)


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
    adapters: list = field(default_factory=list)  # kore / corda: per task, the adapter's init (adapters.py)

    def metrics(self) -> dict:
        result = continual_metrics(self.matrix, self.base)
        if all(row is not None and None not in row for row in self.heldout_matrix):
            held = continual_metrics(self.heldout_matrix, self.heldout_base)
            result.update({f"heldout_{k}": v for k, v in held.items()})
        return result

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), metrics=self.metrics())


def _accuracies(model, encoder, tasks, batch_size):
    """Each task's accuracy on its training questions, and on its held-out ones."""
    return ([accuracy(model, encoder, t.train, batch_size=batch_size) for t in tasks],
            [accuracy(model, encoder, t.heldout, batch_size=batch_size) for t in tasks])


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
        return train_step(self.model, self.encoder, optimizer, batch, extra_loss=self.extra_loss,
                          max_grad_norm=self.config.max_grad_norm, params=self.params)

    def batches(self, questions, seed_text):
        return seeded_batches(questions, self.config.batch_size, seed_text)


def run_sequence(model, encoder, tasks, memories, *, method: str, config: ContinualConfig, seed: int) -> RunRecord:
    """Train ``model`` through ``tasks`` (in order) with ``method``; ``memories[i]``: task i's memory.

    The model's weights change (the caller restores them); LoRA adapters are removed on return.
    """
    if method not in CONTINUAL_METHODS:
        raise ValueError(f"method must be one of {CONTINUAL_METHODS}, got {method!r}")
    start_time = time.perf_counter()
    base, heldout_base = _accuracies(model, encoder, tasks, config.eval_batch_size)
    matrix, heldout_matrix, losses, notes, adapter_infos = [], [], [], [], []
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
        ewc = [] if method == "ewc" else None  # online EWC: the previous task's optimizer, holding F and θ*
        for k, task in enumerate(tasks):
            memory = [q for m in memories[:k] for q in m]
            if method in ADAPTER_METHODS:
                summary, loss, info = _train_adapter_task(model, encoder, task, memory, k=k, method=method,
                                                          config=config, seed=seed)
                adapter_infos.append(info)
            else:
                summary, loss = _train_task(trained, encoder, trainer, params, task, memory, k=k, method=method,
                                            lr=lr, config=config, seed=seed, merger=merger, ewc=ewc,
                                            task_memory=memories[k] if k + 1 < len(tasks) else ())
            losses.append(loss)
            notes.append(summary)
            row, heldout_row = _accuracies(trained, encoder, tasks, config.eval_batch_size)
            matrix.append(row)
            heldout_matrix.append(heldout_row)
        for p in model.parameters():
            p.requires_grad_(True)
    return RunRecord(method, seed, [t.name for t in tasks], base, matrix, heldout_base, heldout_matrix, losses,
                     time.perf_counter() - start_time, notes, adapter_infos)


def _fusion_backend(config):
    return config.backend if config.backend in ("auto", "torch", "triton") else "auto"


def _train_task(model, encoder, trainer, params, task, memory, *, k, method, lr, config, seed, merger, ewc=None,
                task_memory=()):
    """Train one task; returns (a note for the report, the mean loss of the last epoch). ``ewc``: a list
    holding the previous task's optimizer (F, θ*), replaced by this one's after F over ``task_memory``."""
    seed_text = f"{seed}:{task.name}:{k}"
    train = list(task.train) + (memory if method == "replay" else [])
    if method == "recurrent-kif" and memory:
        return _train_task_recurrent_kif(trainer, params, train, memory, lr=lr, config=config, seed_text=seed_text)
    importance = {"kif": "first", "kif-lora": "param_mix"}.get(method)
    optimizer = task_optimizer(params, lr=lr, config=config, importance=importance, method=method)
    if ewc:
        carry_ewc(ewc.pop(), optimizer)
    anchors = [p.detach().to(torch.float32, copy=True) for p in params] if merger is not None else None
    epoch_loss = None
    batches = [trainer.batches(train, f"{seed_text}:{epoch}") for epoch in range(1, config.epochs + 1)]
    schedule = ReferenceSchedule.for_run(steps_per_epoch=len(batches[0]), every=None,
                                         tolerance=config.adaptive_reference)
    for epoch, epoch_batches in enumerate(batches, start=1):
        started = time.perf_counter()
        losses = []
        for batch in bar(epoch_batches, desc=f"{method} {task.name} epoch {epoch}", unit="step"):
            if method in REFERENCE_METHODS and memory and schedule.due():
                schedule.refreshed(compute_reference(optimizer, model, encoder, memory,
                                                     batch_size=config.reference_batch_size))
            losses.append(trainer.step(optimizer, batch))
            stats = optimizer.cnl_stats() if optimizer.track_stats else None
            schedule.stepped(predicted_change(optimizer, stats) if stats is not None else None)
        epoch_loss = sum(losses) / len(losses)
        note(f"{method} {task.name} epoch {epoch}/{config.epochs}: loss {epoch_loss:.4f}, "
             f"{time.perf_counter() - started:.0f} s")
    summary = ""
    if ewc is not None and task_memory:  # online EWC: F ← γ·F + F over this task's memory, θ* = the weights now
        capture_fisher(optimizer, model, encoder, task_memory, desc=f"fisher {task.name}")
        ewc.append(optimizer)
        summary = f"ewc: Fisher over {len(task_memory)} memory questions"
    if merger is not None:
        coefficients = merger.finish_task(params, anchors, optimizer.importance_scores())
        if coefficients is not None:
            summary = (f"fusion: mean share of the new task vector {coefficients.mean().item():.3f} over "
                       f"{coefficients.numel()} units")
    return summary, epoch_loss


def _train_adapter_task(model, encoder, task, memory, *, k, method, config, seed):
    """KORE / CorDA: a fresh adapter per task built from the memory of the earlier tasks (the first task,
    with no memory yet: plain LoRA), merged into the weights after the task; returns (note, loss, info)."""
    with knowledge_adapters(method, model, encoder, memory, r=config.lora_r, alpha=config.lora_alpha,
                            plain_without_memory=True) as (trained, info):
        params = [p for p in trained.parameters() if p.requires_grad]
        trainer = _Trainer(trained, encoder, params, config)
        _, loss = _train_task(trained, encoder, trainer, params, task, memory, k=k, method=method,
                              lr=config.lora_lr, config=config, seed=seed, merger=None)
    summary = (f"{info['method']}: {info['trainable_params']:,} trained parameters"
               + (f", outputs moved by at most {info['init_max_abs_dlogits']:.2g} at init" if memory else
                  " (no memory yet)"))
    return summary, loss, info


def _train_task_recurrent_kif(trainer, params, train, memory, *, lr, config, seed_text):
    """Recurrent-KIF on a task with memory (spec §2.5): Q inner steps, R memory steps, masked fusion."""
    optimizer = task_optimizer(params, lr=lr, config=config, importance="first")  # slots "inner" and "outer"
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


def _run_path(out_dir, seed, order_index, method):
    return Path(out_dir) / "runs" / f"seed{seed}_order{order_index}_{method}.json"


def run(config: ContinualConfig, model, encoder: MCQEncoder, out_dir, *, model_options: ModelOptions = ModelOptions(),
        resume: bool = False, provenance=None) -> list:
    """Every (seed, order, method) run of ``model``; writes the outputs into ``out_dir``; returns the RunRecords.

    ``model_options``: what the model is, recorded with every run. ``resume``: the runs saved in
    ``out_dir/runs`` are read back, not run again (their settings must be these). ``provenance``: a
    function returning what ``results.json`` records about how it was made (the CLI's).
    """
    if not config.tasks:
        raise ValueError("no tasks: give at least one NAME=FILE[,FILE...]")
    names = [parse_task(spec)[0] for spec in config.tasks]
    orders = _orders(config, names)
    task_sets = {seed: load_tasks(config, seed) for seed in config.seeds}  # reads and checks every file first
    settings = config.run_settings(model_options)
    start_weights = snapshot(model)
    records = []
    try:
        for seed in config.seeds:
            for order_index, order in enumerate(orders):
                tasks = [task_sets[seed][name] for name in order]
                memories = [select_memory(t.train, config.memory_per_task, f"{seed}:{t.name}") for t in tasks]
                for method in config.methods:
                    path = _run_path(out_dir, seed, order_index, method)
                    if resume and path.is_file():
                        records.append(_load_run(path, settings, order))
                        continue
                    restore(model, start_weights)
                    torch.manual_seed(seed)  # LoRA's initialisation
                    record = run_sequence(model, encoder, tasks, memories, method=method, config=config, seed=seed)
                    write_json(path, {"settings": settings, "run": record.to_dict()})
                    metrics = record.metrics()
                    print(f"seed {seed} order {'>'.join(order)} {method}: AP {metrics['AP']:.3f} "
                          f"BWT {format_metric(metrics['BWT'])} FWT {format_metric(metrics['FWT'])} "
                          f"({record.wall_s:.0f} s)", flush=True)
                    records.append(record)
    finally:
        restore(model, start_weights)
    configuration = dict(dataclasses.asdict(config), model=model_options.model, gguf_file=model_options.gguf_file,
                         dtype=model_options.dtype, device=model_options.device,
                         use_chat_template=encoder.use_chat_template)
    write_outputs(out_dir, records, settings=dict(config=json.loads(json.dumps(configuration)),
                                                  **(provenance() if provenance else {})), task_sets=task_sets)
    return records


def saved_runs(folder, finished=None) -> str | None:
    """The runs an interrupted ``continual`` saved in ``folder`` beyond those of the ``finished`` folder it
    continues, in words (None: none)."""
    def names(root):
        return {path.name for path in (Path(root) / "runs").glob("*.json")} if root is not None else set()

    new = names(folder) - names(finished)
    return f"{len(new)} finished run(s)" if new else None


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
