"""Device plumbing shared by the benchmarks: timing, copy bandwidth, peak memory, environment."""
from __future__ import annotations

import functools
import gc
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
    """Return what the last case left to the allocator, so that the next case starts clean.

    Only on a GPU: its memory is the scarce resource (a Qwen2.5-1.5B case holds ~31 GB), while on
    the CPU reference counting frees the tensors and a full ``gc.collect`` costs more than the step.
    """
    if device.type == "cuda":
        gc.collect()  # optimizers and closures may sit in reference cycles
        torch.cuda.empty_cache()


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


def measure_copy_bandwidth(device: torch.device, nbytes: int, warmup: int, iters: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    copy = functools.partial(dst.copy_, src)
    ms = median(time_steps(copy, device, warmup, iters))
    del src, dst, copy
    free_memory(device)
    return 2 * nbytes / (ms * 1e-3)


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
    """``NVIDIA H100 80GB HBM3`` -> ``NVIDIA-H100-80GB-HBM3``; plain ``cpu`` on the CPU."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^A-Za-z0-9.]+", "-", device_name(device)).strip("-")


def cuda_extension_available() -> bool:
    """Whether cnl_ext's C++/CUDA extension (``backend="cuda"``, issue 4) is built and usable."""
    try:
        from cnl_ext.ops import cuda_step
    except ImportError:  # the fallback is optional
        return False
    return bool(cuda_step.is_available())


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
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cnl_ext_cuda_extension": cuda_extension_available(),
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }
