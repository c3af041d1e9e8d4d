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
    return {True: "met", False: "missed", None: "n/a"}[passed]


def environment_lines(env: dict) -> list[str]:
    lines = [
        f"- command: `{env['command']}`",
        f"- device: {env['device']}",
        f"- torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, Python {env['python']}",
        f"- cnl_ext CUDA extension available: {'yes' if env['cnl_ext_cuda_extension'] else 'no'}",
    ]
    if "cnl_ext_auto_backend" in env:
        lines.append(f"- cnl_ext `backend=\"auto\"` runs `{env.get('cnl_ext_auto_backend')}` here")
    if env.get("native_build_info") is not None:
        lines.append(f"- compiled extension `build_info()`: `{env['native_build_info']}`")
    cpu = env.get("cpu")
    if cpu is not None:
        lines += [
            f"- CPU: {cpu['model']}, {cpu['logical_cpus']} logical CPUs, torch uses {cpu['torch_threads']} threads; "
            f"torch's CPU kernels run with instruction set `{cpu['torch_cpu_capability']}` "
            "(`torch.backends.cpu.get_cpu_capability()`)",
            f"- load average (1, 5, 15 min) before: {_load(cpu['load_average'])}"
            + (f", after: {_load(cpu['load_average_after'])}" if cpu.get("load_average_after") else "")
            + " (the machine is shared: other processes' load shows here)",
        ]
    if env.get("git_commit"):
        lines.append(f"- cnl_ext commit: `{env['git_commit']}` ({env.get('cnl_ext_file')})")
    lines.append(f"- date (UTC): {env['date']}")
    return lines


def _load(values) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def step_rows_markdown(rows: list[dict]) -> list[str]:
    """The step table. Rows from one round lack a spread; peak memory only where it was measured (GPU)."""
    with_memory = any(row.get("peak_memory_bytes") is not None for row in rows)
    header = ["case", "what", "tensors", "B/elem", "ms (median)", "spread ms", "roofline ms", "GB/s",
              "% of roofline", "× baseline"] + (["peak memory GiB"] if with_memory else [])
    body = []
    for row in rows:
        spread = row.get("spread_ms")
        ratio = row.get("ratio_to_baseline")
        cells = [
            f"`{row['case']}`", row["description"], f"{row['tensors']:,}", f"{row['bytes_per_element']:.2f}",
            f"{row['ms']:.3f}", "—" if not spread else f"{spread[0]:.3f}–{spread[1]:.3f}",
            f"{row['roofline_ms']:.3f}", f"{row['gb_per_s']:,.1f}", f"{row['fraction_of_roofline']:.1%}",
            "—" if ratio is None else f"{ratio:.3f}× `{row['baseline']}`",
        ]
        if with_memory:
            cells.append(fmt(gib(row["peak_memory_bytes"])))
        body.append(cells)
    return markdown_table(header, body)


def targets_markdown(rows: list[dict]) -> list[str]:
    body = []
    for row in rows:
        for t in row["targets"]:
            # Ratios and speed-ups read as "1.23×"; roofline fractions as percentages.
            measured = fmt(t["measured"], ".1%") if "%" in t["target"] else fmt(t["measured"], ".3f", "×")
            body.append([f"`{row['case']}`", t["target"], str(t.get("issue", "")), measured,
                         verdict(t["passed"])])
    return markdown_table(["case", "target", "issue", "measured", "result"], body)


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
