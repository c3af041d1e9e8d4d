"""Issue 13: no silent corruption, every failure all-or-nothing.

One test (family) per defect, named by what it checks (its section gives the number), run for every backend that
runs here (torch; Triton under TRITON_INTERPRET=1; the compiled "native" backend where
``cnl_ext.ops.native_backend`` is available), then one failure-injection test per public mutating
call (``step``, ``set_reference``, ``capture_reference``, ``load_state_dict``, ``CNL.step``): the
call fails and the optimizer is bit for bit as before (tests/optim/reliability_helpers.snapshot).
Only the public API is used; what reaches below it lives in tests/optim/reliability_helpers.py.
"""
import json
import re
import os
import pathlib
import warnings

import pytest
import torch

import cnl_ext

from . import reliability_helpers as rh
from ..conftest import HAS_CUDA, TRITON_ON_CPU, backend_devices, requires_cuda

BACKENDS = rh.BACKEND_DEVICES
TRITON_BACKENDS = rh.TRITON_BACKEND_DEVICES

FUSED = {
    "SGD": (lambda params, **kw: cnl_ext.FusedCNLSGD(params, lr=0.1, momentum=0.9, **kw),
            lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9)),
    "Adam": (lambda params, **kw: cnl_ext.FusedCNLAdam(params, lr=0.05, amsgrad=True, weight_decay=0.01, **kw),
             lambda params: torch.optim.Adam(params, lr=0.05, amsgrad=True, weight_decay=0.01)),
    "AdamW": (lambda params, **kw: cnl_ext.FusedCNLAdamW(params, lr=0.05, weight_decay=0.1, **kw),
              lambda params: torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)),
}


def _clone_params(params):
    """Leaf copies with the same values and strides."""
    return [torch.nn.Parameter(torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=p.device).copy_(p))
            for p in params]


def _set_grads(param_lists, seed):
    """The same random gradient on the corresponding parameter of every list, laid out like the
    parameter (as autograd does)."""
    generator = torch.Generator().manual_seed(seed)
    for ps in zip(*param_lists):
        g = torch.randn(ps[0].shape, generator=generator).to(ps[0].device, ps[0].dtype)
        for p in ps:
            p.grad = torch.empty_like(p).copy_(g)


def _steps(pairs, n, seed=0):
    """``n`` steps of every optimizer in ``pairs`` ((params, optimizer) ...) on the same gradients."""
    for k in range(n):
        _set_grads([params for params, _ in pairs], seed + k)
        for _, opt in pairs:
            opt.step()


def _assert_close(got, want, **kwargs):
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g.detach(), w.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"parameter {i}: {m}",
                                   **kwargs)


# ============================================================================ defect 1

@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
@pytest.mark.parametrize("name", list(FUSED))
def test_non_contiguous_parameters_step_like_torch_optim(backend, device, layout, name):
    """Defect 1: a transposed or channels_last Parameter steps like torch.optim (no reference).
    Today Triton walks the parameter's storage as if contiguous (errors ~1)."""
    make = rh.transposed_parameter if layout == "transposed" else rh.channels_last_parameter
    params = [make(device=device), torch.nn.Parameter(torch.randn(5, device=device))]
    expected = _clone_params(params)
    make_cnl, make_torch = FUSED[name]
    _steps([(params, make_cnl(params, backend=backend)), (expected, make_torch(expected))], 3)
    _assert_close(params, expected)
    assert params[0].stride() == expected[0].stride()  # stepped in place, layout kept


# ============================================================================ defect 2

@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8", "sign2"])
@pytest.mark.parametrize("wrapped", [False, True], ids=["fused", "CNL-wrapper"])
def test_non_contiguous_reference_masks_like_its_contiguous_copy(backend, device, fmt, wrapped):
    """Defect 2: ``set_reference([r.t()])`` masks exactly like ``set_reference([r.t().contiguous()])``
    on the torch backend (fused optimizers and the CNL wrapper). Today Triton reads the transposed
    reference linearly: half the elements get the wrong mask."""
    torch.manual_seed(2)
    reference = torch.randn(9, 6, device=device).t()  # shape (6, 9), column-major
    results = []
    for backend_, ref in ((backend, reference), ("torch", reference.contiguous())):
        p = torch.nn.Parameter(torch.randn(6, 9, generator=torch.Generator().manual_seed(0)).to(device))
        if wrapped:
            opt = cnl_ext.CNL(torch.optim.SGD([p], lr=0.5), backend=backend_, reference_dtype=fmt)
        else:
            opt = cnl_ext.FusedCNLSGD([p], lr=0.5, backend=backend_, reference_dtype=fmt)
        opt.set_reference([ref])
        _steps([([p], opt)], 2)
        results.append(p.detach().clone())
    moved = (results[1] != torch.randn(6, 9, generator=torch.Generator().manual_seed(0)).to(device))
    assert moved.any() and not moved.all()  # the reference masks some elements, not all
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)


