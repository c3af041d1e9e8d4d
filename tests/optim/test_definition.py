"""Every backend against the definition of the CNL steps (issue 21): the plain per-tensor functions
:func:`cnl_ext.optim.sgd.cnl_sgd_step`, :func:`cnl_ext.optim.adam.cnl_adam_step` and
:func:`cnl_ext.optim.wrapper.cnl_masked_delta`.

Each case runs one multi-tensor call of the backend's op over tensors of many shapes (0-d, empty,
odd sizes, 1-D to 4-D, larger than a Triton chunk or a native work item) for several steps, and the
definition tensor by tensor on copies of the same inputs. Parameters and optimizer states must be
bit-identical; so must the collaborative counts, which the bits of the masked update decide.

The sums of ``s`` differ only in the order of summation. Within a mask the terms of one sum share
one sign (``s ≥ 0`` where collaborative, ``s ≤ 0`` where conflicting), so a sum of n terms in
float32 is within ``(n − 1)·2^-24`` relative of the exact sum (no cancellation): the Triton kernels
sum a program's chunk in float32 (``TEST_CHUNK`` = 4096 elements here) and scale it by 1/lr in
float32, the native CPU kernels sum at most 32 terms per float32 lane; the rest is float64. Hence
``SUM_RTOL`` for float32, float16 and bfloat16 steps, and float64 round-off for float64 steps.

On CPU, torch's own ``sqrt`` is MKL's (an ulp off for about a sixth of float32 values): the
definition and the torch backend compute a correctly rounded one, as every kernel does.
"""
from __future__ import annotations

import pytest
import torch

from cnl_ext import functional, reference_format
from cnl_ext.ops import chunking, triton_step
from cnl_ext.optim.adam import cnl_adam_step
from cnl_ext.optim.sgd import cnl_sgd_step
from cnl_ext.optim.wrapper import cnl_masked_delta

from ..conftest import ALL_BACKEND_DEVICES, skip_unless_native_runs

BACKENDS = ALL_BACKEND_DEVICES
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
FORMATS = [None, *reference_format.FORMATS]
TEST_CHUNK = 4 * triton_step.BLOCK
NATIVE_ITEM = 32768  # cnl::cpu::kItemSize
SHAPES = [(), (0,), (1,), (7,), (33,), (1025,), (3, 5), (2, 3, 5, 7)]
# more than one Triton chunk, native work item, torch backend chunk (shrunk, below)
LARGE_SHAPES = {"triton": (2 * TEST_CHUNK + 3,), "native": (NATIVE_ITEM + 37,), "torch": (3 * 256 + 5,)}
STEPS = 3
LR = 0.1  # large: a wrongly masked element would move far
SUM_RTOL = TEST_CHUNK * 2.0**-24 + 2.0**-23  # module docstring


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    """Triton's and the torch backend's chunks shrunk, so that tensors span several and small ones pack."""
    monkeypatch.setattr(triton_step, "CHUNK", TEST_CHUNK)
    monkeypatch.setattr(chunking, "CPU_CHUNK", 256)
    monkeypatch.setattr(chunking, "DEVICE_CHUNK", TEST_CHUNK)


def _module(backend, device, dtype=None):
    if backend == "native":
        skip_unless_native_runs(device)
    module = functional.load_backend(backend)
    if isinstance(module, str):
        pytest.skip(f"backend {backend!r} unavailable: {module}")
    if dtype == torch.float64 and not module.capabilities(torch.device(device)).float64:
        pytest.skip(f"backend {backend!r} does not step float64 on {device}")
    return module


def _shapes(backend):
    return SHAPES + [LARGE_SHAPES[backend]]


def _inputs(backend, dtype, fmt, device, n_states, seed=0):
    """(params, states, grads of each step, references) over :func:`_shapes`."""
    generator = torch.Generator().manual_seed(seed)
    shapes = _shapes(backend)

    def randn(shape):
        return torch.randn(shape, generator=generator).to(device)

    params = [randn(s).to(dtype) for s in shapes]
    states = [[randn(s).abs().to(functional.state_dtype(dtype)) for s in shapes] for _ in range(n_states)]
    grads = [[randn(s).to(dtype) for s in shapes] for _ in range(STEPS)]
    refs = None
    if fmt is not None:
        raw = [randn(s) * (torch.rand(s, generator=generator) > 0.1).to(device) for s in shapes]  # exact zeros
        refs = [reference_format.encode(r, fmt) for r in raw]
    return params, states, grads, refs


def _clone(tensors):
    return None if tensors is None else [t.clone() for t in tensors]


def _assert_bits(got, want, what):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what}[{i}]"
        assert torch.equal(g, w), f"{what}[{i}] ({g.dtype}): {(g != w).sum().item()} of {g.numel()} elements differ"


