"""Knowledge-preserving LoRA adapters built from the memory: KORE's null-space constraint and CorDA's
knowledge-preserved mode, on PEFT's LoRA layers at the rank and α of the ``lora`` method.

* **KORE** (Jiang et al. 2025, "KORE: Enhancing Knowledge Injection for Large Multimodal Models via
  Knowledge-Oriented Augmentations and Constraints"; the constraint follows LoRA-Null): for each
  adapted linear layer with weight W (m×n), C = Σ XᵀX over its inputs on the memory questions (each
  forward's inputs scaled by their largest magnitude); U (n×r) = the eigenvectors of C with the r
  smallest eigenvalues; W_p = W·U·Uᵀ; the base weight becomes W − W_p and W_p is factored by SVD
  into the adapter, W_p = U_s S Vᵀ: lora_B (m×r) = U_s·√(S/s), lora_A (r×n) = √(S/s)·Vᵀ with s = α/r
  PEFT's scaling, so the layer's output is unchanged at init. Only lora_B trains (their "v2"): the
  rows of the frozen lora_A lie in the near-null space of the memory's inputs, so an update of
  lora_B hardly moves the memory's outputs. Built here on top of PEFT's LoRA layers.
* **CorDA** (Yang et al., NeurIPS 2024, "CorDA: Context-Oriented Decomposition Adaptation of Large
  Language Models for Task-Aware Parameter-Efficient Fine-tuning"; code github.com/iboing/CorDA),
  knowledge-preserved mode (``kpm``): PEFT's own implementation (``init_lora_weights="corda"``,
  ``CordaConfig(corda_method="kpm")``, ``preprocess_corda``) with the memory questions as its
  covariance data. Both adapter matrices train.

:func:`knowledge_adapters` wraps a model with either adapter and, on exit, merges the adapter into
the weights (``merge_and_unload``): the model then holds the trained weights. It reports how much
the model's outputs moved at initialisation and how many parameters train.
"""
from __future__ import annotations

import contextlib

import torch

from .model import LORA_TARGETS, MCQEncoder, lora_adapters
from .progress import note

__all__ = ["ADAPTER_METHODS", "LORA_METHODS", "adapted_model", "knowledge_adapters", "input_covariances", "kore_init_", "memory_forward"]

ADAPTER_METHODS = ("kore", "corda")
LORA_METHODS = ("lora", *ADAPTER_METHODS)  # methods that train adapters, not the model's weights
PROBE_QUESTIONS = 8  # memory questions whose logits are compared before and after the adapter's init


def _targets(model) -> list:
    targets = [t for t in LORA_TARGETS if any(name.endswith(t) for name, _ in model.named_modules())]
    if not targets:
        raise ValueError(f"no attention projections named {LORA_TARGETS} in {type(model).__name__}")
    return targets


@torch.no_grad()
def memory_forward(model, encoder: MCQEncoder, questions) -> None:
    """One forward pass per question (no padding: every token is the question's own; CorDA's hook
    also takes one sequence per call)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for question in questions:
        encoder.next_token_logits(model, encoder.encode([question], device))
    model.train(was_training)


@torch.no_grad()
def input_covariances(model, encoder: MCQEncoder, questions, names) -> dict:
    """``{module name: Σ XᵀX}`` (float64, n×n) of the named linear modules' inputs over ``questions``,
    each forward's inputs divided by their largest magnitude (KORE / LoRA-Null's scaling)."""
    modules = dict(model.named_modules())
    sums = {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            x = x / x.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
            sums[name] = sums.get(name, 0) + x.T @ x
        return record

    handles = [modules[name].register_forward_hook(hook(name)) for name in names]
    try:
        memory_forward(model, encoder, questions)
    finally:
        for handle in handles:
            handle.remove()
    return sums


@torch.no_grad()
def kore_init_(layer, covariance: torch.Tensor, adapter: str = "default") -> None:
    """Overwrite one PEFT LoRA layer (already at rank r) with KORE's init; freezes its lora_A."""
    base, lora_a, lora_b = layer.get_base_layer(), layer.lora_A[adapter], layer.lora_B[adapter]
    scaling, r = layer.scaling[adapter], lora_a.weight.shape[0]
    weight = base.weight.to(torch.float64)
    _, vectors = torch.linalg.eigh(covariance.to(torch.float64))  # eigenvalues ascending
    null = vectors[:, :r]  # U: the r directions the memory's inputs use least
    # W_p = W U Uᵀ has rank ≤ r: its SVD is (W U)'s, an m×r matrix, W U = U_s S Q ᵀ, so W_p = U_s S (U Q)ᵀ
    # with U Q orthonormal: the same factors as the SVD of the m×n W_p, at a fraction of the cost
    u_s, s, q_t = torch.linalg.svd(weight @ null, full_matrices=False)
    root = (s / scaling).sqrt()
    b = u_s * root  # m×r: trained
    a = root[:, None] * (null @ q_t.T).T  # r×n (Vᵀ = (U Q)ᵀ): frozen
    lora_b.weight.copy_(b.to(lora_b.weight.dtype))
    lora_a.weight.copy_(a.to(lora_a.weight.dtype))
    # the base keeps exactly what the adapter (as stored) does not give back
    delta = scaling * lora_b.weight.to(torch.float64) @ lora_a.weight.to(torch.float64)
    base.weight.copy_((weight - delta).to(base.weight.dtype))
    lora_a.weight.requires_grad_(False)


