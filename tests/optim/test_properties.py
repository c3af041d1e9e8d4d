"""Property-based tests (hypothesis) of issue 13: any shape, layout, dtype, reference format,
option and hyper-parameter steps the same on every backend.

Drawn: 1-3 parameters, each with a shape (0-d, empty, odd sizes, 4-D, larger than one Triton chunk,
which is shrunk here to 4 blocks), a memory layout for the parameter, its gradients and its
reference (contiguous, transposed, channels_last, sliced, expanded-then-cloned; gradients also
stride-0 expanded), a dtype (float32 / bfloat16 / float16, mixed dtypes make several buckets), a
reference format (or none), the optimizer (FusedCNLSGD/Adam/AdamW, CNL(SGD)/CNL(AdamW)), its
options and hyper-parameters, and 1-3 steps.

- every backend against the torch backend (parameters, optimizer states, statistics);
- with no reference, every backend against torch.optim (float32: torch.optim keeps low-precision
  states in the parameter dtype, the CNL optimizers in float32).

Fixed ``max_examples``, ``derandomize=True`` and no deadline, so that CI runs the same examples
every time in a bounded time.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("hypothesis")  # in setup.py's test extra; a bare GPU image may lack it
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import cnl_ext  # noqa: E402

from ..conftest import KERNEL_BACKEND_DEVICES  # noqa: E402
from . import reliability_helpers as rh  # noqa: E402

# No shrinking: a failure reports the example as drawn, in bounded time (shrinking a Triton case
# under the interpreter takes minutes).
SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
BLOCK = 1024
SMALL_CHUNK = 4 * BLOCK  # tests/optim/reliability_helpers.shrink_triton_chunks
SHAPES = [(), (0,), (3, 0), (1,), (7,), (3, 5), (2, 3, 4), (2, 3, 5, 7), (1, 3, 2, 2), (SMALL_CHUNK + 5,), (67, 65)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FORMATS = [None, "float32", "bfloat16", "int8", "sign2"]
KINDS = ["SGD", "Adam", "AdamW", "CNL(SGD)", "CNL(AdamW)"]
PARAM_LAYOUTS = list(rh.LAYOUTS)
GRAD_LAYOUTS = list(rh.LAYOUTS) + ["expanded"]

NON_TORCH_BACKENDS = KERNEL_BACKEND_DEVICES


@dataclasses.dataclass
class Case:
    kind: str
    options: dict
    shapes: list
    dtypes: list
    param_layouts: list
    grad_layouts: list
    reference_format: str | None
    reference_layouts: list
    steps: int
    seed: int


@st.composite
def cases(draw, *, formats=FORMATS, dtypes=DTYPES, kinds=KINDS):
    kind = draw(st.sampled_from(kinds))
    lr = draw(st.sampled_from([1e-3, 0.05, 0.3]))
    if kind in ("SGD", "CNL(SGD)"):
        momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
        nesterov = momentum > 0 and draw(st.booleans())
        options = dict(lr=lr, momentum=momentum, nesterov=nesterov,
                       dampening=0.0 if nesterov else draw(st.sampled_from([0.0, 0.3])),
                       weight_decay=draw(st.sampled_from([0.0, 0.01])), maximize=draw(st.booleans()))
    else:
        options = dict(lr=lr, betas=(draw(st.sampled_from([0.0, 0.5, 0.9])), draw(st.sampled_from([0.9, 0.999]))),
                       # CNL(torch.optim.AdamW) keeps fp16 states in fp16, where eps=1e-8 underflows to 0
                       eps=1e-3 if kind.startswith("CNL(") else draw(st.sampled_from([1e-8, 1e-3])),
                       weight_decay=draw(st.sampled_from([0.0, 0.05])),
                       amsgrad=draw(st.booleans()), maximize=draw(st.booleans()))
    n = draw(st.integers(1, 3))
    fmt = draw(st.sampled_from(formats))
    return Case(
        kind=kind, options=options,
        shapes=[draw(st.sampled_from(SHAPES)) for _ in range(n)],
        dtypes=[draw(st.sampled_from(dtypes)) for _ in range(n)],
        param_layouts=[draw(st.sampled_from(PARAM_LAYOUTS)) for _ in range(n)],
        grad_layouts=[draw(st.sampled_from(GRAD_LAYOUTS)) for _ in range(n)],
        reference_format=fmt,
        reference_layouts=[draw(st.sampled_from(PARAM_LAYOUTS)) for _ in range(n)],
        steps=draw(st.integers(1, 3)),
        seed=draw(st.integers(0, 2**16)),
    )


def _make_optimizer(case: Case, params, backend: str | None):
    """The CNL optimizer of ``case`` on ``backend``, or (backend None) the matching torch.optim one."""
    fmt = case.reference_format or "float32"
    extra = dict(backend=backend, reference_dtype=fmt, track_stats=case.reference_format is not None)
    options = case.options
    if case.kind.startswith("CNL("):
        inner = {"CNL(SGD)": torch.optim.SGD, "CNL(AdamW)": torch.optim.AdamW}[case.kind](params, **options)
        return inner if backend is None else cnl_ext.CNL(inner, **extra)
    if backend is None:
        torch_class = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}[case.kind]
        return torch_class(params, **options)
    return {"SGD": cnl_ext.FusedCNLSGD, "Adam": cnl_ext.FusedCNLAdam,
            "AdamW": cnl_ext.FusedCNLAdamW}[case.kind](params, **options, **extra)


def _run(case: Case, backend: str | None, device: str):
    """Step ``case`` on ``backend`` (None: torch.optim); (parameters, states, statistics per step)."""
    generator = torch.Generator().manual_seed(case.seed)
    values = [torch.randn(shape, generator=generator) for shape in case.shapes]
    grads = [[torch.randn(shape, generator=generator) for shape in case.shapes] for _ in range(case.steps)]
    references = None
    if case.reference_format is not None:
        references = []
        for shape in case.shapes:
            r = torch.randn(shape, generator=generator)
            r[torch.rand(shape, generator=generator) < 0.1] = 0.0  # exact zeros are collaborative
            references.append(r)
    params = [torch.nn.Parameter(rh.in_layout(v.to(device, dtype), layout))
              for v, dtype, layout in zip(values, case.dtypes, case.param_layouts)]
    opt = _make_optimizer(case, params, backend)
    if references is not None:
        opt.set_reference([rh.in_layout(r.to(device), layout) for r, layout in zip(references, case.reference_layouts)])
    stats = []
    for step_grads in grads:
        for p, g, layout in zip(params, step_grads, case.grad_layouts):
            p.grad = rh.in_layout(g.to(device, p.dtype), layout)
        opt.step()
        if references is not None:
            stats.append(opt.cnl_stats())
    states = opt.state_dict()["state"]
    return params, states, stats


def _assert_params_close(got, want):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype
        if g.dtype == torch.float32:
            torch.testing.assert_close(g.detach(), w.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"param {i}: {m}")
        else:  # one rounding to the parameter dtype per step: about an ulp
            eps = torch.finfo(g.dtype).eps
            torch.testing.assert_close(g.detach().float(), w.detach().float(), rtol=2 * eps, atol=2 * eps,
                                       msg=lambda m: f"param {i} ({g.dtype}): {m}")


def _assert_states_close(got, want, exact_dtypes=True):
    assert got.keys() == want.keys()
    for index in got:
        assert got[index].keys() == want[index].keys(), f"state keys of parameter {index}"
        for key, value in got[index].items():
            other = want[index][key]
            if key == "step":
                assert float(value) == float(other)
            elif isinstance(value, torch.Tensor):
                if exact_dtypes:
                    assert value.dtype == other.dtype
                torch.testing.assert_close(value.float(), other.float(), rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"state {key!r} of parameter {index}: {m}")


def _assert_stats_close(got, want, case):
    assert len(got) == len(want)
    for step_got, step_want in zip(got, want):
        assert (step_got is None) == (step_want is None)
        if step_got is None:
            continue
        assert step_got.total == step_want.total
        # counts may differ where u is within rounding of 0 (a coin flip in either implementation)
        assert abs(step_got.collaborative - step_want.collaborative) <= 2 + 1e-3 * step_want.total
        torch.testing.assert_close((step_got.sum_s_collaborative, step_got.sum_s_conflicting),
                                   (step_want.sum_s_collaborative, step_want.sum_s_conflicting), rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("backend,device", NON_TORCH_BACKENDS)
@settings(max_examples=60, **SETTINGS)
@given(case=cases())
def test_every_backend_steps_like_the_torch_backend(monkeypatch, backend, device, case):
    rh.shrink_triton_chunks(monkeypatch)
    params, states, stats = _run(case, backend, device)
    expected_params, expected_states, expected_stats = _run(case, "torch", device)
    _assert_params_close(params, expected_params)
    _assert_states_close(states, expected_states)
    _assert_stats_close(stats, expected_stats, case)


@pytest.mark.parametrize("backend,device", rh.BACKEND_DEVICES)
@settings(max_examples=40, **SETTINGS)
@given(case=cases(formats=[None], dtypes=[torch.float32], kinds=["SGD", "Adam", "AdamW"]))
def test_without_reference_every_backend_steps_like_torch_optim(monkeypatch, backend, device, case):
    rh.shrink_triton_chunks(monkeypatch)
    params, states, _ = _run(case, backend, device)
    expected_params, expected_states, _ = _run(case, None, device)
    _assert_params_close(params, expected_params)
    _assert_states_close(states, expected_states)


def _step_on(params, opt, grads, layouts):
    for p, g, layout in zip(params, grads, layouts):
        p.grad = rh.in_layout(g.to(p.device, p.dtype), layout)
    opt.step()


@pytest.mark.parametrize("backend,device", rh.BACKEND_DEVICES)
@settings(max_examples=25, **SETTINGS)
@given(case=cases(formats=[None], dtypes=[torch.float32], kinds=["SGD", "Adam", "AdamW"]),
       resumed_layout=st.sampled_from(PARAM_LAYOUTS))
def test_torch_optim_checkpoint_of_any_layout_resumes_like_torch_optim(monkeypatch, backend, device, case,
                                                                       resumed_layout):
    """A torch.optim checkpoint (states laid out like the drawn parameters) loads into a CNL optimizer
    whose parameters have another layout, and the run continues like torch.optim's (defect 12)."""
    rh.shrink_triton_chunks(monkeypatch)
    generator = torch.Generator().manual_seed(case.seed)
    values = [torch.randn(shape, generator=generator) for shape in case.shapes]
    grads = [[torch.randn(shape, generator=generator) for shape in case.shapes] for _ in range(case.steps + 1)]
    source = [torch.nn.Parameter(rh.in_layout(v.to(device), layout)) for v, layout in zip(values, case.param_layouts)]
    torch_opt = _make_optimizer(case, source, None)
    for step_grads in grads[:case.steps]:
        _step_on(source, torch_opt, step_grads, case.param_layouts)  # grads like the params, as autograd gives
    saved = torch_opt.state_dict()
    resumed = [torch.nn.Parameter(rh.in_layout(p.detach(), resumed_layout)) for p in source]
    opt = _make_optimizer(case, resumed, backend)
    opt.load_state_dict(saved)
    _step_on(resumed, opt, grads[-1], case.grad_layouts)
    _step_on(source, torch_opt, grads[-1], case.grad_layouts)
    _assert_params_close(resumed, source)
    _assert_states_close(opt.state_dict()["state"], torch_opt.state_dict()["state"])


