"""Every Triton kernel specialization, compiled for sm_80 and sm_90 without a GPU, and its resources.

The host code decides which specializations exist (parameter dtype, reference format, options,
alignment). They are harvested by running the ops on small CPU tensors with the kernels replaced by
recorders, then compiled ahead of time to cubins. Per specialization :func:`resources` gives what
ptxas allocated (registers per thread, spill bytes, stack frame), the vector (8/16-byte) global loads
and stores in the PTX, and the occupancy the registers allow: the static half of a bandwidth profile.
Any Triton 3.x compiles; ptxas's figures need Triton >= 3.5 (``triton.knobs.nvidia.dump_ptxas_log``)
and are left empty before it.

Compiling needs a process without ``TRITON_INTERPRET=1`` (the interpreter replaces the compiler):

    python -m cnl_ext.testing.triton_compile [--archs 80 90]   # prints the rows as JSON

tests/ops/test_triton_compile.py asserts on the rows; bench/kernel_resources.py reports them.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import os
import re
from dataclasses import dataclass, field
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from cnl_ext import reference_format
from cnl_ext.ops import triton_adam, triton_masked_delta, triton_sgd

ARCHS = (80, 90)  # A100/A800, H100/H200
_KERNELS = ((triton_sgd, "_sgd_kernel"), (triton_adam, "_adam_kernel"), (triton_masked_delta, "_masked_delta_kernel"))
_POINTER_TYPES = {torch.int64: "*i64", torch.int32: "*i32", torch.float32: "*fp32", torch.float64: "*fp64"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")
# Per SM, on both architectures: registers, resident threads, resident blocks.
_SM_REGISTERS, _SM_THREADS, _SM_BLOCKS = 65536, 2048, 32
PTXAS_LOG = hasattr(getattr(triton, "knobs", None) and triton.knobs.nvidia, "dump_ptxas_log")


@dataclass(frozen=True)
class Specialization:
    """One compiled variant of a kernel: its argument types, constexpr values and launch options."""

    kernel: str
    signature: tuple      # (argument name, Triton type) for the runtime arguments
    constexprs: tuple     # (name, value), as the host passed them
    options: tuple        # (name, value): num_warps, enable_fp_fusion, ...
    fn: object = field(compare=False, hash=False, repr=False)

    @property
    def name(self) -> str:
        """Kernel, parameter dtype, reference (none / its dtype / sign2), the flags set, and 'unaligned'."""
        c = dict(self.constexprs)
        ref = ("none", c["R_DTYPE"].name, "sign2")[c["REF_KIND"]]
        flags = [k.lower() for k, v in self.constexprs if v is True and k != "ALIGNED"]
        if not c["ALIGNED"]:
            flags.append("unaligned")
        return " ".join([self.kernel.strip("_").removesuffix("_kernel"), f"p={c['P_DTYPE'].name}", f"ref={ref}", *flags])

    def constexpr(self, name: str):
        return dict(self.constexprs)[name]


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: records the arguments of each ``kernel[grid](...)``."""

    def __init__(self, name: str, fn):
        self.name, self.fn, self.launches = name, fn, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))

    def specializations(self):
        for args, kwargs in self.launches:
            types = []
            for name, value in zip(self.fn.arg_names, args):
                if isinstance(value, torch.Tensor):
                    types.append((name, _POINTER_TYPES[value.dtype]))
                elif isinstance(value, float):
                    types.append((name, "fp32"))
                else:
                    raise TypeError(f"{self.name}: no Triton type for argument {name}={value!r}")
            yield Specialization(
                self.name, tuple(types),
                tuple((k, v) for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS),
                tuple((k, v) for k, v in kwargs.items() if k in _LAUNCH_OPTIONS), self.fn)


def _tensors(dtype, unaligned=False, shapes=((5000,), (7,))):
    """Small CPU tensors; ``unaligned`` puts each one element into a larger buffer."""
    out = []
    for shape in shapes:
        t = torch.randn(shape).to(dtype)
        if unaligned:
            buffer = torch.empty(t.numel() + 1, dtype=dtype)
            buffer[1:].copy_(t.flatten())
            t = buffer[1:].view(shape)
        out.append(t)
    return out


def _launch_ops(dtype, fmt, *, stats=True, unaligned=False, sgd=None, adam=None, capturable=False,
                importance=None):
    """Run the three ops once on CPU tensors (the kernels are recorders, so nothing computes)."""
    params = _tensors(dtype, unaligned)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # KIF's EMAs: float32 always
    states = [_tensors(state_dtype, unaligned) for _ in range(3)] + [_tensors(torch.float32, unaligned) for _ in range(2)]
    tracking = {} if importance is None else dict(importance=(states[3], states[4]), importance_kind=importance)
    refs = None if fmt is None else [reference_format.encode(torch.randn(p.shape), fmt) for p in params]
    st = torch.zeros(len(params), 3, dtype=torch.float64) if stats and fmt is not None else None
    lr = torch.tensor(0.1) if capturable else 0.1
    sgd = dict(dict(weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False, maximize=False, first_step=False),
               **(sgd or {}))
    triton_sgd.sgd_step_(params, params, states[0] if sgd["momentum"] else None, refs, st,
                          reference_format=fmt or "float32", lr=lr, **sgd, **tracking)
    adam = dict(dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True,
                     amsgrad=False, maximize=False), **(adam or {}))
    steps = dict(device_steps=[torch.tensor(1.0) for _ in params]) if capturable else \
        dict(bias_correction1=0.1, bias_correction2=0.001)
    triton_adam.adam_step_(params, params, states[0], states[1], states[2], refs, st,
                           reference_format=fmt or "float32", lr=lr, **adam, **steps, **tracking)
    if fmt is not None:
        triton_masked_delta.masked_delta_(params, params, refs, st, reference_format=fmt, inv_lr=10.0)


