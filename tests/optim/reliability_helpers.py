"""Helpers of the reliability tests (issue 13): backends to run, failure injection, snapshots, layouts.

Everything the tests touch below the public API (``cnl_ext.FusedCNLSGD/Adam/AdamW``, ``cnl_ext.CNL``,
``set_reference``, ``capture_reference``, ``state_dict``/``load_state_dict``, ``backend=``) goes
through this module, so that a reorganisation of ``cnl_ext.ops`` / ``cnl_ext.functional`` changes
one place: :func:`backend_module` (where a backend's ops live), :func:`force_auto_order` (what
``backend="auto"`` tries) and :func:`shrink_triton_chunks`.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from ..conftest import ALL_BACKEND_DEVICES, HAS_CUDA, TRITON_DEVICES

REPO = pathlib.Path(__file__).resolve().parents[2]
REFERENCE_KEY = "cnl_reference"  # the public state_dict key of a saved reference (README)
OPS = ("sgd_step_", "adam_step_", "masked_delta_")


# ----------------------------------------------------------------------------- backends

def native_unavailable_reason() -> str:
    """Why the compiled backend cannot run here ("" when it can)."""
    try:
        module = importlib.import_module("cnl_ext.ops.native_backend")
    except ImportError as exc:
        return f"cnl_ext.ops.native_backend is missing ({exc})"
    return module.unavailable_reason()


# every backend and device, each skipping where it cannot run (the tests' one matrix: tests/conftest.py)
BACKEND_DEVICES = ALL_BACKEND_DEVICES
TRITON_BACKEND_DEVICES = TRITON_DEVICES
# The write-back of cnl_ext.CNL exists for these (ops contract v2 gives native a masked_delta_ too).
WRAPPER_BACKEND_DEVICES = BACKEND_DEVICES

# Before the ops contract v2 (cnl_ext/ops/<name>_backend.py), the ops lived in these modules.
_LEGACY_MODULES = {
    ("torch", "sgd_step_"): "cnl_ext.reference",
    ("torch", "adam_step_"): "cnl_ext.reference",
    ("torch", "masked_delta_"): "cnl_ext.ops.masked_delta_reference",
    ("triton", "sgd_step_"): "cnl_ext.ops.triton_sgd",
    ("triton", "adam_step_"): "cnl_ext.ops.triton_adam",
    ("triton", "masked_delta_"): "cnl_ext.ops.triton_masked_delta",
    ("native", "sgd_step_"): "cnl_ext.ops.cuda_step",
    ("native", "adam_step_"): "cnl_ext.ops.cuda_step",
}


def backend_module(backend: str, op: str):
    """The module whose attribute ``op`` the dispatcher calls for ``backend`` (None if it has none)."""
    try:
        module = importlib.import_module(f"cnl_ext.ops.{backend}_backend")
        return module if hasattr(module, op) else None
    except ModuleNotFoundError:
        name = _LEGACY_MODULES.get((backend, op))
        return None if name is None else importlib.import_module(name)


@dataclasses.dataclass
class InjectedFailure:
    """A backend op replaced by one that raises; ``calls`` counts its calls."""

    error: BaseException
    partial_write: bool = False  # write into the first parameter before raising (a kernel that died midway)
    raise_on_call: int = 1  # raise on this call (1-based); earlier calls run the real op
    real: object = None
    calls: int = 0

    def __call__(self, params, *args, **kwargs):
        self.calls += 1
        if self.calls < self.raise_on_call:
            return self.real(params, *args, **kwargs)
        if self.partial_write:
            nonempty = [p for p in params if p.numel()]
            if nonempty:
                nonempty[0][(0,) * nonempty[0].dim()] += 1.0
        raise self.error


def inject_backend_failure(monkeypatch, backend: str, op: str, error=None, **kwargs) -> InjectedFailure:
    """Make ``backend``'s ``op`` raise ``error`` at launch (a RuntimeError by default)."""
    module = backend_module(backend, op)
    if module is None:
        pytest.skip(f"backend {backend!r} has no op {op}")
    failure = InjectedFailure(error or RuntimeError(f"injected launch failure in {backend}.{op}"),
                              real=getattr(module, op), **kwargs)
    monkeypatch.setattr(module, op, failure)
    return failure


def count_backend_calls(monkeypatch, backend: str, op: str):
    """Wrap ``backend``'s ``op`` so that its calls are counted; returns a one-element list (the count)."""
    module = backend_module(backend, op)
    real, count = getattr(module, op), [0]

    def counting(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, op, counting)
    return count


