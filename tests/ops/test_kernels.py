"""Every backend against the PyTorch backend (the oracle), at the level of the ops contract.

One harness and one tolerance policy for all backends (``triton``, ``native``; the oracle is
``torch``): each case runs one multi-tensor call over tensors of many shapes (scalars, empty, odd
sizes, 1-D to 4-D, larger than one chunk / work item) for several steps, on copies of the same
inputs, and compares parameters, optimizer states and statistics; and it checks that the op wrote
neither grads nor references.

Tolerance policy (:func:`_assert_same`): float32 within 1e-5 relative; float64 within 1e-12 relative
(a step computed in float32 anywhere would be off by ~1e-7); bfloat16/float16 within about one ulp of
the values' scale (a wrongly masked element moves by ~LR, far beyond either); statistics: counts
within rounding-of-zero flips, sums within 1e-4 relative (1e-10 for float64 steps).

float64 parameters run on every backend (``capabilities(device).float64``), computed in float64 with
float64 states; :func:`test_float64_goes_to_a_backend_that_steps_it` checks the capability.

Exactness. The native CPU kernels round every operation separately, like the torch backend on
paper. On CPU, torch itself does not: its AVX2/AVX512 kernels contract ``add(alpha=)`` and
``addcmul`` into FMAs, and ``Tensor.sqrt`` is MKL's (not correctly rounded; 15-20% of elements differ
by an ulp). With ``ATEN_CPU_CAPABILITY=default`` (no FMA) and a correctly rounded sqrt in the
oracle, the native kernels equal it bit for bit; ``CNL_TEST_EXACT=1`` asserts that, and
:func:`test_native_equals_torch_backend_bit_for_bit` runs this file so in a subprocess.
"""
import contextlib
import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cnl_ext import functional, reference_format
from cnl_ext.ops import chunking, native_backend, triton_sgd, triton_step
from cnl_ext.ops import importance as importance_module

from ..conftest import KERNEL_BACKEND_DEVICES, TRITON_ON_CPU, requires_cuda

ROOT = Path(__file__).resolve().parents[2]
EXACT = os.environ.get("CNL_TEST_EXACT") == "1"

# Chunks are shrunk for Triton (fixture below) so that a small tensor spans several of them; the
# native CPU kernels cut tensors into work items of a fixed size. The oracle's chunks are shrunk too,
# so that its chunk boundaries and packed small tensors are part of every comparison.
TEST_CHUNK = 4 * triton_step.BLOCK
ORACLE_CHUNK = {"CPU_CHUNK": 256, "DEVICE_CHUNK": 4096}
NATIVE_ITEM = 32768  # cnl::cpu::kItemSize (csrc/cpu/cnl_cpu_kernels.h); checked by test_native_build_info
SHAPES = [(), (0,), (1,), (7,), (31,), (33,), (1023,), (1025,), (3, 5), (2, 3, 4), (2, 3, 5, 7)]
LARGE_SHAPE = {"triton": (2 * TEST_CHUNK + 3,), "native": (2 * NATIVE_ITEM + 37,)}
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
FORMATS = [None, *reference_format.FORMATS]
# lr is large so that a wrongly masked element moves far beyond the bf16/fp16 tolerance.
LR = 0.1
IMPORTANCE_BETAS = (0.8, 0.6)  # KIF's EMAs (a step's importance= extension), not the defaults: 1 - beta is not exact


def torch_backend():
    return functional.load_backend("torch")


def backend_module(name):
    """The backend's module; native's even where it cannot run (its tests skip with the reason)."""
    return native_backend if name == "native" else functional.load_backend(name)


def masked_delta_op(name):
    """The backend's masked_delta_."""
    return backend_module(name).masked_delta_


def _native_cpu_skip_reason():
    """Why the native CPU kernels are not tested here ('' when they are). Computed on first use
    (it may compile them); unavailability fails instead of skipping under CNL_EXT_REQUIRE_NATIVE=1."""
    return native_backend.unavailable_reason()  # raises (the test fails) under CNL_EXT_REQUIRE_NATIVE=1


# (backend, device) of every backend under test; CUDA ones are marked and skip without a GPU.
BACKENDS = KERNEL_BACKEND_DEVICES


@pytest.fixture(autouse=True)
def _backend_ready(request, monkeypatch):
    """Small Triton and oracle chunks; skip (or fail, see above) a native case whose kernels are unavailable."""
    monkeypatch.setattr(triton_step, "CHUNK", TEST_CHUNK)
    for name, size in ORACLE_CHUNK.items():
        monkeypatch.setattr(chunking, name, size)
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("backend") not in ("native", "triton"):
        return
    backend, device = callspec.params["backend"], torch.device(callspec.params.get("device", "cpu"))
    if callspec.params.get("dtype") == torch.float64 and not backend_module(backend).capabilities(device).float64:
        pytest.skip(f"backend {backend!r} does not step float64 parameters on {device}")
    if backend != "native":
        return
    if callspec.params.get("device") == "cuda":
        reason = native_backend.cuda_unavailable_reason()
    else:
        reason = _native_cpu_skip_reason()
    if reason:
        pytest.skip(f"native backend unavailable: {reason}")


@contextlib.contextmanager
def _oracle_rounding():
    """Under CNL_TEST_EXACT=1: the oracle's sqrt correctly rounded (as the kernels' and CUDA's), not MKL's."""
    if not EXACT:
        yield
        return

    sqrt = torch.sqrt

    def exact_sqrt(t, *, out):
        if t.dtype == torch.float64:  # numpy's sqrt is the instruction's, correctly rounded (torch's is MKL's)
            return out.copy_(torch.from_numpy(np.sqrt(t.cpu().numpy())))
        return out.copy_(sqrt(t.double()))  # sqrt in double, rounded once: correctly rounded

    torch.sqrt = exact_sqrt  # the oracle's one sqrt per element (torch.sqrt(second, out=denom))
    try:
        yield
    finally:
        torch.sqrt = sqrt


def _shapes(backend):
    return SHAPES + [LARGE_SHAPE[backend]]


