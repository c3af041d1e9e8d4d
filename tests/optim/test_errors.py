"""Bad input: a clear error that names the problem, and nothing the user passed is changed."""
import pytest
import torch

import cnl_ext

from ..conftest import BACKEND_DEVICES


def _params(device):
    return [torch.randn(3, 4, device=device, requires_grad=True), torch.randn(4, device=device, requires_grad=True)]


def _snapshot(opt, params):
    return ([p.detach().clone() for p in params], {p: dict(opt._references) for p in params},
            {id(p): {k: v.clone() for k, v in opt.state.get(p, {}).items()} for p in params})


def _assert_unchanged(opt, params, snapshot):
    values, refs, states = snapshot
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    assert {p: dict(opt._references) for p in params} == refs
    for p in params:
        state = opt.state.get(p, {})
        assert state.keys() == states[id(p)].keys()
        assert all(torch.equal(state[k], v) for k, v in states[id(p)].items())


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("bad,error,match", [
    (lambda ps: [torch.randn(4, 3), torch.randn(4)], ValueError, r"shape \(4, 3\).*shape \(3, 4\)"),
    (lambda ps: [torch.randn(3, 4, device="meta"), torch.randn(4)], ValueError, "is on meta"),
    (lambda ps: [torch.ones(3, 4, dtype=torch.int64), torch.randn(4)], TypeError, "torch.int64"),
    (lambda ps: [torch.randn(3, 4, dtype=torch.complex64), torch.randn(4)], TypeError, "complex64"),
    (lambda ps: [torch.randn(3, 4).to_sparse(), torch.randn(4)], ValueError, "sparse"),
    (lambda ps: [torch.randn(3, 4)], ValueError, "expects 2 tensors"),
    (lambda ps: {torch.nn.Parameter(torch.randn(4)): torch.randn(4)}, ValueError, "does not hold"),
    (lambda ps: [torch.randn(3, 4), "not a tensor"], TypeError, "str"),
])
def test_bad_reference_is_rejected_before_anything_is_written(backend, device, bad, error, match):
    params = _params(device)
    opt = cnl_ext.FusedCNLAdamW(params, backend=backend)
    opt.set_reference([torch.randn_like(p) for p in params])
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    snapshot = _snapshot(opt, params)
    tensors = bad(params)
    if isinstance(tensors, list):  # move the good entries next to the parameters
        tensors = [t.to(device) if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.layout == torch.strided
                   else t for t in tensors]
    with pytest.raises(error, match=match):
        opt.set_reference(tensors)
    _assert_unchanged(opt, params, snapshot)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_sparse_gradient_is_rejected_with_params_and_state_untouched(backend, device):
    emb = torch.nn.Embedding(10, 3, sparse=True).to(device)
    dense = torch.randn(3, device=device, requires_grad=True)
    params = [dense, emb.weight]
    opt = cnl_ext.FusedCNLAdam(params, backend=backend)
    dense.grad = torch.randn(3, device=device)
    emb(torch.tensor([1, 2], device=device)).sum().backward()
    snapshot = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    _assert_unchanged(opt, params, snapshot)
    assert len(opt.state) == 0


@pytest.mark.parametrize("make,error,match", [
    (lambda: cnl_ext.FusedCNLAdamW([torch.randn(2).to(torch.float8_e4m3fn)]), TypeError, "float8_e4m3fn"),
    (lambda: cnl_ext.FusedCNLAdamW(_params("cpu"), lr=torch.ones(2), capturable=True), ValueError, "1-element"),
    (lambda: cnl_ext.FusedCNLAdamW(_params("cpu"), lr=torch.tensor(1), capturable=True), ValueError, "floating"),
    (lambda: cnl_ext.FusedCNLAdamW(_params("cpu"), differentiable=True), ValueError, "differentiable"),
    (lambda: cnl_ext.FusedCNLAdamW(_params("cpu"), foreach=True, fused=True), RuntimeError, "cannot be `True` together"),
    (lambda: cnl_ext.FusedCNLAdamW(_params("cpu"), lr=torch.tensor(0.1), foreach=True), ValueError,
     "capturable=False and foreach=True"),
    (lambda: cnl_ext.FusedCNLAdam(_params("cpu"), betas=(0.9, torch.tensor(0.99))), ValueError, "both floats or both"),
    (lambda: cnl_ext.FusedCNLAdam(_params("cpu"), betas=(torch.tensor(0.9), torch.tensor(0.99)), foreach=True),
     ValueError, r"betas\[0\] as a Tensor"),
    (lambda: cnl_ext.FusedCNLAdamW(_params("cpu"), lr=-1.0), ValueError, "learning rate"),
    (lambda: cnl_ext.FusedCNLAdam(_params("cpu"), betas=(1.0, 0.9)), ValueError, "beta parameter at index 0"),
    (lambda: cnl_ext.FusedCNLAdam(_params("cpu"), eps=-1.0), ValueError, "epsilon"),
    (lambda: cnl_ext.FusedCNLSGD(_params("cpu"), nesterov=True), ValueError, "Nesterov"),
    (lambda: cnl_ext.FusedCNLSGD(_params("cpu"), momentum=-0.1), ValueError, "momentum"),
    (lambda: cnl_ext.FusedCNLSGD(_params("cpu"), weight_decay=-0.1), ValueError, "weight_decay"),
    (lambda: cnl_ext.FusedCNLSGD(_params("cpu"), backend="jax"), ValueError, "backend must be one of"),
    (lambda: cnl_ext.FusedCNLSGD(_params("cpu"), reference_dtype="float16"), ValueError, "reference_dtype"),
])
def test_unsupported_options_fail_at_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("optimizer", [cnl_ext.FusedCNLSGD, cnl_ext.FusedCNLAdamW])
def test_an_unavailable_backend_names_the_reason_and_changes_nothing(monkeypatch, optimizer):
    """backend="cuda" (the old name of "native") where the extension cannot load: one clear error,
    raised before any state is created or any step counted."""
    from cnl_ext import registry
    monkeypatch.setattr(registry, "_modules", {"native": "cnl_ext._C could not be loaded: test"})
    params = _params("cpu")
    opt = optimizer(params, lr=0.1, backend="cuda")
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    for _ in range(2):
        with pytest.raises(RuntimeError, match="backend 'native' is not available: cnl_ext._C could not be loaded"):
            opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not opt.state


