"""CPU smoke tests of bench/: the entry points run and write what they promise; the shape tables and
the roofline arithmetic are right. Speed goals are never asserted here (that is the benchmark's job,
on a GPU)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from bench import cases, end_to_end, host_overhead, optimizer_step, shapes


def test_qwen_shape_table_is_the_issues_model_without_allocating():
    table = shapes.param_shapes("qwen2.5-1.5b")
    assert len(table) == 338
    assert shapes.total_numel(table) == 1_543_714_304


def _meta_model_shapes(model_class, config):
    with torch.device("meta"):  # shapes only, no memory
        model = model_class(config)
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def test_shape_tables_match_transformers_models():
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    def config_kwargs(c):
        return {key: c[key] for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")}

    for shape_config in (shapes.QWEN2_5_1_5B, shapes.TINY):
        assert shapes.decoder_shapes(shape_config) == _meta_model_shapes(
            Qwen2ForCausalLM, Qwen2Config(**config_kwargs(shape_config)))
    smollm = shapes.SMOLLM2_135M
    expected = _meta_model_shapes(LlamaForCausalLM, LlamaConfig(**config_kwargs(smollm), head_dim=smollm["head_dim"]))
    assert shapes.param_shapes("smollm2-135m") == expected
    assert shapes.total_numel(expected) == 134_515_008  # the 134.5M of SmolLM2-135M


def test_many_small_and_its_single_tensor_twin():
    table = shapes.param_shapes("many-small")
    assert len(table) == 4096 and {shape for _, shape in table} == {(4096,)}
    assert shapes.flat_shapes(table) == [("flat", (4096 * 4096,))]


# Issue 3's bytes per element: AdamW fp32 28 (+4 fp32 / +2 bf16 / +1 int8 / +0.25 sign2 reference),
# SGD 12, Momentum 20, bf16 parameters with fp32 AdamW states 22, each plus the reference.
EXPECTED_BYTES_PER_ELEMENT = {
    "torch_adamw_fused": 28, "torch_adamw_foreach": 28, "authors_adamw": 32, "cnl_adamw_noref": 28,
    "cnl_adamw_fp32": 32, "cnl_adamw_fp32_flat": 32, "cnl_adamw_fp32_graph": 32, "cnl_adamw_bf16": 30, "cnl_adamw_int8": 29,
    "cnl_adamw_sign2": 28.25, "cnl_adamw_fp32_stats": 32, "cnl_adamw_bf16_params": 22 + 2,
    "cnl_sgd": 12 + 4, "cnl_momentum": 20 + 4, "cnl_adam": 32,
}


def test_roofline_bytes_per_element():
    assert set(EXPECTED_BYTES_PER_ELEMENT) == set(cases.CASE_NAMES)
    table = [("a", (64, 8)), ("b", (12,))]  # numels divisible by 4: no sign2 padding
    for case in cases.CASES:
        assert cases.roofline_bytes(case, table) == EXPECTED_BYTES_PER_ELEMENT[case.name] * 524, case.name


def test_sign2_roofline_counts_the_padding_byte():
    sign2 = next(case for case in cases.CASES if case.name == "cnl_adamw_sign2")
    assert cases.roofline_bytes(sign2, [("a", (5,))]) == 28 * 5 + 2  # 5 signs take 2 bytes


def _row(ms, roofline_ms=1.0):
    return {"ms": ms, "roofline_ms": roofline_ms}


@pytest.mark.parametrize("target, row, measured, passed", [
    (cases.Target("max_time_ratio", 0.95, "base"), _row(9.0), 0.9, True),
    (cases.Target("max_time_ratio", 0.95, "base"), _row(9.6), 0.96, False),
    (cases.Target("min_speedup", 4.5, "base"), _row(2.0), 5.0, True),
    (cases.Target("min_speedup", 4.5, "base"), _row(2.5), 4.0, False),
    (cases.Target("min_roofline", 0.9), _row(1.0, roofline_ms=0.95), 0.95, True),
    (cases.Target("min_roofline", 0.9), _row(1.25, roofline_ms=1.0), 0.8, False),
    (cases.Target("max_roofline_time", 1.05), _row(1.04), 1.04, True),
    (cases.Target("max_roofline_time", 1.05), _row(1.06), 1.06, False),
])
def test_target_evaluation(target, row, measured, passed):
    got_measured, got_passed = target.evaluate(row, {"base": _row(10.0)})
    assert got_measured == pytest.approx(measured) and got_passed is passed


def test_target_against_a_case_that_did_not_run_is_not_applicable():
    assert cases.Target("max_time_ratio", 1.5, "missing").evaluate(_row(1.0), {}) == (None, None)


CPU_CASE_NAMES = [name for name in cases.CASE_NAMES if name != "cnl_adamw_fp32_graph"]  # graphs need a GPU


def test_case_selection():
    assert [c.name for c in cases.select_cases()] == list(cases.CASE_NAMES)  # no @cuda without a GPU
    assert [c.name for c in cases.select_cases(device=torch.device("cpu"))] == CPU_CASE_NAMES
    picked = cases.select_cases(["cnl_sgd", "cnl_adamw_fp32@cuda"], torch.device("cpu"))
    assert [(c.name, c.backend) for c in picked] == [("cnl_adamw_fp32@cuda", "cuda"), ("cnl_sgd", None)]
    assert picked[0].targets == (cases.Target("max_time_ratio", 1.15, "cnl_adamw_fp32"),)
    with pytest.raises(ValueError, match="unknown case"):
        cases.select_cases(["adamw"])


def test_optimizer_step_smoke_run(tmp_path):
    result = optimizer_step.main([
        "--device", "cpu", "--params", "tiny", "--backend", "torch", "--warmup", "0", "--iters", "1",
        "--copy-mib", "4", "--sweep-sizes", "1000", "4000", "--out", str(tmp_path),
    ])
    saved = json.loads((tmp_path / "cpu.json").read_text())
    assert saved["setup"]["backend"] == "torch" == result["setup"]["backend"]
    rows = saved["param_sets"]["tiny"]["rows"]
    assert [row["case"] for row in rows] == CPU_CASE_NAMES
    assert not [row for row in rows if "error" in row]
    for row in rows:
        assert row["tensors"] == (1 if row["case"] == "cnl_adamw_fp32_flat" else 26)
        assert row["numel"] == 90_688 and row["ms"] > 0 and len(row["times_ms"]) == 1
        assert math.isclose(row["fraction_of_copy_bandwidth"], row["roofline_ms"] / row["ms"])
        assert row["peak_memory_bytes"] is None  # no allocator statistics on the CPU
    by_case = {row["case"]: row for row in rows}
    assert by_case[cases.BASELINE]["ratio_to_baseline"] == 1.0
    # many-small only: the 4,096-vs-one-tensor target is not stated for other parameter sets.
    assert [t["target"] for t in by_case["cnl_adamw_fp32"]["targets"]] == [
        "≤ 0.95× torch_adamw_fused", "≥ 4.5× faster than authors_adamw", "≥ 90% of roofline"]
    assert all(t["passed"] in (True, False) for row in rows for t in row["targets"])
    assert saved["sweep"]["sizes"] == [1000, 4000]
    assert set(saved["sweep"]["cases"]) == {"torch_adamw_fused", "cnl_adamw_fp32"}

    markdown = (tmp_path / "cpu.md").read_text()
    assert "python bench/optimizer_step.py --device cpu --params tiny" in markdown
    assert "## tiny: 26 tensors, 90,688 elements" in markdown and "### Targets (tiny)" in markdown
    for name in CPU_CASE_NAMES:
        assert f"| `{name}` |" in markdown
    assert "![time against elements](cpu.png)" in markdown
    assert (tmp_path / "cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_end_to_end_smoke_run(tmp_path):
    end_to_end.main([
        "--device", "cpu", "--config", "tiny", "--layers", "1", "--prompt-tokens", "8", "--mastered", "2",
        "--injection", "2", "--warmup", "0", "--backend", "torch", "--out", str(tmp_path),
    ])
    saved = json.loads((tmp_path / "cpu-end_to_end.json").read_text())
    assert saved["setup"]["layers"] == 1
    assert list(saved["modes"]) == ["ft_fused", "cnl_authors", "cnl_fused"]
    for mode in saved["modes"].values():
        assert mode["epoch_s"] > 0 and mode["optimizer_ms"] > 0
    assert saved["modes"]["ft_fused"]["capture_s"] is None  # plain FT has no reference
    assert len(saved["speedups"]) == 3
    markdown = (tmp_path / "cpu-end_to_end.md").read_text()
    for mode in ("ft_fused", "cnl_authors", "cnl_fused"):
        assert f"| `{mode}` |" in markdown
    assert "CNL epoch speed-up" in markdown


def test_host_overhead_smoke_run(tmp_path):
    from cnl_ext.ops import triton_step

    kernels, threads = (triton_step._adam_kernel, triton_step._sgd_kernel), torch.get_num_threads()
    result = host_overhead.main(["--tensors", "2", "5", "--warmup", "0", "--iters", "1", "--out", str(tmp_path)])
    assert (triton_step._adam_kernel, triton_step._sgd_kernel) == kernels  # the no-op stand-ins are gone
    assert torch.get_num_threads() == threads
    rows = json.loads((tmp_path / "host_overhead.json").read_text())["rows"]
    assert rows == result["rows"]
    assert [(r["case"], r["tensors"]) for r in rows] == [(c, n) for c in host_overhead.CASES for n in (2, 5)]
    assert all(r["ms"] > 0 and math.isclose(r["us_per_tensor"], r["ms"] * 1e3 / r["tensors"]) for r in rows)
    markdown = (tmp_path / "host_overhead.md").read_text()
    assert "python bench/host_overhead.py --tensors 2 5" in markdown and "| `adamw_capturable` | 5 |" in markdown
