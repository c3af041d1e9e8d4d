"""Mixed precision: torch.autocast and torch.amp.GradScaler with the CNL optimizers and the wrapper."""
import pytest
import torch

import cnl_ext

from ..conftest import BACKEND_DEVICES

SCALE = 2.0**12  # a power of two: scaling and unscaling are exact, so runs can be compared exactly


def _model(device):
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(device)


def _loss(model, x):
    return (model(x) - 0.2).pow(2).mean()


def _optimizers(backend):
    return {
        "FusedCNLAdamW": lambda params: cnl_ext.FusedCNLAdamW(params, lr=0.01, weight_decay=0.1, backend=backend),
        "FusedCNLSGD": lambda params: cnl_ext.FusedCNLSGD(params, lr=0.05, momentum=0.9, backend=backend),
        "CNL(RMSprop)": lambda params: cnl_ext.CNL(torch.optim.RMSprop(params, lr=0.01), backend=backend),
    }


def _with_reference(make, model, mastered):
    opt = make(list(model.parameters()))
    with opt.capture_reference() as ref:
        ref.backward(_loss(model, mastered))
    return opt


def _state_tensors(opt):
    return [v.clone() for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("name", ["FusedCNLAdamW", "FusedCNLSGD", "CNL(RMSprop)"])
def test_grad_scaler_steps_equal_the_unscaled_run(name, backend, device):
    make = _optimizers(backend)[name]
    inputs = [torch.randn(4, 6, device=device) for _ in range(3)]
    mastered = torch.randn(5, 6, device=device)
    plain, scaled = _model(device), _model(device)
    plain_opt = _with_reference(make, plain, mastered)
    scaled_opt = _with_reference(make, scaled, mastered)
    scaler = torch.amp.GradScaler(device, init_scale=SCALE, growth_interval=1000)
    for x in inputs:
        plain_opt.zero_grad()
        _loss(plain, x).backward()
        plain_opt.step()
        scaled_opt.zero_grad()
        scaler.scale(_loss(scaled, x)).backward()
        scaler.step(scaled_opt)
        scaler.update()
    assert scaler.get_scale() == SCALE  # no step was skipped
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(p, q) for p, q in zip(plain.parameters(), _model(device).parameters()))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("name", ["FusedCNLAdamW", "FusedCNLSGD", "CNL(RMSprop)"])
def test_grad_scaler_skips_a_step_with_inf_gradients(name, backend, device):
    make = _optimizers(backend)[name]
    model = _model(device)
    opt = _with_reference(make, model, torch.randn(5, 6, device=device))
    scaler = torch.amp.GradScaler(device, init_scale=SCALE)
    scaler.scale(_loss(model, torch.randn(4, 6, device=device))).backward()  # one good step: states exist
    scaler.step(opt)
    scaler.update()
    params, states = [p.detach().clone() for p in model.parameters()], _state_tensors(opt)
    assert states

    opt.zero_grad()
    scaler.scale(_loss(model, torch.randn(4, 6, device=device))).backward()
    next(model.parameters()).grad.view(-1)[0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == SCALE / 2  # the scaler saw the inf and backed off
    for p, before in zip(model.parameters(), params):
        assert torch.equal(p, before)
    for state, before in zip(_state_tensors(opt), states):
        assert torch.equal(state, before)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_under_autocast_capture_and_step_use_the_autocast_gradients(backend, device):
    """Forward in bfloat16 under autocast, float32 parameters and optimizer: as the PyTorch oracle."""
    inputs = [torch.randn(4, 6, device=device) for _ in range(2)]
    mastered = [torch.randn(5, 6, device=device) for _ in range(2)]
    models, opts = [], []
    for step_backend in ("torch", backend):
        model = _model(device)
        opt = cnl_ext.FusedCNLAdamW(model.parameters(), lr=0.01, backend=step_backend, track_stats=True)
        with torch.autocast(device, dtype=torch.bfloat16), opt.capture_reference() as ref:
            for x in mastered:
                ref.backward(_loss(model, x))
        for x in inputs:
            opt.zero_grad()
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = _loss(model, x)
            assert loss.dtype == torch.bfloat16  # autocast ran the forward in bfloat16
            loss.backward()
            assert all(p.grad.dtype == torch.float32 for p in model.parameters())
            opt.step()
        models.append(model)
        opts.append(opt)
    # the reference is the mean of the autocast gradients
    check = _model(device)
    grads = []
    for x in mastered:
        with torch.autocast(device, dtype=torch.bfloat16):
            grads.append(torch.autograd.grad(_loss(check, x), list(check.parameters())))
    for p, mean in zip(models[0].parameters(), (sum(g) / len(g) for g in zip(*grads))):
        torch.testing.assert_close(opts[0]._references[p], mean)
    stats = opts[1].cnl_stats()
    assert 0 < stats.collaborative < stats.total
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
