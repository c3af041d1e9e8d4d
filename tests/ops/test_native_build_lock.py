"""The first-use build of the native CPU kernels (:mod:`cnl_ext.ops.native_backend`, its lock in
:mod:`cnl_ext.ops.build_lock`), in subprocesses on temporary extension caches: a build ended by
SIGTERM or SIGKILL blocks no later process, two processes starting at once build once, two checkouts
of the same sources share one build, and a waiter gives up after ``CNL_EXT_BUILD_TIMEOUT``.

Two tests compile (15-60 s each on a loaded machine); they run on the xdist worker of the other heavy
subprocess jobs. No test here kills a process of its own except where the lock is what it tests.
"""
import glob
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cnl_ext.ops import build_lock, native_backend, native_build

ROOT = Path(__file__).resolve().parents[2]
BUILD_S = 900  # bound on one build in these tests (15-60 s measured on a loaded 2-core machine)
COMPILING = "cnl_ext: compiling the native CPU kernels"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec(native_build.prebuilt_module(native_backend.cpu_capability())) is not None,
    reason="a prebuilt CPU library is installed: nothing is compiled on first use")

def builds(test):
    """A test that compiles: slow, and on the xdist worker of the suite's other heavy jobs (torchrun)."""
    return pytest.mark.slow(pytest.mark.xdist_group("torchrun")(pytest.mark.usefixtures("native_built")(test)))


STEP = r"""
import cnl_ext, torch
from cnl_ext.ops import native_backend
p = torch.nn.Parameter(torch.ones(4)); p.grad = torch.ones(4)
cnl_ext.FusedCNLAdamW([p], lr=0.1, backend="native").step()
print("STEPPED", cnl_ext.__file__, native_backend.build_info()["cpu_library"], p.detach().tolist())
"""

AUTO_STEP = r"""
import json, warnings, cnl_ext, torch
p = torch.nn.Parameter(torch.ones(4)); p.grad = torch.ones(4)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):
        cnl_ext.FusedCNLAdamW([p], lr=0.1).step()  # backend="auto"
print("STEPPED", p.detach().tolist())
print("WARNINGS", json.dumps([str(w.message) for w in caught if "native" in str(w.message)]))
"""


def _env(cache, cwd, **extra):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(cache), PYTHONPATH=str(cwd))
    env[native_backend.ENV_REQUIRE] = "0"
    env.pop(build_lock.ENV_TIMEOUT, None)
    env.update(extra)
    return env


def _run(code, cache, cwd=ROOT, timeout=300, **env):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=_env(cache, cwd, **env), capture_output=True,
                          text=True, timeout=timeout)


def _start(code, cache, log_path, cwd=ROOT):
    """A process in a session of its own (its compilers in its process group), output to ``log_path``."""
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=_env(cache, cwd), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _end_group(process) -> None:
    """End what is left of a process group this test started (a killed build's compilers)."""
    if process.poll() is None:
        process.kill()
        process.wait()
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _folder(cache, monkeypatch) -> Path:
    """The build folder of this CPU's variant in extension cache ``cache``."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(cache))
    return Path(native_backend._build_plan(native_backend.cpu_capability())[3])


def _library(folder: Path) -> Path:
    return folder / f"{native_build.jit_module(native_backend.cpu_capability())}.so"


def _require_compiler():
    reason = native_backend.unavailable_reason()
    if reason:
        pytest.skip(f"native backend unavailable: {reason}")


def _compiling(folder: Path, before: set) -> bool:
    """A build (torch's build.ninja written, ninja started) in a work folder that is not in ``before``."""
    return any(os.path.exists(os.path.join(d, "build.ninja")) for d in glob.glob(str(folder / "build-*"))
               if d not in before)


def _wait_for(condition, process, what: str) -> None:
    deadline = time.monotonic() + BUILD_S
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the process ended (status {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {BUILD_S} s")
        time.sleep(0.1)


def _lines(text: str, start: str) -> list:
    return [line for line in text.splitlines() if line.startswith(start)]


@builds
def test_a_build_ended_by_sigterm_or_sigkill_blocks_no_later_process(tmp_path, monkeypatch):
    """A build ended by SIGTERM to its process group (timeout(1), a closed terminal, a cancelled CI job),
    then one ended by SIGKILL to the Python process only (subprocess.run's timeout: its compilers live
    on): each next process takes the build over with one line naming the ended one, and the last builds,
    loads and steps. One build for both signals."""
    _require_compiler()
    cache = tmp_path / "cache"
    folder = _folder(cache, monkeypatch)
    ended, logs = [], []
    try:
        for signum, whole_group in ((signal.SIGTERM, True), (signal.SIGKILL, False)):
            before = set(glob.glob(str(folder / "build-*")))
            logs.append(tmp_path / f"{signal.Signals(signum).name}.log")
            process = _start(STEP, cache, logs[-1])
            ended.append(process)
            _wait_for(lambda: _compiling(folder, before), process, "build in the build folder")
            time.sleep(2)  # the compilers running
            if whole_group:
                os.killpg(process.pid, signum)
            else:
                process.send_signal(signum)
            assert process.wait(timeout=60) == -signum
            # what stays is the name of a build that ended, in a file no process holds
            assert json.loads((folder / build_lock.LOCK_FILE).read_text())["pid"] == process.pid
        last = _run(STEP, cache, timeout=BUILD_S)
    finally:
        for process in ended:
            _end_group(process)
    assert last.returncode == 0, last.stderr[-3000:]
    assert _lines(last.stdout, "STEPPED")
    after_sigkill = logs[1].read_text()
    for output, ended_by in ((after_sigkill, ended[0]), (last.stderr, ended[1])):
        taking_over = _lines(output, "cnl_ext: taking over the build of the native CPU kernels")
        assert len(taking_over) == 1, output[-3000:]
        assert f"PID {ended_by.pid} on host {socket.gethostname()}, since" in taking_over[0]
        assert "ended before it finished" in taking_over[0]
    assert " done in " in _lines(last.stderr, COMPILING)[0]
    assert not glob.glob(str(folder / "build-*")), "a work folder of an ended build is left"
    assert build_lock.status(str(folder)) == "free"


def _checkout(root: Path) -> Path:
    """A copy of the package and its C++ sources, as a second clone or an installed copy is."""
    shutil.copytree(ROOT / "cnl_ext", root / "cnl_ext", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copytree(ROOT / "csrc", root / "csrc")
    return root


_FOLDER = "from cnl_ext.ops import native_backend as n; print(n._build_plan(n.cpu_capability())[3])"


@builds
def test_two_checkouts_started_at_once_build_once_and_never_again(tmp_path, monkeypatch):
    """Two checkouts of the same sources, one process each, started at once: one builds, the other
    waits with one line naming it, both load the one library; then, alternating, neither compiles nor
    touches it. A changed source has a build folder of its own."""
    _require_compiler()
    cache = tmp_path / "cache"
    folder = _folder(cache, monkeypatch)
    checkouts = [_checkout(tmp_path / name) for name in ("clone", "copy")]
    logs = [tmp_path / f"{checkout.name}.log" for checkout in checkouts]
    processes = []
    try:
        for checkout, log in zip(checkouts, logs):
            processes.append(_start(STEP, cache, log, cwd=checkout))
        statuses = [process.wait(timeout=BUILD_S) for process in processes]
    finally:
        for process in processes:
            _end_group(process)
    outputs = [log.read_text() for log in logs]
    assert statuses == [0, 0], outputs
    library = _library(folder)
    for checkout, output in zip(checkouts, outputs):
        stepped = _lines(output, "STEPPED")[0].split()
        assert stepped[1:3] == [str(checkout / "cnl_ext" / "__init__.py"), str(library)]
    assert sorted(len(_lines(output, COMPILING)) for output in outputs) == [0, 1]
    builder = 0 if _lines(outputs[0], COMPILING) else 1
    waiting = _lines(outputs[1 - builder], "cnl_ext: waiting for the build of the native CPU kernels")
    assert len(waiting) == 1 and f"PID {processes[builder].pid} on host" in waiting[0]
    built = library.stat()
    for checkout in checkouts + checkouts:
        again = _run(STEP, cache, cwd=checkout)
        assert again.returncode == 0 and _lines(again.stdout, "STEPPED"), again.stderr[-3000:]
        assert "cnl_ext:" not in again.stderr  # neither compiles nor waits
    assert (library.stat().st_mtime_ns, library.stat().st_ino) == (built.st_mtime_ns, built.st_ino)
    assert (folder / "src" / "cpu" / "cnl_cpu_ops.cpp").read_bytes() == (ROOT / "csrc/cpu/cnl_cpu_ops.cpp").read_bytes()

    changed = _checkout(tmp_path / "changed")
    with open(changed / "csrc" / "cnl_types.h", "a") as header:
        header.write("// changed\n")
    folders = [_run(_FOLDER, cache, cwd=checkout).stdout.strip() for checkout in (checkouts[1], changed)]
    assert folders[0] == str(folder) and folders[1] != str(folder) and folders[1]


def test_a_waiter_past_the_bound_fails_with_what_to_do(tmp_path, monkeypatch):
    """A build lock held longer than CNL_EXT_BUILD_TIMEOUT (here by this test): the waiter prints one
    line naming the holder, then fails as a failed build does (backend="auto": the PyTorch backend with
    one warning; CNL_EXT_REQUIRE_NATIVE=1: the error), saying what to do; `info` names the holder."""
    cache = tmp_path / "cache"
    folder = _folder(cache, monkeypatch)
    folder.mkdir(parents=True)
    env = {build_lock.ENV_TIMEOUT: "1"}
    with build_lock.hold(str(folder), "the test's build"):
        auto = _run(AUTO_STEP, cache, **env)
        required = _run(STEP, cache, **env, **{native_backend.ENV_REQUIRE: "1"})
        bad = _run(AUTO_STEP, cache, **{build_lock.ENV_TIMEOUT: "soon"})
        info = subprocess.run([sys.executable, "-m", "cnl_ext", "info"], cwd=ROOT, capture_output=True, text=True,
                              env=_env(cache, ROOT, **{build_lock.ENV_TIMEOUT: "0"}), timeout=300)
    holder = f"PID {os.getpid()} on host {socket.gethostname()}, since "

    assert auto.returncode == 0, auto.stderr[-3000:]
    waiting = _lines(auto.stderr, "cnl_ext: waiting for the build of the native CPU kernels")
    assert len(waiting) == 1 and holder in waiting[0] and f"in {folder} by " in waiting[0]
    assert "(at most 1 s, CNL_EXT_BUILD_TIMEOUT)" in waiting[0]
    assert _lines(auto.stdout, "STEPPED [0.")  # the PyTorch backend stepped
    warnings = json.loads(_lines(auto.stdout, "WARNINGS ")[0][len("WARNINGS "):])
    assert len(warnings) == 1, warnings
    assert "waited 1 s for the build of the native CPU kernels" in warnings[0] and holder in warnings[0]
    assert "end that process if it hangs" in warnings[0] and "CNL_EXT_BUILD_TIMEOUT=SECONDS" in warnings[0]

    assert required.returncode != 0 and not _lines(required.stdout, "STEPPED")
    assert "NativeBackendRequiredError" in required.stderr and "waited 1 s for the build" in required.stderr

    assert bad.returncode == 0, bad.stderr[-3000:]
    assert "CNL_EXT_BUILD_TIMEOUT='soon': expected a number of seconds >= 0" in bad.stdout

    assert info.returncode == 0, info.stderr[-3000:]
    assert f"native CPU build folder: {folder} (" in info.stdout
    assert f"build lock: a build is running: {holder}" in info.stdout
    assert "compiled extension: not available (" in info.stdout and "waited 0 s" in info.stdout

    assert build_lock.status(str(folder)) == "free" and not _library(folder).exists()  # nothing was built
