"""The backends and the one place that chooses among them.

The registry, :data:`BACKEND_MODULES`:

- ``"torch"``: :mod:`cnl_ext.ops.torch_backend`, plain PyTorch, any device (the oracle);
- ``"triton"``: :mod:`cnl_ext.ops.triton_backend`, multi-tensor Triton kernels (CUDA tensors, or
  CPU tensors under ``TRITON_INTERPRET=1``);
- ``"native"``: :mod:`cnl_ext.ops.native_backend`, the compiled C++ extension (CPU kernels, and
  CUDA kernels where it was built with them); ``"cuda"`` is its old name;
- ``"auto"``: per device type, the first of :data:`AUTO_ORDER` that imports, builds and runs the op
  with the options needed (one warning names what was passed over). Only import and build failures,
  which happen before anything is written, move ``auto`` on; an error inside an op propagates.

A backend says what it runs with its :class:`~cnl_ext.ops.contract.Capabilities` per device.
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import NamedTuple

import torch

from .ops.contract import Capabilities

__all__ = ["BACKEND_MODULES", "BACKEND_ALIASES", "BACKENDS", "AUTO_ORDER", "REQUIRE_NATIVE_ENV", "BackendUnavailable",
           "Needs", "Resolved", "canonical_backend", "load_backend", "backend_status", "why_unsupported", "resolve",
           "resolve_each"]

BACKEND_MODULES = {
    "torch": "cnl_ext.ops.torch_backend",
    "triton": "cnl_ext.ops.triton_backend",
    "native": "cnl_ext.ops.native_backend",
}
BACKEND_ALIASES = {"cuda": "native"}
BACKENDS = ("auto", *BACKEND_MODULES)
# What backend="auto" tries, in order, per device type; other device types get "torch".
AUTO_ORDER = {"cuda": ("triton", "native", "torch"), "cpu": ("native", "torch")}
# Set (as CI does) to make an unavailable native backend an error instead of a fallback to "torch".
REQUIRE_NATIVE_ENV = "CNL_EXT_REQUIRE_NATIVE"

_modules: dict = {}  # backend name -> module, or the reason it is unavailable (str)
_auto_chosen: dict = {}  # (device type, op, Needs) -> module
_warned: set = set()


class BackendUnavailable(RuntimeError):
    """A backend that cannot run in this process (not installed, not built, failed to build)."""


def canonical_backend(backend: str) -> str:
    """``backend`` as a name of :data:`BACKENDS` (aliases resolved); ValueError for anything else."""
    name = BACKEND_ALIASES.get(backend, backend)
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS + tuple(BACKEND_ALIASES)}, got {backend!r}")
    return name


def load_backend(name: str):
    """The backend module ``name``; BackendUnavailable says why it cannot be used here."""
    if name not in _modules:
        try:
            module = importlib.import_module(BACKEND_MODULES[name])
            reason = module.unavailable_reason()
        except ImportError as exc:
            module, reason = None, f"{BACKEND_MODULES[name]} cannot be imported: {exc}"
        _modules[name] = module if not reason else reason
    loaded = _modules[name]
    if isinstance(loaded, str):
        raise BackendUnavailable(f"backend {name!r} is not available: {loaded}")
    return loaded


def backend_status() -> dict:
    """``{name: ""}`` for every backend usable in this process, else the reason it is not (for reports)."""
    status = {}
    for name in BACKEND_MODULES:
        try:
            load_backend(name)
            status[name] = ""
        except BackendUnavailable as exc:
            status[name] = str(exc)
    return status


def why_unsupported(module, device, what) -> str:
    """Why backend ``module`` does not run ``what`` (an op, or a capability such as ``"float64"``) on
    ``device`` (for error messages and reports)."""
    device = torch.device(device)
    return module.capabilities(device).reason or f"backend {module.NAME!r} does not support {what} on {device}"


class Needs(NamedTuple):
    """The capabilities beyond the op itself that a call needs: ``float64`` (float64 parameters),
    ``capturable`` (a tensor ``lr`` and device step counts)."""
    float64: bool = False
    capturable: bool = False

    @staticmethod
    def of(dtype=None, capturable: bool = False) -> "Needs":
        return Needs(dtype == torch.float64, bool(capturable))

    def missing(self, capabilities: Capabilities, op) -> str:
        """The first of ``op`` and these needs that ``capabilities`` lack (``""``: none)."""
        if not capabilities.runs(op):
            return str(op)
        if self.float64 and not capabilities.float64:
            return "float64"
        if self.capturable and not capabilities.capturable:
            return "capturable"
        return ""


def resolve(backend: str, device: torch.device, op, dtype: torch.dtype = None, *, capturable: bool = False,
            owner: str = "cnl_ext"):
    """The backend module that runs ``op`` (an :class:`~cnl_ext.ops.contract.OpSpec` or its name) for
    tensors on ``device`` (of parameter dtype ``dtype``, when given: float64 ones need a backend with
    ``float64``; ``capturable``: one with ``capturable``); raises before anything is written."""
    name = canonical_backend(backend)
    needs = Needs.of(dtype, capturable)
    if name != "auto":
        module = load_backend(name)
        missing = needs.missing(module.capabilities(device), op)
        if missing == "capturable":
            raise RuntimeError(f"{owner}: capturable=True is not supported by backend {module.NAME!r} on {device}")
        if missing:
            raise RuntimeError(why_unsupported(module, device, missing))
        return module
    key = (device.type, str(op), needs)
    if key not in _auto_chosen:
        _auto_chosen[key] = _choose(device, op, needs, dtype)
    return _auto_chosen[key]


def _choose(device, op, needs: Needs, dtype):
    """backend="auto"'s choice (see :func:`resolve`), with one warning naming what it passed over."""
    passed_over = []
    for candidate in AUTO_ORDER.get(device.type, ("torch",)):
        try:
            module = load_backend(candidate)
        except BackendUnavailable as exc:
            if candidate == "native" and os.environ.get(REQUIRE_NATIVE_ENV) == "1":
                raise BackendUnavailable(f"{exc} ({REQUIRE_NATIVE_ENV}=1 makes this an error)") from None
            passed_over.append(str(exc))
            continue
        if not needs.missing(module.capabilities(device), op):
            break
    else:
        detail = f" for {dtype} parameters" if needs.float64 else ""
        detail += " with capturable=True" if needs.capturable else ""
        raise RuntimeError(f"no backend runs {op} on {device}{detail}")
    message = (f"cnl_ext: backend='auto' uses {module.NAME!r} for {device.type} tensors because "
               + "; ".join(passed_over))
    if passed_over and message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
    return module


class Resolved(dict):
    """One call's backends, resolved once: ``{(device, float64 parameters): backend module}`` for
    every (device, float64) of its parameters (:func:`resolve_each`)."""

    def module_for(self, device: torch.device, dtype: torch.dtype):
        return self[(device, dtype == torch.float64)]


def resolve_each(backend: str, op, params, *, capturable: bool = False, owner: str = "cnl_ext") -> Resolved:
    """:func:`resolve` for every device and dtype kind (float64 or not) of ``params``, once."""
    resolved = Resolved()
    for p in params:
        key = (p.device, p.dtype == torch.float64)
        if key not in resolved:
            resolved[key] = resolve(backend, p.device, op, p.dtype, capturable=capturable, owner=owner)
    return resolved
