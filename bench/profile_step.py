"""Where one optimizer step's time goes: torch.profiler's per-operator times over a few steps.

    python bench/profile_step.py --device cpu --case cnl_adamw_fp32 --backend torch
    perf stat -e task-clock,context-switches,cpu-migrations,page-faults \
        python bench/profile_step.py --device cpu --case cnl_adamw_fp32 --backend native

A case of ``bench/cases.py`` (``NAME@BACKEND`` or ``--backend``) is built over a parameter set,
warmed up, then ``--steps`` steps run under ``torch.profiler``. The table lists the operators by
self time (time inside the operator itself, not its callees), with their call count and share of
the profiled steps: the phases of a step in the PyTorch implementation (each ``_foreach_*`` or
elementwise pass over the parameters is one), or the one native kernel call and what surrounds it.
A pass that reads and writes every element costs about ``bytes / roofline`` whatever it computes, so
the count of full passes is what a fused kernel removes. Writes ``<out>/<device>-profile-<case>[-<backend>].{json,md}``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.profiler import ProfilerActivity, profile

from bench import cases, harness, report
from bench.shapes import PARAM_SETS, param_shapes, total_numel


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--case", required=True, help=f"a case name, or NAME@BACKEND: {', '.join(cases.CASE_NAMES)}")
    parser.add_argument("--backend", default="torch", help="backend of a cnl_ext case given without @BACKEND")
    parser.add_argument("--params", choices=sorted(PARAM_SETS), default="smollm2-135m")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="profiled steps")
    parser.add_argument("--top", type=int, default=15, help="operators listed")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = harness.resolve_device(args.device)
    (case,) = cases.select_cases([args.case], device, [args.backend])
    backend = cases.case_backend(case, args.backend)
    if backend and (reason := harness.backend_unavailable_reason(backend, device, cases.case_op(case))):
        raise SystemExit(f"{case.name}: {reason}")
    env = harness.environment(device, harness.command_line("bench/profile_step.py", argv))
    shapes = param_shapes(args.params)
    pool = cases.TensorPool(device)
    step = cases.build_step(case, shapes, device, args.backend, pool)
    for _ in range(args.warmup):
        step()
    harness.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        harness.synchronize(device)
        wall_ms = (time.perf_counter() - start) * 1e3 / args.steps
    averages = prof.key_averages()
    top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
    rows = [{"operator": e.key, "calls_per_step": e.count / args.steps,
             "self_ms_per_step": e.self_cpu_time_total / 1e3 / args.steps} for e in top]
    result = {"environment": env, "case": case.name, "description": case.description, "backend": backend,
              "params": args.params, "numel": total_numel(cases.case_shapes(case, shapes)),
              "roofline_bytes": cases.roofline_bytes(case, shapes), "steps": args.steps,
              "step_ms": wall_ms, "operators": rows}

    lines = [f"# Profile of one step: `{case.name}` ({case.description}), {env['device']}", ""]
    lines += report.environment_lines(env)
    lines += [f"- parameter set `{args.params}`: {result['numel']:,} elements, {case_bytes(result)} the step "
              f"must move; {args.steps} profiled steps after {args.warmup} warmup",
              f"- step time under the profiler: **{wall_ms:,.1f} ms** (the profiler adds a little per operator call)",
              ""]
    body = [[f"`{r['operator']}`", f"{r['calls_per_step']:g}", f"{r['self_ms_per_step']:,.1f}",
             f"{r['self_ms_per_step'] / wall_ms:.1%}"] for r in rows]
    lines += report.markdown_table(["operator", "calls / step", "self ms / step", "share of step"], body)
    text = "\n".join(lines)
    name = case.name.partition(cases.VARIANT_SEPARATOR)[0] + (f"-{backend}" if backend else "")
    report.write_outputs(args.out, f"{harness.file_stem(device)}-profile-{name}", result, text)
    return result


def case_bytes(result: dict) -> str:
    return f"{result['roofline_bytes'] / 1e9:.2f} GB ({result['roofline_bytes'] / result['numel']:g} B/element)"


if __name__ == "__main__":
    main()
