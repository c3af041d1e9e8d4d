"""The settings of the CLI's commands that are not the experiments' own: the split files, the run plan,
the out-of-set side, the MMAC sources, and every command's output and resume options."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..experiments.data import MMAC_PARTS, DataError, read_jsonl, sample_n
from ..experiments.options import option
from ..experiments.protocol import METHODS, OPTIMIZERS

__all__ = ["SplitFiles", "RunPlan", "OutOfSetSide", "FolderOutput", "FileOutput", "ResumeOptions", "MmacSource",
           "TeachOutput", "DeepSpeedOption"]

@dataclass
class SplitFiles:
    """The split: mastered.jsonl and injection.jsonl (from infer-and-split or teach)."""

    mastered: Path = option(help="mastered.jsonl: questions the model answers right (the reference set)")
    injection: Path = option(help="injection.jsonl: questions it answers wrong (the training set)")
    limit_mastered: int | None = option(None, "use at most this many mastered questions (a seeded sample)")
    limit_injection: int | None = option(None, "use at most this many injection questions (a seeded sample)")

    def __post_init__(self):
        for flag, path in (("--mastered", self.mastered), ("--injection", self.injection)):
            if not Path(path).is_file():
                raise DataError(f"{flag} {path}: no such file")
        for name in ("limit_mastered", "limit_injection"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def load(self, seed: int = 0):
        return (sample_n(read_jsonl(self.mastered), self.limit_mastered, seed),
                sample_n(read_jsonl(self.injection), self.limit_injection, seed))


@dataclass
class RunPlan:
    """Runs: which optimizers and methods, at which learning rates."""

    optimizers: tuple[str, ...] = option(("adamw",), "optimizers to run", choices=OPTIMIZERS)
    methods: tuple[str, ...] = option(("ft", "cnl"), "methods to run for each optimizer", choices=METHODS)
    lr: tuple[str, ...] = option((), "learning rate: one number for all, and/or NAME=VALUE per optimizer "
                                      "(default: sgd/momentum 1e-7, the paper's; adam/adamw 1e-6)",
                                 metavar="LR")

    def __post_init__(self):
        for name in ("optimizers", "methods"):
            listed = getattr(self, name)
            if len(set(listed)) != len(listed):
                raise ValueError(f"--{name} {' '.join(listed)}: each at most once")
        self.default_lr, self.lrs = None, {}
        for value in self.lr:
            name, sep, number = value.partition("=")
            try:
                rate = float(number if sep else value)
            except ValueError:
                raise ValueError(f"--lr {value}: not a number; give one number or NAME=VALUE pairs") from None
            if not rate > 0:
                raise ValueError(f"--lr {value}: a learning rate must be > 0")
            if not sep:
                if self.default_lr is not None:
                    raise ValueError(f"--lr: two plain numbers ({self.default_lr:g} and {value}); give one number "
                                     "for all optimizers, and NAME=VALUE for the others")
                self.default_lr = rate
            elif name not in OPTIMIZERS:
                raise ValueError(f"--lr {value}: no optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
            elif name not in self.optimizers:
                raise ValueError(f"--lr {value}: {name} is not among --optimizers ({' '.join(self.optimizers)}); "
                                 f"add it to --optimizers or drop it from --lr")
            else:
                self.lrs[name] = rate


@dataclass
class OutOfSetSide:
    """Out-of-set: which side is split 1:1."""

    side: str = option("mastered", "mastered: reference (and replay data) from one half of M, Forgot counted on the "
                                   "other; injection: train on one half of I, Learned counted on the other",
                       choices=("mastered", "injection"))
    split_seed: int = option(0, "seed of the 1:1 split")


@dataclass
class FolderOutput:
    """Output folder."""

    out: Path = option(help="output folder (refused if not empty, unless --overwrite or --resume)",
                       deprecated=("--out-dir",))  # continual's flag until 0.1
    overwrite: bool = option(False, "replace a non-empty --out (the old contents go when the new run is complete)")


@dataclass
class FileOutput:
    """Output file."""

    out: Path = option(help="output .jsonl file")
    overwrite: bool = option(False, "replace an existing --out")


@dataclass
class ResumeOptions:
    """Resuming (what a run saves so that an interrupted command continues)."""

    resume: bool = option(False, "continue an interrupted command where it stopped (finished runs are read back, "
                                 "an unfinished one continues from its last saved epoch: the same numbers as "
                                 "without the interruption); rerun the same command with --resume")
    keep_checkpoints: bool = option(False, "keep the checkpoints of finished runs in OUT/checkpoints (about 2 GB "
                                           "per run for SmolLM2 with AdamW; deleted by default)")
    checkpoints: bool = option(True, "resumable checkpoints: the starting weights once, and each run's weights, "
                                     "optimizer state and reference at every epoch end (written over; about 0.5 + "
                                     "2 GB for SmolLM2 with AdamW in float32); without them an interrupted "
                                     "command starts again")


@dataclass
class MmacSource:
    """The MMAC parts."""

    data_files: tuple[str, ...] = option((), "local files per benchmark instead of the hub, e.g. mmlu=mmlu.parquet",
                                         metavar="NAME=FILE")
    fraction: float | None = option(None, "subsampling of every part (default: each one's paper value)")
    seed: int = option(0, "seed of the subsampling")

    def __post_init__(self):
        self.files = {}
        for item in self.data_files:
            name, sep, path = item.partition("=")
            if not sep or name not in MMAC_PARTS:
                raise ValueError(f"--data-files {item}: expected NAME=FILE with NAME in {', '.join(MMAC_PARTS)}")
            if not Path(path).is_file():
                raise DataError(f"--data-files {item}: no such file")
            self.files[name] = path
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")


@dataclass
class TeachOutput:
    """Taught model."""

    save_model: bool = option(True, "do not save the taught model to OUT/model")


@dataclass
class DeepSpeedOption:
    """inject under DeepSpeed (cnl_ext/experiments/deepspeed_runs.py)."""

    deepspeed: Path | None = option(None, "a DeepSpeed config (JSON, ZeRO 1 or 2, no optimizer section): the CNL "
                                          "optimizer as DeepSpeed's client optimizer, its states partitioned over "
                                          "the ranks (launch with torchrun or deepspeed; rank 0 writes --out; no "
                                          "checkpoints)", metavar="CONFIG")
