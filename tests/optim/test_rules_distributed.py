"""Issue 22: rule="agem" and EWC under DDP and FSDP2 (2 gloo ranks, CPU) equal the single-process run:
under DDP the gradients are already the same on every rank; under FSDP2 the A-GEM dot products are
all-reduced over the shards and the Fisher estimate and anchor are kept per shard."""
from __future__ import annotations

import pathlib

import pytest
import torch

from ..integrations.test_distributed import _torchrun
from . import rules_distributed_worker as worker

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="needs torch.distributed with the gloo backend"),
    pytest.mark.xdist_group("torchrun"),  # never beside another torchrun job
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory, native_built):
    out = tmp_path_factory.mktemp("rules") / "results.pt"
    _torchrun(pathlib.Path(worker.__file__), out)
    return torch.load(out)


@pytest.mark.parametrize("wrapping", worker.WRAPPINGS)
@pytest.mark.parametrize("name", list(worker.OPTIMIZERS))
def test_rules_under_ddp_and_fsdp2_equal_the_single_process_run(distributed_results, wrapping, name):
    result = distributed_results[(wrapping, name)]
    if isinstance(result, str):
        pytest.fail(f"the distributed run raised:\n{result}")
    mastered, inputs = worker.make_data()
    model = worker.make_model()
    worker.train(model, worker.OPTIMIZERS[name](list(model.parameters())), mastered, inputs)
    for p, q in zip(result, model.parameters()):
        torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(p, q) for p, q in zip(result, worker.make_model().parameters()))
