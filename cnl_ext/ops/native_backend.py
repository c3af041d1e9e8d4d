"""The ``"native"`` backend: the compiled C++ extension (CPU kernels in ``csrc/cpu/``, CUDA kernels in
``csrc/*.cu``), as the PyTorch operators ``torch.ops.cnl_ext.sgd_step_``, ``adam_step_`` and
``masked_delta_`` (so they also work inside ``torch.compile``; ``masked_delta_`` on the CPU only), and
KIF's fusion passes ``kif_task_vector_fuse_`` and ``kif_recurrent_fuse_``. A step given ``importance`` (KIF's EMAs)
passes them as the steps' optional ``sensitivities`` / ``uncertainties`` lists, which the kernels
update in the same pass (CPU and CUDA kernels).

Two libraries serve these ops:

- the CPU library, which defines the ops and holds their CPU and Meta kernels. It is compiled once
  per instruction set (see :mod:`cnl_ext.ops.native_build`); the variant for this CPU
  (``torch.backends.cpu.get_cpu_capability()``, or lower with ``CNL_EXT_CPU_CAPABILITY``) comes
  prebuilt with wheels and ``pip install --no-build-isolation .`` (``cnl_ext._cpu_<isa>``), and is
  otherwise compiled on first use with ``torch.utils.cpp_extension.load`` into torch's extension
  cache (one line says so, with its time): one process at a time per build folder, under the lock of
  :mod:`cnl_ext.ops.build_lock`, from copies of the sources in a folder named by their hash. A
  process loads exactly one of them.
- ``cnl_ext._C``, the CUDA kernels, built by setup.py where a CUDA toolkit and a CUDA torch exist.

Importing this module loads and compiles nothing; :func:`unavailable_reason` (or the first op) does.
If the build fails, the backend is unavailable and :func:`unavailable_reason` says why (the caller,
``backend="auto"``, warns once and uses the next backend); with ``CNL_EXT_REQUIRE_NATIVE=1`` (CI) it
raises :class:`NativeBackendRequiredError` instead, which is deliberately not a RuntimeError or
ImportError, so that no fallback logic can swallow it.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import importlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import threading
import time

import torch

from . import build_lock, native_build
from . import contract
from .contract import Capabilities
from .importance import importance_update_

NAME = "native"
OPS = tuple(contract.OPS)  # the names of the ops of torch.ops.cnl_ext
_CUDA_OPS = ("sgd_step_", "adam_step_", "kif_task_vector_fuse_", "kif_recurrent_fuse_")
ENV_REQUIRE = "CNL_EXT_REQUIRE_NATIVE"
_BUILD_LAYOUT = "copied-sources"  # in the build folder's name: no folder of an older layout is reused



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


def _build_plan(capability: str):
    """(module name, flags, {relative path: contents} of the sources and headers, build folder) of the
    first-use build of one CPU variant."""
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    csrc = native_build.csrc_dir(package_dir)
    if csrc is None:
        raise RuntimeError(f"the C++ sources (csrc/) are neither in {package_dir} nor next to it")
    name = native_build.jit_module(capability)
    flags = native_build.compile_flags(capability)
    files = {}
    for relative in native_build.CPU_SOURCES + native_build.CPU_HEADERS:
        with open(os.path.join(csrc, relative), "rb") as f:
            files[relative] = f.read()
    # One build folder per content of the sources and flags, wherever they are: a library found there
    # is current, a changed source never loads a stale build, and two checkouts of the same sources
    # share one build.
    digest = hashlib.sha256("\0".join([_BUILD_LAYOUT, *flags]).encode())
    for relative, contents in files.items():
        digest.update(f"\0{relative}\0".encode() + contents)
    return name, flags, files, os.path.join(_extensions_root(), f"{name}-{digest.hexdigest()[:12]}")


def build_folder_status() -> str:
    """Where this CPU's variant is built on first use, and whether it is built or being built (for
    ``python -m cnl_ext info``); loads nothing."""
    try:
        capability = cpu_capability()
        name, _, _, folder = _build_plan(capability)
    except (ValueError, RuntimeError, OSError) as exc:
        return f"unknown ({exc})"
    built = "built" if os.path.exists(os.path.join(folder, f"{name}.so")) else "not built yet"
    return f"{folder} ({capability}, {built}; build lock: {build_lock.status(folder)})"


def _compile(name: str, flags: list, files: dict, folder: str, capability: str):
    """Build the variant in a folder of its own inside ``folder`` (under the build lock), from copies
    of its sources in ``folder/src``; move the library to ``folder``; return the loaded module."""
    from torch.utils import cpp_extension

    print(f"cnl_ext: compiling the native CPU kernels ({capability}) into {folder} ...", end="",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    src = os.path.join(folder, "src")
    for relative, contents in files.items():  # the same paths whatever the checkout
        target = os.path.join(src, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target + ".tmp", "wb") as f:
            f.write(contents)
        os.replace(target + ".tmp", target)
    for leftover in glob.glob(os.path.join(folder, "build-*")):  # of builds that ended inside (we hold the lock)
        shutil.rmtree(leftover, ignore_errors=True)
    # A folder of its own: a compiler that outlives its killed parent writes nowhere the next build reads
    work = tempfile.mkdtemp(prefix="build-", dir=folder)
    try:
        module = cpp_extension.load(
            name=name, sources=[os.path.join(src, s) for s in native_build.CPU_SOURCES], extra_cflags=flags,
            extra_ldflags=["-fopenmp"], extra_include_paths=[src, os.path.join(src, "cpu")], build_directory=work,
            is_python_module=True, verbose=False,
        )
        library = os.path.join(folder, f"{name}.so")
        os.replace(os.path.join(work, f"{name}.so"), library)  # whole, or not there
        module.__file__ = library  # the file it was loaded from, moved
    except BaseException:
        print(" failed", file=sys.stderr, flush=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f" done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return module


def _jit_build(capability: str):
    """Load the CPU variant from torch's extension cache, compiling it first if it is not there; the module."""
    name, flags, files, folder = _build_plan(capability)
    library = os.path.join(folder, f"{name}.so")
    if not os.path.exists(library):
        os.makedirs(folder, exist_ok=True)
        with build_lock.hold(folder, f"the build of the native CPU kernels ({capability}) in {folder}"):
            if not os.path.exists(library):  # or the process we waited for built it
                return _compile(name, flags, files, folder, capability)
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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
                missing = [op for op in OPS if not hasattr(torch.ops.cnl_ext, op)]
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


