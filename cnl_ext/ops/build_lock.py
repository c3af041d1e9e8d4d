"""The lock around a first-use build of the native CPU kernels: one builder per build folder.

An ``fcntl.flock`` on ``build.lock`` in the build folder, so the operating system releases it when
its holder ends, however it ends (SIGTERM, SIGKILL, a crash): it cannot go stale. The holder writes
its PID, host and start time into the file, for the line a waiter prints, and empties it when it is
done; a holder that finds the file not empty knows that the previous one ended inside its build, and
says so. A waiter waits at most ``CNL_EXT_BUILD_TIMEOUT`` seconds. Imports nothing but the standard
library (and ``fcntl``: POSIX only, as the JIT build is).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time

ENV_TIMEOUT = "CNL_EXT_BUILD_TIMEOUT"
DEFAULT_TIMEOUT_S = 900.0  # a few times a build on a loaded 2-core machine (15-60 s per variant)
LOCK_FILE = "build.lock"
_POLL_S = 0.25


class BuildLockTimeout(RuntimeError):
    """Another process held the build lock for longer than ``CNL_EXT_BUILD_TIMEOUT``."""


def timeout_s() -> float:
    """How long to wait for another process's build: ``CNL_EXT_BUILD_TIMEOUT`` seconds (default 900)."""
    value = os.environ.get(ENV_TIMEOUT, "").strip()
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"{ENV_TIMEOUT}={value!r}: expected a number of seconds >= 0")
    return seconds


def _read(fd: int) -> dict:
    """The holder written in the lock file, ``{}`` if none (or not yet written)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def describe(holder: dict) -> str:
    """``PID 123 on host h, since 21:14:07 (35 s ago)``."""
    if not holder:
        return "another process"
    started = holder.get("started", 0.0)
    return (f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))} ({time.time() - started:.0f} s ago)")


def status(folder: str) -> str:
    """Who holds the lock of ``folder`` now (for ``python -m cnl_ext info``); takes and drops it if free."""
    path = os.path.join(folder, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return "no build has run here"
    except OSError as exc:
        return f"unknown ({exc})"
    try:
        holder = _read(fd)
        if not _try_lock(fd):
            return f"a build is running: {describe(holder)}"
        return (f"free (the build that {describe(holder)} started ended before it finished; the next one takes over)"
                if holder else "free")
    finally:
        os.close(fd)  # drops the lock if taken


def _try_lock(fd: int) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _wait(fd: int, what: str, timeout: float) -> None:
    """Wait for the lock (held by another process) at most ``timeout`` seconds, one line saying for whom."""
    start = time.monotonic()
    announced = False
    while not _try_lock(fd):
        holder = _read(fd)
        waited = time.monotonic() - start
        if not announced and (holder or waited > 1.0):  # a new holder writes its name at once
            print(f"cnl_ext: waiting for {what} by {describe(holder)} (at most {timeout:g} s, {ENV_TIMEOUT})",
                  file=sys.stderr, flush=True)
            announced = True
        if waited >= timeout:
            raise BuildLockTimeout(
                f"waited {timeout:g} s for {what} by {describe(holder)}: let it finish and run again, end that "
                f"process if it hangs (its lock goes with it), or wait longer with {ENV_TIMEOUT}=SECONDS")
        time.sleep(_POLL_S)


@contextlib.contextmanager
def hold(folder: str, what: str):
    """Hold the build lock of ``folder`` (existing) for the block, waiting for another holder at most
    :func:`timeout_s`; ``what`` (e.g. ``the build of ... in FOLDER``) names the build in the lines printed."""
    timeout = timeout_s()
    fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _try_lock(fd):
            _wait(fd, what, timeout)
        previous = _read(fd)
        if previous:
            print(f"cnl_ext: taking over {what}: the build that {describe(previous)} started ended before it finished",
                  file=sys.stderr, flush=True)
        me = dict(pid=os.getpid(), host=socket.gethostname(), started=time.time())
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # done (built or failed): nothing to take over
    finally:
        os.close(fd)  # releases the lock
