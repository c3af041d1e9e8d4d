"""cnl_ext against torch's own optimizer test database (``torch.testing._internal.common_optimizers``).

For the ``OptimizerInfo`` entries of AdamW, Adam and SGD, every ``optim_inputs_func`` input runs
side by side with torch.optim (``foreach=False``) over several steps (a step where some gradients are
None, one where all are, a frozen parameter), in float32, float64, bfloat16, float16 and complex64,
at the tolerances torch's tests use for fused vs for-loop (``torch.testing.assert_close``'s defaults
for the dtype). Then the error inputs (same exception type), the schedulers, checkpoints both ways,
and, with a reference set, every backend that runs here against the PyTorch implementation.

float64 runs on every backend (computed in float64, with float64 states: issue 20); the differences
from torch.optim that the tests allow are those of docs/compatibility.md. The inputs and the
reference runs have CUDA variants (marked ``cuda``; scripts/gpu_session.sh runs them with the
whole suite): the same inputs with the tensors on the GPU, every GPU backend against the torch one.
"""
import copy
import warnings

import pytest
import torch
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db

import cnl_ext
from cnl_ext.reference_format import FORMATS

from ..conftest import BACKEND_DEVICES, NATIVE_DEVICES, requires_cuda, skip_unless_native_runs

PAIRS = {"AdamW": cnl_ext.FusedCNLAdamW, "Adam": cnl_ext.FusedCNLAdam, "SGD": cnl_ext.FusedCNLSGD}
INFOS = {info.optim_cls.__name__: info for info in optim_db if info.optim_cls.__name__ in PAIRS}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64]
STEPS = 7  # as torch's _test_derived_optimizers
NONE_GRADS = {3: (1,), 5: "all"}  # step -> parameters without a gradient at that step
# torch's for-loop Adam/SGD on 16-bit parameters computes in 16 bits and keeps 16-bit states; cnl_ext
# computes in float32 and keeps float32 states (docs/compatibility.md), which is what torch's fused
# implementation computes too. They agree to a few units in the last place of the 16-bit dtype.
LOW_PRECISION = {torch.float16: dict(rtol=4e-3, atol=4e-3), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}
# The CUDA variants (marked, run by scripts/gpu_session.sh) take the same inputs, with the tensors on the GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])]


def _inputs(name, dtype=torch.float32):
    return INFOS[name].optim_inputs_func(device="cpu", dtype=dtype)


def _cases(dtypes):
    return [pytest.param(name, i, dtype, id=f"{name}-{_inputs(name)[i].desc.replace(' ', '_')}-{str(dtype)[6:]}")
            for name in PAIRS for i in range(len(_inputs(name))) for dtype in dtypes]


def _params(dtype, device="cpu"):
    """A weight, a bias, a one-element tensor, and a frozen parameter (never a gradient), on ``device``
    (drawn on the CPU: the same values on every device)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (3,), (1,), (2, 2)]
    params = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) if not dtype.is_complex
              else torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    params = [torch.nn.Parameter(p.to(device)) for p in params]
    params[-1].requires_grad_(False)
    return params


def _grads(params, step, dtype):
    """The gradients of ``step`` (None where NONE_GRADS says, and for the frozen parameter)."""
    g = torch.Generator().manual_seed(100 + step)
    none = NONE_GRADS.get(step, ())
    grads = []
    for i, p in enumerate(params):
        if not p.requires_grad or none == "all" or i in none:
            grads.append(None)
        elif dtype.is_complex:
            grads.append(torch.randn(p.shape, generator=g, dtype=dtype).to(p.device))
        else:
            grads.append(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.device, dtype))
    return grads


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def _make(cls, params, kwargs, **extra):
    return cls(params, **copy.deepcopy(kwargs), **extra)


def _compare_states(ours, theirs, params_ours, params_theirs):
    for p, q in zip(params_ours, params_theirs):
        mine, torch_state = ours.state.get(p, {}), theirs.state.get(q, {})
        assert set(mine) == set(k for k, v in torch_state.items() if v is not None), (mine.keys(), torch_state.keys())
        for key, value in mine.items():
            expected = torch_state[key]
            # 16-bit parameters keep float32 states (docs/compatibility.md): compared in torch's dtype
            torch.testing.assert_close(value.to(expected.dtype), expected, msg=lambda m: f"state {key!r}: {m}",
                                       **LOW_PRECISION.get(p.dtype, {}))


def _run_side_by_side(ours, theirs, params_ours, params_theirs, dtype, schedulers=()):
    for step in range(STEPS):
        grads = _grads(params_ours, step, dtype)
        _set_grads(params_ours, grads)
        _set_grads(params_theirs, grads)
        ours.step()
        theirs.step()
        for pair in schedulers:
            for scheduler in pair:
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(1.0)
                else:
                    scheduler.step()
        for p, q in zip(params_ours, params_theirs):
            torch.testing.assert_close(p, q, msg=lambda m: f"step {step}: {m}", **LOW_PRECISION.get(dtype, {}))
    _compare_states(ours, theirs, params_ours, params_theirs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,index,dtype", _cases(DTYPES))
def test_every_input_matches_torch(name, index, dtype, device):
    """No reference: cnl_ext (backend auto) gives torch.optim's (foreach=False) parameters and states."""
    kwargs = _inputs(name, dtype)[index].kwargs
    params_ours, params_theirs = _params(dtype, device), _params(dtype, device)
    ours = _make(PAIRS[name], params_ours, kwargs)
    theirs = _make(INFOS[name].optim_cls, params_theirs, kwargs, foreach=False)
    _run_side_by_side(ours, theirs, params_ours, params_theirs, dtype)


