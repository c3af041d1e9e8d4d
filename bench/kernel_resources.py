"""Compile every Triton kernel specialization for sm_80 and sm_90 without a GPU, and report its resources.

    python bench/kernel_resources.py                   # any machine: Triton's bundled ptxas, no GPU
    python bench/kernel_resources.py --archs 90

The specializations and their compiled resources come from :mod:`cnl_ext.testing.triton_compile`
(registers per thread, spill bytes, stack frame, vector global loads / stores, occupancy): the static
half of a bandwidth profile. The timed half is bench/optimizer_step.py on a GPU.

Writes ``<out>/kernel_resources.{json,md}``. tests/ops/test_triton_compile.py compiles the same set.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from cnl_ext.ops import triton_step
from cnl_ext.testing.triton_compile import ARCHS, compile_rows

from bench import harness, report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter has no compiler to run")

    rows = compile_rows(args.archs)
    env = harness.environment(torch.device("cpu"), harness.command_line("bench/kernel_resources.py", argv or sys.argv[1:]))
    archs = [f"sm_{a}" for a in args.archs]
    per_arch = lambda row, key, f=str: " / ".join("–" if row[a][key] is None else f(row[a][key]) for a in archs)  # noqa: E731
    lines = [
        "# Triton kernels: resources per specialization (compiled ahead of time, no GPU)", "",
        f"- command: `{env['command']}`",
        f"- torch {env['torch']}, triton {env['triton']}; block {triton_step.BLOCK} elements, "
        f"chunk {triton_step.CHUNK}, launch options {triton_step.LAUNCH_OPTIONS}",
        f"- date (UTC): {env['date']}",
        f"- each cell: {' / '.join(archs)}. Occupancy: resident threads per SM that the registers allow, of 2,048. "
        "Vector accesses: 8- or 16-byte global loads / stores in the PTX (full blocks, when all tensors are "
        "16-byte aligned).",
        "",
        *report.markdown_table(
            ["kernel", "registers", "occupancy", "spill bytes", "stack bytes", "vector loads / stores"],
            [[f"`{r['kernel']}`", per_arch(r, "registers"), per_arch(r, "occupancy", lambda x: f"{x:.0%}"),
              per_arch(r, "spill_bytes"), per_arch(r, "stack_bytes"),
              " / ".join(f"{r[a]['vector_loads']}+{r[a]['vector_stores']}" for a in archs)] for r in rows]),
    ]
    result = {"setup": env, "rows": rows}
    report.write_outputs(args.out, "kernel_resources", result, "\n".join(lines))
    return result


if __name__ == "__main__":
    main()
