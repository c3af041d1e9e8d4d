"""``python -m cnl_ext inject --deepspeed CONFIG``: the injection runs stepped by a DeepSpeed engine.

Each run's CNL optimizer becomes DeepSpeed's client optimizer (ZeRO 1 or 2, with or without
``offload_optimizer``): ZeRO partitions its states over the ranks, the reference is captured through
the engine (:func:`cnl_ext.integrations.deepspeed.capture_reference`) and the statistics are summed
over the ranks. Every rank runs every question (the ranks' gradients are equal, so their mean is the
single-process gradient and the numbers are those of a run without DeepSpeed): what DeepSpeed brings
here is the memory, not a data-parallel speed-up. ZeRO-3 is refused (the runs of one command start
from the same weights, restored in place between runs, which ZeRO-3 partitions), and so is stage 0
(the shared training step calls ``loss.backward()``, which DeepSpeed takes only under ZeRO). Rank 0 writes the
results; launch with ``torchrun --nproc_per_node N -m cnl_ext inject ... --deepspeed CONFIG`` or the
``deepspeed`` launcher.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

__all__ = ["DeepSpeedTraining", "load_config", "is_secondary_rank"]


def is_secondary_rank() -> bool:
    """Whether this process is a launched rank other than 0 (it must not write the results)."""
    return int(os.environ.get("RANK", "0")) > 0


def load_config(path, *, batch_size: int) -> dict:
    """The DeepSpeed config at ``path`` with what the command decides filled in ("auto" or missing):
    the micro-batch (the training batch size, every rank the whole batch), no gradient accumulation,
    clipping off; a client optimizer allowed (offload included). bf16 "auto" is decided per model."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"--deepspeed {path}: {error}") from error
    if "optimizer" in config:
        raise ValueError(f"--deepspeed {path}: remove the 'optimizer' section (the CNL optimizer is DeepSpeed's "
                         "client optimizer)")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2):
        raise ValueError(f"--deepspeed {path}: inject supports ZeRO stages 1 and 2, got {stage!r} (the runs "
                         "restore the starting weights in place, which ZeRO-3 partitions; the training step's "
                         "loss.backward() needs ZeRO, which stage 0 is not)")
    for key, value in (("train_micro_batch_size_per_gpu", batch_size), ("gradient_accumulation_steps", 1)):
        if config.get(key, "auto") == "auto":
            config[key] = value
    if config.get("train_batch_size") == "auto":
        del config["train_batch_size"]
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = 0.0  # the protocol clips nothing (DeepSpeed's default clips at 1.0)
    config.setdefault("zero_allow_untested_optimizer", True)
    config.setdefault("zero_force_ds_cpu_optimizer", False)
    config.setdefault("steps_per_print", 10**12)
    return config


def _init_distributed():
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "RANK" not in os.environ:  # a plain `python -m cnl_ext`: one process
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed()


class _EngineSteps:
    """The optimizer API the injection runs use (``zero_grad``, ``step``, ``capture_reference``,
    ``cnl_stats``, ``track_stats``, ``param_groups``), stepped through the engine."""

    def __init__(self, engine):
        from ..integrations import deepspeed as cnl_deepspeed

        self.engine, self._integration = engine, cnl_deepspeed
        self.optimizer = cnl_deepspeed.attach(engine)

    @property
    def track_stats(self) -> bool:
        return self.optimizer.track_stats

    @property
    def param_groups(self) -> list:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass  # DeepSpeed clears the gradients after its step

    def step(self) -> None:
        self.engine.step()

    def capture_reference(self):
        return self._integration.capture_reference(self.engine)

    def clear_reference(self) -> None:
        self.optimizer.clear_reference()

    def cnl_stats(self):
        return self._integration.cnl_stats(self.engine)


class DeepSpeedTraining:
    """``wrap(model, optimizer) -> (model to train through, optimizer API, close)`` for
    :func:`cnl_ext.experiments.protocol.compare`'s ``wrap_training``."""

    def __init__(self, config_path, *, batch_size: int):
        self.config = load_config(config_path, batch_size=batch_size)

    def __call__(self, model, optimizer):
        import deepspeed
        import torch

        _init_distributed()
        config = json.loads(json.dumps(self.config))
        precision = config.setdefault("bf16", {})
        if precision.get("enabled", "auto") == "auto":  # bf16 as the model's dtype
            precision["enabled"] = next(model.parameters()).dtype == torch.bfloat16
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

        def close():
            engine.destroy()  # removes ZeRO's gradient hooks from the module's parameters

        return engine, _EngineSteps(engine), close
