"""The continual protocol's outputs: the summary and matrix tables, the CSV files, results.json, the
heat maps and the comparison chart (every file written atomically)."""
from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

from .outputs import atomic_write, write_json, write_text
from .report import pyplot

__all__ = ["METRIC_COLUMNS", "format_metric", "summary_table", "matrix_table", "write_outputs", "plot_heatmaps",
           "plot_comparison"]


def format_metric(x, digits=3):
    return "n/a" if x is None else f"{x:+.{digits}f}" if x < 0 else f"{x:.{digits}f}"


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


METRIC_COLUMNS = ("AP", "BWT", "FWT", "FWT_gem", "heldout_AP", "heldout_BWT")


def summary_table(records) -> str:
    """Mean ± standard deviation over runs of each metric, one row per method (Markdown)."""
    methods = list(dict.fromkeys(r.method for r in records))
    lines = ["| method | runs | " + " | ".join(METRIC_COLUMNS) + " | wall s (mean) |",
             "|---|---|" + "---|" * len(METRIC_COLUMNS) + "---|"]
    for method in methods:
        runs = [r for r in records if r.method == method]
        cells = []
        for column in METRIC_COLUMNS:
            mean, std = _mean_std([r.metrics().get(column) for r in runs])
            cells.append("n/a" if mean is None else f"{mean:.3f} ± {std:.3f}")
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) +
                     f" | {statistics.mean(r.wall_s for r in runs):.0f} |")
    return "\n".join(lines) + "\n"


def matrix_table(record) -> str:
    header = "| after \\ task | " + " | ".join(record.order) + " |"
    lines = [header, "|---|" + "---|" * len(record.order),
             "| base | " + " | ".join(f"{x:.3f}" for x in record.base) + " |"]
    for j, row in enumerate(record.matrix):
        lines.append(f"| {record.order[j]} | " + " | ".join(f"{x:.3f}" for x in row) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir, records, *, settings: dict, task_sets: dict) -> None:
    """``matrices.csv``, ``summary.csv``, ``results.json``, ``tables.md``, heat maps and the comparison chart.

    ``settings``: what ``results.json`` records as the configuration (and how it was made).
    """
    out_dir = Path(out_dir)
    matrices = io.StringIO()
    writer = csv.writer(matrices, lineterminator="\n")
    writer.writerow(["seed", "order", "method", "after_task_index", "after_task", "task", "train_accuracy",
                     "heldout_accuracy"])
    for r in records:
        order = ">".join(r.order)
        for i, name in enumerate(r.order):
            writer.writerow([r.seed, order, r.method, 0, "base", name, r.base[i], r.heldout_base[i]])
        for j, (row, held) in enumerate(zip(r.matrix, r.heldout_matrix), start=1):
            for i, name in enumerate(r.order):
                writer.writerow([r.seed, order, r.method, j, r.order[j - 1], name, row[i], held[i]])
    write_text(out_dir / "matrices.csv", matrices.getvalue())
    summary = io.StringIO()
    writer = csv.writer(summary, lineterminator="\n")
    writer.writerow(["seed", "order", "method", *METRIC_COLUMNS, "wall_s"])
    for r in records:
        m = r.metrics()
        writer.writerow([r.seed, ">".join(r.order), r.method, *(m.get(c) for c in METRIC_COLUMNS), round(r.wall_s, 1)])
    write_text(out_dir / "summary.csv", summary.getvalue())
    sizes = {seed: {name: {"train": len(t.train), "heldout": len(t.heldout)} for name, t in tasks.items()}
             for seed, tasks in task_sets.items()}
    write_json(out_dir / "results.json", dict(settings, task_sizes=sizes, runs=[r.to_dict() for r in records]))
    parts = ["## Continual learning: summary", "",
             f"a[j][i] = share of task i's training questions answered correctly after task j; AP, BWT, FWT and "
             f"FWT_gem as in docs/kif-spec.md §5; held-out columns: the same on each task's held-out questions "
             f"(near chance for a small model). Mean ± standard deviation over each method's runs "
             f"(seeds × task orders).", "", summary_table(records), "## Accuracy matrices", ""]
    for r in records:
        parts += [f"### {r.method}, seed {r.seed}, order {' > '.join(r.order)}", "", matrix_table(r)]
        parts += [f"- {r.order[k]}: {text}" for k, text in enumerate(r.notes) if text] + [""]
    write_text(out_dir / "tables.md", "\n".join(parts))
    plot_heatmaps(out_dir, records)
    plot_comparison(out_dir / "comparison.png", records)


def plot_heatmaps(out_dir, records) -> None:
    """``heatmap_<method>.png``: the accuracy matrix of each of the method's runs (base row on top)."""
    plt = pyplot()
    for method in dict.fromkeys(r.method for r in records):
        runs = [r for r in records if r.method == method]
        figure, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs) + 1, 3.4), squeeze=False)
        for ax, r in zip(axes[0], runs):
            data = [r.base] + r.matrix
            image = ax.imshow(data, vmin=0, vmax=1, cmap="viridis")
            k = len(r.order)
            ax.set_xticks(range(k), r.order, rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(k + 1), ["base"] + [f"after {n}" for n in r.order], fontsize=7)
            for j, row in enumerate(data):
                for i, value in enumerate(row):
                    ax.text(i, j, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if value < 0.5 else "black")
            ax.set_title(f"seed {r.seed}: {' > '.join(r.order)}", fontsize=8)
        figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
        figure.suptitle(f"{method}: accuracy on each task's training questions")
        with atomic_write(Path(out_dir) / f"heatmap_{method}.png", "wb") as out:
            figure.savefig(out, format="png", dpi=110, bbox_inches="tight")
        plt.close(figure)


def plot_comparison(path, records) -> None:
    """AP, BWT and FWT per method (mean over runs, standard deviation as error bars)."""
    plt = pyplot()
    methods = list(dict.fromkeys(r.method for r in records))
    metrics = ("AP", "BWT", "FWT")
    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6))
    for ax, metric in zip(axes, metrics):
        stats = [_mean_std([r.metrics()[metric] for r in records if r.method == m]) for m in methods]
        ax.bar(range(len(methods)), [s[0] if s[0] is not None else math.nan for s in stats],
               yerr=[s[1] if s[1] is not None else 0 for s in stats], capsize=3, color="tab:blue")
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=8)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    figure.suptitle("Continual learning: methods compared (mean ± std over seeds and orders)")
    figure.tight_layout()
    with atomic_write(path, "wb") as out:
        figure.savefig(out, format="png", dpi=110)
    plt.close(figure)
