"""What every CNL optimizer shares: the step's outline, the reference API, statistics, checkpoints.

The update math lives in :mod:`cnl_ext.functional`; the reference in :class:`ReferenceStore`, the
statistics in :class:`StatsTracker`; the subclasses only gather tensors.

Distributed training: with DDP the parameters are plain tensors and nothing changes. With FSDP2
(``fully_shard``) they are DTensors: the reference of a sharded parameter is stored as this rank's
local shard (sharded like the parameter), and :meth:`CNLOptimizer.cnl_stats` sums the statistics
over the ranks holding the shards.
"""
from __future__ import annotations

import torch

from .. import functional
from ..ops.importance import check_importance_options
from ._amp import skip_or_unscale
from ._reference_store import REFERENCE_KEY, ReferenceCapture, ReferenceStore
from ._rules import EWC_ANCHOR, EWC_FISHER, agem_coefficient, capture_fisher, check_rule_options, rule_arguments
from ._stats import CNLStats, ParameterStats, StatsTracker

__all__ = ["CNLOptimizer", "EXTRA_ARGUMENTS_DOC", "CNLStats", "ParameterStats", "ReferenceCapture", "REFERENCE_KEY", "IMPORTANCE_SLOTS"]

# KIF's importance EMAs live in two slots (Recurrent-KIF's inner and outer learner); each is a pair
# of float32 states per parameter, "<slot>_sensitivity" and "<slot>_uncertainty".
IMPORTANCE_SLOTS = ("inner", "outer")
IMPORTANCE_KEYS = frozenset(f"{slot}_{ema}" for slot in IMPORTANCE_SLOTS for ema in ("sensitivity", "uncertainty"))
# float32 states of a parameter's view_as_real shape (KIF's EMAs, EWC's Fisher); EWC's anchor keeps the
# parameter's dtype
REAL_FLOAT32_KEYS = IMPORTANCE_KEYS | {EWC_FISHER}

is_dtensor = functional.is_dtensor
local_tensor = functional.local_tensor


def real_views(tensors):
    """``tensors`` with ``torch.view_as_real`` of the complex ones (as torch.optim's ``_view_as_real``):
    the kernels step a complex parameter as its (real, imaginary) pairs. ``None`` entries stay."""
    if tensors is None:
        return None
    return [torch.view_as_real(t) if t is not None and t.is_complex() else t for t in tensors]


def new_state(p, dtype=None):
    """A zeroed per-element state of ``p``: contiguous, in ``dtype`` (default: the state dtype of
    ``p``, :func:`cnl_ext.functional.state_dtype`; complex for a complex parameter)."""
    return torch.zeros_like(p, dtype=dtype or functional.state_dtype(p.dtype), memory_format=torch.contiguous_format)


# The arguments every fused CNL optimizer adds to its torch.optim counterpart's, appended to each one's
# docstring (as torch.optim shares its ``_foreach_doc``, ``_maximize_doc``, ...).
EXTRA_ARGUMENTS_DOC = r"""
    Extra arguments: ``backend`` (``"auto" | "torch" | "triton" | "native"``, see
    :mod:`cnl_ext.functional`), ``reference_dtype`` (``"float32" | "bfloat16" | "int8" | "sign2"``),
    ``track_stats`` (see :meth:`cnl_stats`), and ``importance`` (``None | "first" | "param_mix"``) with
    ``importance_betas``: KIF's importance EMAs kept in the same pass (see :meth:`importance_scores`);
    an observer: parameters and moments are bit-identical with it on.

    ``rule="agem"`` (default ``"cnl"``): A-GEM instead of the mask; with a reference set (``float32``
    or ``bfloat16`` ``reference_dtype``), the gradient is projected, ``g ← g − min(0, g·r)/(r·r)·r``
    (dots over all parameters, across groups and FSDP2 shards), and the plain update follows: 2 passes,
    one reduction reading ``g`` and ``r`` and one step applying the projection. ``ewc_lambda`` λ (default 0: off) and ``ewc_decay``
    (default 1): EWC, ``g + 2λ·F⊙(θ−θ*)`` as the gradient, before weight decay, with ``F`` and ``θ*``
    from :meth:`capture_fisher`. Order and sources: :mod:`cnl_ext.optim._rules`.
    """


