"""python -m cnl_ext SUBCOMMAND (or cnl-ext): the CNL paper's experiments from the command line.

One mechanism for every subcommand (a new one is one Subcommand(...) entry in SUBCOMMANDS):

- options come from the settings dataclasses they fill (cnl_ext.experiments.options), so each is
  declared once, with its help, default and choices;
- everything checkable is checked before the model loads (the dataclasses' own checks, the model's
  location, the device, the backend, the output location); a problem is one "error: ..." line and
  exit status 2 (--debug or CNL_EXT_DEBUG=1 shows the traceback);
- outputs go through cnl_ext.experiments.outputs: a staging folder moved into place at the end,
  every file written atomically, results.json with the command, versions, seeds and weight hashes;
- multi-run subcommands keep checkpoints there and continue with --resume; Ctrl-C says what was
  saved and how to continue.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

from .experiments.options import add_options, build, declared_names, flag_of, option

__all__ = ["main", "build_parser", "Subcommand", "SUBCOMMANDS", "Context"]

DEBUG_ENV = "CNL_EXT_DEBUG"
DEFAULT_DEMO_OUT = Path("runs/demo")


# ---------------------------------------------------------------------------------- option dataclasses of the CLI

@dataclass
class SplitFiles:
    """The split: mastered.jsonl and injection.jsonl (from infer-and-split or teach)."""

    mastered: Path = option(help="mastered.jsonl: questions the model answers right (the reference set)")
    injection: Path = option(help="injection.jsonl: questions it answers wrong (the training set)")
    limit_mastered: int | None = option(None, "use at most this many mastered questions (a seeded sample)")
    limit_injection: int | None = option(None, "use at most this many injection questions (a seeded sample)")

    def __post_init__(self):
        from .experiments.data import DataError

        for flag, path in (("--mastered", self.mastered), ("--injection", self.injection)):
            if not Path(path).is_file():
                raise DataError(f"{flag} {path}: no such file")
        for name in ("limit_mastered", "limit_injection"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def load(self, seed: int = 0):
        from .experiments.data import read_jsonl, sample_n

        return (sample_n(read_jsonl(self.mastered), self.limit_mastered, seed),
                sample_n(read_jsonl(self.injection), self.limit_injection, seed))


def _optimizers():
    from .experiments.protocol import OPTIMIZERS
    return OPTIMIZERS


def _methods():
    from .experiments.protocol import METHODS
    return METHODS


@dataclass
class RunPlan:
    """Runs: which optimizers and methods, at which learning rates."""

    optimizers: tuple[str, ...] = option(("adamw",), "optimizers to run", choices=_optimizers)
    methods: tuple[str, ...] = option(("ft", "cnl"), "methods to run for each optimizer", choices=_methods)
    lr: tuple[str, ...] = option((), "learning rate: one number for all, and/or NAME=VALUE per optimizer "
                                      "(default: sgd/momentum 1e-7, the paper's; adam/adamw 1e-6)",
                                 metavar="LR")

    def __post_init__(self):
        from .experiments.protocol import OPTIMIZERS

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

    out: Path = option(help="output folder (refused if not empty, unless --overwrite or --resume)")
    overwrite: bool = option(False, "replace a non-empty --out (the old contents go when the new run is complete)")


@dataclass
class FileOutput:
    """Output file."""

    out: Path = option(help="output .jsonl file")
    overwrite: bool = option(False, "replace an existing --out")


@dataclass
class ResumeOptions:
    """Checkpoints (one per run, replaced at every epoch end)."""

    resume: bool = option(False, "continue an interrupted run from its last finished epoch (same numbers as an "
                                 "uninterrupted run); rerun the same command with --resume")
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
        from .experiments.data import DataError, MMAC_PARTS

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


# ---------------------------------------------------------------------------------- subcommands

@dataclass
class Subcommand:
    """A subcommand: ``run(ctx)`` and the settings dataclasses its options fill.

    ``options``: dataclasses, or ``(dataclass, dict(only=..., skip=..., defaults=...))`` pairs
    (see :func:`~cnl_ext.experiments.options.add_options`); ``ctx[Dataclass]`` is the instance.
    ``output``: ``"folder"`` (``--out`` folder, staged and swapped in), ``"file"`` or None.
    ``checkpoints``: adds ``--resume`` / ``--keep-checkpoints``; ``ctx.checkpoints`` is the store.
    """

    name: str
    run: Callable
    summary: str  # one line
    example: str
    options: tuple = ()
    output: str | None = "folder"
    checkpoints: bool = False
    out_default: Path | None = None
    replaceable: Callable | None = None  # a non-empty --out that may be replaced without --overwrite
    resume_defaults: dict = field(default_factory=dict)  # this command's defaults of ResumeOptions


def _models():
    from .experiments.model import ModelOptions
    return ModelOptions


class Context:
    """What a running subcommand uses: its settings, its output folder, the model loader."""

    def __init__(self, command: Subcommand, parser, args, argv):
        self.command, self.argv, self.args = command, list(argv), args
        from .experiments.outputs import UsageError

        self.configs, self.declared = {}, {}
        for cls in _option_classes(command):
            self.declared[cls] = declared_names(parser, cls)
            try:
                self.configs[cls] = build(cls, args, parser)
            except ValueError as error:  # the settings' own checks: a usage problem, not a bug
                raise UsageError(str(error)) from error
        self.out = None
        self.checkpoints = None
        self.weights_sha256 = {}
        self.started = time.perf_counter()
        self._opened = False

    def __getitem__(self, cls):
        return self.configs[cls]

    def get(self, cls, default=None):
        return self.configs.get(cls, default)

    # --------------------------------------------------------------------------- before any work

    def check(self) -> None:
        """Everything checkable before the model loads (the dataclasses checked themselves when built)."""
        from .experiments.outputs import OutputFolder, UsageError, check_output_file

        models = self.get(_models())
        if models is not None:
            models.check()
            device = _device(models.device)
            for config in self.configs.values():
                if hasattr(config, "backend"):
                    _check_backend(config.backend, device)
        if self.command.output == "file":
            output = self[FileOutput]
            check_output_file(output.out, overwrite=output.overwrite)
        elif self.command.output == "folder":
            output = self[FolderOutput]
            resume = self.get(ResumeOptions, ResumeOptions())
            if output.overwrite and resume.resume:
                raise UsageError("--overwrite starts again and --resume continues: give one of the two")
            replaceable = self.command.replaceable
            self.out = OutputFolder(output.out, overwrite=output.overwrite, resume=resume.resume,
                                    replaceable=(lambda path: replaceable(self, path)) if replaceable else None)
            options = self.options_record()
            self.out.check(options)
            self.out.open(options)  # a failure before anything is saved removes it again (abandon)
            self._opened = True
            if not resume.checkpoints and (resume.resume or resume.keep_checkpoints):
                raise UsageError("--resume and --keep-checkpoints need checkpoints: "
                                 + ("add --checkpoints (this command saves none by default)"
                                    if self.command.resume_defaults.get("checkpoints") is False
                                    else "drop --no-checkpoints"))
            if self.command.checkpoints and resume.checkpoints:
                from .experiments.checkpoints import RunCheckpoints

                self.checkpoints = RunCheckpoints(self.out.staging / "checkpoints", keep=resume.keep_checkpoints)
            if resume.resume and not self.out.resuming:
                print(f"--resume: no interrupted run of {output.out}; starting from the beginning")

    # --------------------------------------------------------------------------- the work

    @property
    def out_dir(self) -> Path:
        """The folder to write into (the staging folder, moved to --out when the command has finished)."""
        return self.out.path

    def load_model(self):
        """``(model, tokenizer, encoder)`` from the model options; records the weights' sha256."""
        import torch

        from .experiments.model import MCQEncoder, load_model
        from .experiments.model import weight_files
        from .experiments.outputs import sha256_file
        from .experiments.progress import quiet_library_bars

        quiet_library_bars()
        options = self[_models()]
        if options.threads:
            torch.set_num_threads(options.threads)
        started = time.perf_counter()
        model, tokenizer = load_model(options.model, gguf_file=options.gguf_file, dtype=options.dtype,
                                      device=options.device)
        self.weights_sha256 = {path.name: sha256_file(path) for path in weight_files(options.model, options.gguf_file)}
        print(f"loaded {options.model} in {time.perf_counter() - started:.1f} s "
              f"({sum(p.numel() for p in model.parameters()):,} parameters, {options.dtype}, {model.device})")
        return model, tokenizer, MCQEncoder(tokenizer, use_chat_template=options.chat_template)

    def options_record(self) -> dict:
        """Every option as given (by flag), except those that do not change the results."""
        ignored = {"resume", "keep_checkpoints", "checkpoints", "overwrite", "threads"}
        record = {}
        for cls, config in self.configs.items():
            for f in fields(cls):
                if f.name in ignored or f.name not in self.declared[cls]:
                    continue
                record[flag_of(f)] = _jsonable(getattr(config, f.name))
        return json.loads(json.dumps(record))

    def provenance(self) -> dict:
        from .experiments.outputs import provenance

        seeds = {flag: value for flag, value in self.options_record().items() if flag.endswith("seed")}
        return provenance(self.argv, seeds=seeds, weights=self.weights_sha256)

    def write_results(self, payload: dict, name: str = "results.json") -> None:
        from .experiments.outputs import write_json

        write_json(self.out_dir / name, dict(payload, **self.provenance()))

    def run_outputs(self, runs, title: str, meta: dict, extra_markdown: str = "") -> str:
        from .experiments.report import write_run_outputs

        table = write_run_outputs(self.out_dir, runs, title=title, meta=dict(meta, **self.provenance()),
                                  extra_markdown=extra_markdown)
        print(table)
        return table

    def finish(self) -> None:
        if self.out is not None and self._opened:
            if self.checkpoints is not None:
                self.checkpoints.close()
            final = self.out.finish()
            print(f"outputs -> {final} ({', '.join(sorted(p.name for p in final.iterdir()))}); "
                  f"total {time.perf_counter() - self.started:.0f} s")

    # --------------------------------------------------------------------------- after an error or Ctrl-C

    def resume_command(self) -> str:
        argv = [a for a in self.argv if a not in ("--overwrite", "--resume", "--debug")]
        return " ".join(["python -m cnl_ext", *map(shlex.quote, argv), "--resume"])

    def saved_work(self) -> str | None:
        """What an interrupted run leaves to resume from, in words (None: nothing)."""
        store = self.checkpoints
        if store is None or self.out is None or not self.out.staging.is_dir():
            return None
        if store.last_saved is not None:
            label, epoch, epochs = store.last_saved
            return f"{label} after epoch {epoch} of {epochs}"
        saved = {p.name for p in store.folder.iterdir()} if store.folder.is_dir() else set()
        if saved - {"start.pt"}:
            return "the checkpoints saved before"
        if saved:
            return "the starting weights" + (" (teaching done)" if (self.out.staging / "teach.json").is_file() else "")
        return None

    def abandon(self) -> None:
        """After a failure: drop a staging folder this command created that holds nothing to resume."""
        import shutil

        if self.out is not None and self._opened and not self.out.resuming and self.saved_work() is None:
            shutil.rmtree(self.out.staging, ignore_errors=True)


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def _device(name: str):
    from .experiments.model import check_device

    return check_device(name)


