"""Prometheus metrics of the serving plugin (swaps, store lookups, refine requests, jobs), in
prometheus_client's global registry; the traffic series are `vllm_surgery.traffic.metrics`.

vLLM's /metrics serves that registry from the API-server process, which is where the resolver and the
hot-swap routes run, so these series appear there without multiprocess mode. Label values are bounded:
`adapter` is only ever a validated name of an adapter that exists under an operator root, and
`outcome` / `result` come from the fixed sets below.

The job figures are different: workers are other processes (another machine, even), so their
progress cannot be counted in this process's memory. `JobsCollector` reads them from the job database
at scrape time, so they are right whichever process changed them, and survive restarts of either.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ..storage import FINISHED_STATES, JOB_STAGE_BUCKETS, JOB_STATES

log = logging.getLogger(f"vllm.{__name__}")

SWAP_OUTCOMES = ("swapped", "noop", "invalid", "not_found", "conflict", "corrupt", "failed", "unavailable")
# A store version's local copy (object storage): already in this machine's cache (hit), downloaded and
# checked (fetched: a miss), the store unreachable (failed), a download whose size or SHA-256 differs
# from the manifest, or a version that is not there (corrupt). A local store counts nothing here.
STORE_FETCH_OUTCOMES = ("hit", "fetched", "failed", "corrupt")
STORE_RESULTS = ("hit", "miss")
# Who looked the store up: the resolver (is a refined version served for this name?) or a refine
# request (was this exact refinement done before?).
STORE_LOOKUPS_BY = ("resolver", "refine")
# What a refine request got: queued (a job), cached (answered from the store), error (refused).
REFINE_OUTCOMES = ("queued", "cached", "error")
JOB_OUTCOMES = FINISHED_STATES
# What a replica made of a served-pointer change (shared database): swapped (it serves the pointer's
# version now), failed (it cannot fetch or validate it and keeps serving what it has), behind (a
# retryable failure, e.g. the engine refused the load: tried again at the next poll).
FOLLOW_OUTCOMES = ("swapped", "failed", "behind")
# Stages of a job, as the worker records them (seconds): waiting in the queue, loading the base model
# (near 0 when it is cached), building the calibration set, then refine()'s own stages (load_adapter:
# reading and checking the adapter; search: choosing steps and candidates on the selection split), the swap into the server, and the whole job from claim to swap.
JOB_STAGES = (
    "queued",
    "load_model",
    "calibration",
    "load_adapter",
    "prepare",
    "sensitivity",
    "search",
    "evaluation",
    "write",
    "swap",
    "total",
)

HOTSWAPS = Counter(
    "vllm_surgery_hotswaps",
    "Adapter hot-swap attempts, by adapter and outcome.",
    ["adapter", "outcome"],
)
STORE_FETCHES = Counter(
    "vllm_surgery_store_fetches",
    "Store versions made local for serving (object storage), by outcome.",
    ["outcome"],
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
    "Refine requests, by adapter and outcome (queued = a job, cached = answered from the store, error = "
    "refused).",
    ["adapter", "outcome"],
)
HELDOUT_LOSS = Gauge(
    "vllm_surgery_heldout_loss",
    "Held-out mean answer loss recorded for the SERVED refined version of an adapter: which=before is the "
    "original adapter, which=after the served version. No series while the original is served.",
    ["adapter", "which"],
)

POINTER_FOLLOWS = Counter(
    "vllm_surgery_pointer_follows",
    "Served-pointer changes this replica acted on (shared database), by adapter and outcome: swapped, "
    "failed (cannot fetch or validate the version; the previous one keeps serving), behind (retried).",
    ["adapter", "outcome"],
)
REPLICA_IN_SYNC = Gauge(
    "vllm_surgery_replica_in_sync",
    "1 while this replica serves the version the shared served pointer names for the adapter, 0 while "
    "it serves another one (failed or behind). Only adapters this replica has loaded.",
    ["adapter"],
)
POINTER_LISTENER_UP = Gauge(
    "vllm_surgery_pointer_listener_up",
    "1 while this replica's LISTEN connection for served-pointer changes is up (shared database), 0 "
    "while it reconnects (the periodic poll still reads the pointers when the database answers).",
)


# Canaries (docs/canary.md): which version a request ran (arm current or canary) and how a canary ended.
CANARY_ARMS = ("current", "canary")
CANARY_DECISIONS_OUTCOMES = ("promoted", "rolled_back", "expired", "aborted")
CANARY_REQUESTS = Counter(
    "vllm_surgery_canary_requests",
    "Requests of an adapter with a running canary, by the version that answered: arm current or canary.",
    ["adapter", "arm"],
)
CANARY_RUNNING = Gauge(
    "vllm_surgery_canary_running",
    "1 while this server serves a canary of the adapter, 0 after it ended.",
    ["adapter"],
)
CANARY_SHARE = Gauge(
    "vllm_surgery_canary_share",
    "The share of the adapter's requests its running canary serves (0 when none runs).",
    ["adapter"],
)
CANARY_ANSWERS = Gauge(
    "vllm_surgery_canary_answers",
    "Answers of each version since the running canary started (all replicas: from the database).",
    ["adapter", "arm"],
)
CANARY_RATINGS = Gauge(
    "vllm_surgery_canary_ratings",
    "Rated answers (good, bad or corrected) of each version since the running canary started.",
    ["adapter", "arm"],
)
CANARY_CORRECTIONS = Gauge(
    "vllm_surgery_canary_corrections",
    "Corrected answers of each version since the running canary started.",
    ["adapter", "arm"],
)
CANARY_GOOD_RATE = Gauge(
    "vllm_surgery_canary_good_rate",
    "Rated-good share of each version's rated answers since the running canary started.",
    ["adapter", "arm"],
)
CANARY_STATISTIC = Gauge(
    "vllm_surgery_canary_statistic",
    "The decision rule's running figures for the adapter's canary (name: each number the rule reports, "
    "e.g. the difference of good rates and its interval's bounds).",
    ["adapter", "name"],
)
CANARY_DECISIONS = Counter(
    "vllm_surgery_canary_decisions",
    "Canaries ended, by adapter and decision: promoted, rolled_back, expired, aborted.",
    ["adapter", "decision"],
)


def _numbers(figures: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of the rule's figures, flattened (a.b -> a_b; [low, high] -> _low, _high)."""
    out: dict[str, float] = {}
    for key, value in figures.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int | float):
            out[name] = float(value)
        elif isinstance(value, Mapping):
            out.update(_numbers(value, f"{name}_"))
        elif isinstance(value, list | tuple) and len(value) == 2:
            for end, v in zip(("low", "high"), value, strict=True):
                if isinstance(v, int | float) and not isinstance(v, bool):
                    out[f"{name}_{end}"] = float(v)
    return out


