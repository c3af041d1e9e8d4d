"""The subcommands' table and the argument parser built from it."""
from __future__ import annotations

import argparse

from .. import __version__
from ..experiments import continual
from ..experiments.ckl import CKLSettings
from ..experiments.continual import ContinualConfig
from ..experiments.data import QuestionSource
from ..experiments.demo import DemoSettings
from ..experiments.model import ModelOptions
from ..experiments.options import add_options
from ..experiments.protocol import InjectConfig
from ..experiments.teach import TeachSettings
from .commands import (DEFAULT_CONTINUAL_OUT, DEFAULT_DEMO_OUT, cmd_ckl, cmd_continual, cmd_demo, cmd_infer_and_split, cmd_inject, cmd_mmac,
                       cmd_out_of_set, cmd_prepare_data, cmd_table1, cmd_table2, cmd_teach, demo_folder_is_replaceable)
from .context import Subcommand
from .info import cmd_info
from .settings import DeepSpeedOption, FileOutput, FolderOutput, MmacSource, OutOfSetSide, ResumeOptions, RunPlan, SplitFiles, \
    TeachOutput

__all__ = ["SUBCOMMANDS", "build_parser", "DEBUG_ENV"]

DEBUG_ENV = "CNL_EXT_DEBUG"
DESCRIPTION = "the CNL paper's experiments from the command line."


# what the training commands write besides their results (under 1 MB), measured for SmolLM2 in float32
CHECKPOINTS_COST = ("; while it runs, resumable checkpoints of about 2.5 GB for SmolLM2 with AdamW, deleted at the "
                    "end (--no-checkpoints: none)")


