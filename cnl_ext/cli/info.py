"""``python -m cnl_ext info``: versions, devices, the compiled extension and the usable backends."""
from __future__ import annotations

import os
import platform
import warnings
from pathlib import Path

import torch

from .. import __version__, functional
from ..experiments.outputs import package_versions
from .context import Context

try:
    from ..ops import native_backend
except ImportError as error:  # info never fails: it says why instead
    native_backend, _NATIVE_IMPORT_ERROR = None, error

__all__ = ["cmd_info", "info_lines"]


def cmd_info(ctx: Context) -> None:
    for line in info_lines():
        print(line)


def info_lines() -> list:
    """Versions, devices, the compiled extension and which backends run here (and why not the others)."""
    versions = package_versions()
    cuda = torch.cuda.is_available()
    lines = [f"cnl_ext {__version__} ({Path(__file__).parent})",
             f"python {platform.python_version()}, torch {torch.__version__}, triton {versions['triton'] or 'not installed'}, "
             f"transformers {versions['transformers'] or 'not installed'}, CUDA "
             f"{torch.version.cuda or 'none (CPU-only torch)'}",
             "devices: cpu (" + f"{torch.get_num_threads()} threads)" + (
                 "; " + ", ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count()))
                 if cuda else "; no CUDA device")]
    lines.append(f"native CPU build folder: {_native_folder_line()}")  # before the load, which may wait for a build
    lines.append(f"compiled extension: {_native_build_line()}")
    lines.append(f"CUDA kernels (cnl_ext._C): {_cuda_extension_line()}")
    lines.append("backends (backend=...):")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if cuda else [])
    status = functional.backend_status()
    for name, reason in status.items():
        if reason:
            lines.append(f"  {name:<7} not usable: {reason}")
            continue
        module = functional.load_backend(name)
        usable = [d.type for d in devices if module.capabilities(d).runs("adam_step_")]
        refused = [d.type for d in devices if d.type not in usable]
        why_not = "; ".join(functional.why_unsupported(module, torch.device(d), "adam_step_") for d in refused)
        lines.append(f"  {name:<7} " + (f"usable on {', '.join(usable)}" if usable else "not usable here")
                     + (f" ({why_not})" if refused else ""))
    for alias, target in functional.BACKEND_ALIASES.items():
        lines.append(f"  {alias:<7} an alias of {target!r}")
    chosen = []
    for device in devices:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                chosen.append(f"{device.type} tensors -> {functional.resolve('auto', device, 'adam_step_').NAME}")
        except Exception as error:  # noqa: BLE001 - info never fails
            chosen.append(f"{device.type} tensors: {error}")
    lines.append(f"  auto    {'; '.join(chosen)}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        lines.append("TRITON_INTERPRET=1: Triton kernels run on CPU tensors through the interpreter (slow)")
    return lines


def _native_folder_line() -> str:
    """Where the native CPU kernels are built on first use, and whether a build runs there (and whose)."""
    if native_backend is None:
        return f"unknown ({_NATIVE_IMPORT_ERROR})"
    return native_backend.build_folder_status()


def _native_build_line() -> str:
    """How the compiled extension was built here, or why it is not."""
    if native_backend is None:
        return f"not available ({_NATIVE_IMPORT_ERROR})"
    reason = native_backend.unavailable_reason()
    if reason:
        return f"not available ({reason})"
    info = getattr(native_backend, "build_info", dict)()
    return "built (" + ", ".join(f"{key} {value}" for key, value in info.items()) + ")"


def _cuda_extension_line() -> str:
    """The CUDA release and GPU architectures cnl_ext._C was built for and whether it runs here, or why
    it is not loaded (after _native_build_line(), which loaded the libraries)."""
    if native_backend is None:
        return f"not loaded ({_NATIVE_IMPORT_ERROR})"
    try:
        not_loaded = native_backend.cuda_library_reason()
    except Exception as error:  # noqa: BLE001 - info never fails
        return f"not loaded ({error})"
    if not_loaded:
        return f"not loaded ({not_loaded})"
    info = native_backend.build_info()
    usable = native_backend.cuda_device_reason()
    return (f"built for CUDA {info['cuda_runtime']}, architectures {info['cuda_arch_list']}; "
            + (f"not usable here: {usable}" if usable else "usable here"))