class CNLOptimizer(torch.optim.Optimizer):
    """Base class: a ``torch.optim.Optimizer`` that masks its update against a reference gradient.

    Subclasses set :attr:`_op` (the functional op they run) and implement :meth:`_step_group` with
    :mod:`cnl_ext.functional`, passing :meth:`_references_for` and the statistics buffer that
    :meth:`step` hands them. :meth:`step` checks everything (gradients, a backend for every
    device) before any state is created or any tensor written.

    ``state_dict()`` leaves the reference out (it is recomputed from the mastered data); set
    ``save_reference = True`` on the optimizer, or call ``state_dict(include_reference=True)``, to
    save it under :data:`REFERENCE_KEY`, which ``load_state_dict`` restores.
    """

    save_reference = False
    importance_slot = "inner"  # the slot the next steps update (see importance_scores)
    _op = None  # "sgd_step_" or "adam_step_" (cnl_ext.ops.contract): what check_step resolves a backend for
    _step_backends = None  # the backends of the group being stepped (functional.Resolved), set by step()
    _step_agem = None  # A-GEM's coefficient of the step (None: the references mask), set by step()
    _step_supports_amp_scaling = True  # reads GradScaler's grad_scale / found_inf (see _amp.py)
    # what the torch.optim counterpart's __setstate__ fills into a loaded param group that lacks a key
    _torch_setstate_defaults: dict = {}

    def __init__(self, params, defaults, *, backend: str, reference_dtype, track_stats: bool,
                 importance=None, importance_betas=(0.85, 0.85), rule="cnl", ewc_lambda=0.0, ewc_decay=1.0):
        functional.canonical_backend(backend)  # a clear error for an unknown name, at construction
        if importance is not None:
            importance_betas = check_importance_options(importance, importance_betas)
        self.importance, self.importance_betas = importance, tuple(importance_betas)
        self._reference = ReferenceStore(reference_dtype)
        check_rule_options(rule, ewc_lambda, ewc_decay, self._reference.format)
        self.rule, self.ewc_lambda, self.ewc_decay = rule, float(ewc_lambda), float(ewc_decay)
        self._stats = StatsTracker(track_stats)
        super().__init__(params, defaults)
        self.backend = backend
        name = type(self).__name__
        for i, p in enumerate(self._parameters()):
            if p.dtype.to_real() not in functional.SUPPORTED_PARAM_DTYPES:
                supported = ", ".join(str(d).replace("torch.", "") for d in functional.SUPPORTED_PARAM_DTYPES)
                raise TypeError(f"{name} supports {supported} parameters (and complex ones of those, stepped as "
                                f"view_as_real pairs); parameter {i} is {p.dtype}")

    # torch.optim.Optimizer pickles only defaults, state and param_groups; a CNL optimizer also
    # needs its backend, options, reference and statistics. The hooks stay out, as in torch.
    _NOT_PICKLED = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                    "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                    "_optimizer_load_state_dict_post_hooks", "_step_backends", "_step_agem")

    def __getstate__(self):
        return {key: value for key, value in self.__dict__.items() if key not in self._NOT_PICKLED}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("_reference", ReferenceStore("float32"))
        self.__dict__.setdefault("_stats", StatsTracker(False))
        self.__dict__.setdefault("importance", None)
        self.__dict__.setdefault("importance_betas", (0.85, 0.85))
        self.__dict__.setdefault("rule", "cnl")
        self.__dict__.setdefault("ewc_lambda", 0.0)
        self.__dict__.setdefault("ewc_decay", 1.0)
        # As torch.optim's __setstate__ does for the keys it added over releases: a checkpoint written
        # before an option existed gets the value torch gives it (torch 2.4's AdamW has no
        # decoupled_weight_decay, say); any other missing key gets this optimizer's default.
        for group in self.param_groups:
            for key, value in {**self.defaults, **self._torch_setstate_defaults}.items():
                group.setdefault(key, value)

    # ------------------------------------------------------------------ parameters and the step

    @property
    def reference_format(self) -> str:
        return self._reference.format

    @property
    def track_stats(self) -> bool:
        return self._stats.enabled

    @property
    def _references(self) -> dict:
        """parameter -> stored reference (read-only view for integrations and tests)."""
        return self._reference.tensors

    def _parameters(self):
        """All parameters, in order across param groups (the order ``set_reference`` uses)."""
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step over every parameter with a gradient; see :meth:`_step_group`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        gathered = self._gradients()
        if skip_or_unscale(self, [g for _, _, grads, _ in gathered for g in grads]):
            return loss
        self._step_agem = agem_coefficient(self, gathered)  # A-GEM's reduction (_rules.py), before any write
        masked = self.rule == "cnl" and bool(self._reference)
        per_group = []
        for group, params, grads, backends in gathered:
            if params:
                stats = self._stats.new_buffer(params, masked)
                self._step_backends = backends
                self._step_group(group, params, grads, stats)
                per_group.append((params, stats))
        self._step_backends = self._step_agem = None
        self._stats.record(per_group, self._parameters(), self._reference)
        return loss

    def _step_group(self, group, params, grads, stats):
        """Update ``params`` of ``group`` (all have gradients ``grads``) with cnl_ext.functional, passing
        ``backend=self._step_backends`` (the backends :meth:`_gradients` resolved when it checked them) and
        ``check=False`` (checked: the gradients there, the importance options at construction)."""
        raise NotImplementedError

    def _gradients(self):
        """(group, params with a gradient, their gradients, their backends) per group, all checked (and
        a backend resolved for each device, once per step) before anything is written; complex ones are
        checked as the view_as_real pairs the kernels step."""
        gathered = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            backends = functional.check_step(self._op, self.backend, real_views(params), real_views(grads),
                                             capturable=group.get("capturable", False), owner=type(self).__name__)
            gathered.append((group, params, grads, backends))
        return gathered

    # ------------------------------------------------------------------ importance (KIF)

    def _importance_keys(self, slot=None):
        slot = self.importance_slot if slot is None else slot
        if slot not in IMPORTANCE_SLOTS:
            raise ValueError(f"importance slot must be one of {IMPORTANCE_SLOTS}, got {slot!r}")
        return f"{slot}_sensitivity", f"{slot}_uncertainty"

    def _importance_arguments(self, params, states):
        """The functional keywords that update this step's importance slot (``{}`` without importance).
        The EMAs are added to ``states``, the dicts the step stores once it has succeeded."""
        if self.importance is None:
            return {}
        keys = self._importance_keys()
        for p, state in zip(real_views(params), states):
            for key in keys:
                if key not in state:
                    state[key] = new_state(p, torch.float32)
        return dict(importance=tuple([state[key] for state in states] for key in keys),
                    importance_kind=self.importance, importance_betas=self.importance_betas)

    def importance_state(self, slot=None):
        """``(sensitivities, uncertainties)``: KIF's float32 EMAs ``Ī`` and ``Ū`` that steps with
        ``importance=`` set keep in ``slot`` (default: :attr:`importance_slot`), two lists in parameter
        order (zeros for a parameter not stepped yet; a complex parameter's have the shape of its
        view_as_real pairs). The live states: read them, do not write."""
        params = self._parameters()
        return tuple([self.state[p][key] if key in self.state.get(p, {}) else new_state(view, torch.float32)
                      for p, view in zip(params, real_views(params))] for key in self._importance_keys(slot))

    def importance_scores(self, slot=None):
        """KIF's element importance ``Ī·Ū`` per parameter (a list in parameter order, float32) of
        ``slot`` (:meth:`importance_state`). A parameter not stepped yet scores 0 everywhere."""
        return [s * u for s, u in zip(*self.importance_state(slot))]

    def reset_importance(self, slot=None) -> None:
        """Forget the EMAs of ``slot`` (default: :attr:`importance_slot`): they start again from 0."""
        keys = self._importance_keys(slot)
        for state in self.state.values():
            for key in keys:
                state.pop(key, None)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self, *, include_reference: bool | None = None):
        """``torch.optim.Optimizer.state_dict()``, plus the reference when ``include_reference``
        (default: the ``save_reference`` attribute) and one is set."""
        return self._add_reference(super().state_dict(), include_reference)

    def _add_reference(self, state_dict, include_reference):
        if include_reference is None:
            include_reference = self.save_reference
        if include_reference and self._reference:
            state_dict[REFERENCE_KEY] = self._reference.saved(self._parameters())
        return state_dict

    def _parse_reference(self, state_dict):
        """The reference a checkpoint restores (validated), or None when it holds none."""
        saved = state_dict.get(REFERENCE_KEY)
        return None if saved is None else self._reference.parse_saved(saved, self._parameters())

    def load_state_dict(self, state_dict):
        """``torch.optim.Optimizer.load_state_dict``, all or nothing: the groups, every state's shape
        and the saved reference are checked before anything is replaced. States are kept contiguous
        in their state dtype (:func:`cnl_ext.functional.state_dtype`: float32 for 16-bit parameters,
        so a float32 state of a bf16 parameter survives exactly; complex for complex ones; KIF's
        importance EMAs float32) whatever the saved dtype and layout, the step count on the host (on
        the device with capturable=True)."""
        param_of_id = self._check_saved_groups(state_dict)
        references = self._parse_reference(state_dict)
        for saved_id, saved_state in state_dict["state"].items():
            if saved_id in param_of_id:
                self._check_saved_state(param_of_id[saved_id][0], saved_state, saved_id)
        super().load_state_dict(state_dict)
        for saved_id, saved_state in state_dict["state"].items():
            if saved_id not in param_of_id:
                continue
            p, capturable = param_of_id[saved_id]
            for key, value in saved_state.items():
                if key == "step":  # a Python number in checkpoints of old torch releases
                    value = torch.as_tensor(value).detach()
                    self.state[p][key] = value.to(p.device if capturable else "cpu", torch.float32, copy=True)
                elif isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
                    dtype = (torch.float32 if key in REAL_FLOAT32_KEYS else p.dtype if key == EWC_ANCHOR
                             else functional.state_dtype(p.dtype))
                    self.state[p][key] = value.detach().to(p.device, dtype, copy=True,
                                                           memory_format=torch.contiguous_format)
        if references is not None:
            self._reference.load(references)

    def _check_saved_groups(self, state_dict):
        """{saved id: (parameter, capturable)}; the errors torch.optim raises, before anything changes."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for saved, group in zip(saved_groups, self.param_groups):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                                 "optimizer's group")
        return {
            saved_id: (p, group.get("capturable", saved_group.get("capturable", False)))
            for saved_group, group in zip(saved_groups, self.param_groups)
            for saved_id, p in zip(saved_group["params"], group["params"])
        }

    def _check_saved_state(self, p, saved_state, saved_id) -> None:
        """Every per-element state of a checkpoint must have its parameter's (local) shape, and be
        complex for a complex parameter (KIF's EMAs: real, the shape of its view_as_real pairs)."""
        for key, value in saved_state.items():
            if key == "step" and not isinstance(value, torch.Tensor):
                value = torch.as_tensor(value)
            if not isinstance(value, torch.Tensor):
                continue
            if key == "step":
                if value.numel() != 1:
                    raise ValueError(f"loaded state of parameter {saved_id}: 'step' must be a scalar, got shape "
                                     f"{tuple(value.shape)}")
                continue
            real = key in REAL_FLOAT32_KEYS
            complex_state = p.is_complex() and not real
            shape = local_tensor(p).shape
            if p.is_complex() and real:
                shape = torch.Size((*shape, 2))
            if value.shape != shape:
                raise ValueError(f"loaded state of parameter {saved_id}: {key!r} has shape {tuple(value.shape)}, but "
                                 f"the parameter has shape {tuple(shape)}")
            if value.is_complex() != complex_state or not (value.is_floating_point() or value.is_complex()):
                kind = "a complex" if complex_state else "a real floating-point"
                raise ValueError(f"loaded state of parameter {saved_id}: {key!r} has dtype {value.dtype}; "
                                 f"{kind} tensor is needed")

    # ------------------------------------------------------------------ the reference

    @property
    def has_reference(self) -> bool:
        return bool(self._reference)

    def clear_reference(self) -> None:
        """Forget the reference: ``step`` is the plain optimizer again."""
        self._reference.clear()

    def _agem_passes_through(self) -> bool:
        """A-GEM leaves this step's gradient as it is (g·r ≥ 0, so c = 0) and the coefficient is on the
        CPU, where reading it costs no sync: the step then runs without the reference, which it would
        only read to subtract 0·r (a step's bytes 28 instead of 32 per element for AdamW)."""
        c = self._step_agem
        return c is not None and c.device.type == "cpu" and not c.item()

    def _references_for(self, params):
        """Stored references aligned with ``params`` (``None`` where a parameter has none): they mask the
        step, or with ``rule="agem"`` project its gradient (:meth:`_rule_arguments` says which)."""
        if self._agem_passes_through():
            return [None] * len(params)
        return self._reference.aligned_with(params)

    def _rule_arguments(self, states) -> dict:
        """Issue 22's functional keywords for the group being stepped (``states``: its parameters' states)."""
        return rule_arguments(self, states, None if self._agem_passes_through() else self._step_agem)

    def set_reference(self, tensors) -> None:
        """Set the reference gradient from tensors given by the user (copied, never written).

        ``tensors``: a sequence in the order of the optimizer's parameters across param groups
        (``None`` entries leave a parameter unmasked), or a mapping from parameter to tensor.
        Everything is checked (shapes, devices, dtypes, finite values) before anything is stored.
        """
        self._reference.set(self._parameters(), tensors)

    def capture_reference(self):
        """Capture the mean mastered-set gradient as the reference (a context manager).

        Inside the block, call ``ref.backward(loss)`` once per mastered batch: autograd accumulates
        straight into buffers that become the reference (for float32 parameters with a float32
        reference, the buffer *is* the reference: no copy). On exit the sum is divided by the
        sum of the calls' weights (their number by default), stored in ``reference_dtype``, and
        every ``.grad`` is back as it was. An inf/NaN result is refused (``FloatingPointError``).
        Do not call ``zero_grad`` inside the block. If the block raises, the previous reference
        is kept and the gradients are restored.
        """
        return self._reference.capture(self._parameters())

    # ------------------------------------------------------------------ EWC

    def capture_fisher(self):
        """Capture EWC's Fisher estimate and anchor (a context manager, as :meth:`capture_reference`).

        Inside the block call ``f.backward(loss)`` once per batch of the data to protect (``weight=``
        as ``ref.backward``); each call's gradient squared is summed in float32. On exit ``F_new`` is
        their (weighted) mean, ``F ← ewc_decay·F + F_new`` and ``θ*`` a copy of the current parameters,
        stored per parameter as the states ``ewc_fisher`` (float32) and ``ewc_anchor`` (in the
        parameter's dtype), which ``state_dict`` saves. From then on each step with ``ewc_lambda`` λ > 0
        uses ``g + 2λ·F⊙(θ−θ*)`` as the gradient (see :mod:`cnl_ext.optim._rules`). Only ``f.backward``
        calls count; every ``.grad`` is back as it was after the block. A block without a call, or whose
        squares are inf/NaN, raises and leaves the previous estimate in place. Do not call ``zero_grad``
        inside the block.
        """
        return capture_fisher(self)

    def clear_fisher(self) -> None:
        """Forget EWC's Fisher estimates and anchors: steps have no EWC term again."""
        for state in self.state.values():
            state.pop(EWC_FISHER, None)
            state.pop(EWC_ANCHOR, None)

    # ------------------------------------------------------------------ statistics

    def cnl_stats(self):
        """:class:`CNLStats` of the last step (needs ``track_stats=True`` and a reference), else None.

        With sharded (FSDP2) parameters the counts and sums are all-reduced over the ranks holding
        the shards: a collective, so every rank must call ``cnl_stats()``.
        """
        return self._stats.read(self._parameters())
