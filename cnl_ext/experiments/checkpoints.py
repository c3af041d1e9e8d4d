"""Checkpoints of a multi-run command, so that an interrupted command continues where it stopped.

In a folder (``checkpoints/`` in the command's staging folder):

- ``start.pt``: the weights every compared run starts from, saved once;
- ``run-<optimizer>-<method>.pt``: the latest end of epoch of the unfinished run (trained weights,
  optimizer state with its reference, RNG states, epoch, the per-epoch records); replaced, never
  accumulated (about 2 GB for SmolLM2 with AdamW in float32);
- ``done-<optimizer>-<method>.json``: a finished run's records (its ``.pt`` is then deleted unless
  ``keep``).

Every file is written atomically. ``CNL_EXT_INTERRUPT_AFTER_EPOCH=N`` (for tests) raises
``KeyboardInterrupt`` right after the checkpoint of epoch N is saved, as a Ctrl-C there would.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from .outputs import atomic_write, write_json

__all__ = ["RunCheckpoints", "rng_states", "restore_rng_states"]

INTERRUPT_AFTER_EPOCH_ENV = "CNL_EXT_INTERRUPT_AFTER_EPOCH"


def rng_states() -> dict:
    states = dict(torch=torch.get_rng_state(), python=random.getstate())
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RunCheckpoints:
    """The checkpoints of one command's runs in ``folder`` (see the module doc)."""

    def __init__(self, folder, *, keep: bool = False):
        self.folder = Path(folder)
        self.keep = keep
        self.last_saved = None  # (run label, epoch, epochs) of the newest checkpoint, for the Ctrl-C message

    # --------------------------------------------------------------------------- files

    def _path(self, name: str) -> Path:
        return self.folder / name

    def _save(self, name: str, payload) -> None:
        with atomic_write(self._path(name), "wb") as out:
            torch.save(payload, out)

    def _load(self, name: str):
        path = self._path(name)
        return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None

    # --------------------------------------------------------------------------- start weights

    @property
    def has_start_weights(self) -> bool:
        return self._path("start.pt").is_file()

    def start_weights(self, model) -> dict:
        """The saved starting weights, or a snapshot of ``model``'s (saved now, once)."""
        saved = self._load("start.pt")
        if saved is not None:
            return saved
        weights = {name: t.detach().clone() for name, t in model.state_dict().items()}
        self._save("start.pt", weights)
        return weights

    # --------------------------------------------------------------------------- runs

    def finished(self, key: str):
        """The finished run's records as saved (``RunResult.to_dict()``), or None."""
        path = self._path(f"done-{key}.json")
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def latest(self, key: str):
        """The newest end-of-epoch state of an unfinished run, or None."""
        return self._load(f"run-{key}.pt")

    def save_epoch(self, key: str, state: dict, *, label: str, epochs: int) -> None:
        self._save(f"run-{key}.pt", state)
        self.last_saved = (label, state["epoch"], epochs)
        if os.environ.get(INTERRUPT_AFTER_EPOCH_ENV) == str(state["epoch"]):
            raise KeyboardInterrupt(f"{INTERRUPT_AFTER_EPOCH_ENV}={state['epoch']}")

    def finish_run(self, key: str, result) -> None:
        write_json(self._path(f"done-{key}.json"), result.to_dict())
        if not self.keep:
            self._path(f"run-{key}.pt").unlink(missing_ok=True)

    def close(self) -> None:
        """After the command's last run: delete the folder, unless ``keep``."""
        if not self.keep and self.folder.exists():
            shutil.rmtree(self.folder)
