"""DeepSpeed: a CNL optimizer as DeepSpeed's client optimizer, under ZeRO 0-3 and ZeRO-Offload.

Pass ``FusedCNLAdamW`` (or ``FusedCNLAdam``, ``FusedCNLSGD``) to ``deepspeed.initialize(optimizer=...)``
with ``"zero_allow_untested_optimizer": true`` (and ``"zero_force_ds_cpu_optimizer": false`` with
``offload_optimizer``). Under ZeRO 1-3 its ``step()`` sees one flat fp32 partition per rank (per
``sub_group_size`` sub-group under ZeRO-3) whose boundaries cut through parameters; CNL is elementwise,
so it applies to any partition as long as the reference is partitioned the same way, and this module
makes it so: the reference of each rank is the reduced fp32 gradient of exactly the partition its
optimizer steps::

    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=FusedCNLAdamW(model.parameters()), config=cfg)
    with capture_reference(engine) as ref:       # DeepSpeed accumulates, reduces and partitions
        for batch in mastered_batches:
            ref.backward(loss_fn(engine, batch))    # engine.backward, the mean over calls
    ...                                          # train as usual: engine.backward(loss); engine.step()
    stats = cnl_stats(engine)                    # summed over ranks (a collective)

How the capture works: the user's ``ref.backward`` calls run ``engine.backward`` with DeepSpeed's
unmanaged gradient accumulation (backward accumulates, the step is the boundary), then one
``engine.step()`` runs in which the client optimizer's ``step`` records the gradients DeepSpeed hands
it (reduced over the data-parallel ranks, partitioned, unscaled; clipping off) instead of updating.
The engine's step counters, LR scheduler and loss scaler are put back as they were, and the gradients
are cleared by DeepSpeed itself. Nothing is stored unless every rank's reference is finite.

Checkpoints: ``capture_reference`` sets the optimizer's ``save_reference``, so ``engine.save_checkpoint``
keeps each rank's reference partition with its optimizer states and ``engine.load_checkpoint`` restores
it (rigid ZeRO checkpoints, DeepSpeed's default; the same world size and ZeRO configuration).

Supported: ZeRO 1-3 (fp32 or bf16, with or without offload) and stage 0 in fp32; refused: bf16/fp16
without ZeRO (DeepSpeed's BF16/FP16 optimizers). Needs DeepSpeed 0.19.4+ (tested: 0.19.8).
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist

from ..optim import CNLOptimizer, CNLStats
from ..optim._reference_store import ReferenceCapture

__all__ = ["capture_reference", "cnl_optimizer", "cnl_stats", "attach"]

_TRACKER = "_cnl_deepspeed_tracker"


def cnl_optimizer(engine) -> CNLOptimizer:
    """The CNL optimizer under the engine's optimizer wrappers (ZeRO, BF16_Optimizer, ...)."""
    seen, optimizer = set(), engine.optimizer
    while not isinstance(optimizer, CNLOptimizer):
        if optimizer is None or id(optimizer) in seen or not hasattr(optimizer, "optimizer"):
            raise RuntimeError(f"cnl_ext.integrations.deepspeed: the engine's optimizer is a "
                               f"{type(engine.optimizer).__name__} with no CNL optimizer inside; pass FusedCNLAdamW "
                               "(or another CNL optimizer) as deepspeed.initialize(optimizer=...)")
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


class _Tracker:
    """Per engine: the statistics buffers of every client ``step()`` call of the last engine step
    (ZeRO steps each param group, and under ZeRO-3 each sub-group, with its own call)."""

    def __init__(self, engine, optimizer):
        self.optimizer = optimizer
        self.calls = []  # StatsTracker.last of each call of the last engine step
        self.new_step = True
        wrapper = engine.optimizer
        if wrapper is not optimizer:  # an engine step starts with the wrapper's step
            wrapper_step = wrapper.step

            @functools.wraps(wrapper_step)
            def step(*args, **kwargs):
                self.new_step = True
                return wrapper_step(*args, **kwargs)

            wrapper.step = step
        client_step = optimizer.step

        @functools.wraps(client_step)
        def tracked_step(*args, **kwargs):
            if self.new_step or wrapper is optimizer:
                self.calls, self.new_step = [], False
            result = client_step(*args, **kwargs)
            if optimizer._stats.last:
                self.calls.append(optimizer._stats.last)
            return result

        optimizer.step = tracked_step


def attach(engine) -> CNLOptimizer:
    """Prepare ``engine`` for :func:`cnl_stats` (idempotent; :func:`capture_reference` calls it).
    Returns the CNL optimizer."""
    optimizer = cnl_optimizer(engine)
    if getattr(engine, _TRACKER, None) is None:
        setattr(engine, _TRACKER, _Tracker(engine, optimizer))
    return optimizer