# ============================================================================ defect 3

_DEFECT3_SCRIPT = """
import json, torch, cnl_ext
torch.manual_seed(0)
out = {}
for optimizer, key in (("FusedCNLAdamW", "exp_avg_sq"), ("FusedCNLSGD", "momentum_buffer")):
    for case, bad in (("fewer elements", torch.zeros(16)), ("same numel, other shape", torch.zeros(65, 257))):
        make = lambda params: getattr(cnl_ext, optimizer)(params, lr=0.1, backend=BACKEND, **(
            {"momentum": 0.9} if optimizer == "FusedCNLSGD" else {}))
        source = torch.nn.Parameter(torch.randn(257, 65))
        opt = make([source])
        source.grad = torch.randn_like(source)
        opt.step()
        saved = opt.state_dict()
        saved["state"][0][key] = bad
        saved["param_groups"][0]["lr"] = 0.5
        target = torch.nn.Parameter(source.detach().clone())
        loader = make([target])
        name = optimizer + ": " + case
        try:
            loader.load_state_dict(saved)
        except Exception as exc:
            out[name] = ["load raised", type(exc).__name__, str(exc), len(loader.state),
                         loader.param_groups[0]["lr"]]
            continue
        try:
            target.grad = torch.randn_like(target)
            loader.step()
            out[name] = ["step ran", "", "", len(loader.state), loader.param_groups[0]["lr"]]
        except Exception as exc:
            out[name] = ["step raised", type(exc).__name__, str(exc), len(loader.state), loader.param_groups[0]["lr"]]
print("RESULT " + json.dumps(out))
"""


@pytest.mark.parametrize("backend,device", backend_devices(devices=("cpu",)))
def test_load_state_dict_rejects_states_of_the_wrong_shape(backend, device):
    """Defect 3: a state of the wrong shape (fewer elements: today Triton writes out of bounds and
    the process may abort; same element count: silently wrong) is rejected by ``load_state_dict``
    with a ValueError naming the shape, before anything is loaded. In a subprocess, so a crash
    fails this test only."""
    result = rh.run_python(_DEFECT3_SCRIPT.replace("BACKEND", repr(backend)))
    assert result.returncode == 0, f"the repro process died: {rh.describe_process(result)}"
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    outcomes = json.loads(line[len("RESULT "):])
    wrong = {case: outcome for case, outcome in outcomes.items()
             if not (outcome[0] == "load raised" and outcome[1] == "ValueError" and "shape" in outcome[2]
                     and outcome[3] == 0 and outcome[4] == 0.1)}
    assert not wrong, f"not rejected at load time, with nothing loaded: {wrong}"


# ============================================================================ defect 4

@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name", list(FUSED))
@pytest.mark.parametrize("failing_step", [1, 2])
def test_failed_step_changes_nothing_and_later_steps_match_torch(monkeypatch, backend, device, name,
                                                                         failing_step):
    """Defect 4: a step whose backend fails at launch leaves parameters, states and the step count
    as they were (today Adam/AdamW create the state and count the step first), so the following
    steps still equal torch.optim's."""
    op = "sgd_step_" if name == "SGD" else "adam_step_"
    params = [torch.nn.Parameter(torch.randn(4, 3, device=device)), torch.nn.Parameter(torch.randn(7, device=device))]
    expected = _clone_params(params)
    make_cnl, make_torch = FUSED[name]
    opt, torch_opt = make_cnl(params, backend=backend), make_torch(expected)
    _steps([(params, opt), (expected, torch_opt)], failing_step - 1)
    _set_grads([params], 100)
    failure = rh.inject_backend_failure(monkeypatch, backend, op)
    rh.assert_fails_atomically(opt, opt.step, RuntimeError, "injected launch failure")
    failure.raise_on_call = float("inf")  # the backend works again
    _steps([(params, opt), (expected, torch_opt)], 2, seed=10)
    _assert_close(params, expected)