def _random_reference(shape, device):
    r = torch.randn(shape, device=device)
    r[torch.rand(shape, device=device) < 0.1] = 0.0  # exact zeros are collaborative by definition
    return r


def _setup(shapes, dtype, fmt, device, n_state):
    params = [torch.randn(s, device=device).to(dtype) for s in shapes]
    states = [[torch.randn(s, device=device, dtype=functional.state_dtype(dtype)).abs() for s in shapes]
              for _ in range(n_state)]
    refs = None if fmt is None else [reference_format.encode(_random_reference(s, device), fmt) for s in shapes]
    return params, states, refs


def _offset_view(t):
    """``t``'s values in a view one element into a larger buffer: its address is not 16-byte aligned."""
    buffer = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buffer[1:].view(t.shape)
    view.copy_(t)
    return view


def _clone(tensors):
    """Copies that keep each tensor's alignment (an unaligned view's copy is an unaligned view)."""
    return None if tensors is None else [_offset_view(t) if t.data_ptr() % 16 else t.clone() for t in tensors]


def _assert_same(got, want, dtype, exact=False):
    """The one tolerance policy (module docstring); ``exact``: bit for bit."""
    for g, w in zip(got, want):
        if exact:
            assert torch.equal(g, w), f"{(g != w).sum().item()} of {g.numel()} elements differ"
        elif dtype == torch.float32:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        elif dtype == torch.float64:  # computed in float64 throughout: a float32 step would be ~1e-7 off
            assert g.dtype == w.dtype == torch.float64
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-13)
        else:  # rounded once per step: allow about an ulp at the values' scale (~1); a masking
            # error moves an element by ~LR, far beyond this
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(g.float(), w.float(), rtol=eps, atol=2 * eps)


def _assert_stats_close(got, want, shapes, dtype=torch.float32):
    """Counts may differ where ``u`` is within rounding of 0 (its sign is then a coin flip in either
    implementation): a few elements per tensor. The sums are continuous in such elements; a float64
    step sums float64 products."""
    numels = torch.tensor([float(torch.Size(s).numel()) for s in shapes], dtype=torch.float64, device=got.device)
    assert ((got[:, 0] - want[:, 0]).abs() <= 2 + 1e-3 * numels).all()
    if dtype == torch.float64:
        torch.testing.assert_close(got[:, 1:], want[:, 1:], rtol=1e-10, atol=1e-9)
    else:
        torch.testing.assert_close(got[:, 1:], want[:, 1:], rtol=1e-4, atol=1e-3)
    assert got[:, 0].sum() > 0  # some elements were collaborative and counted


def _importance_kwargs(importance, emas):
    """The op's keywords of the importance extension: ``importance`` is None or (kind, sensitivities,
    uncertainties); ``emas`` the two lists the op is to update."""
    if importance is None:
        return {}
    return dict(importance=tuple(emas), importance_kind=importance[0], importance_betas=IMPORTANCE_BETAS)


def _run_both(backend, step_name, params, grads, states, refs, fmt, stats, steps, kwargs, importance=None):
    """Run the backend's op and the oracle's ``steps`` times on copies; return both results
    (params, states, stats, importance EMAs). ``importance``: None, or (kind, sensitivities,
    uncertainties), KIF's EMAs that each step updates. Also checks that the backend wrote neither the
    grads nor the references."""
    results = []
    grads_before = [[g.clone() for g in gs] for gs in grads]
    refs_before = None if refs is None else [r.clone() for r in refs]
    for name in (backend, "torch"):
        module = backend_module(name)
        p, s, st = _clone(params), [_clone(x) for x in states], None if stats is None else stats.clone()
        emas = None if importance is None else [_clone(x) for x in importance[1:]]
        with _oracle_rounding() if name == "torch" else contextlib.nullcontext():
            for k in range(steps):
                getattr(module, step_name)(p, grads[k], *s, refs, st, reference_format=fmt or "float32", **kwargs(k),
                                           **_importance_kwargs(importance, emas))
        results.append((p, s, st, emas))
        if name == backend:
            for gs, gs_before in zip(grads, grads_before):
                assert all(torch.equal(a, b) for a, b in zip(gs, gs_before)), "the op wrote a gradient"
            if refs is not None:
                assert all(torch.equal(a, b) for a, b in zip(refs, refs_before)), "the op wrote a reference"
    return results


def _exact(backend, device):
    return EXACT and backend == "native" and device == "cpu"


def _importance_inputs(kind, shapes, device):
    """(kind, sensitivities, uncertainties) for _run_both: EMAs some steps old (positive, float32)."""
    return None if kind is None else (kind, *([torch.rand(s, device=device) for s in shapes] for _ in range(2)))


def _check_importance(backend, step_name, params, grads, states, refs, fmt, steps, kwargs, importance, got, want,
                      dtype, exact):
    """The importance EMAs of the backend's steps (``got``: its _run_both result): as close to the
    oracle's (``want``) as the parameters they read, and bit for bit an observer: the backend's step
    without them leaves the same parameters and states, and
    :func:`cnl_ext.ops.importance.importance_update_` after it gives the same EMAs."""
    p_t, s_t, _, ema_t = got
    for a, b in zip(ema_t, want[3]):  # float32 EMAs (of a float64 parameter rounded to float32)
        _assert_same(a, b, torch.float32 if dtype == torch.float64 else dtype, exact)
    module = backend_module(backend)
    p, s, emas = _clone(params), [_clone(x) for x in states], [_clone(x) for x in importance[1:]]
    for k in range(steps):
        getattr(module, step_name)(p, grads[k], *s, refs, None, reference_format=fmt or "float32", **kwargs(k))
        importance_module.importance_update_(p, grads[k], *emas, kind=importance[0], betas=IMPORTANCE_BETAS)
    for got_list, want_list in zip([p_t, *s_t, *ema_t], [p, *s, *emas]):
        if got_list is not None:
            _assert_same(got_list, want_list, None, exact=True)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("amsgrad,decoupled,weight_decay,maximize", [
    (False, True, 0.1, False),   # AdamW as in the paper
    (False, False, 0.0, False),  # Adam
    (True, False, 0.05, True),   # Adam with L2 decay, AMSGrad, maximize
    (True, True, 0.0, False),    # AdamW without decay
])
def test_adam_kernel_matches_reference(backend, device, dtype, fmt, amsgrad, decoupled, weight_decay, maximize):
    _check_adam_against_reference(backend, device, dtype, fmt, amsgrad, decoupled, weight_decay, maximize)


