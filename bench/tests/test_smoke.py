"""CPU smoke tests of bench/: the entry points run and write what they promise; the shape tables and
the roofline arithmetic are right. Speed goals are never asserted here (that is the benchmark's job)."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from bench import cases, end_to_end, harness, host_overhead, optimizer_step, shapes

CPU = torch.device("cpu")
NATIVE_REASON = harness.backend_unavailable_reason("native", CPU)  # "" once the native backend is built


def test_qwen_shape_table_is_qwen2_5_1_5b_without_allocating():
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
    "torch_adamw_fused": 28, "torch_adamw_foreach": 28, "torch_adam_fused": 28, "torch_sgd_fused": 12,
    "torch_momentum_fused": 20, "torch_rmsprop": 20, "authors_adamw": 32,
    "cnl_adamw_noref": 28, "cnl_adamw_noref_stats": 28, "cnl_adamw_importance": 28 + 16, "cnl_adamw_fp32": 32, "cnl_adamw_fp32_stats": 32,
    "cnl_adamw_fp32_flat": 32, "cnl_adamw_fp32_graph": 32, "cnl_adamw_bf16": 30, "cnl_adamw_int8": 29,
    "cnl_adamw_sign2": 28.25, "cnl_adamw_sign2_stats": 28.25, "cnl_adamw_bf16_params": 22 + 2,
    "cnl_sgd": 12 + 4, "cnl_momentum_noref": 20, "cnl_momentum": 20 + 4, "cnl_adam": 32, "cnl_rmsprop_fp32": 20 + 4,
    # float64 parameters and states: 24 + 32
    "torch_adamw_fused_f64": 56, "cnl_adamw_noref_f64": 56, "cnl_adamw_fp32_f64": 56 + 4,
    # issue 22: EWC reads F and θ*; A-GEM's reduction reads g and r, then the step reads r
    # (A-GEM with g·r ≥ 0: the step runs without r)
    "cnl_adamw_ewc": 28 + 8, "cnl_adamw_agem": 28 + 4 + 8, "cnl_adamw_agem_agreeing": 28 + 8,
}


def test_roofline_bytes_per_element():
    assert set(EXPECTED_BYTES_PER_ELEMENT) == set(cases.CASE_NAMES)
    table = [("a", (64, 8)), ("b", (12,))]  # numels divisible by 4: no sign2 padding
    for case in cases.CASES:
        assert cases.roofline_bytes(case, table) == EXPECTED_BYTES_PER_ELEMENT[case.name] * 524, case.name


@pytest.mark.parametrize("name,projects", [("cnl_adamw_agem", True), ("cnl_adamw_agem_agreeing", False)])
def test_agem_cases_set_the_sign_of_g_dot_r(name, projects):
    """The A-GEM cases fix whether every step projects (g·r < 0) or none does, whatever the pool drew."""
    case = next(case for case in cases.CASES if case.name == name)
    for seed in range(3):
        step = cases.build_step(case, [("a", (64, 8)), ("b", (12,))], torch.device("cpu"), "torch",
                                cases.TensorPool(torch.device("cpu"), seed=seed))
        opt = step.__self__
        dot = sum(float(torch.dot(p.grad.flatten(), opt._reference.tensors[p].flatten())) for p in opt._parameters())
        assert (dot < 0) == projects


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
    assert [c.name for c in cases.select_cases(backends=["triton"])] == list(cases.CASE_NAMES)
    # On the CPU: each cnl_ext case on the PyTorch implementation, then on the native kernels.
    with_native = [n for name in CPU_CASE_NAMES for n in
                   ([name, name + "@native"] if name in cases.CNL_CASE_NAMES else [name])]
    assert [c.name for c in cases.select_cases(device=CPU)] == with_native
    assert [c.name for c in cases.select_cases(device=CPU, backends=["torch"])] == CPU_CASE_NAMES
    picked = cases.select_cases(["cnl_sgd", "cnl_adamw_fp32@cuda", "torch_sgd_fused"], CPU, ["torch"])
    assert [(c.name, c.backend) for c in picked] == [
        ("torch_sgd_fused", None), ("cnl_adamw_fp32@cuda", "cuda"), ("cnl_sgd", None)]
    # The compiled extension's variant keeps issue 12's CPU target and gets issue 4's GPU one.
    assert picked[1].targets == (cases._cpu("max_time_ratio", 1.20, cases.BASELINE),
                                 cases._gpu("max_time_ratio", 1.15, "cnl_adamw_fp32", issue=4))
    with pytest.raises(ValueError, match="unknown case"):
        cases.select_cases(["adamw"])
    with pytest.raises(ValueError, match="only cnl_ext cases take a backend"):
        cases.select_cases(["torch_adamw_fused@native"])


def test_backend_variant_compares_with_the_same_backend():
    by_name = {case.name: case for case in cases.CASES}
    stats = cases.backend_variant(by_name["cnl_adamw_fp32_stats"], "native")
    assert stats.name == "cnl_adamw_fp32_stats@native" and stats.backend == "native"
    # track_stats is compared with the same backend without it; torch's baselines stay torch's.
    assert [t.against for t in stats.targets if t.device_type == "cpu"] == ["cnl_adamw_fp32@native"]
    noref = cases.backend_variant(by_name["cnl_adamw_noref"], "torch")
    assert [(t.against, t.backends) for t in noref.targets if t.device_type == "cpu"] == [
        (cases.BASELINE, None), ("torch_adamw_foreach", ("torch",))]


def test_targets_apply_by_device_and_backend():
    lean = cases._cpu("max_time_ratio", 1.5, "torch_adamw_foreach", backends=("torch",))
    assert lean.applies_to("smollm2-135m", "cpu", "torch")
    assert not lean.applies_to("smollm2-135m", "cpu", "native")
    assert not lean.applies_to("smollm2-135m", "cuda", "torch")
    assert not cases.ROOFLINE_90.applies_to("smollm2-135m", "cpu", "torch")


def test_roofline_is_the_best_streaming_rate():
    assert harness.roofline(40e9, 33e9) == (40e9, "copy")
    assert harness.roofline(30e9, 33e9) == (33e9, "torch fused AdamW (28 B/element)")
    assert harness.roofline(30e9, None) == (30e9, "copy")
    assert harness.copy_traffic_factor(CPU) == 3  # write-allocate: read src, read dst, write dst
    copy, traffic = harness.copy_step(CPU, 4096)
    copy()
    assert traffic == 3 * 4096


def test_backend_unavailable_reason_names_the_backend():
    assert harness.backend_unavailable_reason("torch", CPU) == ""
    assert NATIVE_REASON == "" or NATIVE_REASON.startswith("native backend unavailable: ")


def test_cpu_results_are_not_ignored_by_git():
    root = Path(__file__).resolve().parents[2]
    ignored = subprocess.run(["git", "-C", str(root), "check-ignore", "-q",
                              f"bench/results/{harness.file_stem(CPU)}.json"])
    assert ignored.returncode == 1  # 0 would mean ignored


def test_optimizer_step_smoke_run(tmp_path):
    result = optimizer_step.main([
        "--device", "cpu", "--params", "tiny", "--backend", "torch,native", "--rounds", "2", "--warmup", "0",
        "--iters", "1", "--copy-mib", "4", "--sweep-sizes", "1000", "4000", "--out", str(tmp_path),
    ])
    stem = harness.file_stem(CPU)
    saved = json.loads((tmp_path / f"{stem}.json").read_text())
    assert saved["setup"]["backends"] == ["torch", "native"] == result["setup"]["backends"]
    assert saved["setup"]["copy_traffic_factor"] == 3
    assert saved["environment"]["cpu"]["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    param_set = saved["param_sets"]["tiny"]
    rows = param_set["rows"]
    assert [row["case"] for row in rows] == [c.name for c in cases.select_cases(device=CPU)]
    assert not [row for row in rows if "error" in row]
    native_rows = [row for row in rows if row["case"].endswith("@native")]
    assert len(native_rows) == len([n for n in cases.CNL_CASE_NAMES if n in CPU_CASE_NAMES])
    if NATIVE_REASON:  # skipped, each with the reason, never failed
        assert all(row["skipped"] == NATIVE_REASON for row in native_rows)
    timed = [row for row in rows if "ms" in row]
    assert len(timed) == len(rows) - (len(native_rows) if NATIVE_REASON else 0)
    roofline = param_set["roofline_gb_per_s"]
    assert len(param_set["copy_round_gb_per_s"]) == 2
    assert roofline == max(param_set["copy_bandwidth_gb_per_s"], param_set["fused_adamw_gb_per_s"])
    for row in timed:
        assert row["tensors"] == (1 if row["case"].startswith("cnl_adamw_fp32_flat") else 26)
        assert row["numel"] == 90_688 and row["ms"] > 0 and len(row["times_ms"]) == 2
        assert len(row["round_medians_ms"]) == 2 and row["spread_ms"] == [min(row["round_medians_ms"]),
                                                                          max(row["round_medians_ms"])]
        assert math.isclose(row["fraction_of_roofline"], row["roofline_ms"] / row["ms"])
        assert math.isclose(row["roofline_ms"], row["roofline_bytes"] / (roofline * 1e9) * 1e3)
        assert row["peak_memory_bytes"] is None  # no allocator statistics on the CPU
    by_case = {row["case"]: row for row in timed}
    assert by_case[cases.BASELINE]["ratio_to_baseline"] == 1.0
    assert by_case["cnl_momentum"]["baseline"] == "torch_momentum_fused"
    assert math.isclose(by_case["cnl_momentum"]["ratio_to_baseline"],
                        by_case["cnl_momentum"]["ms"] / by_case["torch_momentum_fused"]["ms"])
    # Issue 12's CPU targets, not issue 3's GPU ones; the lean-torch target on the torch backend only.
    assert [t["target"] for t in by_case["cnl_adamw_fp32"]["targets"]] == ["≤ 1.2× torch_adamw_fused"]
    assert [t["target"] for t in by_case["cnl_adamw_noref"]["targets"]] == [
        "≤ 1.05× torch_adamw_fused", "≤ 1.5× torch_adamw_foreach"]
    assert [t["target"] for t in by_case["cnl_rmsprop_fp32"]["targets"]] == ["≤ 1.3× torch_rmsprop"]
    # issue 15's (importance tracking in the step), on either device, against the same backend's step without it
    assert [t["target"] for t in by_case["cnl_adamw_importance"]["targets"]] == ["≤ 1.7× cnl_adamw_noref"]
    # issue 22's (EWC, A-GEM), against the same backend's step without a reference
    assert [t["target"] for t in by_case["cnl_adamw_ewc"]["targets"]] == ["≤ 1.35× cnl_adamw_noref"]
    assert [t["target"] for t in by_case["cnl_adamw_agem"]["targets"]] == ["≤ 1.5× cnl_adamw_noref"]
    issue_of = {"cnl_adamw_importance": 15, "cnl_adamw_noref_f64": 20, "cnl_adamw_ewc": 22,
                "cnl_adamw_agem": 22}  # else issue 12's CPU targets
    assert all(t["passed"] in (True, False) and t["issue"] == issue_of.get(row["case"].partition("@")[0], 12)
               for row in timed for t in row["targets"])
    # issue 20's float64 target: the native kernels' step only
    assert not by_case["cnl_adamw_noref_f64"]["targets"]
    if not NATIVE_REASON:
        assert [t["target"] for t in by_case["cnl_adamw_noref_f64@native"]["targets"]] == [
            "≤ 1.1× torch_adamw_fused_f64"]
    if not NATIVE_REASON:
        assert [t["target"] for t in by_case["cnl_adamw_fp32_stats@native"]["targets"]] == [
            "≤ 1.05× cnl_adamw_fp32@native"]
        assert [t["target"] for t in by_case["cnl_adamw_importance@native"]["targets"]] == [
            "≤ 1.7× cnl_adamw_noref@native"]
    assert saved["sweep"]["sizes"] == [1000, 4000]
    assert set(saved["sweep"]["cases"]) == {"torch_adamw_fused", "cnl_adamw_fp32"}

    markdown = (tmp_path / f"{stem}.md").read_text()
    assert "python bench/optimizer_step.py --device cpu --params tiny" in markdown
    assert "## tiny: 26 tensors, 90,688 elements" in markdown and "### Targets (tiny)" in markdown
    assert f"set by **{param_set['roofline_source']}**" in markdown
    for row in timed:
        assert f"| `{row['case']}` |" in markdown
    if NATIVE_REASON:
        assert f"): {NATIVE_REASON}" in markdown
    assert f"![time against elements]({stem}.png)" in markdown
    assert (tmp_path / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_end_to_end_smoke_run(tmp_path):
    end_to_end.main([
        "--device", "cpu", "--config", "tiny", "--layers", "1", "--prompt-tokens", "8", "--mastered", "2",
        "--injection", "2", "--warmup", "0", "--backend", "torch,native", "--out", str(tmp_path),
    ])
    saved = json.loads((tmp_path / f"{harness.file_stem(CPU)}-end_to_end.json").read_text())
    assert saved["setup"]["layers"] == 1 and saved["setup"]["backends"] == ["torch", "native"]
    expected = ["ft_fused", "cnl_authors", "cnl_fused"] + ([] if NATIVE_REASON else ["cnl_fused@native"])
    assert list(saved["modes"]) == expected
    assert saved["skipped"] == ({"cnl_fused@native": NATIVE_REASON} if NATIVE_REASON else {})
    for mode in saved["modes"].values():
        assert mode["epoch_s"] > 0 and mode["optimizer_ms"] > 0
        assert math.isclose(mode["optimizer_share"], mode["optimizer_ms"] / mode["train_step_ms"])
        assert mode["peak_rss_bytes"] > 0 and mode["peak_rss_scope"] in ("run", "process")  # issue 23
    assert saved["modes"]["cnl_fused"]["backend"] == "torch"
    assert saved["modes"]["ft_fused"]["capture_s"] is None  # plain FT has no reference
    assert len(saved["speedups"]) == 4 * (len(expected) - 2)
    markdown = (tmp_path / f"{harness.file_stem(CPU)}-end_to_end.md").read_text()
    for mode in ("ft_fused", "cnl_authors", "cnl_fused"):
        assert f"| `{mode}` |" in markdown
    assert "peak RSS GiB" in markdown
    assert "CNL epoch speed-up" in markdown


def test_host_overhead_smoke_run(tmp_path):
    from cnl_ext.ops import triton_adam, triton_sgd

    kernels, threads = (triton_adam._adam_kernel, triton_sgd._sgd_kernel), torch.get_num_threads()
    result = host_overhead.main(["--tensors", "2", "5", "--warmup", "0", "--iters", "1", "--out", str(tmp_path)])
    assert (triton_adam._adam_kernel, triton_sgd._sgd_kernel) == kernels  # the no-op stand-ins are gone
    assert torch.get_num_threads() == threads
    rows = json.loads((tmp_path / "host_overhead.json").read_text())["rows"]
    assert rows == result["rows"]
    assert [(r["case"], r["tensors"]) for r in rows] == [(c, n) for c in host_overhead.CASES for n in (2, 5)]
    assert all(r["ms"] > 0 and math.isclose(r["us_per_tensor"], r["ms"] * 1e3 / r["tensors"]) for r in rows)
    markdown = (tmp_path / "host_overhead.md").read_text()
    assert "python bench/host_overhead.py --tensors 2 5" in markdown and "| `adamw_capturable` | 5 |" in markdown


def test_profile_step_smoke_run(tmp_path):
    from bench import profile_step

    result = profile_step.main(["--case", "cnl_adamw_fp32", "--backend", "torch", "--params", "tiny",
                                "--warmup", "1", "--steps", "1", "--top", "5", "--out", str(tmp_path)])
    assert result["backend"] == "torch" and result["step_ms"] > 0
    assert 0 < len(result["operators"]) <= 5
    assert all(row["self_ms_per_step"] >= 0 and row["calls_per_step"] > 0 for row in result["operators"])
    markdown = (tmp_path / f"{harness.file_stem(CPU)}-profile-cnl_adamw_fp32-torch.md").read_text()
    assert "| operator | calls / step | self ms / step | share of step |" in markdown


def test_tensor_pool_shares_and_bounds_its_sets():
    pool = cases.TensorPool(CPU, max_sets=2)
    a, b, c = [("a", (4, 3))], [("b", (5,))], [("c", (2,))]
    params_a, refs_a = pool.get(a, torch.float32)
    assert [p.shape for p in params_a] == [(4, 3)] and params_a[0].grad.shape == (4, 3)
    assert refs_a[0].dtype == torch.float32 and not torch.equal(refs_a[0], params_a[0].grad)
    pool.get(b, torch.bfloat16)
    assert pool.get(a, torch.float32)[0][0] is params_a[0]  # shared, not rebuilt
    assert pool.params[0].dtype == torch.float32
    pool.get(c, torch.float32)  # evicts b, the least recently used
    assert pool.get(a, torch.float32)[0][0] is params_a[0]
    assert pool.nbytes() == 2 * 12 * 4 and pool.nbytes(references=True) == 3 * 12 * 4
    pool.clear()
    assert pool.params is None