# ============================================================================ defect 5

@pytest.mark.parametrize("backend,device", rh.WRAPPER_BACKEND_DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
def test_cnl_wrapper_masks_non_contiguous_parameters(backend, device, layout):
    """Defect 5: ``CNL(optimizer)`` on a non-contiguous parameter under a fully conflicting
    reference leaves it bit-identical (today it raises after the inner step moved it unmasked),
    and under a random reference steps like the same run on a contiguous copy."""
    make = rh.transposed_parameter if layout == "transposed" else rh.channels_last_parameter
    p = make(device=device)
    before = p.detach().clone()
    opt = cnl_ext.CNL(torch.optim.SGD([p], lr=0.1), backend=backend)
    p.grad = torch.randn_like(p)
    opt.set_reference([-p.grad])  # SGD's u = g: every element conflicts
    opt.step()
    assert torch.equal(p, before)

    q = make(device=device)
    q_contiguous = torch.nn.Parameter(q.detach().contiguous())
    reference = torch.randn_like(q_contiguous)
    runs = []
    for param, backend_ in ((q, backend), (q_contiguous, "torch")):
        wrapper = cnl_ext.CNL(torch.optim.Adam([param], lr=0.1), backend=backend_)
        wrapper.set_reference([reference])
        runs.append(([param], wrapper))
    _steps(runs, 2)
    _assert_close([q], [q_contiguous])


# ============================================================================ defect 6

def _trained(make, backend, device, fmt="float32"):
    torch.manual_seed(6)
    params = [torch.nn.Parameter(torch.randn(4, 5, device=device)), torch.nn.Parameter(torch.randn(5, device=device))]
    opt = make(params, backend, fmt)
    opt.set_reference([torch.randn_like(p) for p in params])
    _steps([(params, opt)], 2)
    return params, opt


OPTIMIZERS_WITH_STATE = {
    "FusedCNLAdamW": lambda params, backend, fmt: cnl_ext.FusedCNLAdamW(params, lr=0.01, backend=backend,
                                                                        reference_dtype=fmt),
    "CNL(Adam)": lambda params, backend, fmt: cnl_ext.CNL(torch.optim.Adam(params, lr=0.01), backend=backend,
                                                          reference_dtype=fmt),
}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS_WITH_STATE))
@pytest.mark.parametrize("bad", ["reference does not fit", "unknown reference format"])
def test_load_state_dict_is_all_or_nothing(backend, device, name, bad):
    """Defect 6: a checkpoint whose saved reference does not fit, or names an unknown format, is
    rejected with a ValueError before anything is replaced (today the states and param groups are
    replaced first; an unknown format string is even accepted)."""
    make = OPTIMIZERS_WITH_STATE[name]
    _, source = _trained(make, backend, device)
    _steps([(rh.optimizer_params(source), source)], 1, seed=50)
    saved = source.state_dict(include_reference=True)
    for group in saved["param_groups"]:
        group["lr"] = 0.123
    if bad == "reference does not fit":
        saved[rh.REFERENCE_KEY]["tensors"][1] = torch.ones(3, device=device)
        match = "parameter 1"
    else:
        saved[rh.REFERENCE_KEY]["format"] = "float64"
        match = "float64"
    _, target = _trained(make, backend, device)
    rh.assert_fails_atomically(target, lambda: target.load_state_dict(saved), ValueError, match)


# ============================================================================ defect 7

@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", ["FusedCNLSGD", "CNL(SGD)"])
def test_set_reference_refuses_nan_and_inf(backend, device, value, name):
    """Defect 7: ``set_reference`` refuses non-finite values as ``capture_reference`` does (today
    they are accepted: every element collaborative, NaN statistics), leaving the optimizer as it was."""
    params = [torch.nn.Parameter(torch.randn(3, 4, device=device)), torch.nn.Parameter(torch.randn(4, device=device))]
    if name == "FusedCNLSGD":
        opt = cnl_ext.FusedCNLSGD(params, lr=0.1, momentum=0.9, backend=backend)
    else:
        opt = cnl_ext.CNL(torch.optim.SGD(params, lr=0.1, momentum=0.9), backend=backend)
    opt.set_reference([torch.randn_like(p) for p in params])
    _steps([(params, opt)], 1)
    bad = [torch.randn_like(p) for p in params]
    bad[1][2] = value
    rh.assert_fails_atomically(opt, lambda: opt.set_reference(bad), (ValueError, FloatingPointError),
                               r"(?i)(nan|inf|finite)")


