"""bench/stream_floor.c compiles and prints its table (a smoke test on small arrays; no speed asserted)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "bench" / "stream_floor.c"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_stream_floor_compiles_and_reports_every_pass(tmp_path):
    binary = tmp_path / "stream_floor"
    subprocess.run(["gcc", "-O3", "-fopenmp", "-Wall", "-Wextra", "-Werror", str(SOURCE), "-o", str(binary)],
                   check=True, capture_output=True, text=True)
    result = subprocess.run([str(binary), "4096"], check=True, capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = result.stdout.splitlines()
    assert lines[0] == "4096 elements per array, 1 threads, median of 7 rounds after 1"
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert [r[0].strip() for r in rows] == ["copy", "task vector (2 in, 1 out)", "nine streams (7 in, 2 out)",
                                            "Recurrent-KIF, authors' rule"]
    assert [int(r[1]) for r in rows] == [12, 12, 36, 36]
    assert float(rows[0][4]) == 1.0 and all(float(r[2]) > 0 for r in rows)
