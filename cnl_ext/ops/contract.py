"""The ops contract as data: each op declared once (:class:`OpSpec`), each backend's capabilities on a
device as a :class:`Capabilities` value.

:mod:`cnl_ext.planning` builds every op call from its :class:`OpSpec` (which lists it writes, hence
copies back; the argument order), the docs of :mod:`cnl_ext.ops` describe the same declarations, and
the C++ schemas (``csrc/cnl_binding.h``) are checked against them by the tests. A backend module
exposes ``capabilities(device) -> Capabilities``: what it runs there, and with which options.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["OpSpec", "Capabilities", "SGD_STEP", "ADAM_STEP", "MASKED_DELTA", "AGEM_DOT", "KIF_TASK_VECTOR_FUSE",
           "KIF_RECURRENT_FUSE", "STEP_OPS", "FUSION_OPS", "REDUCTION_OPS", "OPS", "IMPORTANCE_KEYWORDS",
           "RULE_KEYWORDS", "NOTHING"]


@dataclass(frozen=True)
class OpSpec:
    """One op of the contract: ``name(*tensor_lists, *arguments, **keywords)``, in place.

    ``tensor_lists``: the lists of one tensor per parameter, in argument order (``params`` first);
    ``written``: those the op writes (the others it only reads); ``arguments``: the positional
    arguments after the lists; ``keywords``: the keyword-only options. A step op (``step``) also
    takes :data:`IMPORTANCE_KEYWORDS` where the backend's :class:`Capabilities` say ``importance``, and
    :data:`RULE_KEYWORDS` (every backend). A ``reduction`` writes none of its lists, only its ``out``.
    """

    name: str
    tensor_lists: tuple
    written: frozenset
    arguments: tuple = ()
    keywords: tuple = ()
    step: bool = False
    reduction: bool = False

    def __str__(self) -> str:
        return self.name


# KIF's EMAs updated in a step's pass (cnl_ext.ops.importance defines them).
IMPORTANCE_KEYWORDS = ("importance", "importance_kind", "importance_betas")
# Issue 22 (cnl_ext.ops.rules defines them): ``ewc`` None or (fishers, anchors) with ``ewc_lambda``: the
# gradient gets EWC's penalty 2λ·F·(θ−θ*); ``agem_coefficient`` None (the references mask the update,
# CNL) or c (a number or 0-d tensor: the references project the gradient, g − c·r, and mask nothing).
# Every backend's step ops take them and apply them in the step's own pass.
RULE_KEYWORDS = ("ewc", "ewc_lambda", "agem_coefficient")

SGD_STEP = OpSpec(
    "sgd_step_", ("params", "grads", "momentum_buffers", "references"), frozenset({"params", "momentum_buffers"}),
    arguments=("stats",),
    keywords=("reference_format", "lr", "weight_decay", "momentum", "dampening", "nesterov", "maximize",
              "first_step"),
    step=True)
ADAM_STEP = OpSpec(
    "adam_step_", ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "references"),
    frozenset({"params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"}),
    arguments=("stats",),
    keywords=("reference_format", "lr", "beta1", "beta2", "eps", "weight_decay", "decoupled_weight_decay", "amsgrad",
              "maximize", "bias_correction1", "bias_correction2", "device_steps"),
    step=True)
MASKED_DELTA = OpSpec(
    "masked_delta_", ("params", "befores", "references"), frozenset({"params"}), arguments=("stats",),
    keywords=("reference_format", "inv_lr"))
# A-GEM's reduction: out[i] += Σ g_i·r_i (products in the compute dtype, sums in float64, deterministic order).
AGEM_DOT = OpSpec("agem_dot_", ("grads", "references"), frozenset(), arguments=("out",),
                  keywords=("reference_format",), reduction=True)
KIF_TASK_VECTOR_FUSE = OpSpec(
    "kif_task_vector_fuse_", ("params", "anchors"), frozenset({"params"}), arguments=("coefficients", "unit_maps"))
KIF_RECURRENT_FUSE = OpSpec(
    "kif_recurrent_fuse_", ("params", "anchors", "inner_ends", "inner_sensitivities", "inner_uncertainties",
                            "outer_sensitivities", "outer_uncertainties"),
    frozenset({"params", "anchors"}), keywords=("delta_in", "delta_out", "rule", "update_anchors"))

STEP_OPS = (SGD_STEP, ADAM_STEP, MASKED_DELTA)
FUSION_OPS = (KIF_TASK_VECTOR_FUSE, KIF_RECURRENT_FUSE)
REDUCTION_OPS = (AGEM_DOT,)
OPS = {op.name: op for op in STEP_OPS + FUSION_OPS + REDUCTION_OPS}


@dataclass(frozen=True)
class Capabilities:
    """What one backend runs for tensors on one device.

    ``ops``: the names of the ops it runs there; ``float64``: the steps take float64 parameters
    (computed in float64, with float64 states); ``capturable``: a tensor ``lr`` and ``device_steps``
    (CUDA graphs); ``importance``: the steps take :data:`IMPORTANCE_KEYWORDS` (KIF's EMAs in the same
    pass); ``importance_with_rules``: with ``importance`` and :data:`RULE_KEYWORDS` terms (which
    every backend's steps apply in their own pass), whether a call with both updates the EMAs in that same pass (else
    right after it, :func:`cnl_ext.ops.importance.importance_update_`; the same values); ``reason``:
    why an op is missing, for error messages (``""``: the generic one).
    """

    ops: frozenset = frozenset()
    float64: bool = False
    capturable: bool = False
    importance: bool = False
    importance_with_rules: bool = True
    reason: str = ""

    def runs(self, op) -> bool:
        """Whether ``op`` (an :class:`OpSpec` or its name) runs."""
        return str(op) in self.ops


NOTHING = Capabilities()