def clear_canary(adapter: str) -> None:
    """The adapter's canary ended here: no running figures are shown for it any more."""
    CANARY_RUNNING.labels(adapter).set(0)
    CANARY_SHARE.labels(adapter).set(0)
    for gauge in (CANARY_ANSWERS, CANARY_RATINGS, CANARY_CORRECTIONS, CANARY_GOOD_RATE):
        for arm in CANARY_ARMS:
            with contextlib.suppress(KeyError):
                gauge.remove(adapter, arm)
    for name in _STATISTIC_NAMES.pop(adapter, set()):
        with contextlib.suppress(KeyError):
            CANARY_STATISTIC.remove(adapter, name)


_STATISTIC_NAMES: dict[str, set[str]] = {}  # adapter -> the statistic names exported for its canary


def record_canary(adapter: str, arms: Mapping[str, Any], figures: Mapping[str, Any]) -> None:
    """Export a running canary's live figures: `arms` maps current/canary to their ArmCounts."""
    for arm, counts in arms.items():
        CANARY_ANSWERS.labels(adapter, arm).set(counts.answers)
        CANARY_RATINGS.labels(adapter, arm).set(counts.rated)
        CANARY_CORRECTIONS.labels(adapter, arm).set(counts.corrected)
        if counts.rated:
            CANARY_GOOD_RATE.labels(adapter, arm).set(counts.good / counts.rated)
    for name, value in _numbers(figures).items():
        CANARY_STATISTIC.labels(adapter, name).set(value)
        _STATISTIC_NAMES.setdefault(adapter, set()).add(name)


