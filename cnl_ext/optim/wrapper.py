"""CNL for any optimizer (the paper's general form, appendix G.4): ``CNL(torch.optim.RMSprop(...))``.

The wrapped optimizer steps as usual; its change ``Δ = θ_after − θ_before`` is then kept only where
it is collaborative with the reference (``u = −Δ/lr``, kept where ``sign(r)·sign(u) ≥ 0``), and
the other elements go back to ``θ_before``. The wrapped optimizer's state (moments, accumulators)
is updated for every element, unmasked, as in the authors' semantics for the moments.
"""
from __future__ import annotations

import torch

from .. import functional
from ._base import REFERENCE_KEY, CNLOptimizer, local_tensor

__all__ = ["CNL", "masked_delta_"]

# backend name -> module implementing masked_delta_ (the "cuda" extension has none)
_MASKED_DELTA_MODULES = {"torch": "masked_delta_reference", "triton": "triton_masked_delta"}


def _masked_delta_module(backend: str, device: torch.device):
    if backend == "auto":  # the core's choice for this device (Triton on CUDA, else PyTorch)
        chosen = functional.resolve_backend("auto", device)
        backend = "triton" if chosen.__name__ == "cnl_ext.ops.triton_step" else "torch"
    if backend == "triton":
        from ..ops import triton_masked_delta as module
    else:
        from ..ops import masked_delta_reference as module
    return module


def masked_delta_(params, befores, references, stats=None, *, reference_format: str = "float32",
                  inv_lr: float = 1.0, backend: str = "auto") -> None:
    """Functional form of the write-back: where ``params − befores`` conflicts with the reference,
    put ``befores`` back into ``params`` (in place). See :mod:`cnl_ext.ops.masked_delta_reference`."""
    if backend not in _MASKED_DELTA_MODULES and backend != "auto":
        raise ValueError(f"CNL's write-back runs with backend 'auto', 'triton' or 'torch', got {backend!r}")
    for i, (p, before) in enumerate(zip(params, befores)):
        if not (p.is_contiguous() and before.is_contiguous()):
            raise ValueError(f"CNL: parameter {i} (shape {tuple(p.shape)}) is not contiguous; the write-back needs "
                             "contiguous parameters")
    for key, idx in functional._buckets(params, references, lambda i: None):
        bucket_stats = None if stats is None else torch.zeros(len(idx), 3, dtype=torch.float64, device=key.device)
        _masked_delta_module(backend, key.device).masked_delta_(
            functional._take(params, idx), functional._take(befores, idx), functional._take(references, idx),
            bucket_stats, reference_format=reference_format, inv_lr=inv_lr)
        if stats is not None:
            stats.index_add_(0, torch.tensor(idx, device=stats.device), bucket_stats.to(stats.device))


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

    Cost: before each step, a copy of the parameters that have a reference; after it, one fused
    pass (Triton on CUDA) that reads θ_after, θ_before and the reference and writes θ.

    Arguments: ``backend`` (``"auto" | "triton" | "torch"``), ``reference_dtype``
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
        if backend not in _MASKED_DELTA_MODULES and backend != "auto":
            raise ValueError(f"CNL supports backend 'auto', 'triton' or 'torch', got {backend!r}")
        if track_stats and any("lr" not in group for group in optimizer.param_groups):
            raise ValueError("CNL(track_stats=True) needs an 'lr' in every param group (u = −Δ/lr)")
        self.optimizer = optimizer
        super().__init__(optimizer.param_groups, optimizer.defaults, backend=backend,
                         reference_dtype=reference_dtype, track_stats=track_stats)
        self._share_inner_state()
        self.save_reference = bool(save_reference)

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
        self.optimizer.load_state_dict(state_dict)
        self._share_inner_state()  # torch's load_state_dict replaces both objects
        self._load_reference(state_dict.get(REFERENCE_KEY))

    @torch.no_grad()
    def step(self, closure=None):
        masked = []  # (group, params with a reference, copies of their local data before the step)
        if self._references:
            for group in self.param_groups:
                params = [p for p in group["params"] if p in self._references]
                if params:
                    befores = [local_tensor(p).clone(memory_format=torch.contiguous_format) for p in params]
                    masked.append((group, params, befores))
        loss = self.optimizer.step(closure)
        per_group = []
        for group, params, befores in masked:
            stats = self._new_stats(params)
            masked_delta_([local_tensor(p) for p in params], befores, self._references_for(params), stats,
                          reference_format=self.reference_format,
                          inv_lr=_inverse_lr(group) if stats is not None else 1.0, backend=self.backend)
            per_group.append((params, stats))
        self._record_stats(per_group)
        return loss
