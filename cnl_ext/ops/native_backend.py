"""The ``"native"`` backend: the compiled C++ extension (CPU kernels in ``csrc/cpu/``, CUDA kernels in
``csrc/*.cu``), as the PyTorch operators ``torch.ops.cnl_ext.sgd_step_``, ``adam_step_`` and
``masked_delta_`` (so they also work inside ``torch.compile``; ``masked_delta_`` on the CPU only), and
KIF's fusion passes ``kif_task_vector_fuse_`` and ``kif_recurrent_fuse_``. A step given ``importance`` (KIF's EMAs)
runs ``torch.ops.cnl_ext.sgd_step_importance_`` / ``adam_step_importance_`` instead, which update them
in the same pass (CPU and CUDA kernels).

Two libraries serve these ops:

- the CPU library, which defines the ops and holds their CPU and Meta kernels. It is compiled once
  per instruction set (see :mod:`cnl_ext.ops.native_build`); the variant for this CPU
  (``torch.backends.cpu.get_cpu_capability()``, or lower with ``CNL_EXT_CPU_CAPABILITY``) comes
  prebuilt with wheels and ``pip install --no-build-isolation .`` (``cnl_ext._cpu_<isa>``), and is
  otherwise compiled on first use with ``torch.utils.cpp_extension.load`` into torch's extension
  cache (one line says so, with its time). A process loads exactly one of them.
- ``cnl_ext._C``, the CUDA kernels, built by setup.py where a CUDA toolkit and a CUDA torch exist.

Importing this module loads and compiles nothing; :func:`unavailable_reason` (or the first op) does.
If the build fails, the backend is unavailable and :func:`unavailable_reason` says why (the caller,
``backend="auto"``, warns once and uses the next backend); with ``CNL_EXT_REQUIRE_NATIVE=1`` (CI) it
raises :class:`NativeBackendRequiredError` instead, which is deliberately not a RuntimeError or
ImportError, so that no fallback logic can swallow it.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
import threading
import time

import torch

from . import native_build

NAME = "native"
OPS = ("sgd_step_", "adam_step_", "masked_delta_", "kif_task_vector_fuse_", "kif_recurrent_fuse_")
_IMPORTANCE_OPS = ("sgd_step_importance_", "adam_step_importance_")  # the steps with KIF's EMAs
_CUDA_OPS = ("sgd_step_", "adam_step_", "kif_task_vector_fuse_", "kif_recurrent_fuse_")
ENV_REQUIRE = "CNL_EXT_REQUIRE_NATIVE"



class NativeBackendRequiredError(Exception):
    """CNL_EXT_REQUIRE_NATIVE=1 and the native backend cannot load or compile."""


_lock = threading.Lock()
_state: dict = {}  # filled once by _load(): cpu (module), cpu_reason, build, cuda (module), cuda_reason


def _required() -> bool:
    return os.environ.get(ENV_REQUIRE, "").strip().lower() in ("1", "true", "yes", "on")


def cpu_capability() -> str:
    """The CPU variant this process uses: torch's CPU capability, or ``CNL_EXT_CPU_CAPABILITY``
    when it names a lower one (a higher one would crash on this CPU, and is an error)."""
    detected = torch.backends.cpu.get_cpu_capability().upper()
    best = next((c for c in native_build.CPU_CAPABILITIES if c in detected), "DEFAULT")
    if not native_build.is_x86():
        best = "DEFAULT"
    wanted = os.environ.get(native_build.ENV_CAPABILITY, "").strip().upper()
    if not wanted:
        return best
    order = native_build.CPU_CAPABILITIES
    if wanted not in order:
        raise ValueError(f"{native_build.ENV_CAPABILITY}={wanted!r}: expected one of {order}")
    if order.index(wanted) < order.index(best):
        raise ValueError(f"{native_build.ENV_CAPABILITY}={wanted}: this CPU (torch's capability {detected}) "
                         f"supports at most {best}")
    return wanted


def _extensions_root() -> str:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    tag = f"cnl_ext-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
    return os.path.join(root, re.sub(r"[^0-9A-Za-z_.+-]", "_", tag))


def _jit_build(capability: str):
    """Compile (or load from torch's extension cache) the CPU variant; return the module."""
    from torch.utils import cpp_extension

    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    csrc = native_build.csrc_dir(package_dir)
    if csrc is None:
        raise RuntimeError(f"the C++ sources (csrc/) are neither in {package_dir} nor next to it")
    name = native_build.jit_module(capability)
    sources = [os.path.join(csrc, s) for s in native_build.CPU_SOURCES]
    flags = native_build.compile_flags(capability)
    # One build directory per content of the sources and flags: a library found there is current,
    # and a changed source never loads a stale build.
    digest = hashlib.sha256("\0".join(flags).encode())
    for path in sources + [os.path.join(csrc, h) for h in native_build.CPU_HEADERS]:
        with open(path, "rb") as f:
            digest.update(f.read())
    build_dir = os.path.join(_extensions_root(), f"{name}-{digest.hexdigest()[:12]}")
    os.makedirs(build_dir, exist_ok=True)
    fresh = os.path.exists(os.path.join(build_dir, f"{name}.so"))
    if not fresh:
        print(f"cnl_ext: compiling the native CPU kernels ({capability}) into {build_dir} ...", end="",
              file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        module = cpp_extension.load(
            name=name, sources=sources, extra_cflags=flags,
            extra_ldflags=["-fopenmp"], extra_include_paths=[csrc, os.path.join(csrc, "cpu")], build_directory=build_dir,
            is_python_module=True, verbose=False,
        )
    except BaseException:
        if not fresh:
            print(" failed", file=sys.stderr, flush=True)
        raise
    if not fresh:
        print(f" done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return module


def _load_cpu():
    """(module, how it was obtained, reason): the CPU library of this process, loaded once."""
    try:
        capability = cpu_capability()
    except ValueError as exc:
        return None, "", str(exc)
    if hasattr(torch.ops.cnl_ext, "adam_step_"):
        return None, "", ("torch.ops.cnl_ext is already defined by another library in this process "
                          "(two copies of cnl_ext's extension?)")
    prebuilt = native_build.prebuilt_module(capability)
    prebuilt_error = ""
    try:
        return importlib.import_module(prebuilt), "prebuilt", ""
    except ModuleNotFoundError as exc:
        if exc.name != prebuilt:
            prebuilt_error = f"{prebuilt} could not be loaded: {exc}; "
    except ImportError as exc:  # e.g. built against another torch (undefined symbols): nothing ran
        prebuilt_error = f"{prebuilt} could not be loaded (built for another torch?): {exc}; "
    try:
        return _jit_build(capability), "jit", ""
    except Exception as exc:  # compiler or ninja missing, compile error (its output is in the message)
        detail = str(exc).strip()
        return None, "", f"{prebuilt_error}building the CPU kernels ({capability}) failed: {detail}"


def _load_cuda():
    """(module, reason): cnl_ext._C (CUDA kernels of the same ops), after the CPU library."""
    if importlib.util.find_spec("cnl_ext._C") is None:
        return None, ("cnl_ext._C is not built (cnl_ext was installed without a CUDA toolkit and a CUDA build "
                      "of torch; reinstall on such a machine with `pip install --no-build-isolation .`, or "
                      "CNL_EXT_BUILD_CUDA=1 to make a failed build an error)")
    try:
        module = importlib.import_module("cnl_ext._C")
    except (ImportError, OSError) as exc:
        return None, f"cnl_ext._C could not be loaded (built for another torch or CUDA?): {exc}"
    return module, ""


def _load() -> dict:
    with _lock:
        if not _state:
            cpu, build, reason = _load_cpu()
            _state.update(cpu=cpu, build=build, cpu_reason=reason, cuda=None, cuda_reason=reason)
            if cpu is not None:
                missing = [op for op in OPS + _IMPORTANCE_OPS if not hasattr(torch.ops.cnl_ext, op)]
                if missing:
                    _state.update(cpu=None, cpu_reason=f"the CPU library does not register torch.ops.cnl_ext.{missing[0]}")
                else:
                    _state["cuda"], _state["cuda_reason"] = _load_cuda()
    if _state["cpu"] is None and _required():
        raise NativeBackendRequiredError(f"cnl_ext: {ENV_REQUIRE}=1 but the native backend is unavailable: "
                                         f"{_state['cpu_reason']}")
    return _state


def unavailable_reason() -> str:
    """``""`` when the native ops run in this process (loading, or compiling, them on first call),
    otherwise why not. Raises :class:`NativeBackendRequiredError` instead with ``CNL_EXT_REQUIRE_NATIVE=1``."""
    return _load()["cpu_reason"]


def cuda_unavailable_reason() -> str:
    """Why the CUDA kernels cannot run here, or ``""`` when they can (nothing compiled without CUDA)."""
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return f"torch {torch.__version__} is a CPU-only build"
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    state = _load()
    return state["cuda_reason"] if state["cuda"] is None else ""


def supports(device, op: str) -> bool:
    """Whether the ops (``"sgd_step_"``, ``"adam_step_"``, ``"masked_delta_"``, ``"capturable"``,
    ``"importance"``, ``"float64"``, the KIF fusion passes) run for tensors on ``device``: every op on
    CPU; all but ``masked_delta_`` and ``float64`` on CUDA with ``cnl_ext._C`` (its kernels compute in
    float32 only)."""
    device = torch.device(device)
    if device.type == "cpu":
        return op in OPS or op in ("capturable", "importance", "float64")
    if device.type == "cuda":
        built = importlib.util.find_spec("cnl_ext._C") is not None
        return built and (op in _CUDA_OPS or op in ("capturable", "importance"))
    return False


def unsupported_reason(device, op: str) -> str:
    """Why :func:`supports` says no, for error messages."""
    device = torch.device(device)
    if op == "float64" and device.type == "cuda":
        return ("the native backend's CUDA kernels do not step float64 parameters (its CPU kernels do); use "
                "backend='torch' for float64 CUDA tensors")
    return f"backend 'native' does not support {op} on {device}"


def _arch_list(token: str) -> str:
    """setup.py's bare token back to TORCH_CUDA_ARCH_LIST form: ``80_90PTX`` -> ``8.0;9.0+PTX``."""
    archs = []
    for arch in token.split("_"):
        match = re.fullmatch(r"(\d+)(\d)([a-z]?)(PTX)?", arch)
        if match is None:
            return token  # not the usual form: report it as built
        major, minor, suffix, ptx = match.groups()
        archs.append(f"{major}.{minor}{suffix}" + ("+PTX" if ptx else ""))
    return ";".join(archs)


def build_info() -> dict:
    """What the loaded libraries were built with (for benchmark and bug reports); ``{}`` without them."""
    state = _load()
    cpu, cuda = state["cpu"], state["cuda"]
    info = {}
    if cpu is not None:
        info.update(cpu_capability=cpu.cpu_capability, cpu_build=state["build"], cpu_library=cpu.__file__,
                    cpu_item_size=int(cpu.item_size))
    if cuda is not None:
        version = int(cuda.cuda_runtime_version)
        info.update(cuda_runtime=f"{version // 1000}.{version % 1000 // 10}", cuda_arch_list=_arch_list(cuda.cuda_archs),
                    chunk_size=int(cuda.chunk_size), library=cuda.__file__)
    return info


def _check() -> None:
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"cnl_ext native backend: {reason}")


def _split_lr(lr):
    """(float lr, lr_tensor): a capturable step's tensor ``lr`` travels as ``lr_tensor``."""
    if isinstance(lr, torch.Tensor):
        return 0.0, lr
    return float(lr), None


def _importance_op(op: str, importance, importance_kind, importance_betas):
    """(op, extra positional lists, extra keywords): ``op`` itself without importance, else its
    ``*_importance_`` variant with the EMA lists and options."""
    if importance is None:
        return getattr(torch.ops.cnl_ext, op), (), {}
    sensitivities, uncertainties = importance
    beta1, beta2 = (float(b) for b in importance_betas)
    return (getattr(torch.ops.cnl_ext, op + "importance_"), (sensitivities, uncertainties),
            dict(importance_kind=importance_kind, importance_beta1=beta1, importance_beta2=beta2))


def sgd_step_(params, grads, momentum_buffers, references, stats, *, reference_format: str, lr,
              weight_decay: float, momentum: float, dampening: float, nesterov: bool, maximize: bool,
              first_step: bool, importance=None, importance_kind: str = "first",
              importance_betas=(0.85, 0.85)) -> None:
    """See :mod:`cnl_ext.ops` for the contract and the torch backend for the math; ``importance``:
    ``None`` or (sensitivities, uncertainties), KIF's EMAs, updated in the same pass."""
    _check()
    if len(params) == 0:  # nothing to do (and no tensor for the dispatcher to choose a kernel by)
        return
    lr, lr_tensor = _split_lr(lr)
    op, importance_lists, importance_options = _importance_op("sgd_step_", importance, importance_kind,
                                                              importance_betas)
    op(
        params, grads, momentum_buffers, references, stats, *importance_lists,
        reference_format=reference_format, lr=lr, weight_decay=float(weight_decay),
        momentum=float(momentum), dampening=float(dampening), nesterov=bool(nesterov),
        maximize=bool(maximize), first_step=bool(first_step), lr_tensor=lr_tensor, **importance_options,
    )


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, references, stats, *,
               reference_format: str, lr, beta1: float, beta2: float, eps: float,
               weight_decay: float, decoupled_weight_decay: bool, amsgrad: bool, maximize: bool,
               bias_correction1: float = None, bias_correction2: float = None, device_steps=None,
               importance=None, importance_kind: str = "first", importance_betas=(0.85, 0.85)) -> None:
    """See :mod:`cnl_ext.ops` for the contract and the torch backend for the math.

    Capturable: ``lr`` may be a 0-d float32 tensor on the params' device and ``device_steps`` (one
    0-d float32 tensor per param there, already incremented) replaces the bias corrections.
    ``importance``: as for :func:`sgd_step_`.
    """
    _check()
    if len(params) == 0:
        return
    lr, lr_tensor = _split_lr(lr)
    on_device = device_steps is not None
    op, importance_lists, importance_options = _importance_op("adam_step_", importance, importance_kind,
                                                              importance_betas)
    op(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None, references, stats,
        *importance_lists,
        reference_format=reference_format, lr=lr, beta1=float(beta1), beta2=float(beta2),
        eps=float(eps), weight_decay=float(weight_decay),
        decoupled_weight_decay=bool(decoupled_weight_decay), amsgrad=bool(amsgrad),
        maximize=bool(maximize),
        bias_correction1=None if on_device else float(bias_correction1),
        bias_correction2=None if on_device else float(bias_correction2),
        device_steps=device_steps, lr_tensor=lr_tensor, **importance_options,
    )


def masked_delta_(params, befores, references, stats, *, reference_format: str, inv_lr: float) -> None:
    """The masked write-back of :class:`cnl_ext.CNL` (math: :func:`cnl_ext.ops.torch_backend.masked_delta_`)."""
    _check()
    if len(params) == 0:
        return
    torch.ops.cnl_ext.masked_delta_(params, befores, references, stats, reference_format=reference_format,
                                    inv_lr=float(inv_lr))


def kif_task_vector_fuse_(params, anchors, coefficients, unit_maps) -> None:
    """KIF's fusion pass (math and contract: :func:`cnl_ext.ops.kif_fusion_torch.task_vector_fuse_`)."""
    _check()
    offsets, divs, mods = (list(column) for column in zip(*unit_maps)) if unit_maps else ([], [], [])
    coefficients = coefficients.to(device=params[0].device, dtype=torch.float32).contiguous()
    torch.ops.cnl_ext.kif_task_vector_fuse_(params, anchors, coefficients, offsets, divs, mods)


def kif_recurrent_fuse_(params, anchors, inner_ends, inner_sensitivities, inner_uncertainties, outer_sensitivities,
                        outer_uncertainties, *, delta_in: float, delta_out: float, rule: str,
                        update_anchors: bool) -> None:
    """Recurrent-KIF's fusion pass (math and contract: :func:`cnl_ext.ops.kif_fusion_torch.recurrent_fuse_`)."""
    _check()
    torch.ops.cnl_ext.kif_recurrent_fuse_(params, anchors, inner_ends, inner_sensitivities, inner_uncertainties,
                                          outer_sensitivities, outer_uncertainties, delta_in=float(delta_in),
                                          delta_out=float(delta_out), rule=rule, update_anchors=bool(update_anchors))
