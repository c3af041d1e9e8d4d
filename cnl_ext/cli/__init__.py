"""python -m cnl_ext SUBCOMMAND (or cnl-ext): the CNL paper's experiments from the command line.

Modules: :mod:`.settings` (the commands' own settings dataclasses), :mod:`.context` (a command's run
lifecycle), :mod:`.commands` (the experiment commands), :mod:`.info` (diagnostics), :mod:`.parser`
(the subcommands' table and the parser); :func:`main` here.

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

import os
import signal
import sys
import traceback
from pathlib import Path

from ..experiments.data import DataError
from ..experiments.outputs import UsageError
from .context import Context, Subcommand
from .parser import DEBUG_ENV, SUBCOMMANDS, build_parser

__all__ = ["main", "build_parser", "Subcommand", "SUBCOMMANDS", "Context"]


# ---------------------------------------------------------------------------------- main

def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _deepspeed_ranks(args) -> None:
    """``--deepspeed`` (inject): no checkpoints; ranks other than 0 write their copy of the outputs into a
    temporary folder instead of --out (rank 0 writes --out)."""
    if getattr(args, "deepspeed", None) is None:
        return
    if getattr(args, "resume", False):
        raise UsageError("--deepspeed runs keep no checkpoints: --resume is not supported with it")
    args.checkpoints = False
    from ..experiments.deepspeed_runs import is_secondary_rank

    if is_secondary_rank():
        import atexit
        import shutil
        import tempfile

        scratch = tempfile.mkdtemp(prefix="cnl_ext_rank_")
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        args.out, args.overwrite = Path(scratch) / "out", False


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
        _deepspeed_ranks(args)
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
