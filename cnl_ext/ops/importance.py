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
(:func:`cnl_ext.kif.importance_scores`).
"""
from __future__ import annotations

import torch

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
    step used, same shapes; ``sensitivities``, ``uncertainties``: float32 tensors shaped like the
    params. Only ``sensitivities`` and ``uncertainties`` are written.
    """
    b1, b2 = check_importance_options(kind, betas)
    params_after, grads = list(params_after), list(grads)
    sensitivities, uncertainties = list(sensitivities), list(uncertainties)
    if not len(params_after) == len(grads) == len(sensitivities) == len(uncertainties):
        raise ValueError(f"importance_update_: {len(params_after)} params, {len(grads)} grads, "
                         f"{len(sensitivities)} sensitivities and {len(uncertainties)} uncertainties")
    if not params_after:
        return
    small = [i for i, p in enumerate(params_after) if p.numel() <= CHUNK]
    large = [i for i, p in enumerate(params_after) if p.numel() > CHUNK]
    if small:
        _update_foreach([params_after[i] for i in small], [grads[i] for i in small], [sensitivities[i] for i in small],
                        [uncertainties[i] for i in small], kind, b1, b2)
    if large:
        _update_chunked([params_after[i] for i in large], [grads[i] for i in large], [sensitivities[i] for i in large],
                        [uncertainties[i] for i in large], kind, b1, b2)


CHUNK = 1 << 18  # large tensors go through in chunks of this many elements, with reused buffers


def _update_foreach(params_after, grads, sensitivities, uncertainties, kind, b1, b2):
    """Many small tensors: a few multi-tensor (foreach) operations."""
    w = [p.to(torch.float32) for p in params_after]
    g = [grad.to(torch.float32) for grad in grads]
    x = torch._foreach_mul(w, g)
    if kind == "first":
        importance = torch._foreach_abs(x)
    else:
        half_square = torch._foreach_mul(torch._foreach_mul(x, x), 0.5)
        importance = torch._foreach_abs(torch._foreach_sub(x, half_square))
    torch._foreach_mul_(sensitivities, b1)
    torch._foreach_add_(sensitivities, torch._foreach_mul(importance, 1.0 - b1))
    deviation = torch._foreach_abs(torch._foreach_sub(importance, sensitivities))
    torch._foreach_mul_(uncertainties, b2)
    torch._foreach_add_(uncertainties, torch._foreach_mul(deviation, 1.0 - b2))


def _update_chunked(params_after, grads, sensitivities, uncertainties, kind, b1, b2):
    """Large tensors: chunk by chunk, the same operations in the same order, the temporaries in cache."""
    device = params_after[0].device
    w_buf, g_buf, x_buf, t_buf = (torch.empty(CHUNK, dtype=torch.float32, device=device) for _ in range(4))
    for p, grad, s_all, u_all in zip(params_after, grads, sensitivities, uncertainties):
        p, grad = p.reshape(-1), grad.reshape(-1)
        s_flat, u_flat = s_all.view(-1), u_all.view(-1)
        for start in range(0, p.numel(), CHUNK):
            end = min(start + CHUNK, p.numel())
            n = end - start
            w = p[start:end] if p.dtype == torch.float32 else w_buf[:n].copy_(p[start:end])
            g = grad[start:end] if grad.dtype == torch.float32 else g_buf[:n].copy_(grad[start:end])
            importance = torch.mul(w, g, out=x_buf[:n])
            if kind == "param_mix":
                importance.sub_(torch.mul(importance, importance, out=t_buf[:n]).mul_(0.5))
            importance.abs_()
            s, u, t = s_flat[start:end], u_flat[start:end], t_buf[:n]
            s.mul_(b1).add_(torch.mul(importance, 1.0 - b1, out=t))
            deviation = importance.sub_(s).abs_()
            u.mul_(b2).add_(deviation.mul_(1.0 - b2))