def _error_cases():
    return [pytest.param(name, i, id=f"{name}-{e.optimizer_error_input.desc.replace(' ', '_')}")
            for name in PAIRS for i, e in enumerate(INFOS[name].optim_error_inputs_func(device="cpu", dtype=torch.float32))]


@pytest.mark.parametrize("name,index", _error_cases())
def test_error_inputs_raise_what_torch_raises(name, index):
    error = INFOS[name].optim_error_inputs_func(device="cpu", dtype=torch.float32)[index]
    optim_input = error.optimizer_error_input
    cls = PAIRS[name]

    def make():
        return cls(optim_input.params, **optim_input.kwargs)

    if error.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        if issubclass(error.error_type, Warning):
            with pytest.warns(error.error_type):
                make()
        else:
            with pytest.raises(error.error_type):
                make()
    else:
        optimizer = make()
        with pytest.raises(error.error_type):
            optimizer.step()


def _scheduler_cases():
    cases = []
    for name in PAIRS:
        inputs = _inputs(name)
        chosen = [0] + [i for i, o in enumerate(inputs) if isinstance(o.kwargs.get("lr"), torch.Tensor)]
        for k in range(len(INFOS[name].scheduler_inputs)):
            cases += [pytest.param(name, i, k, id=f"{name}-{inputs[i].desc.replace(' ', '_')}-schedulers{k}")
                      for i in chosen]
    return cases


@pytest.mark.parametrize("name,index,schedulers", _scheduler_cases())
def test_schedulers_drive_cnl_as_torch(name, index, schedulers):
    kwargs = _inputs(name)[index].kwargs
    params_ours, params_theirs = _params(torch.float32), _params(torch.float32)
    ours = _make(PAIRS[name], params_ours, kwargs)
    theirs = _make(INFOS[name].optim_cls, params_theirs, kwargs, foreach=False)
    makers = INFOS[name].scheduler_inputs[schedulers]
    pairs = [[make(ours) for make in makers], [make(theirs) for make in makers]]
    _run_side_by_side(ours, theirs, params_ours, params_theirs, torch.float32, schedulers=pairs)
    assert [float(g["lr"]) for g in ours.param_groups] == [float(g["lr"]) for g in theirs.param_groups]


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
@pytest.mark.parametrize("name", list(PAIRS))
def test_checkpoints_load_both_ways(name, dtype):
    """cnl_ext -> torch.optim and torch.optim -> cnl_ext mid-run: the continued runs agree, and a
    cnl_ext checkpoint leaves torch's implementation flags (foreach, fused) as they were."""
    kwargs = _inputs(name, dtype)[-1].kwargs  # the last input: the most options
    for source_is_cnl in (True, False):
        params_a, params_b = _params(dtype), _params(dtype)
        source = _make(PAIRS[name] if source_is_cnl else INFOS[name].optim_cls, params_a, kwargs)
        for step in range(3):
            _set_grads(params_a, _grads(params_a, step, dtype))
            source.step()
        with torch.no_grad():
            for p, q in zip(params_b, params_a):
                p.copy_(q)
        target = _make(INFOS[name].optim_cls if source_is_cnl else PAIRS[name], params_b, kwargs)
        flags = [(g["foreach"], g["fused"]) for g in target.param_groups]
        saved = source.state_dict()
        if source_is_cnl:
            assert all(not g["fused"] and not g["foreach"] for g in saved["param_groups"])
        target.load_state_dict(copy.deepcopy(saved))
        if source_is_cnl:
            assert [(g["foreach"], g["fused"]) for g in target.param_groups] == flags
        ours, theirs = (source, target) if source_is_cnl else (target, source)
        params_ours, params_theirs = (params_a, params_b) if source_is_cnl else (params_b, params_a)
        _run_side_by_side(ours, theirs, params_ours, params_theirs, dtype)


@pytest.mark.parametrize("fused,foreach", [(None, None), (False, None), (None, False), (False, False), (True, None),
                                           (None, True)])