def _check_adam_against_reference(backend, device, dtype, fmt, amsgrad, decoupled, weight_decay, maximize,
                                  unaligned=False, capturable=False, importance=None):
    """Three Adam steps of the backend and the oracle on the same inputs; ``unaligned`` places every
    tensor at an odd address (a flat buffer's slices), where kernels take their unaligned path;
    ``capturable`` passes lr as a tensor and step counts instead of bias corrections; ``importance``
    (a kind) has the steps update KIF's EMAs too (:func:`_check_importance`)."""
    shapes = _shapes(backend)
    params, states, refs = _setup(shapes, dtype, fmt, device, n_state=3)
    steps = 3
    grads = [[torch.randn(s, device=device).to(dtype) for s in shapes] for _ in range(steps)]
    if unaligned:
        params, grads = [_offset_view(p) for p in params], [[_offset_view(t) for t in g] for g in grads]
        states = [[_offset_view(t) for t in x] for x in states]
        refs = None if refs is None else [_offset_view(r) for r in refs]
        if backend == "triton":
            nonempty = [p for p in params if p.numel()]
            assert not triton_step._pointer_table((_clone(nonempty),), torch.device(device))[1]  # as _run_both copies
    stats = None if fmt is None else torch.zeros(len(shapes), 3, dtype=torch.float64, device=device)
    beta1, beta2 = 0.8, 0.95

    def kwargs(k):
        t = k + 1
        options = dict(lr=LR, beta1=beta1, beta2=beta2, eps=1e-6, weight_decay=weight_decay,
                       decoupled_weight_decay=decoupled, amsgrad=amsgrad, maximize=maximize)
        if capturable:
            return dict(options, lr=torch.tensor(LR, device=device),
                        device_steps=[torch.tensor(float(t), device=device) for _ in shapes])
        return dict(options, bias_correction1=1 - beta1**t, bias_correction2=1 - beta2**t)

    importance = _importance_inputs(importance, shapes, device)
    got, want = _run_both(backend, "adam_step_", params, grads, states, refs, fmt, stats, steps, kwargs, importance)
    (p_t, s_t, st_t, _), (p_r, s_r, st_r, _) = got, want
    exact = _exact(backend, device) and not capturable  # step counts: bias corrections rounded differently
    _assert_same(p_t, p_r, dtype, exact)
    for a, b in zip(s_t, s_r):
        _assert_same(a, b, functional.state_dtype(dtype), exact)
    if stats is not None:
        _assert_stats_close(st_t, st_r, shapes, dtype)
    if importance is not None:
        _check_importance(backend, "adam_step_", params, grads, states, refs, fmt, steps, kwargs, importance, got,
                          want, dtype, exact)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("momentum,dampening,nesterov,weight_decay,maximize", [
    (0.0, 0.0, False, 0.0, False),   # SGD as in the paper
    (0.9, 0.0, False, 0.0, False),   # Momentum as in the paper
    (0.9, 0.0, True, 0.01, False),   # Nesterov with L2 decay
    (0.5, 0.3, False, 0.0, True),    # dampening, maximize
])
def test_sgd_kernel_matches_reference(backend, device, dtype, fmt, momentum, dampening, nesterov, weight_decay, maximize):
    _check_sgd_against_reference(backend, device, dtype, fmt, momentum, dampening, nesterov, weight_decay, maximize)


def _check_sgd_against_reference(backend, device, dtype, fmt, momentum, dampening, nesterov, weight_decay, maximize,
                                 capturable=False, importance=None):
    shapes = _shapes(backend)
    params, states, refs = _setup(shapes, dtype, fmt, device, n_state=1 if momentum else 0)
    steps = 3
    grads = [[torch.randn(s, device=device).to(dtype) for s in shapes] for _ in range(steps)]
    stats = None if fmt is None else torch.zeros(len(shapes), 3, dtype=torch.float64, device=device)
    if not momentum:
        states = [None]  # the momentum_buffers argument

    def kwargs(k):
        lr = torch.tensor(LR, device=device) if capturable else LR
        return dict(lr=lr, weight_decay=weight_decay, momentum=momentum, dampening=dampening,
                    nesterov=nesterov, maximize=maximize, first_step=(k == 0))

    importance = _importance_inputs(importance, shapes, device)
    got, want = _run_both(backend, "sgd_step_", params, grads, states, refs, fmt, stats, steps, kwargs, importance)
    (p_t, s_t, st_t, _), (p_r, s_r, st_r, _) = got, want
    exact = _exact(backend, device)
    _assert_same(p_t, p_r, dtype, exact)
    if momentum:
        _assert_same(s_t[0], s_r[0], functional.state_dtype(dtype), exact)
    if stats is not None:
        _assert_stats_close(st_t, st_r, shapes, dtype)
    if importance is not None:
        _check_importance(backend, "sgd_step_", params, grads, states, refs, fmt, steps, kwargs, importance, got,
                          want, dtype, exact)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("fmt", [None, "float32"])
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam", "adamw"])
@pytest.mark.parametrize("kind", importance_module.IMPORTANCE_KINDS)
def test_importance_in_the_step_matches_reference(backend, device, dtype, fmt, optimizer, kind):
    """KIF's EMAs updated inside the step (issue 15): against the oracle, and an observer whose EMAs
    are importance_update_'s after the step bit for bit (:func:`_check_importance`). Momentum and
    Adam maximize: the EMAs read the gradient as passed."""
    if not backend_module(backend).capabilities(torch.device(device)).importance:
        pytest.skip(f"the {backend} backend updates no importance EMAs on {device} (functional does, after the step)")
    if optimizer == "sgd":
        _check_sgd_against_reference(backend, device, dtype, fmt, 0.0, 0.0, False, 0.0, False, importance=kind)
    elif optimizer == "momentum":
        _check_sgd_against_reference(backend, device, dtype, fmt, 0.9, 0.0, True, 0.01, True, importance=kind)
    elif optimizer == "adam":
        _check_adam_against_reference(backend, device, dtype, fmt, amsgrad=True, decoupled=False, weight_decay=0.05,
                                      maximize=True, importance=kind)
    else:
        _check_adam_against_reference(backend, device, dtype, fmt, amsgrad=False, decoupled=True, weight_decay=0.1,
                                      maximize=False, importance=kind)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", [None, "float32", "sign2"])