def _check_backend(name: str, device) -> None:
    """Refuse, before the load, a backend that cannot run the optimizer steps on ``device``."""
    import warnings

    from . import functional
    from .experiments.outputs import UsageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for op in ("sgd_step_", "adam_step_"):
                functional.resolve(name, device, op)
    except (RuntimeError, ValueError) as error:
        raise UsageError(f"--backend {name} on {device}: {error}; see python -m cnl_ext info, or use "
                         "--backend auto") from None


def _demo_folder_is_replaceable(ctx: Context, path: Path) -> bool:
    """The demo's default folder holding only a previous demo's outputs (and nothing else)."""
    if Path(ctx[FolderOutput].out) != DEFAULT_DEMO_OUT:
        return False
    try:
        previous = json.loads((path / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    demo_files = {"questions.jsonl", "mastered.jsonl", "injection.jsonl", "teach.json", "teach_log.json",
                  "summary.csv", "results.json", "tables.md", "curves.png", "checkpoints"}
    return previous.get("step") == "demo" and {p.name for p in path.iterdir()} <= demo_files


def cmd_info(ctx: Context) -> None:
    for line in info_lines():
        print(line)


def info_lines() -> list:
    """Versions, devices, the compiled extension and which backends run here (and why not the others)."""
    import platform
    import warnings

    import torch

    from . import __version__, functional
    from .experiments.outputs import package_versions

    versions = package_versions()
    cuda = torch.cuda.is_available()
    lines = [f"cnl_ext {__version__} ({Path(__file__).parent})",
             f"python {platform.python_version()}, torch {torch.__version__}, triton {versions['triton'] or 'not installed'}, "
             f"transformers {versions['transformers'] or 'not installed'}, CUDA "
             f"{torch.version.cuda or 'none (CPU-only torch)'}",
             "devices: cpu (" + f"{torch.get_num_threads()} threads)" + (
                 "; " + ", ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count()))
                 if cuda else "; no CUDA device")]
    lines.append(f"native CPU build folder: {_native_folder_line()}")  # before the load, which may wait for a build
    lines.append(f"compiled extension: {_native_build_line()}")
    lines.append(f"CUDA kernels (cnl_ext._C): {_cuda_extension_line()}")
    lines.append("backends (backend=...):")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if cuda else [])
    status = functional.backend_status()
    for name, reason in status.items():
        if reason:
            lines.append(f"  {name:<7} not usable: {reason}")
            continue
        module = functional.load_backend(name)
        usable = [d.type for d in devices if module.capabilities(d).runs("adam_step_")]
        refused = [d.type for d in devices if d.type not in usable]
        why_not = "; ".join(functional.why_unsupported(module, torch.device(d), "adam_step_") for d in refused)
        lines.append(f"  {name:<7} " + (f"usable on {', '.join(usable)}" if usable else "not usable here")
                     + (f" ({why_not})" if refused else ""))
    for alias, target in functional.BACKEND_ALIASES.items():
        lines.append(f"  {alias:<7} an alias of {target!r}")
    chosen = []
    for device in devices:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                chosen.append(f"{device.type} tensors -> {functional.resolve('auto', device, 'adam_step_').NAME}")
        except Exception as error:  # noqa: BLE001 - info never fails
            chosen.append(f"{device.type} tensors: {error}")
    lines.append(f"  auto    {'; '.join(chosen)}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        lines.append("TRITON_INTERPRET=1: Triton kernels run on CPU tensors through the interpreter (slow)")
    return lines


def _native_folder_line() -> str:
    """Where the native CPU kernels are built on first use, and whether a build runs there (and whose)."""
    try:
        from .ops import native_backend
    except ImportError as error:
        return f"unknown ({error})"
    return native_backend.build_folder_status()


def _native_build_line() -> str:
    """How the compiled extension was built here, or why it is not."""
    try:
        from .ops import native_backend
    except ImportError as error:
        return f"not available ({error})"
    reason = native_backend.unavailable_reason()
    if reason:
        return f"not available ({reason})"
    info = getattr(native_backend, "build_info", dict)()
    return "built (" + ", ".join(f"{key} {value}" for key, value in info.items()) + ")"


def _cuda_extension_line() -> str:
    """The CUDA release and GPU architectures cnl_ext._C was built for and whether it runs here, or why
    it is not loaded (after _native_build_line(), which loaded the libraries)."""
    try:
        from .ops import native_backend
        not_loaded = native_backend.cuda_library_reason()
    except Exception as error:  # noqa: BLE001 - info never fails
        return f"not loaded ({error})"
    if not_loaded:
        return f"not loaded ({not_loaded})"
    info = native_backend.build_info()
    usable = native_backend.cuda_device_reason()
    return (f"built for CUDA {info['cuda_runtime']}, architectures {info['cuda_arch_list']}; "
            + (f"not usable here: {usable}" if usable else "usable here"))


def cmd_prepare_data(ctx: Context) -> None:
    from .experiments.data import QuestionSource, write_jsonl

    questions = ctx[QuestionSource].load()
    write_jsonl(ctx[FileOutput].out, questions)
    print(f"{len(questions)} questions -> {ctx[FileOutput].out}")


def cmd_mmac(ctx: Context) -> None:
    from .experiments.data import MMAC_PARTS, load_benchmark, write_jsonl

    source = ctx[MmacSource]
    union = []
    for part in MMAC_PARTS:
        questions = load_benchmark(part, data_files=source.files.get(part), fraction=source.fraction, seed=source.seed)
        print(f"{part}: {len(questions)} questions")
        union += questions
    write_jsonl(ctx[FileOutput].out, union)
    print(f"MMAC: {len(union)} questions -> {ctx[FileOutput].out}")


def _write_split(ctx: Context, split, payload: dict) -> None:
    from .experiments.data import write_jsonl

    write_jsonl(ctx.out_dir / "mastered.jsonl", split.mastered)
    write_jsonl(ctx.out_dir / "injection.jsonl", split.injection)
    ctx.write_results(dict(payload, mastered=len(split.mastered), injection=len(split.injection),
                           excluded=len(split.excluded)))
    print(f"mastered {len(split.mastered)}, injection {len(split.injection)}, excluded {len(split.excluded)}")


def cmd_infer_and_split(ctx: Context) -> None:
    from .experiments.data import QuestionSource
    from .experiments.protocol import infer_and_split

    questions = ctx[QuestionSource].load()
    model, _, encoder = ctx.load_model()
    started = time.perf_counter()
    split = infer_and_split(model, encoder, questions, batch_size=ctx[_models()].eval_batch_size)
    _write_split(ctx, split, dict(step="infer-and-split", questions=len(questions),
                                  wall_s=round(time.perf_counter() - started, 1)))


def cmd_teach(ctx: Context) -> None:
    from .experiments.data import QuestionSource
    from .experiments.progress import note
    from .experiments.protocol import TeachSettings, teach_first, teach_summary

    source, settings = ctx[QuestionSource], ctx[TeachSettings]
    questions = source.load()
    model, tokenizer, encoder = ctx.load_model()
    split, log = teach_first(model, encoder, questions, fraction=settings.teach_fraction, seed=source.seed,
                             lr=settings.teach_lr, max_epochs=settings.teach_epochs, margin=settings.teach_margin,
                             trainable=settings.trainable, eval_batch_size=ctx[_models()].eval_batch_size,
                             backend=settings.backend)
    summary = teach_summary(split, log, n_taught=round(len(questions) * settings.teach_fraction),
                            margin=settings.teach_margin, max_epochs=settings.teach_epochs)
    for line in summary:
        note(line)
    _write_split(ctx, split, dict(step="teach", questions=len(questions), teach_log=log, teach_summary=summary,
                                  margin_reached=log[-1]["min_margin"] >= settings.teach_margin))
    if ctx[TeachOutput].save_model:
        # A GGUF-loaded config still names its GGUF file; the saved copy is plain safetensors.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(ctx.out_dir / "model")
        tokenizer.save_pretrained(ctx.out_dir / "model")
        print(f"taught model -> {ctx[FolderOutput].out / 'model'} (use it as --model)")


def _training(ctx: Context):
    """The split, the model and the injection config of inject / out-of-set / table1."""
    from .experiments.protocol import InjectConfig

    config = ctx[InjectConfig]
    plan = ctx.get(RunPlan)
    if plan is not None and plan.default_lr is not None:
        from dataclasses import replace

        config = replace(config, lr=plan.default_lr)
    mastered, injection = ctx[SplitFiles].load(config.seed)
    model, _, encoder = ctx.load_model()
    return config, mastered, injection, model, encoder


def cmd_inject(ctx: Context) -> None:
    from .experiments.protocol import compare

    config, mastered, injection, model, encoder = _training(ctx)
    plan = ctx[RunPlan]
    runs = compare(model, encoder, methods=plan.methods, optimizers=plan.optimizers, config=config, train=injection,
                   reference=mastered, lrs=plan.lrs, checkpoints=ctx.checkpoints)
    ctx.run_outputs(runs, f"In-set injection ({Path(ctx[SplitFiles].mastered).parent.name or 'split'})",
                    dict(step="inject", config=_jsonable_config(config)))


def cmd_out_of_set(ctx: Context) -> None:
    from .experiments.protocol import out_of_set

    config, mastered, injection, model, encoder = _training(ctx)
    plan, side = ctx[RunPlan], ctx[OutOfSetSide]
    runs, (seen, unseen) = out_of_set(model, encoder, mastered, injection, side=side.side, methods=plan.methods,
                                      optimizers=plan.optimizers, config=config, split_seed=side.split_seed,
                                      lrs=plan.lrs, checkpoints=ctx.checkpoints)
    ctx.run_outputs(runs, f"Out-of-set, {side.side} side (1:1 split)",
                    dict(step="out-of-set", config=_jsonable_config(config), side=side.side, seen_half=len(seen),
                         unseen_half=len(unseen)))


def cmd_table1(ctx: Context) -> None:
    from .experiments.analysis import table1
    from .experiments.outputs import write_json, write_text
    from .experiments.report import count_percent, markdown_table

    config, mastered, injection, model, encoder = _training(ctx)
    groups, run, rows = table1(model, encoder, mastered, injection, config=config, checkpoints=ctx.checkpoints)
    markdown = ("### Table 1: forgetting of mastered samples by gradient similarity to the injection set\n\n"
                f"FT with {run.optimizer}, {run.final.epoch} epochs; mastered samples with g_m·g_I < 0 ranked by "
                "magnitude: Sim = top third, Dissim = bottom third.\n\n"
                + markdown_table(["Group", "Samples", "FORGOT"],
                                 [[r["group"], r["size"], count_percent(r["forgot"], r["size"])] for r in rows]))
    ctx.run_outputs([run], "Table 1 run (FT)", dict(step="table1", config=_jsonable_config(config), table1=rows,
                                                      sim=groups.sim, dissim=groups.dissim, dots=groups.dots),
                    extra_markdown=markdown)
    write_text(ctx.out_dir / "table1.md", markdown)
    write_json(ctx.out_dir / "table1.json", dict(rows=rows, sim=groups.sim, dissim=groups.dissim, dots=groups.dots))
    print(markdown)


def cmd_table2(ctx: Context) -> None:
    from .experiments.analysis import gradient_agreement
    from .experiments.model import select_trainable
    from .experiments.outputs import write_text
    from .experiments.protocol import InjectConfig
    from .experiments.report import markdown_table

    config = ctx[InjectConfig]
    mastered, injection = ctx[SplitFiles].load()
    model, _, encoder = ctx.load_model()
    select_trainable(model, config.trainable)
    result = gradient_agreement(model, encoder, mastered, injection, batch_size=config.reference_batch_size,
                                backend=config.backend)
    rows = [["Collaborative (s ≥ 0)", f"{result.collaborative:,}", f"{100 * result.collaborative_share:.2f}%",
             f"{result.sum_s_collaborative:.6g}"],
            ["Conflicting (s < 0)", f"{result.conflicting:,}", f"{100 * result.conflicting_share:.2f}%",
             f"{result.sum_s_conflicting:.6g}"],
            ["All", f"{result.total:,}", "100%", f"{result.sum_s_collaborative + result.sum_s_conflicting:.6g}"]]
    markdown = ("### Table 2: collaborative vs conflicting elements (u = ∇L_I, r = ∇L_M, s = r·u)\n\n"
                + markdown_table(["", "Elements", "Share", "Sum of s"], rows, align="lrrr"))
    write_text(ctx.out_dir / "table2.md", markdown)
    ctx.write_results(dict(step="table2", mastered=len(mastered), injection=len(injection),
                           table2=result.to_dict()))
    print(markdown)


def cmd_demo(ctx: Context) -> None:
    from .experiments.demo import DemoSettings, run_demo

    model, _, encoder = ctx.load_model()
    settings = ctx[DemoSettings]
    print(run_demo(model, encoder, ctx.out_dir, settings, checkpoints=ctx.checkpoints, provenance=ctx.provenance))


def _jsonable_config(config) -> dict:
    from dataclasses import asdict

    return {k: _jsonable(v) for k, v in asdict(config).items()}


def cmd_continual(ctx: Context) -> None:
    from .experiments import continual
    from .experiments.progress import quiet_library_bars

    config = ctx[continual.ContinualConfig]
    quiet_library_bars()
    continual.run(config)
    print(f"results in {config.out_dir} (tables.md, summary.csv, matrices.csv, results.json, heat maps, "
          f"comparison chart)")


def _subcommands() -> list:
    from .experiments.continual import ContinualConfig
    from .experiments.data import QuestionSource
    from .experiments.demo import DemoSettings
    from .experiments.model import ModelOptions
    from .experiments.protocol import InjectConfig, TeachSettings

    split_and_model = (SplitFiles, ModelOptions)
    no_lora_or_reference = ("optimizer", "lr", "reference_every", "reference_dtype", "lora_r", "lora_alpha")
    return [
        Subcommand("demo", cmd_demo, "FT vs CNL (AdamW) on generated questions and the embedded SmolLM2 "
                   "(about 3 minutes on 2 CPU cores; writes under 1 MB, or about 2.5 GB more with --checkpoints)",
                   "python -m cnl_ext demo        # writes runs/demo; --epochs 1 --questions 16 for a quick look",
                   (ModelOptions, DemoSettings), checkpoints=True, out_default=DEFAULT_DEMO_OUT,
                   resume_defaults=dict(checkpoints=False),  # a 3-minute run: a checkpoint costs more than a rerun
                   replaceable=_demo_folder_is_replaceable),
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
                   "taught model",
                   "python -m cnl_ext teach --data data/arc_c.jsonl --limit 400 --teach-lr 2e-4 --out runs/taught",
                   (QuestionSource, ModelOptions, TeachSettings, TeachOutput)),
        Subcommand("inject", cmd_inject, "in-set runs: FT / CNL / replay / LoRA for each optimizer, from one "
                   "starting model",
                   "python -m cnl_ext inject --model runs/taught/model --mastered runs/taught/mastered.jsonl "
                   "--injection runs/taught/injection.jsonl --optimizers sgd adamw --lr sgd=1e-3 adamw=1e-4 "
                   "--out runs/in_set",
                   (*split_and_model, RunPlan, (InjectConfig, dict(skip=("optimizer", "lr"))), ), checkpoints=True),
        Subcommand("out-of-set", cmd_out_of_set, "out-of-set runs: one side of the split cut 1:1, one half "
                   "trained or referenced, the other counted",
                   "python -m cnl_ext out-of-set --mastered runs/split/mastered.jsonl --injection "
                   "runs/split/injection.jsonl --side mastered --out runs/oos",
                   (*split_and_model, OutOfSetSide, (RunPlan, dict(defaults=dict(methods=("ft", "cnl", "replay")))),
                    (InjectConfig, dict(skip=("optimizer", "lr")))), checkpoints=True),
        Subcommand("table1", cmd_table1, "Table 1: forgetting of Sim / Dissim mastered questions under FT",
                   "python -m cnl_ext table1 --mastered runs/split/mastered.jsonl --injection "
                   "runs/split/injection.jsonl --epochs 5 --out runs/table1",
                   (*split_and_model, (InjectConfig, dict(skip=no_lora_or_reference[2:]))), checkpoints=True),
        Subcommand("table2", cmd_table2, "Table 2: shares of collaborative / conflicting elements and sums of s "
                   "(fused kernels)",
                   "python -m cnl_ext table2 --mastered runs/split/mastered.jsonl --injection "
                   "runs/split/injection.jsonl --out runs/table2",
                   (*split_and_model, (InjectConfig, dict(only=("trainable", "reference_batch_size", "backend"))))),
        Subcommand("continual", cmd_continual, "a sequence of knowledge-injection tasks with every method (ft, "
                   "replay, lora, cnl, kif, kif-lora, recurrent-kif): accuracy matrices, AP, BWT, FWT",
                   "python -m cnl_ext continual --task arc=a.jsonl --task csqa=c.jsonl --out runs/continual",
                   (ContinualConfig,), output=None),
        Subcommand("info", cmd_info, "versions, devices, the compiled extension and the usable backends (paste it "
                   "into a bug report)", "python -m cnl_ext info", output=None),
    ]


SUBCOMMANDS: list = []  # filled on first use by build_parser (importing the dataclasses imports torch)


def _option_classes(command: Subcommand) -> list:
    classes = [spec[0] if isinstance(spec, tuple) else spec for spec in command.options]
    if command.output == "folder":
        classes.append(FolderOutput)
    elif command.output == "file":
        classes.append(FileOutput)
    if command.checkpoints:
        classes.append(ResumeOptions)
    return classes


# ---------------------------------------------------------------------------------- parser

class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=32)


