"""Peak memory of a run: the host's resident set size and, on a GPU, the CUDA allocator's peak.

The host peak is the kernel's high-water mark of the resident set (``VmHWM`` in
``/proc/self/status``), which :func:`reset_peak_rss` resets to the current size (``/proc/self/
clear_refs``, Linux ≥ 4.0): so a run's or a phase's peak is exact, nothing between two samples is
missed. Where the reset is not possible, the peak is the process's since it started
(``resource.getrusage``) and ``host_rss_peak_scope`` says ``"process"`` instead of ``"run"``.
Resetting also resets what ``getrusage`` and ``/usr/bin/time -v`` report for the process; the
tracker keeps the process's peak itself (``host_rss_process_peak_bytes``). Nested trackers (a
benchmark's around a run's) do not lose each other's peaks: every reset first hands the current
high-water mark to each open :class:`Watermark`.
"""
from __future__ import annotations

import contextlib
import os
import resource
import sys

import torch

__all__ = ["peak_rss_bytes", "current_rss_bytes", "reset_peak_rss", "Watermark", "PeakMemory"]

_STATUS = "/proc/self/status"
_process_peak = 0  # the largest high-water mark seen before a reset, over the process's life
_open = []  # the Watermarks counting now


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS, encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def peak_rss_bytes() -> int:
    """The resident set's high-water mark since the last :func:`reset_peak_rss` (else since start), bytes."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # macOS reports bytes, Linux KiB


def current_rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current resident size; False where the OS does not allow it."""
    global _process_peak
    mark = peak_rss_bytes()
    _process_peak = max(_process_peak, mark)
    for watermark in _open:
        watermark.seen = max(watermark.seen, mark)
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


class Watermark:
    """The host's peak resident set since :meth:`start` (exact where the reset works), read with
    :meth:`peak` as often as wanted; :meth:`stop` when done. Resets by others do not hide a peak."""

    def __init__(self):
        self.seen = 0
        self.exact = True

    def start(self) -> "Watermark":
        if self not in _open:
            _open.append(self)
        self.exact = reset_peak_rss()  # hands the mark so far to the other open watermarks
        self.seen = 0
        return self

    def peak(self) -> int:
        return max(self.seen, peak_rss_bytes())

    def stop(self) -> int:
        peak = self.peak()
        if self in _open:
            _open.remove(self)
        return peak


class PeakMemory:
    """The peak memory of a block and of named phases inside it (use as a context manager).

    ``with PeakMemory(device) as peak: ... with peak.phase("reference"): ...``; then
    :meth:`to_dict`: ``host_rss_peak_bytes`` (the block's), ``host_rss_process_peak_bytes``,
    ``host_rss_peak_scope``, ``phases`` (each phase's host peak, the largest of its calls) and on a
    CUDA device ``cuda_max_allocated_bytes`` / ``cuda_max_reserved_bytes`` (the same for phases).
    """

    def __init__(self, device=None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.host = 0
        self.cuda_allocated = 0
        self.cuda_reserved = 0
        self.phases: dict = {}
        self.scope = "run"
        self._mark = Watermark()

    # a segment ends at every phase boundary: its peak counts for the block (and the phase, if any)
    def _segment_peak(self) -> tuple:
        host = self._mark.peak()
        allocated = reserved = None
        if self.cuda:
            allocated = torch.cuda.max_memory_allocated(self.device)
            reserved = torch.cuda.max_memory_reserved(self.device)
        return host, allocated, reserved

    def _start_segment(self) -> None:
        if not self._mark.start().exact:
            self.scope = "process"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def _end_segment(self) -> tuple:
        host, allocated, reserved = self._segment_peak()
        self.host = max(self.host, host)
        if self.cuda:
            self.cuda_allocated = max(self.cuda_allocated, allocated)
            self.cuda_reserved = max(self.cuda_reserved, reserved)
        return host, allocated, reserved

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._start_segment()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._end_segment()
        self._mark.stop()
        return False

    @contextlib.contextmanager
    def phase(self, name: str):
        """Count the peak inside the block for ``name`` too (the largest over its calls)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._end_segment()
        self._start_segment()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize(self.device)
            host, allocated, reserved = self._end_segment()
            saved = self.phases.setdefault(name, {"host_rss_peak_bytes": 0})
            saved["host_rss_peak_bytes"] = max(saved["host_rss_peak_bytes"], host)
            if self.cuda:
                saved["cuda_max_allocated_bytes"] = max(saved.get("cuda_max_allocated_bytes", 0), allocated)
                saved["cuda_max_reserved_bytes"] = max(saved.get("cuda_max_reserved_bytes", 0), reserved)
            self._start_segment()

    def to_dict(self) -> dict:
        out = {"host_rss_peak_bytes": self.host, "host_rss_peak_scope": self.scope,
               "host_rss_process_peak_bytes": max(_process_peak, peak_rss_bytes(), self.host)}
        if self.cuda:
            out.update(cuda_max_allocated_bytes=self.cuda_allocated, cuda_max_reserved_bytes=self.cuda_reserved)
        out["phases"] = {name: dict(values) for name, values in self.phases.items()}
        return out
