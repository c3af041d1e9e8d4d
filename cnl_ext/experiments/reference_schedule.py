"""When CNL's reference is recomputed, and how well its first-order promise holds (issue 22, part 5).

A CNL step keeps the mastered loss L_M from rising only to first order: with the reference r taken
at θ₀, a step changes L_M by about ``−Σ lr·Σ_collaborative r·u`` (≤ 0; :func:`predicted_change`, from
``cnl_stats()``), and over the steps since θ₀ the sum of those is ``r·(θ − θ₀)``. The measured change
``L_M(θ) − L_M(θ₀)`` departs from it by the Taylor remainder, which grows with the step size and with
the reference's age. That departure is what breaks the protection, and it is cheap to see: every
reference pass yields L_M at the current weights anyway.

:class:`ReferenceSchedule` recomputes the reference every ``period`` steps (fixed: the protocol's
per-epoch default, or ``--reference-every N``), or adapts the period: it starts at one step and,
at each new reference, halves the period when the departure over the last one exceeded
``tolerance`` and doubles it (up to ``max_period``) when it stayed under a quarter of it, as an
ODE solver controls its step from its error estimate.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

__all__ = ["predicted_change", "ReferenceSchedule", "DEFAULT_TOLERANCE"]

# Mean cross-entropy over the mastered set, in nats: the departure at which the report says the
# measured loss and the first-order prediction part ways, and the adaptive schedule's default.
DEFAULT_TOLERANCE = 0.02


def predicted_change(optimizer, stats) -> float:
    """The first-order change of the reference loss made by the last step: ``−Σ_p lr_p·Σ_collaborative r·u``
    (``stats``: that step's ``optimizer.cnl_stats()``; each parameter at its param group's lr). Statistics
    without a per-parameter split (DeepSpeed's flat partitions) need one lr for every group."""
    lrs = [float(group["lr"]) for group in optimizer.param_groups for _ in group["params"]]
    if stats.per_parameter:
        return -sum(lrs[s.index] * s.sum_s_collaborative for s in stats.per_parameter)
    if len(set(lrs)) > 1:
        raise ValueError("the first-order prediction needs per-parameter statistics when the param groups' "
                         f"learning rates differ ({sorted(set(lrs))})")
    return -lrs[0] * stats.sum_s_collaborative if lrs else 0.0


@dataclass
class ReferenceSchedule:
    """Which steps take a new reference; keeps the measured and predicted change since the last one.

    ``period``: steps between references (with ``tolerance``: the first period, then adapted within
    ``[1, max_period]``). ``tolerance``: None for a fixed period. Call :meth:`due` before a step,
    :meth:`refreshed` with the loss a new reference was taken at, :meth:`stepped` after each step.
    """

    period: int
    tolerance: float | None = None
    max_period: int | None = None
    since: int = 0  # steps since the last reference
    predicted: float = 0.0  # first-order change predicted over those steps
    loss: float | None = None  # reference loss when the last reference was taken
    intervals: list = field(default_factory=list)  # per reference interval: steps, measured, predicted, period

    def __post_init__(self):
        if self.period < 1:
            raise ValueError(f"the reference period must be >= 1 steps, got {self.period}")
        if self.tolerance is not None and not self.tolerance > 0:
            raise ValueError(f"the adaptive reference's tolerance must be > 0, got {self.tolerance}")
        self.max_period = self.max_period or self.period

    @classmethod
    def for_run(cls, *, steps_per_epoch: int, every: int | None, tolerance: float | None) -> "ReferenceSchedule":
        """The schedule of an injection run: adaptive (from one step up to ``every`` or an epoch) when
        ``tolerance`` is given, else every ``every`` steps (default: once per epoch)."""
        longest = every or steps_per_epoch
        return cls(1, tolerance, longest) if tolerance is not None else cls(longest)

    def due(self) -> bool:
        return self.loss is None or self.since >= self.period

    def refreshed(self, loss: float) -> None:
        """A new reference was taken where the reference loss is ``loss``: close the interval."""
        if self.loss is not None and self.since:
            measured = loss - self.loss
            if self.tolerance is not None and math.isfinite(measured):
                departure = measured - self.predicted
                if departure > self.tolerance:
                    self.period = max(1, self.period // 2)
                elif departure < self.tolerance / 4:
                    self.period = min(self.max_period, 2 * self.period)
            self.intervals.append(dict(steps=self.since, measured=measured, predicted=self.predicted,
                                       period=self.period))
        self.loss, self.since, self.predicted = loss, 0, 0.0

    def stepped(self, change: float | None) -> None:
        """One step was taken; ``change``: its :func:`predicted_change` (None: not measured)."""
        self.since += 1
        if change is not None:
            self.predicted += change

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)
