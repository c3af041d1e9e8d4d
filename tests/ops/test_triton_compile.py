"""Every Triton kernel specialization compiles for sm_80 and sm_90, on a machine without a GPU.

The interpreter tests (test_kernels.py) check the math but never run Triton's compiler, so a kernel
can pass them and fail to compile on a GPU. Here the specializations the host code launches (dtypes,
reference formats, options, alignment) are harvested and compiled to cubins with Triton's bundled
ptxas by cnl_ext/testing/triton_compile.py. Beyond compiling, each must keep its values in registers (no
more than a call's worth of spills) and, when all its tensors are 16-byte aligned, move its full
blocks with vector loads and stores: the access width that memory bandwidth needs.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from cnl_ext.testing import triton_compile

ROOT = Path(__file__).resolve().parents[2]


def test_every_option_is_harvested():
    names = {s.name for s in triton_compile.specializations()}
    for kernel in ("sgd", "adam", "masked_delta"):
        assert any(n.startswith(kernel + " ") and n.endswith("unaligned") for n in names)
        for ref in ("fp32", "bf16", "int8", "sign2") if kernel == "masked_delta" else ("none", "fp32", "bf16", "int8", "sign2"):
            for p in ("fp32", "bf16", "fp16", "fp64"):
                assert any(n.startswith(f"{kernel} p={p} ref={ref}") for n in names), (kernel, p, ref)
    flags = set(" ".join(names).split())
    assert {"has_momentum", "first_step", "nesterov", "maximize", "amsgrad", "decoupled", "weight_decay",
            "stats", "lr_on_device", "step_on_device"} <= flags


def test_every_kernel_compiles_without_spills_and_vectorizes_when_aligned(tmp_path):
    # The interpreter that conftest turns on replaces the compiler: compile in a process without it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "cnl_ext.testing.triton_compile"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]  # a kernel that does not compile: Triton's error
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(rows) == len(triton_compile.specializations())
    # A few registers may be saved around the call to IEEE division's slow path (ptxas for sm_80 does,
    # for some Adam variants: 8 to 48 bytes, stored only when that path runs); a block too large for
    # the register file would spill kilobytes.
    max_spill_bytes = 64
    failures = []
    for row in rows:
        for arch in triton_compile.ARCHS:
            r = row[f"sm_{arch}"]
            vectorized = r["vector_loads"] > 0 and r["vector_stores"] > 0
            unvectorized = r["vector_loads"] == 0 and r["vector_stores"] == 0  # unaligned vectors would fault
            spilled = (r["spill_bytes"] or 0) > max_spill_bytes  # None: this Triton gives no ptxas log
            if spilled or not (vectorized if row["aligned"] else unvectorized):
                failures.append(f"{row['kernel']} sm_{arch}: {r}")
    assert not failures, "\n".join(failures)