def force_auto_order(monkeypatch, device_type: str, order) -> None:
    """Make ``backend="auto"`` try ``order`` for ``device_type`` tensors, from a clean choice."""
    from cnl_ext import registry

    monkeypatch.setattr(registry, "AUTO_ORDER", {**registry.AUTO_ORDER, device_type: order})
    monkeypatch.setattr(registry, "_auto_chosen", {})


def shrink_triton_chunks(monkeypatch, blocks: int = 4) -> int:
    """Make a Triton chunk ``blocks`` blocks long, so that small tensors span several chunks."""
    from cnl_ext.ops import triton_step

    chunk = blocks * triton_step.BLOCK
    monkeypatch.setattr(triton_step, "CHUNK", chunk)
    return chunk


# ----------------------------------------------------------------------------- snapshots

def _bits(t: torch.Tensor):
    """A copy that compares bit for bit (NaN payloads, -0.0) with torch.equal, plus the layout."""
    flat = t.detach().reshape(-1).clone()
    if flat.is_floating_point():
        flat = flat.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[flat.element_size()])
    return (tuple(t.shape), t.stride(), t.dtype, t.device, flat)


def _freeze(value):
    """``value`` with every tensor replaced by its bits (recursively through dicts, lists, tuples)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", _bits(value))
    if isinstance(value, dict):
        return {k: _freeze(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_freeze(v) for v in value)
    return value


def _same(a, b) -> bool:
    if isinstance(a, tuple) and len(a) == 2 and a[0] == "tensor":
        return (isinstance(b, tuple) and len(b) == 2 and b[0] == "tensor" and a[1][:4] == b[1][:4]
                and torch.equal(a[1][4], b[1][4]))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def optimizer_params(opt):
    return [p for group in opt.param_groups for p in group["params"]]


def snapshot(opt, *, grads: bool = True) -> dict:
    """Bits of everything a failed call must leave as it was: parameters (values and strides), their
    gradients, every optimizer state (tensors and step counts), param_groups and the stored reference."""
    params = optimizer_params(opt)
    index = {id(p): i for i, p in enumerate(params)}
    saved_reference = opt.state_dict(include_reference=True).get(REFERENCE_KEY)
    return {
        "params": [_freeze(p) for p in params],
        "grads": [_freeze(p.grad) for p in params] if grads else None,
        # an empty entry is no state (``optimizer.state`` is a defaultdict: reading it adds one)
        "state": {index[id(p)]: _freeze(dict(s)) for p, s in opt.state.items() if len(s)},
        "param_groups": [_freeze({k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups],
        "group_params": [[index[id(p)] for p in g["params"]] for g in opt.param_groups],
        "reference": _freeze(saved_reference),
    }


def assert_unchanged(opt, before: dict) -> None:
    """Assert that ``opt`` is bit for bit as in ``before`` (a :func:`snapshot`), naming what changed."""
    after = snapshot(opt, grads=before["grads"] is not None)
    changed = [key for key in before if not _same(before[key], after[key])]
    details = []
    if "params" in changed:
        details.append("parameters " + str([i for i, (a, b) in enumerate(zip(before["params"], after["params"]))
                                            if not _same(a, b)]))
    if "state" in changed:
        indices = set(before["state"]) | set(after["state"])
        details.append("state of parameters " + str(sorted(
            i for i in indices if not _same(before["state"].get(i), after["state"].get(i)))))
    assert not changed, f"a failed call changed the optimizer: {changed} {details}"


def assert_fails_atomically(opt, call, error=Exception, match=None):
    """Run ``call()``, which must raise ``error`` (matching ``match``), and assert ``opt`` unchanged."""
    before = snapshot(opt)
    with pytest.raises(error, match=match) as info:
        call()
    assert_unchanged(opt, before)
    return info


# ----------------------------------------------------------------------------- layouts

LAYOUTS = ("contiguous", "transposed", "channels_last", "sliced", "expanded_cloned")


def in_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """A new tensor equal to ``values`` laid out in memory as ``layout`` (contiguous where it does not apply)."""
    if layout == "transposed" and values.dim() >= 2:
        dims = tuple(reversed(range(values.dim())))
        # clone, not contiguous(): that returns ``values`` itself when it is laid out so already
        return values.permute(dims).clone(memory_format=torch.contiguous_format).permute(dims)
    if layout == "channels_last" and values.dim() == 4:
        return values.clone(memory_format=torch.channels_last)
    if layout == "sliced" and values.dim() >= 1:
        # every other element of a larger buffer along the last dim, one element into the buffer
        buffer = torch.zeros(*values.shape[:-1], 2 * values.shape[-1] + 1, dtype=values.dtype, device=values.device)
        view = buffer[..., 1::2]
        view.copy_(values)
        return view
    if layout == "expanded_cloned" and values.dim() >= 1:
        # the layout ``expand(...).clone()`` gives (dense; torch 2.13 makes it contiguous)
        base = torch.empty((1,) + tuple(values.shape[1:]), dtype=values.dtype, device=values.device)
        strides = base.expand(values.shape).clone().stride()
        return torch.empty_strided(values.shape, strides, dtype=values.dtype, device=values.device).copy_(values)
    if layout == "expanded" and values.dim() >= 1 and values.shape[0] > 1:
        # a stride-0 (broadcast) tensor: only for inputs that are read, e.g. gradients; values repeat row 0
        return values[:1].clone().expand(values.shape)
    return values.clone()


def transposed_parameter(rows=6, cols=9, dtype=torch.float32, device="cpu"):
    """A leaf Parameter of shape (cols, rows) that is the transpose of a contiguous (rows, cols) buffer."""
    return torch.nn.Parameter(torch.randn(rows, cols, device=device).to(dtype).t())


def channels_last_parameter(shape=(4, 3, 5, 5), dtype=torch.float32, device="cpu"):
    return torch.nn.Parameter(torch.randn(shape, device=device).to(dtype).contiguous(memory_format=torch.channels_last))


# ----------------------------------------------------------------------------- subprocesses

def run_python(code: str, *, env: dict | None = None, unset=(), timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -c code`` from the repository root (this checkout's cnl_ext), with ``env`` added and
    the variables in ``unset`` removed: a crash (SIGABRT, SIGSEGV) fails the calling test only."""
    environment = {k: v for k, v in os.environ.items() if k not in unset}
    environment.update(env or {})
    environment["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environment, capture_output=True, text=True,
                          timeout=timeout)


