"""What every CNL optimizer shares: the reference gradient, its capture, and the statistics.

The update math lives in :mod:`cnl_ext.functional`; the subclasses only gather tensors.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .. import functional
from .. import reference_format as rf

__all__ = ["CNLOptimizer", "CNLStats", "ParameterStats", "ReferenceCapture"]


@dataclass(frozen=True)
class ParameterStats:
    """CNL statistics of one parameter for one step (``s = r·u`` per element)."""

    index: int  # position in the optimizer's parameters, across param groups
    numel: int
    collaborative: int
    sum_s_collaborative: float
    sum_s_conflicting: float

    @property
    def collaborative_share(self) -> float:
        return self.collaborative / self.numel if self.numel else 1.0


@dataclass(frozen=True)
class CNLStats:
    """CNL statistics of the last ``step()``, over every parameter that had a reference."""

    collaborative: int
    total: int
    sum_s_collaborative: float
    sum_s_conflicting: float
    per_parameter: list = field(default_factory=list)

    @property
    def conflicting(self) -> int:
        return self.total - self.collaborative

    @property
    def collaborative_share(self) -> float:
        return self.collaborative / self.total if self.total else 1.0


class ReferenceCapture:
    """Handed out by :meth:`CNLOptimizer.capture_reference`; counts the ``backward`` calls."""

    def __init__(self):
        self.calls = 0

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """``loss.backward(**kwargs)``, accumulating into the reference; the mean is over calls."""
        loss.backward(**kwargs)
        self.calls += 1


class CNLOptimizer(torch.optim.Optimizer):
    """Base class: a ``torch.optim.Optimizer`` that masks its update against a reference gradient.

    Subclasses implement ``step`` with :mod:`cnl_ext.functional`, passing :meth:`_references_for`
    and :meth:`_new_stats` / :meth:`_record_stats`.
    """

    def __init__(self, params, defaults, *, backend: str, reference_dtype, track_stats: bool):
        if backend not in functional.BACKENDS:
            raise ValueError(f"backend must be one of {functional.BACKENDS}, got {backend!r}")
        self.reference_format = rf.canonical_format(reference_dtype)
        super().__init__(params, defaults)
        self.backend = backend
        self.track_stats = bool(track_stats)
        self._references: dict = {}  # parameter -> stored reference (format: self.reference_format)
        self._last_stats = None  # per group: ([(index, numel) or None per param], float64 [n, 3] device tensor)
        name = type(self).__name__
        for i, p in enumerate(self._parameters()):
            if p.is_complex():
                raise ValueError(f"{name} does not support complex parameters (parameter {i})")
            if p.dtype not in functional.SUPPORTED_PARAM_DTYPES:
                raise TypeError(f"{name} supports float32, bfloat16 and float16 parameters; parameter {i} is {p.dtype}")

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_references", {})
        self.__dict__.setdefault("_last_stats", None)

    # ------------------------------------------------------------------ parameters and state

    def _parameters(self):
        """All parameters, in order across param groups (the order ``set_reference`` uses)."""
        return [p for group in self.param_groups for p in group["params"]]

    def _gradients(self):
        """(group, params with a gradient, their gradients) per group; checked before any write."""
        gathered = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            functional.check_gradients(params, grads, type(self).__name__)
            gathered.append((group, params, grads))
        return gathered

    def load_state_dict(self, state_dict):
        # torch casts every floating state to the parameter's dtype on load; the CNL optimizers keep
        # their states in float32 whatever the parameter dtype (taken from the saved tensors, so a
        # float32 state of a bf16 parameter survives exactly), and the step count on the host
        # (on the device with capturable=True).
        param_of_id = {
            saved_id: (p, group.get("capturable", False))
            for saved_group, group in zip(state_dict["param_groups"], self.param_groups)
            for saved_id, p in zip(saved_group["params"], group["params"])
        }
        super().load_state_dict(state_dict)
        for saved_id, saved_state in state_dict["state"].items():
            if saved_id not in param_of_id:
                continue
            p, capturable = param_of_id[saved_id]
            for key, value in saved_state.items():
                if not isinstance(value, torch.Tensor):
                    continue
                if key == "step":
                    self.state[p][key] = value.detach().to(p.device if capturable else "cpu", torch.float32, copy=True)
                elif value.is_floating_point():
                    self.state[p][key] = value.detach().to(p.device, torch.float32, copy=True)

    # ------------------------------------------------------------------ the reference

    @property
    def has_reference(self) -> bool:
        return bool(self._references)

    def clear_reference(self) -> None:
        """Forget the reference: ``step`` is the plain optimizer again."""
        self._references = {}

    def _references_for(self, params):
        """Stored references aligned with ``params`` (``None`` where a parameter has none)."""
        if not self._references:
            return None
        return [self._references.get(p) for p in params]

    def set_reference(self, tensors) -> None:
        """Set the reference gradient from tensors given by the user (copied, never written).

        ``tensors``: a sequence in the order of the optimizer's parameters across param groups
        (``None`` entries leave a parameter unmasked), or a mapping from parameter to tensor.
        Everything is checked before anything is written.
        """
        params = self._parameters()
        if isinstance(tensors, Mapping):
            held = {id(p) for p in params}
            pairs = []
            for p, t in tensors.items():
                if not isinstance(p, torch.Tensor) or id(p) not in held:
                    raise ValueError("set_reference got a tensor for a parameter this optimizer does not hold")
                pairs.append((params.index(p), p, t))
        else:
            tensors = list(tensors)
            if len(tensors) != len(params):
                raise ValueError(
                    f"set_reference expects {len(params)} tensors (one per parameter, in param-group order), "
                    f"got {len(tensors)}"
                )
            pairs = [(i, p, t) for i, (p, t) in enumerate(zip(params, tensors)) if t is not None]
        for i, p, t in pairs:
            self._check_reference(i, p, t)
        self._references = {p: rf.encode(t.detach(), self.reference_format) for _, p, t in pairs}

    def _check_reference(self, i, p, t):
        where = f"set_reference: reference {i}"
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where} is a {type(t).__name__}, not a tensor")
        if t.layout != torch.strided:
            raise ValueError(f"{where} is sparse ({t.layout}); pass a dense tensor")
        if t.is_complex() or not t.is_floating_point():
            raise TypeError(f"{where} has dtype {t.dtype}; a real floating-point tensor is needed")
        if t.shape != p.shape:
            raise ValueError(f"{where} has shape {tuple(t.shape)}, but its parameter has shape {tuple(p.shape)}")
        if t.device != p.device:
            raise ValueError(f"{where} is on {t.device}, but its parameter is on {p.device}")

    @contextlib.contextmanager
    def capture_reference(self):
        """Capture the mean mastered-set gradient as the reference.

        Inside the block, call ``ref.backward(loss)`` once per mastered batch: autograd accumulates
        straight into buffers that become the reference (for float32 parameters with a float32
        reference, the buffer *is* the reference: no copy). On exit the sum is divided by the
        number of calls, stored in ``reference_dtype`` and every ``.grad`` is back as it was.
        Do not call ``zero_grad`` inside the block. If the block raises, the previous reference
        is kept and the gradients are restored.
        """
        params = [p for p in self._parameters() if p.requires_grad]
        saved_grads = [p.grad for p in params]
        capture = ReferenceCapture()
        try:
            for p in params:
                p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
            yield capture
            if capture.calls == 0:
                raise RuntimeError("capture_reference() ended without any ref.backward(loss) call")
            references = {}
            for p in params:
                accumulated = p.grad
                if accumulated is None:  # e.g. set to None by zero_grad inside the block
                    raise RuntimeError("a gradient was cleared inside capture_reference(); do not call zero_grad there")
                accumulated.div_(capture.calls)
                keep_as_is = self.reference_format == "float32" and accumulated.dtype == torch.float32
                references[p] = accumulated if keep_as_is else rf.encode(accumulated, self.reference_format)
            self._references = references
        finally:
            for p, g in zip(params, saved_grads):
                p.grad = g

    # ------------------------------------------------------------------ statistics

    def _new_stats(self, params):
        """A zeroed float64 ``[len(params), 3]`` buffer when statistics are tracked, else None."""
        if not (self.track_stats and self._references and params):
            return None
        return torch.zeros(len(params), 3, dtype=torch.float64, device=params[0].device)

    def _record_stats(self, per_group):
        """Keep this step's device buffers; reading them (a host sync) waits for cnl_stats()."""
        if not self.track_stats:
            return
        index = {id(p): i for i, p in enumerate(self._parameters())}
        self._last_stats = [
            ([(index[id(p)], p.numel()) if p in self._references else None for p in params], stats)
            for params, stats in per_group if stats is not None
        ]

    def cnl_stats(self):
        """:class:`CNLStats` of the last step (needs ``track_stats=True`` and a reference), else None."""
        if not self._last_stats:
            return None
        per_parameter = []
        for rows, stats in self._last_stats:
            for row, (count, s_collab, s_conflict) in zip(rows, stats.tolist()):
                if row is not None:  # parameters without a reference are not counted
                    per_parameter.append(ParameterStats(row[0], row[1], int(count), s_collab, s_conflict))
        return CNLStats(
            collaborative=sum(s.collaborative for s in per_parameter),
            total=sum(s.numel for s in per_parameter),
            sum_s_collaborative=sum(s.sum_s_collaborative for s in per_parameter),
            sum_s_conflicting=sum(s.sum_s_conflicting for s in per_parameter),
            per_parameter=per_parameter,
        )
