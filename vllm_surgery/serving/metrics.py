"""Prometheus metrics of the serving plugin, in prometheus_client's global registry.

vLLM's /metrics serves that registry from the API-server process, which is where the resolver and the
hot-swap routes run, so these series appear there without multiprocess mode. Label values are bounded:
`adapter` is only ever a validated name of an adapter that exists under an operator root, and
`outcome` / `result` come from the fixed sets below.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram, Info

SWAP_OUTCOMES = ("swapped", "noop", "invalid", "not_found", "conflict", "corrupt", "failed")
STORE_RESULTS = ("hit", "miss")

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
RESOLVER_STORE = Counter(
    "vllm_surgery_resolver_store_lookups",
    "Resolver lookups of the refined-version store: hit = a refined version is served, miss = the original.",
    ["result"],
)


def record_swap(adapter: str | None, outcome: str) -> None:
    """Count one swap attempt; an adapter that is not known to exist is counted under adapter=""."""
    assert outcome in SWAP_OUTCOMES, outcome
    HOTSWAPS.labels(adapter=adapter or "", outcome=outcome).inc()


def record_served(adapter: str, version: str) -> None:
    SERVED_VERSION.labels(adapter=adapter).info({"version": version})


def record_store_lookup(hit: bool) -> None:
    RESOLVER_STORE.labels(result="hit" if hit else "miss").inc()