@functools.cache  # computed once: CUDA's initialization error does not change
def cuda_device_reason() -> str:
    """Why torch has no CUDA device here, or ``""`` when it has one: a CPU-only torch, or the error of
    CUDA's initialization in a CUDA build of torch (``Found no NVIDIA driver on your system...``)."""
    if torch.cuda.is_available():
        return ""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    try:  # is_available() only counts devices; initializing says why there are none
        torch._C._cuda_init()
    except Exception as exc:  # noqa: BLE001 - a RuntimeError today; any error is the reason
        return f"no CUDA device is visible: {str(exc).strip()}"
    return "no CUDA device is visible (torch.cuda.is_available() is False)"


def cuda_library_reason() -> str:
    """Why ``cnl_ext._C`` is not loaded in this process, or ``""`` when it is (a GPU or not)."""
    state = _load()
    return state["cuda_reason"] if state["cuda"] is None else ""


def cuda_unavailable_reason() -> str:
    """Why the CUDA kernels cannot run here, or ``""`` when they can (nothing compiled without CUDA)."""
    return cuda_device_reason() or cuda_library_reason()


DISPATCH_KEYS = ("CPU", "Meta", "CUDA")


def kernel_table() -> dict:
    """``{op: {dispatch key: whether the dispatcher holds a kernel}}`` for the ops of this backend and
    the keys of :data:`DISPATCH_KEYS`, after loading the libraries (``cnl_ext._C`` too, when built)."""
    _load()
    return {op: {key: hasattr(torch.ops.cnl_ext, op)  # an op no library defined has no kernels
                 and torch._C._dispatch_has_kernel_for_dispatch_key(f"cnl_ext::{op}", key)
                 for key in DISPATCH_KEYS}
            for op in OPS}


