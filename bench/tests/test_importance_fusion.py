"""CPU smoke test of bench/importance_fusion.py: it runs every case and writes what it promises.
Speed goals are never asserted here."""
from __future__ import annotations

import json

import pytest
import torch

from bench import importance_fusion
from cnl_ext.ops import native_backend


def test_importance_fusion_bench_smoke(tmp_path):
    result = importance_fusion.main(["--params", "tiny", "--warmup", "0", "--iters", "1", "--copy-mib", "1",
                                     "--out", str(tmp_path)])
    rows = {row["case"]: row for row in result["rows"]}
    assert set(rows) == set(importance_fusion.BYTES_PER_ELEMENT)
    numel = result["setup"]["numel"]
    for case, row in rows.items():
        bandwidth = row["copy_bandwidth_bytes_per_s"]  # measured just before the case
        assert row["ms"] > 0 and bandwidth > 0
        assert abs(row["floor_ms"] - importance_fusion.BYTES_PER_ELEMENT[case] * numel / bandwidth * 1e3) < 1e-9
        assert (row["target"] is None) == (case not in importance_fusion.TARGETED)
    [saved_file] = tmp_path.glob("importance_fusion-cpu*.json")  # the stem names the CPU (bench.harness.file_stem)
    saved = json.loads(saved_file.read_text())
    assert saved["setup"]["backend"] == "torch" and len(saved["rows"]) == len(rows)
    assert "| `rkif_fuse_code` | 36 |" in saved_file.with_suffix(".md").read_text()


def test_importance_fusion_bench_names_a_thread_count_in_its_output(tmp_path):
    threads = torch.get_num_threads()
    try:
        importance_fusion.main(["--params", "tiny", "--cases", "kif_fuse_tensor", "--threads", "1", "--warmup", "0",
                                "--iters", "1", "--copy-mib", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # --threads sets it for the whole process
    [saved_file] = tmp_path.glob("importance_fusion-cpu*.json")
    assert saved_file.stem.endswith("-1thread") and json.loads(saved_file.read_text())["setup"]["threads"] == 1


def test_importance_fusion_bench_runs_the_native_kernels(tmp_path):
    reason = native_backend.unavailable_reason()
    if reason:
        pytest.skip(f"native backend unavailable: {reason}")
    result = importance_fusion.main(["--params", "tiny", "--backend", "native", "--cases", *importance_fusion.TARGETED,
                                     "--warmup", "0", "--iters", "1", "--copy-mib", "1", "--out", str(tmp_path)])
    assert result["setup"]["backend"] == "native"
    assert [row["case"] for row in result["rows"]] == list(importance_fusion.TARGETED)
    [saved_file] = tmp_path.glob("importance_fusion-cpu*.md")
    assert "The `native` backend: the C++ CPU kernels" in saved_file.read_text()
