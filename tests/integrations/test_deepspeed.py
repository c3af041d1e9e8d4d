"""A CNL optimizer as DeepSpeed's client optimizer (cnl_ext.integrations.deepspeed), on CPU:
``torchrun --nproc_per_node 2``, ``DS_ACCELERATOR=cpu``, gloo.

Each rank trains on its half of every micro-batch under ZeRO 0-3 (ZeRO-3 with a ``sub_group_size``
that splits the model), ZeRO-2/3 with the optimizer offloaded, fp32 and bf16, with a reference
captured through the engine; parameters and statistics after the steps must equal a single-process
run on the whole batches, and a run resumed from ``engine.save_checkpoint`` the uninterrupted one.
One torchrun launch runs every scenario (tests/integrations/deepspeed_worker.py): start-up is paid once.
The GPU variants (NCCL, CUDA, offload from CUDA, bf16 on GPU) are at the end, skipped without CUDA.
"""
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from . import deepspeed_worker as worker

pytestmark = [pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="needs torch.distributed with the gloo backend"),
              pytest.mark.xdist_group("torchrun")]  # one torchrun job at a time (see test_distributed.py)

REPO = pathlib.Path(__file__).resolve().parents[2]
TORCHRUN_TIMEOUT_S = 600  # the first launch may build DeepSpeed's CPU comm op (~1 min; CI builds it first)


def _deepspeed():
    try:
        import deepspeed  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure is a reason to skip
        pytest.skip(f"deepspeed is not importable ({type(error).__name__}: {error}); pip install -e '.[test]'")


def _torchrun(args, nproc, env_extra, timeout=TORCHRUN_TIMEOUT_S):
    env = dict(os.environ, PYTHONFAULTHANDLER="1", **env_extra,
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(pathlib.Path(worker.__file__)), *map(str, args)]
    result = subprocess.run(command, env=env, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command[2:])} exited with {result.returncode}:\n{result.stderr[-4000:]}")
    return result


CPU_SCENARIOS = list(worker.SCENARIOS)


@pytest.fixture(scope="module")
def cpu_results(tmp_path_factory):
    _deepspeed()
    folder = tmp_path_factory.mktemp("deepspeed")
    _torchrun([folder / "results.pt", folder / "checkpoints", *CPU_SCENARIOS], worker.WORLD_SIZE,
              dict(DS_ACCELERATOR="cpu"))
    return torch.load(folder / "results.pt", weights_only=False)


@pytest.fixture(scope="module")
def single_process_results():
    return {kind: worker.train_single(kind) for kind in {kind for _, _, kind in worker.SCENARIOS.values()}}


def _check(result, expected, bf16, gpu=False):
    params, history = result["params"], result["history"]
    expected_params, expected_history = expected
    tolerance = dict(rtol=0, atol=5e-3) if bf16 else dict(rtol=1e-5, atol=1e-5 if gpu else 1e-6)
    for p, q in zip(params, expected_params):
        torch.testing.assert_close(p, q, **tolerance)
    assert any(not torch.equal(p, q) for p, q in zip(params, worker.make_model().parameters()))
    assert len(history) == len(expected_history) == worker.STEPS
    for (count, total, s_collab, s_conflict), expected in zip(history, expected_history):
        # summed over the ranks' partitions, their alignment padding left out: every element once
        assert total == expected[1]
        assert 0 < count < total
        if bf16 or gpu:  # CUDA's fp32 matmuls round otherwise than the CPU run compared with
            assert abs(count - expected[0]) <= 2
            torch.testing.assert_close((s_collab, s_conflict), expected[2:], rtol=2e-2, atol=5e-3)
        else:
            assert count == expected[0]
            torch.testing.assert_close((s_collab, s_conflict), expected[2:], rtol=1e-4, atol=1e-6)


def _result(results, name):
    result = results[name]
    if isinstance(result, str):
        pytest.fail(f"the DeepSpeed run raised:\n{result}")
    return result


@pytest.mark.parametrize("name", CPU_SCENARIOS)
def test_deepspeed_cnl_steps_equal_the_single_process_run(cpu_results, single_process_results, name):
    zero, bf16, kind = worker.SCENARIOS[name]
    result = _result(cpu_results, name)
    _check(result, single_process_results[kind], bf16)
    assert result["global_steps"] == worker.STEPS  # the capture's engine step is not counted
    if zero["stage"] == 3:  # sub_group_size splits each rank's partition: one step() call per sub-group
        assert result["calls_per_step"] > 1


