"""Issue 22 at the ops level: every backend's ``sgd_step_`` / ``adam_step_`` with the rule's terms
(``ewc``, ``ewc_lambda``, ``agem_coefficient``: cnl_ext.ops.contract.RULE_KEYWORDS) against the
definitions tensor by tensor, over test_definition's shapes (0-d, empty, odd sizes, more than one
work item / chunk), several steps; and ``agem_dot_`` against its definition.

Every backend (native CPU and CUDA, Triton, PyTorch) applies the terms in its own pass and equals the
definition bit for bit in every dtype. With KIF's
importance EMAs too, the EMAs equal cnl_ext.ops.importance.importance_update_ of the gradients as passed
(in the step's pass, or right after it where ``Capabilities.importance_with_rules`` is not set: the
native CUDA kernels). The CUDA cases are marked ``cuda`` (they run in scripts/gpu_session.sh's tests phase).
"""
from __future__ import annotations

import pytest
import torch

from cnl_ext import reference_format
from cnl_ext.ops import rules
from cnl_ext.ops.importance import importance_update_
from cnl_ext.optim.adam import cnl_adam_step
from cnl_ext.optim.sgd import cnl_sgd_step

from ..conftest import ALL_BACKEND_DEVICES
from .test_definition import (ADAM_OPTIONS, DTYPES, SGD_OPTIONS, STEPS, _adam_arguments, _assert_bits, _clone,
                              _inputs, _module, _sgd_arguments, _small_chunks)  # noqa: F401 (fixture)

CASES = {  # name: (reference format, ewc_lambda, agem coefficient per step)
    "ewc": (None, 0.7, None),
    "ewc-cnl-float32": ("float32", 0.7, None),
    "ewc-cnl-sign2": ("sign2", 1.5, None),
    "agem-float32": ("float32", 0.0, (-0.3, 0.0, -1.25)),
    "agem-bfloat16-ewc": ("bfloat16", 0.7, (-0.6, -0.05, 0.0)),
}


def _ewc_inputs(params, device, seed=1):
    generator = torch.Generator().manual_seed(seed)
    fishers = [torch.rand(p.shape, generator=generator).to(device) for p in params]
    anchors = [(p.float() + 0.3 * torch.randn(p.shape, generator=generator).to(device)).to(p.dtype) for p in params]
    return fishers, anchors


def _cases():
    return [pytest.param(dtype, case, id=f"{dtype}-{case}".replace("torch.", "")) for dtype in DTYPES for case in CASES]


def _run(backend, device, dtype, case, op, definition, n_states, arguments, importance_kind=None):
    module = _module(backend, device, dtype)
    if importance_kind is not None and not module.capabilities(torch.device(device)).importance:
        pytest.skip(f"{backend} takes no importance EMAs on {device}")
    fmt, ewc_lambda, coefficients = CASES[case]
    params, states, grads, refs = _inputs(backend, dtype, fmt, device, n_states)
    states = states or [None]
    fishers, anchors = _ewc_inputs(params, device)
    stats = None if fmt is None or coefficients is not None else torch.zeros(len(params), 3, dtype=torch.float64,
                                                                              device=device)
    got, got_states = _clone(params), [_clone(s) for s in states]
    want, want_states = _clone(params), [_clone(s) for s in states]
    want_stats = None if stats is None else stats.clone()
    importance, want_importance, importance_kwargs = None, None, {}
    if importance_kind is not None:
        generator = torch.Generator().manual_seed(2)
        importance = [[torch.rand(p.shape, generator=generator).to(device) for p in params] for _ in range(2)]
        want_importance = [_clone(column) for column in importance]
        importance_kwargs = dict(importance=tuple(importance), importance_kind=importance_kind,
                                 importance_betas=(0.85, 0.7))
    for k in range(STEPS):
        c = None if coefficients is None else coefficients[k]
        op_kwargs, definition_kwargs = arguments(k)
        getattr(module, op)(got, grads[k], *got_states, refs, stats, reference_format=fmt or "float32",
                            ewc=(fishers, anchors) if ewc_lambda else None, ewc_lambda=ewc_lambda,
                            agem_coefficient=None if c is None else torch.tensor(c, dtype=torch.float64),
                            **op_kwargs, **importance_kwargs)
        for i in range(len(params)):
            terms = dict(ewc_fisher=fishers[i], ewc_anchor=anchors[i], ewc_lambda=ewc_lambda)
            mask = refs[i] if refs is not None and c is None else None
            if c is not None:
                terms.update(agem_reference=refs[i], agem_coefficient=c)
            row = definition(want[i], grads[k][i], *(s[i] if s is not None else None for s in want_states), mask,
                             reference_format=fmt or "float32", **definition_kwargs(i), **terms)
            if row is not None and want_stats is not None:
                want_stats[i] += row
        if importance_kind is not None:  # the EMAs read the new params and the gradients as passed
            importance_update_(want, grads[k], *want_importance, kind=importance_kind, betas=(0.85, 0.7))
    _assert_bits(got, want, "params")
    for j, (g, w) in enumerate(zip(got_states, want_states)):
        if g is not None:
            _assert_bits(g, w, f"state {j}")
    if stats is not None:
        assert torch.equal(stats[:, 0], want_stats[:, 0])
    if importance is not None:
        _assert_bits(importance[0], want_importance[0], "sensitivities")
        _assert_bits(importance[1], want_importance[1], "uncertainties")


