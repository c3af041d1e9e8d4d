"""KIF's native fusion passes next to the same streams in plain C (bench/stream_floor.c), round by round.

    python bench/fusion_vs_plain_c.py                 # 10 rounds on every core
    python bench/fusion_vs_plain_c.py --rounds 3 --numel 1000000 --threads 1

On a shared host the memory bandwidth changes from one minute to the next, so a ratio is only
meaningful against a copy timed at the same moment. Each round times a copy before and after the
native passes (on one flat tensor and on the SmolLM2-135M tensors, the same elements) and runs the
compiled ``stream_floor`` once; it prints one line per round: the copy's GB/s, then each pass's time
over the floor set by the mean of the two copies (the task-vector pass moves 12 B per element,
Recurrent-KIF's 36 B), then plain C's ratios from ``stream_floor`` (its own copy). Rounds whose two
copies differ by more than 5% are marked ``unsteady``. Nothing is written to disk.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make ``bench`` and ``cnl_ext`` importable
    sys.path.insert(0, str(ROOT))

import torch

from bench import importance_fusion
from bench.shapes import param_shapes


STREAM_FLOOR = ROOT / "bench" / "stream_floor.c"
# bench/stream_floor.c's passes with the streams of KIF's fusion passes (it also runs the optimizer steps')
PLAIN_C_PASSES = ("copy", "task vector (2 in, 1 out)", "nine streams (7 in, 2 out)", "Recurrent-KIF, authors' rule")


def build_stream_floor(binary, *flags: str) -> None:
    """Compile bench/stream_floor.c to ``binary`` (its AdamW loops call sqrtf: ``-lm``, and
    ``-fno-math-errno`` lets GCC vectorize them); ``flags``: more of gcc's."""
    subprocess.run(["gcc", "-O3", "-fno-math-errno", "-fopenmp", *flags, str(STREAM_FLOOR), "-o", str(binary), "-lm"],
                   check=True)


def _median_seconds(fn, reps: int = 5) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _passes(shapes):
    """``{"rkif": step, "kif": step}``: the native passes of bench/importance_fusion.py over ``shapes``,
    and the tensors they keep alive."""
    cases = {"rkif": "rkif_fuse_code", "kif": "kif_fuse_tensor"}
    built = {name: importance_fusion.make_case(case, shapes, torch.device("cpu"), "native")
             for name, case in cases.items()}
    return {name: step for name, (step, _) in built.items()}, built


def _plain_c_ratios(binary: str, numel: int, threads: int) -> dict:
    out = subprocess.run([binary, str(numel)], check=True, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS=str(threads))).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    ratios = {r[0].strip(): float(r[4]) for r in rows if len(r) == 5 and r[1].strip().isdigit()}
    return {name: ratios[name] for name in PLAIN_C_PASSES}  # the passes with KIF's streams


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch and OpenMP threads (default: torch's)")
    parser.add_argument("--numel", type=int, default=None,
                        help="elements of the flat tensor and of plain C's arrays (default: SmolLM2-135M's)")
    args = parser.parse_args(argv)
    if shutil.which("gcc") is None:
        raise SystemExit("fusion_vs_plain_c: needs gcc to build bench/stream_floor.c")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    model_shapes = param_shapes("smollm2-135m")
    numel = args.numel or sum(torch.Size(shape).numel() for _, shape in model_shapes)
    with tempfile.TemporaryDirectory() as tmp:
        binary = os.path.join(tmp, "stream_floor")
        build_stream_floor(binary, "-march=native")
        flat, keep_flat = _passes([("flat", (numel,))])
        model, keep_model = _passes(model_shapes) if args.numel is None else ({}, None)
        src, dst = torch.randn(numel), torch.zeros(numel)
        copy = lambda: dst.copy_(src)  # noqa: E731
        print(f"{numel:,} elements, {threads} threads; ratios to the floor of a copy timed around each round")
        for r in range(args.rounds):
            before = _median_seconds(copy)
            times = {f"{name} flat": _median_seconds(step) for name, step in flat.items()}
            times.update({f"{name} model": _median_seconds(step) for name, step in model.items()})
            after = _median_seconds(copy)
            copy_s = (before + after) / 2
            ratios = {name: t / (copy_s * (3 if name.startswith("rkif") else 1)) for name, t in times.items()}
            plain = _plain_c_ratios(binary, numel, threads)
            steady = abs(before - after) <= 0.05 * min(before, after)
            print(f"round {r + 1}: copy {12 * numel / before / 1e9:.0f}/{12 * numel / after / 1e9:.0f} GB/s"
                  f"{'' if steady else ' (unsteady)'} | native: "
                  + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in ratios.items())
                  + " | plain C: " + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in plain.items()), flush=True)


if __name__ == "__main__":
    main()