def test_deepspeed_capture_refuses_a_non_finite_reference_and_a_pending_window(cpu_results):
    """inf on one rank only: every rank refuses and keeps its previous reference; the engine's step
    counters and learning rate are as before; a capture with training gradients pending is refused, and
    so is one under DeepSpeed's bf16/fp16 optimizers without ZeRO (they would not reduce the reference)."""
    assert _result(cpu_results, "zero2")["refusals"] == dict(inf="refused", kept=True, counters=True,
                                                             bf16_stage0="refused", window="refused")


@pytest.mark.parametrize("name", CPU_SCENARIOS)
def test_deepspeed_checkpoint_resume_equals_the_uninterrupted_run(cpu_results, name):
    result = _result(cpu_results, name)
    resumed = result["resumed"]
    for p, q in zip(resumed["params"], result["params"]):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert resumed["history"] == result["history"]


def _ds_config(path, zero):
    """A Hugging Face DeepSpeed config ("auto" values filled by the Trainer), as docs/integrations.md shows."""
    import json

    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "zero_optimization": zero,
              "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}
    path.write_text(json.dumps(config))
    return path


# the example's summary lines, found wherever they stand: ranks that all think they are rank 0 print them
# to one pipe
SUMMARY_LINE = re.compile(r"(?:mastered|injection) loss +[\d.]+ -> [\d.]+|collaborative share of the logged "
                          r"steps: [\d.]+(?:, [\d.]+)*")


def _shares(output):
    line = next(m for m in SUMMARY_LINE.findall(output) if m.startswith("collaborative share"))
    return [float(x) for x in line.split(":")[1].split(",")]


def test_cnl_trainer_under_deepspeed_zero3_offload(tmp_path):
    """examples/hf_trainer.py --deepspeed on 2 ranks: CNLTrainer with Hugging Face's DeepSpeed integration
    (ZeRO-3, a sub-group size that splits the tiny Llama, the optimizer offloaded), the reference
    captured through the engine, the collaborative share summed over the ranks and logged. On CPU
    accelerate (1.16) reports one process under DeepSpeed and gives every rank all the data, so the
    losses and shares printed are those of the single-process run."""
    _deepspeed()
    pytest.importorskip("transformers")
    config = _ds_config(tmp_path / "ds.json", {"stage": 3, "sub_group_size": 20000,
                                                "stage3_param_persistence_threshold": 0,
                                                "offload_optimizer": {"device": "cpu"}})
    env = dict(DS_ACCELERATOR="cpu")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "examples" / "hf_trainer.py"), "--epochs", "2", "--deepspeed", str(config)]
    result = subprocess.run(command, env=dict(os.environ, **env, PYTHONPATH=os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")])), cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=TORCHRUN_TIMEOUT_S)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command[2:])} exited with {result.returncode}:\n{result.stderr[-4000:]}")
    shares = _shares(result.stdout)
    assert len(shares) == 4 and all(0 < s < 1 for s in shares)
    single = subprocess.run([sys.executable, str(REPO / "examples" / "hf_trainer.py"), "--epochs", "2"],
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])),
                            cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S)
    assert single.returncode == 0, single.stderr[-4000:]
    assert set(SUMMARY_LINE.findall(result.stdout)) == set(SUMMARY_LINE.findall(single.stdout))


# ---------------------------------------------------------------------------------------------- GPU variants

GPU_SCENARIOS = ["zero1", "zero2", "zero3", "zero2-offload", "zero3-offload", "zero2-bf16", "zero3-bf16"]