# ============================================================================ defect 8

LATER_KEYS = {  # param-group keys a torch release before 2.13 may lack (see tests/optim/fixtures/torch_optim_checkpoint_formats.json)
    "AdamW": ["decoupled_weight_decay", "fused", "capturable", "differentiable", "foreach", "maximize", "amsgrad"],
    "Adam": ["decoupled_weight_decay", "fused", "capturable", "differentiable", "foreach", "maximize", "amsgrad"],
    "SGD": ["fused", "differentiable", "foreach", "maximize", "nesterov"],
}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name,missing", [(name, key) for name, keys in LATER_KEYS.items() for key in keys + ["all"]])
def test_checkpoint_without_later_group_keys_loads_and_steps_like_torch(backend, device, name, missing):
    """Defect 8: a checkpoint whose param groups lack keys added by later torch releases loads and
    steps like torch.optim loading it (which fills them with the defaults); today the next step
    raises KeyError."""
    make_cnl, make_torch = FUSED[name]
    torch.manual_seed(8)
    source_params = [torch.nn.Parameter(torch.randn(4, 3, device=device))]
    source = make_torch(source_params)
    _steps([(source_params, source)], 2)
    saved = source.state_dict()
    for group in saved["param_groups"]:
        for key in (LATER_KEYS[name] if missing == "all" else [missing]):
            group.pop(key, None)
    params, expected = _clone_params(source_params), _clone_params(source_params)
    opt, torch_opt = make_cnl(params, backend=backend), make_torch(expected)
    torch_opt.load_state_dict(saved)
    opt.load_state_dict(saved)
    _steps([(params, opt), (expected, torch_opt)], 2, seed=20)
    _assert_close(params, expected)


# ============================================================================ defect 9

@pytest.mark.parametrize("first", [
    pytest.param("triton", marks=pytest.mark.skipif(not TRITON_ON_CPU, reason="Triton runs CPU tensors only under "
                                                                              "TRITON_INTERPRET=1")),
    pytest.param("native", marks=pytest.mark.skipif(bool(rh.native_unavailable_reason()),
                                                    reason=rh.native_unavailable_reason() or "available")),
])
@pytest.mark.parametrize("error", [RuntimeError("an illegal memory access was encountered"),
                                   torch.OutOfMemoryError("CUDA out of memory (injected)")],
                         ids=["runtime-error", "out-of-memory"])
