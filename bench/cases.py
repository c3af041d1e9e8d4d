"""The optimizer-step cases (issues 3 and 12): what each one runs, the bytes it must move, its targets.

Roofline: an optimizer step is memory-bound, so its least possible time is the bytes it must move
(each operand read or written once) divided by the best streaming rate measured on the device
(``harness.roofline``). Per element:

    parameters   3 x itemsize   (read p and g, write p: 12 B in fp32, 6 B in bf16, 24 B in fp64)
    states       SGD 0, Momentum 8 (read + write the fp32 buffer), RMSprop 8 (square average),
                 Adam/AdamW 16 (m and v); twice that for fp64 parameters (fp64 states)
    reference    its stored size: fp32 4, bf16 2, int8 1, sign2 0.25 (4 signs a byte)
    importance   KIF's EMAs (``importance=``): 16 (read + write the fp32 sensitivity and uncertainty)
    rule         issue 22: EWC reads F (fp32) and θ* (itemsize): 8 in fp32 (AdamW 36 B); A-GEM's reduction
                 reads g and r once more before the step reads r: 4 + 4 in fp32 (AdamW, fp32 r: 40 B)

so AdamW fp32 = 28 B (+ the reference), SGD 12, Momentum 20, RMSprop 20, bf16 parameters with fp32
AdamW states 22, fp64 AdamW 56. The authors' loop, torch's optimizers and ``CNL(torch.optim.X)`` are charged the
same bytes as the fused step that does the same work, so their "% of roofline" is their effective
speed against that floor.

Targets carry the device they are stated for: issue 3's (and 4's) are GPU targets, issue 12's are
CPU targets (SmolLM2-135M shapes on the project's 2-core machine); issue 15's (importance tracking
in the step) hold on either device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

import cnl_ext
from cnl_ext import reference_format
from cnl_ext.testing.authors_oracle import AuthorsCNL

from . import harness
from .shapes import flat_shapes, total_numel

LR = 1e-7  # nothing is restored between timed steps: they must barely move the parameters
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 1e-2
MOMENTUM = 0.9
BASELINE = "torch_adamw_fused"  # the AdamW baseline; also the rate that can set the roofline

STATE_BYTES = {"sgd": 0, "momentum": 8, "rmsprop": 8, "adam": 16, "adamw": 16}
IMPORTANCE_BYTES = 16  # KIF's two fp32 EMAs, read and written
# Bytes per stored element of each reference format (sign2 packs 4 elements in a uint8).
REFERENCE_ITEMSIZE = {fmt: reference_format.encode(torch.zeros(4), fmt).element_size() for fmt in reference_format.FORMATS}
# Implementations that run cnl_ext code, hence take a backend (and get NAME@BACKEND variants).
CNL_IMPLEMENTATIONS = ("cnl", "cnl_wrapper")


@dataclass(frozen=True)
class Target:
    """A goal of an issue, checked on the results of one run on one parameter set.

    kind: ``"max_time_ratio"`` (time / time of ``against`` <= value), ``"min_speedup"`` (time of
    ``against`` / time >= value), ``"min_roofline"`` (roofline time / time >= value) or
    ``"max_roofline_time"`` (time / roofline time <= value). It applies only to the parameter sets
    in ``params``, on ``device_type`` and to rows whose backend is in ``backends`` (``None``: any).
    """

    kind: str
    value: float
    against: str | None = None
    params: tuple[str, ...] | None = None
    device_type: str | None = None
    backends: tuple[str, ...] | None = None
    issue: int = 3

    def describe(self) -> str:
        return {
            "max_time_ratio": f"≤ {self.value:g}× {self.against}",
            "min_speedup": f"≥ {self.value:g}× faster than {self.against}",
            "min_roofline": f"≥ {self.value:.0%} of roofline",
            "max_roofline_time": f"≤ {self.value:g}× roofline time",
        }[self.kind]

    def applies_to(self, param_set: str, device_type: str | None = None, backend: str | None = None) -> bool:
        return ((self.params is None or param_set in self.params)
                and (self.device_type is None or device_type is None or device_type == self.device_type)
                and (self.backends is None or backend in self.backends))

    def evaluate(self, row: dict, rows: dict[str, dict]) -> tuple[float | None, bool | None]:
        """``(measured value, passed)``; both ``None`` when the case it is compared with did not run."""
        if self.kind in ("max_time_ratio", "min_speedup"):
            if self.against not in rows:
                return None, None
            ratio = row["ms"] / rows[self.against]["ms"]
            measured = ratio if self.kind == "max_time_ratio" else 1 / ratio
        else:
            fraction = row["roofline_ms"] / row["ms"]
            measured = fraction if self.kind == "min_roofline" else 1 / fraction
        passed = measured <= self.value if self.kind.startswith("max") else measured >= self.value
        return measured, passed


@dataclass(frozen=True)
class Case:
    """One way of taking an optimizer step over a parameter set.

    implementation: ``"cnl"`` (cnl_ext's fused optimizers), ``"cnl_wrapper"``
    (``cnl_ext.CNL(torch.optim.X(...))``), ``"torch_fused"``, ``"torch_foreach"``,
    ``"torch_default"`` (torch's default implementation for the device) or ``"authors"``
    (cnl_ext/testing/authors_oracle.py). reference: the reference format, ``None`` for no reference (a plain
    optimizer step). importance: the kind of KIF's importance EMAs the step also tracks (fused
    optimizers), or ``None``. backend: ``None`` takes the run's first ``--backend``. cuda_graph: the
    step (``capturable=True``) is captured once in a CUDA graph and replayed, so no Python runs per
    step (GPU only). baseline: the torch optimizer of the same family that the "×" column divides by.
    """

    name: str
    description: str
    optimizer: str
    implementation: str
    reference: str | None = None
    param_dtype: torch.dtype = torch.float32
    track_stats: bool = False
    importance: str | None = None
    # issue 22: "ewc" (ewc_lambda > 0, a Fisher estimate set), "agem" (rule="agem", the reference set so that
    # g·r < 0: every step projects) or "agem_agreeing" (g·r ≥ 0: no step projects)
    rule: str | None = None
    flat: bool = False
    backend: str | None = None
    cuda_graph: bool = False
    targets: tuple[Target, ...] = ()
    baseline: str = BASELINE


def _gpu(kind, value, against=None, **kw) -> Target:
    return Target(kind, value, against, device_type="cuda", **kw)


def _cpu(kind, value, against=None, **kw) -> Target:
    """Issue 12's CPU targets (SmolLM2-135M shapes, 2 cores)."""
    return Target(kind, value, against, device_type="cpu", issue=12, **kw)


ROOFLINE_90 = _gpu("min_roofline", 0.90)
AGEM_RULES = ("agem", "agem_agreeing")
SGD_BASELINE, MOMENTUM_BASELINE = "torch_sgd_fused", "torch_momentum_fused"
F64_BASELINE = "torch_adamw_fused_f64"  # issue 20: float64 parameters
ADAM_BASELINE, RMSPROP_BASELINE = "torch_adam_fused", "torch_rmsprop"

CASES = (
    Case(BASELINE, "torch.optim.AdamW(fused=True)", "adamw", "torch_fused"),
    Case("torch_adamw_foreach", "torch.optim.AdamW(foreach=True)", "adamw", "torch_foreach"),
    Case(ADAM_BASELINE, "torch.optim.Adam(fused=True)", "adam", "torch_fused", baseline=ADAM_BASELINE),
    Case(SGD_BASELINE, "torch.optim.SGD(fused=True)", "sgd", "torch_fused", baseline=SGD_BASELINE),
    Case(MOMENTUM_BASELINE, "torch.optim.SGD(momentum=0.9, fused=True)", "momentum", "torch_fused",
         baseline=MOMENTUM_BASELINE),
    Case(RMSPROP_BASELINE, "torch.optim.RMSprop (torch's default implementation)", "rmsprop", "torch_default",
         baseline=RMSPROP_BASELINE),
    Case(F64_BASELINE, "torch.optim.AdamW(fused=True), float64 parameters", "adamw", "torch_fused",
         param_dtype=torch.float64, baseline=F64_BASELINE),
    Case("authors_adamw", "the authors' per-tensor CNL AdamW loop, fp32 reference", "adamw", "authors", "float32"),
    Case("cnl_adamw_noref", "FusedCNLAdamW, no reference (plain AdamW)", "adamw", "cnl",
         targets=(_gpu("max_time_ratio", 0.95, BASELINE), _cpu("max_time_ratio", 1.05, BASELINE),
                  # issue 12, item 5: the lean PyTorch implementation
                  _cpu("max_time_ratio", 1.5, "torch_adamw_foreach", backends=("torch",)))),
    Case("cnl_adamw_noref_stats", "FusedCNLAdamW, no reference, track_stats=True (nothing to count)", "adamw",
         "cnl", track_stats=True, targets=(_cpu("max_time_ratio", 1.05, "cnl_adamw_noref"),)),
    Case("cnl_adamw_importance", 'FusedCNLAdamW(importance="first"), no reference: KIF\'s EMAs in the step',
         "adamw", "cnl", importance="first",
         targets=(Target("max_time_ratio", 1.70, "cnl_adamw_noref", issue=15),)),
    # issue 22: EWC's penalty and A-GEM's projection (A-GEM: 2 passes, the g·r reduction and the step)
    Case("cnl_adamw_ewc", "FusedCNLAdamW(ewc_lambda=1), no reference: F and θ* read in the step", "adamw", "cnl",
         rule="ewc", targets=(Target("max_time_ratio", 1.35, "cnl_adamw_noref", issue=22),)),
    Case("cnl_adamw_agem", 'FusedCNLAdamW(rule="agem"), fp32 reference, g·r < 0: the reduction, then the '
         'projecting step', "adamw", "cnl", "float32", rule="agem",
         targets=(Target("max_time_ratio", 1.50, "cnl_adamw_noref", issue=22),)),
    Case("cnl_adamw_agem_agreeing", 'FusedCNLAdamW(rule="agem"), fp32 reference, g·r ≥ 0: the reduction, then '
         'the plain step', "adamw", "cnl", "float32", rule="agem_agreeing"),
    Case("cnl_adamw_fp32", "FusedCNLAdamW, fp32 reference", "adamw", "cnl", "float32",
         targets=(_gpu("max_time_ratio", 0.95, BASELINE), _gpu("min_speedup", 4.5, "authors_adamw"), ROOFLINE_90,
                  _gpu("max_time_ratio", 1.5, "cnl_adamw_fp32_flat", params=("many-small",)),
                  _cpu("max_time_ratio", 1.20, BASELINE))),
    Case("cnl_adamw_fp32_stats", "FusedCNLAdamW, fp32 reference, track_stats=True", "adamw", "cnl", "float32",
         track_stats=True, targets=(_gpu("max_time_ratio", 1.03, "cnl_adamw_fp32"),
                                    _cpu("max_time_ratio", 1.05, "cnl_adamw_fp32"))),
    Case("cnl_adamw_fp32_flat", "FusedCNLAdamW, fp32 reference, one tensor of the same total", "adamw", "cnl",
         "float32", flat=True, targets=(ROOFLINE_90,)),
    # Many small tensors make the eager step host-bound (Python work per tensor, see host_overhead.py);
    # a graph replay has none, so this is the configuration that can meet the 1.5x target.
    Case("cnl_adamw_fp32_graph", "FusedCNLAdamW(capturable=True), fp32 reference, replayed from a CUDA graph",
         "adamw", "cnl", "float32", cuda_graph=True,
         targets=(_gpu("max_time_ratio", 1.5, "cnl_adamw_fp32_flat", params=("many-small",)),)),
    Case("cnl_adamw_bf16", "FusedCNLAdamW, bf16 reference", "adamw", "cnl", "bfloat16", targets=(ROOFLINE_90,)),
    Case("cnl_adamw_int8", "FusedCNLAdamW, int8 sign reference", "adamw", "cnl", "int8", targets=(ROOFLINE_90,)),
    Case("cnl_adamw_sign2", "FusedCNLAdamW, 2-bit packed sign reference", "adamw", "cnl", "sign2",
         targets=(ROOFLINE_90, _gpu("max_roofline_time", 1.05), _cpu("max_time_ratio", 1.10, BASELINE))),
    Case("cnl_adamw_sign2_stats", "FusedCNLAdamW, 2-bit packed sign reference, track_stats=True", "adamw", "cnl",
         "sign2", track_stats=True, targets=(_cpu("max_time_ratio", 1.05, "cnl_adamw_sign2"),)),
    Case("cnl_adamw_bf16_params", "FusedCNLAdamW, bf16 parameters and gradients, fp32 states, bf16 reference",
         "adamw", "cnl", "bfloat16", param_dtype=torch.bfloat16, targets=(ROOFLINE_90,)),
    # issue 20: float64 parameters are stepped in float64 with float64 states (every backend: the native CPU and
    # CUDA kernels, Triton, the PyTorch implementation)
    Case("cnl_adamw_noref_f64", "FusedCNLAdamW, float64 parameters and states, no reference (plain AdamW)", "adamw",
         "cnl", param_dtype=torch.float64, targets=(Target("max_time_ratio", 1.10, F64_BASELINE, device_type="cpu", backends=("native",), issue=20),
                                                    _gpu("min_roofline", 0.90, issue=20)),
         baseline=F64_BASELINE),
    Case("cnl_adamw_fp32_f64", "FusedCNLAdamW, float64 parameters and states, fp32 reference", "adamw", "cnl",
         "float32", param_dtype=torch.float64, baseline=F64_BASELINE),
    Case("cnl_sgd", "FusedCNLSGD, fp32 reference", "sgd", "cnl", "float32", targets=(ROOFLINE_90,),
         baseline=SGD_BASELINE),
    Case("cnl_momentum_noref", "FusedCNLSGD(momentum=0.9), no reference (plain momentum SGD)", "momentum", "cnl",
         targets=(_cpu("max_time_ratio", 1.05, MOMENTUM_BASELINE),), baseline=MOMENTUM_BASELINE),
    Case("cnl_momentum", "FusedCNLSGD(momentum=0.9), fp32 reference", "momentum", "cnl", "float32",
         targets=(ROOFLINE_90, _cpu("max_time_ratio", 1.30, MOMENTUM_BASELINE)), baseline=MOMENTUM_BASELINE),
    Case("cnl_adam", "FusedCNLAdam, fp32 reference", "adam", "cnl", "float32", targets=(ROOFLINE_90,),
         baseline=ADAM_BASELINE),
    Case("cnl_rmsprop_fp32", "cnl_ext.CNL(torch.optim.RMSprop), fp32 reference (whole step)", "rmsprop",
         "cnl_wrapper", "float32", targets=(_cpu("max_time_ratio", 1.3, RMSPROP_BASELINE),),
         baseline=RMSPROP_BASELINE),
)
CASE_NAMES = tuple(case.name for case in CASES)
CNL_CASE_NAMES = tuple(case.name for case in CASES if case.implementation in CNL_IMPLEMENTATIONS)
VARIANT_SEPARATOR = "@"
CUDA_SUFFIX = VARIANT_SEPARATOR + "cuda"  # the C++/CUDA extension's variant on a GPU (issue 4)
NATIVE_BACKENDS = ("native", "cuda")  # "cuda" is the old name of the compiled extension's backend


def backend_variant(case: Case, backend: str) -> Case:
    """The same cnl_ext case run with ``backend``: ``NAME@BACKEND``.

    CPU targets carry over, compared with the same backend's variant of any cnl_ext case they name
    (track_stats against the same backend without it). GPU targets do not: the compiled
    extension's variant on a GPU has issue 4's target instead, within 1.15x of the Triton case.
    """
    suffix = VARIANT_SEPARATOR + backend

    def same_backend(target: Target) -> Target:
        return replace(target, against=target.against + suffix) if target.against in CNL_CASE_NAMES else target

    targets = tuple(same_backend(t) for t in case.targets if t.device_type != "cuda")
    if backend in NATIVE_BACKENDS:
        targets += (_gpu("max_time_ratio", 1.15, case.name, issue=4),)
    return replace(case, name=case.name + suffix, description=f'{case.description} (backend="{backend}")',
                   backend=backend, targets=targets)


def cuda_variant(case: Case) -> Case:
    """The same case on the C++/CUDA extension (``backend="cuda"``)."""
    return backend_variant(case, "cuda")


def default_backends(device: torch.device | None) -> list[str]:
    """Backends of the cnl_ext cases when none are given: on a GPU Triton, plus the compiled
    extension when it is usable here; on the CPU the PyTorch implementation side by side with the
    native kernels (whose cases are skipped, with the reason, while they are unavailable)."""
    if device is not None and device.type == "cuda":
        native = harness.native_backend_name()
        return ["triton"] + ([native] if not harness.backend_unavailable_reason(native, device) else [])
    return ["torch", "native"]


def select_cases(names=None, device: torch.device | None = None, backends=None) -> list[Case]:
    """The cases to run, in table order: ``names`` (default all); each cnl_ext case once per
    backend of ``backends`` after the first (``NAME@BACKEND``; default :func:`default_backends`).
    A ``NAME@BACKEND`` in ``names`` is taken as is. CUDA-graph cases are left out on a CPU ``device``."""
    names = list(CASE_NAMES) if names is None else list(names)
    backends = default_backends(device) if backends is None else list(backends)
    by_name = {case.name: case for case in CASES}
    split = [n.partition(VARIANT_SEPARATOR) for n in names]
    unknown = [n for n, (base, _, _) in zip(names, split) if base not in by_name]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; choose from {list(CASE_NAMES)} (or NAME{VARIANT_SEPARATOR}BACKEND)")
    not_cnl = [n for n, (base, sep, _) in zip(names, split) if sep and base not in CNL_CASE_NAMES]
    if not_cnl:
        raise ValueError(f"{not_cnl}: only cnl_ext cases take a backend ({list(CNL_CASE_NAMES)})")
    explicit = {(base, backend) for base, sep, backend in split if sep}
    on_gpu = device is not None and device.type == "cuda"
    selected = []
    for case in CASES:
        if case.cuda_graph and device is not None and not on_gpu:
            continue  # a CUDA graph needs a GPU
        if case.name in names:
            selected.append(case)
        if case.implementation in CNL_IMPLEMENTATIONS:
            extra = [b for b in backends[1:] if case.name in names]
            extra += [b for base, b in sorted(explicit) if base == case.name and b not in extra]
            selected += [backend_variant(case, b) for b in extra]
    return selected


def case_shapes(case: Case, shapes):
    return flat_shapes(shapes) if case.flat else shapes


def roofline_bytes(case: Case, shapes) -> int:
    """Bytes the step must move at least over ``shapes`` (module docstring)."""
    shapes = case_shapes(case, shapes)
    itemsize = torch.empty(0, dtype=case.param_dtype).element_size()
    state_scale = 2 if case.param_dtype == torch.float64 else 1  # fp64 parameters keep fp64 states
    total = total_numel(shapes) * (3 * itemsize + STATE_BYTES[case.optimizer] * state_scale)
    if case.importance is not None:
        total += total_numel(shapes) * IMPORTANCE_BYTES
    if case.rule == "ewc":
        total += total_numel(shapes) * (4 + itemsize)
    if case.reference is not None:
        reads = 2 if case.rule == "agem" else 1  # A-GEM: the reduction and the projecting step
        total += reads * REFERENCE_ITEMSIZE[case.reference] * sum(
            reference_format.storage_numel(math.prod(shape), case.reference) for _, shape in shapes)
    if case.rule in AGEM_RULES:
        total += total_numel(shapes) * itemsize  # the reduction reads g
    return total


class TensorPool:
    """Parameters (each with a gradient) and an fp32 reference, shared by the cases of a run.

    Building them costs more than a step on the CPU (``randn`` of 134.5M elements, three times),
    and repeated rounds would pay it for every case of every round; so the cases share them. They
    all step the same tensors in place at lr 1e-7, which barely moves them. Up to ``max_sets``
    shape tables and dtypes are held (the per-tensor, the flat and the bf16 sets of SmolLM2 take
    4.3 GB on the CPU); on a GPU one at a time by default (a Qwen2.5-1.5B set is 18.5 GB).
    """

    def __init__(self, device: torch.device, seed: int = 0, max_sets: int | None = None):
        self.device, self.seed = device, seed
        self.max_sets = max_sets or (1 if device.type == "cuda" else 3)
        self._sets: dict = {}  # (shapes, dtype) -> (params, references), least recently used first
        self.params, self.references = None, None

    def get(self, shapes, dtype: torch.dtype):
        """``(params, references)`` for ``shapes`` in ``dtype``; the references are fp32 and
        independent of the gradients, so about half of the elements conflict, like a real reference."""
        key = (tuple(shapes), dtype)
        if key in self._sets:
            self._sets[key] = self._sets.pop(key)  # most recently used last
        else:
            while len(self._sets) >= self.max_sets:
                self._sets.pop(next(iter(self._sets)))
                self.params = self.references = None
                harness.free_memory(self.device)
            generator = torch.Generator(self.device).manual_seed(self.seed)

            def randn(shape, dtype):
                return torch.randn(shape, generator=generator, device=self.device, dtype=dtype)

            params = [randn(shape, dtype).requires_grad_() for _, shape in shapes]
            for p in params:
                p.grad = randn(p.shape, dtype)
            self._sets[key] = (params, [randn(shape, torch.float32) for _, shape in shapes])
        self.params, self.references = self._sets[key]
        return self.params, self.references

    def nbytes(self, references: bool = False) -> int:
        """Bytes held for the parameters and gradients (and the references) last handed out."""
        tensors = [t for p in self.params for t in (p, p.grad)] + (self.references if references else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def clear(self) -> None:
        self._sets.clear()
        self.params, self.references = None, None
        harness.free_memory(self.device)


def _torch_optimizer(optimizer: str, params, **implementation):
    """torch.optim's optimizer of the family, with the benchmark's hyperparameters."""
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **implementation)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=LR, betas=BETAS, eps=EPS, **implementation)
    if optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=LR, eps=EPS, **implementation)
    momentum = MOMENTUM if optimizer == "momentum" else 0.0
    return torch.optim.SGD(params, lr=LR, momentum=momentum, **implementation)


