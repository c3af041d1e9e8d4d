"""capture_reference: the mean mastered-set gradient, accumulated in place, .grad left as it was."""
import pytest
import torch

import cnl_ext
from cnl_ext import reference_format

from ..conftest import BACKEND_DEVICES


def _model(device, dtype=torch.float32):
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(device, dtype)


def _loss(model, x):
    return model(x).pow(2).mean()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("reference_dtype", reference_format.FORMATS)
def test_capture_equals_set_reference_of_the_mean_gradient(backend, device, reference_dtype):
    batches = [torch.randn(4, 6, device=device) for _ in range(3)]
    step_input = torch.randn(4, 6, device=device)
    results = []
    for use_capture in (True, False):
        model = _model(device)
        opt = cnl_ext.FusedCNLAdamW(model.parameters(), lr=0.05, backend=backend, reference_dtype=reference_dtype)
        if use_capture:
            with opt.capture_reference() as ref:
                for x in batches:
                    ref.backward(_loss(model, x))
        else:  # the mean of the per-batch gradients, computed by hand
            grads = [torch.autograd.grad(_loss(model, x), list(model.parameters())) for x in batches]
            opt.set_reference([sum(gs) / len(gs) for gs in zip(*grads)])
        (-_loss(model, step_input)).backward()
        opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_capture_leaves_grads_as_they_were_and_accumulates_without_copy(backend, device):
    model = _model(device)
    params = list(model.parameters())
    params[0].requires_grad_(False)  # not trained: not captured
    _loss(model, torch.randn(2, 6, device=device)).backward()
    before = {p: p.grad for p in params}
    values = {p: None if p.grad is None else p.grad.clone() for p in params}
    opt = cnl_ext.FusedCNLSGD(params, lr=0.1, backend=backend)
    with opt.capture_reference() as ref:
        buffers = {p: p.grad.data_ptr() for p in params if p.requires_grad}
        ref.backward(_loss(model, torch.randn(3, 6, device=device)))
        ref.backward(_loss(model, torch.randn(3, 6, device=device)))
    assert ref.calls == 2
    for p in params:
        assert p.grad is before[p]
        if values[p] is not None:
            assert torch.equal(p.grad, values[p])
    # float32 parameters with a float32 reference: the buffers autograd filled are the reference
    assert {p: r.data_ptr() for p, r in opt._references.items()} == buffers
    assert params[0] not in opt._references


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_failed_capture_keeps_previous_reference_and_grads(backend, device):
    model = _model(device)
    opt = cnl_ext.FusedCNLSGD(model.parameters(), lr=0.1, backend=backend)
    previous = [torch.randn_like(p) for p in model.parameters()]
    opt.set_reference(previous)
    kept = dict(opt._references)
    with pytest.raises(RuntimeError, match="without any ref.backward"):
        with opt.capture_reference():
            pass
    with pytest.raises(ZeroDivisionError):
        with opt.capture_reference() as ref:
            ref.backward(_loss(model, torch.randn(2, 6, device=device)))
            1 / 0
    assert opt._references == kept
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_non_finite_capture_is_refused_and_keeps_previous_reference(backend, device, bad):
    model = _model(device)
    opt = cnl_ext.FusedCNLAdamW(model.parameters(), lr=0.1, backend=backend)
    with opt.capture_reference() as ref:
        ref.backward(_loss(model, torch.randn(2, 6, device=device)))
    kept = {p: r.clone() for p, r in opt._references.items()}
    with pytest.raises(FloatingPointError, match="inf or NaN"):
        with opt.capture_reference() as ref:
            ref.backward(_loss(model, torch.randn(2, 6, device=device)) * bad)  # an overflowed scaled loss
    assert opt._references.keys() == kept.keys()
    assert all(torch.equal(opt._references[p], r) for p, r in kept.items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_loss_scale_in_the_weight_gives_the_unscaled_mean(backend, device):
    """A loss-scaled capture (fp16 training) passes the scale in ``weight``: the same mean."""
    batches = [torch.randn(3, 6, device=device) for _ in range(2)]
    references = []
    for scale in (1.0, 2.0**16):
        model = _model(device)
        opt = cnl_ext.FusedCNLSGD(model.parameters(), lr=0.1, backend=backend)
        with opt.capture_reference() as ref:
            for x in batches:
                ref.backward(_loss(model, x), weight=len(x) * scale)
        references.append([opt._references[p] for p in model.parameters()])
    for a, b in zip(*references):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_reference_kept_until_replaced_or_cleared(backend, device):
    model = _model(device)
    opt = cnl_ext.FusedCNLSGD(model.parameters(), lr=0.1, backend=backend)
    assert not opt.has_reference
    with opt.capture_reference() as ref:
        ref.backward(_loss(model, torch.randn(2, 6, device=device)))
    for _ in range(2):
        model.zero_grad()
        _loss(model, torch.randn(2, 6, device=device)).backward()
        opt.step()
        assert opt.has_reference
    opt.clear_reference()
    assert not opt.has_reference


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_capture_with_low_precision_params(backend, device, dtype):
    model = _model(device, dtype)
    opt = cnl_ext.FusedCNLAdamW(model.parameters(), backend=backend, reference_dtype="sign2")
    x = torch.randn(4, 6, device=device, dtype=dtype)
    with opt.capture_reference() as ref:
        ref.backward(_loss(model, x))
    expected = torch.autograd.grad(_loss(model, x), list(model.parameters()))
    for p, g in zip(model.parameters(), expected):
        assert torch.equal(reference_format.decode(opt._references[p], "sign2", p.shape), torch.sign(g.float()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_accumulate_the_reference_in_float32(dtype):
    """256 backward calls: one gradient of 1, then 255 of 2**-8. Summed in bf16, each small one is lost
    (1 + 2**-8 rounds back to 1); summed in float32 after each call, the mean is exact."""
    p = torch.nn.Parameter(torch.zeros(4, dtype=dtype))
    opt = cnl_ext.FusedCNLSGD([p], lr=0.1)
    with opt.capture_reference() as ref:
        for k in range(256):
            ref.backward((p * (1.0 if k == 0 else 2.0**-8)).sum())
    expected = (1 + 255 * 2.0**-8) / 256
    assert torch.allclose(opt._references[p], torch.full((4,), expected), rtol=0, atol=1e-9)
    assert p.grad is None
