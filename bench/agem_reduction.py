"""A-GEM's reduction alone (``cnl_ext.functional.agem_dots``: Σ g·r per tensor, one pass reading g and
r) against the same elements' ``torch.dot`` on two flat tensors and a copy, on SmolLM2-135M's shapes:
how close the reduction comes to what a read-only pass reaches on this device (issue 22's A-GEM target
counts its 8 bytes per element at the copy's rate).

    PYTHONPATH=. python bench/agem_reduction.py [--backend native] [--rounds 3] [--params tiny]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.shapes import PARAM_SETS, param_shapes
from cnl_ext import functional


def median_ms(fn, iters: int = 5) -> float:
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="native")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--params", default="smollm2-135m", choices=sorted(PARAM_SETS))
    args = parser.parse_args(argv)
    shapes = [shape for _, shape in param_shapes(args.params)]
    grads = [torch.randn(shape) for shape in shapes]
    references = [torch.randn(shape) for shape in shapes]
    n = sum(g.numel() for g in grads)
    flat_g, flat_r, target = torch.randn(n), torch.randn(n), torch.empty(n)
    print(f"{len(shapes)} tensors, {n:,} elements, {torch.get_num_threads()} threads, backend {args.backend}")
    result = functional.agem_dots(grads, references, backend=args.backend)
    expected = torch.stack([torch.dot(g.flatten().double(), r.flatten().double()) for g, r in zip(grads, references)])
    if not torch.allclose(result, expected, rtol=1e-4, atol=1e-3):
        raise SystemExit("agem_dots disagrees with torch.dot in float64")
    for _ in range(args.rounds):
        dots = median_ms(lambda: functional.agem_dots(grads, references, backend=args.backend))
        flat = median_ms(lambda: torch.dot(flat_g, flat_r))
        copy = median_ms(lambda: target.copy_(flat_g))
        print(f"agem_dots {dots:.1f} ms ({8 * n / dots / 1e6:.1f} GB/s read) | torch.dot flat {flat:.1f} ms "
              f"({8 * n / flat / 1e6:.1f} GB/s) | copy {copy:.1f} ms ({12 * n / copy / 1e6:.1f} GB/s, read + "
              f"write-allocate + write)")


if __name__ == "__main__":
    main()
