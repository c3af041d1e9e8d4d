"""Where the experiments write: every file atomically, every command's folder swapped in whole.

- :func:`atomic_write` is the one way a file is written (a temporary name in the same folder, then
  ``os.replace``): a reader never sees half a file, an interrupt never leaves one.
- :class:`OutputFolder` gives a command a staging folder next to ``--out`` (``.NAME.partial``) and
  moves it into place only when the command has finished, replacing a previous result as a whole:
  a folder never mixes two runs. An interrupted command leaves the staging folder with its
  checkpoints, which ``--resume`` continues.
- :func:`provenance` is what ``results.json`` records about how it was made.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shlex
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

__all__ = ["UsageError", "atomic_write", "write_text", "write_json", "OutputFolder", "check_output_file",
           "provenance", "package_versions", "sha256_file"]

STAGING_SUFFIX = ".partial"
COMMAND_FILE = "command.json"  # in the staging folder: the options it was started with (checked on --resume)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


class UsageError(ValueError):
    """A problem with what the user asked for, found before any work: the message names the fix."""


@contextlib.contextmanager
def atomic_write(path, mode: str = "w", **open_kwargs):
    """Open a temporary file beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes it private; the result gets a usual file's mode
        with os.fdopen(handle, mode, **open_kwargs) as out:
            yield out
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_text(path, text: str) -> None:
    with atomic_write(path) as out:
        out.write(text)


def write_json(path, payload) -> None:
    write_text(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------- provenance

def sha256_file(path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        while block := data.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict:
    """Versions of what decides the numbers (``None``: not installed)."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("cnl_ext", "torch", "triton", "transformers", "tokenizers", "numpy", "peft", "gguf"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["torch"] = torch.__version__
    versions["cuda"] = torch.version.cuda
    versions["torch_threads"] = torch.get_num_threads()
    return versions


def provenance(argv, *, seeds: dict, weights: dict) -> dict:
    """What ``results.json`` records about how it was made."""
    return dict(command=" ".join(["python -m cnl_ext", *map(shlex.quote, argv)]), argv=list(argv),
                versions=package_versions(), seeds=seeds, weights_sha256=weights,
                finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


# ---------------------------------------------------------------------------------- output locations

def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _check_writable_parent(path: Path, flag: str) -> None:
    ancestor = _nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise UsageError(f"{flag} {path}: {ancestor} is a file, not a folder; choose another {flag}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot write in {ancestor} (permission denied); choose another {flag}")


def check_output_file(path: Path, *, overwrite: bool, flag: str = "--out") -> None:
    """A single output file (``prepare-data``, ``mmac``): refused if it exists, unless ``overwrite``."""
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name such as {path / 'questions.jsonl'}")
    if path.exists() and not overwrite:
        raise UsageError(f"{flag} {path} exists; pass --overwrite to replace it, or choose another {flag}")
    _check_writable_parent(path, flag)


class OutputFolder:
    """A command's output folder, written through a staging folder (see the module doc).

    ``replaceable(path)``: whether a non-empty ``final`` folder may be replaced without
    ``--overwrite`` (the demo's default folder holding a previous demo). ``continuable``: ``--resume``
    may also continue a finished ``final`` folder (``continual`` adds runs to it): its copy is staged.
    """

    def __init__(self, final, *, overwrite: bool = False, resume: bool = False, replaceable=None,
                 continuable: bool = False, flag: str = "--out"):
        self.final = Path(final)
        self.staging = self.final.parent / f".{self.final.name}{STAGING_SUFFIX}"
        self.overwrite, self.resume, self.continuable, self.flag = overwrite, resume, continuable, flag
        self.replaceable = replaceable or (lambda path: False)
        self.resuming = False  # set by check(): a staging folder of an interrupted run is continued
        self.reopening = False  # set by check(): a finished folder is continued (copied to the staging folder)

    @property
    def path(self) -> Path:
        """Where the command writes until :meth:`finish`."""
        return self.staging

    def check(self, options: dict, defaults: dict | None = None) -> None:
        """Refuse what cannot or must not be written, before any work (raises :class:`UsageError`).

        ``options``: what the command was given, by option; resuming, it must equal what the
        interrupted run was started with.
        """
        final, flag = self.final, self.flag
        if final.exists() and not final.is_dir():
            raise UsageError(f"{flag} {final} is a file; give a folder (it will hold several files)")
        _check_writable_parent(final, flag)
        interrupted = self.staging.is_dir()
        finished = final.is_dir() and any(final.iterdir())
        if self.resume:
            if not interrupted and finished and self.continuable:
                self.resuming = self.reopening = True
                return
            if not interrupted and finished:
                raise UsageError(f"{flag} {final} holds a finished run, with nothing to resume; pass --overwrite "
                                 f"to run again, or choose another {flag}")
            self.resuming = interrupted
            if interrupted:
                self._check_same_options(options, defaults or {})
            return
        if interrupted and not self.overwrite:
            raise UsageError(f"{flag} {final}: an interrupted run is saved in {self.staging}; pass --resume to "
                             f"continue it or --overwrite to start again")
        if finished and not self.overwrite and not self.replaceable(final):
            also = "--resume to continue its runs, " if self.continuable else ""
            raise UsageError(f"{flag} {final} is not empty; pass {also}--overwrite to replace it, or choose another "
                             f"{flag}")

    def _check_same_options(self, options: dict, defaults: dict) -> None:
        try:
            saved = json.loads((self.staging / COMMAND_FILE).read_text(encoding="utf-8"))["options"]
        except (OSError, ValueError, KeyError):
            raise UsageError(f"--resume: {self.staging} does not say what it was started with; pass --overwrite to "
                             "start again") from None
        # an option added since the run started and left at its default is what that run did
        then = {k: defaults[k] for k in options if k not in saved and k in defaults} | saved
        changed = sorted(k for k in set(then) | set(options) if then.get(k) != options.get(k))
        if changed:
            details = ", ".join(f"{k} {saved.get(k)!r} then, {options.get(k)!r} now" for k in changed)
            raise UsageError(f"--resume: {self.staging} was started with other options ({details}); rerun the "
                             "original command with --resume, or pass --overwrite to start again")

    def open(self, options: dict) -> None:
        """Create the staging folder recording ``options`` (resuming: keep it as it is)."""
        if self.reopening:
            shutil.copytree(self.final, self.staging)
            write_json(self.staging / COMMAND_FILE, dict(options=options))
        if self.resuming:
            return
        if self.staging.exists():  # an interrupted run replaced by --overwrite
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True)
        write_json(self.staging / COMMAND_FILE, dict(options=options))

    def finish(self) -> Path:
        """Move the staging folder into place, replacing what was there as a whole."""
        (self.staging / COMMAND_FILE).unlink(missing_ok=True)
        previous = None
        if self.final.exists():
            previous = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
            os.replace(self.final, previous)
        os.replace(self.staging, self.final)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        return self.final

