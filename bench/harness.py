"""Device plumbing shared by the benchmarks: timing, copy bandwidth, peak memory, environment."""
from __future__ import annotations

import functools
import gc
import importlib
import os
import platform
import re
import shlex
import statistics
import time
from contextlib import contextmanager
from datetime import datetime, timezone

import torch


def resolve_device(name: str) -> torch.device:
    """``"auto"`` means the GPU when there is one."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Return what the last case left to the allocator, so that the next case starts clean
    (optimizers and closures may sit in reference cycles; a SmolLM2 case holds ~1.6 GB of states
    on the CPU, a Qwen2.5-1.5B one ~31 GB on a GPU). Called between cases, never inside timing."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextmanager
def frozen_heap():
    """Exclude every object alive now from garbage collection until exit (``gc.freeze``), so that
    the ``gc.collect`` between cases scans only what the cases built: with transformers imported,
    a full collection takes ~0.5 s on the project's 2-core machine."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def time_steps(step, device: torch.device, warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of ``iters`` calls of ``step()`` after ``warmup`` untimed ones.

    On a GPU each call is bracketed by CUDA events, so host launch overhead counts (a host-bound
    loop is slow in practice) while the sync after the loop does not.
    """
    if iters < 1:
        raise ValueError("iters must be >= 1")
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def median(values) -> float:
    return statistics.median(values)


def quartiles(values) -> tuple[float, float, float]:
    """First quartile, median, third quartile (all three the value itself for one value)."""
    values = list(values)
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def copy_traffic_factor(device: torch.device) -> int:
    """Bytes of memory traffic per byte copied. A CPU store to a line not in cache first reads it
    (write-allocate), so a STREAM-style copy moves 3x its size: read src, read dst, write dst. A
    GPU writes whole sectors without reading them: 2x."""
    return 2 if device.type == "cuda" else 3


def copy_step(device: torch.device, nbytes: int):
    """``(copy, traffic bytes)``: a closure copying ``nbytes`` of fp32 between two buffers
    (STREAM "copy"), and the memory traffic one call moves."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src).zero_()  # touched now, so the timed copies do not fault its pages in
    return functools.partial(dst.copy_, src), copy_traffic_factor(device) * src.numel() * 4


def measure_copy_bandwidth(device: torch.device, nbytes: int, warmup: int, iters: int) -> float:
    """Copy bandwidth in bytes/s: the memory traffic of a copy of ``nbytes`` (:func:`copy_traffic_factor`)
    over its median time."""
    copy, traffic = copy_step(device, nbytes)
    ms = median(time_steps(copy, device, warmup, iters))
    del copy
    free_memory(device)
    return traffic / (ms * 1e-3)


def roofline(copy_bandwidth: float, fused_adamw_rate: float | None) -> tuple[float, str]:
    """The device's roofline: the best streaming rate measured, ``(bytes/s, which one)``.

    The larger of the copy bandwidth and torch fused AdamW's rate (its 28 B/element over its step
    time): whichever shows the memory system can sustain more.
    """
    if fused_adamw_rate is not None and fused_adamw_rate > copy_bandwidth:
        return fused_adamw_rate, "torch fused AdamW (28 B/element)"
    return copy_bandwidth, "copy"


@contextmanager
def peak_memory(device: torch.device, baseline: int | None = None):
    """Yield a dict whose ``"bytes"`` is set on exit to the peak allocation above ``baseline``.

    ``baseline`` defaults to what is allocated on entry. ``None`` on devices without allocator
    statistics (CPU).
    """
    result = {"bytes": None}
    if device.type != "cuda":
        yield result
        return
    synchronize(device)
    if baseline is None:
        baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield result
    synchronize(device)
    result["bytes"] = torch.cuda.max_memory_allocated(device) - baseline


def allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({_cpu_model() or platform.processor() or platform.machine()})"