def _partitioned(engine, optimizer) -> bool:
    """Whether the CNL optimizer steps partitions (ZeRO, BF16_Optimizer) rather than the module's parameters."""
    module_params = {id(p) for p in engine.module.parameters()}
    saved = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3: groups empty outside step
    params = list(saved) if saved is not None else optimizer._parameters()
    return not any(id(p) in module_params for p in params)


def _dp_group(engine):
    return getattr(engine.optimizer, "dp_process_group", None) or getattr(engine, "data_parallel_group", None)


def _model_numel(engine) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters() if p.requires_grad)


def cnl_stats(engine):
    """:class:`cnl_ext.CNLStats` of the last engine step over the whole model (``per_parameter`` empty:
    the optimizer steps flat partitions), or None without statistics. Under ZeRO the counts and sums
    are summed over the data-parallel ranks, the alignment padding of the partitions left out: a
    collective, every rank must call it. Needs ``track_stats=True`` and :func:`attach` (or
    :func:`capture_reference`) before the step."""
    tracker = getattr(engine, _TRACKER, None)
    if tracker is None:
        raise RuntimeError("cnl_stats(engine) needs attach(engine) (or capture_reference(engine)) before the steps")
    totals = torch.zeros(4, dtype=torch.float64)  # collaborative, total, sum s collaborative, sum s conflicting
    found = False
    for last in tracker.calls:
        for rows, stats in last:
            for row, (count, s_collab, s_conflict) in zip(rows, stats.tolist()):
                if row is not None:
                    found = True
                    totals += torch.tensor([count, row[1], s_collab, s_conflict], dtype=torch.float64)
    partitioned = _partitioned(engine, tracker.optimizer)
    if partitioned and dist.is_initialized():
        flag = torch.tensor([float(found)], dtype=torch.float64)
        both = torch.cat([totals, flag]).to(_comm_device(engine))
        dist.all_reduce(both, group=_dp_group(engine))
        totals, found = both[:4].cpu(), both[4].item() > 0
    if not found:
        return None
    collaborative, total, s_collab, s_conflict = totals.tolist()
    if partitioned:
        # padding elements (0 parameter, 0 gradient, 0 reference) are always collaborative
        padding = int(round(total)) - _model_numel(engine)
        if padding < 0:
            raise RuntimeError("cnl_stats: the optimizer's partitions hold fewer elements than the model's "
                               "trainable parameters (a reference for only part of them?)")
        collaborative, total = collaborative - padding, total - padding
    return CNLStats(collaborative=int(round(collaborative)), total=int(round(total)),
                    sum_s_collaborative=s_collab, sum_s_conflicting=s_conflict, per_parameter=[])


def _comm_device(engine):
    return torch.device(engine.device) if dist.get_backend(_dp_group(engine)) != "gloo" else torch.device("cpu")


_ENGINE_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps", "_step_applied",
                    "_global_grad_norm", "_unmanaged_backward_count", "_is_gradient_accumulation_boundary")


class _EngineState:
    """What one ``engine.step()`` changes besides the parameters, saved to be put back."""

    def __init__(self, engine, optimizer):
        self.engine, self.optimizer = engine, optimizer
        self.counters = {k: getattr(engine, k) for k in _ENGINE_COUNTERS if hasattr(engine, k)}
        self.managed = engine._config.managed_gradient_accumulation
        self.scalers = [(o, dict(vars(o.loss_scaler))) for o in _wrappers(engine)
                        if getattr(o, "loss_scaler", None) is not None and hasattr(o.loss_scaler, "__dict__")]
        self.wrapper_state = [(o, {k: getattr(o, k) for k in ("overflow", "_global_grad_norm") if hasattr(o, k)})
                              for o in _wrappers(engine)]
        self.clip = [(o, o.clip_grad) for o in _wrappers(engine) if hasattr(o, "clip_grad")]
        self.step_attr = optimizer.__dict__.get("step")
        tracker = getattr(engine, _TRACKER, None)
        self.tracker = (tracker, tracker.calls, tracker.new_step) if tracker is not None else None

    def unmanaged(self):
        """Backward accumulates, ``engine.step()`` is the boundary; no clipping, no LR scheduler step."""
        engine = self.engine
        engine._config.managed_gradient_accumulation = False
        engine._is_gradient_accumulation_boundary = None
        engine._unmanaged_backward_count = 0
        engine.gradient_clipping = lambda: 0.0
        for o, _ in self.clip:
            o.clip_grad = 0.0
        if engine.lr_scheduler is not None:
            engine.lr_scheduler.step = lambda *args, **kwargs: None

    def restore(self):
        engine = self.engine
        engine._config.managed_gradient_accumulation = self.managed
        for k, v in self.counters.items():
            setattr(engine, k, v)
        engine.__dict__.pop("gradient_clipping", None)
        if engine.lr_scheduler is not None:
            engine.lr_scheduler.__dict__.pop("step", None)
        for o, clip in self.clip:
            o.clip_grad = clip
        for o, saved in self.scalers:
            vars(o.loss_scaler).clear()
            vars(o.loss_scaler).update(saved)
        for o, saved in self.wrapper_state:
            for k, v in saved.items():
                setattr(o, k, v)
        if self.step_attr is None:
            self.optimizer.__dict__.pop("step", None)
        else:
            self.optimizer.step = self.step_attr
        if self.tracker is not None:
            tracker, tracker.calls, tracker.new_step = self.tracker


