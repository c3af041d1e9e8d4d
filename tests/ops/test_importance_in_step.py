"""KIF's importance EMAs kept inside the fused step (issue 15, item 1), on every backend here.

The importance is an observer: parameters and moments are bit-identical with it on; its EMAs equal
:func:`cnl_ext.ops.importance.importance_update_` applied after a plain step.
"""
import dataclasses

import pytest
import torch

import cnl_ext
from cnl_ext import functional, planning
from cnl_ext.ops.importance import importance_update_

from ..conftest import BACKEND_DEVICES, NATIVE_DEVICES, skip_unless_native_runs

# the native backend fuses the EMAs into its steps, CPU and CUDA (cnl_ext._C)
FUSING_BACKEND_DEVICES = [*BACKEND_DEVICES, *NATIVE_DEVICES]

SHAPES = [(), (7,), (5, 9), (3, 4, 5), (2 * 1024 + 3,)]
OPTIMIZERS = {
    "adamw": lambda ps, **kw: cnl_ext.FusedCNLAdamW(ps, lr=0.05, weight_decay=0.1, **kw),
    "adam_amsgrad_maximize": lambda ps, **kw: cnl_ext.FusedCNLAdam(ps, lr=0.05, weight_decay=0.01, amsgrad=True,
                                                                    maximize=True, **kw),
    "momentum": lambda ps, **kw: cnl_ext.FusedCNLSGD(ps, lr=0.05, momentum=0.9, **kw),
    "sgd": lambda ps, **kw: cnl_ext.FusedCNLSGD(ps, lr=0.05, **kw),
}


def _run(name, backend, device, dtype, *, importance=None, with_reference=False, steps=3):
    if backend == "native":
        skip_unless_native_runs(device)
    torch.manual_seed(0)
    params = [torch.randn(s, device=device).to(dtype).requires_grad_() for s in SHAPES]
    opt = OPTIMIZERS[name](params, backend=backend, importance=importance)
    if with_reference:
        opt.set_reference([torch.randn(s, device=device) for s in SHAPES])
    grads = []
    for _ in range(steps):
        step_grads = [torch.randn(s, device=device).to(dtype) for s in SHAPES]
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        grads.append(step_grads)
    return opt, params, grads


def _moments(opt, params):
    keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")
    return [opt.state[p][k] for p in params for k in keys if k in opt.state[p]]


@pytest.mark.parametrize("backend,device", FUSING_BACKEND_DEVICES)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_reference", [False, True], ids=["plain", "cnl"])
@pytest.mark.parametrize("kind", ["first", "param_mix"])
def test_importance_is_an_observer_and_equals_the_oracle(backend, device, name, dtype, with_reference, kind):
    plain, plain_params, grads = _run(name, backend, device, dtype, with_reference=with_reference)
    tracked, tracked_params, _ = _run(name, backend, device, dtype, importance=kind, with_reference=with_reference)
    for a, b in zip(plain_params, tracked_params):
        assert torch.equal(a, b)
    for a, b in zip(_moments(plain, plain_params), _moments(tracked, tracked_params)):
        assert torch.equal(a, b)
    # the oracle: the same EMAs from each step's stored parameters and gradients
    oracle, oracle_params, _ = _run(name, "torch", device, dtype, with_reference=with_reference, steps=0)
    sensitivities = [torch.zeros(s, device=device) for s in SHAPES]
    uncertainties = [torch.zeros(s, device=device) for s in SHAPES]
    for step_grads in grads:
        for p, g in zip(oracle_params, step_grads):
            p.grad = g.clone()
        oracle.step()
        importance_update_(oracle_params, step_grads, sensitivities, uncertainties, kind=kind, betas=(0.85, 0.85))
    scores = tracked.importance_scores()
    for got, s, u in zip(scores, sensitivities, uncertainties):
        torch.testing.assert_close(got, s * u, rtol=1e-5, atol=1e-7)
    assert any(score.abs().sum() > 0 for score in scores)


def test_slots_state_dict_and_reset():
    opt, params, _ = _run("adamw", "torch", "cpu", torch.float32, importance="first")
    inner = opt.importance_scores()
    assert all(torch.equal(s, torch.zeros_like(s)) for s in opt.importance_scores("outer"))
    opt.importance_slot = "outer"
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(opt.importance_scores("inner"), inner))  # inner untouched
    assert any(s.abs().sum() > 0 for s in opt.importance_scores("outer"))
    restored = cnl_ext.FusedCNLAdamW([p.detach().clone().requires_grad_() for p in params], importance="first")
    restored.load_state_dict(opt.state_dict())
    for a, b in zip(restored.importance_scores("inner"), inner):
        assert torch.equal(a, b)
    opt.reset_importance("inner")
    assert all(torch.equal(s, torch.zeros_like(s)) for s in opt.importance_scores("inner"))
    with pytest.raises(ValueError, match="slot must be one of"):
        opt.importance_scores("middle")
    with pytest.raises(ValueError, match="importance kind must be one of"):
        cnl_ext.FusedCNLAdamW(params, importance="second")


def test_a_gradscaler_skipped_step_leaves_the_importance_untouched():
    opt, params, _ = _run("adamw", "torch", "cpu", torch.float32, importance="first")
    before = opt.importance_scores()
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    opt.found_inf = torch.ones(())
    opt.grad_scale = torch.ones(())
    opt.step()
    del opt.found_inf, opt.grad_scale
    assert all(torch.equal(a, b) for a, b in zip(opt.importance_scores(), before))


@pytest.mark.parametrize("backend,device", FUSING_BACKEND_DEVICES)
@pytest.mark.parametrize("name", ["adamw", "momentum"])
def test_a_fusing_backend_takes_no_extra_pass(backend, device, name, monkeypatch):
    """Where the backend's capabilities include importance, functional hands the EMAs to its step and runs no
    importance_update_ after it."""
    if backend == "native":
        skip_unless_native_runs(device)
    assert functional.load_backend(backend).capabilities(torch.device(device)).importance

    def extra_pass(*args, **kwargs):
        raise AssertionError("functional ran importance_update_ after a fusing backend's step")

    monkeypatch.setattr(planning, "importance_update_", extra_pass)
    opt, _, _ = _run(name, backend, device, torch.float32, importance="param_mix", steps=1)
    assert any(score.abs().sum() > 0 for score in opt.importance_scores())


def test_a_backend_without_fused_importance_gets_one_more_pass(monkeypatch):
    """functional updates the EMAs after the step for a backend that does not fuse them."""
    from cnl_ext.ops import torch_backend
    fused, _, _ = _run("adamw", "torch", "cpu", torch.float32, importance="param_mix")
    unfused_capabilities = dataclasses.replace(torch_backend.capabilities(torch.device("cpu")), importance=False)
    monkeypatch.setattr(torch_backend, "capabilities", lambda device: unfused_capabilities)
    unfused, _, _ = _run("adamw", "torch", "cpu", torch.float32, importance="param_mix")
    for a, b in zip(fused.importance_scores(), unfused.importance_scores()):
        assert torch.equal(a, b)