def test_unknown_backend_is_rejected_at_construction():
    with pytest.raises(ValueError, match="backend must be one of .*'native'.*'cuda'.*got 'tritn'"):
        cnl_ext.FusedCNLAdamW(_params("cpu"), backend="tritn")


def test_capture_without_backward_is_an_error():
    opt = cnl_ext.FusedCNLSGD(_params("cpu"), lr=0.1)
    with pytest.raises(RuntimeError, match="without any ref.backward"):
        with opt.capture_reference():
            pass
    assert not opt.has_reference


def _fresh_auto(monkeypatch, order):
    from cnl_ext import registry
    monkeypatch.setattr(registry, "AUTO_ORDER", order)
    monkeypatch.setattr(registry, "_auto_chosen", {})
    monkeypatch.setattr(registry, "_modules", {})
    monkeypatch.setattr(registry, "_warned", set())
    return registry


def test_auto_passes_over_an_unavailable_backend_once_with_a_warning(monkeypatch):
    """auto: a backend that cannot be imported or built is passed over, with one warning naming why."""
    functional = _fresh_auto(monkeypatch, {"cpu": ("native", "torch")})
    monkeypatch.setitem(functional.BACKEND_MODULES, "native", "cnl_ext.ops.no_such_backend_module")
    monkeypatch.delenv(functional.REQUIRE_NATIVE_ENV, raising=False)
    params = _params("cpu")
    expected = [p.detach().clone().requires_grad_() for p in params]
    opt, ref_opt = cnl_ext.FusedCNLAdamW(params), torch.optim.AdamW(expected)
    for step in range(2):
        for p, q in zip(params, expected):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        if step == 0:
            with pytest.warns(RuntimeWarning, match="uses 'torch' for cpu tensors because .*native.*no_such_backend"):
                opt.step()
        else:
            opt.step()  # no second warning: the choice is kept
        ref_opt.step()
    for p, q in zip(params, expected):
        torch.testing.assert_close(p, q)


def test_auto_never_retries_a_step_that_failed_inside_a_backend(monkeypatch):
    """An error inside an op (after a partial write, perhaps) propagates: no second backend runs it,
    and the backend stays chosen (a transient error must not demote it for the process)."""
    functional = _fresh_auto(monkeypatch, {"cpu": ("triton", "torch")})
    from cnl_ext.ops import torch_backend, triton_backend
    calls = []

    def broken(*args, **kwargs):
        calls.append("triton")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(triton_backend, "adam_step_", broken)
    monkeypatch.setattr(torch_backend, "adam_step_", lambda *a, **k: calls.append("torch"))
    everything = triton_backend.capabilities(torch.device("cuda"))
    monkeypatch.setattr(triton_backend, "capabilities", lambda device: everything)
    params = _params("cpu")
    opt = cnl_ext.FusedCNLAdamW(params)
    for p in params:
        p.grad = torch.randn_like(p)
    with pytest.raises(RuntimeError, match="out of memory"):
        opt.step()
    assert calls == ["triton"]
    assert functional.resolve("auto", torch.device("cpu"), "adam_step_") is triton_backend


def test_require_native_makes_an_unavailable_native_backend_an_error(monkeypatch):
    functional = _fresh_auto(monkeypatch, {"cpu": ("native", "torch")})
    monkeypatch.setitem(functional.BACKEND_MODULES, "native", "cnl_ext.ops.no_such_backend_module")
    monkeypatch.setenv(functional.REQUIRE_NATIVE_ENV, "1")
    params = _params("cpu")
    opt = cnl_ext.FusedCNLAdamW(params)
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    with pytest.raises(functional.BackendUnavailable, match="CNL_EXT_REQUIRE_NATIVE=1"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not opt.state


@pytest.mark.parametrize("optimizer", [cnl_ext.FusedCNLAdamW, lambda ps: cnl_ext.FusedCNLSGD(ps, lr=0.1, momentum=0.9)])
def test_a_bucket_that_fails_to_compile_stops_the_step_before_any_bucket_writes(monkeypatch, optimizer):
    """Buckets of two dtypes: the second's kernel fails to compile. Every bucket's kernel is compiled
    (``prepare``) before the first one runs, so nothing is written and no step is counted."""
    from cnl_ext.ops import triton_backend

    def prepare(op, params, *args, **kwargs):
        if params[0].dtype == torch.bfloat16:
            raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(triton_backend, "prepare", prepare, raising=False)
    params = [torch.randn(3, 4, requires_grad=True), torch.randn(5, dtype=torch.bfloat16, requires_grad=True)]
    opt = optimizer(params) if not isinstance(optimizer, type) else optimizer(params, backend="triton")
    opt.backend = "triton"
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="PTX assembly failed"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not opt.state
