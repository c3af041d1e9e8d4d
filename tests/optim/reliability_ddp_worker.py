"""One rank of tests/optim/test_reliability.py::test_capture_under_ddp_gradient_as_bucket_view.

Started by torchrun (2 ranks, gloo, CPU): capture the reference through
``DistributedDataParallel(gradient_as_bucket_view=True)``, then run one training backward (DDP
writes its bucket again). Rank 0 saves, per optimizer, every rank's (reference right after the
capture, the reference after the next backward, whether each reference shares storage with a
``.grad``, i.e. DDP's bucket), or the error text.
"""
from __future__ import annotations

import datetime
import traceback

import torch

import cnl_ext

# torchrun's PYTHONPATH holds the repository root; the model, loss and world size are the DDP tests' own
from tests.integrations.distributed_worker import WORLD_SIZE, loss_fn, make_model, shutdown

REFERENCE_KEY = "cnl_reference"

OPTIMIZERS = {
    "FusedCNLSGD-torch": lambda params: cnl_ext.FusedCNLSGD(params, lr=0.05, momentum=0.9, backend="torch"),
    "FusedCNLAdamW-triton": lambda params: cnl_ext.FusedCNLAdamW(params, lr=0.02, backend="triton"),
    "CNL(AdamW)-torch": lambda params: cnl_ext.CNL(torch.optim.AdamW(params, lr=0.02), backend="torch"),
}


def make_data():
    """(mastered batches, one training batch), whole: each rank takes its half of every batch."""
    generator = torch.Generator().manual_seed(1)
    mastered = [torch.randn(WORLD_SIZE * 3, 6, generator=generator) for _ in range(3)]
    return mastered, torch.randn(WORLD_SIZE * 4, 6, generator=generator)


def expected_reference():
    """The mean over the mastered batches of the whole-batch gradient (what DDP's average gives)."""
    model = make_model()
    mastered, _ = make_data()
    grads = [torch.autograd.grad(loss_fn(model, x), list(model.parameters())) for x in mastered]
    return [sum(g[i] for g in grads) / len(grads) for i in range(len(grads[0]))]


def _stored_references(opt):
    tensors = opt.state_dict(include_reference=True)[REFERENCE_KEY]["tensors"]
    return [tensors[i] for i in sorted(tensors)]


def run(out_path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank = dist.get_rank()
    mastered, train = make_data()
    part = lambda x: x.chunk(WORLD_SIZE)[rank]  # noqa: E731
    results = {}
    for name, make_opt in OPTIMIZERS.items():
        try:
            gathered = [None] * WORLD_SIZE
            dist.all_gather_object(gathered, _capture_scenario(make_opt, mastered, part, part(train)))
            results[name] = gathered
        except Exception:  # both ranks fail alike (same code, same data): report, go on
            results[name] = traceback.format_exc(limit=-4)
            dist.barrier()
    if rank == 0:
        torch.save(results, out_path)
    shutdown()


def _capture_scenario(make_opt, mastered, part, train_batch):
    """(reference right after the capture, the reference after the next backward, whether each
    reference shares storage with a .grad); the DDP module dies on return (see shutdown)."""
    model = torch.nn.parallel.DistributedDataParallel(make_model(), gradient_as_bucket_view=True)
    params = list(model.parameters())
    opt = make_opt(params)
    with opt.capture_reference() as ref:
        for x in mastered:
            ref.backward(loss_fn(model, part(x)))
    captured = [r.detach().clone() for r in _stored_references(opt)]
    opt.zero_grad()
    loss_fn(model, train_batch).backward()  # DDP fills its bucket (the .grad views) again
    live = _stored_references(opt)
    grad_storages = {p.grad.untyped_storage().data_ptr() for p in params if p.grad is not None}
    aliases = [r.untyped_storage().data_ptr() in grad_storages for r in live]
    return captured, [r.detach().clone() for r in live], aliases

if __name__ == "__main__":  # torchrun --nproc_per_node 2 tests/optim/reliability_ddp_worker.py OUT.pt
    import sys

    run(sys.argv[1])
