"""cnl_ext.CNL(optimizer): any optimizer's step Δ, kept only where r·(−Δ) ≥ 0; states unmasked."""
import pytest
import torch

import cnl_ext
from cnl_ext import reference_format

from ..conftest import BACKEND_DEVICES


class Lion(torch.optim.Optimizer):
    """A third-party-style optimizer (Lion, Chen et al. 2023): sign updates, one momentum."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(exp_avg * beta1 + p.grad * (1 - beta1)), alpha=-group["lr"])
                exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)


OPTIMIZERS = {
    "RMSprop": lambda params: torch.optim.RMSprop(params, lr=0.01, momentum=0.5, weight_decay=0.01),
    "Adagrad": lambda params: torch.optim.Adagrad(params, lr=0.05, lr_decay=0.01),
    "NAdam": lambda params: torch.optim.NAdam(params, lr=0.02, weight_decay=0.01),
    "SGD-momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True),
    "Lion": lambda params: Lion(params, lr=0.01, weight_decay=0.1),
}


def _model(device, dtype=torch.float32):
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(7, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4)).to(device, dtype)


def _loss(model, x):
    return (model(x) - 0.3).pow(2).mean()


def _conflicting(r, delta):
    """The spec's sign rule, written out: conflicting iff (r > 0 and Δ > 0) or (r < 0 and Δ < 0)."""
    return ((r > 0) & (delta > 0)) | ((r < 0) & (delta < 0))


def _oracle_run(make_optimizer, model, reference, inputs, lr):
    """The plain optimizer, with its step's Δ masked by hand afterwards; also the statistics."""
    opt = make_optimizer(list(model.parameters()))
    stats = []
    for x in inputs:
        opt.zero_grad()
        _loss(model, x).backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        collaborative, s_collab, s_conflict = 0, 0.0, 0.0
        with torch.no_grad():
            for p, b, r in zip(model.parameters(), before, reference):
                delta = p.float() - b.float()
                conflict = _conflicting(r, delta)
                s = r * (-delta / lr)
                collaborative += int((~conflict).sum())
                s_collab += float(s[~conflict].sum())
                s_conflict += float(s[conflict].sum())
                p.copy_(torch.where(conflict, b, p))
        stats.append((collaborative, s_collab, s_conflict))
    return opt, stats


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_wrapper_equals_optimizer_with_hand_masked_delta(name, backend, device):
    inputs = [torch.randn(5, 7, device=device) for _ in range(3)]
    mastered = torch.randn(6, 7, device=device)
    oracle_model, model = _model(device), _model(device)
    reference = torch.autograd.grad(_loss(oracle_model, mastered), list(oracle_model.parameters()))
    oracle_opt, oracle_stats = _oracle_run(OPTIMIZERS[name], oracle_model, reference, inputs,
                                           OPTIMIZERS[name]([torch.zeros(1)]).defaults["lr"])

    opt = cnl_ext.CNL(OPTIMIZERS[name](list(model.parameters())), backend=backend, track_stats=True)
    with opt.capture_reference() as ref:
        ref.backward(_loss(model, mastered))
    for x, expected in zip(inputs, oracle_stats):
        opt.zero_grad()
        _loss(model, x).backward()
        opt.step()
        stats = opt.cnl_stats()
        assert stats.collaborative == expected[0]
        assert stats.total == sum(p.numel() for p in model.parameters())
        torch.testing.assert_close(stats.sum_s_collaborative, expected[1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(stats.sum_s_conflicting, expected[2], rtol=1e-4, atol=1e-4)
    assert 0 < stats.collaborative < stats.total  # the mask did something, and not everything
    for p, q in zip(model.parameters(), oracle_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # the inner optimizer's state is updated for every element, exactly as without the wrapper
    for p, q in zip(model.parameters(), oracle_model.parameters()):
        for key, value in oracle_opt.state[q].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(opt.state[p][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_without_reference_the_wrapper_is_the_optimizer(backend, device):
    a, b = _model(device), _model(device)
    opt_a = torch.optim.NAdam(a.parameters(), lr=0.03)
    opt_b = cnl_ext.CNL(torch.optim.NAdam(b.parameters(), lr=0.03), backend=backend, track_stats=True)
    for _ in range(2):
        x = torch.randn(4, 7, device=device)
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            _loss(model, x).backward()
            opt.step()
    assert opt_b.cnl_stats() is None
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_param_groups_and_state_are_the_inner_optimizers():
    model = _model("cpu")
    inner = torch.optim.RMSprop(model[0].parameters(), lr=0.1)
    opt = cnl_ext.CNL(inner)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.2})
    assert len(inner.param_groups) == 2
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _loss(model, torch.randn(3, 7)).backward()
    opt.step()
    scheduler.step()
    assert [g["lr"] for g in inner.param_groups] == [0.05, 0.1]
    saved = opt.state_dict()
    assert saved.keys() == inner.state_dict().keys()
    restored = cnl_ext.CNL(torch.optim.RMSprop([{"params": model[0].parameters()}, {"params": model[2].parameters()}]))
    restored.load_state_dict(saved)
    assert restored.state is restored.optimizer.state and restored.param_groups is restored.optimizer.param_groups
    p = next(model.parameters())
    assert torch.equal(restored.state[p]["square_avg"], inner.state[p]["square_avg"])


def test_bad_input_is_named():
    model = _model("cpu")
    with pytest.raises(TypeError, match="wraps a torch.optim.Optimizer"):
        cnl_ext.CNL(model.parameters())
    with pytest.raises(TypeError, match="already masks"):
        cnl_ext.CNL(cnl_ext.FusedCNLAdamW(model.parameters()))
    with pytest.raises(ValueError, match="backend"):
        cnl_ext.CNL(torch.optim.SGD(model.parameters(), lr=0.1), backend="tritn")

    class NoLr(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

    with pytest.raises(ValueError, match="'lr'"):
        cnl_ext.CNL(NoLr(model.parameters()), track_stats=True)
    opt = cnl_ext.CNL(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="shape"):
        opt.set_reference([torch.zeros(2)] * 4)
