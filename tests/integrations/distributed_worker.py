"""One rank of tests/integrations/test_distributed.py (started by torchrun): CNL steps under DDP and FSDP2 (gloo, CPU).

The single-process run the test compares with uses the same builders (:func:`make_model`,
:func:`make_data`, :data:`OPTIMIZERS`, :func:`train`), with the whole batch on one process.
"""
from __future__ import annotations

import datetime
import traceback

import torch

import cnl_ext

WORLD_SIZE = 2
STEPS = 3
WRAPPINGS = ("ddp", "fsdp2")

OPTIMIZERS = {
    "FusedCNLAdamW-torch": lambda params: cnl_ext.FusedCNLAdamW(
        params, lr=0.02, weight_decay=0.1, backend="torch", track_stats=True),
    "FusedCNLAdamW-triton": lambda params: cnl_ext.FusedCNLAdamW(
        params, lr=0.02, weight_decay=0.1, backend="triton", track_stats=True),
    "FusedCNLSGD-triton-sign2": lambda params: cnl_ext.FusedCNLSGD(
        params, lr=0.05, momentum=0.9, backend="triton", reference_dtype="sign2", track_stats=True),
    "CNL(AdamW)-torch": lambda params: cnl_ext.CNL(
        torch.optim.AdamW(params, lr=0.02, weight_decay=0.1), backend="torch", track_stats=True),
    "CNL(AdamW)-triton-sign2": lambda params: cnl_ext.CNL(
        torch.optim.AdamW(params, lr=0.02, weight_decay=0.1), backend="triton", reference_dtype="sign2",
        track_stats=True),
}


def make_model():
    torch.manual_seed(0)
    # 7 and 3 output rows: FSDP2's dim-0 shards are uneven over 2 ranks
    return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def make_data():
    """(mastered batches, training batches), whole: each rank takes its slice of every batch."""
    generator = torch.Generator().manual_seed(1)
    mastered = [torch.randn(WORLD_SIZE * 3, 6, generator=generator) for _ in range(2)]
    inputs = [torch.randn(WORLD_SIZE * 4, 6, generator=generator) for _ in range(STEPS)]
    return mastered, inputs


def loss_fn(model, x):
    return (model(x) - 0.1).pow(2).mean()


def train(model, opt, mastered, inputs, part=lambda x: x):
    """Capture the reference, take the CNL steps; the statistics of every step."""
    with opt.capture_reference() as ref:
        for x in mastered:
            ref.backward(loss_fn(model, part(x)))
    history = []
    for x in inputs:
        opt.zero_grad()
        loss_fn(model, part(x)).backward()
        opt.step()
        stats = opt.cnl_stats()  # a collective with FSDP2: every rank calls it
        history.append((stats.collaborative, stats.total, stats.sum_s_collaborative, stats.sum_s_conflicting))
    return history


def _wrap(model, wrapping):
    if wrapping == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _full(p):
    from torch.distributed.tensor import DTensor

    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()


def run(out_path: str) -> None:
    """Every scenario on this rank; rank 0 saves {scenario: (params, history) or error text}."""
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))  # env:// from torchrun; generous on 2 busy cores
    rank = dist.get_rank()
    assert dist.get_world_size() == WORLD_SIZE
    mastered, inputs = make_data()
    part = lambda x: x.chunk(WORLD_SIZE)[rank]  # noqa: E731
    results = {}
    for wrapping in WRAPPINGS:
        for name, make_opt in OPTIMIZERS.items():
            try:
                results[(wrapping, name)] = _train_scenario(wrapping, make_opt, mastered, inputs, part)
            except Exception:  # both ranks fail alike (same code, same data): report, go on
                results[(wrapping, name)] = traceback.format_exc(limit=-4)
                dist.barrier()
    if rank == 0:
        torch.save(results, out_path)
    shutdown()


def _train_scenario(wrapping, make_opt, mastered, inputs, part):
    """(full parameters after training, history); the wrapped model dies on return (see shutdown)."""
    model = _wrap(make_model(), wrapping)
    history = train(model, make_opt(list(model.parameters())), mastered, inputs, part)
    return [_full(p) for p in model.parameters()], history


def shutdown() -> None:
    """Destroy the process group once nothing holds it. A DDP/FSDP module still alive keeps gloo's
    threads running into interpreter shutdown, where they abort the rank now and then ("terminate
    called without an active exception") after all the work is done."""
    import gc

    import torch.distributed as dist

    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":  # torchrun --nproc_per_node 2 tests/integrations/distributed_worker.py OUT.pt
    import sys

    run(sys.argv[1])
