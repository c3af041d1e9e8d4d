"""The ops contract as data (cnl_ext.ops.contract): every backend's ops take the declared arguments,
capabilities are data, and the backend of a step is resolved once."""
import inspect

import pytest
import torch

import cnl_ext
from cnl_ext import functional, registry
from cnl_ext.ops import contract

BACKENDS = ("torch", "triton", "native")


def _backend(name):
    try:
        return registry.load_backend(name)
    except registry.BackendUnavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("op", list(contract.OPS.values()), ids=str)
def test_every_backend_op_takes_the_declared_arguments(name, op):
    parameters = inspect.signature(getattr(_backend(name), op.name)).parameters
    declared = [*op.tensor_lists, *op.arguments, *op.keywords]
    if op.step:
        declared += contract.IMPORTANCE_KEYWORDS + contract.RULE_KEYWORDS
    assert list(parameters) == declared
    keyword_only = [n for n, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert keyword_only == declared[len(op.tensor_lists) + len(op.arguments):]
    assert op.written <= set(op.tensor_lists) and ("params" in op.written) != op.reduction


@pytest.mark.parametrize("name", BACKENDS)
def test_capabilities_are_data(name):
    capabilities = _backend(name).capabilities(torch.device("cpu"))
    assert isinstance(capabilities, contract.Capabilities)
    assert capabilities.ops <= set(contract.OPS)
    assert not capabilities.runs("capturable") and not capabilities.runs("float64")  # options are fields, not ops
    nowhere = _backend(name).capabilities(torch.device("meta"))
    assert (name == "torch") == nowhere.runs(contract.ADAM_STEP)
    if name != "torch":
        assert nowhere.reason and "meta" in registry.why_unsupported(_backend(name), "meta", "adam_step_")


def test_an_explicit_backend_without_an_op_names_the_reason(monkeypatch):
    from cnl_ext.ops import torch_backend
    monkeypatch.setattr(torch_backend, "capabilities", lambda device: contract.Capabilities(reason="no ops here"))
    with pytest.raises(RuntimeError, match="no ops here"):
        registry.resolve("torch", torch.device("cpu"), "sgd_step_")
    monkeypatch.setattr(torch_backend, "capabilities",
                        lambda device: contract.Capabilities(frozenset(contract.OPS)))
    with pytest.raises(RuntimeError, match="backend 'torch' does not support float64 on cpu"):
        registry.resolve("torch", torch.device("cpu"), "sgd_step_", torch.float64)
    with pytest.raises(RuntimeError, match="capturable=True is not supported by backend 'torch' on cpu"):
        registry.resolve("torch", torch.device("cpu"), "adam_step_", capturable=True)


@pytest.mark.parametrize("make", [lambda ps: cnl_ext.FusedCNLAdamW(ps, lr=0.1, backend="torch"),
                                  lambda ps: cnl_ext.FusedCNLSGD(ps, lr=0.1, momentum=0.9, backend="torch")])
def test_a_step_resolves_its_backend_once(monkeypatch, make):
    """One resolution per group and step (check_step), which the functional call reuses; two dtypes
    (float64 and float32) on one device: one each."""
    params = [torch.randn(3, dtype=torch.float64, requires_grad=True), torch.randn(4, requires_grad=True),
              torch.randn(5, requires_grad=True)]
    for p in params:
        p.grad = torch.randn_like(p)
    calls = []
    real = registry.resolve

    def counting(*args, **kwargs):
        calls.append(args[:3])
        return real(*args, **kwargs)

    monkeypatch.setattr(registry, "resolve", counting)
    opt = make(params)
    opt.step()
    assert len(calls) == 2
    calls.clear()
    opt.step()
    assert len(calls) == 2


def test_check_step_returns_the_backends_the_functional_call_takes():
    params = [torch.zeros(3), torch.zeros(2, dtype=torch.float64)]
    grads = [torch.ones(3), torch.ones(2, dtype=torch.float64)]
    backends = functional.check_step("sgd_step_", "torch", params, grads)
    assert set(backends) == {(torch.device("cpu"), False), (torch.device("cpu"), True)}
    functional.cnl_sgd(params, grads, [None, None], lr=0.5, backend=backends)
    assert all(torch.equal(p, torch.full_like(p, -0.5)) for p in params)


def test_a_step_checks_the_importance_options_only_at_construction(monkeypatch):
    params = [torch.randn(4, requires_grad=True)]
    params[0].grad = torch.randn(4)
    opt = cnl_ext.FusedCNLAdamW(params, lr=0.1, importance="param_mix", backend="torch")
    calls = []
    monkeypatch.setattr(functional, "check_importance_options", lambda *args: calls.append(args))
    opt.step()
    assert calls == [] and opt.importance_scores()[0].abs().sum() > 0
    functional.cnl_sgd(params, [torch.ones(4)], [None], lr=0.1, backend="torch", importance=opt.importance_state(),
                       importance_kind="param_mix")
    assert len(calls) == 1  # the functional API checks what it is given
