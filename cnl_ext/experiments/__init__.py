"""Reproducing the CNL paper's experiments on real causal LMs (needs the ``experiments`` extra).

Layers: :mod:`.data` (questions), :mod:`.model` (loading, batched answering and losses),
:mod:`.training` (the optimizer by name, seeded batches, one step, accuracy), :mod:`.protocol`
(split, inject, out-of-set), :mod:`.teach` (taught first), :mod:`.reference_schedule` (when CNL's
reference is renewed), :mod:`.continual` (a sequence of tasks, every method),
:mod:`.analysis` (Tables 1 and 2), :mod:`.report` and :mod:`.continual_report` (CSV / JSON /
Markdown / figures), :mod:`.demo`; :mod:`.options`, :mod:`.outputs`, :mod:`.checkpoints` and
:mod:`.progress` are the run lifecycle the command line (:mod:`cnl_ext.cli`) drives. The optimizers
are used only through ``cnl_ext``'s public API.
"""
from .analysis import GradientAgreement, gradient_agreement, sim_dissim_groups, table1
from .data import (BENCHMARKS, DataError, MCQuestion, format_prompt, load_benchmark, load_mmac, read_jsonl,
                   sample_n, split_in_half, subsample, write_jsonl)
from .demo import DemoSettings, make_demo_questions, run_demo
from .model import MCQEncoder, backward_mean_loss, load_model, per_question_losses, predict, select_trainable
from .protocol import (DEFAULT_LR, METHODS, OPTIMIZERS, InjectConfig, RunResult, Split, compare, compute_reference,
                       infer_and_split, make_optimizer, out_of_set, run_injection)
from .report import results_table, write_run_outputs
from .teach import teach_first

__all__ = [
    "BENCHMARKS", "DEFAULT_LR", "METHODS", "OPTIMIZERS", "DataError", "DemoSettings", "GradientAgreement",
    "InjectConfig", "MCQEncoder", "MCQuestion", "RunResult", "Split", "backward_mean_loss", "compare",
    "compute_reference", "format_prompt", "gradient_agreement", "infer_and_split", "load_benchmark", "load_mmac",
    "load_model", "make_demo_questions", "make_optimizer", "out_of_set", "per_question_losses", "predict",
    "read_jsonl", "results_table", "run_demo", "run_injection", "sample_n", "select_trainable", "sim_dissim_groups",
    "split_in_half", "subsample", "table1", "teach_first", "write_jsonl", "write_run_outputs",
]
