"""With a reference set, the CNL optimizers agree step by step with the authors' own loops."""
import pytest
import torch

import cnl_ext
from cnl_ext import reference_format
from cnl_ext.testing.authors_oracle import AuthorsCNL

from ..conftest import BACKEND_DEVICES

SHAPES = [(), (3,), (17, 5), (2, 3, 4), (2, 2, 3, 3)]

# optimizer name in the authors' code -> (our class, its arguments); the learning rates are large
# enough that a wrongly masked element is far outside the tolerance.
OPTIMIZERS = {
    "sgd": (cnl_ext.FusedCNLSGD, dict(lr=0.05)),
    "momentum": (cnl_ext.FusedCNLSGD, dict(lr=0.05, momentum=0.9)),
    "adam": (cnl_ext.FusedCNLAdam, dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8)),
    "adamw": (cnl_ext.FusedCNLAdamW, dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)),
}


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("reference_dtype", reference_format.FORMATS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_agrees_with_authors_loop_step_by_step(backend, device, reference_dtype, name):
    cls, kwargs = OPTIMIZERS[name]
    ours = [torch.randn(s, device=device, requires_grad=True) for s in SHAPES]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = cls(ours, backend=backend, reference_dtype=reference_dtype, **kwargs)
    authors = AuthorsCNL(theirs, name, lr=kwargs["lr"], momentum=kwargs.get("momentum", 0.9),
                         weight_decay=kwargs.get("weight_decay", 0.1))
    for step in range(6):
        if step % 3 == 0:  # a new reference now and then, as each epoch does
            refs = [torch.randn(s, device=device) for s in SHAPES]
            opt.set_reference(refs)
        grads = [torch.randn(s, device=device) for s in SHAPES]
        for a, b, g in zip(ours, theirs, grads):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        authors.step(refs)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {step}")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_parameters_without_reference_are_not_masked(backend, device):
    ours = [torch.randn(4, device=device, requires_grad=True) for _ in range(2)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = cnl_ext.FusedCNLSGD(ours, lr=0.1, backend=backend)
    authors = AuthorsCNL(theirs, "sgd", lr=0.1)
    refs = [torch.randn(4, device=device), None]
    opt.set_reference(refs)
    for a, b in zip(ours, theirs):
        a.grad = torch.randn(4, device=device)
        b.grad = a.grad.clone()
    opt.step()
    authors.step(refs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
