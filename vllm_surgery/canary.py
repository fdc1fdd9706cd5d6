"""The canary's decision rule: promote, roll back or keep waiting, from live ratings of two versions.

Why a module of its own, in the engine: the rule is the promise the canary makes ("a refined version
replaces the served one only if its users do not rate it worse"), so its statistics must hold on their
own terms and be testable without a server. The serving side counts ratings and calls `evaluate`;
nothing here reads a clock, a database or a random number.

What is compared. Each version's rated answers: success = rated "good", failure = rated "bad" or
corrected. Unrated answers do not count (the rule compares rated answers only: if users rate one version's
answers more often than the other's, that difference is not measured). The correction rate (corrected /
rated) is reported beside the good rate. The quantity tested is the difference of good rates,
d = p_canary - p_current.

The test: a mixture likelihood ratio against the best null explanation, an e-process. For hypothesis
H (a set of (p_canary, p_current) pairs, e.g. d <= -margin) and counts so far,

    E_H = [ B(g_c + 1, f_c + 1) * B(g_0 + 1, f_0 + 1) ] / max over (p_c, p_0) in H of L(p_c, p_0),

g = good, f = bad + corrected, B the beta function, L the binomial likelihood of both versions' ratings.
The numerator is the likelihood of the ratings under a uniform prior on each version's good rate (the
product of Laplace's rule-of-succession predictions, so it depends on the counts only, not their order).
For any fixed pair in H, numerator / L(pair) is a non-negative martingale with mean 1, whatever the order
of the ratings and whichever version the next rating comes from (the share may change mid-canary, as
long as it is not chosen from the outcome of the rating itself); dividing by the maximum over H makes
E_H no larger. Ville's inequality then bounds, for every truth in H,

    P(E_H >= 1 / error_rate at ANY number of ratings) <= error_rate,

so the rule may be evaluated after every new rating, and stopped whenever, with no correction. This is
universal inference (Wasserman, Ramdas & Balakrishnan 2020) with a mixture numerator, the same
construction as the mixture SPRT of Johari, Pekelis & Walsh ("Always valid inference", 2017), but with
exact binomial likelihoods instead of a normal approximation: valid at every sample size, conservative
(simulation: far fewer errors than error_rate). The maximum over H is closed-form: the log-likelihood is
concave, the maximum over a half-plane d <= delta (or >= delta) is the unrestricted one when that lies
inside, otherwise the maximum on the line d = delta, whose root is Farrington & Manning's (1990)
restricted estimate (a cubic, solved by its trigonometric form). Uniform priors were chosen over
Jeffreys' and Beta(2, 2) after simulation: within 10% of each other on decision time, and uniform
prefers no rate. Written here rather than taken from a library: scipy is not installed with vLLM, and
`confseq` (Howard & Ramdas) builds C++ against Boost, calls itself early-stage and offers nonparametric
or asymptotic A/B tools, not an exact binomial test of a margin; the construction is a few dozen lines.

Four hypotheses are tested at error_rate each:

| name          | H (what rejecting it shows)                 | used for                        |
|---------------|---------------------------------------------|---------------------------------|
| non_inferior  | d <= -margin (canary worse by the margin)   | promote                         |
| worse         | d >= 0 (canary not worse)                   | rollback                        |
| better        | d <= 0 (canary not better)                  | `better` on a promotion         |
| within_margin | d >= +margin (canary better by the margin)  | ends the wait for `better`      |

The same statistic at a single point, E_{d = delta}, gives an anytime-valid confidence interval for d:
the deltas it does not reject at error_rate (level 1 - error_rate, convex profile, so an interval). Each
version's good rate has its own interval the same way (the beta-binomial mixture against the point). A
test is rejected exactly when its boundary lies outside the difference's interval, so the decision can
be read from the interval: above -margin -> not worse by the margin; below 0 -> worse; above 0 -> better.

Decision, at each evaluation, from the counts alone (no memory):
1. fewer than min_ratings rated answers of either version -> continue (or expired, past the limit);
2. the canary is shown worse -> rollback (this outranks 3: evidence of a loss, even one within the
   margin, keeps the current version);
3. shown not worse by the margin -> promote, `better` if also shown better. With settle_better (the
   default) the promotion waits until it is also settled whether the canary is better: shown better, or
   shown not better by the margin (its interval's top below +margin); a canary truly better by
   about the margin or less may wait until the time limit, and is then promoted (not shown better).
   Why wait: showing "not worse by the margin" needs less evidence than showing "better", so a canary
   promoted at the first moment it is not worse would almost never be known to be better; the canary
   keeps its share meanwhile, and an equal canary settles about as fast as it is shown not worse;
4. elapsed_s > max_duration_s with none of these -> expired: the current version stays.

Guarantees (each over the whole canary, however often evaluated, for any share): a canary whose good
rate is lower than the current version's by margin or more is promoted with probability <= error_rate;
a canary whose good rate is at least the current one's is rolled back with probability <= error_rate;
one whose good rate is at most the current one's is promoted as `better` with probability <=
error_rate. Assumed: each version's ratings are independent draws with a good rate that does not drift
during the canary (sticky random assignment gives both versions the same users); a rating changed later
(the latest rating wins) is a revision the guarantee does not cover, and is rare.
tests/test_canary_rule.py checks the rates by simulation; benchmarks/canary.py measures them with the
time to a decision.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from .errors import ConfigError

__all__ = [
    "DECISIONS",
    "TESTS",
    "ArmCounts",
    "CanaryRule",
    "Simulation",
    "Verdict",
    "decide",
    "difference_interval",
    "evaluate",
    "good_rate_interval",
    "log_e_values",
    "simulate",
]

DECISIONS = ("continue", "promote", "rollback", "expired")
CONTINUE, PROMOTE, ROLLBACK, EXPIRED = range(4)
# name -> (what rejecting its hypothesis shows, the hypothesis as text)
TESTS = {
    "non_inferior": ("not worse by the margin", "canary good rate <= current - margin"),
    "worse": ("worse", "canary good rate >= current"),
    "better": ("better", "canary good rate <= current"),
    "within_margin": ("not better by the margin", "canary good rate >= current + margin"),
}
_BISECTIONS = 60  # a good rate's interval ends to about 1e-16: far below any rounding that is reported
_GRID, _GRID_ROUNDS = 64, 6  # the difference's interval ends to 2 / 64^6 = 3e-11, in 6 vectorised steps


@dataclass(frozen=True)
class ArmCounts:
    """One version's live figures since the canary started (the caller counts; latest rating wins).

    Raises ValueError (naming the field) for a count that is not a non-negative integer, or more rated
    answers than answers.
    """

    answers: int  # answers it served
    good: int  # rated "good"
    bad: int  # rated "bad" without a correction
    corrected: int  # answers that received a correction

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ArmCounts.{f.name} must be a non-negative integer; got {value!r}")
        if self.rated > self.answers:
            raise ValueError(
                f"ArmCounts: {self.rated} rated answers (good {self.good} + bad {self.bad} + corrected "
                f"{self.corrected}) but only {self.answers} answers; count both over the same period"
            )

    @property
    def rated(self) -> int:
        return self.good + self.bad + self.corrected

    @property
    def failures(self) -> int:
        """Rated bad or corrected: the rule's failures."""
        return self.bad + self.corrected

    @property
    def good_rate(self) -> float | None:
        return self.good / self.rated if self.rated else None

    @property
    def correction_rate(self) -> float | None:
        """Corrected / rated: how often a rated answer needed a correction."""
        return self.corrected / self.rated if self.rated else None


