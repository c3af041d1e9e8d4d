"""The authors' CNL update loops, re-written as an independent oracle (spec; their sft_*.py).

Per parameter, unfused, in plain tensor ops, exactly as the authors' training scripts do it: the
mask is the float product ``(u * r).ge(0)`` and the moments are updated for every element. Used by
the tests (the fused optimizers must agree step by step) and by ``bench/`` (the baseline to beat).
"""
from __future__ import annotations

import torch


class AuthorsCNL:
    """One of the authors' optimizers: ``"sgd"``, ``"momentum"``, ``"adam"`` or ``"adamw"``.

    ``step(references)`` updates ``params`` in place from their ``.grad``; ``references`` is a list
    aligned with ``params`` (an entry may be ``None``: that parameter is not masked) or ``None``.
    """

    def __init__(self, params, optimizer, lr, momentum=0.9, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1):
        if optimizer not in ("sgd", "momentum", "adam", "adamw"):
            raise ValueError(f"unknown optimizer {optimizer!r}")
        self.params = list(params)
        self.optimizer = optimizer
        self.lr, self.momentum, self.eps, self.weight_decay = lr, momentum, eps, weight_decay
        self.beta1, self.beta2 = betas
        self.velocity = [torch.zeros_like(p) for p in self.params] if optimizer == "momentum" else None
        if optimizer in ("adam", "adamw"):
            self.m = [torch.zeros_like(p) for p in self.params]
            self.v = [torch.zeros_like(p) for p in self.params]
            self.t = [0] * len(self.params)

    def _direction(self, i, p, g):
        if self.optimizer == "sgd":
            return g
        if self.optimizer == "momentum":
            self.velocity[i].mul_(self.momentum).add_(g)
            return self.velocity[i]
        self.t[i] += 1
        t = self.t[i]
        m, v = self.m[i], self.v[i]
        m.mul_(self.beta1).add_(g, alpha=1 - self.beta1)
        v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        m_hat = m / (1 - self.beta1**t)
        v_hat = v / (1 - self.beta2**t)
        u = m_hat / (v_hat.sqrt().add_(self.eps))
        if self.optimizer == "adamw":
            u = u + self.weight_decay * p
        return u

    @torch.no_grad()
    def step(self, references=None):
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            u = self._direction(i, p, p.grad)
            r = None if references is None else references[i]
            if r is not None:
                mask = (u * r).ge(0)
                p.add_(u * mask, alpha=-self.lr)
            else:
                p.add_(u, alpha=-self.lr)