def test_auto_never_reruns_a_step_that_failed_at_run_time(monkeypatch, first, error):
    """Defect 9: with backend='auto', an op that raises after writing part of its output is not
    re-run by the next backend (that would apply the update twice); the error propagates, and one
    transient error does not demote the backend for later steps. Today functional catches every
    Exception, re-runs the step with the PyTorch backend and drops Triton for good."""
    rh.force_auto_order(monkeypatch, "cpu", (first, "torch"))
    failure = rh.inject_backend_failure(monkeypatch, first, "adam_step_", error, partial_write=True)
    torch_calls = rh.count_backend_calls(monkeypatch, "torch", "adam_step_")
    params = [torch.nn.Parameter(torch.randn(4, 3))]
    opt = cnl_ext.FusedCNLAdamW(params, lr=0.1)  # backend="auto"
    _set_grads([params], 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(type(error), match=re.escape(str(error))):
            opt.step()
    assert torch_calls[0] == 0, "the failed step was re-run by the torch backend"
    failure.raise_on_call = float("inf")  # the transient error is gone
    calls_before = failure.calls
    _set_grads([params], 1)
    opt.step()
    assert failure.calls > calls_before and torch_calls[0] == 0, f"{first} was demoted after one runtime error"


# ============================================================================ defect 10

@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with the gloo backend")
@pytest.mark.xdist_group("torchrun")  # never beside another torchrun job (see tests/integrations/test_distributed.py)
def test_capture_under_ddp_gradient_as_bucket_view(tmp_path):
    """Defect 10: under DDP(gradient_as_bucket_view=True), 2 ranks, gloo: the captured reference is
    the mean gradient of the whole mastered batches, the same on every rank, and no view of DDP's
    bucket (today it aliases the bucket, so the next backward overwrites it)."""
    from . import reliability_ddp_worker as worker
    from ..integrations.test_distributed import _torchrun

    out = tmp_path / "ddp.pt"
    _torchrun(pathlib.Path(worker.__file__), out)
    results = torch.load(out)
    expected = worker.expected_reference()
    for name, result in results.items():
        if isinstance(result, str):
            pytest.fail(f"{name}: the distributed run raised:\n{result}")
        problems = []
        for rank, (references, after_backward, aliases) in enumerate(result):
            for i, (r, r_after, want) in enumerate(zip(references, after_backward, expected)):
                if not torch.allclose(r, want, rtol=1e-5, atol=1e-7):
                    problems.append(f"rank {rank} parameter {i}: reference differs from the whole-batch mean "
                                    f"by {(r - want).abs().max():.3g}")
                if not torch.equal(r, r_after):
                    problems.append(f"rank {rank} parameter {i}: the next backward changed the reference")
            if any(aliases):
                problems.append(f"rank {rank}: references alias DDP's bucket for parameters "
                                f"{[i for i, a in enumerate(aliases) if a]}")
        for i, (r0, r1) in enumerate(zip(result[0][0], result[1][0])):
            if not torch.equal(r0, r1):
                problems.append(f"parameter {i}: the ranks hold different references")
        assert not problems, f"{name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_capture_accumulates_in_float32(backend, device, dtype):
    """Defect 10 (second part): capture for bf16/fp16 parameters sums the batch gradients in
    float32 (today in the parameter dtype: errors of the dtype's epsilon per batch)."""
    torch.manual_seed(10)
    model = torch.nn.Linear(16, 8).to(device, dtype)
    batches = [torch.randn(4, 16, device=device, dtype=dtype) * (1 + 3 * k) for k in range(12)]
    loss = lambda x: model(x).float().pow(2).mean()  # noqa: E731
    grads = [torch.autograd.grad(loss(x), list(model.parameters())) for x in batches]
    expected = [sum(g[i].float() for g in grads) / len(batches) for i in range(2)]
    opt = cnl_ext.FusedCNLAdamW(model.parameters(), backend=backend)
    with opt.capture_reference() as ref:
        for x in batches:
            ref.backward(loss(x))
    stored = opt.state_dict(include_reference=True)[rh.REFERENCE_KEY]["tensors"]
    for i, want in enumerate(expected):
        torch.testing.assert_close(stored[i].float(), want, rtol=1e-6, atol=1e-8)


# ============================================================================ defect 11

@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("wrapped", [False, True], ids=["fused", "CNL-wrapper"])
def test_bfloat16_reference_gives_the_float32_mask_for_tiny_values(backend, device, wrapped):
    """Defect 11: every reference format gives the float32 format's mask, also for references
    below bfloat16's range (fp32 denormals; today they round to 0, which counts as collaborative)."""
    torch.manual_seed(11)
    grad = torch.randn(64, device=device)
    reference = -torch.sign(grad) * 1e-44  # conflicts with u = g everywhere
    reference[::4] = torch.randn(16, device=device)  # and ordinary values
    results = {}
    for fmt in ("float32", "bfloat16", "int8", "sign2"):
        p = torch.nn.Parameter(torch.ones(64, device=device))
        if wrapped:
            opt = cnl_ext.CNL(torch.optim.SGD([p], lr=0.5), backend=backend, reference_dtype=fmt)
        else:
            opt = cnl_ext.FusedCNLSGD([p], lr=0.5, backend=backend, reference_dtype=fmt)
        opt.set_reference([reference])
        p.grad = grad.clone()
        opt.step()
        results[fmt] = p.detach().clone()
    frozen = results["float32"] == 1
    assert frozen[1::4].all()  # the tiny references freeze their elements
    for fmt, value in results.items():
        assert torch.equal(value, results["float32"]), f"{fmt} masks differently from float32"


# ============================================================================ defect 12

@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_channels_last_checkpoint_states_load_into_a_contiguous_parameter(backend, device, name):
    """Defect 12: a torch.optim checkpoint of a channels_last parameter (channels_last states)
    loaded for a contiguous parameter steps like torch.optim (today the states keep their strides
    and Triton walks them as contiguous)."""
    make_cnl, make_torch = FUSED[name]
    source_params = [rh.channels_last_parameter(device=device)]
    source = make_torch(source_params)
    _steps([(source_params, source)], 2)
    saved = source.state_dict()
    state_key = "momentum_buffer" if name == "SGD" else "exp_avg"
    assert saved["state"][0][state_key].is_contiguous(memory_format=torch.channels_last)
    params = [torch.nn.Parameter(source_params[0].detach().contiguous())]
    expected = [torch.nn.Parameter(source_params[0].detach().contiguous())]
    opt, torch_opt = make_cnl(params, backend=backend), make_torch(expected)
    opt.load_state_dict(saved)
    torch_opt.load_state_dict(saved)
    _steps([(params, opt), (expected, torch_opt)], 2, seed=30)
    _assert_close(params, expected)


# ============================================================================ defect 13

@pytest.mark.parametrize("backend,device", TRITON_BACKENDS)
@pytest.mark.parametrize("name", list(FUSED))
def test_multi_bucket_step_compiles_every_kernel_before_writing(monkeypatch, backend, device, name):
    """Defect 13: a step over two buckets (float32 and bfloat16 parameters) whose second kernel fails
    to compile changes nothing (today bucket 1 is written and the step counted before bucket 2's
    kernel compiles at its first launch)."""
    import triton.language as tl

    params = [torch.nn.Parameter(torch.randn(4, 3, device=device)),
              torch.nn.Parameter(torch.randn(6, device=device).to(torch.bfloat16))]
    opt = FUSED[name][0](params, backend=backend)
    _steps([(params, opt)], 1)
    rh.fail_triton_compile(monkeypatch, lambda constexprs: constexprs.get("P_DTYPE") == tl.bfloat16)
    _set_grads([params], 7)
    rh.assert_fails_atomically(opt, opt.step, RuntimeError, "injected compile failure")


# ============================================================================ defect 14

_DEFECT14_SCRIPT = """
import json, torch, cnl_ext
p = torch.nn.Parameter(torch.randn(5))
opt = cnl_ext.FusedCNLAdamW([p], backend="triton")
p.grad = torch.randn(5)
before = p.detach().clone()
try:
    opt.step()
    print("RESULT " + json.dumps(["no error", "", len(opt.state), torch.equal(p, before)]))
except Exception as exc:
    print("RESULT " + json.dumps([type(exc).__name__, str(exc), len(opt.state), torch.equal(p, before)]))
"""


@pytest.mark.skipif(HAS_CUDA, reason="checks the message where Triton has no GPU driver")
def test_triton_on_cpu_without_interpreter_says_what_to_do():
    """Defect 14: Triton on CPU tensors without TRITON_INTERPRET=1 raises an error that says Triton
    needs CUDA tensors or TRITON_INTERPRET=1 (today: '0 active drivers ([])'), and, defect 4, the
    failed step leaves no state behind."""
    result = rh.run_python(_DEFECT14_SCRIPT, unset=("TRITON_INTERPRET",))
    assert result.returncode == 0, rh.describe_process(result)
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    error, message, n_states, unchanged = json.loads(line[len("RESULT "):])
    assert error != "no error", "Triton stepped CPU tensors without the interpreter"
    assert "CUDA" in message and "TRITON_INTERPRET=1" in message, f"unclear error: {error}: {message}"
    assert n_states == 0 and unchanged, "the failed step created state or moved the parameter"


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("backend", ["torch", "triton", "native"])
def test_grad_scaler_step_reads_found_inf_with_at_most_one_sync(backend):
    """Defect 14 (second part): under GradScaler the fused step reads found_inf and the scale with
    at most one host synchronization (today two)."""
    if backend == "native" and rh.native_unavailable_reason():
        pytest.skip(rh.native_unavailable_reason())
    model = torch.nn.Linear(8, 4).cuda()
    opt = cnl_ext.FusedCNLAdamW(model.parameters(), backend=backend)
    scaler = torch.amp.GradScaler("cuda")
    for _ in range(2):  # the first step compiles kernels
        opt.zero_grad()
        scaler.scale(model(torch.randn(2, 8, device="cuda")).pow(2).mean()).backward()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                scaler.step(opt)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        scaler.update()
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]


