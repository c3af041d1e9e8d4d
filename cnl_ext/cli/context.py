"""A command's run lifecycle: its settings built and checked, its output folder staged and swapped in,
resume, provenance, and what an interruption leaves (see :mod:`cnl_ext.cli`)."""
from __future__ import annotations

import json
import shlex
import shutil
import time
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from .. import functional
from ..experiments.checkpoints import RunCheckpoints
from ..experiments.model import MCQEncoder, ModelOptions, check_device, load_model, weight_files
from ..experiments.options import build, declared_names, flag_of
from ..experiments.outputs import OutputFolder, UsageError, check_output_file, sha256_file, write_json
from ..experiments.outputs import provenance as run_provenance
from ..experiments.progress import quiet_library_bars
from ..experiments.report import write_run_outputs
from .settings import FileOutput, FolderOutput, ResumeOptions

__all__ = ["Subcommand", "Context", "option_classes", "jsonable", "jsonable_config"]

@dataclass
class Subcommand:
    """A subcommand: ``run(ctx)`` and the settings dataclasses its options fill.

    ``options``: dataclasses, or ``(dataclass, dict(only=..., skip=..., defaults=...))`` pairs
    (see :func:`~cnl_ext.experiments.options.add_options`); ``ctx[Dataclass]`` is the instance.
    ``output``: ``"folder"`` (``--out`` folder, staged and swapped in), ``"file"`` or None.
    ``checkpoints``: adds ``--resume`` / ``--keep-checkpoints``; ``ctx.checkpoints`` is the store.
    ``saved_runs(folder, finished)``: what a command that keeps its own finished runs (``continual``)
    left in its staging folder beyond those of the ``finished`` folder it continues (None), in words
    (None: nothing); such a command may also continue a finished ``--out``.
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
    saved_runs: Callable | None = None


class Context:
    """What a running subcommand uses: its settings, its output folder, the model loader."""

    def __init__(self, command: Subcommand, parser, args, argv):
        self.command, self.argv, self.args = command, list(argv), args
        self.configs, self.declared = {}, {}
        for cls in option_classes(command):
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
        """Everything checkable before the model loads (the dataclasses checked themselves when built):
        the output location first, then the model, the device and the backend; then the staging folder opens."""
        resume = self.get(ResumeOptions, ResumeOptions())
        if self.command.output == "file":
            output = self[FileOutput]
            check_output_file(output.out, overwrite=output.overwrite)
        elif self.command.output == "folder":
            output = self[FolderOutput]
            if output.overwrite and resume.resume:
                raise UsageError("--overwrite starts again and --resume continues: give one of the two")
            if not resume.checkpoints and (resume.resume or resume.keep_checkpoints):
                raise UsageError("--resume and --keep-checkpoints need checkpoints: "
                                 + ("add --checkpoints (this command saves none by default)"
                                    if self.command.resume_defaults.get("checkpoints") is False
                                    else "drop --no-checkpoints"))
            replaceable = self.command.replaceable
            self.out = OutputFolder(output.out, overwrite=output.overwrite, resume=resume.resume,
                                    continuable=self.command.saved_runs is not None,
                                    replaceable=(lambda path: replaceable(self, path)) if replaceable else None)
            self.out.check(self.options_record(), defaults=self.options_record(defaults=True))
        models = self.get(ModelOptions)
        if models is not None:
            models.check()
            device = check_device(models.device)
            for config in self.configs.values():
                if hasattr(config, "backend"):
                    _check_backend(config.backend, device)
        if self.out is not None:
            self.out.open(self.options_record())  # a failure before anything is saved removes it again (abandon)
            self._opened = True
            if self.command.checkpoints and resume.checkpoints:
                self.checkpoints = RunCheckpoints(self.out.staging / "checkpoints", keep=resume.keep_checkpoints)
            if resume.resume and not self.out.resuming:
                print(f"--resume: no interrupted run of {self[FolderOutput].out}; starting from the beginning")

    # --------------------------------------------------------------------------- the work

    @property
    def out_dir(self) -> Path:
        """The folder to write into (the staging folder, moved to --out when the command has finished)."""
        return self.out.path

    def load_model(self):
        """``(model, tokenizer, encoder)`` from the model options; records the weights' sha256."""
        quiet_library_bars()
        options = self[ModelOptions]
        if options.threads:
            torch.set_num_threads(options.threads)
        started = time.perf_counter()
        model, tokenizer = load_model(options.model, gguf_file=options.gguf_file, dtype=options.dtype,
                                      device=options.device)
        self.weights_sha256 = {path.name: sha256_file(path) for path in weight_files(options.model, options.gguf_file)}
        print(f"loaded {options.model} in {time.perf_counter() - started:.1f} s "
              f"({sum(p.numel() for p in model.parameters()):,} parameters, {options.dtype}, {model.device})")
        return model, tokenizer, MCQEncoder(tokenizer, use_chat_template=options.chat_template)

    def options_record(self, defaults: bool = False) -> dict:
        """Every option as given (by flag), except those that do not change the results; ``defaults``:
        each of those options' default instead."""
        ignored = {"resume", "keep_checkpoints", "checkpoints", "overwrite", "threads"}
        record = {}
        for cls, config in self.configs.items():
            for f in fields(cls):
                if f.name in ignored or f.name not in self.declared[cls]:
                    continue
                if not defaults:
                    record[flag_of(f)] = jsonable(getattr(config, f.name))
                elif f.default is not MISSING or f.default_factory is not MISSING:
                    record[flag_of(f)] = jsonable(f.default if f.default is not MISSING else f.default_factory())
        return json.loads(json.dumps(record))

    def provenance(self) -> dict:
        seeds = {flag: value for flag, value in self.options_record().items() if flag.endswith("seed")}
        return run_provenance(self.argv, seeds=seeds, weights=self.weights_sha256)

    def write_results(self, payload: dict, name: str = "results.json") -> None:
        write_json(self.out_dir / name, dict(payload, **self.provenance()))

    def run_outputs(self, runs, title: str, meta: dict, extra_markdown: str = "") -> str:
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
        if self.out is None or not self.out.staging.is_dir():
            return None
        if self.command.saved_runs is not None:  # beyond those of the finished folder it continues
            return self.command.saved_runs(self.out.staging, self.out.final if self.out.reopening else None)
        if store is None:
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
        if (self.out is not None and self._opened and (self.out.reopening or not self.out.resuming)
                and self.saved_work() is None):
            shutil.rmtree(self.out.staging, ignore_errors=True)


def jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    return value


def _check_backend(name: str, device) -> None:
    """Refuse, before the load, a backend that cannot run the optimizer steps on ``device``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for op in ("sgd_step_", "adam_step_"):
                functional.resolve(name, device, op)
    except (RuntimeError, ValueError) as error:
        raise UsageError(f"--backend {name} on {device}: {error}; see python -m cnl_ext info, or use "
                         "--backend auto") from None


def option_classes(command: Subcommand) -> list:
    classes = [spec[0] if isinstance(spec, tuple) else spec for spec in command.options]
    if command.output == "folder":
        classes.append(FolderOutput)
    elif command.output == "file":
        classes.append(FileOutput)
    if command.checkpoints:
        classes.append(ResumeOptions)
    return classes




def jsonable_config(config) -> dict:
    return {k: jsonable(v) for k, v in asdict(config).items()}
