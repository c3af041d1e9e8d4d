"""Interleaved A/B timing of cnl_ext's steps against torch's fused step of the same family, for a
noisy shared host: within a round each cnl case and its baseline take turns step by step, a round's
ratio is the median of its pairs' ratios, and the result is the median (and spread) of the rounds'
ratios, so a slow spell of the host slows both sides of a pair alike.

    PYTHONPATH=. python bench/step_ab.py --threads 1 --numel 16e6 --rounds 15
    ATEN_CPU_CAPABILITY=avx2 CNL_EXT_CPU_CAPABILITY=AVX2 PYTHONPATH=. python bench/step_ab.py   # AVX2 on both sides

``--numel N`` steps one flat fp32 tensor of N elements (default: SmolLM2-135M's 272 tensors); a small
N (a few 100,000 elements) keeps the streams in the caches, so the ratios there compare the
instruction mixes rather than the memory traffic.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench import cases
from bench.shapes import param_shapes

DEFAULT_CASES = "cnl_adamw_noref,cnl_adamw_fp32,cnl_adamw_sign2,cnl_momentum"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated cnl_ext cases (bench/cases.py)")
    parser.add_argument("--backend", default="native")
    parser.add_argument("--numel", type=float, default=None, help="one flat tensor of this many elements")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--pairs", type=int, default=3, help="timed (baseline, case) pairs per case per round")
    parser.add_argument("--repeat", type=int, default=1, help="steps per timing (for small --numel)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [("flat", (int(args.numel),))] if args.numel else param_shapes("smollm2-135m")
    by_name = {case.name: case for case in cases.CASES}
    selected = [by_name[name] for name in args.cases.split(",")]
    pool = cases.TensorPool(torch.device("cpu"), max_sets=1)
    steps = {}
    for case in selected:
        for name in (case.baseline, case.name):
            if name not in steps:
                steps[name] = cases.build_step(by_name[name], shapes, torch.device("cpu"), args.backend, pool)
                steps[name]()  # states created, kernels loaded

    def timed(step) -> float:
        start = time.perf_counter()
        for _ in range(args.repeat):
            step()
        return (time.perf_counter() - start) * 1e3 / args.repeat

    ratios = {case.name: [] for case in selected}
    ms = {name: [] for name in steps}
    for _ in range(args.rounds):
        for case in selected:
            base, own = steps[case.baseline], steps[case.name]
            base(), own()  # warm up after the other cases' traffic
            pairs = []
            for _ in range(args.pairs):
                a, b = timed(base), timed(own)
                ms[case.baseline].append(a)
                ms[case.name].append(b)
                pairs.append(b / a)
            ratios[case.name].append(statistics.median(pairs))
    print(f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {torch.get_num_threads()}, {sum(torch.Size(s).numel() for _, s in shapes):,} elements, "
          f"{args.rounds} rounds x {args.pairs} pairs")
    try:
        from cnl_ext.ops import native_backend

        print(f"cnl_ext native kernels: {native_backend.build_info().get('cpu_capability')}")
    except Exception as exc:  # noqa: BLE001 - informational only
        print(f"cnl_ext native kernels: unavailable ({exc})")
    for name, values in ms.items():
        print(f"{name:24s} median {statistics.median(values):9.3f} ms")
    result = {}
    for case in selected:
        values = sorted(ratios[case.name])
        result[case.name] = statistics.median(values)
        print(f"{case.name:24s} x {case.baseline}: median {statistics.median(values):.3f} "
              f"(rounds {values[0]:.3f}-{values[-1]:.3f}, quartiles "
              f"{values[len(values) // 4]:.3f}-{values[(3 * len(values)) // 4]:.3f})")
    return result


if __name__ == "__main__":
    main()
