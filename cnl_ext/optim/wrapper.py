"""CNL for any optimizer (the paper's general form, appendix G.4): ``CNL(torch.optim.RMSprop(...))``.

The wrapped optimizer steps as usual; its change ``Δ = θ_after − θ_before`` is then kept only where
it is collaborative with the reference (``u = −Δ/lr``, kept where ``sign(r)·sign(u) ≥ 0``), and
the other elements go back to ``θ_before``. The wrapped optimizer's state (moments, accumulators)
is updated for every element, unmasked, as in the authors' semantics for the moments.
"""
from __future__ import annotations

import torch

from .. import functional
from .. import reference_format as rf
from ..ops.chunking import compute_dtype
from ._base import REFERENCE_KEY, CNLOptimizer, local_tensor

__all__ = ["CNL", "cnl_masked_delta"]


@torch.no_grad()
def cnl_masked_delta(param, before, reference, *, reference_format: str, inv_lr: float):
    """One tensor's write-back after any optimizer's step, in place; the definition (every kernel equals
    it bit for bit).

    ``param`` holds θ_after, ``before`` θ_before. In the compute dtype (float32; float64 for float64
    parameters)::

        −Δ = θ_before − θ_after          (exact: its sign is the sign of u = −Δ/lr)
        θ ← θ_before where sign(r)·sign(−Δ) < 0 (conflicting), else θ_after

    Returns the statistics, float64 ``[3]``: (collaborative count, Σ s collaborative, Σ s conflicting)
    with ``s = r·(−Δ)`` summed and then times ``inv_lr`` (``1/lr``, 0 at lr = 0), i.e. ``s = r·u``.
    """
    dtype = compute_dtype(param.dtype)
    after, restored = param.to(dtype), before.to(dtype)
    minus_delta = restored - after
    stats = rf.apply_mask(param, restored, after, minus_delta, reference, reference_format)
    stats[1:] *= inv_lr  # Σ r·(−Δ) → Σ r·u
    return stats


def _inverse_lr(group) -> float:
    """``1/lr`` for the statistics ``s = r·u``, ``u = −Δ/lr`` (0 at lr 0, where Δ is 0 too)."""
    lr = float(group["lr"])
    return 1.0 / lr if lr > 0 else 0.0


class CNL(CNLOptimizer):
    """Wrap any ``torch.optim.Optimizer`` so that its update is masked against the reference.

    ``CNL(optimizer)`` has the reference API of the fused optimizers (``capture_reference``,
    ``set_reference``, ``clear_reference``, ``cnl_stats``) and shares ``param_groups`` and ``state``
    with ``optimizer``, so LR schedulers, ``GradScaler`` and checkpoints see one optimizer;
    ``state_dict()`` is the wrapped optimizer's (plus the reference when ``save_reference``).

    Cost: before each step, a copy of the parameters that have a reference, into buffers kept
    between steps (memory: one copy of those parameters; a fresh copy each step would fault its
    pages in again on a CPU); after it, one fused pass (:func:`cnl_ext.functional.cnl_masked_delta`)
    that reads θ_after, θ_before and the reference and writes θ.

    Arguments: ``backend`` (``"auto" | "torch" | "triton" | "native"``), ``reference_dtype``
    (``"float32" | "bfloat16" | "int8" | "sign2"``), ``track_stats`` (statistics with
    ``u = −Δ/lr``; needs an ``lr`` in every param group) and ``save_reference``.
    """

    # GradScaler unscales the gradients itself and skips inf steps for the wrapped optimizer.
    _step_supports_amp_scaling = False

    def __init__(self, optimizer, *, backend="auto", reference_dtype="float32", track_stats=False,
                 save_reference=False):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"CNL wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, CNLOptimizer):
            raise TypeError(f"{type(optimizer).__name__} already masks its update with CNL; wrap a plain optimizer")
        if track_stats and any("lr" not in group for group in optimizer.param_groups):
            raise ValueError("CNL(track_stats=True) needs an 'lr' in every param group (u = −Δ/lr)")
        self.optimizer = optimizer
        super().__init__(optimizer.param_groups, optimizer.defaults, backend=backend,
                         reference_dtype=reference_dtype, track_stats=track_stats)
        self._share_inner_state()
        self.save_reference = bool(save_reference)
        self._befores = {}  # parameter -> its θ_before buffer (see _copy_before_step)

    def _share_inner_state(self):
        # Optimizer.__init__ gave this object its own list around the inner group dicts, and an
        # empty state; both must be the inner optimizer's own objects.
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state

    def __repr__(self):
        return f"CNL({self.optimizer!r})"

    def add_param_group(self, param_group):
        if self.param_groups is self.optimizer.param_groups:  # after __init__: groups go to the inner optimizer
            self.optimizer.add_param_group(param_group)
        else:  # inside Optimizer.__init__, which registers the inner optimizer's groups here
            super().add_param_group(param_group)

    def state_dict(self, *, include_reference: bool | None = None):
        return self._add_reference(self.optimizer.state_dict(), include_reference)

    def load_state_dict(self, state_dict):
        references = self._parse_reference(state_dict)  # checked before the inner optimizer loads
        self.optimizer.load_state_dict(state_dict)
        self._share_inner_state()  # torch's load_state_dict replaces both objects
        if references is not None:
            self._reference.load(references)

    def _copy_before_step(self, params):
        """θ_before of ``params``: their local data copied into contiguous buffers kept between steps."""
        befores = self.__dict__.setdefault("_befores", {})  # also after unpickling an older CNL
        datas = [local_tensor(p) for p in params]
        for p, data in zip(params, datas):
            before = befores.get(p)
            if before is None or (before.shape, before.dtype, before.device) != (data.shape, data.dtype, data.device):
                befores[p] = torch.empty_like(data, memory_format=torch.contiguous_format)
        copies = [befores[p] for p in params]
        torch._foreach_copy_(copies, datas)
        return copies

    @torch.no_grad()
    def step(self, closure=None):
        masked = []  # (group, params with a reference, copies of their local data before the step)
        if self._reference:  # the write-back's backends, resolved once, before any write
            backends = functional.resolve_each(self.backend, "masked_delta_", list(self._references))
            for group in self.param_groups:
                params = [p for p in group["params"] if p in self._reference]
                if params:
                    masked.append((group, params, self._copy_before_step(params)))
        loss = self.optimizer.step(closure)
        per_group = []
        try:
            for group, params, befores in masked:
                stats = self._stats.new_buffer(params, True)
                functional.cnl_masked_delta(
                    [local_tensor(p) for p in params], befores, self._references_for(params), stats,
                    reference_format=self.reference_format,
                    inv_lr=_inverse_lr(group) if stats is not None else 1.0, backend=backends)
                per_group.append((params, stats))
        except BaseException:
            # no parameter keeps an unmasked update: all go back to before the step (the wrapped
            # optimizer's own state has moved; it is outside the write-back)
            for _, params, befores in masked:
                for p, before in zip(params, befores):
                    local_tensor(p).copy_(before)
            raise
        self._stats.record(per_group, self._parameters(), self._reference)
        return loss
