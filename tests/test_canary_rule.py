"""The canary's decision rule (vllm_surgery/canary.py): its statistic against an independent brute-force
computation, hand-computed verdicts, bad settings, and its error rates and power measured by simulating
thousands of canaries looked at after every rating (pure numpy, no server; the file takes ~20 s)."""

from __future__ import annotations

import json
import math
from dataclasses import fields

import numpy as np
import pytest

from vllm_surgery.canary import (
    DECISIONS,
    ArmCounts,
    CanaryRule,
    decide,
    difference_interval,
    evaluate,
    good_rate_interval,
    log_e_values,
    simulate,
)
from vllm_surgery.errors import ConfigError

RULE = CanaryRule()  # margin 0.05, error rate 0.05, 30 ratings each, 7 days


def counts(good: int, bad: int, corrected: int = 0, unrated: int = 0) -> ArmCounts:
    return ArmCounts(answers=good + bad + corrected + unrated, good=good, bad=bad, corrected=corrected)


def binomial_upper(n: int, p: float, level: float = 0.99) -> int:
    """The smallest k with P(Bin(n, p) <= k) >= level: a count of errors above it, had the true rate been
    p, would happen with probability below 1 - level (the Monte Carlo tolerance of the rate tests)."""
    total = 0.0
    for k in range(n + 1):
        total += math.comb(n, k) * p**k * (1 - p) ** (n - k)
        if total >= level:
            return k
    return n


# --------------------------------------------------------------------------------------------------
# The statistic, against an independent computation
# --------------------------------------------------------------------------------------------------


def brute_log_e(g0: int, n0: int, g1: int, n1: int, null) -> float:
    """log E by the definition, computed another way: the numerator as the product of Laplace's
    rule-of-succession predictions over a sequence of the ratings (good ones first, one version after the
    other: the order must not matter), the denominator by maximising the likelihood over a 2-D grid of
    (p_canary, p_current) restricted to the hypothesis."""
    log_num = 0.0
    for good, rated in ((g1, n1), (g0, n0)):
        seen_good = 0
        for i in range(rated):
            outcome_good = i < good
            p_good = (seen_good + 1) / (i + 2)
            log_num += math.log(p_good if outcome_good else 1 - p_good)
            seen_good += outcome_good
    grid = np.linspace(0.0, 1.0, 801)  # steps of 1/800: the margins +-0.05 and 0 lie on it
    p1, p0 = np.meshgrid(grid, grid, indexing="ij")
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = [
            np.where(g1 > 0, g1 * np.log(p1), 0.0),
            np.where(n1 - g1 > 0, (n1 - g1) * np.log(1 - p1), 0.0),
            np.where(g0 > 0, g0 * np.log(p0), 0.0),
            np.where(n0 - g0 > 0, (n0 - g0) * np.log(1 - p0), 0.0),
        ]
    log_lik = np.nan_to_num(sum(terms), nan=-np.inf)
    diff = np.round(p1 - p0, 9)
    return log_num - float(log_lik[null(diff)].max())


NULLS = {
    "non_inferior": lambda d: d <= -0.05,
    "worse": lambda d: d >= 0,
    "better": lambda d: d <= 0,
    "within_margin": lambda d: d >= 0.05,
}


@pytest.mark.parametrize(
    "g0, n0, g1, n1",
    [(18, 30, 27, 30), (25, 40, 12, 31), (0, 35, 35, 35), (20, 20, 0, 30), (7, 12, 9, 14), (33, 60, 30, 50)],
)
def test_log_e_values_match_the_definition_computed_by_brute_force(g0, n0, g1, n1):
    got = log_e_values(g0, n0, g1, n1, margin=0.05)
    for name, null in NULLS.items():
        expected = brute_log_e(g0, n0, g1, n1, null)
        # the grid's maximum is at most the true one: its log E is >= the exact value, by grid error only
        assert float(got[name]) == pytest.approx(expected, abs=2e-3), name
        assert float(got[name]) <= expected + 1e-9, name


