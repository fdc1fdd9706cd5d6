"""Prometheus metrics of traffic recording, in prometheus_client's global registry (served on vLLM's
/metrics by the API-server process, where the capture middleware and the writer thread run). Label
values are bounded: `adapter` is a validated name, `outcome` and `rating` come from the sets below."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from ..storage import RATINGS

# What became of a captured request's records: logged (stored), dropped (the queue was full or closed),
# failed (the database or the redaction hook failed), redacted_out (the redaction hook dropped it),
# incomplete (no complete answer reached the client: error status, disconnect, cut stream).
TRAFFIC_OUTCOMES = ("logged", "dropped", "failed", "redacted_out", "incomplete")
FEEDBACK_RATINGS = (*RATINGS, "none")  # none: a correction without a rating

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
