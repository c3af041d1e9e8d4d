"""Merge the runs of several `continual` folders (and, under the same settings, a published results.json)
into one folder of outputs, training nothing: every run is read back and the outputs are written by
continual_report.write_outputs (docs/results.md 2h).

    PYTHONPATH=. python scripts/merge_continual_runs.py --old docs/continual_cpu/results.json \\
        --out docs/continual_cpu_issue22 runs/continual_o1 runs/o2_agem
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnl_ext.experiments.continual import RunRecord
from cnl_ext.experiments.continual_report import write_outputs
from cnl_ext.experiments.continual_setup import ContinualConfig, load_tasks

MODEL_KEYS = {"model", "gguf_file", "dtype", "use_chat_template"}


def saved_runs(folder: Path) -> list:
    """The finished runs of a `continual --out folder`, or of its interrupted staging `.folder.partial`."""
    staging = folder.with_name(f".{folder.name}.partial")
    return [json.loads(p.read_text()) for f in (folder, staging) for p in sorted((f / "runs").glob("*.json"))]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="continual --out folders")
    parser.add_argument("--old", type=Path, required=True, help="a continual results.json (its config and runs)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write (replaced)")
    args = parser.parse_args(argv)
    old = json.loads(args.old.read_text())
    saved = [run for folder in args.folders for run in saved_runs(folder)]
    if not saved:
        parser.error("no finished runs in the given folders")
    settings = saved[0]["settings"]
    if any(s["settings"] != settings for s in saved):
        parser.error("the runs' settings differ")
    differ = {k for k in set(settings) - MODEL_KEYS if old["config"].get(k) != settings[k]}
    records = [] if differ else [RunRecord(**{k: v for k, v in r.items() if k != "metrics"}) for r in old["runs"]]
    records += [RunRecord(**{k: v for k, v in s["run"].items() if k != "metrics"}) for s in saved]
    methods = list(dict.fromkeys(r.method for r in records))
    orders = list(dict.fromkeys(tuple(r.order) for r in records))
    records.sort(key=lambda r: (orders.index(tuple(r.order)), methods.index(r.method)))
    config = ContinualConfig(**{k: v for k, v in old["config"].items() if k in ContinualConfig.__dataclass_fields__
                                and k not in ("methods", "orders")}, methods=methods)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    made = (f"merged by scripts/merge_continual_runs.py from {', '.join(map(str, args.folders))}"
            + ("" if differ else f" and the runs of {args.old}") + "; read back, not rerun")
    write_outputs(args.out, records, settings=dict(config=dict(old["config"], methods=methods,
                                                               orders=[",".join(o) for o in orders]),
                                                   settings_of_merged_runs=settings, made=made),
                  task_sets={0: load_tasks(config, 0)})
    print(f"{len(records)} runs ({'without' if differ else 'with'} {args.old}'s: settings "
          f"{'differ in ' + ', '.join(sorted(differ)) if differ else 'equal'}) -> {args.out}")


if __name__ == "__main__":
    main()
