"""CNL under DDP and FSDP2 (fully_shard, DTensor parameters): ``torchrun --nproc_per_node 2``, gloo, CPU.

Each rank trains on its half of every batch; parameters and statistics after the CNL steps must
equal a single-process run on the whole batches (DDP and FSDP2 average the gradients over ranks,
so the mean gradient, hence the reference, is the same). One torchrun runs every scenario
(tests/integrations/distributed_worker.py), to pay the process start-up once.
"""
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from . import distributed_worker as worker

# every torchrun job of the suite on one xdist worker (pytest.ini: --dist loadgroup): under pytest-xdist,
# two gloo jobs at once abort a rank now and then ("terminate called without an active exception", in a
# non-Python thread, before any CNL kernel ran); one job at a time never has
pytestmark = [pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="needs torch.distributed with the gloo backend"),
              pytest.mark.xdist_group("torchrun"),
              pytest.mark.usefixtures("native_built")]  # every rank loads the CPU kernels, within the timeout

TORCHRUN_TIMEOUT_S = 300
REPO = pathlib.Path(__file__).resolve().parents[2]


def _torchrun(script, *args, timeout=TORCHRUN_TIMEOUT_S):
    """``torchrun --nproc_per_node 2 script args`` on CPU (gloo); the completed process."""
    # PYTHONFAULTHANDLER: a rank that aborts shows where (the Python stacks of its threads)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONFAULTHANDLER="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    # --standalone: torchrun picks and holds a free port itself (no race with other test processes)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(worker.WORLD_SIZE), str(script), *map(str, args)]
    result = subprocess.run(command, env=env, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command[2:])} exited with {result.returncode}:\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out_path = tmp_path_factory.mktemp("distributed") / "results.pt"
    _torchrun(pathlib.Path(worker.__file__), out_path)
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


def test_cnl_trainer_under_torchrun_ddp():
    """examples/hf_trainer.py on 2 ranks: the Trainer wraps the model in DDP, the reference is
    captured through it, and the collaborative share is logged."""
    pytest.importorskip("transformers")
    output = _torchrun(REPO / "examples" / "hf_trainer.py", "--epochs", 2).stdout
    line = next(line for line in output.splitlines() if line.startswith("collaborative share"))
    shares = [float(x) for x in line.split(":")[1].split(",")]
    assert len(shares) == 2 and all(0 < s < 1 for s in shares)  # 2 epochs x 2 steps, logged every 2
