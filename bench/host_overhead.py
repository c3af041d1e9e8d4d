"""Host time of one optimizer step with the kernels left out: where many small tensors cost.

    python bench/host_overhead.py                      # any machine: nothing runs on a device
    python bench/host_overhead.py --tensors 338 4096 --iters 50

Before its one launch per bucket, a step does Python work for every tensor: gather and check the
gradients, bump the step counts, group the tensors, read their addresses for the pointer table.
Here the Triton kernels are replaced by no-ops and each parameter holds a single element, so the
time measured is that host work alone, on the CPU that would drive the GPU. On a GPU the step is
asynchronous: while its host time stays below its device time (Qwen2.5-1.5B: 338 tensors,
~16 ms of HBM traffic on an H100) it is hidden; 4,096 tensors of 4,096 elements move 0.5 GB, about
0.2 ms at HBM speed, so an eager step there is bound by this host time. ``capturable=True`` with a
CUDA graph removes it (``cnl_adamw_fp32_graph`` in bench/optimizer_step.py).

Writes ``<out>/host_overhead.{json,md}`` with the CPU model and the exact command.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import cnl_ext
from cnl_ext.ops import triton_adam, triton_sgd

from bench import harness, report

# name -> (optimizer over the parameters, whether a reference is set)
CASES = {
    "adamw_fp32_reference": (lambda ps: cnl_ext.FusedCNLAdamW(ps, lr=1e-3, weight_decay=0.01, backend="triton"), True),
    "adamw_no_reference": (lambda ps: cnl_ext.FusedCNLAdamW(ps, lr=1e-3, weight_decay=0.01, backend="triton"), False),
    "adamw_capturable": (lambda ps: cnl_ext.FusedCNLAdamW(ps, lr=1e-3, capturable=True, backend="triton"), True),
    "momentum_fp32_reference": (lambda ps: cnl_ext.FusedCNLSGD(ps, lr=1e-3, momentum=0.9, backend="triton"), True),
}


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` and the compile-ahead
    ``kernel.warmup(...)`` (which a step runs before it writes anything) do nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None

    def warmup(self, *args, **kwargs):
        return None


def host_ms_per_step(case: str, tensors: int, warmup: int, iters: int) -> float:
    params = [torch.zeros(1, requires_grad=True) for _ in range(tensors)]
    for p in params:
        p.grad = torch.ones_like(p)
    make_optimizer, with_reference = CASES[case]
    opt = make_optimizer(params)
    if with_reference:
        opt.set_reference([torch.ones_like(p) for p in params])
    with mock.patch.object(triton_adam, "_adam_kernel", _NoLaunch()), \
            mock.patch.object(triton_sgd, "_sgd_kernel", _NoLaunch()):
        times = harness.time_steps(opt.step, torch.device("cpu"), warmup, iters)
    return harness.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", type=int, nargs="+", default=[64, 338, 4096])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the host work is single-threaded Python; keep the timing steady
    try:
        for case in args.cases:
            for n in args.tensors:
                ms = host_ms_per_step(case, n, args.warmup, args.iters)
                rows.append({"case": case, "tensors": n, "ms": ms, "us_per_tensor": ms * 1e3 / n})
    finally:
        torch.set_num_threads(threads)
    env = harness.environment(torch.device("cpu"), harness.command_line("bench/host_overhead.py", argv or sys.argv[1:]))
    lines = [
        "# Host time of one optimizer step (kernels left out)", "",
        f"- command: `{env['command']}`",
        f"- device: {env['device']}, torch {env['torch']}, triton {env['triton']}, Python {env['python']}",
        f"- date (UTC): {env['date']}",
        f"- median of {args.iters} steps after {args.warmup}; one-element parameters, Triton kernels replaced by no-ops",
        "",
        *report.markdown_table(["case", "tensors", "host ms / step", "µs / tensor"],
                               [[f"`{r['case']}`", f"{r['tensors']:,}", f"{r['ms']:.3f}", f"{r['us_per_tensor']:.2f}"]
                                for r in rows]),
    ]
    result = {"setup": env, "rows": rows}
    report.write_outputs(args.out, "host_overhead", result, "\n".join(lines))
    return result


if __name__ == "__main__":
    main()