@pytest.mark.parametrize("name", list(PAIRS))
def test_torch_implementation_flags_run_the_same_math(name, fused, foreach):
    kwargs = _inputs(name)[-1].kwargs
    params_ours, params_theirs = _params(torch.float32), _params(torch.float32)
    ours = _make(PAIRS[name], params_ours, kwargs, fused=fused, foreach=foreach)
    assert all(g["fused"] is fused and g["foreach"] is foreach for g in ours.param_groups)  # stored as given
    theirs = _make(INFOS[name].optim_cls, params_theirs, kwargs, foreach=False)
    _run_side_by_side(ours, theirs, params_ours, params_theirs, torch.float32)


def test_sparse_gradients_are_refused_by_name():
    p = torch.nn.Parameter(torch.randn(4, 3))
    optimizer = cnl_ext.FusedCNLSGD([p], lr=0.1)
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients.*sparse=False"):
        optimizer.step()
    assert not optimizer.state


# ---------------------------------------------------------------- with a reference, per backend

REFERENCE_BACKENDS = [p for p in BACKEND_DEVICES if p.values[0] == "triton"] + NATIVE_DEVICES
# The Triton interpreter is slow: every input in float32, and each other dtype on a third of them.
TRITON_DTYPES_EVERY = 3


def _reference(params, dtype):
    g = torch.Generator().manual_seed(7)
    refs = []
    for i, p in enumerate(params):
        if i == 1:
            refs.append(None)  # a parameter without a reference in the same group
        elif dtype.is_complex:
            refs.append(torch.randn(p.shape, generator=g, dtype=dtype).to(p.device))
        else:
            refs.append(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.device, dtype))
    return refs


@pytest.mark.parametrize("backend,device", REFERENCE_BACKENDS)
@pytest.mark.parametrize("name,index,dtype", _cases(DTYPES))
def test_with_a_reference_every_backend_matches_the_torch_backend(name, index, dtype, backend, device):
    if backend == "native":
        skip_unless_native_runs(device)
    if (backend, device) == ("triton", "cpu") and dtype != torch.float32 and \
            (index + DTYPES.index(dtype)) % TRITON_DTYPES_EVERY:
        pytest.skip("Triton interpreter: this dtype runs on a third of the inputs (see TRITON_DTYPES_EVERY)")
    kwargs = _inputs(name, dtype)[index].kwargs
    fmt = FORMATS[index % len(FORMATS)]
    runs = {}
    for which in (backend, "torch"):
        params = _params(dtype, device)
        optimizer = _make(PAIRS[name], params, kwargs, backend=which, reference_dtype=fmt, track_stats=True)
        optimizer.set_reference(_reference(params, dtype))
        stats = []
        for step in range(STEPS):
            _set_grads(params, _grads(params, step, dtype))
            optimizer.step()
            stats.append(optimizer.cnl_stats())
        runs[which] = (params, optimizer, stats)
    (params, optimizer, stats), (expected_params, expected_optimizer, expected_stats) = runs[backend], runs["torch"]
    for p, q in zip(params, expected_params):
        torch.testing.assert_close(p, q)
    for p, q in zip(params, expected_params):
        for key, value in optimizer.state[p].items():
            torch.testing.assert_close(value, expected_optimizer.state[q][key])
    assert [s and (s.collaborative, s.total) for s in stats] == \
        [s and (s.collaborative, s.total) for s in expected_stats]
    # the reference moved something and froze something (the mask did apply)
    last = expected_stats[-2] if expected_stats[-1] is None else expected_stats[-1]
    assert 0 < last.collaborative < last.total


@pytest.mark.parametrize("dtype", [torch.complex64])
def test_complex_reference_masks_the_view_as_real_pairs(dtype):
    """A complex parameter's mask is taken element by element of its view_as_real pairs: the same
    as stepping the real view as a float32 parameter with the real view of the reference."""
    p = torch.nn.Parameter(torch.randn(6, 4, dtype=dtype))
    q = torch.nn.Parameter(torch.view_as_real(p.detach()).clone())
    reference = torch.randn(6, 4, dtype=dtype)
    ours = cnl_ext.FusedCNLAdamW([p], lr=0.1, backend="torch", track_stats=True)
    real = cnl_ext.FusedCNLAdamW([q], lr=0.1, backend="torch", track_stats=True)
    ours.set_reference([reference])
    real.set_reference([torch.view_as_real(reference)])
    for step in range(3):
        g = torch.randn(6, 4, dtype=dtype)
        p.grad, q.grad = g, torch.view_as_real(g).clone()
        ours.step()
        real.step()
    torch.testing.assert_close(torch.view_as_real(p.detach()), q.detach(), rtol=0, atol=0)
    stats, real_stats = ours.cnl_stats(), real.cnl_stats()
    assert (stats.collaborative, stats.total) == (real_stats.collaborative, real_stats.total)
    assert stats.total == 2 * p.numel() and 0 < stats.collaborative < stats.total
    with pytest.raises(TypeError, match="complex tensor is needed"):
        ours.set_reference([torch.view_as_real(reference)[..., 0]])

