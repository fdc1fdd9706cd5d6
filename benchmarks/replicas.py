"""Many replicas on real parts: how fast every replica follows the served pointer, and what clients see.

Started here, all on loopback (vllm_surgery/testing_servers.py, as in the tests): a private Postgres
(the served pointer, its LISTEN/NOTIFY trigger, the replicas table), a private S3 server (SeaweedFS; the
store, VLLM_SURGERY_STORE=s3://bucket/store) and two `vllm serve` replicas (via `vllm-surgery-serve`),
A and B, each with its own cache directory (as on two machines), each CPU engine bound to its own core
(VLLM_CPU_OMP_THREADS_BIND 0 and 1: vLLM's "auto" binding would put both on core 0).

The store holds two versions of adapter "x" (the original with re-drawn lora_B matrices, recorded as
refine() would with decision "forced"), published into the bucket by a writer whose cache is then
deleted. A warm-up swaps A to each (B fetches each from S3 into its own cache) and takes each version's
fingerprint: its greedy log-probs on a fixed prompt.

Measured: S swaps alternating between the two versions, each made by writing the pointer: an admin swap
on replica A (POST /v1/surgery/adapters/x/swap), and every fourth by the worker's path (the Database
API's set_served_pointer, what `vllm-surgery worker` calls without --server). From the pointer's commit
time (its set_at, written in the committing transaction) to the first response of each replica answered
by the new version: one probe thread per replica sends the fixed prompt back to back (tight loop), so a
figure is an upper bound by up to one probe's duration. Two phases: idle (only the probes), and under
load (K client threads, half on each replica, half of them streamed, same prompt with log-probs). Every
response of every phase is classified: the new or the old version entirely, or MIXED (matching neither
version for every token: benchmarks/serving.py `classify`); a probe answered by the old version after
that replica served the new one is STALE. Failed requests, mixed and stale responses must be 0 (exit 1
otherwise); the issue's target is p99 < 1 s over 20 swaps.

    .venv/bin/python benchmarks/replicas.py              # 20 swaps idle + 20 under load, ~4-6 min on 2 cores
    .venv/bin/python benchmarks/replicas.py --quick      # 4 + 4 swaps, 2 clients
    .venv/bin/python benchmarks/replicas.py --dry-run    # check Postgres and SeaweedFS are installed; start nothing

The servers, the probes and the clients share this machine's cores: on 2 cores, the figures include
waiting for a core (the replicas' API servers, Postgres, SeaweedFS and this process compete with the
two engines). What a 2-core machine cannot show: separate machines' network and clock, many replicas,
a GPU engine's add_lora time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from serving import (  # benchmarks/serving.py, beside this script
    probe,
    same,
    write_redrawn,
)

from vllm_surgery.server_process import REQUEST_TIMEOUT_S, STARTUP_TIMEOUT_S, start_server
from vllm_surgery.server_process import ServerProcess as Server
from vllm_surgery.testing import build_lora_adapter, build_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "bench-admin-token"
SETTLE_S = 0.3  # after both replicas serve a swap's version, before the next swap
SWAP_TIMEOUT_S = 30.0  # a replica not serving the version by then is a failure
TARGET_P99_S = 1.0
RESULTS = ROOT / "benchmarks" / "replicas_results.md"
MACHINE_NOTE = (
    "Both replicas, their API servers, Postgres, SeaweedFS, the probes and the clients share this machine's "
    "cores (each engine bound to one): a figure includes waiting for a core. This shows the follow path "
    "end to end (commit, NOTIFY, fetch from S3 into a replica's own cache, validation, vLLM's add_lora, "
    "the first answer) and that no request fails or mixes versions; it cannot show separate machines' "
    "network and clocks, more than two replicas, GPU engines, or a tail free of CPU contention."
)


# --------------------------------------------------------------------------- setup
def publish_versions(url: str, original: Path, cache: Path, n: int) -> list[str]:
    """Publish `n` versions of "x" into the bucket, then delete the writer's cache (no replica shares it)."""
    from vllm_surgery.storage import open_store

    store = open_store(url, cache, 1 << 30)
    ids = []
    with store.writer_lock("x"):
        for seed in range(n):
            out = store.new_version_dir("x")
            write_redrawn(original, out, seed=7 + seed)
            store.publish("x", out)
            ids.append(out.name)
    shutil.rmtree(cache)
    return ids


# --------------------------------------------------------------------------- requests
def version_of(lp: list[float], fingerprints: dict[str, list[float]]) -> str:
    """The version whose fingerprint equals `lp` for every token, else "mixed" (as benchmarks/serving.py
    `classify`: a response matching neither version entirely)."""
    for version, fp in fingerprints.items():
        if same(lp, fp):
            return version
    return "mixed"