def test_the_statistic_by_hand():
    # canary 30 good of 30, current 0 good of 30: numerator (1/31)^2 (uniform-prior likelihood of 30
    # equal outcomes is 1/31 per version); the best "canary not better" explanation is p = 1/2 for both:
    # 2^-60. log E(better) = 60 ln 2 - 2 ln 31 = 34.72. "Canary worse": the best explanation inside is
    # the observed (1, 0), likelihood 1: log E = -2 ln 31.
    e = log_e_values(0, 30, 30, 30, margin=0.05)
    assert float(e["better"]) == pytest.approx(60 * math.log(2) - 2 * math.log(31), rel=1e-9)
    assert float(e["worse"]) == pytest.approx(-2 * math.log(31), rel=1e-9)
    # no ratings on one side: no evidence, E = 1
    assert {k: float(v) for k, v in log_e_values(0, 0, 5, 5, margin=0.05).items()} == dict.fromkeys(
        NULLS, 0.0
    )


def test_good_rate_interval_by_hand():
    # 10 good of 10: log B(11, 1) = -ln 11; the interval is p^10 > 1 / (11 * 20), i.e. p > 220^(-1/10)
    low, high = good_rate_interval(10, 10, 0.05)
    assert low == pytest.approx(220 ** (-1 / 10), abs=1e-9) and high == pytest.approx(1.0, abs=1e-9)
    assert good_rate_interval(0, 0, 0.05) == (0.0, 1.0)


def test_difference_interval_by_hand():
    # canary 60 of 60 good, current 0 of 60: on the line d = delta the best rates are p_canary =
    # (1 + delta) / 2 and p_current = (1 - delta) / 2, likelihood ((1 + delta) / 2)^120; the numerator is
    # (1/61)^2. The lower end solves -2 ln 61 - 120 ln((1 + delta) / 2) = ln 20; the upper end is 1.
    low, high = difference_interval(counts(0, 60), counts(60, 0), 0.05)
    expected = 2 * math.exp(-(math.log(20) + 2 * math.log(61)) / 120) - 1  # 0.8215
    assert low == pytest.approx(expected, abs=1e-9) and high == 1.0
    assert difference_interval(counts(0, 0), counts(3, 1), 0.05) == (-1.0, 1.0)


def test_the_decision_can_be_read_from_the_interval():
    # a test rejects exactly when its boundary lies outside the difference's interval (module docstring)
    rng = np.random.default_rng(2)
    seen = set()
    for _ in range(60):
        n0, n1 = (int(n) for n in rng.integers(30, 3000, size=2))
        g0 = int(rng.integers(0, n0 + 1))
        g1 = int(rng.binomial(n1, float(np.clip(g0 / n0 + rng.normal(0, 0.08), 0, 1))))
        v = evaluate(counts(g0, n0 - g0), counts(g1, n1 - g1), RULE, elapsed_s=0)
        low, high = v.figures["difference"]["interval"]
        tests = v.figures["tests"]
        assert tests["non_inferior"]["rejected"] == (low > -0.05), (g0, n0, g1, n1, low)
        assert tests["better"]["rejected"] == (low > 0), (g0, n0, g1, n1, low)
        assert tests["worse"]["rejected"] == (high < 0), (g0, n0, g1, n1, high)
        assert tests["within_margin"]["rejected"] == (high < 0.05), (g0, n0, g1, n1, high)
        seen |= {(name, t["rejected"]) for name, t in tests.items()}
    assert len(seen) == 8  # every test both rejected and not, somewhere in the sample


# --------------------------------------------------------------------------------------------------
# Verdicts computed by hand
# --------------------------------------------------------------------------------------------------


def test_zero_ratings_continue_with_no_difference():
    v = evaluate(counts(0, 0, unrated=50), counts(0, 0, unrated=10), RULE, elapsed_s=0)
    assert (v.decision, v.better) == ("continue", False)
    assert v.figures["difference"] == {"estimate": None, "interval": [-1.0, 1.0]}
    assert "30 rated answers" in v.reason


def test_below_min_ratings_no_decision_however_clear():
    # 29 of 29 good against 0 of 29: log E(better) = 58 ln 2 - 2 ln 30 = 33.4, far above ln 20 = 3.0
    current, canary = counts(0, 29), counts(29, 0)
    assert evaluate(current, canary, RULE, elapsed_s=60).decision == "continue"
    v = evaluate(current, canary, CanaryRule(min_ratings=29), elapsed_s=60)
    assert (v.decision, v.better) == ("promote", True)
    # min_ratings is per version: 300 ratings of the current version do not make up for the canary's 29
    assert evaluate(counts(0, 300), canary, RULE, elapsed_s=60).decision == "continue"