def describe_process(result: subprocess.CompletedProcess) -> str:
    signal = f" (signal {-result.returncode})" if result.returncode < 0 else ""
    return (f"exit code {result.returncode}{signal}\n--- stdout\n{result.stdout[-3000:]}\n"
            f"--- stderr\n{result.stderr[-3000:]}")


def device_available(device: str) -> bool:
    return device == "cpu" or (device == "cuda" and HAS_CUDA)


# ----------------------------------------------------------------------------- more failure injection

class _FailingKernel:
    """A Triton kernel whose compile fails for the specializations ``should_fail(constexprs)`` picks:
    whichever way it is compiled or launched (``kernel[grid](...)``, ``run``, ``warmup``)."""

    def __init__(self, kernel, should_fail, error):
        self._kernel, self._should_fail, self._error = kernel, should_fail, error

    def _check(self, kwargs):
        if self._should_fail(kwargs):
            raise self._error

    def __getitem__(self, grid):
        launcher = self._kernel[grid]

        def launch(*args, **kwargs):
            self._check(kwargs)
            return launcher(*args, **kwargs)

        return launch

    def run(self, *args, **kwargs):
        self._check(kwargs)
        return self._kernel.run(*args, **kwargs)

    def warmup(self, *args, **kwargs):
        self._check(kwargs)
        return self._kernel.warmup(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._kernel, name)


TRITON_KERNEL_MODULES = ("cnl_ext.ops.triton_sgd", "cnl_ext.ops.triton_adam", "cnl_ext.ops.triton_masked_delta")


def fail_triton_compile(monkeypatch, should_fail, error=None) -> None:
    """Make every Triton kernel of cnl_ext fail to compile where ``should_fail(constexpr kwargs)``."""
    import triton

    kernel_types = tuple(t for t in (getattr(triton.runtime, "JITFunction", None),
                                     getattr(getattr(triton.runtime, "interpreter", None), "InterpretedFunction", None))
                         if t is not None)
    error = error or RuntimeError("injected compile failure: PTX assembly failed")
    patched = 0
    for name in TRITON_KERNEL_MODULES:
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if attr.endswith("_kernel") and isinstance(value, kernel_types):
                monkeypatch.setattr(module, attr, _FailingKernel(value, should_fail, error))
                patched += 1
    assert patched, "adapt tests/optim/reliability_helpers.TRITON_KERNEL_MODULES: no Triton kernel found"


def fail_reference_encode(monkeypatch, on_call: int = 2):
    """Make :func:`cnl_ext.reference_format.encode` raise on its ``on_call``-th call (a failure in the
    middle of storing a reference: out of memory, say)."""
    from cnl_ext import reference_format

    real, calls = reference_format.encode, [0]

    def encode(*args, **kwargs):
        calls[0] += 1
        if calls[0] >= on_call:
            raise RuntimeError("injected failure while encoding a reference")
        return real(*args, **kwargs)

    monkeypatch.setattr(reference_format, "encode", encode)
    return calls