# ============================================================================ failure injection per public call

@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name", list(FUSED))
@pytest.mark.parametrize("with_reference", [False, True], ids=["no-reference", "reference"])
def test_injected_step_failure_changes_nothing(monkeypatch, backend, device, name, with_reference):
    """``step``: the backend raises at launch (first step and a later one): nothing changed."""
    op = "sgd_step_" if name == "SGD" else "adam_step_"
    params = [torch.nn.Parameter(torch.randn(4, 3, device=device)), torch.nn.Parameter(torch.randn(5, device=device))]
    opt = FUSED[name][0](params, backend=backend, track_stats=True)
    if with_reference:
        opt.set_reference([torch.randn_like(p) for p in params])
    failure = rh.inject_backend_failure(monkeypatch, backend, op)
    _set_grads([params], 0)
    rh.assert_fails_atomically(opt, opt.step, RuntimeError, "injected launch failure")
    failure.raise_on_call = float("inf")  # one good step
    _steps([(params, opt)], 1, seed=1)
    failure.raise_on_call = failure.calls + 1  # then the next call of the op fails again
    _set_grads([params], 2)
    rh.assert_fails_atomically(opt, opt.step, RuntimeError, "injected launch failure")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name", ["FusedCNLAdamW", "CNL(Adam)"])