def test_a_canary_rated_worse_is_rolled_back_and_the_figures_say_why():
    v = evaluate(counts(30, 0), counts(0, 20, corrected=10), RULE, elapsed_s=3600)
    assert (v.decision, v.better) == ("rollback", False)
    assert v.figures["canary"]["correction_rate"] == pytest.approx(10 / 30)
    assert v.figures["tests"]["worse"]["rejected"] and not v.figures["tests"]["non_inferior"]["rejected"]
    assert v.figures["difference"]["estimate"] == -1.0 and v.figures["difference"]["interval"][1] < 0
    assert "rollback" in v.reason and "0/30" in v.reason and "30/30" in v.reason
    json.dumps(v.to_dict(), allow_nan=False)  # JSON as it stands: no NaN, no infinity


# canary 0.630 vs current 0.600 on 3,000 ratings each: standard error of the difference 0.0125, so the
# anytime-valid interval (about +-0.058 here, wider than a fixed-sample one) clears -0.05 but neither 0
# nor +0.05: not worse by the margin, and whether it is better is not settled.
CURRENT_3000, CANARY_3000 = counts(1800, 1200), counts(1890, 1110)


def test_not_worse_but_unsettled_waits_then_is_promoted_at_the_time_limit():
    v = evaluate(CURRENT_3000, CANARY_3000, RULE, elapsed_s=86400)
    assert v.decision == "continue" and "waiting" in v.reason
    v = evaluate(CURRENT_3000, CANARY_3000, RULE, elapsed_s=7 * 86400 + 1)
    assert (v.decision, v.better) == ("promote", False) and "time limit" in v.reason
    # without settle_better the promotion comes at once
    v = evaluate(CURRENT_3000, CANARY_3000, CanaryRule(settle_better=False), elapsed_s=86400)
    assert (v.decision, v.better) == ("promote", False)


def test_expired_keeps_the_current_version():
    # equal rates on 3,000 each: the interval (about +-0.058) reaches below -0.05 and above 0: neither
    # not worse by the margin nor worse, so at the limit the current version stays
    current, canary = counts(1800, 1200), counts(1800, 1200)
    assert evaluate(current, canary, RULE, elapsed_s=7 * 86400).decision == "continue"  # the limit itself
    v = evaluate(current, canary, RULE, elapsed_s=7 * 86400 + 0.5)
    assert (v.decision, v.better) == ("expired", False) and "current version stays" in v.reason
    few = evaluate(counts(5, 5), counts(5, 5), RULE, elapsed_s=8 * 86400)
    assert few.decision == "expired"


def test_evaluate_is_decide_on_one_pair():
    rng = np.random.default_rng(1)
    for _ in range(40):
        n0, n1 = rng.integers(0, 400, size=2)
        g0, g1 = rng.integers(0, n0 + 1), rng.integers(0, n1 + 1)
        rule = CanaryRule(min_ratings=int(rng.integers(1, 60)), margin=float(rng.choice([0.0, 0.05, 0.1])))
        v = evaluate(counts(int(g0), int(n0 - g0)), counts(int(g1), int(n1 - g1)), rule, elapsed_s=1.0)
        code, better = decide(g0, n0, g1, n1, rule)
        assert (v.decision, v.better) == (DECISIONS[int(code)], bool(better))


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, value",
    [
        ("margin", -0.01),
        ("margin", 0.6),
        ("margin", float("nan")),
        ("margin", "0.05"),
        ("error_rate", 0),
        ("error_rate", 0.75),
        ("error_rate", True),
        ("min_ratings", 0),
        ("min_ratings", 2.5),
        ("min_ratings", True),
        ("max_duration_s", 0),
        ("max_duration_s", float("inf")),
        ("max_duration_s", None),
        ("settle_better", "yes"),
    ],
)
def test_bad_rule_values_name_the_field(name, value):
    with pytest.raises(ConfigError, match=rf"^{name} must be"):
        CanaryRule(**{name: value})


def test_every_rule_field_has_help_and_unknown_settings_are_named():
    assert all(f.metadata["help"] for f in fields(CanaryRule))
    assert CanaryRule.from_mapping({"margin": 0.1}).margin == 0.1
    with pytest.raises(ConfigError, match=r"unknown canary rule setting.*share"):
        CanaryRule.from_mapping({"share": 0.1})


