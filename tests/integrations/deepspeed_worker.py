"""One rank of tests/integrations/test_deepspeed.py (started by torchrun, ``DS_ACCELERATOR=cpu``, gloo):
a CNL optimizer as DeepSpeed's client optimizer under every ZeRO stage, with a captured reference.

The single-process run the test compares with uses the same builders (:func:`make_model`,
:func:`make_data`, :func:`make_optimizer`, :func:`train_single`) on the whole batches.
Usage: ``deepspeed_worker.py OUT.pt CKPT_DIR SCENARIO...``; the results of every scenario go to OUT.pt
(a scenario that raised: its traceback).
"""
from __future__ import annotations

import copy
import os
import sys
import traceback

import torch

import cnl_ext

WORLD_SIZE = 2
STEPS = 4
MICRO = 4  # samples per rank and micro-batch
GAS = 2  # gradient accumulation steps

BACKEND = os.environ.get("CNL_TEST_BACKEND", "torch")  # the GPU variants run the auto backend (Triton)

# name -> (zero_optimization section, bf16, optimizer)
BASE = dict(stage3_param_persistence_threshold=0, reduce_bucket_size=64, allgather_bucket_size=64)
SCENARIOS = {
    "zero0": (dict(stage=0), False, "adamw"),
    "zero1": (dict(stage=1), False, "adamw"),
    "zero2": (dict(stage=2), False, "adamw"),
    "zero3": (dict(stage=3, sub_group_size=16, **BASE), False, "adamw"),
    "zero2-offload": (dict(stage=2, offload_optimizer=dict(device="cpu")), False, "adamw"),
    "zero3-offload": (dict(stage=3, sub_group_size=16, offload_optimizer=dict(device="cpu"), **BASE), False,
                      "adamw"),
    "zero2-sgd-sign2": (dict(stage=2), False, "sgd-sign2"),
    "zero1-adam-int8": (dict(stage=1), False, "adam-int8"),
    "zero3-bf16": (dict(stage=3, sub_group_size=16, **BASE), True, "adamw-bf16ref"),
    "zero2-bf16": (dict(stage=2), True, "adamw"),
}


def make_optimizer(kind, params):
    if kind.startswith("adamw"):
        ref = "bfloat16" if kind.endswith("bf16ref") else "float32"
        return cnl_ext.FusedCNLAdamW(params, lr=LR[kind], weight_decay=0.1, backend=BACKEND, reference_dtype=ref,
                                     track_stats=True)
    if kind == "adam-int8":
        return cnl_ext.FusedCNLAdam(params, lr=LR[kind], backend=BACKEND, reference_dtype="int8", track_stats=True)
    return cnl_ext.FusedCNLSGD(params, lr=LR[kind], momentum=0.9, backend=BACKEND, reference_dtype="sign2",
                               track_stats=True)


def make_model():
    torch.manual_seed(0)
    # 49 + 24 = 73 elements: partitions over 2 ranks cut through the parameters
    return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def make_data():
    """(mastered batches, training micro-batches), whole (both ranks' samples): rank r takes rows r::2."""
    generator = torch.Generator().manual_seed(1)
    mastered = [torch.randn(WORLD_SIZE * 3, 6, generator=generator) for _ in range(2)]
    inputs = [torch.randn(WORLD_SIZE * MICRO, 6, generator=generator) for _ in range(STEPS * GAS)]
    return mastered, inputs


def loss_fn(model, x):
    return (model(x) - 0.1).pow(2).mean()


def _stats_tuple(stats):
    return (stats.collaborative, stats.total, stats.sum_s_collaborative, stats.sum_s_conflicting)


def train_single(kind, steps=STEPS):
    """The reference run: one process, whole batches, the micro-batches of a step accumulated (mean)."""
    mastered, inputs = make_data()
    model = make_model()
    opt = make_optimizer(kind, list(model.parameters()))
    with opt.capture_reference() as ref:
        for x in mastered:
            ref.backward(loss_fn(model, x))
    history = []
    for step in range(steps):
        opt.zero_grad()
        for x in inputs[step * GAS:(step + 1) * GAS]:
            (loss_fn(model, x) / GAS).backward()
        opt.step()
        history.append(_stats_tuple(opt.cnl_stats()))
    return [p.detach().clone() for p in model.parameters()], history


# ---------------------------------------------------------------------------------------------- ranks

LR = {"adamw": 0.02, "adamw-bf16ref": 0.02, "adam-int8": 0.02, "sgd-sign2": 0.05}


