"""CNL statistics of a step: per parameter, the collaborative count and the sums of ``s = r·u``.

The kernels add into a float64 ``[n, 3]`` device buffer per param group; nothing is read back to the
host until :meth:`StatsTracker.read` (``cnl_stats()``), so ``step()`` makes no host sync for them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..functional import is_dtensor

__all__ = ["CNLStats", "ParameterStats", "StatsTracker"]


@dataclass(frozen=True)
class ParameterStats:
    """CNL statistics of one parameter for one step (``s = r·u`` per element)."""

    index: int  # position in the optimizer's parameters, across param groups
    numel: int
    collaborative: int
    sum_s_collaborative: float
    sum_s_conflicting: float

    @property
    def collaborative_share(self) -> float:
        return self.collaborative / self.numel if self.numel else 1.0


@dataclass(frozen=True)
class CNLStats:
    """CNL statistics of the last ``step()``, over every parameter that had a reference."""

    collaborative: int
    total: int
    sum_s_collaborative: float
    sum_s_conflicting: float
    per_parameter: list = field(default_factory=list)

    @property
    def conflicting(self) -> int:
        return self.total - self.collaborative

    @property
    def collaborative_share(self) -> float:
        return self.collaborative / self.total if self.total else 1.0


def _shard_groups(p):
    """Process groups of the mesh dimensions along which the DTensor ``p`` is sharded."""
    return tuple(p.device_mesh.get_group(dim) for dim, placement in enumerate(p.placements) if placement.is_shard())


class StatsTracker:
    """The statistics buffers of the last step (when ``enabled``)."""

    def __init__(self, enabled: bool):
        self.enabled = bool(enabled)
        self.last = None  # per group: ([(index, numel) or None per param], float64 [n, 3] device tensor)

    def new_buffer(self, params, has_reference: bool):
        """A zeroed float64 ``[len(params), 3]`` buffer when statistics are tracked, else None."""
        if not (self.enabled and has_reference and params):
            return None
        return torch.zeros(len(params), 3, dtype=torch.float64, device=params[0].device)

    def record(self, per_group, all_params, references) -> None:
        """Keep this step's device buffers; reading them (a host sync) waits for :meth:`read`."""
        if not self.enabled:
            return
        index = {id(p): i for i, p in enumerate(all_params)}
        self.last = [
            ([(index[id(p)], p.numel() * (2 if p.is_complex() else 1)) if p in references else None for p in params],
             stats)
            for params, stats in per_group if stats is not None
        ]

    def read(self, all_params):
        """:class:`CNLStats` of the last step, or None (see ``CNLOptimizer.cnl_stats``)."""
        if not self.last:
            return None
        per_parameter = []
        for rows, stats in self.last:
            stats = _sum_over_shards(rows, stats, all_params)
            for row, (count, s_collab, s_conflict) in zip(rows, stats.tolist()):
                if row is not None:  # parameters without a reference are not counted
                    per_parameter.append(ParameterStats(row[0], row[1], int(count), s_collab, s_conflict))
        return CNLStats(
            collaborative=sum(s.collaborative for s in per_parameter),
            total=sum(s.numel for s in per_parameter),
            sum_s_collaborative=sum(s.sum_s_collaborative for s in per_parameter),
            sum_s_conflicting=sum(s.sum_s_conflicting for s in per_parameter),
            per_parameter=per_parameter,
        )


def _sum_over_shards(rows, stats, params):
    """``stats`` with the rows of sharded parameters summed over their shards' ranks (a copy)."""
    by_groups = {}  # the process groups to reduce over -> row positions
    for position, row in enumerate(rows):
        if row is not None and is_dtensor(params[row[0]]):
            groups = _shard_groups(params[row[0]])
            if groups:
                by_groups.setdefault(groups, []).append(position)
    if not by_groups:
        return stats
    stats = stats.clone()  # the recorded buffers stay local, so cnl_stats() can be called again
    for groups, positions in by_groups.items():
        sharded = stats[positions]
        for group in groups:
            dist.all_reduce(sharded, op=dist.ReduceOp.SUM, group=group)
        stats[positions] = sharded
    return stats