def _wrappers(engine):
    """The engine's optimizer and the wrappers inside it, down to (not including) the CNL optimizer."""
    found, optimizer = [], engine.optimizer
    while optimizer is not None and not isinstance(optimizer, CNLOptimizer) and optimizer not in found:
        found.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None)
    return found


@contextlib.contextmanager
def capture_reference(engine):
    """Capture the mean mastered-set gradient as the reference of ``engine``'s CNL optimizer.

    Inside the block call ``ref.backward(loss, weight=1.0)`` once per mastered batch (the loss of
    ``engine(batch)``, this rank's part of the batch, like a training micro-batch); it runs
    ``engine.backward(weight·loss)`` without the gradient-accumulation scaling. On exit DeepSpeed
    reduces and partitions the accumulated gradients as for an optimizer step, each rank keeps the
    part its optimizer steps, divided by the sum of the weights (the mean over calls by default), in
    the optimizer's ``reference_dtype``. Every rank must run the block (collectives). Call it between
    optimizer steps (no training gradients pending). If the block raises or the reference has
    inf/NaN elements on any rank, the previous reference is kept (the gradients are cleared anyway).
    """
    if not hasattr(engine._config, "managed_gradient_accumulation"):
        import deepspeed

        raise RuntimeError(f"capture_reference(engine) needs DeepSpeed 0.19.4 or later (its unmanaged gradient "
                           f"accumulation); this is {deepspeed.__version__}")
    optimizer = attach(engine)
    wrapper = type(engine.optimizer).__name__
    if wrapper in ("BF16_Optimizer", "FP16_Optimizer", "FP16_UnfusedOptimizer"):
        # these accumulate their fp32 gradients in each backward, before the step's all-reduce: a
        # reference captured with unmanaged accumulation would be this rank's own, not the reduced one
        raise RuntimeError(f"capture_reference(engine) does not support DeepSpeed's {wrapper} (bf16/fp16 without "
                           "ZeRO); use ZeRO stage 1-3 (\"zero_optimization\": {\"stage\": 1}) or fp32 with stage 0")
    if engine.micro_steps % engine.gradient_accumulation_steps() != 0:
        raise RuntimeError(f"capture_reference(engine) in the middle of a gradient-accumulation window (micro step "
                           f"{engine.micro_steps}, {engine.gradient_accumulation_steps()} per optimizer step): the "
                           "pending training gradients would mix into the reference; capture between optimizer steps")
    state = _EngineState(engine, optimizer)
    recorded = {}

    def record_step(closure=None):  # stands in for optimizer.step during the capture's engine step
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    recorded[p] = p.grad.detach().to(torch.float32, copy=True)

    capture = ReferenceCapture()
    capture.backward = functools.partial(_backward, engine, capture)
    state.unmanaged()
    try:
        try:
            yield capture
            if capture.calls == 0:
                raise RuntimeError("capture_reference(engine) ended without any ref.backward(loss) call")
        finally:
            # DeepSpeed reduces, partitions and then clears what the block accumulated, also when it raised
            if capture.calls:
                optimizer.step = record_step
                engine.step()
        overflow = bool(getattr(engine.optimizer, "overflow", False))
        references = {p: g.div_(capture.total_weight) for p, g in recorded.items()}
        bad = torch.tensor([float(overflow or not references
                                  or not all(bool(torch.isfinite(g).all()) for g in references.values()))])
        if dist.is_initialized():
            bad = bad.to(_comm_device(engine))
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() != 0:
            raise FloatingPointError("capture_reference(engine): the reference gradient has inf or NaN elements "
                                     "(or DeepSpeed skipped the step) on some rank; the previous reference is kept")
        store = optimizer._reference
        store.load({p: store._encode(p, g) for p, g in references.items()})
        optimizer.save_reference = True
    finally:
        state.restore()


def _backward(engine, capture, loss, *, weight: float = 1.0):
    if not weight > 0:
        raise ValueError(f"ref.backward: weight must be positive, got {weight}")
    engine.backward(loss * weight if weight != 1.0 else loss, scale_wrt_gas=False)
    capture.calls += 1
    capture.total_weight += weight
