"""How the experiments report progress: one place.

- :func:`bar`: a tqdm bar on a terminal only (``disable=None``: no escape codes in a log file);
- :func:`note`: one line for a person, printed above any bar (stdout);
- :func:`epoch_line`: the line printed after every training epoch, on a terminal and in a log.
"""
from __future__ import annotations

import functools
import importlib
import sys

from tqdm import tqdm

__all__ = ["bar", "note", "epoch_line", "quiet_library_bars"]


def quiet_library_bars() -> None:
    """Turn off transformers' and huggingface_hub's own bars ("Loading weights") when stderr is not a terminal."""
    if sys.stderr.isatty():
        return
    try:  # imported here, where a model is about to load: transformers takes 1.5 s to import (-X importtime)
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass
    # transformers' GGUF loader calls tqdm directly, whatever disable_progress_bar() says.
    for name in ("transformers.modeling_gguf_pytorch_utils",):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(module, "tqdm", None) is not None and not isinstance(module.tqdm, functools.partial):
            module.tqdm = functools.partial(module.tqdm, disable=True)


def bar(iterable, *, desc: str | None = None, unit: str = "it", leave: bool = False, disable: bool | None = None):
    """``tqdm`` shown only when stderr is a terminal (``disable=None``), unless ``disable`` says otherwise."""
    return tqdm(iterable, desc=desc, unit=unit, leave=leave, disable=disable, dynamic_ncols=True)


def note(line: str) -> None:
    """Print one line without breaking a bar in progress."""
    tqdm.write(line)


def _count(count: int, total: int) -> str:
    return f"{count}/{total} ({100.0 * count / total:.0f}%)" if total else f"{count}/0"


def epoch_line(label: str, epoch: int, epochs: int, *, learned: int, n_injection: int, forgot: int,
               n_mastered: int, share, loss, elapsed_s: float) -> str:
    """E.g. ``adamw CNL epoch 2/3: learned 9/15 (60%), forgot 0/15 (0%), collaborative 51.2%, loss 0.8123, 95 s``."""
    parts = [f"learned {_count(learned, n_injection)}", f"forgot {_count(forgot, n_mastered)}"]
    if share is not None:
        parts.append(f"collaborative {100.0 * share:.1f}%")
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    parts.append(f"{elapsed_s:.0f} s")
    return f"{label} epoch {epoch}/{epochs}: " + ", ".join(parts)