@pytest.mark.parametrize("backend,device", rh.BACKEND_DEVICES)
@settings(max_examples=25, **SETTINGS)
@given(case=cases(kinds=["SGD", "Adam", "AdamW"]), fail_at_step=st.integers(1, 2))
def test_a_step_failing_at_launch_changes_nothing(monkeypatch, backend, device, case, fail_at_step):
    """Any optimizer, options, dtypes (mixed dtypes: several buckets), layouts, reference: a step whose
    first kernel launch fails leaves parameters, gradients, states, param groups and the reference
    bit for bit as they were (defect 4)."""
    rh.shrink_triton_chunks(monkeypatch)
    with pytest.MonkeyPatch.context() as per_example:  # the injection must not outlive this example
        _check_step_failing_at_launch(per_example, backend, device, case, fail_at_step)


def _check_step_failing_at_launch(monkeypatch, backend, device, case, fail_at_step):
    op = "sgd_step_" if case.kind == "SGD" else "adam_step_"
    failure = rh.inject_backend_failure(monkeypatch, backend, op)
    failure.raise_on_call = float("inf")
    generator = torch.Generator().manual_seed(case.seed)
    params = [torch.nn.Parameter(rh.in_layout(torch.randn(shape, generator=generator).to(device, dtype), layout))
              for shape, dtype, layout in zip(case.shapes, case.dtypes, case.param_layouts)]
    opt = _make_optimizer(case, params, backend)
    if case.reference_format is not None:
        opt.set_reference([rh.in_layout(torch.randn(shape, generator=generator).to(device), layout)
                           for shape, layout in zip(case.shapes, case.reference_layouts)])
    grads = [torch.randn(shape, generator=generator) for shape in case.shapes]
    for _ in range(fail_at_step - 1):
        _step_on(params, opt, grads, case.grad_layouts)
    for p, g, layout in zip(params, grads, case.grad_layouts):
        p.grad = rh.in_layout(g.to(device, p.dtype), layout)
    failure.raise_on_call = failure.calls + 1
    if all(p.numel() == 0 for p in params) and backend != "torch":
        return  # nothing to launch (a backend may skip empty tensors): no failure to observe
    rh.assert_fails_atomically(opt, opt.step, RuntimeError, "injected launch failure")
