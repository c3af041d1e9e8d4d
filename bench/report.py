"""Writing benchmark results: JSON (everything), Markdown (tables for people) and the sweep plot."""
from __future__ import annotations

import json
from pathlib import Path


def fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    """A table cell; ``—`` for a value that was not measured (e.g. peak memory on the CPU)."""
    return "—" if value is None else f"{value:{spec}}{suffix}"


def gib(nbytes) -> float | None:
    return None if nbytes is None else nbytes / 2**30


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def verdict(passed) -> str:
    return {True: "pass", False: "miss", None: "n/a"}[passed]


def environment_lines(env: dict) -> list[str]:
    lines = [
        f"- command: `{env['command']}`",
        f"- device: {env['device']}",
        f"- torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, Python {env['python']}",
        f"- cnl_ext CUDA extension available: {'yes' if env['cnl_ext_cuda_extension'] else 'no'}",
        f"- date (UTC): {env['date']}",
    ]
    if env["device_type"] != "cuda":
        lines.append("- **CPU smoke run**: the numbers only show that the benchmark runs; the targets are GPU targets.")
    return lines


def step_rows_markdown(rows: list[dict]) -> list[str]:
    header = ["case", "what", "tensors", "B/elem", "ms", "roofline ms", "GB/s", "% of copy BW",
              "× torch fused AdamW", "peak memory GiB"]
    body = [
        [
            f"`{row['case']}`", row["description"], f"{row['tensors']:,}", f"{row['bytes_per_element']:.2f}",
            f"{row['ms']:.3f}", f"{row['roofline_ms']:.3f}", f"{row['gb_per_s']:,.0f}",
            f"{row['fraction_of_copy_bandwidth']:.1%}", fmt(row["ratio_to_baseline"], ".3f", "×"),
            fmt(gib(row["peak_memory_bytes"])),
        ]
        for row in rows
    ]
    return markdown_table(header, body)


def targets_markdown(rows: list[dict]) -> list[str]:
    body = []
    for row in rows:
        for t in row["targets"]:
            # Ratios and speed-ups read as "1.23×"; roofline fractions as percentages.
            measured = fmt(t["measured"], ".1%") if "%" in t["target"] else fmt(t["measured"], ".3f", "×")
            body.append([f"`{row['case']}`", t["target"], measured, verdict(t["passed"])])
    return markdown_table(["case", "target", "measured", "result"], body)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_outputs(out_dir: Path, stem: str, result: dict, text: str) -> None:
    """``<stem>.json`` (everything) and ``<stem>.md`` (the tables) under ``out_dir``; print the tables."""
    write_json(out_dir / f"{stem}.json", result)
    (out_dir / f"{stem}.md").write_text(text + "\n")
    print(text)


def plot_sweep(path: Path, sweep: dict, title: str) -> None:
    """Log-log time against elements: each swept case and its roofline (dashed, same colour)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on benchmark machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, series in sweep["cases"].items():
        ms = [float("nan") if t is None else t for t in series["ms"]]  # a failed point leaves a gap
        (line,) = ax.loglog(sweep["sizes"], ms, marker="o", label=series["label"])
        ax.loglog(sweep["sizes"], series["roofline_ms"], linestyle="--", color=line.get_color(),
                  label=f"roofline {series['bytes_per_element']:g} B/elem")
    ax.set_xlabel("elements (one fp32 tensor)")
    ax.set_ylabel("ms per step (median)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_markdown(sweep: dict) -> list[str]:
    names = list(sweep["cases"])
    header = ["elements"] + [f"`{n}` ms" for n in names] + [f"`{n}` roofline ms" for n in names]
    body = []
    for i, size in enumerate(sweep["sizes"]):
        body.append([f"{size:,}"] + [fmt(sweep["cases"][n]["ms"][i], ".3f") for n in names]
                    + [f"{sweep['cases'][n]['roofline_ms'][i]:.3f}" for n in names])
    return markdown_table(header, body)
