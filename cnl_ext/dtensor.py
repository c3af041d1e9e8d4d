"""FSDP2's DTensors: the kernels step a sharded parameter's local shard (sharded like its gradient,
states and reference)."""
from __future__ import annotations

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed
    class _DTensor:  # noqa: D401 - nothing is an instance of it
        pass

__all__ = ["is_dtensor", "local_tensor"]


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter, or a tensor sharded like one)."""
    return isinstance(t, _DTensor)


def local_tensor(t):
    """This rank's shard of a DTensor (sharing its storage); any other tensor as it is."""
    return t.to_local() if is_dtensor(t) else t
