"""The selection ratio over a run: constant, or linear / cosine from a start to an end."""

from __future__ import annotations

import math
from dataclasses import dataclass

from slm.selection.topk import check_ratio

SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class RatioSchedule:
    """The selection ratio at each optimizer step: ``constant`` (``start``), or ``linear`` /
    ``cosine`` from ``start`` at the first step to ``end`` at the last."""

    kind: str = "constant"
    start: float = 0.6
    end: float | None = None

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"selector.ratio schedule must be one of {SCHEDULES}, got {self.kind!r}")
        check_ratio(self.start, "selector.ratio.start")
        if self.kind != "constant":
            if self.end is None:
                raise ValueError(f"a {self.kind} selector.ratio schedule needs an end")
            check_ratio(self.end, "selector.ratio.end")

    def at(self, step: int, total_steps: int) -> float:
        """The ratio of optimizer step ``step`` (0-based) of ``total_steps``."""
        if self.kind == "constant":
            return self.start
        progress = min(1.0, step / max(1, total_steps - 1))
        if self.kind == "linear":
            return self.start + (self.end - self.start) * progress
        return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * progress))

    @property
    def is_constant(self) -> bool:
        return self.kind == "constant" or self.start == self.end

    def label(self) -> str:
        return f"{self.start}" if self.kind == "constant" else f"{self.kind}-{self.start}-{self.end}"


AUTO = "auto"  # selector.ratio=auto: chosen from the data before training (slm.recipes.ratio_choice)


def ratio_schedule(value) -> RatioSchedule:
    """A schedule from a number (constant) or a mapping ``{schedule, start, end}``."""
    if isinstance(value, RatioSchedule):
        return value
    if isinstance(value, (int, float, str)):
        return RatioSchedule("constant", check_ratio(value, "selector.ratio"))
    try:
        spec = dict(value)
    except (TypeError, ValueError):
        raise ValueError(f"selector.ratio must be a number or {{schedule, start, end}}, got {value!r}") from None
    unknown = set(spec) - {"schedule", "start", "end"}
    if unknown:
        raise ValueError(f"selector.ratio schedule has unknown keys {sorted(unknown)}; use schedule, start, end")
    return RatioSchedule(spec.get("schedule", "constant"), spec.get("start", 0.6), spec.get("end"))
