"""Readable outputs of a run: ``summary.csv``, ``results.json``, ``tables.md`` and ``curves.png``."""
from __future__ import annotations

import csv
import json
from pathlib import Path

__all__ = ["count_percent", "results_table", "write_run_outputs", "write_json", "plot_curves"]

SUMMARY_COLUMNS = ["run", "optimizer", "method", "lr", "epoch", "train_loss", "learned", "learned_pct",
                   "forgot", "forgot_pct", "collaborative_share", "wall_s"]


def count_percent(count: int, total: int) -> str:
    """The paper's cell format, e.g. ``"638 (41.0%)"``."""
    return f"{count} ({100.0 * count / total:.1f}%)" if total else f"{count} (n/a)"


def _pct(count, total):
    return round(100.0 * count / total, 2) if total else None


def results_table(runs, title: str) -> str:
    """A Markdown table shaped like the paper's: LEARNED / FORGOT per optimizer and method."""
    if not runs:
        raise ValueError("no runs to tabulate")
    first = runs[0]
    lines = [f"### {title}", "",
             f"Injection set: {first.n_injection} questions; mastered set: {first.n_mastered} questions; "
             f"after epoch {first.final.epoch}.", "",
             "| Optimizer | Method | LEARNED | FORGOT |", "|---|---|---|---|"]
    for run in runs:
        lines.append(f"| {run.optimizer} | {run.method.upper()} | {count_percent(run.final.learned, run.n_injection)} "
                     f"| {count_percent(run.final.forgot, run.n_mastered)} |")
    return "\n".join(lines) + "\n"


def write_json(path, payload) -> None:
    Path(path).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_summary(path, runs) -> None:
    with open(path, "w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        for run in runs:
            for e in run.epochs:
                writer.writerow(dict(
                    run=run.label, optimizer=run.optimizer, method=run.method, lr=run.lr, epoch=e.epoch,
                    train_loss="" if e.train_loss is None else f"{e.train_loss:.6f}",
                    learned=e.learned, learned_pct=_pct(e.learned, run.n_injection),
                    forgot=e.forgot, forgot_pct=_pct(e.forgot, run.n_mastered),
                    collaborative_share="" if e.collaborative_share is None else f"{e.collaborative_share:.6f}",
                    wall_s=f"{e.wall_s:.1f}"))


def plot_curves(path, runs, title: str) -> None:
    """Learning and forgetting against epochs, one line per run (like the paper's Figure 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (learned_axes, forgot_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for run in runs:
        epochs = [e.epoch for e in run.epochs]
        style = "-" if run.method == "cnl" else "--"
        learned_axes.plot(epochs, [_pct(e.learned, run.n_injection) for e in run.epochs], style, marker="o",
                          markersize=3, label=run.label)
        forgot_axes.plot(epochs, [_pct(e.forgot, run.n_mastered) for e in run.epochs], style, marker="o",
                         markersize=3, label=run.label)
    for axes, name in ((learned_axes, "Learned (% of injection set)"), (forgot_axes, "Forgot (% of mastered set)")):
        axes.set_xlabel("epoch")
        axes.set_ylabel(name)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_run_outputs(out_dir, runs, *, title: str, meta: dict, extra_markdown: str = "") -> str:
    """Write the four outputs of a set of runs into ``out_dir``; returns the Markdown table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_summary(out_dir / "summary.csv", runs)
    write_json(out_dir / "results.json", dict(meta, runs=[run.to_dict() for run in runs]))
    table = results_table(runs, title)
    (out_dir / "tables.md").write_text(table + ("\n" + extra_markdown if extra_markdown else ""), encoding="utf-8")
    plot_curves(out_dir / "curves.png", runs, title)
    return table
