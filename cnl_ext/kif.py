"""KIF and Recurrent-KIF over lists of tensors: unit scores, normalisation, thresholds and fusion.

The method spec is ``docs/kif-spec.md`` (KIF §1, Recurrent-KIF §2). The per-element importance EMAs
(``S`` = sensitivity Ī, ``U`` = uncertainty Ū) are kept by the optimizer step
(:func:`cnl_ext.ops.importance.importance_update_` defines them); this module takes them from there.

KIF, at the end of task k (spec §1.3-1.5)::

    units = Units.per_tensor(shapes)                 # or per_row, or with LoRA rank-1 pairs
    cur = minmax(unit_scores(importance_scores(S, U), units))
    prev = minmax(acc)                               # acc: the accumulated importance, task k-1
    c = static_coefficients(prev, cur) or adaptive_coefficients(prev, cur)
    fuse_task_vector_(params, anchors, c, units)     # θ <- anchor + c_u (θ - anchor)
    acc = accumulate_importance(acc, cur)

(:class:`KIFMerger` does that sequence.) Recurrent-KIF, at the end of each cycle (spec §2.4)::

    d_in = score_quantile(S_in, U_in, 0.8); d_out = score_quantile(S_out, U_out, 0.8)
    recurrent_fuse_(params, anchors, inner_ends, (S_in, U_in), (S_out, U_out), d_in, d_out, rule="code")

The elementwise passes are ops of the backends of :mod:`cnl_ext.registry`, chosen by its
:func:`~cnl_ext.registry.resolve` and launched per bucket by :mod:`cnl_ext.planning`: ``"torch"``
(:mod:`cnl_ext.ops.kif_fusion_torch`, any device, the oracle), ``"triton"``
(:mod:`cnl_ext.ops.kif_fusion_triton`; CUDA, or CPU under TRITON_INTERPRET=1) or ``"native"`` (the C++ CPU kernels, ``csrc/cpu/cnl_cpu_kif.cpp``); ``"auto"`` takes Triton for CUDA
tensors and the native kernels for CPU tensors where they load, else torch. The global quantile is
exact for any number of elements (``torch.quantile`` refuses more than 2**24).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import planning, registry
from .ops.contract import KIF_RECURRENT_FUSE, KIF_TASK_VECTOR_FUSE
from .ops.kif_fusion_torch import FUSION_RULES

__all__ = [
    "FUSION_RULES", "Units", "importance_scores", "unit_scores", "minmax", "percentile", "accumulate_importance",
    "static_coefficients", "adaptive_coefficients", "fuse_task_vector_", "global_quantile", "score_quantile",
    "recurrent_fuse_", "orthogonality_loss", "unique_parameters", "KIFMerger",
]


# ---------------------------------------------------------------------------------- units

@dataclass(frozen=True)
class Units:
    """How the elements of a list of tensors group into KIF's skill units.

    ``maps[i] = (offset, div, mod)``: element ``f`` (flat, row-major) of tensor ``i`` belongs to unit
    ``offset + (f // div) % mod``. ``groups`` says how to score them: ``("tensor", i)``, ``("rows", i)``
    or ``("lora", i_A, i_B)``, each with its first unit.
    """

    shapes: tuple
    maps: tuple
    groups: tuple  # ((kind, tensor indices, first unit), ...)
    count: int

    @staticmethod
    def per_tensor(shapes) -> "Units":
        """One unit per tensor (KIF's matrix-level unit)."""
        return Units.build(shapes, rows=False)

    @staticmethod
    def per_row(shapes) -> "Units":
        """One unit per output row of each tensor of 2 or more dimensions; a 0-d / 1-d tensor is one unit."""
        return Units.build(shapes, rows=True)

    @staticmethod
    def build(shapes, *, rows: bool = False, lora_pairs=()) -> "Units":
        """Units of tensors with ``shapes``; ``lora_pairs``: ``(index of A [r, in], index of B [out, r])``
        pairs whose rank-1 components are units (row i of A with column i of B); other tensors are
        one unit each, or one per row with ``rows``."""
        shapes = tuple(tuple(int(d) for d in s) for s in shapes)
        paired = {}
        for a, b in lora_pairs:
            for index in (a, b):
                if not 0 <= index < len(shapes):
                    raise ValueError(f"LoRA pair ({a}, {b}): no tensor {index} among {len(shapes)}")
                if index in paired:
                    raise ValueError(f"tensor {index} is in more than one LoRA pair")
            if len(shapes[a]) != 2 or len(shapes[b]) != 2 or shapes[a][0] != shapes[b][1]:
                raise ValueError(f"LoRA pair ({a}, {b}): expected A [r, in] and B [out, r], "
                                 f"got {list(shapes[a])} and {list(shapes[b])}")
            paired[a] = paired[b] = (a, b)
        maps, groups, offset = [None] * len(shapes), [], 0
        for i, shape in enumerate(shapes):
            numel = math.prod(shape)
            if i in paired:
                a, b = paired[i]
                if i != a:
                    continue  # handled with its A
                rank, cols = shapes[a]
                maps[a] = (offset, max(cols, 1), rank)
                maps[b] = (offset, 1, rank)
                groups.append(("lora", (a, b), offset))
                offset += rank
            elif rows and len(shape) >= 2 and shape[0] > 0:
                maps[i] = (offset, max(numel // shape[0], 1), shape[0])
                groups.append(("rows", (i,), offset))
                offset += shape[0]
            else:
                maps[i] = (offset, max(numel, 1), 1)
                groups.append(("tensor", (i,), offset))
                offset += 1
        return Units(shapes, tuple(maps), tuple(groups), offset)

    def check(self, tensors, what: str) -> None:
        shapes = tuple(tuple(t.shape) for t in tensors)
        if shapes != self.shapes:
            raise ValueError(f"{what}: the units were built for shapes {list(self.shapes)}, got {list(shapes)}")


def unique_parameters(params) -> list:
    """``params`` without repeats (a tied weight listed twice is one tensor, hence one unit)."""
    seen, unique = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return unique


# ---------------------------------------------------------------------------------- scores

@torch.no_grad()
def importance_scores(sensitivities, uncertainties) -> list:
    """``S * U`` per element (KIF Eq 12), float32, one tensor per parameter."""
    sensitivities, uncertainties = list(sensitivities), list(uncertainties)
    if len(sensitivities) != len(uncertainties):
        raise ValueError(f"{len(sensitivities)} sensitivities but {len(uncertainties)} uncertainties")
    return torch._foreach_mul([s.float() for s in sensitivities], [u.float() for u in uncertainties])


@torch.no_grad()
def unit_scores(scores, units: Units) -> torch.Tensor:
    """The mean element importance of each unit (Eq 6), a float32 vector of ``units.count``.

    A rank-1 LoRA unit scores ``mean_j s_B[j, i] * mean_l s_A[i, l]`` (the authors' code: the mean of
    the outer product of the two factors' scores).
    """
    scores = list(scores)
    units.check(scores, "unit_scores")
    parts = []
    for kind, indices, _ in units.groups:
        if kind == "tensor":
            s = scores[indices[0]]
            parts.append(s.float().mean().reshape(1) if s.numel() else s.new_zeros(1, dtype=torch.float32))
        elif kind == "rows":
            s = scores[indices[0]]
            parts.append(s.float().reshape(s.shape[0], -1).mean(1))
        else:
            s_a, s_b = scores[indices[0]].float(), scores[indices[1]].float()
            parts.append(s_b.mean(0) * s_a.mean(1))
    if not parts:
        return torch.zeros(0)
    device = parts[0].device
    return torch.cat([p.to(device) for p in parts])


def minmax(x: torch.Tensor) -> torch.Tensor:
    """``(x - min) / (max - min)``; a constant (or empty) vector gives zeros."""
    x = x.float()
    if x.numel() == 0:
        return x.clone()
    low, high = x.min(), x.max()
    if not bool(high > low):
        return torch.zeros_like(x)
    return (x - low) / (high - low)


def percentile(x: torch.Tensor, q: float = 0.8) -> torch.Tensor:
    """The linear-interpolated ``q`` quantile of a vector (numpy's default; KIF's ``pct80``)."""
    return global_quantile([x], q)


def accumulate_importance(previous, current: torch.Tensor, beta: float = 0.7) -> torch.Tensor:
    """KIF Eq 13 as the authors' code: ``minmax(β·minmax(previous) + (1−β)·current)``; task 1 (``previous``
    None): ``minmax(current)``."""
    if previous is None:
        return minmax(current)
    if previous.shape != current.shape:
        raise ValueError(f"accumulated importance has {previous.numel()} units, the current scores {current.numel()}")
    return minmax(beta * minmax(previous) + (1 - beta) * current)


def static_coefficients(previous: torch.Tensor, current: torch.Tensor, *, gamma: float = 0.7,
                        q: float = 0.8) -> torch.Tensor:
    """KIF's static fusion (Eq 15) on min-max-normalised unit scores: the share ``c`` of the new task vector.

    ``P = previous > pct(previous)``, ``C = current > pct(current)`` (strict): c = 1 − γ if P∧C, 0 if
    P∧¬C (keep the old weights), 1 if ¬P∧C (take the new ones), ½ if neither.
    """
    if previous.shape != current.shape:
        raise ValueError(f"previous scores have {previous.numel()} units, current {current.numel()}")
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    was_important = previous > percentile(previous, q)
    is_important = current > percentile(current, q)
    c = torch.full_like(current, 0.5, dtype=torch.float32)
    c[was_important & is_important] = 1.0 - gamma
    c[was_important & ~is_important] = 0.0
    c[~was_important & is_important] = 1.0
    return c


def adaptive_coefficients(previous: torch.Tensor, current: torch.Tensor, *, tau: float = 0.15) -> torch.Tensor:
    """KIF's adaptive fusion (Eq 16-17): ``c = σ((current − previous) / τ)``, the softmax of the two."""
    if previous.shape != current.shape:
        raise ValueError(f"previous scores have {previous.numel()} units, current {current.numel()}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    return torch.sigmoid((current.float() - previous.float()) / tau)


# ---------------------------------------------------------------------------------- quantile

@torch.no_grad()
def global_quantile(tensors, q: float) -> torch.Tensor:
    """The exact ``q`` quantile over all elements of ``tensors`` jointly (linear interpolation, as
    ``numpy.quantile``), a 0-d float32 tensor; any number of elements.

    Rank ``p = q·(n−1)`` in float64; the values at ranks ⌊p⌋ and ⌊p⌋ + 1 come from a radix select
    (non-negative float32, e.g. scores) or ``kthvalue``. Equals ``torch.quantile`` up to its float32
    rank arithmetic (bit-identical when ``p`` is an integer).
    """
    tensors = list(tensors)
    if not 0 <= q <= 1:
        raise ValueError(f"quantile q must lie in [0, 1], got {q}")
    n = sum(t.numel() for t in tensors)
    if n == 0:
        raise ValueError("quantile over no elements")
    flat = tensors[0].reshape(-1).float() if len(tensors) == 1 else torch.cat([t.reshape(-1).float() for t in tensors])
    return _quantile_of_flat(flat, q)


def _quantile_of_flat(flat: torch.Tensor, q: float) -> torch.Tensor:
    n = flat.numel()
    rank = q * (n - 1)
    below = min(int(math.floor(rank)), n - 1)
    weight = rank - below
    low, high = _order_statistics(flat, below, need_next=weight > 0)
    if weight == 0:
        return low.clone()
    return (low.double() + weight * (high.double() - low.double())).float()


RADIX_MIN_ELEMENTS = 1 << 20  # below this, one kthvalue is as fast


def _order_statistics(flat: torch.Tensor, k: int, *, need_next: bool):
    """The values of 0-based ranks ``k`` and ``k + 1`` (the latter only with ``need_next``) of ``flat``.

    Non-negative float32 inputs (importance scores) of at least ``RADIX_MIN_ELEMENTS`` take a radix
    select: their bits, read as int32, sort like the values, so a histogram of the top 16 bits finds
    the bucket holding rank k and only that bucket is selected from. Otherwise ``kthvalue``.
    """
    n = flat.numel()
    if flat.dtype == torch.float32 and n >= RADIX_MIN_ELEMENTS:
        bits = flat.view(torch.int32)
        smallest, largest = (int(v) for v in torch.aminmax(bits))
        if smallest >= 0:  # no negative value, no -0.0, no negative NaN
            if largest > 0x7F800000:
                raise ValueError("quantile over scores that contain NaN")
            top = bits >> 16
            counts = torch.bincount(top, minlength=(largest >> 16) + 1)
            ends = counts.cumsum(0)
            bucket = int(torch.searchsorted(ends, k + 1))  # first bucket whose end passes rank k
            before = int(ends[bucket - 1]) if bucket else 0
            members = flat[top == bucket]
            low = members.kthvalue(k - before + 1).values
            if not need_next or k + 1 >= n:
                return low, low
            if k + 1 - before < members.numel():
                return low, members.kthvalue(k + 1 - before + 1).values
            following = int(torch.nonzero(counts[bucket + 1:])[0]) + bucket + 1
            return low, flat[top == following].min()
    if bool(torch.isnan(flat).any()):
        raise ValueError("quantile over scores that contain NaN")
    low = flat.kthvalue(k + 1).values if n > 1 else flat[0]
    if not need_next or k + 1 >= n:
        return low, low
    if int((flat <= low).sum()) >= k + 2:  # rank k + 1 ties with rank k
        return low, low
    return low, torch.where(flat > low, flat, torch.inf).min()


@torch.no_grad()
def score_quantile(sensitivities, uncertainties, q: float = 0.8) -> torch.Tensor:
    """The exact ``q`` quantile of ``S * U`` over all elements jointly (Recurrent-KIF's δ), one float32
    temporary of all elements."""
    sensitivities, uncertainties = list(sensitivities), list(uncertainties)
    if len(sensitivities) != len(uncertainties):
        raise ValueError(f"{len(sensitivities)} sensitivities but {len(uncertainties)} uncertainties")
    n = sum(s.numel() for s in sensitivities)
    if n == 0:
        raise ValueError("quantile over no elements")
    flat = torch.empty(n, dtype=torch.float32, device=sensitivities[0].device)
    start = 0
    for s, u in zip(sensitivities, uncertainties):
        torch.mul(s.reshape(-1), u.reshape(-1), out=flat[start:start + s.numel()])
        start += s.numel()
    return _quantile_of_flat(flat, q)


# ---------------------------------------------------------------------------------- fusion passes

# What every backend's fusion passes take (float64 parameters, which the optimizers step, are not
# fused: no backend has float64 fusion kernels).
FUSION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_lists(params, named_lists, *, float32=()):
    """Same length, shapes and device as ``params``, one of :data:`FUSION_DTYPES` (what every backend
    takes); the ``float32`` names must be float32."""
    planning.check_lists(params, named_lists, dtypes=FUSION_DTYPES, what="float32, bfloat16 or float16",
                         note=" (KIF's fusion passes take no float64)", float32=float32)


def _fuse(op, backend, lists: dict, arguments=lambda indices: (), **keywords):
    """``op`` over ``lists`` (by the names of its tensor lists), one launch per bucket of one (param
    dtype, anchor dtype), through :mod:`cnl_ext.planning` (contiguous copies written back);
    ``arguments(indices)``: a bucket's positional arguments after the lists."""
    params, anchors = lists["params"], lists["anchors"]
    module = registry.resolve(backend, params[0].device, op)
    with torch.no_grad():
        planning.execute([planning.plan(op, module, key, indices, lists, arguments=arguments(indices), **keywords)
                          for key, indices in planning.buckets(params, extra_key=lambda i: anchors[i].dtype)])


def fuse_task_vector_(params, anchors, coefficients: torch.Tensor, units: Units, *, backend: str = "auto") -> None:
    """KIF fusion in place: ``θ <- anchor + c_u · (θ − anchor)`` with ``c_u = coefficients[unit]``.

    ``anchors``: the weights the task started from (float32, bfloat16 or float16; float32 keeps small
    task vectors exact). ``coefficients``: one value per unit of ``units``.
    """
    params, anchors = list(params), list(anchors)
    _check_lists(params, {"anchors": anchors})
    units.check(params, "fuse_task_vector_")
    coefficients = coefficients.detach().to(device=params[0].device, dtype=torch.float32).reshape(-1)
    if coefficients.numel() != units.count:
        raise ValueError(f"{coefficients.numel()} coefficients for {units.count} units")
    if bool(torch.isnan(coefficients).any()):
        raise ValueError("fusion coefficients contain NaN")
    _fuse(KIF_TASK_VECTOR_FUSE, backend, dict(params=params, anchors=anchors),
          arguments=lambda indices: (coefficients, planning.take(units.maps, indices)))


def recurrent_fuse_(params, anchors, inner_ends, inner_importance, outer_importance, delta_in, delta_out, *,
                    rule: str = "code", update_anchors: bool = True, backend: str = "auto") -> None:
    """Recurrent-KIF's fusion in place: ``θ <- θ_b + w_in·(θ_Q − θ_b) + w_out·(θ − θ_Q)``.

    ``anchors`` (θ_b: the weights at the cycle's start), ``inner_ends`` (θ_Q: after the inner steps);
    ``inner_importance`` / ``outer_importance``: ``(sensitivities, uncertainties)`` float32 lists whose
    product is compared, strictly, with ``delta_in`` / ``delta_out`` (:func:`score_quantile`).
    ``rule="code"``: the authors' weights (0.4, 0.6) / (1, 0) / (0, 1) / (0.5, 0.5); ``"paper"``: the
    binary masks of Eq 9. ``update_anchors``: then θ_b <- θ, the next cycle's anchor.
    """
    if rule not in FUSION_RULES:
        raise ValueError(f"rule must be one of {FUSION_RULES}, got {rule!r}")
    params, anchors, inner_ends = list(params), list(anchors), list(inner_ends)
    s_in, u_in = (list(x) for x in inner_importance)
    s_out, u_out = (list(x) for x in outer_importance)
    _check_lists(params, {"anchors": anchors, "inner_ends": inner_ends, "inner sensitivities": s_in,
                          "inner uncertainties": u_in, "outer sensitivities": s_out, "outer uncertainties": u_out},
                 float32=("inner sensitivities", "inner uncertainties", "outer sensitivities", "outer uncertainties"))
    for i, (a, e) in enumerate(zip(anchors, inner_ends)):
        if a.dtype != e.dtype:
            raise ValueError(f"anchors[{i}] is {a.dtype} but inner_ends[{i}] {e.dtype}: give both in one dtype")
    delta_in, delta_out = (float(torch.as_tensor(d, dtype=torch.float32)) for d in (delta_in, delta_out))
    if math.isnan(delta_in) or math.isnan(delta_out):
        raise ValueError("a fusion threshold is NaN")
    _fuse(KIF_RECURRENT_FUSE, backend,
          dict(params=params, anchors=anchors, inner_ends=inner_ends, inner_sensitivities=s_in,
               inner_uncertainties=u_in, outer_sensitivities=s_out, outer_uncertainties=u_out),
          delta_in=delta_in, delta_out=delta_out, rule=rule, update_anchors=update_anchors)


# ---------------------------------------------------------------------------------- KIFLoRA

def orthogonality_loss(lora_as, lora_bs, *, weight: float = 0.1) -> torch.Tensor:
    """KIFLoRA's orthogonality loss as the authors' code (AdaLoRA's): ``weight`` times the mean over all
    LoRA matrices of ``‖G − I_r‖_F`` (not squared), ``G = A Aᵀ`` for ``A [r, in]``, ``Bᵀ B`` for ``B [out, r]``."""
    norms = []
    for a in lora_as:
        gram = a @ a.T
        norms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], device=a.device, dtype=a.dtype)))
    for b in lora_bs:
        gram = b.T @ b
        norms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], device=b.device, dtype=b.dtype)))
    if not norms:
        raise ValueError("orthogonality_loss: no LoRA matrices")
    return weight * torch.stack(norms).mean()