def _subcommands() -> list:
    split_and_model = (SplitFiles, ModelOptions)
    no_lora_or_reference = ("optimizer", "lr", "reference_every", "adaptive_reference", "reference_dtype", "lora_r",
                            "lora_alpha", "ewc_lambda")
    return [
        Subcommand("demo", cmd_demo, "FT vs CNL (AdamW) on generated questions and the embedded SmolLM2 "
                   "(about 7 minutes on 2 CPU cores; writes under 1 MB, or about 2.5 GB more with --checkpoints)",
                   "python -m cnl_ext demo        # writes runs/demo; --epochs 1 --questions 16 for a quick look",
                   (ModelOptions, DemoSettings), checkpoints=True, out_default=DEFAULT_DEMO_OUT,
                   resume_defaults=dict(checkpoints=False),  # a 7-minute run: a checkpoint costs more than a rerun
                   replaceable=demo_folder_is_replaceable),
        Subcommand("prepare-data", cmd_prepare_data, "a benchmark (hub or local files) or JSONL files -> one "
                   "paper-format JSONL",
                   "python -m cnl_ext prepare-data --dataset arc_c --out data/arc_c.jsonl",
                   (QuestionSource,), output="file"),
        Subcommand("mmac", cmd_mmac, "the MMAC union (MMLU + MedQA + ARC-C + CSQA) -> one paper-format JSONL",
                   "python -m cnl_ext mmac --out data/mmac.jsonl", (MmacSource,), output="file"),
        Subcommand("infer-and-split", cmd_infer_and_split, "ask the model every question: mastered.jsonl (right) "
                   "and injection.jsonl (wrong)",
                   "python -m cnl_ext infer-and-split --data data/arc_c.jsonl --model Qwen/Qwen2.5-1.5B-Instruct "
                   "--out runs/split", (QuestionSource, ModelOptions)),
        Subcommand("teach", cmd_teach, "the taught-first variant: teach part of the questions, split, save the "
                   "taught model (about 540 MB for SmolLM2 in float32; --no-save-model: none)",
                   "python -m cnl_ext teach --data data/arc_c.jsonl --limit 400 --teach-lr 2e-4 --out runs/taught",
                   (QuestionSource, ModelOptions, TeachSettings, TeachOutput)),
        Subcommand("inject", cmd_inject, "in-set runs: FT / CNL / replay / LoRA / KORE / CorDA / EWC / A-GEM for "
                   "each optimizer, from one "
                   "starting model" + CHECKPOINTS_COST,
                   "python -m cnl_ext inject --model runs/taught/model --mastered runs/taught/mastered.jsonl "
                   "--injection runs/taught/injection.jsonl --optimizers sgd adamw --lr sgd=1e-3 adamw=1e-4 "
                   "--out runs/in_set",
                   (*split_and_model, RunPlan, (InjectConfig, dict(skip=("optimizer", "lr"))), DeepSpeedOption),
                   checkpoints=True),
        Subcommand("out-of-set", cmd_out_of_set, "out-of-set runs: one side of the split cut 1:1, one half "
                   "trained or referenced, the other counted" + CHECKPOINTS_COST,
                   "python -m cnl_ext out-of-set --mastered runs/split/mastered.jsonl --injection "
                   "runs/split/injection.jsonl --side mastered --out runs/oos",
                   (*split_and_model, OutOfSetSide, (RunPlan, dict(defaults=dict(methods=("ft", "cnl", "replay")))),
                    (InjectConfig, dict(skip=("optimizer", "lr")))), checkpoints=True),
        Subcommand("ckl", cmd_ckl, "CKL's update task on a taught split: a share of the mastered questions gets "
                   "a changed answer, the injection set is new, the rest is invariant; forgotten, updated, acquired "
                   "and FUAR per method" + CHECKPOINTS_COST,
                   "python -m cnl_ext ckl --model runs/taught/model --mastered runs/taught/mastered.jsonl "
                   "--injection runs/taught/injection.jsonl --methods ft cnl replay lora kore corda "
                   "--update-fraction 0.25 --out runs/ckl",
                   (*split_and_model, CKLSettings, RunPlan, (InjectConfig, dict(skip=("optimizer", "lr")))),
                   checkpoints=True),
        Subcommand("table1", cmd_table1, "Table 1: forgetting of Sim / Dissim mastered questions under FT"
                   + CHECKPOINTS_COST,
                   "python -m cnl_ext table1 --mastered runs/split/mastered.jsonl --injection "
                   "runs/split/injection.jsonl --epochs 5 --out runs/table1",
                   (*split_and_model, (InjectConfig, dict(skip=no_lora_or_reference[2:]))), checkpoints=True),
        Subcommand("table2", cmd_table2, "Table 2: shares of collaborative / conflicting elements and sums of s "
                   "(fused kernels)",
                   "python -m cnl_ext table2 --mastered runs/split/mastered.jsonl --injection "
                   "runs/split/injection.jsonl --out runs/table2",
                   (*split_and_model, (InjectConfig, dict(only=("trainable", "reference_batch_size", "backend"))))),
        Subcommand("continual", cmd_continual, "a sequence of knowledge-injection tasks with every method (ft, "
                   "replay, lora, cnl, kif, kif-lora, recurrent-kif, kore, corda, ewc, agem): accuracy matrices, AP, "
                   "BWT, FWT (writes a few MB: "
                   "each finished run, a few kB, is what --resume reads)",
                   "python -m cnl_ext continual --task arc=a.jsonl --task csqa=c.jsonl --out runs/continual",
                   (ModelOptions, ContinualConfig, (ResumeOptions, dict(only=("resume",)))),
                   out_default=DEFAULT_CONTINUAL_OUT, saved_runs=continual.saved_runs),
        Subcommand("info", cmd_info, "versions, devices, the compiled extension and the usable backends (paste it "
                   "into a bug report)", "python -m cnl_ext info", output=None),
    ]


SUBCOMMANDS = _subcommands()


# ---------------------------------------------------------------------------------- parser

class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=32)


class _Parser(argparse.ArgumentParser):
    """argparse with one ``error: ...`` line (exit status 2) that says where the help is."""

    def error(self, message):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m cnl_ext", description=DESCRIPTION, formatter_class=_HelpFormatter,
        epilog="python -m cnl_ext SUBCOMMAND --help shows its options and an example.\n"
               f"On an error, --debug (or {DEBUG_ENV}=1) shows the traceback.")
    parser.add_argument("--version", action="version", version=f"cnl_ext {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND", parser_class=_Parser)
    for command in SUBCOMMANDS:
        command_parser = sub.add_parser(command.name, help=command.summary, description=command.summary + ".",
                                        epilog=f"example:\n  {command.example}", formatter_class=_HelpFormatter)
        for spec in command.options:
            cls, kwargs = spec if isinstance(spec, tuple) else (spec, {})
            add_options(command_parser, cls, **kwargs)
        if command.output == "folder":
            defaults = {"out": command.out_default} if command.out_default else None
            add_options(command_parser, FolderOutput, defaults=defaults)
        elif command.output == "file":
            add_options(command_parser, FileOutput)
        if command.checkpoints:
            add_options(command_parser, ResumeOptions, defaults=command.resume_defaults)
        command_parser.add_argument("--debug", action="store_true",
                                    help=f"show the traceback of an error (or set {DEBUG_ENV}=1)")
        command_parser.set_defaults(_subcommand=command, _parser=command_parser)
    return parser