def _assert_stats(got, want, dtype):
    assert torch.equal(got[:, 0], want[:, 0]), "collaborative counts differ"
    rtol = 1e-12 if dtype == torch.float64 else SUM_RTOL
    torch.testing.assert_close(got[:, 1:], want[:, 1:], rtol=rtol, atol=1e-30)
    assert want[:, 0].sum() > 0 and (want[:, 2] < 0).any()  # collaborative and conflicting elements both seen


def _compare(backend, device, dtype, fmt, op, definition, n_states, arguments):
    """``STEPS`` calls of the backend's ``op`` and of ``definition`` per tensor; ``arguments(k)`` gives
    (the op's keywords, the definition's keywords) of step k. ``n_states`` 0: one state list, None
    (SGD without momentum)."""
    module = _module(backend, device, dtype)
    params, states, grads, refs = _inputs(backend, dtype, fmt, device, n_states)
    states = states or [None]
    stats = None if fmt is None else torch.zeros(len(params), 3, dtype=torch.float64, device=device)
    got_params, got_states, got_stats = _clone(params), [_clone(s) for s in states], None if stats is None else stats.clone()
    want_params, want_states, want_stats = _clone(params), [_clone(s) for s in states], None if stats is None else stats.clone()
    for k in range(STEPS):
        op_kwargs, definition_kwargs = arguments(k)
        getattr(module, op)(got_params, grads[k], *got_states, refs, got_stats,
                            reference_format=fmt or "float32", **op_kwargs)
        for i in range(len(params)):
            row = definition(want_params[i], grads[k][i], *(s[i] if s is not None else None for s in want_states),
                             None if refs is None else refs[i], reference_format=fmt or "float32",
                             **definition_kwargs(i))
            if row is not None:
                want_stats[i] += row
    _assert_bits(got_params, want_params, "params")
    for j, (g, w) in enumerate(zip(got_states, want_states)):
        if g is not None:
            _assert_bits(g, w, f"state {j}")
    if stats is not None:
        _assert_stats(got_stats, want_stats, dtype)


def _covering(options):
    """(dtype, format, option set) triples: every dtype with every format, and every option set with
    every dtype and with every format (the option sets taken in turn), not the whole product."""
    names = list(options)
    return [pytest.param(dtype, fmt, names[(i + j) % len(names)], id=f"{dtype}-{fmt}-{names[(i + j) % len(names)]}")
            for i, dtype in enumerate(DTYPES) for j, fmt in enumerate(FORMATS)]


# ----------------------------------------------------------------------------- Adam / AdamW

ADAM_OPTIONS = {
    "adamw": dict(amsgrad=False, decoupled_weight_decay=True, weight_decay=0.1, maximize=False),
    "adam": dict(amsgrad=False, decoupled_weight_decay=False, weight_decay=0.0, maximize=False),
    "adam-l2-amsgrad-maximize": dict(amsgrad=True, decoupled_weight_decay=False, weight_decay=0.05, maximize=True),
    "adamw-amsgrad-no-decay": dict(amsgrad=True, decoupled_weight_decay=True, weight_decay=0.0, maximize=False),
}
# How the step count and lr reach the op: host floats; a Tensor lr with host bias corrections (a
# compiled step); device step counts and a device lr (capturable).
ADAM_SCALARS = ["host", "tensor-lr", "capturable"]


def _adam_arguments(backend, device, options, scalars, lr=LR, beta1=0.8, beta2=0.95):
    common = dict(beta1=beta1, beta2=beta2, eps=1e-6, **options)

    def arguments(k):
        t = k + 1
        lr_arg = lr if scalars == "host" else torch.tensor(lr, device=device)
        if scalars == "capturable":
            steps = [torch.tensor(float(t), device=device) for _ in _shapes(backend)]
            op = dict(common, lr=lr_arg, device_steps=steps)
            return op, lambda i: dict(common, lr=lr_arg, step=steps[i])
        op = dict(common, lr=lr_arg, bias_correction1=1 - beta1**t, bias_correction2=1 - beta2**t)
        return op, lambda i: dict(common, lr=lr_arg, step=t)

    return arguments


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype,fmt,options", _covering(ADAM_OPTIONS))
def test_adam_equals_the_definition(backend, device, dtype, fmt, options):
    _compare(backend, device, dtype, fmt, "adam_step_", cnl_adam_step, 3,
             _adam_arguments(backend, device, ADAM_OPTIONS[options], "host"))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype,fmt,scalars", [(dtype, fmt, scalars) for k, dtype in enumerate(DTYPES)
                                               for scalars, fmt in zip(("tensor-lr", "capturable"), FORMATS[k:][:2])])
def test_adam_with_device_scalars_equals_the_definition(backend, device, dtype, fmt, scalars):
    """A Tensor lr, and device step counts (the capturable bias corrections, one formula everywhere)."""
    if not _module(backend, device, dtype).capabilities(torch.device(device)).capturable:
        pytest.skip(f"backend {backend!r} takes no device scalars on {device}")
    _compare(backend, device, dtype, fmt, "adam_step_", cnl_adam_step, 3,
             _adam_arguments(backend, device, ADAM_OPTIONS["adamw"], scalars))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("scalars", ADAM_SCALARS)
