"""Prometheus metrics of traffic recording, in prometheus_client's global registry (served on vLLM's
/metrics by the API-server process, where the capture middleware and the writer thread run). Label
values are bounded: `adapter` is a validated name, `outcome` and `rating` come from the sets below."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from ..storage import RATINGS

# What became of a captured request's records: logged (stored), dropped (the queue was full or closed),
# failed (the database or the redaction hook failed), redacted_out (the redaction hook dropped it),
# incomplete (no complete answer reached the client: error status, disconnect, cut stream), oversized
# (its stored text was above traffic_max_record_bytes).
TRAFFIC_OUTCOMES = ("logged", "dropped", "failed", "redacted_out", "incomplete", "oversized")
FEEDBACK_RATINGS = (*RATINGS, "correction")  # correction: a correction without a rating

TRAFFIC_RECORDS = Counter(
    "vllm_surgery_traffic_records",
    "Recorded traffic (one record per returned choice), by adapter and outcome.",
    ["adapter", "outcome"],
)
TRAFFIC_FEEDBACK = Counter(
    "vllm_surgery_traffic_feedback",
    "Feedback received on recorded requests, by adapter, rating (correction = a correction without a "
    "rating) and whether it counts as calibration data (trusted: true, or false for feedback of clients "
    "the server does not trust, stored but never used).",
    ["adapter", "rating", "trusted"],
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
TRAFFIC_WRITER_UP = Gauge(
    "vllm_surgery_traffic_writer_up",
    "1 while the traffic writer thread runs; 0 when it has died (the supervisor restarts it within a "
    "second) or recording is closed.",
)
TRAFFIC_WRITER_RESTARTS = Counter(
    "vllm_surgery_traffic_writer_restarts",
    "Times the supervisor found the traffic writer thread dead and started a new one.",
)


def record_traffic(adapter: str, outcome: str, n: int = 1) -> None:
    assert outcome in TRAFFIC_OUTCOMES, outcome
    TRAFFIC_RECORDS.labels(adapter=adapter, outcome=outcome).inc(n)


def record_feedback(adapter: str, rating: str | None, trusted: bool = True) -> None:
    """Count one feedback: its rating, or "correction" for a correction without one."""
    rating = rating or "correction"
    assert rating in FEEDBACK_RATINGS, rating
    TRAFFIC_FEEDBACK.labels(adapter=adapter, rating=rating, trusted="true" if trusted else "false").inc()
