"""With no reference set, each CNL optimizer is its torch.optim counterpart."""
import pytest
import torch

import cnl_ext

from ..conftest import BACKEND_DEVICES, requires_cuda

SHAPES = [(), (1,), (5,), (33, 7), (2, 3, 4), (3, 1, 2, 5)]
STEPS = 10

CASES = {
    "sgd": (cnl_ext.FusedCNLSGD, torch.optim.SGD, dict(lr=0.1)),
    "momentum": (cnl_ext.FusedCNLSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    "nesterov-decay": (cnl_ext.FusedCNLSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "dampening-maximize": (cnl_ext.FusedCNLSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.5, dampening=0.2, maximize=True)),
    "adam": (cnl_ext.FusedCNLAdam, torch.optim.Adam, dict(lr=1e-2)),
    "adam-l2-amsgrad": (cnl_ext.FusedCNLAdam, torch.optim.Adam,
                        dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2, amsgrad=True)),
    "adam-decoupled": (cnl_ext.FusedCNLAdam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    "adamw": (cnl_ext.FusedCNLAdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adamw-amsgrad-maximize": (cnl_ext.FusedCNLAdamW, torch.optim.AdamW, dict(lr=1e-2, amsgrad=True, maximize=True)),
}


def _make_params(device, dtype=torch.float32):
    return [torch.randn(s, device=device).to(dtype).requires_grad_() for s in SHAPES]


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


def _step_both(opt, ref_opt, ours, theirs):
    """One step of each optimizer on the same random gradients."""
    grads = [torch.randn_like(p) for p in ours]
    _set_grads(ours, grads)
    _set_grads(theirs, grads)
    opt.step()
    ref_opt.step()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_equals_torch_optim_float32(backend, device, case):
    cls, torch_cls, kwargs = CASES[case]
    ours = _make_params(device)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt, ref_opt = cls(ours, backend=backend, **kwargs), torch_cls(theirs, **kwargs)
    for _ in range(STEPS):
        _step_both(opt, ref_opt, ours, theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours, theirs):  # same state, same names: checkpoints move between the two
        for key, value in ref_opt.state[b].items():
            torch.testing.assert_close(opt.state[a][key].float(), value.float().to(device), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["momentum", "adam-l2-amsgrad", "adamw"])
def test_equals_torch_optim_low_precision_params(backend, device, dtype, case):
    """bf16/fp16 parameters, float32 states: torch.optim on a float32 copy of the parameters that is
    rounded to the parameter dtype after every step computes exactly that."""
    cls, torch_cls, kwargs = CASES[case]
    ours = _make_params(device, dtype)
    shadow = [p.detach().float().requires_grad_() for p in ours]
    opt, ref_opt = cls(ours, backend=backend, **kwargs), torch_cls(shadow, **kwargs)
    for _ in range(STEPS):
        grads = [torch.randn(p.shape, device=device).to(dtype) for p in ours]
        _set_grads(ours, grads)
        _set_grads(shadow, [g.float() for g in grads])
        opt.step()
        ref_opt.step()
        with torch.no_grad():
            for s in shadow:
                s.copy_(s.to(dtype).float())
    eps = torch.finfo(dtype).eps
    for a, b in zip(ours, shadow):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, rtol=eps, atol=2 * eps)
    for a in ours:
        assert all(v.dtype == torch.float32 for k, v in opt.state[a].items() if k != "step")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_param_groups_skipped_params_closure_zero_grad(backend, device):
    w, b, frozen = (torch.randn(4, 3, device=device, requires_grad=True), torch.randn(4, device=device, requires_grad=True),
                    torch.randn(2, device=device, requires_grad=True))
    groups = lambda ps: [{"params": [ps[0], ps[2]], "lr": 0.1}, {"params": [ps[1]], "lr": 0.01, "weight_decay": 0.5}]
    theirs = [t.detach().clone().requires_grad_() for t in (w, b, frozen)]
    opt = cnl_ext.FusedCNLAdamW(groups([w, b, frozen]), backend=backend)
    ref_opt = torch.optim.AdamW(groups(theirs))
    x = torch.randn(8, 3, device=device)

    def closure_for(params, optimizer):
        def closure():
            optimizer.zero_grad()
            loss = (x @ params[0].T + params[1]).pow(2).mean()  # `frozen` gets no gradient
            loss.backward()
            return loss
        return closure

    for _ in range(3):
        loss = opt.step(closure_for([w, b, frozen], opt))
        ref_loss = ref_opt.step(closure_for(theirs, ref_opt))
        torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(w, theirs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b, theirs[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(frozen, theirs[2]) and frozen not in opt.state
    opt.zero_grad()
    assert w.grad is None and b.grad is None


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("case", ["momentum", "adamw"])
def test_lr_scheduler_and_state_dict_round_trip(backend, device, case):
    """A scheduled run interrupted by a state_dict save/load continues exactly as an uninterrupted one."""
    cls, _, kwargs = CASES[case]
    grads = [[torch.randn(s, device=device) for s in SHAPES] for _ in range(6)]

    def run(interrupt_at=None):
        params = [torch.ones(s, device=device, requires_grad=True) for s in SHAPES]
        opt = cls(params, backend=backend, **kwargs)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for k, g in enumerate(grads):
            if k == interrupt_at:
                opt_state, sched_state = opt.state_dict(), sched.state_dict()
                opt = cls(params, backend=backend, **kwargs)
                sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
                opt.load_state_dict(opt_state)
                sched.load_state_dict(sched_state)
            _set_grads(params, g)
            opt.step()
            sched.step()
        return params, opt

    straight, opt = run()
    resumed, _ = run(interrupt_at=3)
    assert opt.param_groups[0]["lr"] == kwargs["lr"] * 0.5**3
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_bf16_params_keep_float32_states_through_state_dict(backend, device):
    params = _make_params(device, torch.bfloat16)
    opt = cnl_ext.FusedCNLAdamW(params, backend=backend)
    _set_grads(params, [torch.randn_like(p) for p in params])
    opt.step()
    saved = opt.state_dict()
    fresh = cnl_ext.FusedCNLAdamW(params, backend=backend)
    fresh.load_state_dict(saved)  # torch would cast the states to bfloat16 here
    for p in params:
        for key in ("exp_avg", "exp_avg_sq"):
            assert fresh.state[p][key].dtype == torch.float32
            assert torch.equal(fresh.state[p][key], opt.state[p][key])
        assert fresh.state[p]["step"].device.type == "cpu"


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("case", ["adam-l2-amsgrad", "adamw"])
def test_capturable_with_tensor_lr_equals_torch_optim(backend, device, case):
    """capturable=True: steps on the device, lr a device tensor, bias corrections computed there."""
    cls, torch_cls, kwargs = CASES[case]
    kwargs = dict(kwargs, lr=torch.tensor(kwargs["lr"], device=device))
    ours = _make_params(device)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = cls(ours, backend=backend, capturable=True, **kwargs)
    ref_opt = torch_cls(theirs, **dict(kwargs, lr=kwargs["lr"].item()))
    extra = [torch.randn(3, device=device, requires_grad=True)]  # joins later: its step count differs
    extra_ref = [extra[0].detach().clone().requires_grad_()]
    for k in range(STEPS):
        if k == 4:
            opt.add_param_group({"params": extra})
            ref_opt.add_param_group({"params": extra_ref})
            ours, theirs = ours + extra, theirs + extra_ref
        _step_both(opt, ref_opt, ours, theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert opt.state[a]["step"].device == a.device
    assert opt.state[extra[0]]["step"].item() == STEPS - 4


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_capturable_step_replays_in_a_cuda_graph(backend):
    """The whole CNL step, reference and statistics included, captured once and replayed."""
    device = "cuda"
    params = [torch.randn(s, device=device, requires_grad=True) for s in [(1000,), (33, 7)]]
    eager = [p.detach().clone().requires_grad_() for p in params]
    lr = torch.tensor(1e-2, device=device)
    make = lambda ps: cnl_ext.FusedCNLAdamW(ps, lr=lr, capturable=True, backend=backend, track_stats=True)
    opt, eager_opt = make(params), make(eager)
    refs = [torch.randn_like(p) for p in params]
    opt.set_reference(refs)
    eager_opt.set_reference(refs)
    static_grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, static_grads):
        p.grad = g  # the graph reads these very tensors
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph: compiles kernels, builds tables
        for _ in range(2):
            opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for p, q in zip(params, eager):
        q.data.copy_(p.data)
    eager_opt.load_state_dict(opt.state_dict())
    for group in eager_opt.param_groups:  # loading copied the lr tensor; share the live one again
        group["lr"] = lr
    for k in range(3):
        new_grads = [torch.randn_like(p) for p in params]
        for g, n in zip(static_grads, new_grads):
            g.copy_(n)
        _set_grads(eager, new_grads)
        lr.fill_(1e-2 / (k + 1))  # a schedule that writes into the device lr also reaches the graph
        graph.replay()
        eager_opt.step()
    for a, b in zip(params, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opt.cnl_stats().total == sum(p.numel() for p in params)