_TORCH_IMPLEMENTATIONS = {"torch_fused": {"fused": True}, "torch_foreach": {"foreach": True}, "torch_default": {}}


def _cnl_optimizer(case: Case, params, backend: str):
    options = dict(backend=backend, reference_dtype=case.reference or "float32", track_stats=case.track_stats)
    if case.implementation == "cnl_wrapper":
        return cnl_ext.CNL(_torch_optimizer(case.optimizer, params), **options)
    options["importance"] = case.importance
    if case.rule in AGEM_RULES:
        options["rule"] = "agem"
    elif case.rule == "ewc":
        options["ewc_lambda"] = 1.0
    if case.optimizer in ("adam", "adamw"):
        options["capturable"] = case.cuda_graph
    if case.optimizer == "adamw":
        return cnl_ext.FusedCNLAdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **options)
    if case.optimizer == "adam":
        return cnl_ext.FusedCNLAdam(params, lr=LR, betas=BETAS, eps=EPS, **options)
    momentum = MOMENTUM if case.optimizer == "momentum" else 0.0
    return cnl_ext.FusedCNLSGD(params, lr=LR, momentum=momentum, **options)


def case_backend(case: Case, backend: str) -> str | None:
    """The cnl_ext backend the case runs with (``None`` for torch's and the authors' optimizers)."""
    return (case.backend or backend) if case.implementation in CNL_IMPLEMENTATIONS else None


