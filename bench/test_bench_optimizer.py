"""pytest-benchmark version of ``bench/optimizer_step.py``: every case on one GPU, in one run.

    pytest bench/test_bench_optimizer.py --benchmark-group-by=param:param_set
    CNL_BENCH_PARAMS=smollm2-135m CNL_BENCH_ITERS=50 pytest bench/test_bench_optimizer.py

Skipped without CUDA. Each step is timed in pedantic mode with a ``torch.cuda.synchronize`` inside
the timed call; ``extra_info`` carries the roofline numbers. The last test evaluates the issue's
targets on what ran (printed with ``-s`` and written to ``<out>/<gpu-name>-pytest.md``; never
asserted: a benchmark reports, it does not fail).

Environment: CNL_BENCH_PARAMS (comma-separated parameter sets, default
``qwen2.5-1.5b,many-small``), CNL_BENCH_CASES (default all), CNL_BENCH_BACKEND (default triton),
CNL_BENCH_WARMUP (5), CNL_BENCH_ITERS (20), CNL_BENCH_OUT (bench/results).
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest
import torch

from bench import cases, harness, report
from bench.shapes import param_shapes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PARAM_SETS = os.environ.get("CNL_BENCH_PARAMS", "qwen2.5-1.5b,many-small").split(",")
CASE_NAMES = os.environ["CNL_BENCH_CASES"].split(",") if os.environ.get("CNL_BENCH_CASES") else None
BACKEND = os.environ.get("CNL_BENCH_BACKEND", "triton")
WARMUP = int(os.environ.get("CNL_BENCH_WARMUP", "5"))
ITERS = int(os.environ.get("CNL_BENCH_ITERS", "20"))
OUT = Path(os.environ.get("CNL_BENCH_OUT", "bench/results"))

DEVICE = harness.resolve_device("cuda") if torch.cuda.is_available() else None
SELECTED = cases.select_cases(CASE_NAMES, DEVICE)
ROWS: dict[str, list[tuple[cases.Case, dict]]] = {name: [] for name in PARAM_SETS}  # filled as cases run


@pytest.fixture(scope="module")
def copy_bandwidth():
    return harness.measure_copy_bandwidth(DEVICE, 2 * 2**30, WARMUP, ITERS)


@pytest.mark.parametrize("case", SELECTED, ids=[case.name for case in SELECTED])
@pytest.mark.parametrize("param_set", PARAM_SETS)
def test_step(benchmark, param_set, case, copy_bandwidth):
    benchmark.group = param_set

    def pedantic(step):
        if benchmark.disabled:  # --benchmark-disable: still time it, with CUDA events
            return harness.time_steps(step, DEVICE, WARMUP, ITERS)

        def synchronized_step():
            step()
            torch.cuda.synchronize(DEVICE)

        benchmark.pedantic(synchronized_step, rounds=ITERS, warmup_rounds=WARMUP, iterations=1)
        return [seconds * 1e3 for seconds in benchmark.stats.stats.data]

    row = cases.run_case(case, param_shapes(param_set), DEVICE, BACKEND, WARMUP, ITERS, copy_bandwidth, timer=pedantic)
    benchmark.extra_info.update({key: row[key] for key in (
        "roofline_bytes", "bytes_per_element", "roofline_ms", "gb_per_s", "fraction_of_roofline",
        "peak_memory_bytes")})
    benchmark.extra_info["copy_bandwidth_gb_per_s"] = copy_bandwidth / 1e9
    ROWS[param_set].append((case, row))


def test_targets_report(copy_bandwidth):
    """Runs after the benchmarks (pytest keeps file order): the issue's targets on what ran."""
    settings = [f"{key}={shlex.quote(value)}" for key, value in sorted(os.environ.items()) if key.startswith("CNL_BENCH_")]
    env = harness.environment(DEVICE, " ".join([*settings, "pytest", *map(shlex.quote, sys.argv[1:])]))
    lines = [f"# Optimizer step benchmark (pytest-benchmark): {env['device']}", ""]
    lines += report.environment_lines(env)
    lines += [f"- backend `{BACKEND}`, copy bandwidth {copy_bandwidth / 1e9:,.0f} GB/s, "
              f"median of {ITERS} steps after {WARMUP} warmup steps", ""]
    for param_set, ran in ROWS.items():
        if not ran:
            continue
        ran_cases, rows = [case for case, _ in ran], [row for _, row in ran]
        cases.add_comparisons(rows, ran_cases, param_set)
        lines += [f"## {param_set}", ""] + report.step_rows_markdown(rows) + [""]
        lines += report.targets_markdown(rows) + [""]
    text = "\n".join(lines)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{harness.file_stem(DEVICE)}-pytest.md").write_text(text + "\n")
    print(text)
