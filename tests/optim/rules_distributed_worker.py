"""One rank of tests/optim/test_rules_distributed.py (started by torchrun, 2 ranks, gloo, CPU):
rule="agem" and EWC under DDP and FSDP2. The single-process run the test compares with uses the same
builders (:func:`train`, :data:`OPTIMIZERS`), with the whole batch on one process.
"""
from __future__ import annotations

import datetime
import traceback

import torch

import cnl_ext

# torchrun's PYTHONPATH holds the repository root; the model, data and wrappings are the DDP tests' own
from tests.integrations.distributed_worker import (WORLD_SIZE, WRAPPINGS, _full, _wrap, loss_fn, make_data,
                                                   make_model, shutdown)

OPTIMIZERS = {
    "FusedCNLAdamW-agem-torch": lambda params: cnl_ext.FusedCNLAdamW(
        params, lr=0.02, weight_decay=0.1, backend="torch", rule="agem"),
    "FusedCNLSGD-agem-ewc-native": lambda params: cnl_ext.FusedCNLSGD(
        params, lr=0.05, momentum=0.9, backend="native", rule="agem", ewc_lambda=2.0),
    "FusedCNLAdam-cnl-ewc-triton": lambda params: cnl_ext.FusedCNLAdam(
        params, lr=0.02, backend="triton", reference_dtype="bfloat16", ewc_lambda=2.0),
}


def train(model, opt, mastered, inputs, part=lambda x: x):
    """Capture the reference and the Fisher estimate on the mastered batches, then the steps. The
    reference is that of the negated loss, so that it opposes the training gradients (A-GEM projects)."""
    with opt.capture_reference() as ref:
        for x in mastered:
            ref.backward(-loss_fn(model, part(x)))
    with opt.capture_fisher() as f:
        for x in mastered:
            f.backward(loss_fn(model, part(x)))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)  # away from the anchor: the EWC term is not 0
    for x in inputs:
        opt.zero_grad()
        loss_fn(model, part(x)).backward()
        opt.step()


def run(out_path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank = dist.get_rank()
    mastered, inputs = make_data()
    part = lambda x: x.chunk(WORLD_SIZE)[rank]  # noqa: E731
    results = {}
    for wrapping in WRAPPINGS:
        for name, make_opt in OPTIMIZERS.items():
            try:
                model = _wrap(make_model(), wrapping)
                train(model, make_opt(list(model.parameters())), mastered, inputs, part)
                results[(wrapping, name)] = [_full(p) for p in model.parameters()]
                del model
            except Exception:  # both ranks fail alike (same code, same data): report, go on
                results[(wrapping, name)] = traceback.format_exc(limit=-4)
                dist.barrier()
    if rank == 0:
        torch.save(results, out_path)
    shutdown()


if __name__ == "__main__":  # torchrun --nproc_per_node 2 tests/optim/rules_distributed_worker.py OUT.pt
    import sys

    run(sys.argv[1])