# ---------------------------------------------------------------------------------- KIF, one run

class KIFMerger:
    """KIF's state across tasks (the accumulated unit importance) and its end-of-task fusion.

    ``fusion="static"`` (KIF, Eq 15, γ) or ``"adaptive"`` (KIFLoRA, Eq 16-17, τ); β weighs the past in
    Eq 13; ``q`` is the importance threshold's quantile (top 20% of units).
    """

    def __init__(self, units: Units, *, fusion: str = "static", gamma: float = 0.7, beta: float = 0.7,
                 tau: float = 0.15, q: float = 0.8, backend: str = "auto"):
        if fusion not in ("static", "adaptive"):
            raise ValueError(f"fusion must be 'static' or 'adaptive', got {fusion!r}")
        self.units, self.fusion, self.gamma, self.beta, self.tau, self.q = units, fusion, gamma, beta, tau, q
        self.backend = backend
        self.accumulated = None  # minmax-normalised unit importance after the last task

    def finish_task(self, params, anchors, scores):
        """Fuse the task vector ``params − anchors`` (from task 2 on) and accumulate the importance.

        ``scores``: the element importance ``S·U`` per param. Returns the coefficients used (None on
        the first task, which is not fused).
        """
        current = minmax(unit_scores(scores, self.units))
        coefficients = None
        if self.accumulated is not None:
            previous = minmax(self.accumulated)
            if self.fusion == "static":
                coefficients = static_coefficients(previous, current, gamma=self.gamma, q=self.q)
            else:
                coefficients = adaptive_coefficients(previous, current, tau=self.tau)
            fuse_task_vector_(params, anchors, coefficients, self.units, backend=self.backend)
        self.accumulated = accumulate_importance(self.accumulated, current, self.beta)
        return coefficients

    def state_dict(self) -> dict:
        return {"accumulated": None if self.accumulated is None else self.accumulated.cpu()}

    def load_state_dict(self, state: dict) -> None:
        acc = state["accumulated"]
        if acc is not None and acc.numel() != self.units.count:
            raise ValueError(f"saved KIF state has {acc.numel()} units, this model {self.units.count}")
        self.accumulated = acc
