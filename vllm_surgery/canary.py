"""STAND-IN (branch canary-serving only): the canary's decision rule, with the interface that helper
"canary-rule" writes in its own branch. The lead replaces this whole file with theirs at merge; nothing
else of this branch depends on more than the names and signatures below.

A deliberately simple rule so that the serving side can be built and tested: each version's good rate
gets a Hoeffding confidence sequence (a union bound over every sample size, so it stays valid when
looked at after every rating), and the difference's interval is the difference of the two.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ConfigError

DECISIONS = ("continue", "promote", "rollback", "expired")


@dataclass(frozen=True)
class ArmCounts:
    """One version's live figures since the canary started."""

    answers: int
    good: int
    bad: int
    corrected: int

    @property
    def rated(self) -> int:
        return self.good + self.bad + self.corrected


@dataclass(frozen=True)
class CanaryRule:
    """When a canary is promoted, rolled back or given up."""

    margin: float = 0.05
    error_rate: float = 0.05
    min_ratings: int = 30
    max_duration_s: float = 7 * 86400

    def __post_init__(self) -> None:
        if not (isinstance(self.margin, int | float) and 0 <= self.margin < 1):
            raise ConfigError(f"margin must be in [0, 1), got {self.margin!r}")
        if not (isinstance(self.error_rate, int | float) and 0 < self.error_rate < 0.5):
            raise ConfigError(f"error_rate must be in (0, 0.5), got {self.error_rate!r}")
        if (
            isinstance(self.min_ratings, bool)
            or not isinstance(self.min_ratings, int)
            or self.min_ratings < 1
        ):
            raise ConfigError(f"min_ratings must be an integer >= 1, got {self.min_ratings!r}")
        if not (isinstance(self.max_duration_s, int | float) and self.max_duration_s > 0):
            raise ConfigError(f"max_duration_s must be > 0, got {self.max_duration_s!r}")


@dataclass(frozen=True)
class Verdict:
    decision: str
    better: bool
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _radius(n: int, alpha: float) -> float:
    # P(exists n: |mean_n - p| > r(n)) <= sum_n alpha / (n (n + 1)) = alpha
    return math.sqrt(math.log(2 * n * (n + 1) / alpha) / (2 * n)) if n else 1.0


def _arm(counts: ArmCounts, alpha: float) -> dict[str, Any]:
    n = counts.rated
    rate = counts.good / n if n else None
    r = _radius(n, alpha)
    low, high = (max(0.0, rate - r), min(1.0, rate + r)) if rate is not None else (0.0, 1.0)
    return {
        "answers": counts.answers,
        "rated": n,
        "good": counts.good,
        "bad": counts.bad,
        "corrected": counts.corrected,
        "good_rate": rate,
        "good_rate_interval": [low, high],
        "correction_rate": counts.corrected / n if n else None,
    }


def evaluate(current: ArmCounts, canary: ArmCounts, rule: CanaryRule, *, elapsed_s: float) -> Verdict:
    alpha = rule.error_rate / 2  # split over the two arms
    a, b = _arm(current, alpha), _arm(canary, alpha)
    low = b["good_rate_interval"][0] - a["good_rate_interval"][1]
    high = b["good_rate_interval"][1] - a["good_rate_interval"][0]
    diff = (
        b["good_rate"] - a["good_rate"] if a["good_rate"] is not None and b["good_rate"] is not None else None
    )
    figures = {"current": a, "canary": b, "difference": diff, "difference_interval": [low, high]}
    figures["rule"] = asdict(rule)
    enough = min(current.rated, canary.rated) >= rule.min_ratings
    if enough and low > -rule.margin:
        better = low > 0
        reason = f"the canary is not worse by {rule.margin} (difference {diff:+.3f}, interval [{low:+.3f}, {high:+.3f}])"
        return Verdict("promote", better, reason, figures)
    if enough and high < 0:
        reason = f"the canary is worse (difference {diff:+.3f}, interval [{low:+.3f}, {high:+.3f}])"
        return Verdict("rollback", False, reason, figures)
    if elapsed_s > rule.max_duration_s:
        reason = f"no decision within {rule.max_duration_s:g} s; the current version stays"
        return Verdict("expired", False, reason, figures)
    reason = f"{current.rated} and {canary.rated} ratings: no decision yet"
    return Verdict("continue", False, reason, figures)
