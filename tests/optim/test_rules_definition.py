"""Issue 22: every backend's A-GEM and EWC steps against the definitions (``cnl_sgd_step``,
``cnl_adam_step`` with their ``agem_*`` / ``ewc_*`` inputs), through the optimizers, over several
shapes, dtypes and layouts (transposed, sliced parameters), a few steps; and A-GEM's guarantee as a
property (hypothesis): after the projection the step does not raise the reference loss to first order.

The definition's coefficient ``c = min(0, g·r)/(r·r)`` is summed here tensor by tensor in float64, the
optimizer's in its own order: the results agree to float round-off (tight tolerances; bfloat16
parameters within their rounding, since the backends may round the rule's gradient to bfloat16).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cnl_ext import FusedCNLAdam, FusedCNLAdamW, FusedCNLSGD, functional
from cnl_ext import reference_format as rf
from cnl_ext.ops.chunking import compute_dtype
from cnl_ext.optim.adam import cnl_adam_step
from cnl_ext.optim.sgd import cnl_sgd_step

from ..conftest import ALL_BACKEND_DEVICES
from .reliability_helpers import in_layout

SHAPES = [(7,), (3, 5), (2, 3, 4), (), (33,)]
LAYOUTS = ["contiguous", "transposed", "sliced", "contiguous", "sliced"]
STEPS = 3
OPTIMIZERS = {
    "sgd-momentum-decay": (FusedCNLSGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    "sgd-nesterov-maximize": (FusedCNLSGD, dict(lr=0.1, momentum=0.5, nesterov=True, maximize=True)),
    "adam-l2": (FusedCNLAdam, dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.02)),
    "adamw-amsgrad": (FusedCNLAdamW, dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, amsgrad=True)),
}
CASES = [  # (rule, reference_dtype, ewc_lambda)
    ("agem", "float32", 0.0), ("agem", "bfloat16", 0.7), ("cnl", "float32", 0.7), ("cnl", "sign2", 0.7),
]
TOLERANCE = {torch.float32: dict(rtol=2e-6, atol=2e-6), torch.float64: dict(rtol=1e-12, atol=1e-12),
             torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _randn(shape, generator, dtype=torch.float32):
    return torch.randn(shape, generator=generator).to(dtype)


def _definition_coefficient(grads, refs, fmt, maximize):
    dot = square = 0.0
    for g, r in zip(grads, refs):
        dtype = compute_dtype(g.dtype)
        values = rf.decode(r, fmt, g.shape).to(dtype)
        dot += float((g.to(dtype) * values).sum(dtype=torch.float64)) * (-1.0 if maximize else 1.0)
        square += float(values.to(torch.float64).square().sum())
    return min(0.0, dot) / square if square > 0 else 0.0


def _run_definition(name, options, rule, fmt, ewc_lambda, params, refs, fishers, anchors, grads_per_step):
    is_sgd = OPTIMIZERS[name][0] is FusedCNLSGD
    params = [p.detach().clone(memory_format=torch.contiguous_format) for p in params]
    sdt = functional.state_dtype(params[0].dtype)
    states = [dict(m=torch.zeros_like(p, dtype=sdt), v=torch.zeros_like(p, dtype=sdt),
                   vmax=torch.zeros_like(p, dtype=sdt)) for p in params]
    for k, grads in enumerate(grads_per_step):
        c = _definition_coefficient(grads, refs, fmt, options.get("maximize", False)) if rule == "agem" else 0.0
        for i, (p, g) in enumerate(zip(params, grads)):
            terms = dict(ewc_fisher=fishers[i] if ewc_lambda else None, ewc_anchor=anchors[i], ewc_lambda=ewc_lambda,
                         agem_reference=refs[i] if rule == "agem" else None, agem_coefficient=c)
            mask = refs[i] if rule == "cnl" else None
            if is_sgd:
                cnl_sgd_step(p, g, states[i]["m"], mask, reference_format=fmt, lr=options["lr"],
                             weight_decay=options.get("weight_decay", 0.0), momentum=options["momentum"],
                             dampening=0.0, nesterov=options.get("nesterov", False),
                             maximize=options.get("maximize", False), first_step=k == 0, **terms)
            else:
                cnl_adam_step(p, g, states[i]["m"], states[i]["v"], states[i]["vmax"], mask, reference_format=fmt,
                              lr=options["lr"], beta1=options["betas"][0], beta2=options["betas"][1],
                              eps=options["eps"], weight_decay=options["weight_decay"],
                              decoupled_weight_decay=name.startswith("adamw"), amsgrad=options.get("amsgrad", False),
                              maximize=False, step=k + 1, **terms)
    return params


@pytest.mark.parametrize("backend,device", ALL_BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("case", range(len(CASES)))
def test_rules_equal_the_definition(backend, device, dtype, name, case):
    rule, fmt, ewc_lambda = CASES[case]
    module = functional.load_backend(backend)
    if isinstance(module, str):
        pytest.skip(module)
    if dtype == torch.float64 and not module.capabilities(torch.device(device)).float64:
        pytest.skip(f"{backend} does not step float64 on {device}")
    cls, options = OPTIMIZERS[name]
    generator = torch.Generator().manual_seed(case)
    values = [_randn(s, generator, dtype) for s in SHAPES]
    params = [torch.nn.Parameter(in_layout(v, layout).to(device)) for v, layout in zip(values, LAYOUTS)]
    opt = cls(params, backend=backend, rule=rule, reference_dtype=fmt, ewc_lambda=ewc_lambda, ewc_decay=0.5,
              **options)
    # the Fisher estimate of two captures (decayed), then the parameters move away from the anchor
    for _ in range(2):
        with opt.capture_fisher() as f:
            for _ in range(2):
                f.backward(sum((p.float() * _randn(p.shape, generator).to(device)).sum() for p in params))
        with torch.no_grad():
            for p in params:
                p.add_(_randn(p.shape, generator, dtype).to(device) * 0.1)
    raw = [_randn(s, generator) * (torch.rand(s, generator=generator) > 0.2) for s in SHAPES]
    opt.set_reference([in_layout(r, layout).to(device) for r, layout in zip(raw, LAYOUTS)])
    refs = [opt._reference.tensors[p] for p in params]
    fishers = [opt.state[p]["ewc_fisher"].clone() for p in params]
    anchors = [opt.state[p]["ewc_anchor"].clone() for p in params]
    # gradients: against the reference at the first step (A-GEM projects), along it at the second
    grads_per_step = []
    for k in range(STEPS):
        sign = -1.0 if k != 1 else 1.0
        grads_per_step.append([(sign * r.to(device) + 0.5 * _randn(s, generator).to(device)).to(dtype)
                               for r, s in zip(raw, SHAPES)])
    want = _run_definition(name, options, rule, fmt, ewc_lambda, params, refs, fishers, anchors, grads_per_step)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = in_layout(g, "transposed")
        opt.step()
    for i, (p, w) in enumerate(zip(params, want)):
        torch.testing.assert_close(p.detach(), w, **TOLERANCE[dtype], msg=lambda m: f"param {i}: {m}")
    assert all(torch.equal(opt.state[p]["ewc_fisher"], f) for p, f in zip(params, fishers))


# ----------------------------------------------------------------------------- A-GEM's guarantee

@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 4)), min_size=1, max_size=4),
       st.integers(0, 2**31 - 1), st.sampled_from(["torch", "native"]), st.booleans())
def test_agem_step_never_conflicts_with_the_reference(shapes, seed, backend, maximize):
    """SGD at lr 1 with rule="agem": Δθ = −d with d the projected direction; ``d·r ≥ 0`` always, and
    when the unprojected direction already agrees the step is plain SGD, bit for bit."""
    from cnl_ext.ops import native_backend

    if backend == "native" and native_backend.unavailable_reason():
        backend = "torch"
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator, dtype=torch.float64)) for s in shapes]
    refs = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    grads = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    before = [p.detach().clone() for p in params]
    opt = FusedCNLSGD([{"params": params[:1]}, {"params": params[1:]}] if len(params) > 1 else params, lr=1.0,
                      rule="agem", maximize=maximize, backend=backend)
    opt.set_reference(refs)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    direction = torch.cat([(b - p.detach()).flatten() for p, b in zip(params, before)])
    r = torch.cat([rf.decode(opt._reference.tensors[p], "float32", p.shape).double().flatten() for p in params])
    g = torch.cat([x.flatten() for x in grads]) * (-1.0 if maximize else 1.0)
    assert float(direction @ r) >= -1e-9 * float(r @ r) * max(1.0, float(g.abs().max()))
    if float(g @ r) >= 0:
        after = torch.cat([p.detach().flatten() for p in params])
        assert torch.equal(after, torch.cat([b.flatten() for b in before]) - g)
