"""What a drop-in for torch.optim must survive: deepcopy and pickle, torch.compile of the step."""
import copy
import pickle

import pytest
import torch

import cnl_ext
from cnl_ext.optim._base import IMPORTANCE_SLOTS
from cnl_ext.reference_format import FORMATS

OPTIMIZERS = [
    pytest.param(cnl_ext.FusedCNLAdamW, dict(lr=0.01, amsgrad=True), id="AdamW"),
    pytest.param(cnl_ext.FusedCNLAdam, dict(lr=0.01, weight_decay=0.1), id="Adam"),
    pytest.param(cnl_ext.FusedCNLSGD, dict(lr=0.1, momentum=0.9), id="SGD"),
]


def _params():
    g = torch.Generator().manual_seed(42)
    return [torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(3, generator=g))]


def _step(optimizer, params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    optimizer.step()


def _params_of(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def _assert_same(a, b):
    for p, q in zip(_params_of(a), _params_of(b)):
        assert torch.equal(p, q)
        assert a.state[p].keys() == b.state[q].keys()
        for key in a.state[p]:
            assert torch.equal(a.state[p][key], b.state[q][key])
    assert a.state_dict(include_reference=True)["param_groups"] == b.state_dict(include_reference=True)["param_groups"]


def _pickled(optimizer):
    return pickle.loads(pickle.dumps(optimizer))


@pytest.mark.parametrize("duplicate", [copy.deepcopy, _pickled], ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS)
def test_copies_keep_everything_and_step_as_the_original(cls, kwargs, fmt, duplicate):
    params = _params()
    optimizer = cls(params, backend="torch", reference_dtype=fmt, track_stats=True, importance="first", **kwargs)
    optimizer.save_reference = True
    optimizer.set_reference([torch.randn(5, 3), None])
    _step(optimizer, params, 0)  # KIF's EMAs in both importance slots: the inner one, then the outer one
    optimizer.importance_slot = "outer"
    _step(optimizer, params, 1)
    copied = duplicate(optimizer)
    assert (copied.backend, copied.reference_format, copied.track_stats, copied.importance, copied.save_reference,
            copied.importance_slot) == ("torch", fmt, True, "first", True, "outer")
    assert copied.cnl_stats() == optimizer.cnl_stats()
    copied_params = _params_of(copied)
    assert all(p is not q for p, q in zip(params, copied_params))
    assert [torch.equal(r, s) for r, s in zip(optimizer._references.values(), copied._references.values())] == [True]
    assert list(copied._references) == [copied_params[0]]  # keyed by the copy's own parameter
    for slot in IMPORTANCE_SLOTS:
        for a, b in zip(optimizer.importance_state(slot), copied.importance_state(slot)):
            assert all(x.any() and torch.equal(x, y) for x, y in zip(a, b)), slot
    for step in (2, 3):
        _step(optimizer, params, step)
        _step(copied, copied_params, step)
        _assert_same(optimizer, copied)
        assert copied.cnl_stats() == optimizer.cnl_stats()
        for a, b in zip(optimizer.importance_scores(), copied.importance_scores()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("duplicate", [copy.deepcopy, _pickled], ids=["deepcopy", "pickle"])
def test_wrapper_copies_keep_everything(duplicate):
    params = _params()
    optimizer = cnl_ext.CNL(torch.optim.RMSprop(params, lr=0.01), backend="torch", reference_dtype="sign2",
                            track_stats=True)
    optimizer.set_reference([torch.randn(5, 3), torch.randn(3)])
    _step(optimizer, params, 0)
    copied = duplicate(optimizer)
    assert copied.param_groups is copied.optimizer.param_groups and copied.state is copied.optimizer.state
    assert (copied.backend, copied.reference_format) == ("torch", "sign2")
    copied_params = _params_of(copied)
    for step in (1, 2):
        _step(optimizer, params, step)
        _step(copied, copied_params, step)
        for p, q in zip(params, copied_params):
            assert torch.equal(p, q)
        assert copied.cnl_stats() == optimizer.cnl_stats()


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS)
def test_compiled_step_equals_eager_and_a_scheduled_tensor_lr_does_not_recompile(cls, kwargs):
    import torch._dynamo

    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        params = _params()
        optimizer = cls(params, **{**kwargs, "lr": torch.tensor(kwargs["lr"])})
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0 / (k + 1))  # a new lr every step
        step = torch.compile(optimizer.step, backend="aot_eager") if compiled else optimizer.step
        for i in range(6):
            g = torch.Generator().manual_seed(i)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            if compiled and i == 2:
                torch._dynamo.config.error_on_recompile = True  # from the third step on
            try:
                step()
            finally:
                torch._dynamo.config.error_on_recompile = False
            scheduler.step()
        runs.append((params, optimizer))
    (eager, eager_opt), (compiled, compiled_opt) = runs
    for p, q in zip(eager, compiled):
        torch.testing.assert_close(p, q)
    assert float(compiled_opt.param_groups[0]["lr"]) == float(eager_opt.param_groups[0]["lr"])
