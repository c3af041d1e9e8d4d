"""How the native CPU kernels (``csrc/cpu/``) are compiled: sources, flags, instruction sets.

One source of truth for the two build paths: ``setup.py`` (ahead of time, every variant, loaded as
a file since torch may not be importable there) and :mod:`cnl_ext.ops.native_backend` (on first
use with ``torch.utils.cpp_extension.load``, the one variant this CPU runs). Imports nothing but
the standard library.

The kernel sources are compiled once per instruction set with ATen's ``CPU_CAPABILITY`` macros,
as torch's own build compiles its kernels: ``at::vec::Vectorized`` then picks that set's
implementation, in that set's namespace. Each variant is its own shared library (a Python module
that registers the ops), and a process loads exactly one, so no function compiled for one
instruction set can be linked into code that runs on a CPU without it.
"""
from __future__ import annotations

import os
import platform

# Best first. Flags as torch's build uses them for its AVX2 / AVX512 kernels.
CPU_CAPABILITIES = ("AVX512", "AVX2", "DEFAULT")
ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "DEFAULT": [],
}
# No FMA contraction (gcc contracts a*b+c by default once -mfma is on): every backend rounds like
# the PyTorch backend's separate operations.
# -g0: Python's CFLAGS add -g (a 10x larger wheel); -fopenmp: at::parallel_for is inlined from ATen's
# headers and runs on one thread without it
COMMON_FLAGS = ["-O3", "-ffp-contract=off", "-g0", "-fopenmp"]

# relative to the csrc directory
CPU_SOURCES = ("cpu/cnl_cpu_ops.cpp", "cpu/cnl_cpu_kernels.cpp", "cpu/cnl_cpu_kif.cpp")
CPU_HEADERS = ("cnl_types.h", "cnl_binding.h", "cpu/cnl_cpu_kernels.h", "cpu/cnl_cpu_vec.h")
ENV_CAPABILITY = "CNL_EXT_CPU_CAPABILITY"  # DEFAULT | AVX2 | AVX512: use a lower variant than the CPU allows


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def variants() -> tuple:
    """The instruction sets to build on this architecture (only the baseline off x86)."""
    return CPU_CAPABILITIES if is_x86() else ("DEFAULT",)


def compile_flags(capability: str) -> list:
    """Compiler flags of one variant."""
    if capability not in ISA_FLAGS:
        raise ValueError(f"unknown CPU capability {capability!r}; expected one of {CPU_CAPABILITIES}")
    flags = ISA_FLAGS[capability] if is_x86() else []
    return [*COMMON_FLAGS, *flags, f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]


def prebuilt_module(capability: str) -> str:
    """The module that setup.py builds for one variant."""
    return f"cnl_ext._cpu_{capability.lower()}"


def jit_module(capability: str) -> str:
    """The name of the variant that torch.utils.cpp_extension.load builds (a top-level module)."""
    return f"cnl_ext_cpu_{capability.lower()}"


def csrc_dir(package_dir: str):
    """The csrc directory: shipped in the package (``cnl_ext/_csrc``, wheels and non-editable
    installs) or next to it (a source checkout, editable installs); None if neither exists."""
    for candidate in (os.path.join(package_dir, "_csrc"), os.path.join(os.path.dirname(package_dir), "csrc")):
        if all(os.path.isfile(os.path.join(candidate, f)) for f in CPU_SOURCES + CPU_HEADERS):
            return candidate
    return None