def expected_kernels(op: str) -> tuple:
    """The dispatch keys that ``op`` has kernels for in a build with ``cnl_ext._C``: CPU and Meta (the
    CPU library), and CUDA for all but ``masked_delta_`` (CPU only)."""
    return ("CPU", "Meta", "CUDA") if op in _CUDA_OPS else ("CPU", "Meta")


def kernel_mismatches() -> list:
    """How the dispatcher's kernels differ from :func:`expected_kernels` (``[]`` when they agree),
    one line per missing or unexpected kernel; CUDA kernels are expected only with ``cnl_ext._C`` loaded."""
    state = _load()
    if state["cpu"] is None:
        return [f"the CPU library, which defines the ops, is not loaded: {state['cpu_reason']}"]
    cuda_loaded = state["cuda"] is not None
    lines = []
    for op, registered in kernel_table().items():
        expected = [k for k in expected_kernels(op) if k != "CUDA" or cuda_loaded]
        for key, present in registered.items():
            if present and key not in expected:
                lines.append(f"cnl_ext::{op} has an unexpected {key} kernel")
            elif not present and key in expected:
                lines.append(f"cnl_ext::{op} has no {key} kernel")
    return lines


_CPU = Capabilities(frozenset(OPS), float64=True, capturable=True, importance=True)
_CUDA = Capabilities(frozenset(_CUDA_OPS), float64=True, capturable=True, importance=True,
                     importance_with_rules=False,
                     reason="backend 'native' runs masked_delta_ on CPU tensors only (use backend='triton' or "
                            "'torch' for CUDA tensors)")


def capabilities(device) -> Capabilities:
    """Every op on CPU; all but ``masked_delta_`` on CUDA with ``cnl_ext._C``; nothing elsewhere. Both
    step float64 parameters in float64, with float64 states, take capturable arguments and update
    KIF's importance EMAs and apply issue 22's terms (EWC, A-GEM) in the step (on CUDA not both in one
    pass: with the terms the EMAs are updated after the step, ``importance_with_rules=False``); the CPU
    kernels also run A-GEM's reduction ``agem_dot_`` (on CUDA: PyTorch's, :func:`cnl_ext.functional.agem_dots`)."""
    device = torch.device(device)
    if device.type == "cpu":
        return _CPU
    if device.type == "cuda" and importlib.util.find_spec("cnl_ext._C") is not None:
        return _CUDA
    return Capabilities(reason=f"backend 'native' does not run on {device} tensors"
                               + (" (cnl_ext._C is not built)" if device.type == "cuda" else ""))


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


def _importance_keywords(importance, importance_kind, importance_betas) -> dict:
    """The ops' optional importance arguments: none without ``importance`` (the kernels without the
    EMAs), else the EMA lists and options."""
    if importance is None:
        return {}
    sensitivities, uncertainties = importance
    beta1, beta2 = (float(b) for b in importance_betas)
    return dict(sensitivities=sensitivities, uncertainties=uncertainties, importance_kind=importance_kind,
                importance_beta1=beta1, importance_beta2=beta2)


def _rule_keywords(stats, ewc, ewc_lambda, agem_coefficient):
    """``(stats, keywords)``: issue 22's terms as the ops' optional arguments, which the kernels apply in
    the step's pass (A-GEM's ``c`` read once to the host: a device sync for a CUDA tensor ``c``)."""
    keywords = {}
    if ewc is not None and ewc_lambda != 0:
        keywords.update(ewc_fishers=list(ewc[0]), ewc_anchors=list(ewc[1]), ewc_lambda=float(ewc_lambda))
    if agem_coefficient is not None:
        keywords["agem_coefficient"] = float(agem_coefficient)
        stats = None
    return stats, keywords


def _split_importance(params, importance, rule_keywords):
    """``(importance in the step's pass, importance after it)``: the CUDA kernels do not update KIF's EMAs
    in a pass that applies the rule's terms (``Capabilities.importance_with_rules``; registers): there
    :func:`cnl_ext.ops.importance.importance_update_` updates them after the step, from the same inputs."""
    if importance is not None and rule_keywords and params[0].device.type != "cpu":
        return None, importance
    return importance, None


