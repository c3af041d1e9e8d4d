"""CNL under DDP and FSDP2 (fully_shard, DTensor parameters), 2 CPU processes on gloo.

Each rank trains on its half of every batch; parameters and statistics after the CNL steps must
equal a single-process run on the whole batches (DDP and FSDP2 average the gradients over ranks,
so the mean gradient, hence the reference, is the same). One spawn runs every scenario
(tests/distributed_worker.py), to pay the process start-up once.
"""
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import distributed_worker as worker

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with the gloo backend")

SPAWN_TIMEOUT_S = 180


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out_path = str(tmp_path_factory.mktemp("distributed") / "results.pt")
    os.environ.setdefault("TRITON_INTERPRET", "1")  # inherited by the spawned ranks (CPU tensors)
    context = mp.start_processes(worker.run, args=(f"tcp://127.0.0.1:{_free_port()}", out_path),
                                 nprocs=worker.WORLD_SIZE, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0)):  # False until every rank is done
            if time.monotonic() >= deadline:
                pytest.fail(f"the distributed ranks did not finish within {SPAWN_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    return torch.load(out_path)


@pytest.fixture(scope="module")
def single_process_results():
    mastered, inputs = worker.make_data()
    results = {}
    for name, make_opt in worker.OPTIMIZERS.items():
        model = worker.make_model()
        history = worker.train(model, make_opt(list(model.parameters())), mastered, inputs)
        results[name] = ([p.detach().clone() for p in model.parameters()], history)
    return results


@pytest.mark.parametrize("wrapping", worker.WRAPPINGS)
@pytest.mark.parametrize("name", list(worker.OPTIMIZERS))
def test_distributed_cnl_steps_equal_the_single_process_run(distributed_results, single_process_results,
                                                            wrapping, name):
    result = distributed_results[(wrapping, name)]
    if isinstance(result, str):
        pytest.fail(f"the distributed run raised:\n{result}")
    params, history = result
    expected_params, expected_history = single_process_results[name]
    for p, q in zip(params, expected_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(p, q) for p, q in zip(params, worker.make_model().parameters()))
    for (count, total, s_collab, s_conflict), expected in zip(history, expected_history):
        # the statistics cover every element once: summed over FSDP2's shards, not over DDP's replicas
        assert (count, total) == expected[:2]
        assert 0 < count < total
        torch.testing.assert_close((s_collab, s_conflict), expected[2:], rtol=1e-4, atol=1e-6)