def case_op(case: Case) -> str:
    """The op of the ops contract that the case's cnl_ext step runs (what its backend must support)."""
    if case.implementation == "cnl_wrapper":
        return "masked_delta_"
    return "adam_step_" if case.optimizer in ("adam", "adamw") else "sgd_step_"


def build_step(case: Case, shapes, device: torch.device, backend: str, pool: TensorPool | None = None
               ) -> Callable[[], None]:
    """Build the case's optimizer over the pool's parameters; return a closure taking one step.

    The closure owns the optimizer (states, encoded reference): dropping it frees them.
    """
    pool = pool or TensorPool(device)
    params, references = pool.get(case_shapes(case, shapes), case.param_dtype)

    if case.implementation in _TORCH_IMPLEMENTATIONS:
        return _torch_optimizer(case.optimizer, params, **_TORCH_IMPLEMENTATIONS[case.implementation]).step
    if case.implementation == "authors":
        opt = AuthorsCNL(params, case.optimizer, lr=LR, momentum=MOMENTUM, betas=BETAS, eps=EPS,
                         weight_decay=WEIGHT_DECAY)
        return lambda: opt.step(references)
    if case.implementation in CNL_IMPLEMENTATIONS:
        opt = _cnl_optimizer(case, params, case_backend(case, backend))
        if case.rule in AGEM_RULES:  # the sign of g·r, which decides whether A-GEM projects, as the case says
            dot = sum(torch.dot(p.grad.flatten().double(), r.flatten().double()) for p, r in zip(params, references))
            if (dot < 0) != (case.rule == "agem"):
                references = [-r for r in references]
        if case.reference is not None:
            opt.set_reference(references)  # copied into the optimizer's own format
        if case.rule == "ewc":  # what capture_fisher() sets: F (fp32, ≥ 0) and θ*, near the parameters
            for p, r in zip(params, references):
                opt.state[p].update(ewc_fisher=r.abs(), ewc_anchor=p.detach().clone())
        return _graph_replay(opt, device) if case.cuda_graph else opt.step
    raise ValueError(f"unknown implementation {case.implementation!r}")