def config(zero, bf16, kind):
    lr = LR[kind]  # a constant schedule: the capture must not step it (checked through its counter)
    cfg = {"scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": lr, "warmup_max_lr": lr,
                                                        "warmup_num_steps": 1}},
           "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS,
           "zero_optimization": copy.deepcopy(zero), "zero_allow_untested_optimizer": True,
           "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9, "gradient_clipping": 0.0, "wall_clock_breakdown": False}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def full_params(engine):
    """The model's parameters, whole, in float32 (gathered under ZeRO-3)."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return [p.detach().float().cpu().clone() for p in params]


def run_scenario(name, ckpt_dir):
    import deepspeed
    from cnl_ext.integrations import deepspeed as cnl_ds

    zero, bf16, kind = SCENARIOS[name]
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    mastered, inputs = make_data()

    def build():
        model = make_model()
        if bf16:
            model = model.to(torch.bfloat16)
        engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(kind, list(model.parameters())),
                                          config=config(zero, bf16, kind))
        return engine

    def part(x, engine):  # this rank's rows of a whole batch, on the engine's device
        return x[rank::world].to(engine.device, torch.bfloat16 if bf16 else torch.float32)

    def capture(engine):
        with cnl_ds.capture_reference(engine) as ref:
            for x in mastered:
                ref.backward(loss_fn(engine, part(x, engine)))

    def train(engine, first, last):
        history = []
        for step in range(first, last):
            for x in inputs[step * GAS:(step + 1) * GAS]:
                engine.backward(loss_fn(engine, part(x, engine)))
                engine.step()
            history.append(_stats_tuple(cnl_ds.cnl_stats(engine)))
        return history

    engine = build()
    iteration = engine.lr_scheduler.last_batch_iteration
    capture(engine)
    assert engine.lr_scheduler.last_batch_iteration == iteration, (engine.lr_scheduler.last_batch_iteration, iteration)
    assert engine.global_steps == 0 and engine.micro_steps == 0, (engine.global_steps, engine.micro_steps)
    history = train(engine, 0, STEPS)
    result = {"params": full_params(engine), "history": history, "global_steps": engine.global_steps,
              "calls_per_step": len(engine._cnl_deepspeed_tracker.calls),
              "reference_format": cnl_ds.cnl_optimizer(engine).reference_format}
    if name == "zero2":
        result["refusals"] = refusals(engine, part, mastered)
    if ckpt_dir is not None:
        # checkpoint-resume: 2 steps, save, a fresh engine loads it and takes the 2 others
        path = os.path.join(ckpt_dir, name)
        engine = build()
        capture(engine)
        first = train(engine, 0, STEPS // 2)
        engine.save_checkpoint(path, tag="half")
        engine = build()
        engine.load_checkpoint(path, tag="half")
        cnl_ds.attach(engine)
        second = train(engine, STEPS // 2, STEPS)
        result["resumed"] = {"params": full_params(engine), "history": first + second}
    return result


def refusals(engine, part, mastered):
    """A reference with inf elements is refused on every rank, the previous one kept, the engine's counters
    untouched; a capture in the middle of an accumulation window is refused before anything runs."""
    from cnl_ext.integrations import deepspeed as cnl_ds

    opt = cnl_ds.cnl_optimizer(engine)
    before = {p: t.clone() for p, t in opt._references.items()}
    steps, lr = (engine.global_steps, engine.micro_steps), engine.get_lr()
    out = {}
    try:
        with cnl_ds.capture_reference(engine) as ref:
            loss = loss_fn(engine, part(mastered[0], engine))
            ref.backward(loss * (float("inf") if torch.distributed.get_rank() == 1 else 1.0))
        out["inf"] = "not refused"
    except FloatingPointError:
        out["inf"] = "refused"
    out["kept"] = opt._references.keys() == before.keys() and all(torch.equal(opt._references[p], t)
                                                                   for p, t in before.items())
    out["counters"] = (engine.global_steps, engine.micro_steps) == steps and engine.get_lr() == lr
    import deepspeed

    model = make_model().to(torch.bfloat16)  # bf16 without ZeRO: DeepSpeed's BF16_Optimizer, refused
    bf16_engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer("adamw", list(model.parameters())),
                                           config=config(dict(stage=0), True, "adamw"))
    try:
        with cnl_ds.capture_reference(bf16_engine):
            pass
        out["bf16_stage0"] = "not refused"
    except RuntimeError as error:
        out["bf16_stage0"] = "refused" if "(bf16/fp16 without ZeRO)" in str(error) else str(error)
    engine.backward(loss_fn(engine, part(mastered[0], engine)))  # one micro-batch of GAS pending
    engine.step()
    try:
        with cnl_ds.capture_reference(engine) as ref:
            pass
        out["window"] = "not refused"
    except RuntimeError as error:
        out["window"] = "refused" if "accumulation window" in str(error) else str(error)
    return out


def main(out_path, ckpt_dir, names):
    import deepspeed

    # the GPU variants: DS_ACCELERATOR=cuda, NCCL (one rank per GPU)
    deepspeed.init_distributed(dist_backend=os.environ.get("CNL_TEST_DIST_BACKEND", "gloo"))
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rank = torch.distributed.get_rank()
    results = {}
    for name in names:
        try:
            results[name] = run_scenario(name, ckpt_dir)
        except Exception:  # noqa: BLE001 - reported by the test, with the other scenarios' results
            results[name] = traceback.format_exc()
            print(f"rank {rank} {name}:\n{results[name]}", file=sys.stderr, flush=True)
    if rank == 0:
        torch.save(results, out_path)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if sys.argv[2] != "-" else None, sys.argv[3:])