def test_injected_set_reference_failure_changes_nothing(monkeypatch, backend, device, name):
    """``set_reference``: storing the second reference fails; the previous reference is kept."""
    params, opt = _trained(OPTIMIZERS_WITH_STATE[name], backend, device)
    new = [torch.randn_like(p) for p in params]
    rh.fail_reference_encode(monkeypatch, on_call=2)
    rh.assert_fails_atomically(opt, lambda: opt.set_reference(new), RuntimeError, "injected failure")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name", ["FusedCNLAdamW", "CNL(Adam)"])
def test_injected_capture_reference_failure_changes_nothing(monkeypatch, backend, device, name):
    """``capture_reference``: storing the captured reference fails; reference, grads and all kept."""
    params, opt = _trained(OPTIMIZERS_WITH_STATE[name], backend, device, fmt="int8")
    _set_grads([params], 40)

    def capture():
        with opt.capture_reference() as ref:
            ref.backward(sum((p * p).sum() for p in params))

    rh.fail_reference_encode(monkeypatch, on_call=2)
    rh.assert_fails_atomically(opt, capture, RuntimeError, "injected failure")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name", ["FusedCNLAdamW", "CNL(Adam)"])
def test_injected_load_state_dict_failure_changes_nothing(monkeypatch, backend, device, name):
    """``load_state_dict``: converting the saved reference to this optimizer's format fails halfway;
    states, param groups and reference are kept."""
    make = OPTIMIZERS_WITH_STATE[name]
    _, source = _trained(make, backend, device, fmt="float32")
    saved = source.state_dict(include_reference=True)
    for group in saved["param_groups"]:
        group["lr"] = 0.5
    _, target = _trained(make, backend, device, fmt="int8")  # a format conversion on load
    rh.fail_reference_encode(monkeypatch, on_call=2)
    rh.assert_fails_atomically(target, lambda: target.load_state_dict(saved), RuntimeError, "injected failure")


@pytest.mark.parametrize("backend,device", rh.WRAPPER_BACKEND_DEVICES)
def test_injected_cnl_wrapper_write_back_failure_restores_the_parameters(monkeypatch, backend, device):
    """``CNL.step``: the masked write-back raises at launch after the inner step; the parameters,
    gradients, param groups and reference are as before. (The inner optimizer's own state is
    outside CNL's write-back and is not checked.)"""
    params = [torch.nn.Parameter(torch.randn(4, 3, device=device)), torch.nn.Parameter(torch.randn(5, device=device))]
    opt = cnl_ext.CNL(torch.optim.Adam(params, lr=0.1), backend=backend)
    opt.set_reference([torch.randn_like(p) for p in params])
    _steps([(params, opt)], 1)
    rh.inject_backend_failure(monkeypatch, backend, "masked_delta_")
    _set_grads([params], 3)
    before = rh.snapshot(opt)
    with pytest.raises(RuntimeError, match="injected launch failure"):
        opt.step()
    after = rh.snapshot(opt)
    for key in ("params", "grads", "param_groups", "reference"):
        assert rh._same(before[key], after[key]), f"the failed CNL.step changed the {key}"
