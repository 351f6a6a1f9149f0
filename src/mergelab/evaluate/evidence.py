"""Evidence for a verdict over seeds: a claim "A beats B" is *reproduced* only when the gap between
the means exceeds the seeds' spread, *not reproduced* when it is reversed by more than the spread,
and *inconclusive* otherwise. A verdict that could flip between machines rests on too little
evidence, so it must say so.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterable, Sequence

REPRODUCED, PARTLY, NOT_REPRODUCED, INCONCLUSIVE, NOT_TESTED = (
    "reproduced", "partly", "not reproduced", "inconclusive", "not tested")


@dataclass(frozen=True)
class Summary:
    """Values over seeds: their mean and spread (sample standard deviation; 0 for one value)."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def spread(self) -> float:
        return statistics.stdev(self.values) if self.n > 1 else 0.0

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.spread:.2f}"


def summarize(values: Iterable[float]) -> Summary:
    return Summary(tuple(float(v) for v in values))


def compare(a: Sequence[float] | Summary, b: Sequence[float] | Summary | float, tolerance: float = 0.0) -> str:
    """Verdict on the claim mean(a) ≥ mean(b) − tolerance (``b`` may be a constant).

    gap = mean(a) − mean(b) + tolerance; spread = √(spread_a² + spread_b²). reproduced when
    gap > spread, not reproduced when gap < −spread, inconclusive otherwise. With no spread at all
    (one seed each, or identical values) the sign of the gap decides, and a zero gap is inconclusive.
    """
    a = a if isinstance(a, Summary) else summarize(a)
    b = b if isinstance(b, Summary) else summarize([b] if isinstance(b, (int, float)) else b)
    gap = a.mean - b.mean + tolerance
    spread = math.hypot(a.spread, b.spread)
    if gap > spread:
        return REPRODUCED
    if gap < -spread:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def combine(verdicts: Sequence[str]) -> str:
    """One verdict from the verdicts of a claim's parts (targets, sizes, ...): all reproduced →
    reproduced; all not reproduced → not reproduced; some reproduced → partly; otherwise
    inconclusive. No parts: not tested."""
    if not verdicts:
        return NOT_TESTED
    if all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    if all(v == NOT_REPRODUCED for v in verdicts):
        return NOT_REPRODUCED
    if any(v in (REPRODUCED, PARTLY) for v in verdicts):
        return PARTLY
    return INCONCLUSIVE