@pytest.fixture(scope="module")
def gpu_results(tmp_path_factory):
    _deepspeed()
    folder = tmp_path_factory.mktemp("deepspeed_gpu")
    # NCCL needs a GPU per rank: two ranks where there are two GPUs, else one (ZeRO then still steps
    # flat fp32 partitions, padded, in sub-groups under ZeRO-3)
    nproc = min(worker.WORLD_SIZE, torch.cuda.device_count())
    _torchrun([folder / "results.pt", folder / "checkpoints", *GPU_SCENARIOS], nproc,
              dict(DS_ACCELERATOR="cuda", CNL_TEST_DIST_BACKEND="nccl", CNL_TEST_BACKEND="auto"))
    return torch.load(folder / "results.pt", weights_only=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (DeepSpeed on CUDA, NCCL)")
@pytest.mark.parametrize("name", GPU_SCENARIOS)
def test_deepspeed_on_cuda_equals_the_single_process_run(gpu_results, single_process_results, name):
    """The CPU scenarios on CUDA: NCCL, the model on the GPU (offload: the optimizer's partitions on the
    host), bf16 on the GPU; the auto backend (Triton); checkpoint-resume exact."""
    zero, bf16, kind = worker.SCENARIOS[name]
    result = _result(gpu_results, name)
    _check(result, single_process_results[kind], bf16, gpu=True)
    for p, q in zip(result["resumed"]["params"], result["params"]):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- inject --deepspeed

def test_inject_deepspeed_equals_the_run_without_it(tmp_path):
    """``torchrun -m cnl_ext inject --deepspeed`` (ZeRO-2, the optimizer offloaded, 2 ranks, every rank every
    question) writes the numbers of the same command without DeepSpeed: losses, Learned, Forgot, shares."""
    _deepspeed()
    pytest.importorskip("transformers")
    import csv
    import json

    from cnl_ext.cli import main
    from cnl_ext.experiments import make_demo_questions, write_jsonl

    from ..experiments.test_experiments import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tiny_model(len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    write_jsonl(tmp_path / "questions.jsonl", make_demo_questions(20, seed=5))
    fast = ["--eval-batch-size", "8", "--threads", "1"]
    assert main(["infer-and-split", "--data", tmp_path / "questions.jsonl", "--model", tmp_path / "model",
                 "--out", tmp_path / "split", *fast]) == 0
    args = ["inject", "--mastered", tmp_path / "split" / "mastered.jsonl", "--injection",
            tmp_path / "split" / "injection.jsonl", "--model", tmp_path / "model", "--optimizers", "adamw", "sgd",
            "--methods", "ft", "cnl", "--epochs", "2", "--lr", "adamw=1e-3", "sgd=0.05", *fast, "--backend", "torch",
            # a fixed period: the adaptive one decides on loss differences, some within 1e-5 of its thresholds
            # here, where the two runs may round apart
            "--adaptive-reference", "off"]
    assert main([*args, "--no-checkpoints", "--out", tmp_path / "plain"]) == 0
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cnl_ext",
               *map(str, args), "--deepspeed", str(config), "--out", str(tmp_path / "ds")]
    result = subprocess.run(command, env=dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")])), cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=TORCHRUN_TIMEOUT_S)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command[2:])} exited with {result.returncode}:\n{result.stderr[-4000:]}")

    def rows(folder):
        with open(folder / "summary.csv") as f:
            return [{k: v for k, v in row.items() if k != "wall_s"} for row in csv.DictReader(f)]

    expected, got = rows(tmp_path / "plain"), rows(tmp_path / "ds")
    assert len(got) == len(expected) == 4 * 3
    for row, want in zip(got, expected):
        for key in want:
            if key in ("train_loss", "collaborative_share", "mastered_loss", "predicted_change") and want[key]:
                assert float(row[key]) == pytest.approx(float(want[key]), rel=1e-4), (key, row, want)
            else:
                assert row[key] == want[key], (key, row, want)
    assert all(row["collaborative_share"] and row["predicted_change"] for row in got
               if row["method"] == "cnl" and row["epoch"] != "0")


def test_inject_deepspeed_config_checks(tmp_path):
    """What inject fills into a DeepSpeed config, and what it refuses before any run."""
    import json

    from cnl_ext.experiments.deepspeed_runs import load_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 1}}))
    config = load_config(path, batch_size=3)
    assert config["train_micro_batch_size_per_gpu"] == 3 and config["gradient_accumulation_steps"] == 1
    assert config["gradient_clipping"] == 0.0 and config["zero_allow_untested_optimizer"] is True
    assert config["zero_force_ds_cpu_optimizer"] is False
    for bad, message in (({"zero_optimization": {"stage": 3}}, "stages 1 and 2"), ({}, "stages 1 and 2"),
                         ({"optimizer": {"type": "AdamW"}}, "remove the 'optimizer' section")):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            load_config(path, batch_size=1)


def test_inject_deepspeed_refuses_ewc_and_agem(tmp_path, capsys):
    """A-GEM's dot products and EWC's Fisher are not reduced across ZeRO partitions: refused before the model
    loads, with the methods named."""
    import json

    from cnl_ext.cli import main

    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    for name in ("mastered.jsonl", "injection.jsonl"):
        (tmp_path / name).write_text("")
    code = main(["inject", "--mastered", tmp_path / "mastered.jsonl", "--injection", tmp_path / "injection.jsonl",
                 "--methods", "ft", "ewc", "agem", "--deepspeed", config, "--out", tmp_path / "out"])
    assert code != 0
    err = capsys.readouterr().err
    assert "--deepspeed does not run --methods ewc agem" in err
    assert not (tmp_path / "out").exists()
