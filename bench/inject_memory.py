"""Where an ``inject`` run's host memory peaks: the peak RSS of each phase of each run (issue 23).

    PYTHONPATH=. python bench/inject_memory.py --json OUT.json -- inject --mastered M.jsonl --injection I.jsonl \
        --methods ft cnl --optimizers adam --epochs 1 --no-checkpoints --out runs/x --overwrite

Runs the command (``python -m cnl_ext ...`` in this process) with the protocol's steps wrapped:
each run (``run_injection``) and, inside it, each phase (``reference``: the reference pass,
``train``: the training steps, ``eval``: counting Learned / Forgot) gets the exact peak resident
set size of the time it was running. The peak is the kernel's high-water mark (``VmHWM``), read and
reset (``/proc/self/clear_refs``) at every phase change, so nothing between two samples is missed;
Linux only. ``load`` is everything outside the runs (imports, model load, data, and the outputs
written after the last run).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnl_ext.experiments import memory, protocol


class PhasePeaks:
    def __init__(self):
        self.stack = [("load", None)]
        self.peaks = {}  # (run, phase) -> bytes
        self.order = []
        self.mark = memory.Watermark().start()

    def _close_segment(self):
        phase, run = self.stack[-1]
        key = (run or "-", phase)
        if key not in self.peaks:
            self.order.append(key)
        self.peaks[key] = max(self.peaks.get(key, 0), self.mark.peak())
        self.mark.start()

    def wrap(self, module, name, phase):
        original = getattr(module, name)

        def wrapped(*args, **kwargs):
            run = self.stack[-1][1]
            if phase == "run":
                run = f"{kwargs['config'].optimizer}-{kwargs['method']}"
            self._close_segment()
            self.stack.append((phase if phase != "run" else "run (other)", run))
            try:
                return original(*args, **kwargs)
            finally:
                self._close_segment()
                self.stack.pop()

        setattr(module, name, wrapped)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the peaks here")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    peaks = PhasePeaks()
    peaks.wrap(protocol, "run_injection", "run")
    peaks.wrap(protocol, "compute_reference", "reference")
    peaks.wrap(protocol, "_train_epoch", "train")
    peaks.wrap(protocol, "_learned_and_forgot", "eval")
    from cnl_ext.cli import main as cli_main

    started = time.perf_counter()
    status = cli_main(command)
    peaks._close_segment()
    rows = [dict(run=run, phase=phase, peak_rss_bytes=peaks.peaks[(run, phase)]) for run, phase in peaks.order]
    for row in rows:
        print(f"{row['run']:>16} {row['phase']:>12} {row['peak_rss_bytes'] / 2**30:7.2f} GiB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(command=["python -m cnl_ext", *command], phases=rows,
                                             wall_s=round(time.perf_counter() - started, 1)), indent=2) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