def _probe_logits(model, encoder, questions):
    device = next(model.parameters()).device
    with torch.no_grad():
        return encoder.next_token_logits(model, encoder.encode(questions, device))


def _wrap_kore(model, encoder, memory, targets, r, alpha):
    from peft import LoraConfig, get_peft_model  # late: peft takes seconds to import (see model.py)
    from peft.tuners.lora import LoraLayer

    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and any(name.endswith(t) for t in targets)]
    covariances = input_covariances(model, encoder, memory, names)
    wrapped = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets))
    for name, module in wrapped.named_modules():
        if isinstance(module, LoraLayer):
            plain = name.split("base_model.model.", 1)[-1]
            kore_init_(module, covariances[plain])
    return wrapped


def _wrap_plain(model, encoder, memory, targets, r, alpha):
    from peft import LoraConfig, get_peft_model  # late: see _wrap_kore

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets))


def _wrap_corda(model, encoder, memory, targets, r, alpha):
    from peft import LoraConfig, get_peft_model  # late: see _wrap_kore
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                        init_lora_weights="corda", corda_config=CordaConfig(corda_method="kpm"))
    preprocess_corda(model, config, run_model=lambda: memory_forward(model, encoder, memory))
    return get_peft_model(model, config)


@contextlib.contextmanager
def knowledge_adapters(method: str, model, encoder: MCQEncoder, memory, *, r: int, alpha: int,
                       plain_without_memory: bool = False):
    """``(wrapped model, info)``: ``model`` with KORE's or CorDA's adapters built from ``memory``; on exit
    the adapters are merged into the weights and removed.

    ``info``: the method, rank, α, memory size, ``init_max_abs_dlogits`` (the largest change of any
    next-token logit over up to 8 memory questions, from wrapping: ~0), ``trainable_params`` and
    ``lora_params`` (all adapter elements, trained or frozen). ``plain_without_memory``: with no
    memory (a continual sequence's first task) a plain LoRA adapter (PEFT's init) instead of an error.
    """
    if method not in ADAPTER_METHODS:
        raise ValueError(f"method must be one of {ADAPTER_METHODS}, got {method!r}")
    memory = list(memory)
    if not memory and not plain_without_memory:
        raise ValueError(f"{method} needs memory questions (the mastered set) to build its adapters from")
    targets = _targets(model)
    for p in model.parameters():
        p.requires_grad_(False)
    probe = memory[:PROBE_QUESTIONS]
    before = _probe_logits(model, encoder, probe) if probe else None
    build = _wrap_plain if not memory else _wrap_kore if method == "kore" else _wrap_corda
    wrapped = build(model, encoder, memory, targets, r, alpha)
    try:
        change = (_probe_logits(wrapped, encoder, probe) - before).abs().max().item() if probe else None
        info = dict(method=method if memory else "lora", r=r, alpha=alpha, memory=len(memory),
                    init_max_abs_dlogits=change,
                    trainable_params=sum(p.numel() for p in wrapped.parameters() if p.requires_grad),
                    lora_params=sum(p.numel() for n, p in wrapped.named_parameters() if ".lora_" in n))
        yield wrapped, info
    finally:
        wrapped.merge_and_unload()


@contextlib.contextmanager
def adapted_model(method: str, model, encoder: MCQEncoder, memory, *, r: int, alpha: int):
    """``(the model a method trains, adapter info or None)``: LoRA (``lora``), KORE / CorDA built from
    ``memory``, or the model itself (the full-parameter methods)."""
    if method == "lora":
        with lora_adapters(model, r=r, alpha=alpha) as wrapped:
            yield wrapped, None
    elif method in ADAPTER_METHODS:
        with knowledge_adapters(method, model, encoder, memory, r=r, alpha=alpha) as (wrapped, info):
            note(f"{method}: adapters (r {r}, α {alpha}) from {info['memory']} memory questions, "
                 f"{info['trainable_params']:,} trained parameters, outputs changed by at most "
                 f"{info['init_max_abs_dlogits']:.2g} at init")
            yield wrapped, info
    else:
        yield model, None