def test_bad_counts_and_elapsed_time_are_named():
    with pytest.raises(ValueError, match=r"ArmCounts\.good must be a non-negative integer"):
        ArmCounts(answers=5, good=-1, bad=0, corrected=0)
    with pytest.raises(ValueError, match=r"4 rated answers .* only 3 answers"):
        ArmCounts(answers=3, good=2, bad=1, corrected=1)
    for elapsed in (float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="elapsed_s must be a finite number"):
            evaluate(counts(1, 1), counts(1, 1), RULE, elapsed_s=elapsed)
    # a replica's clock behind the one that started the canary: not expired, no failure
    assert evaluate(counts(1, 1), counts(1, 1), RULE, elapsed_s=-5.0).decision == "continue"


# --------------------------------------------------------------------------------------------------
# Error rates and power, simulated: every canary looked at after every rating
# --------------------------------------------------------------------------------------------------
RUNS = 1000


@pytest.mark.parametrize("error_rate", [0.05, 0.2])
@pytest.mark.parametrize("share", [0.1, 0.5])
def test_a_canary_worse_by_the_margin_is_promoted_at_most_at_the_error_rate(error_rate, share):
    # base 0.6, canary 0.55: exactly the margin worse; 3,000 ratings (the time limit, where a canary
    # shown not worse by the margin would be promoted too). At error_rate 0.2 a rule that did not hold
    # its rate would show it: the tolerance is the 99% binomial bound around 200 of 1,000.
    rule = CanaryRule(error_rate=error_rate)
    sim = simulate(0.6, 0.55, share, rule, runs=RUNS, max_ratings=3000, seed=11)
    promoted = int((sim.decision == DECISIONS.index("promote")).sum())
    assert promoted <= binomial_upper(RUNS, error_rate), (promoted, RUNS)


@pytest.mark.parametrize("share", [0.1, 0.5])
def test_an_equal_canary_is_never_called_better_nor_rolled_back_beyond_the_error_rate(share):
    for error_rate in (0.05, 0.2):
        sim = simulate(
            0.6, 0.6, share, CanaryRule(error_rate=error_rate), runs=RUNS, max_ratings=3000, seed=12
        )
        better = int(sim.better.sum())
        rolled_back = int((sim.decision == DECISIONS.index("rollback")).sum())
        bound = binomial_upper(RUNS, error_rate)
        assert better <= bound and rolled_back <= bound, (error_rate, better, rolled_back, bound)


# Power: at base 0.6, a canary 0.15 better or worse is decided in >= 90% of runs within these numbers
# of ratings (both versions together; benchmarks/canary.py measures the medians): 1,500 at share 0.5,
# 4,000 at share 0.1.
POWER_RATINGS = {0.5: 1500, 0.1: 4000}


@pytest.mark.parametrize("share", [0.1, 0.5])
def test_a_canary_better_by_015_is_promoted_as_better(share):
    sim = simulate(0.6, 0.75, share, RULE, runs=RUNS, max_ratings=POWER_RATINGS[share], seed=13)
    assert sim.better.mean() >= 0.90, sim.better.mean()
    assert sim.rate("rollback") == 0.0


@pytest.mark.parametrize("share", [0.1, 0.5])
def test_a_canary_worse_by_015_is_rolled_back(share):
    sim = simulate(0.6, 0.45, share, RULE, runs=RUNS, max_ratings=POWER_RATINGS[share], seed=14)
    assert sim.rate("rollback") >= 0.90, sim.rate("rollback")
    assert sim.rate("promote") == 0.0


def test_the_simulation_draws_ratings_at_the_share():
    # every canary runs to the limit when the rule can never decide (min_ratings above it): the canary's
    # ratings are Bin(1000 * 400, 0.1) in all: 40,000 +- 4 * 190
    sim = simulate(0.6, 0.6, 0.1, CanaryRule(min_ratings=10_000), runs=400, max_ratings=1000, seed=15)
    assert sim.rate("expired") == 1.0 and set(sim.ratings.tolist()) == {1000}
    assert abs(int(sim.canary_rated.sum()) - 40_000) <= 4 * math.sqrt(400_000 * 0.1 * 0.9)