def _cpu_model() -> str | None:
    """The CPU's model name on Linux (``platform.processor()`` is often empty there)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def file_stem(device: torch.device) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``NVIDIA-H100-80GB-HBM3``; ``AMD EPYC`` with 2 logical CPUs
    -> ``cpu-AMD-EPYC-2cpu``."""
    if device.type != "cuda":
        name = f"cpu {_cpu_model() or platform.machine()} {os.cpu_count()}cpu"
    else:
        name = device_name(device)
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")


def cuda_extension_available() -> bool:
    """Whether cnl_ext's C++/CUDA extension (``backend="cuda"``, issue 4) is built and usable."""
    return torch.cuda.is_available() and not backend_unavailable_reason(native_backend_name(), torch.device("cuda"))


def native_backend_name() -> str:
    """The compiled extension's backend name in this cnl_ext: ``"native"``, or ``"cuda"`` before
    the rename (issue 12)."""
    from cnl_ext import functional

    return "native" if "native" in getattr(functional, "BACKENDS", ()) else "cuda"


def backend_unavailable_reason(backend: str, device: torch.device, op: str = "adam_step_",
                               dtype: torch.dtype | None = None) -> str:
    """``""`` when cnl_ext's ``backend`` can run ``op`` on ``device`` in this process (for parameters
    of ``dtype``: float64 ones need a backend that steps them), else why (``"<backend> backend
    unavailable: ..."``), asked of cnl_ext's own dispatcher."""
    from cnl_ext import functional

    prefix = f"{backend} backend unavailable: "
    known = tuple(functional.BACKENDS) + tuple(getattr(functional, "BACKEND_ALIASES", ()))
    if backend not in known:
        return prefix + f"this cnl_ext has no backend {backend!r} (cnl_ext.functional.BACKENDS = {known})"
    try:
        functional.resolve(backend, device, op, *([dtype] if dtype == torch.float64 else []))
    except Exception as exc:  # noqa: BLE001 - an import or build failure, or a device the backend does not serve
        return prefix + f"{type(exc).__name__}: {exc}"
    return ""


def resolved_backend(backend: str, device: torch.device) -> str | None:
    """The backend ``backend`` (e.g. ``"auto"``) runs AdamW steps with on ``device``, or ``None``."""
    import warnings

    from cnl_ext import functional

    try:
        with warnings.catch_warnings():  # auto's warning about what it passed over: reported elsewhere
            warnings.simplefilter("ignore")
            return functional.resolve(backend, device, "adam_step_").NAME
    except Exception:  # noqa: BLE001 - reported by backend_unavailable_reason
        return None


def native_build_info() -> dict | None:
    """``build_info()`` of the compiled extension's backend module when it has one (its build
    flags and the instruction set its CPU kernels run with), else ``None``."""
    for name in ("cnl_ext.ops.native_backend", "cnl_ext.ops.cuda_step"):
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - not in this cnl_ext, or it does not import: nothing to report
            continue
        build_info = getattr(module, "build_info", None)
        if build_info is not None:
            try:
                return {"module": name, **build_info()}
            except Exception as exc:  # noqa: BLE001 - the report says why, the benchmark goes on
                return {"module": name, "error": f"{type(exc).__name__}: {exc}"}
    return None


def cpu_info() -> dict:
    """What a CPU result depends on: model, cores, the instruction set torch's kernels use."""
    return {
        "model": _cpu_model() or platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average": os.getloadavg(),  # other processes on a shared machine show here
    }


def command_line(script: str, argv) -> str:
    """The command to type to repeat a run: ``python bench/<script> <argv>``."""
    return " ".join(shlex.quote(arg) for arg in ["python", script, *argv])


def environment(device: torch.device, command: str) -> dict:
    """What a result depends on, and the exact command that produced it."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import cnl_ext

    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cnl_ext_cuda_extension": cuda_extension_available(),
        "cnl_ext_auto_backend": resolved_backend("auto", device),
        "native_build_info": native_build_info(),
        "cpu": cpu_info() if device.type == "cpu" else None,
        "cnl_ext_file": cnl_ext.__file__,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }


def _git_commit() -> str | None:
    """The commit of the checkout the benchmark ran from (``+dirty`` with uncommitted changes)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")