def pct(values: list[float], q: float) -> float:
    """The nearest-rank percentile (p99 of 20 values is the largest)."""
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)] if s else float("nan")


class Prober:
    """A thread sending the fixed prompt to one replica back to back; keeps (sent, received, version)."""

    def __init__(self, server: Server, ids: list[int], fingerprints: dict[str, list[float]]) -> None:
        self.server, self.ids, self.fingerprints = server, ids, fingerprints
        self.seen: list[tuple[float, float, str]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            sent = time.time()
            try:
                lp = probe(self.server, self.ids)
            except Exception as e:
                self.failures.append(f"probe {self.server.label}: {e!r}"[:300])
                time.sleep(0.05)
                continue
            self.seen.append((sent, time.time(), version_of(lp, self.fingerprints)))

    def first(self, version: str, after: float) -> float | None:
        """When the first probe answered by `version` and received after `after` came back."""
        return next((r for s, r, v in list(self.seen) if r > after and v == version), None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(REQUEST_TIMEOUT_S)


class Load:
    """K client threads on the replicas (thread i on replica i % 2, streamed when (i // 2) is odd)."""

    def __init__(self, servers: list[Server], k: int, ids: list[int], fingerprints: dict) -> None:
        self.done = 0
        self.failures: list[str] = []
        self.mixed: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(servers[i % 2], (i // 2) % 2 == 1, ids, fingerprints))
            for i in range(k)
        ]
        for t in self._threads:
            t.start()

    def _client(self, server: Server, stream: bool, ids: list[int], fingerprints: dict) -> None:
        while not self._stop.is_set():
            try:
                got = version_of(probe(server, ids, stream), fingerprints)
            except Exception as e:
                with self._lock:
                    self.failures.append(f"{server.label} stream={stream}: {e!r}"[:300])
                continue
            with self._lock:
                self.done += 1
                if got == "mixed":
                    self.mixed.append(f"{server.label} stream={stream}")

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(REQUEST_TIMEOUT_S)


# --------------------------------------------------------------------------- the swaps
def run_swaps(
    a: Server, db, probers: dict[str, Prober], hashes: dict[str, str | None], n: int, worker_every: int
) -> dict:
    """`n` swaps alternating between the versions of `hashes` (the pointer is at the last before);
    returns each replica's follow seconds, the writer of each swap, and failures."""
    follow: dict[str, list[float]] = {label: [] for label in probers}
    # (version, when its first answer came back, the pointer's commit)
    served: dict[str, list[tuple[str, float, float]]] = {label: [] for label in probers}
    writers, failures = [], []
    versions = list(hashes)
    revision = db.served_pointer("x").revision
    for i in range(n):
        target = versions[i % len(versions)]
        by_worker = worker_every > 0 and i % worker_every == worker_every - 1
        if by_worker:  # what a worker without --server does for its accepted (here: forced) job
            pointer, changed = db.set_served_pointer(
                "x", target, adapter_hash=hashes[target], by="job benchmark", forced=True
            )
        else:
            status, body = a.post(
                "/v1/surgery/adapters/x/swap",
                {"version": target, "force": True},
                headers={"X-Surgery-Admin-Token": ADMIN_TOKEN},
            )
            if status != 200:
                failures.append(f"swap {i} to {target}: {status} {body}")
                continue
            pointer, changed = db.served_pointer("x"), bool(body.get("changed"))
            if not changed:  # a wrong answer, but the swap may have happened: measured all the same
                failures.append(f"swap {i} to {target}: answered changed=false: {body}")
        if pointer.version != target or pointer.revision != revision + 1:
            failures.append(f"swap {i} to {target}: the pointer did not move there ({pointer})")
            continue
        revision = pointer.revision
        writers.append("worker" if by_worker else "admin")
        commit = pointer.set_at
        deadline = time.monotonic() + SWAP_TIMEOUT_S
        pending = set(probers)
        while pending and time.monotonic() < deadline:
            for label in list(pending):
                got = probers[label].first(target, commit)
                if got is not None:
                    follow[label].append(got - commit)
                    served[label].append((target, got, commit))
                    pending.discard(label)
            time.sleep(0.01)
        for label in pending:
            failures.append(f"swap {i}: {label} did not serve {target} within {SWAP_TIMEOUT_S:g} s")
        time.sleep(SETTLE_S)
    return {"follow": follow, "served": served, "writers": writers, "failures": failures}


def stale(prober: Prober, served: list[tuple[str, float, float]], end: float) -> int:
    """Probes answered by another version than the one this replica had already served to a probe
    (`served`: each swap's version, when its first answer came back, the pointer's commit), sent after
    that answer and answered before the next swap's commit (or `end`)."""
    bounds = [*(commit for _, _, commit in served[1:]), end]
    return sum(
        1
        for (version, since, _), until in zip(served, bounds, strict=True)
        for s, r, v in prober.seen
        if since < s and r < until and v != version
    )


def slowest(prober: Prober, start: float, end: float) -> float:
    """The longest probe sent in [start, end]: how long one request waited at worst."""
    return max((r - s for s, r, _ in prober.seen if start <= s <= end), default=float("nan"))


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--swaps", type=int, default=20, help="S: swaps per phase (idle, then under load)")
    ap.add_argument("--clients", type=int, default=4, help="K: client threads in the load phase")
    ap.add_argument(
        "--worker-every", type=int, default=4, help="every Nth swap by the worker's path (0: none)"
    )
    ap.add_argument("--quick", action="store_true", help="4 swaps per phase, 2 clients; no results file")
    ap.add_argument("--dry-run", action="store_true", help="check that Postgres and SeaweedFS are installed")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (server logs)")
    args = ap.parse_args(argv)
    if args.quick:
        args.swaps, args.clients = 4, 2

    from vllm_surgery.testing_servers import PostgresServer, S3Server, find_bin_dir, find_weed

    if args.dry_run:
        print(f"Postgres binaries: {find_bin_dir()}\nSeaweedFS: {find_weed()}")
        print(f"would run {args.swaps} swaps idle and {args.swaps} under {args.clients} clients")
        return 0

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="vllm-surgery-replicas-"))
    servers: list[Server] = []
    pg = s3 = db = None
    probers: dict[str, Prober] = {}
    try:
        pg, s3 = PostgresServer().start(), S3Server().start()
        url = f"s3://{s3.new_bucket()}/store"
        aws = {**s3.env(), "AWS_MAX_ATTEMPTS": "1"}
        os.environ.update(aws)  # this process publishes into the bucket
        base = build_tiny_llama(work / "base", hidden=128, heads=2, kv_heads=2, intermediate=256)
        original = build_lora_adapter(base, work / "adapters" / "x", r=8, alpha=16)
        versions = publish_versions(url, original, work / "writer-cache", 2)
        database = pg.new_database()
        env = {
            **aws,
            "VLLM_PLUGINS": "vllm_surgery,vllm_surgery_api",
            "VLLM_SURGERY_ADAPTER_DIRS": str(work / "adapters"),
            "VLLM_SURGERY_STORE": url,
            "VLLM_SURGERY_DATABASE": database,
            "VLLM_SURGERY_ADMIN_TOKEN": ADMIN_TOKEN,
        }
        for name, core in (("a", "0"), ("b", "1")):
            (work / name).mkdir()
            extra = {
                "VLLM_SURGERY_REPLICA_ID": f"replica-{name}",
                "VLLM_SURGERY_CACHE_DIR": str(work / name / "cache"),
                "VLLM_CPU_OMP_THREADS_BIND": core,
            }
            servers.append(
                start_server(
                    base,
                    work / name,
                    {**env, **extra},
                    label=f"replica-{name}",
                    wait=False,
                    timeout=STARTUP_TIMEOUT_S,
                )
            )
        for s in servers:
            s.wait_healthy(STARTUP_TIMEOUT_S)
        a, b = servers
        print(f"Postgres, SeaweedFS and 2 replicas ready after {time.perf_counter() - started:.1f} s")
        from vllm_surgery.storage import open_database

        db = open_database(database)
        vocab = json.loads((base / "config.json").read_text())["vocab_size"]
        ids = torch.randint(10, vocab, (16,), generator=torch.Generator().manual_seed(0)).tolist()
        fingerprints = {"original": probe(a, ids)}
        if not same(probe(b, ids), fingerprints["original"]):
            raise RuntimeError("the replicas disagree on the original")
        hashes: dict[str, str | None] = {}
        for v in versions:  # warm-up: A swaps, B fetches it from S3 into its own cache and follows
            status, body = a.post(
                "/v1/surgery/adapters/x/swap",
                {"version": v, "force": True},
                {"X-Surgery-Admin-Token": ADMIN_TOKEN},
            )
            if status != 200:
                raise RuntimeError(f"warm-up swap to {v}: {status} {body}")
            hashes[v] = db.served_pointer("x").adapter_hash
            fingerprints[v] = probe(a, ids)
            deadline = time.monotonic() + 60
            while not same(probe(b, ids), fingerprints[v]):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"replica B did not follow {v} in 60 s:\n{b.log_tail()}")
                time.sleep(0.05)
        for x in fingerprints:
            for y in fingerprints:
                if x < y and same(fingerprints[x], fingerprints[y]):
                    raise RuntimeError(f"versions {x} and {y} are indistinguishable by the probe")
        fingerprints.pop("original")
        probers = {s.label: Prober(s, ids, fingerprints) for s in servers}
        time.sleep(1.0)
        results = {}
        for phase in ("idle", "load"):
            load = Load(servers, args.clients, ids, fingerprints) if phase == "load" else None
            t0 = time.time()
            try:
                if load:
                    time.sleep(1.0)
                results[phase] = run_swaps(a, db, probers, hashes, args.swaps, args.worker_every)
            finally:
                if load:
                    load.stop()
            t1 = time.time()
            results[phase]["requests"] = sum(
                1 for p in probers.values() for s, r, _ in p.seen if t0 <= s <= t1
            )
            results[phase]["mixed"] = [
                f"{label} probe"
                for label, p in probers.items()
                for s, r, v in p.seen
                if t0 <= s <= t1 and v == "mixed"
            ]
            results[phase]["stale"] = {
                label: stale(p, results[phase]["served"][label], t1) for label, p in probers.items()
            }
            results[phase]["slowest"] = {label: slowest(p, t0, t1) for label, p in probers.items()}
            results[phase]["failed"] = [f for p in probers.values() for f in p.failures]
            for p in probers.values():
                p.failures.clear()
            if load:
                results[phase]["requests"] += load.done + len(load.failures)
                results[phase]["mixed"] += load.mixed
                results[phase]["failed"] += load.failures
        for p in probers.values():
            p.stop()
        return report(results, args, time.perf_counter() - started)
    finally:
        for p in probers.values():
            p.stop()
        if db is not None:
            db.close()
        for s in servers:
            left = s.stop()
            if left:
                print(f"{s.label}: processes left after SIGTERM (killed): {left}")
        for srv in (s3, pg):
            if srv is not None:
                srv.stop()
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def report(results: dict, args: argparse.Namespace, seconds: float) -> int:
    lines = [
        "| phase | replica | swaps | p50 s | p99 s | max s | slowest probe s | requests | failed | mixed | stale |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ok = True
    worst = 0.0
    for phase, r in results.items():
        for label, values in r["follow"].items():
            p99 = pct(values, 0.99)
            worst = max(worst, p99)
            lines.append(
                f"| {phase} | {label} | {len(values)} | {statistics.median(values):.3f} | {p99:.3f} | "
                f"{max(values):.3f} | {r['slowest'][label]:.3f} | {r['requests']} | {len(r['failed'])} | {len(r['mixed'])} | "
                f"{r['stale'][label]} |"
            )
        ok &= not r["failures"] and not r["failed"] and not r["mixed"] and not any(r["stale"].values())
        for f in r["failures"] + r["failed"][:10] + r["mixed"][:10]:
            print(f"  {phase}: {f}")
    writers = ", ".join(
        f"{p}: {r['writers'].count('admin')} admin, {r['writers'].count('worker')} worker"
        for p, r in results.items()
    )
    each = "\n".join(
        f"- {phase}, {label}: "
        + ", ".join(
            f"{v:.3f}{'w' if w == 'worker' else ''}" for v, w in zip(vals, r["writers"], strict=False)
        )
        for phase, r in results.items()
        for label, vals in r["follow"].items()
    )
    table = "\n".join(lines)
    machine = f"{platform.node()}: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores"
    print(f"\nfollow latency: pointer commit -> first response of the new version, per replica ({writers})")
    print(table)
    print(each)
    print(MACHINE_NOTE)
    verdict = (
        f"p99 {worst:.3f} s ({'meets' if worst < TARGET_P99_S else 'misses'} the target < {TARGET_P99_S:g} s)"
    )
    print(
        f"{verdict}; {'0 failed, 0 mixed, 0 stale' if ok else 'FAILED, MIXED OR STALE RESPONSES'}; {seconds:.0f} s"
    )
    if not args.quick:
        RESULTS.write_text(
            "# Replicas benchmark: following the served pointer (benchmarks/replicas.py)\n\n"
            f"Command: `.venv/bin/python benchmarks/replicas.py --swaps {args.swaps} --clients {args.clients} "
            f"--worker-every {args.worker_every}`  \nMachine: {machine}; run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"{seconds:.0f} s.  \nWriters: {writers}.\n\n{MACHINE_NOTE}\n\n{table}\n\n{verdict}.\n\n"
            f"Every follow, seconds, in swap order (w: written by the worker's path):\n\n{each}\n"
        )
        print(f"written: {RESULTS.relative_to(ROOT)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
