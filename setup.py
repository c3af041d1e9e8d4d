"""Build script for cnl_ext.

The package is pure Python (Triton kernels compile at run time). On a machine with a CUDA toolkit
and a CUDA build of torch it also builds the C++/CUDA extension ``cnl_ext._C`` from ``csrc/`` (the
fallback backend, ``cnl_ext.ops.cuda_step``); without them it installs the pure-Python package and
says once why. torch must be importable while building, so install with::

    pip install --no-build-isolation .          # or: python -m build --wheel --no-isolation

Environment:

- ``CNL_EXT_BUILD_CUDA``: unset = build the extension when possible (a failed compile falls back to
  pure Python, with the reason); ``1`` = the extension is required (any obstacle is an error);
  ``0`` = never build it.
- ``TORCH_CUDA_ARCH_LIST``: GPU architectures, default ``8.0;9.0+PTX`` (A100/A800, H100/H200, and
  PTX that newer GPUs compile at load time).
- ``MAX_JOBS``: parallel compile jobs (ninja), as for any torch extension.
- ``CNL_EXT_LOCAL_VERSION``: a local version label for wheels (``cu124.torch2.5`` gives
  ``0.1.0+cu124.torch2.5``); scripts/build_wheels.sh sets it, since the extension is bound to one
  torch and CUDA version.
"""
from __future__ import annotations

import os
import re
import sys

from setuptools import find_packages, setup

DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
CSRC = "csrc"
SOURCES = [f"{CSRC}/cnl_ops.cpp", f"{CSRC}/cnl_sgd.cu", f"{CSRC}/cnl_adam.cu"]
HEADERS = [f"{CSRC}/cnl_common.h", f"{CSRC}/cnl_multi_tensor.cuh"]

_said = set()


def _say(message: str) -> None:
    """Print a build notice once per process (setuptools may run this file's commands repeatedly)."""
    if message not in _said:
        _said.add(message)
        print(f"cnl_ext setup: {message}", file=sys.stderr, flush=True)


def _build_mode() -> str:
    value = os.environ.get("CNL_EXT_BUILD_CUDA", "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("1", "true", "yes", "on"):
        return "force"
    if value in ("0", "false", "no", "off"):
        return "skip"
    raise SystemExit(f"cnl_ext setup: CNL_EXT_BUILD_CUDA must be 0, 1 or unset, got {value!r}")


def _why_no_cuda_build():
    """None when the extension can be built here, otherwise the reason it cannot."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        return (f"torch is not importable while building ({exc}); install torch first and build "
                "with --no-build-isolation (pip) or --no-isolation (python -m build)")
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (a CUDA build of torch is needed)"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)"
    if not os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        return f"CUDA_HOME={cpp_extension.CUDA_HOME} has no bin/nvcc"
    return None


def _cuda_extension():
    """(ext_modules, cmdclass) for the build, after deciding whether to build the extension."""
    mode = _build_mode()
    if mode == "skip":
        _say("CNL_EXT_BUILD_CUDA=0: installing the pure-Python package without cnl_ext._C")
        return [], {}
    reason = _why_no_cuda_build()
    if reason is not None:
        if mode == "force":
            raise SystemExit(f"cnl_ext setup: CNL_EXT_BUILD_CUDA=1 but cnl_ext._C cannot be built: {reason}")
        _say(f"not building the CUDA extension cnl_ext._C: {reason}. Installing the pure-Python "
             "package (Triton and PyTorch backends); set CNL_EXT_BUILD_CUDA=1 to make this an error.")
        return [], {}

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    arch_list = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    _say(f"building cnl_ext._C for TORCH_CUDA_ARCH_LIST={arch_list!r}")
    here = os.path.dirname(os.path.abspath(__file__))
    # A plain token (no quotes, ';' or '+'): torch's ninja build quotes nvcc flags but not the C++
    # ones. "8.0;9.0+PTX" -> 80_90PTX; cnl_ext.ops.cuda_step.build_info() turns it back.
    arch_token = re.sub(r"[^0-9A-Za-z_]", "", arch_list.replace(";", "_").replace(" ", "_")) or "default"
    define = [("CNL_EXT_CUDA_ARCHS", arch_token)]
    extension = CUDAExtension(
        name="cnl_ext._C",
        sources=SOURCES,
        include_dirs=[os.path.join(here, CSRC)],
        define_macros=define,
        depends=HEADERS,
        extra_compile_args={
            "cxx": ["-O3"],
            # No --use_fast_math: the kernels rely on IEEE division and sqrt (they use the _rn
            # intrinsics anyway). -lineinfo costs nothing at run time and helps profilers.
            "nvcc": ["-O3", "-lineinfo"],
        },
    )

    class Build(BuildExtension):
        """BuildExtension (ninja when installed) that explains a failed compile and, unless the
        extension is required, falls back to the pure-Python package."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # compiler errors arrive as several distutils/subprocess types
                if mode == "force":
                    raise SystemExit(f"cnl_ext setup: building {ext.name} failed (CNL_EXT_BUILD_CUDA=1): {exc}") from exc
                _say(f"building {ext.name} failed: {exc}. Installing the pure-Python package without "
                     "it (the compiler output is above); set CNL_EXT_BUILD_CUDA=1 to make this an error.")

    return [extension], {"build_ext": Build.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()
VERSION = "0.1.0"
if os.environ.get("CNL_EXT_LOCAL_VERSION"):
    VERSION += "+" + os.environ["CNL_EXT_LOCAL_VERSION"]

setup(
    name="cnl_ext",
    version=VERSION,
    description="Fused Collaborative Neuron Learning (CNL) optimizers for PyTorch, in Triton",
    packages=find_packages(include=["cnl_ext", "cnl_ext.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "tqdm"],
    extras_require={
        "triton": ["triton>=3.0"],
        "experiments": ["transformers>=4.46", "datasets", "accelerate", "gguf", "matplotlib", "peft", "tqdm"],
        "test": ["triton>=3.0", "transformers>=4.46", "datasets", "accelerate", "gguf", "matplotlib", "peft",
                 "pytest", "pytest-benchmark", "pytest-xdist", "hypothesis"],
    },
    entry_points={"console_scripts": ["cnl-ext=cnl_ext.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
