"""bench/stream_floor.c and bench/fusion_vs_plain_c.py run and print what they promise (smoke tests on
small arrays; no speed asserted)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from bench.fusion_vs_plain_c import STREAM_FLOOR as SOURCE, build_stream_floor
from cnl_ext.ops import native_backend


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_stream_floor_compiles_and_reports_every_pass(tmp_path):
    binary = tmp_path / "stream_floor"
    build_stream_floor(binary, "-Wall", "-Wextra", "-Werror")
    result = subprocess.run([str(binary), "4096"], check=True, capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = result.stdout.splitlines()
    assert lines[0] == "4096 elements per array, 1 threads, median of 7 rounds after 1"
    tables = [[line.split("|")[1:-1] for line in table.splitlines() if "---" not in line][1:]
              for table in result.stdout.split("\n\n")[1:]]
    rows, pairs = tables
    assert [r[0].strip() for r in rows] == [
        "copy", "task vector (2 in, 1 out)", "nine streams (7 in, 2 out)", "Recurrent-KIF, authors' rule",
        "SGD momentum (3 in, 2 out)", "SGD momentum, fp32 reference (4 in, 2 out)", "AdamW (4 in, 3 out)",
        "AdamW, fp32 reference (5 in, 3 out)", "dot product (2 in, 0 out)"]
    assert [int(r[1]) for r in rows] == [12, 12, 36, 36, 20, 24, 28, 32, 8]
    assert float(rows[0][4]) == 1.0 and all(float(r[3]) > 0 for r in rows)  # GB/s (ms rounds to 0.0 here)
    # each reference pattern against the same without: its bytes ratio, and a median within the range
    assert [(r[0].strip(), r[1].strip()) for r in pairs] == [
        ("SGD momentum, fp32 reference (4 in, 2 out)", "1.20"), ("AdamW, fp32 reference (5 in, 3 out)", "1.14")]
    for r in pairs:
        low, high = map(float, r[3].split("-"))
        assert 0 < low <= float(r[2]) <= high


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_fusion_vs_plain_c_prints_a_line_per_round():
    reason = native_backend.unavailable_reason()
    if reason:
        pytest.skip(f"native backend unavailable: {reason}")
    script = SOURCE.parent / "fusion_vs_plain_c.py"
    result = subprocess.run([sys.executable, str(script), "--rounds", "2", "--numel", "4096", "--threads", "1"],
                            check=True, capture_output=True, text=True, cwd=SOURCE.parents[1])
    rounds = [line for line in result.stdout.splitlines() if line.startswith("round ")]
    assert len(rounds) == 2
    assert all("native: rkif flat" in line and "kif flat" in line and "plain C: copy 1.00x" in line for line in rounds)