def _field(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class CanaryRule:
    """The decision rule's settings; every field is checked when the rule is built (ConfigError naming
    the field, the value and what is expected). Help text: `dataclasses.fields(CanaryRule)` metadata."""

    margin: float = _field(
        0.05,
        "non-inferiority margin on the good rate (absolute, in [0, 0.5]): the canary is promoted once it "
        "is shown to be rated good no less than margin below the current version",
    )
    error_rate: float = _field(
        0.05,
        "in (0, 0.5]: the largest probability, over the whole canary however often it is evaluated, of "
        "promoting a canary whose good rate is lower by margin or more; also of rolling back a canary "
        "whose good rate is not lower, and of calling a canary better whose good rate is not higher",
    )
    min_ratings: int = _field(30, "rated answers each version needs before any decision (an integer >= 1)")
    max_duration_s: float = _field(
        7 * 86400.0,
        "seconds after which an undecided canary ends and the current version stays (a canary shown not "
        "worse by the margin is promoted then); a finite number > 0",
    )
    settle_better: bool = _field(
        True,
        "after the canary is shown not worse by the margin, wait until it is also shown better or not "
        "better by the margin before promoting (false: promote at once, better only if already shown)",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "margin", _number("margin", self.margin, "a number in [0, 0.5]", 0, 0.5))
        object.__setattr__(
            self,
            "error_rate",
            _number("error_rate", self.error_rate, "a probability in (0, 0.5]", 0, 0.5, low_open=True),
        )
        value = self.min_ratings
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"min_ratings must be an integer >= 1; got {value!r}")
        object.__setattr__(self, "min_ratings", int(value))
        object.__setattr__(
            self,
            "max_duration_s",
            _number(
                "max_duration_s",
                self.max_duration_s,
                "a finite number of seconds > 0",
                0,
                math.inf,
                low_open=True,
            ),
        )
        if not isinstance(self.settle_better, bool):
            raise ConfigError(f"settle_better must be true or false; got {self.settle_better!r}")

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> CanaryRule:
        """A rule from keyword settings (a JSON body, settings); raises ConfigError on an unknown name."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in settings if k not in known)
        if unknown:
            raise ConfigError(
                f"unknown canary rule setting(s) {', '.join(unknown)} (known: {', '.join(known)})"
            )
        return cls(**settings)

    @property
    def threshold(self) -> float:
        """log(1 / error_rate): a test's log e-value at or above it rejects its hypothesis."""
        return math.log(1.0 / self.error_rate)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(
    name: str, value: Any, expected: str, low: float, high: float, *, low_open: bool = False
) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        raise ConfigError(f"{name} must be {expected}; got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Verdict:
    """What the rule says now, with the figures it rests on (JSON-able via to_dict)."""

    decision: str  # one of DECISIONS
    better: bool  # promote AND the canary shown better than current (not just not worse)
    reason: str  # one sentence with the figures, for logs and the job/adapter view
    figures: dict  # per version: rated, good rate and interval; the difference; the tests

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- the statistics
_LGAMMA: np.ndarray = np.zeros(0)
_LGAMMA_TABLE_MAX = 1 << 20  # 8 MiB of log factorials; larger counts are computed one by one
_lgamma = np.frompyfunc(math.lgamma, 1, 1)


def _log_factorial(k: np.ndarray) -> np.ndarray:
    """log(k!) for integer arrays, from a table of math.lgamma values grown on demand (a simulation asks
    for millions at a time); counts beyond the table's cap are computed one by one."""
    global _LGAMMA
    top = int(k.max(initial=0)) + 1
    if top > _LGAMMA_TABLE_MAX:
        return np.asarray(_lgamma(k + 1.0), dtype=float)
    if top > len(_LGAMMA):
        size = min(max(top, 2 * len(_LGAMMA), 4096), _LGAMMA_TABLE_MAX)
        _LGAMMA = np.array([math.lgamma(i + 1.0) for i in range(size)])
    return _LGAMMA[k]


def _log_mixture(good: np.ndarray, rated: np.ndarray) -> np.ndarray:
    """log of the ratings' likelihood under a uniform prior on the good rate: log B(g + 1, f + 1)."""
    return _log_factorial(good) + _log_factorial(rated - good) - _log_factorial(rated + 1)


def _xlogy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = x * np.log(y)
    return np.where(x == 0, 0.0, out)


def _log_likelihood(g1, n1, g0, n0, p1, p0) -> np.ndarray:
    """Binomial log-likelihood of both versions' ratings (canary 1, current 0), without the binomial
    coefficients (they cancel in every ratio here)."""
    return _xlogy(g1, p1) + _xlogy(n1 - g1, 1.0 - p1) + _xlogy(g0, p0) + _xlogy(n0 - g0, 1.0 - p0)


def _restricted_fit(g1, n1, g0, n0, delta) -> tuple[np.ndarray, np.ndarray]:
    """The rates (p_canary, p_current) of highest likelihood with p_canary - p_current = delta.

    Farrington & Manning (1990): the score equation is a cubic in p_canary with one root in the
    feasible range, taken in its trigonometric form. With no ratings on one side, the other side's
    observed rate, clipped to what delta allows.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q1 = np.where(n1 > 0, g1 / np.maximum(n1, 1), 0.0)
        q0 = np.where(n0 > 0, g0 / np.maximum(n0, 1), 0.0)
        theta = n0 / np.maximum(n1, 1)
        a = 1.0 + theta
        b = -(1.0 + theta + q1 + theta * q0 + delta * (theta + 2.0))
        c = delta * delta + delta * (2.0 * q1 + theta + 1.0) + q1 + theta * q0
        d = -q1 * delta * (1.0 + delta)
        v = b**3 / (3.0 * a) ** 3 - b * c / (6.0 * a * a) + d / (2.0 * a)
        u = np.where(v < 0, -1.0, 1.0) * np.sqrt(np.maximum(b * b / (3.0 * a) ** 2 - c / (3.0 * a), 0.0))
        cos_arg = np.clip(np.where(u != 0, v / u**3, 0.0), -1.0, 1.0)
        w = (math.pi + np.arccos(cos_arg)) / 3.0
        p1 = 2.0 * u * np.cos(w) - b / (3.0 * a)
    p0 = p1 - delta
    p0 = np.where(n1 == 0, q0, p0)
    p0 = np.where(n0 == 0, q1 - delta, p0)
    # the feasible range of p_current on the line, against rounding (and for the one-sided cases)
    p0 = np.clip(p0, np.maximum(0.0, -delta), np.minimum(1.0, 1.0 - delta))
    return p0 + delta, p0


def _counts(*arrays: Any) -> list[np.ndarray]:
    """(current good, current rated, canary good, canary rated) as int64 arrays of one shape."""
    out = [np.asarray(a) for a in arrays]
    for a in out:
        if a.dtype.kind not in "iu":
            raise ValueError(f"counts must be integers; got an array of {a.dtype}")
    out = [a.astype(np.int64) for a in np.broadcast_arrays(*out)]
    for good, rated in (out[:2], out[2:]):
        if np.any(good < 0) or np.any(good > rated):
            raise ValueError("counts must satisfy 0 <= good <= rated for each version")
    return out


def log_e_values(
    current_good: Any, current_rated: Any, canary_good: Any, canary_rated: Any, margin: float
) -> dict[str, np.ndarray]:
    """log E for each test of TESTS (see the module docstring), elementwise over arrays of counts.

    Why arrays: a simulation evaluates the rule after every rating of thousands of canaries. Where either
    version has no rated answer, every value is 0 (E = 1: no evidence). Raises ValueError for counts
    that are not integers.
    """
    g0, n0, g1, n1 = _counts(current_good, current_rated, canary_good, canary_rated)
    g0f, n0f, g1f, n1f = (a.astype(float) for a in (g0, n0, g1, n1))
    log_mix = _log_mixture(g1, n1) + _log_mixture(g0, n0)
    q1 = g1f / np.maximum(n1f, 1.0)
    q0 = g0f / np.maximum(n0f, 1.0)
    observed = q1 - q0
    best = _log_likelihood(g1f, n1f, g0f, n0f, q1, q0)
    empty = (n0 == 0) | (n1 == 0)
    out = {}
    for name, delta, null_below in (
        ("non_inferior", -margin, True),
        ("worse", 0.0, False),
        ("better", 0.0, True),
        ("within_margin", margin, False),
    ):
        p1, p0 = _restricted_fit(g1f, n1f, g0f, n0f, delta)
        on_line = _log_likelihood(g1f, n1f, g0f, n0f, p1, p0)
        inside = observed <= delta if null_below else observed >= delta
        out[name] = np.where(empty, 0.0, log_mix - np.where(inside, best, on_line))
    return out


def decide(
    current_good: Any,
    current_rated: Any,
    canary_good: Any,
    canary_rated: Any,
    rule: CanaryRule,
    *,
    expired: Any = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The decision codes (indices into DECISIONS) and `better` flags, elementwise over arrays of counts.

    `expired`: whether elapsed time exceeds rule.max_duration_s (a bool or an array of them). evaluate()
    is this on one pair of versions; simulations call it on many. Raises ValueError for counts that are
    not integers.
    """
    e = log_e_values(current_good, current_rated, canary_good, canary_rated, rule.margin)
    enough = (np.asarray(current_rated) >= rule.min_ratings) & (np.asarray(canary_rated) >= rule.min_ratings)
    shown = {name: enough & (value >= rule.threshold) for name, value in e.items()}
    expired = np.asarray(expired, dtype=bool)
    settled = shown["better"] | shown["within_margin"] if rule.settle_better else True
    promote = shown["non_inferior"] & (settled | expired)
    codes = np.where(
        shown["worse"], ROLLBACK, np.where(promote, PROMOTE, np.where(expired, EXPIRED, CONTINUE))
    ).astype(np.int8)
    better = (codes == PROMOTE) & shown["better"]
    return codes, better


def _bisect(inside, lo: float, hi: float) -> float:
    """The boundary between `lo` (inside) and `hi` (outside) of a convex set on a line."""
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        if inside(mid):
            lo = mid
        else:
            hi = mid
    return lo


def good_rate_interval(good: int, rated: int, error_rate: float) -> tuple[float, float]:
    """Anytime-valid interval (level 1 - error_rate) for one version's good rate: the rates p at which
    log B(g + 1, f + 1) - log L(p) stays below log(1 / error_rate). (0, 1) without ratings."""
    if rated == 0:
        return 0.0, 1.0
    threshold = math.log(1.0 / error_rate)
    log_mix = math.lgamma(good + 1) + math.lgamma(rated - good + 1) - math.lgamma(rated + 2)
    failures = rated - good

    def inside(p: float) -> bool:
        if (good and p <= 0.0) or (failures and p >= 1.0):
            return False
        ll = (good * math.log(p) if good else 0.0) + (failures * math.log1p(-p) if failures else 0.0)
        return log_mix - ll < threshold

    rate = good / rated
    return _bisect(inside, rate, 0.0), _bisect(inside, rate, 1.0)


def difference_interval(current: ArmCounts, canary: ArmCounts, error_rate: float) -> tuple[float, float]:
    """Anytime-valid interval (level 1 - error_rate) for canary good rate - current good rate: the
    differences whose point hypothesis the e-process does not reject. (-1, 1) if either has no ratings."""
    if current.rated == 0 or canary.rated == 0:
        return -1.0, 1.0
    threshold = math.log(1.0 / error_rate)
    g1, n1, g0, n0 = (float(x) for x in (canary.good, canary.rated, current.good, current.rated))
    log_mix = float(
        _log_mixture(np.array(canary.good), np.array(canary.rated))
        + _log_mixture(np.array(current.good), np.array(current.rated))
    )

    def inside(delta: np.ndarray) -> np.ndarray:
        p1, p0 = _restricted_fit(g1, n1, g0, n0, delta)
        return log_mix - _log_likelihood(g1, n1, g0, n0, p1, p0) < threshold

    observed = g1 / n1 - g0 / n0
    return _boundaries(inside, observed, (-1.0, 1.0))


def _boundaries(inside, start: float, ends: tuple[float, float]) -> tuple[float, float]:
    """Both ends of a convex set on a line that holds `start`, searched towards `ends`: each round
    evaluates `inside` (vectorised) on a grid of _GRID points across both brackets at once and keeps the
    step where it turns false, so _GRID_ROUNDS rounds narrow each end to 2 / _GRID ** _GRID_ROUNDS."""
    found = []
    brackets = []
    for end in ends:
        if bool(inside(np.array([end]))[0]):
            found.append(end)  # the set reaches the end of the range
            brackets.append(None)
        else:
            found.append(None)
            brackets.append((start, end))
    for _ in range(_GRID_ROUNDS):
        open_brackets = [b for b in brackets if b is not None]
        if not open_brackets:
            break
        grids = [np.linspace(a, b, _GRID + 1) for a, b in open_brackets]
        flags = inside(np.concatenate(grids)).reshape(len(grids), _GRID + 1)
        narrowed = []
        for grid, row in zip(grids, flags):
            # the last grid point still inside (row[0], the bracket's inside end, always is)
            i = int(np.flatnonzero(row[:-1]).max(initial=0))
            narrowed.append((grid[i], grid[i + 1]))
        pending = iter(narrowed)
        brackets = [None if b is None else next(pending) for b in brackets]
    low, high = (float(f) if f is not None else float(b[0]) for f, b in zip(found, brackets))
    return low, high


# ----------------------------------------------------------------------------- the verdict
def evaluate(current: ArmCounts, canary: ArmCounts, rule: CanaryRule, *, elapsed_s: float) -> Verdict:
    """The rule's verdict on the canary now: continue, promote, rollback or expired (see the module
    docstring), with a one-sentence reason and the figures. Deterministic in its arguments.

    elapsed_s: seconds since the canary started. A negative value (a replica whose clock is behind the
    one that started the canary) reads as not expired rather than failing the canary's evaluation.

    Raises ValueError for counts that are not ArmCounts or an elapsed_s that is not a finite number.
    """
    for name, counts in (("current", current), ("canary", canary)):
        if not isinstance(counts, ArmCounts):
            raise ValueError(f"{name} must be ArmCounts; got {type(counts).__name__}")
    if not isinstance(rule, CanaryRule):
        raise ValueError(f"rule must be a CanaryRule; got {type(rule).__name__}")
    ok = isinstance(elapsed_s, numbers.Real) and not isinstance(elapsed_s, bool)
    if not ok or not math.isfinite(elapsed_s):
        raise ValueError(f"elapsed_s must be a finite number of seconds; got {elapsed_s!r}")
    expired = elapsed_s > rule.max_duration_s
    codes, better = decide(current.good, current.rated, canary.good, canary.rated, rule, expired=expired)
    decision, better = DECISIONS[int(codes)], bool(better)
    e = {
        name: float(value)
        for name, value in log_e_values(
            current.good, current.rated, canary.good, canary.rated, rule.margin
        ).items()
    }
    enough = min(current.rated, canary.rated) >= rule.min_ratings
    interval = difference_interval(current, canary, rule.error_rate)
    figures = {
        "rule": rule.to_dict(),
        "elapsed_s": float(elapsed_s),
        "interval_level": 1.0 - rule.error_rate,
        "current": _arm_figures(current, rule.error_rate),
        "canary": _arm_figures(canary, rule.error_rate),
        "difference": {
            "estimate": (canary.good_rate - current.good_rate if current.rated and canary.rated else None),
            "interval": [interval[0], interval[1]],
        },
        "threshold": rule.threshold,
        "tests": {
            name: {
                "shows": shows,
                "hypothesis": hypothesis,
                "log_e_value": e[name],
                "rejected": enough and e[name] >= rule.threshold,
            }
            for name, (shows, hypothesis) in TESTS.items()
        },
    }
    return Verdict(
        decision, better, _reason(decision, better, current, canary, rule, figures, expired), figures
    )


def _arm_figures(counts: ArmCounts, error_rate: float) -> dict[str, Any]:
    low, high = good_rate_interval(counts.good, counts.rated, error_rate)
    return {
        "answers": counts.answers,
        "rated": counts.rated,
        "good": counts.good,
        "bad": counts.bad,
        "corrected": counts.corrected,
        "good_rate": counts.good_rate,
        "good_rate_interval": [low, high],
        "correction_rate": counts.correction_rate,
    }


def _rate(counts: ArmCounts) -> str:
    if not counts.rated:
        return "no rated answers"
    return f"good rate {counts.good_rate:.3f} ({counts.good:,}/{counts.rated:,} rated, corrections {counts.correction_rate:.3f})"


def _reason(
    decision: str,
    better: bool,
    current: ArmCounts,
    canary: ArmCounts,
    rule: CanaryRule,
    figures: dict[str, Any],
    expired: bool,
) -> str:
    rates = f"canary {_rate(canary)}, current {_rate(current)}"
    low, high = figures["difference"]["interval"]
    level = f"{100 * (1 - rule.error_rate):g}%"
    diff = (
        f"difference {figures['difference']['estimate']:+.3f}, {level} anytime-valid interval "
        f"{low:+.3f} to {high:+.3f}"
        if figures["difference"]["estimate"] is not None
        else "no difference yet"
    )
    limit = f"{rule.max_duration_s / 86400:g} days"
    if min(current.rated, canary.rated) < rule.min_ratings:
        if decision == "expired":
            return (
                f"expired: the time limit ({limit}) passed before both versions had {rule.min_ratings} "
                f"rated answers ({rates}); the current version stays"
            )
        return f"continue: each version needs {rule.min_ratings} rated answers before a decision ({rates})"
    if decision == "rollback":
        return f"rollback: the canary is rated worse than the current version ({rates}; {diff}, below 0)"
    if decision == "promote":
        how = (
            "and better (the interval lies above 0)"
            if better
            else (
                f"and not better by the margin (the interval ends below +{rule.margin:g})"
                if figures["tests"]["within_margin"]["rejected"]
                else f"at the time limit ({limit}), not shown better"
            )
        )
        return (
            f"promote: the canary is not worse than the current version by the margin {rule.margin:g} "
            f"{how} ({rates}; {diff})"
        )
    if decision == "expired":
        return (
            f"expired: after the time limit ({limit}) the canary is neither shown not worse by the margin "
            f"{rule.margin:g} nor worse ({rates}; {diff}); the current version stays"
        )
    waiting = (
        "shown not worse by the margin, waiting to settle whether it is better"
        if figures["tests"]["non_inferior"]["rejected"]
        else f"not yet shown within the margin {rule.margin:g} nor worse"
    )
    return f"continue: {waiting} ({rates}; {diff})"


# ----------------------------------------------------------------------------- simulation
@dataclass(frozen=True)
class Simulation:
    """Simulated canaries' first decisions (arrays, one entry per canary); see simulate()."""

    decision: np.ndarray  # indices into DECISIONS: the first non-continue decision
    better: np.ndarray  # promoted as better
    ratings: np.ndarray  # ratings (both versions) when the decision was taken
    canary_rated: np.ndarray  # the canary's share of them

    def rate(self, decision: str) -> float:
        """Fraction of the canaries that ended with `decision`."""
        return float(np.mean(self.decision == DECISIONS.index(decision)))


def simulate(
    p_current: float,
    p_canary: float,
    share: float,
    rule: CanaryRule,
    *,
    runs: int,
    max_ratings: int,
    seed: int = 0,
    block: int = 256,
) -> Simulation:
    """Run `runs` canaries with known good rates, applying the rule after every rating.

    Why here: the tests and benchmarks/canary.py measure the rule's error rates and decision times on the
    same simulation. Each rating comes from the canary with probability `share` (users rate at random
    times) and is good with its version's rate. The time limit is reached at rating `max_ratings` (the
    rule is applied with expired=True there), so every canary ends decided or expired. Raises ValueError
    for rates or a share outside [0, 1] or non-positive sizes.
    """
    for name, value in (("p_current", p_current), ("p_canary", p_canary), ("share", share)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1]; got {value!r}")
    if runs < 1 or max_ratings < 1 or block < 1:
        raise ValueError(f"runs, max_ratings and block must be >= 1; got {runs}, {max_ratings}, {block}")
    rng = np.random.default_rng(seed)
    decision = np.full(runs, CONTINUE, dtype=np.int8)
    better = np.zeros(runs, dtype=bool)
    ratings = np.zeros(runs, dtype=np.int64)
    canary_rated = np.zeros(runs, dtype=np.int64)
    carry = np.zeros((runs, 4), dtype=np.int64)  # current good, current rated, canary good, canary rated
    active = np.arange(runs)
    done = 0
    while active.size and done < max_ratings:
        width = min(block, max_ratings - done)
        from_canary = rng.random((active.size, width)) < share
        good = rng.random((active.size, width)) < np.where(from_canary, p_canary, p_current)
        counts = [
            carry[active, i, None] + np.cumsum(step, axis=1)
            for i, step in enumerate((~from_canary & good, ~from_canary, from_canary & good, from_canary))
        ]
        expired = np.zeros(width, dtype=bool)
        expired[-1] = done + width == max_ratings
        codes, shown_better = decide(*counts, rule, expired=expired)
        decided = codes != CONTINUE
        hit = decided.any(axis=1)
        first = decided.argmax(axis=1)[hit]
        runs_hit = active[hit]
        decision[runs_hit] = codes[hit, first]
        better[runs_hit] = shown_better[hit, first]
        ratings[runs_hit] = done + first + 1
        canary_rated[runs_hit] = counts[3][hit, first]
        carry[active] = np.stack([c[:, -1] for c in counts], axis=1)
        active = active[~hit]
        done += width
    return Simulation(decision, better, ratings, canary_rated)