@pytest.mark.parametrize("backend,device", ALL_BACKEND_DEVICES)
@pytest.mark.parametrize("dtype,case", _cases())
@pytest.mark.parametrize("options", ["adamw", "adam-l2-amsgrad-maximize"])
def test_adam_with_the_rules_equals_the_definition(backend, device, dtype, case, options):
    _run(backend, device, dtype, case, "adam_step_", cnl_adam_step, 3,
         _adam_arguments(backend, device, ADAM_OPTIONS[options], "host"))


@pytest.mark.parametrize("backend,device", ALL_BACKEND_DEVICES)
@pytest.mark.parametrize("dtype,case", _cases())
@pytest.mark.parametrize("options", ["nesterov-decay", "dampening-maximize", "sgd"])
def test_sgd_with_the_rules_equals_the_definition(backend, device, dtype, case, options):
    opts = SGD_OPTIONS[options]
    _run(backend, device, dtype, case, "sgd_step_", cnl_sgd_step, 1 if opts["momentum"] else 0,
         _sgd_arguments(device, opts, tensor_lr=False))


@pytest.mark.parametrize("backend,device", ALL_BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["ewc-cnl-float32", "agem-bfloat16-ewc"])
@pytest.mark.parametrize("kind", ["first", "param_mix"])
def test_the_rules_with_importance_equal_the_definitions(backend, device, dtype, case, kind):
    """The rule's terms and KIF's EMAs in one call (the native CUDA kernels: the terms fused in the step,
    the EMAs right after it, Capabilities.importance_with_rules)."""
    _run(backend, device, dtype, case, "adam_step_", cnl_adam_step, 3,
         _adam_arguments(backend, device, ADAM_OPTIONS["adam-l2-amsgrad-maximize"], "host"), importance_kind=kind)
    _run(backend, device, dtype, case, "sgd_step_", cnl_sgd_step, 1,
         _sgd_arguments(device, SGD_OPTIONS["dampening-maximize"], tensor_lr=False), importance_kind=kind)


@pytest.mark.parametrize("backend,device", ALL_BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8", "sign2"])
def test_agem_dot_equals_its_definition(backend, device, dtype, fmt):
    module = _module(backend, device, dtype)
    if not module.capabilities(torch.device(device)).runs("agem_dot_"):
        pytest.skip(f"{backend} has no agem_dot_ on {device}")
    _, _, grads, refs = _inputs(backend, dtype, fmt, device, 0)
    got = torch.full((len(grads[0]),), 0.5, dtype=torch.float64, device=device)
    want = got.clone()
    module.agem_dot_(grads[0], refs, got, reference_format=fmt)
    rules.agem_dot_(grads[0], refs, want, reference_format=fmt)
    # mixed signs: the error is relative to Σ|g·r| (float32 lanes of at most 32 terms, then float64)
    scale = torch.stack([(g.double().abs() * reference_format.decode(r, fmt, g.shape).double().abs()).sum()
                         for g, r in zip(grads[0], refs)]).to(device)
    tolerance = (1e-12 if dtype == torch.float64 else 2e-6) * scale + 1e-12
    assert ((got - want).abs() <= tolerance).all(), (got - want).abs().max()
    again = torch.full_like(got, 0.5)
    module.agem_dot_(grads[0], refs, again, reference_format=fmt)
    assert torch.equal(again, got)  # deterministic