def _graph_replay(opt, device: torch.device) -> Callable[[], None]:
    """``opt.step`` captured in a CUDA graph after a warm-up on a side stream (which compiles the
    kernels and builds their tables, as capture forbids host-to-device copies); its replay."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            opt.step()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()

    def replay():
        graph.replay()
        return opt  # referenced here so the tensors the graph writes live as long as the step

    return replay


def time_case(case: Case, shapes, device: torch.device, backend: str, warmup: int, iters: int,
              pool: TensorPool, timer=None) -> tuple[list[float], int | None]:
    """Build, time and free one case: ``(ms of each timed step, peak memory bytes or None)``.

    ``timer(step) -> list of ms`` replaces :func:`harness.time_steps` (pytest-benchmark does so).
    Peak memory (GPU only) is the case's whole footprint: its parameters and gradients (and the
    authors' fp32 reference, which their loop reads as given) plus everything the case allocates
    (lazily created states, encoded reference, step scratch), without the pool's fp32 reference
    the fused optimizers copy from.
    """
    harness.free_memory(device)
    before = harness.allocated(device)
    step = build_step(case, shapes, device, backend, pool)
    with harness.peak_memory(device, baseline=before) as peak:
        times = timer(step) if timer else harness.time_steps(step, device, warmup, iters)
    del step
    harness.free_memory(device)
    footprint = None
    if peak["bytes"] is not None:
        footprint = peak["bytes"] + pool.nbytes(references=case.implementation == "authors")
    return times, footprint


def make_row(case: Case, shapes, backend: str, times, roofline_bandwidth: float, round_medians=None,
             peak_memory_bytes=None) -> dict:
    """One case's result row: times in ms, bandwidths in GB/s, memory in bytes.

    ``times``: every timed step; ``round_medians``: the median of each round (the spread).
    """
    nbytes = roofline_bytes(case, shapes)
    ms = harness.median(times)
    roofline_ms = nbytes / roofline_bandwidth * 1e3
    run_shapes = case_shapes(case, shapes)
    round_medians = list(round_medians) if round_medians else [ms]
    q1, _, q3 = harness.quartiles(times)
    return {
        "case": case.name,
        "description": case.description,
        "backend": case_backend(case, backend),
        "baseline": case.baseline,
        "tensors": len(run_shapes),
        "numel": total_numel(run_shapes),
        "ms": ms,
        "times_ms": list(times),
        "round_medians_ms": round_medians,
        "spread_ms": [min(round_medians), max(round_medians)],
        "iqr_ms": [q1, q3],
        "roofline_bytes": nbytes,
        "bytes_per_element": nbytes / total_numel(run_shapes),
        "roofline_ms": roofline_ms,
        "gb_per_s": nbytes / (ms * 1e-3) / 1e9,
        "fraction_of_roofline": roofline_ms / ms,
        "peak_memory_bytes": peak_memory_bytes,
    }


def run_case(case: Case, shapes, device: torch.device, backend: str, warmup: int, iters: int,
             roofline_bandwidth: float, timer=None, pool: TensorPool | None = None) -> dict:
    """Build, time and free one case (one round); return its result row."""
    times, peak = time_case(case, shapes, device, backend, warmup, iters, pool or TensorPool(device), timer)
    return make_row(case, shapes, backend, times, roofline_bandwidth, peak_memory_bytes=peak)


def add_comparisons(rows: list[dict], cases: list[Case], param_set: str, device_type: str = "cuda") -> None:
    """Fill in each row's ratio to its baseline and its targets' outcomes, in place."""
    by_name = {row["case"]: row for row in rows}
    for row, case in zip(rows, cases):
        baseline = by_name.get(case.baseline)
        row["ratio_to_baseline"] = row["ms"] / baseline["ms"] if baseline else None
        row["targets"] = []
        for target in case.targets:
            if not target.applies_to(param_set, device_type, row["backend"]):
                continue
            measured, passed = target.evaluate(row, by_name)
            row["targets"].append({"target": target.describe(), "issue": target.issue, "measured": measured,
                                   "passed": passed})
