"""The Triton kernels against the PyTorch reference, at the level of the ops contract.

Every case runs one multi-tensor launch over tensors of many shapes (scalars, empty, odd sizes,
1-D to 4-D, one larger than a chunk) for several steps, and compares parameters, optimizer states
and statistics with :mod:`cnl_ext.reference` run on copies of the same inputs.
"""
import pytest
import torch

from cnl_ext import reference_format
from cnl_ext.ops import torch_backend as reference
from cnl_ext.ops import triton_step

from .conftest import TRITON_DEVICES

# Chunks are shrunk in these tests (fixture below) so that a small tensor spans several of them.
TEST_CHUNK = 4 * triton_step.BLOCK
SHAPES = [(), (0,), (1,), (7,), (1023,), (1025,), (3, 5), (2, 3, 4), (2, 3, 5, 7), (2 * TEST_CHUNK + 3,)]
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FORMATS = [None, *reference_format.FORMATS]
# lr is large so that a wrongly masked element moves far beyond the bf16/fp16 tolerance.
LR = 0.1


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    monkeypatch.setattr(triton_step, "CHUNK", TEST_CHUNK)


def _random_reference(shape, device):
    r = torch.randn(shape, device=device)
    r[torch.rand(shape, device=device) < 0.1] = 0.0  # exact zeros are collaborative by definition
    return r


def _setup(dtype, fmt, device, n_state):
    params = [torch.randn(s, device=device).to(dtype) for s in SHAPES]
    states = [[torch.randn(s, device=device).abs() for s in SHAPES] for _ in range(n_state)]
    refs = None if fmt is None else [reference_format.encode(_random_reference(s, device), fmt) for s in SHAPES]
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


def _assert_same(got, want, dtype):
    for g, w in zip(got, want):
        if dtype == torch.float32:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        else:  # rounded once per step: allow about an ulp at the values' scale (~1); a masking
            # error moves an element by ~LR, far beyond this
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(g.float(), w.float(), rtol=eps, atol=2 * eps)


def _assert_stats_close(got, want):
    """Counts may differ where ``u`` is within rounding of 0 (its sign is then a coin flip in either
    implementation): a few elements per tensor. The sums are continuous in such elements."""
    numels = torch.tensor([float(torch.Size(s).numel()) for s in SHAPES], dtype=torch.float64, device=got.device)
    assert ((got[:, 0] - want[:, 0]).abs() <= 2 + 1e-3 * numels).all()
    torch.testing.assert_close(got[:, 1:], want[:, 1:], rtol=1e-4, atol=1e-3)
    assert got[:, 0].sum() > 0  # some elements were collaborative and counted


def _run_both(step_name, params, grads, states, refs, fmt, stats, steps, kwargs):
    """Run the Triton op and the reference op ``steps`` times on copies; return both results."""
    results = []
    for module in (triton_step, reference):
        p, s, st = _clone(params), [_clone(x) for x in states], None if stats is None else stats.clone()
        for k in range(steps):
            state_lists = [None if x is None else x for x in s]
            getattr(module, step_name)(p, grads[k], *state_lists, refs, st, reference_format=fmt or "float32", **kwargs(k))
        results.append((p, s, st))
    return results


@pytest.mark.parametrize("backend,device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("amsgrad,decoupled,weight_decay,maximize", [
    (False, True, 0.1, False),   # AdamW as in the paper
    (False, False, 0.0, False),  # Adam
    (True, False, 0.05, True),   # Adam with L2 decay, AMSGrad, maximize
    (True, True, 0.0, False),    # AdamW without decay
])
def test_adam_kernel_matches_reference(backend, device, dtype, fmt, amsgrad, decoupled, weight_decay, maximize):
    _check_adam_against_reference(device, dtype, fmt, amsgrad, decoupled, weight_decay, maximize)


def _check_adam_against_reference(device, dtype, fmt, amsgrad, decoupled, weight_decay, maximize, unaligned=False):
    """Three Adam steps of the Triton op and the reference on the same inputs; ``unaligned`` places
    every tensor at an odd address (a flat buffer's slices), where the kernels take their scalar path."""
    params, states, refs = _setup(dtype, fmt, device, n_state=3)
    steps = 3
    grads = [[torch.randn(s, device=device).to(dtype) for s in SHAPES] for _ in range(steps)]
    if unaligned:
        params, grads = [_offset_view(p) for p in params], [[_offset_view(t) for t in g] for g in grads]
        states = [[_offset_view(t) for t in x] for x in states]
        refs = None if refs is None else [_offset_view(r) for r in refs]
        nonempty = [p for p in params if p.numel()]
        assert not triton_step._pointer_table((_clone(nonempty),), torch.device(device))[1]  # as _run_both copies
    stats = None if fmt is None else torch.zeros(len(SHAPES), 3, dtype=torch.float64, device=device)
    beta1, beta2 = 0.8, 0.95

    def kwargs(k):
        t = k + 1
        return dict(lr=LR, beta1=beta1, beta2=beta2, eps=1e-6, weight_decay=weight_decay,
                    decoupled_weight_decay=decoupled, amsgrad=amsgrad, maximize=maximize,
                    bias_correction1=1 - beta1**t, bias_correction2=1 - beta2**t)

    (p_t, s_t, st_t), (p_r, s_r, st_r) = _run_both("adam_step_", params, grads, states, refs, fmt, stats, steps, kwargs)
    _assert_same(p_t, p_r, dtype)
    for a, b in zip(s_t, s_r):
        _assert_same(a, b, torch.float32)
    if stats is not None:
        _assert_stats_close(st_t, st_r)


