"""The optimizer-side comparison methods, EWC and A-GEM, as the experiments use them: through the
optimizers' public API only (``rule="agem"``, ``ewc_lambda`` / ``ewc_decay``, ``capture_reference()``,
``capture_fisher()``, ``state_dict()``); their math is in ``cnl_ext/optim/_rules.py``.

* **A-GEM** (Chaudhry et al., "Efficient Lifelong Learning with A-GEM", ICLR 2019; code
  github.com/facebookresearch/agem): the optimizer with ``rule="agem"``; its reference is captured
  exactly as CNL's (the mean gradient over the memory, recomputed every epoch or every
  ``--reference-every`` steps); each step projects the gradient so that it does not raise the
  memory's loss to first order, then takes the plain update.
* **EWC** (Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017;
  online variant: Schwarz et al., "Progress & Compress", ICML 2018): the optimizer with
  ``ewc_lambda=λ``; the diagonal empirical Fisher F over the memory (one squared gradient per
  question) and the anchor θ* are captured with ``capture_fisher()``; each step adds
  ``2λ·F⊙(θ − θ*)`` to the gradient. In the paper's protocol F is captured once, before training;
  in the continual protocol after every task over that task's memory, ``F ← γ·F + F_task`` and θ*
  the weights after the task (online EWC, ``ewc_decay`` γ), carried into the next task's fresh
  optimizer.
"""
from __future__ import annotations

from .model import MCQEncoder, per_question_losses
from .progress import bar

__all__ = ["RULE_METHODS", "REFERENCE_METHODS", "DEFAULT_EWC_LAMBDA", "DEFAULT_EWC_DECAY", "optimizer_options",
           "capture_fisher", "carry_ewc"]

RULE_METHODS = ("ewc", "agem")
REFERENCE_METHODS = ("cnl", "agem")  # methods whose optimizer keeps the mean gradient over the memory
EWC_STATES = ("ewc_fisher", "ewc_anchor")  # the optimizers' per-parameter EWC states (state_dict keys)
# λ: the empirical Fisher of SmolLM2-135M's letter loss (6 ARC-C questions, one squared gradient each,
# float32, measured on this project's CPU machine) is 4.5e-5 per element on average (median 8e-7, largest
# 477). With λ = 1e3 an element drifted by 1e-3 from θ* is pulled back by 2λ·F·1e-3: about 1e-4 on an
# average element (its loss gradient is of the order of √F ≈ 7e-3), about 2 where F ≈ 1; and plain SGD at
# the paper's lr 1e-7 stays stable on the stiffest element (lr·2λ·F_max ≈ 0.1 < 2).
DEFAULT_EWC_LAMBDA = 1e3
DEFAULT_EWC_DECAY = 0.9  # online EWC's γ in the continual protocol (the paper's protocol captures F once)


def optimizer_options(method: str, *, ewc_lambda: float, ewc_decay: float = 1.0) -> dict:
    """What ``method`` adds to the optimizer's construction (``make_optimizer``'s extras)."""
    if method == "agem":
        return dict(rule="agem")
    if method == "ewc":
        return dict(ewc_lambda=ewc_lambda, ewc_decay=ewc_decay)
    return {}


def capture_fisher(optimizer, model, encoder: MCQEncoder, questions, *, desc: str = "fisher") -> None:
    """The optimizer's EWC Fisher estimate over ``questions`` (one ``f.backward`` per question: the
    empirical Fisher's squared per-question gradients) and its anchor θ* = the current weights."""
    questions = list(questions)
    if not questions:
        raise ValueError("EWC needs memory questions to estimate the Fisher information over")
    with optimizer.capture_fisher() as fisher:
        for question in bar(questions, desc=desc, unit="question"):
            fisher.backward(per_question_losses(model, encoder, [question]).sum())


def carry_ewc(previous, optimizer) -> None:
    """Load the EWC states (F, θ*) of ``previous`` into the fresh ``optimizer`` (same parameters), and
    nothing else: its moments start from zero as every task's optimizer does."""
    saved = previous.state_dict(include_reference=False)
    fresh = optimizer.state_dict(include_reference=False)
    fresh["state"] = {index: {key: state[key] for key in EWC_STATES if key in state}
                      for index, state in saved["state"].items() if any(key in state for key in EWC_STATES)}
    optimizer.load_state_dict(fresh)
