"""Readable outputs of a run: ``summary.csv``, ``results.json``, ``tables.md`` and ``curves.png``."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from .outputs import atomic_write, write_json, write_text

__all__ = ["count_percent", "markdown_table", "results_table", "write_run_outputs", "write_json", "plot_curves", "curves_figure",
           "pyplot"]

SUMMARY_COLUMNS = ["run", "optimizer", "method", "lr", "epoch", "train_loss", "learned", "learned_pct",
                   "forgot", "forgot_pct", "collaborative_share", "mastered_loss", "predicted_change",
                   "reference_passes", "wall_s"]


def count_percent(count: int, total: int) -> str:
    """The paper's cell format, e.g. ``"638 (41.0%)"``."""
    return f"{count} ({100.0 * count / total:.1f}%)" if total else f"{count} (n/a)"


def _pct(count, total):
    return round(100.0 * count / total, 2) if total else None


def markdown_table(headers, rows, *, align=None) -> str:
    """A Markdown table; ``align``: one of "l", "r", "c" per column (default: left)."""
    headers = [str(h) for h in headers]
    rows = [[str(cell) for cell in row] for row in rows]
    if any(len(row) != len(headers) for row in rows):
        raise ValueError(f"every row needs {len(headers)} cells")
    rule = {"l": "---", "r": "--:", "c": ":-:"}
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join(rule[a] for a in (align or "l" * len(headers))) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def results_table(runs, title: str) -> str:
    """A Markdown table shaped like the paper's: LEARNED / FORGOT per optimizer and method."""
    if not runs:
        raise ValueError("no runs to tabulate")
    first = runs[0]
    header = (f"### {title}\n\nInjection set: {first.n_injection} questions; mastered set: {first.n_mastered} "
              f"questions; after epoch {first.final.epoch}.\n\n")
    return header + markdown_table(
        ["Optimizer", "Method", "LEARNED", "FORGOT"],
        [[run.optimizer, run.method.upper(), count_percent(run.final.learned, run.n_injection),
          count_percent(run.final.forgot, run.n_mastered)] for run in runs])


def _write_summary(path, runs) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for run in runs:
        for e in run.epochs:
            writer.writerow(dict(
                run=run.label, optimizer=run.optimizer, method=run.method, lr=run.lr, epoch=e.epoch,
                train_loss="" if e.train_loss is None else f"{e.train_loss:.6f}",
                learned=e.learned, learned_pct=_pct(e.learned, run.n_injection),
                forgot=e.forgot, forgot_pct=_pct(e.forgot, run.n_mastered),
                collaborative_share="" if e.collaborative_share is None else f"{e.collaborative_share:.6f}",
                mastered_loss="" if e.mastered_loss is None else f"{e.mastered_loss:.6f}",
                predicted_change="" if e.predicted_change is None else f"{e.predicted_change:.6g}",
                reference_passes="" if e.reference_passes is None else e.reference_passes,
                wall_s=f"{e.wall_s:.1f}"))
    write_text(path, text.getvalue())


def pyplot():
    """matplotlib's pyplot drawing into files (Agg). Imported when a figure is drawn, not with the
    module: pyplot takes 0.9 s to import (-X importtime) and most commands draw nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves_figure(runs, title: str):
    """The figure of :func:`plot_curves`: Learned and Forgot (0-100%) against whole epochs."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

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
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        axes.set_ylabel(name)
        axes.set_ylim(-2, 102)  # both panels on the same 0-100% scale
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_curves(path, runs, title: str) -> None:
    """Learning and forgetting against epochs, one line per run (like the paper's Figure 2), as a PNG."""
    plt = pyplot()
    figure = curves_figure(runs, title)
    with atomic_write(path, "wb") as out:
        figure.savefig(out, dpi=120, format="png")
    plt.close(figure)


def write_run_outputs(out_dir, runs, *, title: str, meta: dict, extra_markdown: str = "") -> str:
    """Write the four outputs of a set of runs into ``out_dir``; returns the Markdown table."""
    out_dir = Path(out_dir)
    _write_summary(out_dir / "summary.csv", runs)
    write_json(out_dir / "results.json", dict(meta, runs=[run.to_dict() for run in runs]))
    table = results_table(runs, title)
    write_text(out_dir / "tables.md", table + ("\n" + extra_markdown if extra_markdown else ""))
    plot_curves(out_dir / "curves.png", runs, title)
    return table