@pytest.mark.parametrize("backend,device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("momentum,dampening,nesterov,weight_decay,maximize", [
    (0.0, 0.0, False, 0.0, False),   # SGD as in the paper
    (0.9, 0.0, False, 0.0, False),   # Momentum as in the paper
    (0.9, 0.0, True, 0.01, False),   # Nesterov with L2 decay
    (0.5, 0.3, False, 0.0, True),    # dampening, maximize
])
def test_sgd_kernel_matches_reference(backend, device, dtype, fmt, momentum, dampening, nesterov, weight_decay, maximize):
    params, states, refs = _setup(dtype, fmt, device, n_state=1 if momentum else 0)
    steps = 3
    grads = [[torch.randn(s, device=device).to(dtype) for s in SHAPES] for _ in range(steps)]
    stats = None if fmt is None else torch.zeros(len(SHAPES), 3, dtype=torch.float64, device=device)
    if not momentum:
        states = [None]  # the momentum_buffers argument

    def kwargs(k):
        return dict(lr=LR, weight_decay=weight_decay, momentum=momentum, dampening=dampening,
                    nesterov=nesterov, maximize=maximize, first_step=(k == 0))

    (p_t, s_t, st_t), (p_r, s_r, st_r) = _run_both("sgd_step_", params, grads, states, refs, fmt, stats, steps, kwargs)
    _assert_same(p_t, p_r, dtype)
    if momentum:
        _assert_same(s_t[0], s_r[0], torch.float32)
    if stats is not None:
        _assert_stats_close(st_t, st_r)


@pytest.mark.parametrize("backend,device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", [None, "float32", "sign2"])
def test_unaligned_tensors_match_reference(backend, device, dtype, fmt):
    _check_adam_against_reference(device, dtype, fmt, amsgrad=True, decoupled=True, weight_decay=0.1, maximize=False,
                                  unaligned=True)


@pytest.mark.parametrize("backend,device", TRITON_DEVICES)
def test_mask_is_never_stored_and_frozen_elements_are_bitwise_unchanged(backend, device):
    """Conflicting elements keep their exact bits (bf16 too), and every other element moves."""
    shape = (1000,)
    p = torch.randn(shape, device=device).to(torch.bfloat16)
    g = torch.randn(shape, device=device).to(torch.bfloat16)
    r = _random_reference(shape, device)
    before = p.clone()
    triton_step.sgd_step_([p], [g], None, [r], None, reference_format="float32", lr=LR, weight_decay=0.0,
                          momentum=0.0, dampening=0.0, nesterov=False, maximize=False, first_step=True)
    conflict = reference.conflicting(r, g.float())
    assert conflict.any() and not conflict.all()
    assert torch.equal(p[conflict], before[conflict])
    moved = (before.float() - LR * g.float()).to(torch.bfloat16)  # rounded to nearest even, like torch
    assert torch.equal(p[~conflict], moved[~conflict])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tensor_beyond_int32_offsets():
    """Offsets are 64-bit: a tensor of more than 2**31 elements is updated to its last element."""
    n = 2**31 + 4099
    if torch.cuda.mem_get_info()[0] < 3 * n * 2:
        pytest.skip("not enough free GPU memory for two 2**31-element bf16 tensors")
    p = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    g = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    g[-3:] = -1.0
    r = torch.full(((n + 3) // 4,), 0b01010101, dtype=torch.uint8, device="cuda")  # sign2: all positive
    triton_step.sgd_step_([p], [g], None, [r], None, reference_format="sign2", lr=0.5, weight_decay=0.0,
                          momentum=0.0, dampening=0.0, nesterov=False, maximize=False, first_step=True)
    assert p[0].item() == 0.5 and p[2**31 + 7].item() == 0.5 and p[-4].item() == 0.5
    assert (p[-3:] == 1.0).all()  # conflicting with the reference: frozen