def record_follow(adapter: str, outcome: str | None, in_sync: bool) -> None:
    """What this replica made of its adapter's served pointer: `outcome` (None: nothing to do, it was
    already served) and whether it now serves the pointer's version."""
    if outcome is not None:
        assert outcome in FOLLOW_OUTCOMES, outcome
        POINTER_FOLLOWS.labels(adapter=adapter, outcome=outcome).inc()
    REPLICA_IN_SYNC.labels(adapter=adapter).set(1 if in_sync else 0)


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


def record_store_fetch(outcome: str) -> None:
    assert outcome in STORE_FETCH_OUTCOMES, outcome
    STORE_FETCHES.labels(outcome=outcome).inc()


def record_refinement(adapter: str, outcome: str) -> None:
    assert outcome in REFINE_OUTCOMES, outcome
    REFINEMENTS.labels(adapter=adapter, outcome=outcome).inc()


# ----------------------------------------------------------------------------- jobs (from the database)
class JobsCollector(Collector):
    """Job figures read from the job database at scrape time (see the module docstring).

    `queue` is a storage.JobQueue (the server's Database); None only to describe the families. A
    database that cannot be read gives no job samples for that scrape (logged), never a failed scrape.
    """

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    @staticmethod
    def _families() -> dict[str, Any]:
        return {
            "jobs": GaugeMetricFamily(
                "vllm_surgery_jobs", "Refinement jobs in the job database, by state.", labels=["state"]
            ),
            "finished": CounterMetricFamily(
                "vllm_surgery_jobs_finished",
                "Finished refinement jobs, by adapter and outcome (accepted: a refined version was "
                "written; kept_original: the gate kept the original; failed: the error says why).",
                labels=["adapter", "outcome"],
            ),
            "oldest": GaugeMetricFamily(
                "vllm_surgery_job_queue_oldest_age_seconds",
                "Age of the oldest queued job (0 when none is queued): a queue that does not drain grows it.",
            ),
            "pending": GaugeMetricFamily(
                "vllm_surgery_job_swaps_pending",
                "Accepted versions not swapped in yet (the server swaps them every refine_check_interval_s).",
            ),
            "stages": HistogramMetricFamily(
                "vllm_surgery_job_stage_seconds",
                "Duration of finished jobs by stage (queued, load_model, calibration, load_adapter, "
                "prepare, sensitivity, evaluation, write, swap, total).",
                labels=["stage"],
            ),
            "quality": GaugeMetricFamily(
                "vllm_surgery_job_heldout_loss",
                "Held-out mean answer loss measured by an adapter's latest finished refinement: which=before "
                "is the original adapter, which=after the best candidate (the served version when accepted).",
                labels=["adapter", "which"],
            ),
        }

    def describe(self) -> list[Any]:
        return list(self._families().values())

    def collect(self) -> list[Any]:
        families = self._families()
        try:
            figures = self.queue.job_figures()
        except Exception as e:  # DatabaseError, or a broken file: the scrape itself must not fail
            log.error("metrics: job figures cannot be read from the job database: %s", e)
            return []
        for state in JOB_STATES:
            families["jobs"].add_metric([state], figures.by_state.get(state, 0))
        for (adapter, outcome), n in sorted(figures.finished.items()):
            families["finished"].add_metric([adapter, outcome], n)
        families["oldest"].add_metric([], figures.oldest_queued_age_s)
        families["pending"].add_metric([], figures.swaps_pending)
        for stage in JOB_STAGES:
            h = figures.stages.get(stage)
            counts = h.buckets if h is not None else (0,) * len(JOB_STAGE_BUCKETS)
            buckets = [(str(b), n) for b, n in zip(JOB_STAGE_BUCKETS, counts, strict=True)]
            families["stages"].add_metric(
                [stage], [*buckets, ("+Inf", h.count if h else 0)], h.total if h else 0.0
            )
        for adapter, (before, after) in sorted(figures.latest_quality.items()):
            families["quality"].add_metric([adapter, "before"], before)
            families["quality"].add_metric([adapter, "after"], after)
        return list(families.values())


_collector_lock = threading.Lock()
_collector: JobsCollector | None = None


def register_jobs_collector(queue: Any) -> JobsCollector:
    """Register (or re-point) the jobs collector in the global registry that vLLM's /metrics serves."""
    global _collector
    with _collector_lock:
        if _collector is None:
            _collector = JobsCollector(queue)
            REGISTRY.register(_collector)
        else:
            _collector.queue = queue
        return _collector
