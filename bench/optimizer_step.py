"""Time one optimizer step, case by case, against the memory roofline (issue 3).

    python bench/optimizer_step.py                      # on the GPU: Qwen2.5-1.5B and many-small
    python bench/optimizer_step.py --device cpu --params tiny --iters 3   # smoke run

Measures the device copy bandwidth first, then every case of ``bench/cases.py`` on each parameter
set, side by side in one process, then a sweep over the size of one tensor. Writes
``<out>/<gpu-name>.json``, ``.md`` and ``.png``; prints the Markdown.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``tests`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from bench import cases, harness, report
from bench.shapes import PARAM_SETS, param_shapes, total_numel

SWEEP_CASES = (cases.BASELINE, "cnl_adamw_fp32")
GPU_SWEEP = [round(10 ** (k / 2)) for k in range(10, 19)]  # 1e5, 3.2e5, ..., 1e9
CPU_SWEEP = [10**3, 10**4, 10**5, 10**6]  # a 1e9-element AdamW step does not fit a small host


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (the GPU if any), cuda, cuda:N or cpu")
    parser.add_argument("--params", nargs="+", choices=sorted(PARAM_SETS), default=["qwen2.5-1.5b", "many-small"],
                        help="parameter set(s); the 4,096-vs-one-tensor target is checked on many-small")
    parser.add_argument("--cases", default=None,
                        help=f"comma-separated case names (default all): {', '.join(cases.CASE_NAMES)}; "
                             f"NAME{cases.CUDA_SUFFIX} for the CUDA extension (added by default when available)")
    parser.add_argument("--backend", choices=["auto", "triton", "torch", "cuda"], default=None,
                        help="backend of the cnl_ext cases (default: triton on a GPU, torch on the CPU)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")
    parser.add_argument("--iters", type=int, default=20, help="timed steps; the median is reported")
    parser.add_argument("--copy-mib", type=int, default=None,
                        help="size of the bandwidth-test copy (default 2048 MiB on a GPU, 64 MiB on the CPU)")
    parser.add_argument("--sweep-sizes", type=int, nargs="*", default=None,
                        help="elements of the one-tensor sweep (default 1e5..1e9 on a GPU); none to skip it")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="output directory")
    return parser.parse_args(argv)


def run_param_set(name: str, selected, device, backend, args, copy_bandwidth) -> dict:
    shapes = param_shapes(name)
    rows, ok_cases = [], []
    for case in tqdm(selected, desc=name, unit="case"):
        try:
            row = cases.run_case(case, shapes, device, backend, args.warmup, args.iters, copy_bandwidth)
        except Exception as exc:  # noqa: BLE001 - one broken case must not cost the GPU run of the others
            traceback.print_exc()
            rows.append({"case": case.name, "description": case.description, "error": f"{type(exc).__name__}: {exc}"})
            harness.free_memory(device)
            continue
        rows.append(row)
        ok_cases.append(case)
    timed = [row for row in rows if "error" not in row]
    cases.add_comparisons(timed, ok_cases, name)
    return {"tensors": len(shapes), "numel": total_numel(shapes), "rows": rows}


def run_sweep(sizes, device, backend, args, copy_bandwidth) -> dict:
    by_name = {case.name: case for case in cases.CASES}
    sweep = {"sizes": sizes, "cases": {}}
    for name in SWEEP_CASES:
        sweep["cases"][name] = {"label": by_name[name].description, "ms": [], "roofline_ms": [],
                                "bytes_per_element": None}
    for size in tqdm(sizes, desc="sweep", unit="size"):
        shapes = [("sweep", (size,))]
        for name in SWEEP_CASES:
            case, series = by_name[name], sweep["cases"][name]
            series["bytes_per_element"] = cases.roofline_bytes(case, shapes) / size
            series["roofline_ms"].append(cases.roofline_bytes(case, shapes) / copy_bandwidth * 1e3)
            try:
                row = cases.run_case(case, shapes, device, backend, args.warmup, args.iters, copy_bandwidth)
            except Exception:  # noqa: BLE001 - e.g. out of memory at 1e9: keep the other points
                traceback.print_exc()
                harness.free_memory(device)
                series["ms"].append(None)
                continue
            series["ms"].append(row["ms"])
    return sweep


def markdown(result: dict) -> str:
    env, setup = result["environment"], result["setup"]
    lines = [f"# Optimizer step benchmark: {env['device']}", ""]
    lines += report.environment_lines(env)
    lines += [
        f"- backend of the cnl_ext cases: `{setup['backend']}`",
        f"- device copy bandwidth: {setup['copy_bandwidth_gb_per_s']:,.0f} GB/s "
        f"(copy of {setup['copy_mib']} MiB, bytes read + written)",
        f"- median of {setup['iters']} steps after {setup['warmup']} warmup steps, lr {cases.LR:g}, "
        f"nothing restored between steps",
        "- roofline ms = bytes the step must move / copy bandwidth; GB/s = those bytes / measured time; "
        "peak memory = the case's allocation above what was allocated before it (GPU only)",
        "",
    ]
    for name, param_set in result["param_sets"].items():
        timed = [row for row in param_set["rows"] if "error" not in row]
        lines += [f"## {name}: {param_set['tensors']:,} tensors, {param_set['numel']:,} elements", ""]
        lines += report.step_rows_markdown(timed)
        for row in param_set["rows"]:
            if "error" in row:
                lines.append(f"\n**`{row['case']}` failed**: {row['error']}")
        lines += ["", f"### Targets ({name})", ""]
        lines += report.targets_markdown(timed)
        lines.append("")
    if result["sweep"]:
        lines += ["## Sweep: one fp32 tensor of N elements", ""]
        lines += report.sweep_markdown(result["sweep"])
        lines += ["", f"![time against elements]({result['plot']})", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = harness.resolve_device(args.device)
    on_gpu = device.type == "cuda"
    backend = args.backend or ("triton" if on_gpu else "torch")
    copy_mib = args.copy_mib or (2048 if on_gpu else 64)
    sweep_sizes = args.sweep_sizes if args.sweep_sizes is not None else (GPU_SWEEP if on_gpu else CPU_SWEEP)
    selected = cases.select_cases(args.cases.split(",") if args.cases else None, device)
    if on_gpu:
        torch.cuda.set_device(device)

    env = harness.environment(device, harness.command_line("bench/optimizer_step.py", argv))
    copy_bandwidth = harness.measure_copy_bandwidth(device, copy_mib * 2**20, args.warmup, args.iters)
    print(f"{env['device']}: copy bandwidth {copy_bandwidth / 1e9:,.0f} GB/s", file=sys.stderr)

    result = {
        "environment": env,
        "setup": {"backend": backend, "warmup": args.warmup, "iters": args.iters, "lr": cases.LR,
                  "copy_mib": copy_mib, "copy_bandwidth_gb_per_s": copy_bandwidth / 1e9},
        "param_sets": {name: run_param_set(name, selected, device, backend, args, copy_bandwidth)
                       for name in args.params},
        "sweep": run_sweep(sweep_sizes, device, backend, args, copy_bandwidth) if sweep_sizes else None,
        "plot": None,
    }
    stem = harness.file_stem(device)
    if result["sweep"]:
        result["plot"] = f"{stem}.png"
        report.plot_sweep(args.out / result["plot"], result["sweep"], f"AdamW step time, {env['device']}")
    report.write_outputs(args.out, stem, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