def test_adam_at_lr_zero_moves_nothing_and_sums_zero(backend, device, dtype, scalars):
    """lr = 0: every parameter keeps its value, every element counts as collaborative (lr·u = 0), both
    sums are 0; the moments are updated as always."""
    module = _module(backend, device, dtype)
    if scalars != "host" and not module.capabilities(torch.device(device)).capturable:
        pytest.skip(f"backend {backend!r} takes no device scalars on {device}")
    params, states, grads, refs = _inputs(backend, dtype, "float32", device, 3)
    before, m_before = _clone(params), _clone(states[0])
    stats = torch.zeros(len(params), 3, dtype=torch.float64, device=device)
    op_kwargs, _ = _adam_arguments(backend, device, ADAM_OPTIONS["adamw"], scalars, lr=0.0)(0)
    module.adam_step_(params, grads[0], *states, refs, stats, reference_format="float32", **op_kwargs)
    _assert_bits(params, before, "params")
    assert not any(torch.equal(a, b) for a, b in zip(states[0], m_before) if a.numel())
    numels = torch.tensor([float(p.numel()) for p in params], dtype=torch.float64, device=device)
    assert torch.equal(stats, torch.stack([numels, torch.zeros_like(numels), torch.zeros_like(numels)], 1))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_a_device_lr_is_not_read_back(backend, device, monkeypatch):
    """A capturable step with a device lr and statistics reads no value back to the host."""
    module = _module(backend, device)
    if not module.capabilities(torch.device(device)).capturable:
        pytest.skip(f"backend {backend!r} takes no device scalars on {device}")
    params, states, grads, refs = _inputs(backend, torch.float32, "sign2", device, 3)
    stats = torch.zeros(len(params), 3, dtype=torch.float64, device=device)
    op_kwargs, _ = _adam_arguments(backend, device, ADAM_OPTIONS["adamw"], "capturable")(0)

    def refuse(*args, **kwargs):
        raise AssertionError("a device scalar was read back to the host")

    for name in ("item", "__float__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        module.adam_step_(params, grads[0], *states, refs, stats, reference_format="sign2", **op_kwargs)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    monkeypatch.undo()
    assert stats[:, 0].sum() > 0


# ----------------------------------------------------------------------------- SGD

SGD_OPTIONS = {
    "sgd": dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False),
    "momentum": dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False),
    "nesterov-decay": dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01, maximize=False),
    "dampening-maximize": dict(momentum=0.5, dampening=0.3, nesterov=False, weight_decay=0.0, maximize=True),
}


def _sgd_arguments(device, options, tensor_lr):
    lr = torch.tensor(LR, device=device) if tensor_lr else LR

    def arguments(k):
        kwargs = dict(options, lr=lr, first_step=k == 0)  # the first momentum step starts the buffer
        return kwargs, lambda i: kwargs

    return arguments


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype,fmt,options", _covering(SGD_OPTIONS))
def test_sgd_equals_the_definition(backend, device, dtype, fmt, options):
    opts = SGD_OPTIONS[options]
    _compare(backend, device, dtype, fmt, "sgd_step_", cnl_sgd_step, 1 if opts["momentum"] else 0,
             _sgd_arguments(device, opts, tensor_lr=False))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sgd_with_a_tensor_lr_equals_the_definition(backend, device, dtype):
    if not _module(backend, device, dtype).capabilities(torch.device(device)).capturable:
        pytest.skip(f"backend {backend!r} takes no device scalars on {device}")
    _compare(backend, device, dtype, "int8", "sgd_step_", cnl_sgd_step, 1,
             _sgd_arguments(device, SGD_OPTIONS["nesterov-decay"], tensor_lr=True))


# ----------------------------------------------------------------------------- the write-back

@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", reference_format.FORMATS)
def test_masked_delta_equals_the_definition(backend, device, dtype, fmt):
    """The CNL(...) wrapper's write-back; θ_before is passed in the op's ``grads`` position."""
    module = _module(backend, device, dtype)
    afters, (befores,), _, refs = _inputs(backend, dtype, fmt, device, 1)
    befores = [b.to(dtype) for b in befores]
    for b, a in zip(befores, afters):  # some elements unchanged (Δ = 0: collaborative)
        b.view(-1)[::5] = a.view(-1)[::5]
    got, want = _clone(afters), _clone(afters)
    got_stats = torch.zeros(len(afters), 3, dtype=torch.float64, device=device)
    module.masked_delta_(got, befores, refs, got_stats, reference_format=fmt, inv_lr=4.0)
    want_stats = torch.stack([cnl_masked_delta(p, b, r, reference_format=fmt, inv_lr=4.0)
                              for p, b, r in zip(want, befores, refs)])
    _assert_bits(got, want, "params")
    _assert_stats(got_stats, want_stats, dtype)
