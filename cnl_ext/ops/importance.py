"""KIF's per-element importance EMAs in plain PyTorch: the definition every backend is checked against.

The ops contract's importance extension (issue 15): after a step, for each element, with ``w`` the
new parameter as stored (rounded to the parameter dtype, then float32) and ``g`` the gradient as
passed to the step (no ``maximize`` sign flip, no weight decay)::

    x = w * g
    I = |x|                    kind="first"      (KIF Eq 8)
    I = |x - 0.5 * x * x|      kind="param_mix"  (the authors' "second-order" metric, spec §1.2)
    S <- b1 * S + (1 - b1) * I                    (sensitivity EMA, Eq 10)
    U <- b2 * U + (1 - b2) * |I - S|              (uncertainty EMA, Eq 11: uses the new S)

Every product and sum is a separate float32 operation (no FMA): a fused kernel must round exactly
like this. The element importance is ``S * U`` (Eq 12), taken when it is needed
(:func:`cnl_ext.kif.importance_scores`). The update runs chunk by chunk (:mod:`.chunking`).
"""
from __future__ import annotations

import torch

from .chunking import chunks

__all__ = ["IMPORTANCE_KINDS", "check_importance_options", "importance_update_"]

IMPORTANCE_KINDS = ("first", "param_mix")


def check_importance_options(kind: str, betas) -> tuple[float, float]:
    """``(b1, b2)`` as floats, or a ValueError naming the bad option."""
    if kind not in IMPORTANCE_KINDS:
        raise ValueError(f"importance kind must be one of {IMPORTANCE_KINDS}, got {kind!r}")
    try:
        b1, b2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(f"importance_betas must be two numbers, got {betas!r}") from None
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"importance_betas must lie in [0, 1), got {betas!r}")
    return b1, b2


@torch.no_grad()
def importance_update_(params_after, grads, sensitivities, uncertainties, *, kind: str, betas) -> None:
    """Update the sensitivity (``S``) and uncertainty (``U``) EMAs in place, one entry per param.

    ``params_after``: the parameters after the step (any float dtype); ``grads``: the gradients the
    step used, same shapes; ``sensitivities``, ``uncertainties``: contiguous float32 tensors shaped
    like the params. Only ``sensitivities`` and ``uncertainties`` are written.
    """
    b1, b2 = check_importance_options(kind, betas)
    params_after, grads = [p.contiguous() for p in params_after], [g.contiguous() for g in grads]
    sensitivities, uncertainties = list(sensitivities), list(uncertainties)
    if not len(params_after) == len(grads) == len(sensitivities) == len(uncertainties):
        raise ValueError(f"importance_update_: {len(params_after)} params, {len(grads)} grads, "
                         f"{len(sensitivities)} sensitivities and {len(uncertainties)} uncertainties")
    if not all(t.is_contiguous() for t in sensitivities + uncertainties):
        raise ValueError("importance_update_: the sensitivities and uncertainties must be contiguous")
    if not params_after:
        return
    for chunk in chunks(params_after):
        w, g = chunk.read(params_after), chunk.read(grads)
        s, u, t = chunk.read(sensitivities), chunk.read(uncertainties), chunk.scratch()
        x = torch.mul(w, g, out=chunk.scratch())
        if kind == "first":
            importance = x.abs_()
        else:
            importance = x.sub_(torch.mul(x, x, out=t).mul_(0.5)).abs_()
        s.mul_(b1).add_(torch.mul(importance, 1.0 - b1, out=t))
        deviation = importance.sub_(s).abs_()
        u.mul_(b2).add_(deviation.mul_(1.0 - b2))
        chunk.write(sensitivities, s)
        chunk.write(uncertainties, u)
