"""Adam's step counts, counted as a launch runs and uncounted if it raises.

As in torch's functional Adam, the step counts are incremented before the step that uses them; a
launch that raises has written nothing (the ops check everything first), so its count is undone and
the optimizer can retry the step.
"""
from __future__ import annotations

import torch

__all__ = ["counted"]


def counted(step_counts, launch):
    """``launch()`` with ``step_counts`` (0-d tensors) incremented by one first, and decremented again
    if it raises. Under ``torch.compile`` no undo: a compiled graph that fails is rerun whole."""
    torch._foreach_add_(step_counts, 1)
    if torch.compiler.is_compiling():
        return launch()
    try:
        return launch()
    except BaseException:
        torch._foreach_sub_(step_counts, 1)
        raise
