"""KIF / Recurrent-KIF fusion ops (cnl_ext.kif): spec §7 tests 5-11 and 14; the Triton and native
kernels against the torch backend, bit for bit."""
import numpy as np
import pytest
import torch

from cnl_ext import functional, kif
from cnl_ext.kif import (KIFMerger, Units, accumulate_importance, adaptive_coefficients, fuse_task_vector_,
                         global_quantile, minmax, orthogonality_loss, percentile, recurrent_fuse_, score_quantile,
                         static_coefficients, unique_parameters, unit_scores)
from cnl_ext.ops import kif_fusion_torch, native_backend

from ..conftest import BACKEND_DEVICES, NATIVE_DEVICES, skip_unless_native_runs

# Every backend that runs the fusion passes, and those tested against the torch backend (the oracle).
FUSION_BACKENDS = [*BACKEND_DEVICES, *NATIVE_DEVICES]
KERNEL_BACKENDS = [p for p in FUSION_BACKENDS if p.values[0] != "torch"]
NATIVE_BACKENDS = [p for p in FUSION_BACKENDS if p.values[0] == "native"]
NATIVE_ITEM = 32768  # cnl::cpu::kItemSize: the native kernels' work items


@pytest.fixture(autouse=True)
def _native_ready(request):
    """Skip a native case whose kernels cannot load or build here (an error under CNL_EXT_REQUIRE_NATIVE=1)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "native":
        skip_unless_native_runs(callspec.params["device"])


def dyadic(*shape, low=-8, high=8):
    """Multiples of 1/8: sums and products of a few of them are exact in float32 and bfloat16."""
    return torch.randint(low, high, shape).float() / 8


# ---------------------------------------------------------------------------------- §7.5 unit scores

def test_tensor_unit_is_the_mean():
    scores = [torch.tensor([[1.0, 2.0], [3.0, 6.0]]), torch.tensor([4.0])]
    assert unit_scores(scores, Units.per_tensor([s.shape for s in scores])).tolist() == [3.0, 4.0]


def test_row_units_are_row_means_and_1d_tensors_one_unit():
    scores = [torch.tensor([[1.0, 3.0], [5.0, 9.0], [0.0, 0.0]]), torch.tensor([2.0, 4.0])]
    units = Units.per_row([s.shape for s in scores])
    assert units.count == 4 and unit_scores(scores, units).tolist() == [2.0, 7.0, 0.0, 3.0]


def test_rank1_unit_score_is_the_mean_of_the_outer_product():
    s_a, s_b, other = torch.rand(4, 7), torch.rand(5, 4), torch.rand(3)
    units = Units.build([s_a.shape, other.shape, s_b.shape], lora_pairs=[(0, 2)])
    got = unit_scores([s_a, other, s_b], units)
    expected = [torch.outer(s_b[:, i], s_a[i, :]).mean() for i in range(4)] + [other.mean()]
    torch.testing.assert_close(got, torch.stack(expected))
    assert units.maps == ((0, 7, 4), (4, 3, 1), (0, 1, 4))


def test_bad_lora_pair_is_refused():
    with pytest.raises(ValueError, match=r"expected A \[r, in\] and B \[out, r\]"):
        Units.build([(4, 7), (5, 3)], lora_pairs=[(0, 1)])
    with pytest.raises(ValueError, match="more than one LoRA pair"):
        Units.build([(4, 7), (5, 4), (6, 4)], lora_pairs=[(0, 1), (0, 2)])


def test_tied_parameter_is_one_unit():
    embedding = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight  # tied
    model = torch.nn.ModuleList([embedding, head])
    params = unique_parameters([embedding.weight, head.weight])
    assert len(params) == 1 and len(list(model.parameters())) == 1
    assert Units.per_tensor([p.shape for p in params]).count == 1


# ---------------------------------------------------------------------------------- §7.6 minmax, pct80

def test_minmax_and_percentile():
    assert minmax(torch.tensor([2.0, 4.0, 6.0])).tolist() == [0.0, 0.5, 1.0]
    assert minmax(torch.tensor([3.0, 3.0])).tolist() == [0.0, 0.0]
    x = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    assert percentile(x).item() == pytest.approx(0.8)
    assert (x > percentile(x)).tolist() == [False] * 4 + [True]
    at_threshold = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 2.0])  # pct80 = 1.0: units at 1 are not important
    assert percentile(at_threshold).item() == 1.0
    assert (at_threshold > percentile(at_threshold)).tolist() == [False] * 5 + [True]


# ---------------------------------------------------------------------------------- §7.7-9 KIF fusion

def test_static_coefficients_by_case():
    prev = torch.tensor([1.0, 0.9, 0.0, 0.1, 0.2])  # 5 units: the top 20% is unit 0
    assert static_coefficients(prev, prev.clone()).tolist() == pytest.approx([0.3, 0.5, 0.5, 0.5, 0.5])  # γ = 0.7
    PREV2 = torch.tensor([0.9, 1.0, 0.0, 0.1, 0.2])
    CUR2 = torch.tensor([1.0, 0.0, 0.9, 0.1, 0.2])
    c = static_coefficients(PREV2, CUR2, gamma=1.0)
    # PREV2: top unit 1 (P); CUR2: top unit 0 (C). unit 0 ¬P∧C, unit 1 P∧¬C, others neither
    assert c.tolist() == [1.0, 0.0, 0.5, 0.5, 0.5]


@pytest.mark.parametrize("backend, device", FUSION_BACKENDS)
def test_static_fusion_cases_on_weights(backend, device):
    # 5 tensors = 5 units; prev/cur scores make unit 0 P∧C, 1 P∧¬C, 2 ¬P∧C, 3 neither, 4 neither
    prev = torch.tensor([1.0, 0.95, 0.0, 0.1, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0])
    cur = torch.tensor([1.0, 0.0, 0.95, 0.1, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0])
    # with 10 units the top 20% are two: prev {0, 1}, cur {0, 2}
    shapes = [(3, 4), (5,), (2, 2, 2), (7,), (1,), (1,), (1,), (1,), (1,), (1,)]
    units = Units.per_tensor(shapes)
    anchors = [dyadic(*s).to(device) for s in shapes]
    current = [dyadic(*s).to(device) for s in shapes]
    for gamma, expect_pc in ((1.0, "prev"), (0.0, "cur")):
        params = [c.clone() for c in current]
        c = static_coefficients(prev, cur, gamma=gamma)
        fuse_task_vector_(params, anchors, c, units, backend=backend)
        assert torch.equal(params[0], anchors[0] if expect_pc == "prev" else current[0])
        assert torch.equal(params[1], anchors[1])  # P∧¬C keeps the previous weights
        assert torch.equal(params[2], current[2])  # ¬P∧C takes the new ones
        assert torch.equal(params[3], (anchors[3] + current[3]) / 2)  # neither: the mean
    unchanged = [a.clone() for a in anchors]
    fuse_task_vector_(unchanged, anchors, static_coefficients(prev, cur), units, backend=backend)
    assert all(torch.equal(u, a) for u, a in zip(unchanged, anchors))  # θ = anchor stays


def test_adaptive_coefficients():
    assert adaptive_coefficients(torch.tensor([0.3]), torch.tensor([0.3])).item() == 0.5
    assert adaptive_coefficients(torch.tensor([0.0]), torch.tensor([1.0])).item() == pytest.approx(0.998729, abs=1e-6)
    assert adaptive_coefficients(torch.tensor([0.0]), torch.tensor([0.5])).item() == pytest.approx(0.965555, abs=1e-6)
    prev, cur = torch.rand(20), torch.rand(20)
    torch.testing.assert_close(adaptive_coefficients(prev, cur) + adaptive_coefficients(cur, prev), torch.ones(20))


@pytest.mark.parametrize("backend, device", FUSION_BACKENDS)
def test_rank1_factors_get_the_same_coefficient(backend, device):
    a, b = dyadic(3, 6).to(device), dyadic(4, 3).to(device)  # A [r=3, in=6], B [out=4, r=3]
    anchors = [torch.zeros_like(a), torch.zeros_like(b)]
    units = Units.build([a.shape, b.shape], lora_pairs=[(0, 1)])
    c = torch.tensor([0.0, 0.5, 1.0])
    params = [a.clone(), b.clone()]
    fuse_task_vector_(params, anchors, c, units, backend=backend)
    assert torch.equal(params[0], a * c.to(device)[:, None])  # row i of A scaled by c_i
    assert torch.equal(params[1], b * c.to(device)[None, :])  # column i of B scaled by c_i


def test_accumulation_and_first_task_without_fusion():
    acc = accumulate_importance(torch.tensor([0.0, 0.5, 1.0]), torch.tensor([1.0, 0.0, 0.5]), beta=0.7)
    torch.testing.assert_close(acc, torch.tensor([0.0, 0.05 / 0.55, 1.0]))
    assert acc[1].item() == pytest.approx(0.0909, abs=1e-4)
    shapes = [(4, 3), (5,)]
    merger = KIFMerger(Units.per_tensor(shapes))
    params, anchors = [torch.randn(s) for s in shapes], [torch.zeros(s) for s in shapes]
    before = [p.clone() for p in params]
    assert merger.finish_task(params, anchors, [torch.rand(s) for s in shapes]) is None
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # task 1: no fusion
    assert merger.accumulated is not None
    c = merger.finish_task(params, anchors, [torch.rand(s) for s in shapes])
    assert c is not None and c.shape == (2,)


# ---------------------------------------------------------------------------------- §7.10 quantile

@pytest.mark.parametrize("n", [1, 2, 5, 6, 11, 1000, 4097, 100_003])
def test_global_quantile_equals_torch_quantile(n):
    x = torch.rand(n)
    parts = [x[: n // 3], x[n // 3:]]
    for q in (0.0, 0.5, 0.8, 1.0):
        got, expected = global_quantile(parts, q), torch.quantile(x, q)
        torch.testing.assert_close(got, expected, rtol=2e-7, atol=0)
        if (q * (n - 1)) == int(q * (n - 1)):  # an integer rank: the same order statistic
            assert torch.equal(got, expected)


def test_global_quantile_with_ties():
    x = torch.tensor([0.0] * 9 + [1.0] * 3)  # rank 8.8: between the 9th and 10th smallest (0 and 1)
    torch.testing.assert_close(global_quantile([x], 0.8), torch.quantile(x, 0.8))
    y = torch.tensor([3.0] * 12)
    assert global_quantile([y], 0.8).item() == 3.0


@pytest.mark.slow
def test_global_quantile_beyond_2_to_the_24():
    n = 2**24 + 1
    x = torch.rand(n, generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError):
        torch.quantile(x, 0.8)  # the limit this function exists for
    expected = np.quantile(x.numpy().astype(np.float64), 0.8)
    got = global_quantile([x[:1000], x[1000:]], 0.8)
    assert abs(got.item() - expected) <= 1e-7 * expected


def test_score_quantile_is_the_quantile_of_the_products():
    s = [torch.rand(30, 7), torch.rand(11)]
    u = [torch.rand(30, 7), torch.rand(11)]
    expected = torch.quantile(torch.cat([(a * b).reshape(-1) for a, b in zip(s, u)]), 0.8)
    torch.testing.assert_close(score_quantile(s, u, 0.8), expected, rtol=2e-7, atol=0)
    with pytest.raises(ValueError, match="NaN"):
        score_quantile([torch.tensor([float("nan")])], [torch.ones(1)])


# ---------------------------------------------------------------------------------- §7.11 R-KIF fusion

def _rkif_case(device, shapes=((3, 5), (7,))):
    theta_b = [dyadic(*s).to(device) for s in shapes]
    theta_q = [dyadic(*s).to(device) for s in shapes]
    theta = [dyadic(*s).to(device) for s in shapes]
    return theta_b, theta_q, theta


def _masks(shapes, value, device):
    """(S, U) with S·U = value everywhere (masks against δ = 0.5: 1 -> fires, 0 -> not)."""
    return [torch.full(s, float(value), device=device) for s in shapes], [torch.ones(s, device=device) for s in shapes]


@pytest.mark.parametrize("backend, device", FUSION_BACKENDS)
def test_recurrent_fusion_rules(backend, device):
    shapes = ((3, 5), (7,))
    theta_b, theta_q, theta = _rkif_case(device, shapes)

    def fused(rule, m_in, m_out):
        params, anchors = [t.clone() for t in theta], [t.clone() for t in theta_b]
        recurrent_fuse_(params, anchors, theta_q, _masks(shapes, m_in, device), _masks(shapes, m_out, device),
                        0.5, 0.5, rule=rule, backend=backend)
        assert all(torch.equal(p, a) for p, a in zip(params, anchors))  # the anchor follows
        return params

    assert all(torch.equal(p, t) for p, t in zip(fused("paper", 1, 1), theta))  # unfused θ
    assert all(torch.equal(p, b) for p, b in zip(fused("paper", 0, 0), theta_b))  # θ_b
    for p, b, q, t in zip(fused("code", 1, 1), theta_b, theta_q, theta):
        torch.testing.assert_close(p, b + 0.4 * (q - b) + 0.6 * (t - q))
    assert all(torch.equal(p, q) for p, q in zip(fused("code", 1, 0), theta_q))  # τ_in whole
    for p, b, q, t in zip(fused("code", 0, 1), theta_b, theta_q, theta):
        assert torch.equal(p, b + (t - q))  # τ_out whole
    for p, b, t in zip(fused("code", 0, 0), theta_b, theta):
        torch.testing.assert_close(p, (b + t) / 2)


@pytest.mark.parametrize("backend, device", FUSION_BACKENDS)
def test_recurrent_mask_is_strict(backend, device):
    theta_b, theta_q, theta = [torch.zeros(2, device=device)], [torch.ones(2, device=device)], [torch.ones(2, device=device)]
    s_in = [torch.tensor([0.5, 0.75], device=device)]
    ones = [torch.ones(2, device=device)]
    params = [theta[0].clone()]
    recurrent_fuse_(params, [theta_b[0].clone()], theta_q, (s_in, ones), ([torch.zeros(2, device=device)], ones),
                    0.5, 0.5, rule="paper", update_anchors=False, backend=backend)
    assert params[0].tolist() == [0.0, 1.0]  # S = δ does not fire; above it does


# ---------------------------------------------------------------------------------- kernels = torch

SHAPES = [(1,), (1023,), (1024,), (1025,), (3, 700), (65536 + 5,), (2, 3, 4, 5), (0,), (17, 1)]
# native only (the Triton interpreter is slow): rows that cross work items (and CUDA chunks of 65536
# elements), several items per row
LARGE_SHAPES = {"native": [(3, NATIVE_ITEM + 999), (5, 13109)]}


@pytest.mark.parametrize("backend, device", KERNEL_BACKENDS)
@pytest.mark.parametrize("param_dtype, anchor_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                       (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                                       (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("unit", ["tensor", "row", "lora"])
def test_task_vector_kernel_equals_torch(backend, device, param_dtype, anchor_dtype, unit):
    shapes = SHAPES + LARGE_SHAPES.get(backend, []) + [(4, 9), (6, 4)]
    if unit == "lora":
        units = Units.build(shapes, lora_pairs=[(len(shapes) - 2, len(shapes) - 1)])
    else:
        units = Units.build(shapes, rows=unit == "row")
    params = [torch.randn(s, device=device).to(param_dtype) for s in shapes]
    anchors = [(p.float() + 0.01 * torch.randn(p.shape, device=device)).to(anchor_dtype) for p in params]
    c = torch.rand(units.count)
    expected = [p.clone() for p in params]
    fuse_task_vector_(expected, anchors, c, units, backend="torch")
    fuse_task_vector_(params, anchors, c, units, backend=backend)
    for got, want in zip(params, expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend, device", KERNEL_BACKENDS)
@pytest.mark.parametrize("param_dtype, anchor_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                       (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                                       (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("rule", ["code", "paper"])
@pytest.mark.parametrize("update_anchors", [True, False])
def test_recurrent_kernel_equals_torch(backend, device, param_dtype, anchor_dtype, rule, update_anchors):
    shapes = SHAPES + LARGE_SHAPES.get(backend, [])
    params = [torch.randn(s, device=device).to(param_dtype) for s in shapes]
    anchors = [(p.float() + 0.01 * torch.randn(p.shape, device=device)).to(anchor_dtype) for p in params]
    ends = [(p.float() + 0.01 * torch.randn(p.shape, device=device)).to(anchor_dtype) for p in params]
    inner = ([torch.rand(s, device=device) for s in shapes], [torch.rand(s, device=device) for s in shapes])
    outer = ([torch.rand(s, device=device) for s in shapes], [torch.rand(s, device=device) for s in shapes])
    d_in, d_out = score_quantile(*inner), score_quantile(*outer)
    inner[0][0][0] = float("nan")  # a NaN score fires no mask
    expected_p, expected_a = [p.clone() for p in params], [a.clone() for a in anchors]
    recurrent_fuse_(expected_p, expected_a, ends, inner, outer, d_in, d_out, rule=rule, update_anchors=update_anchors,
                    backend="torch")
    recurrent_fuse_(params, anchors, ends, inner, outer, d_in, d_out, rule=rule, update_anchors=update_anchors,
                    backend=backend)
    for got, want in zip(params + anchors, expected_p + expected_a):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend, device", KERNEL_BACKENDS)
def test_kernels_handle_non_contiguous_params(backend, device):
    weight = torch.randn(6, 5, device=device).t()  # non-contiguous [5, 6]
    anchor = torch.randn(5, 6, device=device)
    units = Units.per_row([weight.shape])
    c = torch.rand(5)
    original, expected = weight.clone(), weight.clone()
    fuse_task_vector_([expected], [anchor], c, units, backend="torch")
    fuse_task_vector_([weight], [anchor], c, units, backend=backend)
    assert torch.equal(weight, expected)
    assert not torch.equal(weight, original)
    torch.testing.assert_close(weight, anchor + c.to(device)[:, None] * (original - anchor))


def test_auto_takes_the_native_kernels_on_cpu():
    reason = native_backend.unavailable_reason()
    if reason:
        pytest.skip(f"native backend unavailable: {reason}")
    for op in ("kif_task_vector_fuse_", "kif_recurrent_fuse_"):
        assert functional.resolve("auto", torch.device("cpu"), op) is native_backend
        # on CUDA with cnl_ext._C, as the steps
        cuda = native_backend.capabilities(torch.device("cuda"))
        assert cuda.runs(op) == cuda.runs("adam_step_")


@pytest.mark.parametrize("backend, device", NATIVE_BACKENDS)
def test_native_fusion_ops_refuse_bad_input(backend, device):
    """The C++ bindings re-check what cnl_ext.kif guarantees (a wrong pointer would corrupt memory),
    with messages that name the list and the tensor, and write nothing."""
    with torch.device(device):
        _check_native_fusion_errors(device)


def _check_native_fusion_errors(device):
    params, anchors = [torch.ones(3), torch.ones(2, 4)], [torch.zeros(3), torch.zeros(2, 4)]
    maps = [(0, 3, 1), (1, 4, 2)]
    bad_task_vector = [
        (dict(anchors=[torch.zeros(3), torch.zeros(7)]), r"anchors\[1\] has 7 elements, expected 8"),
        (dict(anchors=[torch.zeros(3), torch.zeros(4, 2).t()]), r"anchors\[1\] must be contiguous"),
        (dict(anchors=[torch.zeros(3), torch.zeros(2, 4, dtype=torch.bfloat16)]), r"anchors\[1\] has dtype BFloat16"),
        (dict(anchors=[torch.zeros(3, dtype=torch.float64)] * 2), "anchors must be float32, bfloat16 or float16"),
        (dict(coefficients=torch.ones(2)), r"units of params\[1\] .* do not lie within the 2 coefficients"),
        (dict(coefficients=torch.ones(3, 1)),
         f"coefficients must be a contiguous 1-D float32 tensor on the params. device {device}"),
        (dict(unit_maps=maps[:1]), "got 2 params but 1 unit offsets"),
        (dict(unit_maps=[(0, 0, 1), (1, 4, 2)]), r"units of params\[0\] \(offset 0, div 0, mod 1\)"),
    ]
    for change, message in bad_task_vector:
        call = dict(params=params, anchors=anchors, coefficients=torch.ones(3), unit_maps=maps) | change
        with pytest.raises(RuntimeError, match=message):
            native_backend.kif_task_vector_fuse_(**call)
    with pytest.raises(RuntimeError, match="params must be float32, bfloat16 or float16, got Double"):
        native_backend.kif_task_vector_fuse_([torch.ones(3, dtype=torch.float64)], [torch.zeros(3)], torch.ones(1),
                                             [(0, 3, 1)])
    scores = [torch.ones(3), torch.ones(2, 4)]
    recurrent = dict(params=params, anchors=anchors, inner_ends=anchors, inner_sensitivities=scores,
                     inner_uncertainties=scores, outer_sensitivities=scores, outer_uncertainties=scores,
                     delta_in=0.5, delta_out=0.5, rule="code", update_anchors=True)
    bad_recurrent = [
        (dict(rule="soft"), "rule must be 'code' or 'paper', got 'soft'"),
        (dict(delta_out=float("nan")), "a fusion threshold is NaN"),
        (dict(inner_ends=[torch.zeros(3, dtype=torch.bfloat16), torch.zeros(2, 4, dtype=torch.bfloat16)]),
         r"inner_ends\[0\] has dtype BFloat16, expected Float"),
        (dict(outer_uncertainties=[torch.ones(3), torch.ones(2, 4, dtype=torch.float64)]),
         r"outer_uncertainties\[1\] has dtype Double, expected Float"),
        (dict(inner_sensitivities=scores[:1]), "got 2 params but 1 inner_sensitivities"),
    ]
    for change, message in bad_recurrent:
        with pytest.raises(RuntimeError, match=message):
            native_backend.kif_recurrent_fuse_(**(recurrent | change))
    assert all(bool((p == 1).all()) for p in params) and all(bool((a == 0).all()) for a in anchors)


# ---------------------------------------------------------------------------------- validation

def test_fusion_validates_before_writing():
    params, anchors = [torch.ones(3)], [torch.zeros(4)]
    with pytest.raises(ValueError, match=r"anchors\[0\] has shape \[4\]"):
        fuse_task_vector_(params, anchors, torch.ones(1), Units.per_tensor([(3,)]))
    with pytest.raises(ValueError, match="2 coefficients for 1 units"):
        fuse_task_vector_(params, [torch.zeros(3)], torch.ones(2), Units.per_tensor([(3,)]))
    with pytest.raises(ValueError, match="rule must be one of"):
        recurrent_fuse_(params, [torch.zeros(3)], [torch.zeros(3)], ([torch.ones(3)], [torch.ones(3)]),
                        ([torch.ones(3)], [torch.ones(3)]), 0.0, 0.0, rule="soft")
    with pytest.raises(ValueError, match="must be float32"):
        recurrent_fuse_(params, [torch.zeros(3)], [torch.zeros(3)], ([torch.ones(3, dtype=torch.float64)], [torch.ones(3)]),
                        ([torch.ones(3)], [torch.ones(3)]), 0.0, 0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        fuse_task_vector_(params, [torch.zeros(3)], torch.ones(1), Units.per_tensor([(3,)]), backend="tritn")
    with pytest.raises(ValueError, match=r"anchors\[0\] must be float32, bfloat16 or float16, got torch.float64"):
        fuse_task_vector_(params, [torch.zeros(3, dtype=torch.float64)], torch.ones(1), Units.per_tensor([(3,)]))
    assert params[0].tolist() == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------- §7.14 orthogonality

def test_orthogonality_loss():
    q, _ = torch.linalg.qr(torch.randn(12, 4))  # orthonormal columns
    assert orthogonality_loss([q.T.contiguous()], [q]).item() == pytest.approx(0.0, abs=1e-5)
    a, b = torch.randn(4, 12), torch.randn(9, 4)
    # the authors' code: regu_weight * mean over matrices of torch.norm(P @ P.T - I, p="fro") (AdaLoRA)
    expected = 0.1 * (torch.norm(a @ a.T - torch.eye(4), p="fro") + torch.norm(b.T @ b - torch.eye(4), p="fro")) / 2
    torch.testing.assert_close(orthogonality_loss([a], [b]), expected)


def test_module_exports_exist():
    for name in kif.__all__:
        assert hasattr(kif, name), name
    assert kif_fusion_torch.FUSION_RULES == ("code", "paper")


# ---------------------------------------------------------------------------------- chunked torch = definition

def _task_vector_by_definition(params, anchors, coefficients, units):
    out = []
    for p, a, (offset, div, mod) in zip(params, anchors, units.maps):
        f = torch.arange(p.numel()).view(p.shape)
        c = coefficients[offset + (f // div) % mod]
        p32, a32 = p.float(), a.float()
        out.append((a32 + c * (p32 - a32)).to(p.dtype))
    return out


def _recurrent_by_definition(params, anchors, ends, inner, outer, d_in, d_out, rule):
    out = []
    for i, p in enumerate(params):
        m_in = inner[0][i] * inner[1][i] > torch.tensor(d_in)
        m_out = outer[0][i] * outer[1][i] > torch.tensor(d_out)
        if rule == "paper":
            w_in, w_out = m_in.float(), m_out.float()
        else:
            both = m_in & m_out
            w_in = torch.where(both, 0.4, torch.where(m_in, 1.0, torch.where(m_out, 0.0, 0.5))).float()
            w_out = torch.where(both, 0.6, torch.where(m_in, 0.0, torch.where(m_out, 1.0, 0.5))).float()
        b, q, t = anchors[i].float(), ends[i].float(), p.float()
        out.append((b + w_in * (q - b) + w_out * (t - q)).to(p.dtype))
    return out


@pytest.mark.parametrize("chunk", [7, 64, 1 << 18])
@pytest.mark.parametrize("param_dtype, anchor_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                       (torch.float16, torch.bfloat16)])
def test_chunked_torch_passes_equal_their_definition(monkeypatch, chunk, param_dtype, anchor_dtype):
    monkeypatch.setattr(kif_fusion_torch, "CHUNK", chunk)
    shapes = [(1,), (100,), (9, 13), (2, 3, 5), (4, 30), (40, 4), (0,), (64,)]
    for layout in ("tensor", "row", "lora"):
        units = (Units.build(shapes, lora_pairs=[(4, 5)]) if layout == "lora"
                 else Units.build(shapes, rows=layout == "row"))
        params = [torch.randn(s).to(param_dtype) for s in shapes]
        anchors = [(p.float() + 0.1 * torch.randn(p.shape)).to(anchor_dtype) for p in params]
        c = torch.rand(units.count)
        expected = _task_vector_by_definition(params, anchors, c, units)
        fuse_task_vector_(params, anchors, c, units, backend="torch")
        for got, want in zip(params, expected):
            assert torch.equal(got, want), layout
    for rule in ("code", "paper"):
        params = [torch.randn(s).to(param_dtype) for s in shapes]
        anchors = [(p.float() + 0.1 * torch.randn(p.shape)).to(anchor_dtype) for p in params]
        ends = [(p.float() + 0.1 * torch.randn(p.shape)).to(anchor_dtype) for p in params]
        inner = ([torch.rand(s) for s in shapes], [torch.rand(s) for s in shapes])
        outer = ([torch.rand(s) for s in shapes], [torch.rand(s) for s in shapes])
        d_in, d_out = score_quantile(*inner).item(), score_quantile(*outer).item()
        expected = _recurrent_by_definition(params, anchors, ends, inner, outer, d_in, d_out, rule)
        recurrent_fuse_(params, anchors, ends, inner, outer, d_in, d_out, rule=rule, backend="torch")
        for got, want, anchor in zip(params, expected, anchors):
            assert torch.equal(got, want), rule
            assert torch.equal(anchor, want.to(anchor_dtype))


def test_torch_backend_handles_non_contiguous_tensors():
    weight = torch.randn(6, 5).t()
    anchor = torch.randn(10, 6)[::2]  # non-contiguous too
    c = torch.rand(5)
    expected = _task_vector_by_definition([weight], [anchor], c, Units.per_row([weight.shape]))[0]
    fuse_task_vector_([weight], [anchor], c, Units.per_row([weight.shape]), backend="torch")
    assert torch.equal(weight, expected)


@pytest.mark.parametrize("distribution", ["uniform", "wide", "ties", "zeros", "one_bucket", "with_inf"])
def test_radix_select_equals_kthvalue(monkeypatch, distribution):
    n = 5003
    x = {"uniform": torch.rand(n) * 1e-6, "wide": torch.exp(torch.randn(n) * 10),
         "ties": (torch.rand(n) * 4).floor(), "zeros": torch.zeros(n),
         "one_bucket": 1.0 + torch.rand(n) * 1e-3,  # every value shares its top 16 bits
         "with_inf": torch.cat([torch.rand(n - 3), torch.full((3,), float("inf"))])}[distribution]
    for q in (0.0, 0.37, 0.8, 0.9999, 1.0):
        monkeypatch.setattr(kif, "RADIX_MIN_ELEMENTS", 1 << 40)
        by_kthvalue = global_quantile([x], q)
        monkeypatch.setattr(kif, "RADIX_MIN_ELEMENTS", 16)
        by_radix = global_quantile([x], q)
        assert torch.equal(by_radix, by_kthvalue) or (by_radix.isnan() and by_kthvalue.isnan()), q
    with pytest.raises(ValueError, match="NaN"):
        global_quantile([torch.cat([x, torch.tensor([float("nan")])])], 0.8)
