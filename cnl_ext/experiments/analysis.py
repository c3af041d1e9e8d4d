"""The paper's analyses: Table 1 (Sim / Dissim forgetting) and Table 2 (collaborative vs conflicting).

Table 2 is measured with the package's own fused kernels: a ``FusedCNLSGD`` with ``lr=0`` and
statistics on, the reference set to ∇L_M and ``.grad`` to ∇L_I, so one ``step()`` counts the
elements with ``s = r·u ≥ 0`` and sums ``s`` per group while leaving the weights unchanged.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

import cnl_ext

from .progress import bar
from .model import MCQEncoder, backward_mean_loss, per_question_losses
from .protocol import InjectConfig, compare

__all__ = ["GradientAgreement", "gradient_agreement", "SimDissim", "sim_dissim_groups", "table1"]


@dataclass
class GradientAgreement:
    """Table 2: over all trainable elements, u = ∇L_I against r = ∇L_M (s = r·u)."""

    total: int
    collaborative: int
    conflicting: int
    collaborative_share: float
    conflicting_share: float
    sum_s_collaborative: float
    sum_s_conflicting: float

    def to_dict(self) -> dict:
        return asdict(self)


def gradient_agreement(model, encoder: MCQEncoder, mastered, injection, *, batch_size: int = 16,
                       backend: str = "auto") -> GradientAgreement:
    """Table 2 for one model and one split, measured by the fused CNL kernels (see module doc)."""
    params = [p for p in model.parameters() if p.requires_grad]
    probe = cnl_ext.FusedCNLSGD(params, lr=0.0, track_stats=True, backend=backend)
    saved = [p.grad for p in params]
    try:
        with probe.capture_reference() as ref:
            backward_mean_loss(model, encoder, mastered, batch_size=batch_size, backward=ref.backward,
                               mean_over_calls=True, desc="∇L_M")
        probe.zero_grad(set_to_none=True)
        backward_mean_loss(model, encoder, injection, batch_size=batch_size, desc="∇L_I")
        probe.step()
        stats = probe.cnl_stats()
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    return GradientAgreement(
        total=stats.total, collaborative=stats.collaborative, conflicting=stats.conflicting,
        collaborative_share=stats.collaborative_share, conflicting_share=1.0 - stats.collaborative_share,
        sum_s_collaborative=stats.sum_s_collaborative, sum_s_conflicting=stats.sum_s_conflicting)


@dataclass
class SimDissim:
    """Mastered questions whose gradient opposes the mean injection gradient, ranked by |g_m·g_I|."""

    sim: list  # indices into mastered: the top third by magnitude
    dissim: list  # the bottom third
    dots: list  # g_m · g_I for every mastered question


def sim_dissim_groups(model, encoder: MCQEncoder, mastered, injection, *, batch_size: int = 16) -> SimDissim:
    """Per-sample gradient dot products against the mean injection gradient (one backward each)."""
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        backward_mean_loss(model, encoder, injection, batch_size=batch_size, desc="∇L_I")
        injection_grad = [p.grad.detach().clone() if p.grad is not None else None for p in params]
        dots = []
        for question in bar(mastered, desc="per-sample g_m·g_I", unit="question"):
            for p in params:
                p.grad = None
            per_question_losses(model, encoder, [question]).sum().backward()
            dots.append(sum(torch.dot(p.grad.flatten().double(), g.flatten().double()).item()
                            for p, g in zip(params, injection_grad) if p.grad is not None and g is not None))
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    negative = sorted((i for i, d in enumerate(dots) if d < 0), key=lambda i: -abs(dots[i]))
    third = len(negative) // 3
    return SimDissim(sim=sorted(negative[:third]), dissim=sorted(negative[len(negative) - third:]), dots=dots)


def table1(model, encoder: MCQEncoder, mastered, injection, *, config: InjectConfig, checkpoints=None):
    """Table 1: train FT on the injection set; forgetting within the Sim and the Dissim groups.

    Returns ``(groups, run, rows)`` with ``rows = [{"group", "size", "forgot"}]`` after the last epoch.
    """
    groups = sim_dissim_groups(model, encoder, mastered, injection, batch_size=config.reference_batch_size)
    (run,) = compare(model, encoder, methods=["ft"], optimizers=[config.optimizer], config=config,
                     train=injection, reference=mastered, checkpoints=checkpoints)
    forgot = set(run.final.forgot_ids)
    rows = [dict(group=name, size=len(ids), forgot=len(forgot.intersection(ids)))
            for name, ids in (("Sim", groups.sim), ("Dissim", groups.dissim))]
    return groups, run, rows


