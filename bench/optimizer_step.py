"""Time one optimizer step, case by case, against the memory roofline (issues 3 and 12).

    python bench/optimizer_step.py                      # on the GPU: Qwen2.5-1.5B and many-small
    python bench/optimizer_step.py --device cpu         # on the CPU: SmolLM2-135M, torch and native backends
    python bench/optimizer_step.py --device cpu --params tiny --rounds 1 --iters 3   # smoke run

Every case of ``bench/cases.py`` runs on each parameter set, side by side in one process,
interleaved: each round times a STREAM-style copy and then every case in turn (build, warm up,
time ``--iters`` steps, free), starting one case later than the round before, so that a slow
spell of a shared machine does not land on one case. The table gives each case's median step and
the spread of its round medians. The roofline is the best streaming rate measured: the larger of
the copy and torch fused AdamW's 28 B/element rate. Then a sweep over the size of one tensor.
Writes ``<out>/<device>.json``, ``.md`` and ``.png``; prints the Markdown.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from bench import cases, harness, report
from bench.shapes import PARAM_SETS, param_shapes, total_numel

SWEEP_CASES = (cases.BASELINE, "cnl_adamw_fp32")
GPU_SWEEP = [round(10 ** (k / 2)) for k in range(10, 19)]  # 1e5, 3.2e5, ..., 1e9
CPU_SWEEP = [10**3, 10**4, 10**5, 10**6]  # a 1e9-element AdamW step does not fit a small host
# CPU defaults: the issue-12 parameter set, and the round structure that a +-20% run-to-run spread needs.
CPU_DEFAULTS = {"params": ["smollm2-135m"], "rounds": 5, "warmup": 1, "iters": 3, "copy_mib": 512}
GPU_DEFAULTS = {"params": ["qwen2.5-1.5b", "many-small"], "rounds": 1, "warmup": 5, "iters": 20, "copy_mib": 2048}


def parse_args(argv=None):
    from cnl_ext import functional

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (the GPU if any), cuda, cuda:N or cpu")
    parser.add_argument("--params", nargs="+", choices=sorted(PARAM_SETS), default=None,
                        help="parameter set(s) (default: qwen2.5-1.5b many-small on a GPU, smollm2-135m on the CPU)")
    parser.add_argument("--cases", default=None,
                        help=f"comma-separated case names (default all): {', '.join(cases.CASE_NAMES)}; "
                             f"NAME{cases.VARIANT_SEPARATOR}BACKEND for a cnl_ext case on another backend")
    backends = sorted(set(functional.BACKENDS) | {"native"})  # native: skipped with the reason until it exists
    parser.add_argument("--backend", default=None, type=lambda text: text.split(","),
                        help=f"comma-separated backends of the cnl_ext cases, from {', '.join(backends)}: the "
                             "first names the plain rows, each other one adds NAME@BACKEND rows (default: triton, "
                             "plus the compiled extension when available, on a GPU; torch,native on the CPU)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds over all cases (default 1 on a GPU, 5 on the CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps of each case in each round (5 / 1)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps of each case in each round (20 / 3)")
    parser.add_argument("--copy-mib", type=int, default=None,
                        help="size of the copy bandwidth test (default 2048 MiB on a GPU, 512 MiB on the CPU)")
    parser.add_argument("--sweep-sizes", type=int, nargs="*", default=None,
                        help="elements of the one-tensor sweep (default 1e5..1e9 on a GPU, 1e3..1e6 on the CPU); "
                             "none to skip it")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="output directory")
    parser.add_argument("--tag", default=None,
                        help="appended to the output files' names (<device>-<tag>.md), to keep runs apart")
    args = parser.parse_args(argv)
    if args.backend is not None:
        unknown = [b for b in args.backend if b not in backends]
        if unknown or len(set(args.backend)) != len(args.backend):
            parser.error(f"--backend: {args.backend} must be distinct names from {backends}")
    for name in ("rounds", "iters"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def run_param_set(name: str, selected, device, backend: str, args, pool: cases.TensorPool) -> dict:
    """All cases on one parameter set, ``args.rounds`` rounds, interleaved (module docstring)."""
    shapes = param_shapes(name)
    skipped = {}
    for case in selected:
        case_backend = cases.case_backend(case, backend)
        if case_backend and (reason := harness.backend_unavailable_reason(case_backend, device, cases.case_op(case),
                                                                           case.param_dtype)):
            skipped[case.name] = reason
            print(f"{case.name}: skipped, {reason}", file=sys.stderr)
    active = [case for case in selected if case.name not in skipped]
    times = {case.name: [] for case in active}  # per round, the list of its step times
    peaks, errors, copy_rounds, round_loads = {}, {}, [], []
    for round_index in range(args.rounds):
        if device.type == "cpu":  # a shared machine's other work shows here, round by round
            round_loads.append(harness.cpu_info()["load_average"][0])
        copy, traffic = harness.copy_step(device, args.copy_mib * 2**20)
        copy_ms = harness.median(harness.time_steps(copy, device, args.warmup, args.iters))
        copy_rounds.append(traffic / (copy_ms * 1e-3))
        del copy
        harness.free_memory(device)
        shift = round_index % len(active) if active else 0
        order = active[shift:] + active[:shift]
        for case in tqdm(order, desc=f"{name} round {round_index + 1}/{args.rounds}", unit="case"):
            if case.name in errors:
                continue
            try:
                step_times, peak = cases.time_case(case, shapes, device, backend, args.warmup, args.iters, pool)
            except Exception as exc:  # noqa: BLE001 - one broken case must not cost the run of the others
                traceback.print_exc()
                errors[case.name] = f"{type(exc).__name__}: {exc}"
                harness.free_memory(device)
                continue
            times[case.name].append(step_times)
            peaks[case.name] = max(peaks.get(case.name) or 0, peak) if peak is not None else None
    pool.clear()

    copy_bandwidth = harness.median(copy_rounds)
    baseline = next((case for case in active if case.name == cases.BASELINE and case.name not in errors), None)
    adamw_rate = None
    if baseline is not None:
        adamw_rate = cases.roofline_bytes(baseline, shapes) / (harness.median(sum(times[baseline.name], [])) * 1e-3)
    roofline_bandwidth, roofline_source = harness.roofline(copy_bandwidth, adamw_rate)

    rows, ok_cases = [], []
    for case in selected:
        if case.name in skipped:
            rows.append({"case": case.name, "description": case.description, "skipped": skipped[case.name]})
        elif case.name in errors:
            rows.append({"case": case.name, "description": case.description, "error": errors[case.name]})
        else:
            per_round = times[case.name]
            rows.append(cases.make_row(case, shapes, backend, sum(per_round, []), roofline_bandwidth,
                                       [harness.median(t) for t in per_round], peaks.get(case.name)))
            ok_cases.append(case)
    timed = [row for row in rows if "ms" in row]
    cases.add_comparisons(timed, ok_cases, name, device.type)
    return {
        "tensors": len(shapes), "numel": total_numel(shapes), "rows": rows,
        "copy_bandwidth_gb_per_s": copy_bandwidth / 1e9,
        "copy_round_gb_per_s": [bw / 1e9 for bw in copy_rounds],
        "round_load_average": round_loads or None,
        "fused_adamw_gb_per_s": None if adamw_rate is None else adamw_rate / 1e9,
        "roofline_gb_per_s": roofline_bandwidth / 1e9, "roofline_source": roofline_source,
    }


def run_sweep(sizes, device, backend, args, copy_bandwidth) -> dict:
    by_name = {case.name: case for case in cases.CASES}
    sweep = {"sizes": sizes, "cases": {}}
    for name in SWEEP_CASES:
        sweep["cases"][name] = {"label": by_name[name].description, "ms": [], "roofline_ms": [],
                                "bytes_per_element": None}
    pool = cases.TensorPool(device)
    for size in tqdm(sizes, desc="sweep", unit="size"):
        shapes = [("sweep", (size,))]
        for name in SWEEP_CASES:
            case, series = by_name[name], sweep["cases"][name]
            series["bytes_per_element"] = cases.roofline_bytes(case, shapes) / size
            series["roofline_ms"].append(cases.roofline_bytes(case, shapes) / copy_bandwidth * 1e3)
            try:
                row = cases.run_case(case, shapes, device, backend, args.warmup, args.iters, copy_bandwidth,
                                     pool=pool)
            except Exception:  # noqa: BLE001 - e.g. out of memory at 1e9: keep the other points
                traceback.print_exc()
                harness.free_memory(device)
                series["ms"].append(None)
                continue
            series["ms"].append(row["ms"])
    pool.clear()
    return sweep


def markdown(result: dict) -> str:
    env, setup = result["environment"], result["setup"]
    lines = [f"# Optimizer step benchmark: {env['device']}", ""]
    lines += report.environment_lines(env)
    factor = setup["copy_traffic_factor"]
    lines += [
        f"- backends of the cnl_ext cases: `{'`, `'.join(setup['backends'])}` (rows without `@` use "
        f"`{setup['backends'][0]}`)",
        f"- {setup['rounds']} round(s), interleaved: each round times a copy, then every case in turn "
        f"({setup['warmup']} warmup + {setup['iters']} timed steps each), starting one case later than the "
        f"round before; ms = median of all {setup['rounds'] * setup['iters']} timed steps, spread = lowest and "
        f"highest round median; lr {cases.LR:g}, nothing restored between steps",
        f"- copy bandwidth: a copy of {setup['copy_mib']} MiB of fp32 (STREAM copy), counted as {factor}× its size "
        + ("(read source, write-allocate read of the destination, write)" if factor == 3 else "(read + write)"),
        "- roofline = the best streaming rate measured: the larger of the copy bandwidth and torch fused "
        "AdamW's rate (28 B/element / its median step); roofline ms = the bytes the step must move / that rate; "
        "GB/s = those bytes / measured ms",
        "- × baseline: ms / ms of the torch optimizer of the same family (AdamW fused, Adam fused, SGD fused, "
        "SGD momentum fused, RMSprop)",
        "",
    ]
    for name, param_set in result["param_sets"].items():
        timed = [row for row in param_set["rows"] if "ms" in row]
        lines += [f"## {name}: {param_set['tensors']:,} tensors, {param_set['numel']:,} elements", ""]
        adamw = param_set["fused_adamw_gb_per_s"]
        lines += [
            f"Roofline **{param_set['roofline_gb_per_s']:,.1f} GB/s**, set by **{param_set['roofline_source']}**. "
            f"Copy: {param_set['copy_bandwidth_gb_per_s']:,.1f} GB/s (round medians "
            f"{', '.join(f'{bw:,.1f}' for bw in param_set['copy_round_gb_per_s'])}); torch fused AdamW: "
            f"{report.fmt(adamw, ',.1f')} GB/s."
            + (f" 1-minute load average at the start of each round: "
               f"{', '.join(f'{load:.2f}' for load in param_set['round_load_average'])} (2 CPUs)."
               if param_set.get("round_load_average") else ""), ""]
        lines += report.step_rows_markdown(timed)
        skipped = {}  # reason -> cases, so that one missing backend is one line
        for row in param_set["rows"]:
            if "skipped" in row:
                skipped.setdefault(row["skipped"], []).append(row["case"])
        for reason, names in skipped.items():
            lines.append(f"\n- skipped ({len(names)} cases: `{'`, `'.join(names)}`): {reason}")
        for row in param_set["rows"]:
            if "error" in row:
                lines.append(f"\n**`{row['case']}` failed**: {row['error']}")
        lines += ["", f"### Targets ({name})", ""]
        lines += report.targets_markdown(timed)
        lines.append("")
    if result["sweep"]:
        lines += ["## Sweep: one fp32 tensor of N elements (one round; roofline = copy bandwidth)", ""]
        lines += report.sweep_markdown(result["sweep"])
        lines += ["", f"![time against elements]({result['plot']})", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = harness.resolve_device(args.device)
    on_gpu = device.type == "cuda"
    defaults = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    backends = args.backend or cases.default_backends(device)
    sweep_sizes = args.sweep_sizes if args.sweep_sizes is not None else (GPU_SWEEP if on_gpu else CPU_SWEEP)
    selected = cases.select_cases(args.cases.split(",") if args.cases else None, device, backends)
    if on_gpu:
        torch.cuda.set_device(device)

    env = harness.environment(device, harness.command_line("bench/optimizer_step.py", argv))
    pool = cases.TensorPool(device)
    with harness.frozen_heap():
        param_sets = {name: run_param_set(name, selected, device, backends[0], args, pool) for name in args.params}
        sweep = None
        if sweep_sizes:
            copy_bandwidth = harness.measure_copy_bandwidth(device, args.copy_mib * 2**20, args.warmup, args.iters)
            sweep = run_sweep(sweep_sizes, device, backends[0], args, copy_bandwidth)
    if env["cpu"] is not None:
        env["cpu"]["load_average_after"] = harness.cpu_info()["load_average"]
    result = {
        "environment": env,
        "setup": {"backends": backends, "rounds": args.rounds, "warmup": args.warmup, "iters": args.iters,
                  "lr": cases.LR, "copy_mib": args.copy_mib, "copy_traffic_factor": harness.copy_traffic_factor(device)},
        "param_sets": param_sets,
        "sweep": sweep,
        "plot": None,
    }
    stem = harness.file_stem(device) + (f"-{args.tag}" if args.tag else "")
    if result["sweep"]:
        result["plot"] = f"{stem}.png"
        report.plot_sweep(args.out / result["plot"], result["sweep"], f"AdamW step time, {env['device']}")
    report.write_outputs(args.out, stem, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
