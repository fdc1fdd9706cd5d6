"""Prometheus metrics of the serving plugin, in prometheus_client's global registry.

vLLM's /metrics serves that registry from the API-server process, which is where the resolver and the
hot-swap routes run, so these series appear there without multiprocess mode. Label values are bounded:
`adapter` is only ever a validated name of an adapter that exists under an operator root, and
`outcome` / `result` come from the fixed sets below.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, Info

SWAP_OUTCOMES = ("swapped", "noop", "invalid", "not_found", "conflict", "corrupt", "failed")
STORE_RESULTS = ("hit", "miss")
# Who looked the store up: the resolver (is a refined version served for this name?) or a refine
# request (was this exact refinement done before?).
STORE_LOOKUPS_BY = ("resolver", "refine")
REFINE_OUTCOMES = ("accept", "keep_original", "forced", "error", "cached")
REFINE_STAGES = ("load", "prepare", "sensitivity", "evaluation", "write", "total")
# What became of a captured request's records: logged (stored), dropped (the queue was full or closed),
# failed (the database or the redaction hook failed), redacted_out (the redaction hook dropped it),
# incomplete (no complete answer reached the client: error status, disconnect, cut stream).
TRAFFIC_OUTCOMES = ("logged", "dropped", "failed", "redacted_out", "incomplete")
FEEDBACK_RATINGS = ("good", "bad", "none")  # none: a correction without a rating

HOTSWAPS = Counter(
    "vllm_surgery_hotswaps",
    "Adapter hot-swap attempts, by adapter and outcome.",
    ["adapter", "outcome"],
)
SWAP_LATENCY = Histogram(
    "vllm_surgery_swap_latency_seconds",
    "Time from a swap request to the new version serving (successful swaps only).",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
SERVED_VERSION = Info(
    "vllm_surgery_served_version",
    "The adapter version currently served by this server ('original' or a store version id).",
    ["adapter"],
)
STORE_LOOKUPS = Counter(
    "vllm_surgery_store_lookups",
    "Lookups of the refined-version store. by=resolver: hit = a refined version is served, miss = the "
    "original; by=refine: hit = the requested refinement was found and not recomputed.",
    ["by", "result"],
)
REFINEMENTS = Counter(
    "vllm_surgery_refinements",
    "Refinement requests, by adapter and outcome (cached = answered from the store).",
    ["adapter", "outcome"],
)
REFINE_DURATION = Histogram(
    "vllm_surgery_refinement_duration_seconds",
    "Duration of computed refinements, by stage (refine() timings).",
    ["stage"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0),
)
HELDOUT_LOSS = Gauge(
    "vllm_surgery_heldout_loss",
    "Held-out mean answer loss recorded for the SERVED refined version of an adapter: which=before is the "
    "original adapter, which=after the served version. No series while the original is served.",
    ["adapter", "which"],
)

TRAFFIC_RECORDS = Counter(
    "vllm_surgery_traffic_records",
    "Recorded traffic (one record per returned choice), by adapter and outcome.",
    ["adapter", "outcome"],
)
TRAFFIC_FEEDBACK = Counter(
    "vllm_surgery_traffic_feedback",
    "Feedback received on recorded requests, by adapter and rating (none = a correction alone).",
    ["adapter", "rating"],
)
CALIBRATION_EXAMPLES = Gauge(
    "vllm_surgery_calibration_examples",
    "Usable calibration examples from recorded traffic per adapter (corrected + rated good, + unrated "
    "where the adapter's settings include them); refreshed by the traffic writer every minute.",
    ["adapter"],
)
TRAFFIC_QUEUE_DEPTH = Gauge(
    "vllm_surgery_traffic_queue_depth", "Captured requests waiting for the traffic writer thread."
)
TRAFFIC_QUEUE_PEAK = Gauge(
    "vllm_surgery_traffic_queue_peak_depth", "Highest traffic queue depth since the server started."
)


def record_traffic(adapter: str, outcome: str, n: int = 1) -> None:
    assert outcome in TRAFFIC_OUTCOMES, outcome
    TRAFFIC_RECORDS.labels(adapter=adapter, outcome=outcome).inc(n)


def record_feedback(adapter: str, rating: str | None) -> None:
    rating = rating or "none"
    assert rating in FEEDBACK_RATINGS, rating
    TRAFFIC_FEEDBACK.labels(adapter=adapter, rating=rating).inc()


def record_swap(adapter: str | None, outcome: str) -> None:
    """Count one swap attempt; an adapter that is not known to exist is counted under adapter=""."""
    assert outcome in SWAP_OUTCOMES, outcome
    HOTSWAPS.labels(adapter=adapter or "", outcome=outcome).inc()


def record_served(adapter: str, version: str, record: Mapping[str, Any] | None = None) -> None:
    """Publish the served version and, from its surgery.json `record`, its held-out loss before/after.

    The loss series always describe what is served now, so they cannot go stale after a rollback or a
    refinement that kept the original; with the original served there is nothing to compare.
    """
    SERVED_VERSION.labels(adapter=adapter).info({"version": version})
    record = record or {}
    losses = {which: _loss(record.get(f"quality_{which}")) for which in ("before", "after")}
    for which, loss in losses.items():
        if version != "original" and None not in losses.values():
            HELDOUT_LOSS.labels(adapter=adapter, which=which).set(loss)
        else:
            with contextlib.suppress(KeyError):
                HELDOUT_LOSS.remove(adapter, which)


def _loss(quality: Any) -> float | None:
    if isinstance(quality, Mapping) and isinstance(quality.get("loss"), (int, float)):
        return float(quality["loss"])
    return None


def record_store_lookup(hit: bool, by: str = "resolver") -> None:
    assert by in STORE_LOOKUPS_BY, by
    STORE_LOOKUPS.labels(by=by, result="hit" if hit else "miss").inc()


def record_refinement(adapter: str, outcome: str, timings: Mapping[str, float] | None = None) -> None:
    assert outcome in REFINE_OUTCOMES, outcome
    REFINEMENTS.labels(adapter=adapter, outcome=outcome).inc()
    for stage, seconds in (timings or {}).items():
        if stage in REFINE_STAGES:
            REFINE_DURATION.labels(stage=stage).observe(seconds)