def specializations() -> list[Specialization]:
    """Every specialization the host code produces over dtypes, reference formats and options (deduplicated)."""
    recorders = [_Recorder(name, getattr(module, name)) for module, name in _KERNELS]
    with mock.patch.object(triton_sgd, "_sgd_kernel", recorders[0]), \
            mock.patch.object(triton_adam, "_adam_kernel", recorders[1]), \
            mock.patch.object(triton_masked_delta, "_masked_delta_kernel", recorders[2]):
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            for fmt in (None, *reference_format.FORMATS):
                _launch_ops(dtype, fmt)
        for fmt in (None, "float32", "sign2"):
            _launch_ops(torch.float32, fmt, unaligned=True)
        _launch_ops(torch.float32, "float32", stats=False)
        _launch_ops(torch.float32, "float32", capturable=True)
        # float64: computed in float64, its hyper-parameters float64 device scalars
        _launch_ops(torch.float64, "float32", unaligned=True)
        _launch_ops(torch.float64, "float32", capturable=True)
        _launch_ops(torch.float64, "float32", sgd=dict(momentum=0.0, weight_decay=0.01, maximize=True),
                    adam=dict(decoupled_weight_decay=False, weight_decay=0.01, amsgrad=True, maximize=True))
        _launch_ops(torch.float64, "float32", importance="first")
        _launch_ops(torch.float32, "float32", sgd=dict(momentum=0.0, weight_decay=0.01, maximize=True),
                    adam=dict(decoupled_weight_decay=False, weight_decay=0.01, amsgrad=True, maximize=True))
        _launch_ops(torch.float32, "float32", sgd=dict(first_step=True, nesterov=True))
        _launch_ops(torch.float32, "float32", adam=dict(weight_decay=0.0))
        for dtype, kind in ((torch.float32, "first"), (torch.bfloat16, "param_mix")):  # KIF's importance EMAs
            _launch_ops(dtype, None, importance=kind)
            _launch_ops(dtype, "float32", importance=kind)
    return list(dict.fromkeys(s for r in recorders for s in r.specializations()))


def _ast_source(spec: Specialization) -> ASTSource:
    fn, constexprs = spec.fn, dict(spec.constexprs)
    if "constexprs" in inspect.signature(ASTSource).parameters:  # Triton >= 3.3: keyed by argument path
        return ASTSource(fn, dict(spec.signature, **{name: "constexpr" for name in constexprs}),
                         {(fn.arg_names.index(name),): value for name, value in constexprs.items()})
    return ASTSource(fn, dict(spec.signature), constexprs)  # Triton 3.0 to 3.2: keyed by name


def compile_for(spec: Specialization, arch: int):
    """(compiled kernel, ptxas's ``-v`` log or None) for ``sm_<arch>``; raises where it does not compile."""
    build = lambda: triton.compile(_ast_source(spec), target=GPUTarget("cuda", arch, 32),  # noqa: E731
                                   options=dict(spec.options))
    if not PTXAS_LOG:
        return build(), None
    log = io.StringIO()
    with triton.knobs.compilation.scope(), triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        triton.knobs.compilation.always_compile = True  # a cached cubin would come without ptxas's log
        triton.knobs.nvidia.dump_ptxas_log = True
        compiled = build()
    return compiled, log.getvalue()


def resources(compiled, ptxas_log: str | None) -> dict:
    """The vector accesses in the PTX and, given ptxas's log, what it allocated and the occupancy that allows."""
    ptx = compiled.asm["ptx"]
    found = {"vector_loads": len(re.findall(r"\bld\.global(?:\.\w+)*\.v[248]\.", ptx)),
             "vector_stores": len(re.findall(r"\bst\.global(?:\.\w+)*\.v[248]\.", ptx)),
             "registers": None, "spill_bytes": None, "stack_bytes": None, "occupancy": None}
    if ptxas_log is None:
        return found

    def number(pattern):
        match = re.search(pattern, ptxas_log)
        if match is None:
            raise ValueError(f"no {pattern!r} in the ptxas log:\n{ptxas_log}")
        return int(match.group(1))

    registers = number(r"Used (\d+) registers")
    warps = compiled.metadata.num_warps
    regs_per_warp = -(-registers * 32 // 256) * 256  # allocated per warp in units of 256
    blocks = min(_SM_BLOCKS, _SM_THREADS // (32 * warps), _SM_REGISTERS // (regs_per_warp * warps))
    return dict(found, registers=registers,
                spill_bytes=number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads"),
                stack_bytes=number(r"(\d+) bytes stack frame"),  # the call frame of IEEE division's slow path
                occupancy=blocks * 32 * warps / _SM_THREADS)


def compile_rows(archs=ARCHS) -> list[dict]:
    """Per specialization: its name, whether its tensors are aligned, and per ``sm_<arch>`` its :func:`resources`."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter has no compiler to run")
    from tqdm import tqdm

    rows = []
    for spec in tqdm(specializations(), desc="compile", unit="kernel"):
        rows.append({"kernel": spec.name, "aligned": spec.constexpr("ALIGNED"),
                     **{f"sm_{arch}": resources(*compile_for(spec, arch)) for arch in archs}})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", type=int, nargs="+", default=list(ARCHS))
    print(json.dumps(compile_rows(parser.parse_args().archs)))