def test_unaligned_tensors_match_reference(backend, device, dtype, fmt):
    _check_adam_against_reference(backend, device, dtype, fmt, amsgrad=True, decoupled=True, weight_decay=0.1,
                                  maximize=False, unaligned=True)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] == "native"])
@pytest.mark.parametrize("fmt", [None, "sign2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_capturable_arguments_match_reference(backend, device, fmt, dtype):
    """lr as a 0-d tensor, step counts instead of bias corrections (CUDA graphs; trivial on CPU)."""
    _check_adam_against_reference(backend, device, dtype, fmt, amsgrad=False, decoupled=True,
                                  weight_decay=0.1, maximize=False, capturable=True)
    _check_sgd_against_reference(backend, device, dtype, fmt, 0.9, 0.0, False, 0.01, False, capturable=True)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("fmt", reference_format.FORMATS)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
def test_write_back_matches_reference(backend, device, fmt, dtype):
    """masked_delta_ (the CNL(...) wrapper's write-back) against the oracle and the rule written out."""
    shapes = [LARGE_SHAPE[backend], (70_001,), (3, 5), (1,), (0,), (257, 3), (33,)]
    befores = [torch.randn(s, device=device).to(dtype) for s in shapes]
    afters = [b + torch.randn(b.shape, device=device).to(dtype) * 0.1 for b in befores]
    for a in afters:  # exact zeros in Δ and in r are collaborative
        a.view(-1)[:3] = torch.tensor([0.0, 0.0, 1.0], dtype=dtype)[: a.numel()]
    for b in befores:
        b.view(-1)[:3] = torch.tensor([0.0, 1.0, 1.0], dtype=dtype)[: b.numel()]
    raw = [torch.randn(s, device=device) for s in shapes]
    for r in raw:
        r.view(-1)[:3] = torch.tensor([1.0, 0.0, -1.0])[: r.numel()]
    references = [reference_format.encode(r, fmt) for r in raw]
    befores_copy, references_copy = [b.clone() for b in befores], [r.clone() for r in references]
    results = []
    for name in ("torch", backend):
        params = [a.clone() for a in afters]
        stats = torch.zeros(len(shapes), 3, dtype=torch.float64, device=device)
        masked_delta_op(name)(params, befores, references, stats, reference_format=fmt, inv_lr=4.0)
        results.append((params, stats))
    assert all(torch.equal(a, b) for a, b in zip(befores, befores_copy)), "the op wrote a `before`"
    assert all(torch.equal(a, b) for a, b in zip(references, references_copy)), "the op wrote a reference"
    (ref_params, ref_stats), (got_params, got_stats) = results
    for p, q in zip(ref_params, got_params):
        assert torch.equal(p, q)
    assert torch.equal(ref_stats[:, 0], got_stats[:, 0])
    torch.testing.assert_close(got_stats, ref_stats, rtol=1e-4, atol=1e-3)
    # and against the rule written out: restored exactly where conflicting, else the new value
    for a, b, r, p in zip(afters, befores, raw, got_params):
        u = b.to(chunking.compute_dtype(dtype)) - a.to(chunking.compute_dtype(dtype))
        conflict = ((r > 0) & (u < 0)) | ((r < 0) & (u > 0))
        assert torch.equal(p, torch.where(conflict, b, a))
    assert int(got_stats[:, 0].sum()) < sum(a.numel() for a in afters)


_SIGN_EDGES = [0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40, 1e-30, -1e-30, 3e38, -3e38, math.inf, -math.inf, math.nan]


# The native CPU kernels only: under TRITON_INTERPRET=1 the Triton kernel reads a subnormal bfloat16
# reference as zero (found by this test; the kernel is not the CPU kernels' to change).
@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values == ("native", "cpu")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("fmt", reference_format.FORMATS)
def test_write_back_sign_test_at_the_edges(backend, device, dtype, fmt):
    """The sign test sign(r)*sign(u) < 0 on every pair of signed zeros, subnormals (whose product
    underflows), huge values (whose product overflows), infinities and NaN in r and in u (the CPU
    kernels test it with fewer instructions than the rule, issue 26): against the oracle and the rule."""
    edges = torch.tensor(_SIGN_EDGES, dtype=torch.float64)
    u, r = (x.reshape(-1) for x in torch.meshgrid(edges, edges, indexing="ij"))
    u, r = u.repeat(5), r.repeat(5).float()  # several blocks and a partial one (845 elements)
    befores = [torch.zeros(u.shape, dtype=dtype, device=device)]
    afters = [(-u).to(dtype).to(device)]  # u = before - after, exactly
    references = [reference_format.encode(r.to(device), fmt)]
    decoded = reference_format.decode(references[0], fmt, r.shape).double().cpu()
    results = []
    for name in ("torch", backend):
        params = [a.clone() for a in afters]
        stats = torch.zeros(1, 3, dtype=torch.float64, device=device)
        masked_delta_op(name)(params, befores, references, stats, reference_format=fmt, inv_lr=1.0)
        results.append((params[0].cpu(), stats.cpu()))
    (ref_param, ref_stats), (got_param, got_stats) = results
    conflict = ((decoded > 0) & (u < 0)) | ((decoded < 0) & (u > 0))
    bits = {torch.float32: torch.int32, torch.float64: torch.int64}[dtype]  # NaN and -0.0 compared too
    assert torch.equal(got_param.view(bits), torch.where(conflict, befores[0].cpu(), afters[0].cpu()).view(bits))
    assert torch.equal(got_param.view(bits), ref_param.view(bits))
    assert int(got_stats[0, 0]) == int((~conflict).sum())
    torch.testing.assert_close(got_stats, ref_stats, rtol=1e-4, atol=1e-3, equal_nan=True)


FLOAT64_BACKENDS = [pytest.param("torch", "cpu", id="torch-cpu"), *BACKENDS]


@pytest.mark.parametrize("backend,device", FLOAT64_BACKENDS)
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam", "adamw"])
def test_float64_steps_equal_torch_optim_in_float64(backend, device, optimizer):
    """No reference: a float64 step is torch.optim's float64 step (foreach=False) to float64 precision,
    with float64 states; a step that computed anything in float32 would be ~1e-7 off."""
    shapes = [(7,), (3, 5), (2 * NATIVE_ITEM + 37,)]
    torch.manual_seed(0)
    params = [torch.randn(s, dtype=torch.float64, device=device) for s in shapes]
    grads = [[torch.randn(s, dtype=torch.float64, device=device) for s in shapes] for _ in range(3)]
    options = {"sgd": dict(lr=0.1), "momentum": dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
               "adam": dict(lr=0.01, weight_decay=0.05, amsgrad=True), "adamw": dict(lr=0.01, weight_decay=0.1)}[optimizer]
    cls = {"sgd": torch.optim.SGD, "momentum": torch.optim.SGD, "adam": torch.optim.Adam,
           "adamw": torch.optim.AdamW}[optimizer]
    theirs = [p.clone().requires_grad_() for p in params]
    opt = cls(theirs, foreach=False, **options)
    ours = [p.clone() for p in params]
    module = backend_module(backend)
    buffers = [None] * len(ours)
    exp_avgs, exp_avg_sqs, max_exp_avg_sqs = ([torch.zeros_like(p) for p in ours] for _ in range(3))
    for k, step_grads in enumerate(grads):
        for p, g in zip(theirs, step_grads):
            p.grad = g.clone()
        opt.step()
        if cls is torch.optim.SGD:
            momentum = options.get("momentum", 0.0)
            if momentum and k == 0:
                buffers = [torch.zeros_like(p) for p in ours]
            module.sgd_step_(ours, step_grads, buffers if momentum else None, None, None, reference_format="float32",
                             lr=options["lr"], weight_decay=options.get("weight_decay", 0.0), momentum=momentum,
                             dampening=0.0, nesterov=options.get("nesterov", False), maximize=False,
                             first_step=k == 0)
        else:
            t = k + 1
            module.adam_step_(ours, step_grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, None, None,
                              reference_format="float32", lr=options["lr"], beta1=0.9, beta2=0.999, eps=1e-8,
                              weight_decay=options["weight_decay"], decoupled_weight_decay=cls is torch.optim.AdamW,
                              amsgrad=options.get("amsgrad", False), maximize=False,
                              bias_correction1=1 - 0.9**t, bias_correction2=1 - 0.999**t)
    for p, q in zip(ours, theirs):
        assert p.dtype == torch.float64
        torch.testing.assert_close(p, q.detach(), rtol=1e-13, atol=1e-15)
    state = opt.state[theirs[-1]]
    if cls is torch.optim.SGD and options.get("momentum"):
        torch.testing.assert_close(buffers[-1], state["momentum_buffer"], rtol=1e-13, atol=1e-15)
    elif cls is not torch.optim.SGD:
        torch.testing.assert_close(exp_avgs[-1], state["exp_avg"], rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(exp_avg_sqs[-1], state["exp_avg_sq"], rtol=1e-13, atol=1e-17)


@pytest.mark.parametrize("backend,device", FLOAT64_BACKENDS)
@pytest.mark.parametrize("fmt", reference_format.FORMATS)
def test_float64_mask_and_statistics_are_computed_in_float64(backend, device, fmt):
    """Updates and reference values far below float32's range: in float64 their signs conflict
    (the elements stay frozen) and s = r·u is a float64 product; computed in float32 both would be 0
    (collaborative, the elements moved). The float64 reference is stored in ``fmt`` with its signs."""
    tiny = 1e-50
    p = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64, device=device)
    g = torch.tensor([-tiny, tiny, -1.0, tiny, 0.0], dtype=torch.float64, device=device)
    r = torch.tensor([tiny, -tiny, 1.0, tiny, 1.0], dtype=torch.float64, device=device)  # mean gradient
    stored = reference_format.encode(r, fmt)
    stats = torch.zeros(1, 3, dtype=torch.float64, device=device)
    params = [p.clone()]
    backend_module(backend).sgd_step_(params, [g], None, [stored], stats, reference_format=fmt, lr=1e35,
                                      weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, maximize=False,
                                      first_step=True)
    frozen = torch.tensor([True, True, True, False, False], device=device)
    assert torch.equal(params[0][frozen], p[frozen])
    torch.testing.assert_close(params[0][~frozen], (p - 1e35 * g)[~frozen], rtol=1e-15, atol=0)
    assert params[0][3] != p[3]  # 4 − 1e35·1e-50 = 4 − 1e-15: moved, though by far less than a float32 ulp
    decoded = reference_format.decode(stored, fmt, r.shape).to(torch.float64)
    s = decoded * g
    assert stats[0, 0] == 2
    torch.testing.assert_close(stats[0, 1], s[~frozen].sum(), rtol=1e-14, atol=0)
    torch.testing.assert_close(stats[0, 2], s[frozen].sum(), rtol=1e-14, atol=0)
    assert stats[0, 1] > 0  # r·u of element 3, a product far below float32's range


def test_float64_references_keep_their_signs_in_every_format():
    """A float64 mean gradient beyond float32's range keeps its sign, and a stored value stays finite."""
    r = torch.tensor([1e-50, -1e-50, 1e300, -1e300, 0.0, 1.5, -2.5e-39], dtype=torch.float64)
    for fmt in reference_format.FORMATS:
        values = reference_format.decode(reference_format.encode(r, fmt), fmt, r.shape)
        assert torch.equal(torch.sign(values), torch.sign(r).float()), fmt
        assert torch.isfinite(values).all(), fmt
    stored = reference_format.encode(r, "float32")
    assert stored.dtype == torch.float32 and stored[5] == 1.5 and stored[0] == torch.finfo(torch.float32).smallest_normal


def test_float64_goes_to_a_backend_that_steps_it():
    """Every backend steps float64 parameters (computed in float64, with float64 states): asked for
    by name, each is used; ``auto`` keeps its order (on CPU: the native kernels). A parameter dtype
    that no kernel steps is refused with an error naming it, before anything is written."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert functional.resolve("torch", cpu, "adam_step_", torch.float64).NAME == "torch"
    assert native_backend.capabilities(cpu).float64
    assert native_backend.capabilities(cuda).float64 == native_backend.capabilities(cuda).runs("adam_step_")
    if not native_backend.unavailable_reason():
        assert functional.resolve("auto", cpu, "adam_step_", torch.float64) is native_backend
    if not TRITON_ON_CPU:
        return
    triton = functional.load_backend("triton")
    assert triton.capabilities(cpu).float64 and triton.capabilities(cuda).float64
    assert functional.resolve("triton", cpu, "sgd_step_", torch.float64) is triton
    p, g = torch.ones(5, dtype=torch.int32), torch.ones(5, dtype=torch.int32)
    m, v = torch.zeros(5), torch.zeros(5)
    with pytest.raises(TypeError, match="torch.int32"):
        triton.adam_step_([p], [g], [m], [v], None, None, None, reference_format="float32", lr=0.1, beta1=0.9,
                          beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=True, amsgrad=False,
                          maximize=False, bias_correction1=0.1, bias_correction2=0.001)
    assert torch.equal(p, torch.ones(5, dtype=torch.int32)) and not m.any() and not v.any()


@pytest.mark.parametrize("backend,device", [pytest.param("torch", "cpu", id="torch-cpu"), *BACKENDS])
def test_mask_is_never_stored_and_frozen_elements_are_bitwise_unchanged(backend, device):
    """Conflicting elements keep their exact bits (bf16 too), and every other element moves."""
    shape = (1000,)
    p = torch.randn(shape, device=device).to(torch.bfloat16)
    g = torch.randn(shape, device=device).to(torch.bfloat16)
    r = _random_reference(shape, device)
    before = p.clone()
    backend_module(backend).sgd_step_([p], [g], None, [r], None, reference_format="float32", lr=LR,
                                      weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False,
                                      maximize=False, first_step=True)
    u = g.float()
    conflict = ((r > 0) & (u < 0)) | ((r < 0) & (u > 0))
    assert conflict.any() and not conflict.all()
    assert torch.equal(p[conflict], before[conflict])
    moved = (before.float() - LR * g.float()).to(torch.bfloat16)  # rounded to nearest even, like torch
    assert torch.equal(p[~conflict], moved[~conflict])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_oracle_does_not_depend_on_its_chunk_size(monkeypatch, dtype, fmt):
    """The oracle runs chunk by chunk (cnl_ext.ops.chunking): small chunks (tensors cut at chunk
    boundaries, small tensors packed together) and whole tensors give the same bits; the float64
    sums of the statistics only add up in another order."""
    shapes = _shapes("native") + [(4099,)]
    params, states, refs = _setup(shapes, dtype, fmt, "cpu", n_state=3)
    grads = [torch.randn(s).to(dtype) for s in shapes]
    results = []
    for size in (64, 1 << 20):
        monkeypatch.setattr(chunking, "CPU_CHUNK", size)
        p, s = _clone(params), [_clone(x) for x in states]
        stats = None if fmt is None else torch.zeros(len(shapes), 3, dtype=torch.float64)
        torch_backend().adam_step_(p, grads, *s, refs, stats, reference_format=fmt or "float32", lr=LR, beta1=0.8,
                                   beta2=0.95, eps=1e-6, weight_decay=0.1, decoupled_weight_decay=True,
                                   amsgrad=True, maximize=False, bias_correction1=0.2, bias_correction2=0.05)
        if refs is not None:
            torch_backend().masked_delta_(p, params, refs, stats, reference_format=fmt, inv_lr=1 / LR)
        results.append((p, s, stats))
    (p_small, s_small, stats_small), (p_whole, s_whole, stats_whole) = results
    _assert_same(p_small + sum(s_small, []), p_whole + sum(s_whole, []), dtype, exact=True)
    if stats_small is not None:
        assert torch.equal(stats_small[:, 0], stats_whole[:, 0])
        torch.testing.assert_close(stats_small, stats_whole, rtol=1e-12, atol=1e-9)


@pytest.mark.cuda
@requires_cuda
def test_tensor_beyond_int32_offsets():
    """Offsets are 64-bit: a tensor of more than 2**31 elements is updated to its last element."""
    n = 2**31 + 4099
    if torch.cuda.mem_get_info()[0] < 3 * n * 2:
        pytest.skip("not enough free GPU memory for two 2**31-element bf16 tensors")
    p = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    g = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    g[-3:] = -1.0
    r = torch.full(((n + 3) // 4,), 0b01010101, dtype=torch.uint8, device="cuda")  # sign2: all positive
    triton_sgd.sgd_step_([p], [g], None, [r], None, reference_format="sign2", lr=0.5, weight_decay=0.0,
                          momentum=0.0, dampening=0.0, nesterov=False, maximize=False, first_step=True)
    assert p[0].item() == 0.5 and p[2**31 + 7].item() == 0.5 and p[-4].item() == 0.5
    assert (p[-3:] == 1.0).all()  # conflicting with the reference: frozen


# ----------------------------------------------------------------------------- native CPU specifics


def _require_native_cpu():
    reason = _native_cpu_skip_reason()
    if reason:
        pytest.skip(f"native backend unavailable: {reason}")


def _subprocess_env(**extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


@pytest.mark.skipif(EXACT, reason="already the exact run")
def test_native_equals_torch_backend_bit_for_bit():
    """The native CPU kernels equal the torch backend bit for bit wherever torch rounds each operation
    separately (ATEN_CPU_CAPABILITY=default) and its sqrt is correctly rounded (module docstring)."""
    _require_native_cpu()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(Path(__file__)),
         "-k", "native-cpu and (adam_kernel or sgd_kernel or write_back or importance_in_the_step)"],
        cwd=ROOT, env=_subprocess_env(ATEN_CPU_CAPABILITY="default", CNL_TEST_EXACT="1"),
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


_ISA_WORKLOAD = r"""
import sys, torch
from cnl_ext import reference_format
from cnl_ext.kif import Units
from cnl_ext.ops import native_backend
torch.manual_seed(0)
shapes = [(), (1,), (31,), (33,), (1025,), (3, 5), (2 * 32768 + 37,)]
out = {"capability": native_backend.build_info()["cpu_capability"]}
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    for fmt in (None, *reference_format.FORMATS):
        params = [torch.randn(s).to(dtype) for s in shapes]
        m, v, vmax = ([torch.rand(s).to(torch.promote_types(dtype, torch.float32)) for s in shapes] for _ in range(3))
        refs = None if fmt is None else [reference_format.encode(torch.randn(s) * (torch.rand(s) > 0.1), fmt) for s in shapes]
        stats = torch.zeros(len(shapes), 3, dtype=torch.float64)
        emas = [torch.rand(s) for s in shapes], [torch.rand(s) for s in shapes]  # KIF's importance
        for k in range(2):
            grads = [torch.randn(s).to(dtype) for s in shapes]
            importance = dict(importance=emas, importance_kind=("first", "param_mix")[k], importance_betas=(0.8, 0.6))
            native_backend.adam_step_(params, grads, m, v, vmax, refs, stats, reference_format=fmt or "float32",
                lr=0.1, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.05, decoupled_weight_decay=k == 0,
                amsgrad=True, maximize=k == 1, bias_correction1=0.2, bias_correction2=0.05, **importance)
            native_backend.sgd_step_(params, grads, m, refs, stats, reference_format=fmt or "float32", lr=0.1,
                weight_decay=0.01, momentum=0.9, dampening=0.1, nesterov=k == 1, maximize=False, first_step=k == 0)
        if fmt is not None:
            before = [p.clone() for p in params]
            after = [p + torch.randn(p.shape).to(dtype) for p in params]
            native_backend.masked_delta_(after, before, refs, stats, reference_format=fmt, inv_lr=10.0)
            params += after
        out[f"{dtype}-{fmt}"] = (params, m, v, vmax, stats, *emas)
    if dtype == torch.float64:  # KIF's fusion passes take no float64
        continue
    units = Units.per_row(shapes)  # KIF's fusion passes, anchors in float32
    params = [torch.randn(s).to(dtype) for s in shapes]
    anchors, ends = ([p.float() + 0.01 * torch.randn(p.shape) for p in params] for _ in range(2))
    native_backend.kif_task_vector_fuse_(params, anchors, torch.rand(units.count), units.maps)
    for rule in ("code", "paper"):
        scores = [[torch.rand(s) for s in shapes] for _ in range(4)]
        native_backend.kif_recurrent_fuse_(params, anchors, ends, *scores, delta_in=0.25, delta_out=0.5, rule=rule,
                                           update_anchors=True)
    out[f"{dtype}-kif"] = (params, anchors)
torch.save(out, sys.argv[1])
"""


def test_instruction_set_variants_are_bit_identical(tmp_path):
    """DEFAULT and AVX2 builds (CNL_EXT_CPU_CAPABILITY) give the AVX512 build's results bit for bit,
    statistics, importance EMAs and KIF's fusion passes included: every variant this CPU can run, each
    in its own process (one per process)."""
    _require_native_cpu()
    best = native_backend.cpu_capability()
    order = ("AVX512", "AVX2", "DEFAULT")
    variants = order[order.index(best):]
    if len(variants) < 2:
        pytest.skip(f"this CPU runs only the {best} variant")
    script = tmp_path / "workload.py"
    script.write_text(_ISA_WORKLOAD)
    results = {}
    for capability in variants:
        out = tmp_path / f"{capability}.pt"
        run = subprocess.run([sys.executable, str(script), str(out)], cwd=ROOT,
                             env=_subprocess_env(CNL_EXT_CPU_CAPABILITY=capability),
                             capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-4000:]
        results[capability] = torch.load(out)
        assert results[capability].pop("capability") == capability
    first = results[variants[0]]
    for capability in variants[1:]:
        for case, tensors in first.items():
            flat_a = torch.utils._pytree.tree_leaves(tensors)
            flat_b = torch.utils._pytree.tree_leaves(results[capability][case])
            for a, b in zip(flat_a, flat_b, strict=True):
                assert torch.equal(a, b), f"{capability} differs from {variants[0]} in {case}"


def test_native_build_info():
    _require_native_cpu()
    info = native_backend.build_info()
    assert info["cpu_capability"] == native_backend.cpu_capability()
    assert info["cpu_build"] in ("prebuilt", "jit")
    assert info["cpu_item_size"] == NATIVE_ITEM
    assert native_backend.capabilities("cpu").runs("masked_delta_")
    assert not native_backend.capabilities("meta").runs("adam_step_")
    # KIF's EMAs in the step: the CPU kernels, and the CUDA ones where cnl_ext._C is built
    assert native_backend.capabilities("cpu").importance
    assert native_backend.capabilities("cuda").importance == native_backend.capabilities("cuda").runs("adam_step_")


def test_native_rejects_mismatched_inputs():
    _require_native_cpu()
    p, g = [torch.zeros(8)], [torch.zeros(8)]
    kwargs = dict(lr=0.1, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, maximize=False,
                  first_step=True)
    with pytest.raises(RuntimeError, match=r"references\[0\] has dtype Float, expected Byte"):
        native_backend.sgd_step_(p, g, None, [torch.zeros(2)], None, reference_format="sign2", **kwargs)
    with pytest.raises(RuntimeError, match=r"grads\[0\] has 4 elements, expected 8"):
        native_backend.sgd_step_(p, [torch.zeros(4)], None, None, None, reference_format="float32", **kwargs)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        native_backend.sgd_step_([torch.zeros(4, 2).t()], [torch.zeros(2, 4)], None, None, None,
                                 reference_format="float32", **kwargs)
    with pytest.raises(RuntimeError, match="reference_format must be one of"):
        native_backend.sgd_step_(p, g, None, None, None, reference_format="int4", **kwargs)
    with pytest.raises(RuntimeError, match="stats must have shape"):
        native_backend.masked_delta_(p, g, [torch.zeros(8)], torch.zeros(2, 3, dtype=torch.float64),
                                     reference_format="float32", inv_lr=1.0)
    assert torch.equal(p[0], torch.zeros(8))  # nothing written by a rejected call


def test_native_importance_rejects_mismatched_inputs():
    _require_native_cpu()
    p, g, m, v = [torch.zeros(2, 4)], [torch.zeros(2, 4)], [torch.zeros(2, 4)], [torch.zeros(2, 4)]
    adam = dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=True, amsgrad=False,
                maximize=False, bias_correction1=0.1, bias_correction2=0.01, reference_format="float32")

    def step(sensitivities, uncertainties, kind="first", betas=(0.85, 0.85)):
        native_backend.adam_step_(p, g, m, v, None, None, None, importance=(sensitivities, uncertainties),
                                  importance_kind=kind, importance_betas=betas, **adam)

    ok = [torch.zeros(2, 4)]
    with pytest.raises(RuntimeError, match=r"sensitivities\[0\] has dtype BFloat16, expected Float"):
        step([torch.zeros(2, 4, dtype=torch.bfloat16)], ok)
    with pytest.raises(RuntimeError, match=r"uncertainties\[0\] has 4 elements, expected 8"):
        step(ok, [torch.zeros(4)])
    with pytest.raises(RuntimeError, match=r"sensitivities\[0\] has shape \[4, 2\] but params\[0\] has shape \[2, 4\]"):
        step([torch.zeros(4, 2)], ok)
    with pytest.raises(RuntimeError, match=r"uncertainties\[0\] must be contiguous"):
        step(ok, [torch.zeros(4, 2).t()])
    with pytest.raises(RuntimeError, match=r"got 1 params but 2 sensitivities"):
        step(ok * 2, ok)
    with pytest.raises(RuntimeError, match="importance_kind must be 'first' or 'param_mix'"):
        step(ok, ok, kind="second")
    with pytest.raises(RuntimeError, match=r"importance betas must lie in \[0, 1\)"):
        step(ok, ok, betas=(0.9, 1.0))
    assert all(torch.equal(t[0], torch.zeros(2, 4)) for t in (p, m, v, ok))  # nothing written by a rejected call


def test_native_importance_step_under_torch_compile():
    """The steps' schemas declare the optional EMA lists written: a compiled step (functionalized) updates them."""
    _require_native_cpu()
    native_backend.unavailable_reason()  # loads the library: torch.ops.cnl_ext exists

    def step(p, g, m, v, s, u):
        torch.ops.cnl_ext.adam_step_(
            p, g, m, v, None, None, None, sensitivities=s, uncertainties=u, reference_format="float32", lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8,
            weight_decay=0.1, decoupled_weight_decay=True, amsgrad=False, maximize=False, bias_correction1=0.1,
            bias_correction2=0.01, importance_kind="param_mix", importance_beta1=0.8, importance_beta2=0.6)
        torch.ops.cnl_ext.sgd_step_(
            p, g, m, None, None, sensitivities=s, uncertainties=u, reference_format="float32", lr=0.1, weight_decay=0.0, momentum=0.9,
            dampening=0.0, nesterov=False, maximize=False, first_step=False, importance_kind="first",
            importance_beta1=0.8, importance_beta2=0.6)

    def inputs():
        torch.manual_seed(1)
        shapes = ((3,), (2, 5))
        return [[fill(s) for s in shapes] for fill in (torch.randn, torch.randn, torch.rand, torch.rand, torch.rand,
                                                         torch.rand)]  # p, g, m, v, S, U

    eager, compiled = inputs(), inputs()
    step(*eager)
    torch._dynamo.reset()
    torch.compile(step, backend="aot_eager", fullgraph=True)(*compiled)
    for a, b in zip(eager, compiled):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(compiled[4][0], inputs()[4][0])  # the EMAs were written


_BROKEN_BUILD = r"""
import warnings, torch
from cnl_ext.ops import native_backend
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        reason = native_backend.unavailable_reason()
    except native_backend.NativeBackendRequiredError as exc:
        print("RAISED:", exc)
    else:
        assert native_backend.unavailable_reason() == reason  # decided once per process
        print("REASON:", reason)
        print("WARNINGS:", len(caught))  # the caller (backend="auto") warns, once
"""


@pytest.mark.parametrize("required", [False, True])
def test_failed_build_is_a_reason_or_an_error_when_required(tmp_path, required):
    """A compiler that fails (here: CXX=false in an empty extension cache): the backend is unavailable
    with the reason (backend="auto" warns with it), or, with CNL_EXT_REQUIRE_NATIVE=1 (CI), an error
    that no fallback catches."""
    if importlib.util.find_spec(f"cnl_ext._cpu_{native_backend.cpu_capability().lower()}") is not None:
        pytest.skip("a prebuilt CPU library is installed: nothing is compiled")
    env = _subprocess_env(CXX="false", TORCH_EXTENSIONS_DIR=str(tmp_path))
    env[native_backend.ENV_REQUIRE] = "1" if required else "0"
    run = subprocess.run([sys.executable, "-c", _BROKEN_BUILD], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    if required:
        assert "RAISED:" in run.stdout and "CNL_EXT_REQUIRE_NATIVE=1" in run.stdout
    else:
        assert "REASON: building the CPU kernels" in run.stdout and "failed" in run.stdout
        assert "WARNINGS: 0" in run.stdout


def test_importing_compiles_nothing(tmp_path):
    """Importing cnl_ext and the backend module loads no library and starts no compile: the first
    use (unavailable_reason or an op) does."""
    code = ("import cnl_ext, cnl_ext.functional, torch; from cnl_ext.ops import native_backend as n; "
            "print(bool(n._state), hasattr(torch.ops.cnl_ext, 'adam_step_'))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=_subprocess_env(CXX="false", TORCH_EXTENSIONS_DIR=str(tmp_path)))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["False", "False"] and "compiling" not in run.stderr