class _Parser(argparse.ArgumentParser):
    """argparse with one ``error: ...`` line (exit status 2) that says where the help is."""

    def error(self, message):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    if not SUBCOMMANDS:
        SUBCOMMANDS.extend(_subcommands())
    description, details = __doc__.split("\n\n", 1)
    parser = _Parser(
        prog="python -m cnl_ext", description=description.split(":", 1)[1].strip(), formatter_class=_HelpFormatter,
        epilog="python -m cnl_ext SUBCOMMAND --help shows its options and an example.\n"
               f"On an error, --debug (or {DEBUG_ENV}=1) shows the traceback.")
    from . import __version__

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


# ---------------------------------------------------------------------------------- main

def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]  # paths welcome
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    ctx = None
    previous_handler = signal.signal(signal.SIGTERM, _interrupt)  # a job scheduler's stop: like Ctrl-C
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        command = args._subcommand
        if extra:
            args._parser.error(f"{command.name} does not take {' '.join(extra)}")
        ctx = Context(command, args._parser, args, argv)
        ctx.check()
        command.run(ctx)
        ctx.finish()
    except KeyboardInterrupt:
        saved = ctx.saved_work() if ctx is not None else None
        if sys.stderr.isatty():
            print(file=sys.stderr)  # after the ^C the terminal echoed
        if saved:
            print(f"interrupted: saved {saved} in {ctx.out.staging}; continue with: {ctx.resume_command()}",
                  file=sys.stderr)
        else:
            if ctx is not None:
                ctx.abandon()
            print("interrupted: nothing was saved", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, ImportError) as error:  # anything else is a bug: its traceback
        from .experiments.data import DataError
        from .experiments.outputs import UsageError

        if debug:
            traceback.print_exc()
        message = _one_line(error)
        if ctx is not None:
            saved = ctx.saved_work()
            if saved:
                message += f" (saved {saved}: after a fix, continue with: {ctx.resume_command()})"
            else:
                ctx.abandon()
        if not debug and not isinstance(error, (UsageError, DataError)):
            message += " [--debug shows the traceback]"
        print(f"error: {message}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