def sgd_step_(params, grads, momentum_buffers, references, stats, *, reference_format: str, lr,
              weight_decay: float, momentum: float, dampening: float, nesterov: bool, maximize: bool,
              first_step: bool, importance=None, importance_kind: str = "first",
              importance_betas=(0.85, 0.85), ewc=None, ewc_lambda=0.0, agem_coefficient=None) -> None:
    """See :mod:`cnl_ext.ops` for the contract and the torch backend for the math; ``importance``:
    ``None`` or (sensitivities, uncertainties), KIF's EMAs, updated in the same pass (on CUDA with the
    rule's terms: right after it, :func:`_split_importance`); ``ewc``,
    ``ewc_lambda``, ``agem_coefficient``: issue 22's terms (:mod:`cnl_ext.ops.rules`), in the same pass."""
    _check()
    if len(params) == 0:  # nothing to do (and no tensor for the dispatcher to choose a kernel by)
        return
    stats, rule_keywords = _rule_keywords(stats, ewc, ewc_lambda, agem_coefficient)
    importance, importance_after = _split_importance(params, importance, rule_keywords)
    lr, lr_tensor = _split_lr(lr)
    torch.ops.cnl_ext.sgd_step_(
        params, grads, momentum_buffers, references, stats,
        reference_format=reference_format, lr=lr, weight_decay=float(weight_decay),
        momentum=float(momentum), dampening=float(dampening), nesterov=bool(nesterov),
        maximize=bool(maximize), first_step=bool(first_step), lr_tensor=lr_tensor,
        **_importance_keywords(importance, importance_kind, importance_betas), **rule_keywords,
    )
    if importance_after is not None:
        importance_update_(params, grads, *importance_after, kind=importance_kind, betas=importance_betas)


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, references, stats, *,
               reference_format: str, lr, beta1: float, beta2: float, eps: float,
               weight_decay: float, decoupled_weight_decay: bool, amsgrad: bool, maximize: bool,
               bias_correction1: float = None, bias_correction2: float = None, device_steps=None,
               importance=None, importance_kind: str = "first", importance_betas=(0.85, 0.85), ewc=None,
               ewc_lambda=0.0, agem_coefficient=None) -> None:
    """See :mod:`cnl_ext.ops` for the contract and the torch backend for the math.

    Capturable: ``lr`` may be a 0-d float32 tensor on the params' device and ``device_steps`` (one
    0-d float32 tensor per param there, already incremented) replaces the bias corrections.
    ``importance`` and the rule's terms: as for :func:`sgd_step_`.
    """
    _check()
    if len(params) == 0:
        return
    stats, rule_keywords = _rule_keywords(stats, ewc, ewc_lambda, agem_coefficient)
    importance, importance_after = _split_importance(params, importance, rule_keywords)
    lr, lr_tensor = _split_lr(lr)
    on_device = device_steps is not None
    torch.ops.cnl_ext.adam_step_(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None, references, stats,
        reference_format=reference_format, lr=lr, beta1=float(beta1), beta2=float(beta2),
        eps=float(eps), weight_decay=float(weight_decay),
        decoupled_weight_decay=bool(decoupled_weight_decay), amsgrad=bool(amsgrad),
        maximize=bool(maximize),
        bias_correction1=None if on_device else float(bias_correction1),
        bias_correction2=None if on_device else float(bias_correction2),
        device_steps=device_steps, lr_tensor=lr_tensor,
        **_importance_keywords(importance, importance_kind, importance_betas), **rule_keywords,
    )
    if importance_after is not None:
        importance_update_(params, grads, *importance_after, kind=importance_kind, betas=importance_betas)


def agem_dot_(grads, references, out, *, reference_format: str) -> None:
    """A-GEM's reduction (math and contract: :func:`cnl_ext.ops.rules.agem_dot_`), CPU tensors: one pass,
    parallel over the work items of all tensors, summed in a fixed order."""
    _check()
    if len(grads) == 0:
        return
    torch.ops.cnl_ext.agem_dot_(grads, references, out, reference_format=reference_format)


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
