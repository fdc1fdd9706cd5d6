"""Serving benchmark of the vLLM plugin against real `vllm serve` processes (loopback only).

Two servers are started from one model and one LoRA adapter "x", with identical engine flags:

- "plugin": VLLM_PLUGINS=vllm_surgery,vllm_surgery_api; "x" is resolved by the plugin's resolver from
  an operator root; the store holds a second servable version of "x" for hot-swaps;
- "baseline": VLLM_PLUGINS set to a name that matches no plugin (ours disabled), "x" passed with
  `--lora-modules x=<adapter>`.

Measured and printed:

(a) swap latency: time from sending POST /v1/surgery/adapters/x/swap to the first completion whose
    log-probs (fixed prompt, greedy, a few tokens) equal the new version's, probed in a tight loop
    concurrently with the swap call; N swaps alternating between the two versions;
(b) failed requests while K client threads send completions (half streamed) in a loop and M swaps
    happen: must be 0 (the process exits 1 otherwise);
(c) throughput (generated tokens/s, C concurrent clients, R requests, fixed max_tokens, ignore_eos)
    on adapter "x" (same weights on both servers), rounds interleaved ABBA..., medians and their ratio;
(d) the cost of recording traffic: a third server, "traffic", is the plugin server with
    VLLM_SURGERY_TRAFFIC=1 (every request of "x" recorded, built-in redaction, its own store and
    database: a SQLite file, or with --database postgres a private Postgres server); throughput with recording on ("traffic") / off ("plugin"), half the requests streamed,
    rounds interleaved, medians and their ratio; the writer queue's peak depth; and a check that the
    traffic server recorded exactly one record per request (none dropped).

The second version is the original adapter with freshly drawn lora_B matrices, recorded in the store
with a servable surgery.json (decision "forced" and the original's content hash) exactly as refine()
would leave it; the benchmark measures serving, not refinement.

    .venv/bin/python benchmarks/serving.py                  # tiny random Llama, ~3-5 min on 2 cores
    .venv/bin/python benchmarks/serving.py --sections d     # only (d): recording on / off
    .venv/bin/python benchmarks/serving.py --sections d --database postgres  # (d) recording to Postgres
    .venv/bin/python benchmarks/serving.py --model default  # embedded SmolLM2-135M
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from vllm_surgery.server_process import REQUEST_TIMEOUT_S, STARTUP_TIMEOUT_S, start_server
from vllm_surgery.server_process import ServerProcess as Server
from vllm_surgery.testing import build_lora_adapter, build_tiny_llama

PROBE_TOKENS = 4
LOGPROB_TOL = 1e-4
ADMIN_TOKEN = "bench-admin-token"
NO_PLUGIN = "vllm_surgery_benchmark_none"  # matches no installed plugin: every plugin group is disabled


# --------------------------------------------------------------------------- model and adapters
def write_store_version(original: Path, store: Path, name: str, seed: int = 7) -> str:
    """A complete, servable store version of `name`: the original with re-drawn lora_B matrices."""
    from vllm_surgery.storage.store import VersionStore

    version_dir = VersionStore(store).new_version_dir(name)
    write_redrawn(original, version_dir, seed)
    return version_dir.name


def write_redrawn(original: Path, out: Path, seed: int) -> None:
    """Write into `out` the original's files with re-drawn lora_B matrices and the surgery.json
    refine() writes for a forced version (the benchmarks measure serving, not refinement)."""
    from safetensors.torch import load_file, save_file

    from vllm_surgery.adapter import PROVENANCE_NAME, load_adapter

    shutil.copytree(original, out, dirs_exist_ok=True)
    weights = out / "adapter_model.safetensors"
    tensors = load_file(weights)
    gen = torch.Generator().manual_seed(seed)
    for key, t in tensors.items():
        if "lora_B" in key:
            tensors[key] = (torch.randn(t.shape, generator=gen) * t.float().std()).to(t.dtype)
    save_file(tensors, weights, metadata={"format": "pt"})
    record = {
        "decision": "forced",
        "adapter_hash": load_adapter(original).content_hash(),
        "note": "benchmark",
    }
    (out / PROVENANCE_NAME).write_text(json.dumps(record) + "\n")


# --------------------------------------------------------------------------- servers
def launch(label: str, base: Path, workdir: Path, env_extra: dict[str, str], extra: list[str]) -> Server:
    """Start one server without waiting (servers start in parallel; wait_healthy() each later)."""
    return start_server(base, workdir, env_extra, extra, label=label, wait=False, timeout=STARTUP_TIMEOUT_S)


# --------------------------------------------------------------------------- requests
def probe(server: Server, ids: list[int], stream: bool = False) -> list[float]:
    """Greedy continuation log-probs of a fixed prompt on "x" (streamed or not): a fingerprint of the
    weights serving it. Raises RuntimeError on a failed request or a bad stream."""
    body = {"model": "x", "prompt": ids, "max_tokens": PROBE_TOKENS, "temperature": 0.0, "logprobs": 0}
    body["ignore_eos"] = True
    if not stream:
        status, out = server.post("/v1/completions", body)
        if status != 200:
            raise RuntimeError(f"{server.label}: probe failed: {status} {out}")
        return [float(v) for v in out["choices"][0]["logprobs"]["token_logprobs"]]
    body["stream"] = True
    status, _, raw = server.raw_request("POST", "/v1/completions", body)
    text = raw.decode()
    if status != 200 or "data: [DONE]" not in text or '"error"' in text:
        raise RuntimeError(f"{server.label}: bad stream ({status}): {text[-300:]}")
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    got = [
        float(v)
        for e in events
        for c in e.get("choices", [])
        if c.get("logprobs")
        for v in c["logprobs"]["token_logprobs"]
    ]
    if len(got) != PROBE_TOKENS:
        raise RuntimeError(f"{server.label}: stream with {len(got)} log-probs: {text[-300:]}")
    return got


def same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b, strict=True)) < LOGPROB_TOL


def swap(server: Server, version: str) -> tuple[int, dict]:
    # The version here is "forced" (the gate did not judge it): an operator's swap says force.
    return server.post(
        "/v1/surgery/adapters/x/swap",
        {"version": version, "force": True},
        headers={"X-Surgery-Admin-Token": ADMIN_TOKEN},
    )


def completion_once(server: Server, ids: list[int], max_tokens: int, stream: bool) -> int:
    """One completion on "x"; returns the generated token count, raises on any failure."""
    body = {"model": "x", "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    if not stream:
        status, out = server.post("/v1/completions", body)
        if status != 200:
            raise RuntimeError(f"{status} {str(out)[:200]}")
        return int(out["usage"]["completion_tokens"])
    body.update(stream=True, stream_options={"include_usage": True})
    status, _, raw = server.raw_request("POST", "/v1/completions", body)
    text = raw.decode()
    if status != 200 or "data: [DONE]" not in text or '"error"' in text:
        raise RuntimeError(f"bad stream ({status}): {text[-200:]}")
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    return int(events[-1]["usage"]["completion_tokens"])


# --------------------------------------------------------------------------- measurements
def classify(lp: list[float], new: list[float], old: list[float]) -> str:
    if same(lp, new):
        return "new"
    if same(lp, old):
        return "old"
    if abs(lp[0] - old[0]) < LOGPROB_TOL:
        return "mixed"  # prefilled with the old weights, later tokens with the new: in flight during the swap
    return "other"


def measure_swap_latency(
    server: Server, ids: list[int], fingerprints: dict[str, list[float]], order: list[str]
) -> list[dict]:
    """Probes run back to back from the moment the swap call is sent until the new version answers,
    and then `settle` more probes after the swap call returned, to catch old or mixed weights served
    after the swap was acknowledged."""
    rows = []
    settle = 5
    for target in order:
        other = next(v for v in fingerprints if v != target)
        result: dict = {}

        def call(target: str = target, result: dict = result) -> None:
            result["status"], result["body"] = swap(server, target)
            result["returned"] = time.perf_counter()

        probes: list[tuple[float, float, str]] = []  # (sent, received, class)
        t0 = time.perf_counter()
        thread = threading.Thread(target=call)
        thread.start()
        first_new = None
        after_return = 0
        while time.perf_counter() - t0 < 60:
            sent = time.perf_counter()
            cls = classify(probe(server, ids), fingerprints[target], fingerprints[other])
            received = time.perf_counter()
            probes.append((sent, received, cls))
            if cls == "new" and first_new is None:
                first_new = received
            returned = result.get("returned")
            if returned is not None and sent > returned:
                after_return += 1
            if first_new is not None and returned is not None and after_return >= settle:
                break
        thread.join(timeout=REQUEST_TIMEOUT_S)
        if result.get("status") != 200 or not result["body"].get("changed"):
            raise RuntimeError(f"swap to {target} failed: {result}")
        if first_new is None:
            raise RuntimeError(f"version {target} never served within 60 s of its swap")
        returned = result["returned"]
        before = [c for s_, _, c in probes if s_ <= returned]
        after = [c for s_, _, c in probes if s_ > returned]
        rows.append(
            {
                "target": target,
                "first_new_s": first_new - t0,
                "call_s": returned - t0,
                "server_s": float(result["body"]["seconds"]),
                "inflight_mixed": sum(c == "mixed" for c in before),
                "inflight_other": sum(c == "other" for c in before),
                "probe_s": [r_ - s_ for s_, r_, _ in probes],
                "stale_after_return": sum(c != "new" for c in after),
                "after_classes": after,
                "last_not_new_after_return_s": max(
                    (r - returned for s_, r, c in probes if s_ > returned and c != "new"), default=0.0
                ),
            }
        )
        time.sleep(0.2)
    return rows


def swaps_under_load(
    server: Server, prompts: list[list[int]], versions: list[str], k: int, m: int, gap_s: float
) -> tuple[int, int, list[str]]:
    stop_flag = threading.Event()
    lock = threading.Lock()
    failures: list[str] = []
    done = [0]

    def client(i: int) -> None:
        n = 0
        while not stop_flag.is_set():
            try:
                completion_once(server, prompts[(i + n) % len(prompts)], 8, stream=bool((i + n) % 2))
            except Exception as e:  # every failure counts
                with lock:
                    failures.append(f"client {i}: {e!r}"[:300])
            else:
                with lock:
                    done[0] += 1
            n += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(k)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        for j in range(m):
            status, body = swap(server, versions[j % len(versions)])
            if status != 200 or not body.get("changed"):
                failures.append(f"swap {j} to {versions[j % len(versions)]}: {status} {body}")
            time.sleep(gap_s)
    finally:
        stop_flag.set()
        for t in threads:
            t.join(timeout=REQUEST_TIMEOUT_S)
    return done[0], len(failures), failures


def throughput(
    server: Server, prompts: list[list[int]], c: int, r: int, max_tokens: int, mixed: bool = False
) -> tuple[float, float]:
    """(generated tokens per wall second, server CPU seconds per 1000 generated tokens). With `mixed`,
    every other request is streamed."""
    cpu0 = server.cpu_seconds()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(c) as pool:
        tokens = list(
            pool.map(
                lambda i: completion_once(
                    server, prompts[i % len(prompts)], max_tokens, mixed and i % 2 == 1
                ),
                range(r),
            )
        )
    wall = time.perf_counter() - t0
    cpu = server.cpu_seconds() - cpu0
    if any(t != max_tokens for t in tokens):
        raise RuntimeError(
            f"{server.label}: expected {max_tokens} tokens per request, got {sorted(set(tokens))}"
        )
    return sum(tokens) / wall, 1000 * cpu / sum(tokens)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def logged_records(server: Server, outcome: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(server.text("/metrics")):
        for sample in family.samples:
            if (
                sample.name == "vllm_surgery_traffic_records_total"
                and sample.labels.get("outcome") == outcome
            ):
                return sample.value
    return 0.0


def queue_peak(server: Server) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(server.text("/metrics")):
        for sample in family.samples:
            if sample.name == "vllm_surgery_traffic_queue_peak_depth":
                return sample.value
    raise RuntimeError("vllm_surgery_traffic_queue_peak_depth missing: is recording on?")


def measure_recording(
    plugin: Server, traffic: Server, prompts: list[list[int]], probe_ids: list[int], args
) -> int:
    """(d): throughput with recording on / off. Returns the number of records lost (0 expected)."""
    status, body = swap(plugin, "original")  # same weights on both (a no-op unless a-c swapped)
    assert status == 200, body
    assert same(probe(traffic, probe_ids), probe(plugin, probe_ids)), "recording server serves other weights"
    sent = 1  # the probe
    for s in (plugin, traffic):  # warm-up
        throughput(s, prompts, args.concurrency, args.concurrency * 2, args.max_tokens, mixed=True)
    sent += args.concurrency * 2
    results: dict[str, list[float]] = {"traffic": [], "plugin": []}
    cpu: dict[str, list[float]] = {"traffic": [], "plugin": []}
    api_cpu: dict[str, list[float]] = {"traffic": [], "plugin": []}  # ms per request, API server only
    for i in range(args.rounds):
        for s in (traffic, plugin) if i % 2 == 0 else (plugin, traffic):
            api0 = s.cpu_seconds(api_server_only=True)
            tps, cpu_per_1k = throughput(
                s, prompts, args.concurrency, args.requests, args.max_tokens, mixed=True
            )
            api_cpu[s.label].append(1000 * (s.cpu_seconds(api_server_only=True) - api0) / args.requests)
            results[s.label].append(tps)
            cpu[s.label].append(cpu_per_1k)
    sent += args.rounds * args.requests
    med = {k: statistics.median(v) for k, v in results.items()}
    paired = [t / p for t, p in zip(results["traffic"], results["plugin"], strict=True)]
    print(
        f"\n(d) recording traffic on / off, adapter x, C={args.concurrency}, R={args.requests}, "
        f"max_tokens={args.max_tokens}, half streamed, {args.rounds} interleaved rounds, tokens/s"
    )
    for k, v in results.items():
        label = "on " if k == "traffic" else "off"
        print(f"    recording {label} median {med[k]:8.1f}   rounds {' '.join(f'{x:.1f}' for x in v)}")
    print(f"    per-round ratios on/off {' '.join(f'{x:.3f}' for x in paired)}")
    for k, v in cpu.items():
        print(
            f"    recording {'on ' if k == 'traffic' else 'off'} CPU: whole server {statistics.median(v):.2f} s per 1k "
            f"tokens; API-server process {statistics.median(api_cpu[k]):.2f} ms per request (medians)"
        )
    paired_median = statistics.median(paired)
    verdict = "meets" if paired_median >= 0.98 else "BELOW"
    print(
        f"    ratio of medians {med['traffic'] / med['plugin']:.3f}x; median of per-round ratios "
        f"{paired_median:.3f}x ({verdict} target >= 0.98x)"
    )
    deadline = time.monotonic() + 30
    while logged_records(traffic, "logged") < sent and time.monotonic() < deadline:
        time.sleep(0.2)
    logged, dropped = logged_records(traffic, "logged"), logged_records(traffic, "dropped")
    failed = logged_records(traffic, "failed")
    print(
        f"    requests sent to the recording server {sent}, records logged {logged:.0f}, dropped {dropped:.0f}, "
        f"failed {failed:.0f}; writer queue peak depth {queue_peak(traffic):.0f} (capacity 10000)"
    )
    return int(sent - logged + dropped + failed)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (random Llama), 'default' (SmolLM2) or a path")
    ap.add_argument("--swaps", type=int, default=10, help="N: swaps timed in (a)")
    ap.add_argument("--clients", type=int, default=4, help="K: client threads in (b)")
    ap.add_argument("--load-swaps", type=int, default=10, help="M: swaps under load in (b)")
    ap.add_argument("--concurrency", type=int, default=4, help="C: concurrent clients in (c)")
    ap.add_argument("--requests", type=int, default=16, help="R: requests per throughput round")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=10, help="throughput rounds per server (interleaved)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--sections", default="abcd", help="which measurements: a, b, c (run together) and/or d")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (server logs)")
    ap.add_argument(
        "--database",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="(d)'s recording server's database: a SQLite file in its work directory, or a private "
        "Postgres server (vllm_surgery/testing_servers.py: initdb into a temporary directory, removed "
        "afterwards)",
    )
    args = ap.parse_args(argv)
    run_abc, run_d = any(c in args.sections for c in "abc"), "d" in args.sections

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="vllm-surgery-bench-"))
    servers: list[Server] = []
    pg = None
    try:
        if args.model == "tiny":
            base = build_tiny_llama(work / "base", hidden=128, heads=2, kv_heads=2, intermediate=256)
        elif args.model == "default":
            from vllm_surgery.default_model import default_model_path

            base = default_model_path()
        else:
            base = Path(args.model)
        vocab = json.loads((base / "config.json").read_text())["vocab_size"]
        adapters = work / "adapters"
        original = build_lora_adapter(base, adapters / "x", r=args.rank, alpha=2 * args.rank)
        refined = write_store_version(original, work / "store", "x")
        gen = torch.Generator().manual_seed(0)
        prompts = [
            torch.randint(10, vocab, (int(n),), generator=gen).tolist() for n in (12, 16, 20, 24, 28, 32)
        ]
        probe_ids = prompts[1]

        plugin_env = {
            "VLLM_PLUGINS": "vllm_surgery,vllm_surgery_api",
            "VLLM_SURGERY_ADAPTER_DIRS": str(adapters),
            "VLLM_SURGERY_STORE": str(work / "store"),
            "VLLM_SURGERY_ADMIN_TOKEN": ADMIN_TOKEN,
        }
        plugin = launch("plugin", base, work, plugin_env, [])
        servers.append(plugin)
        if run_abc:
            # Runtime LoRA updating off: without the plugin nothing resolves adapters, and vllm-surgery-serve
            # refuses to open vLLM's runtime adapter routes unguarded (the engine flags stay identical).
            baseline_env = {"VLLM_PLUGINS": NO_PLUGIN, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "0"}
            baseline = launch("baseline", base, work, baseline_env, ["--lora-modules", f"x={original}"])
            servers.append(baseline)
        if run_d:
            # Its own store (so the plugin server's swaps never change what it serves) and database.
            traffic_env = {
                **plugin_env,
                "VLLM_SURGERY_STORE": str(work / "store-traffic"),
                "VLLM_SURGERY_TRAFFIC": "1",
            }
            if args.database == "postgres":
                from vllm_surgery.testing_servers import PostgresServer

                pg = PostgresServer().start()
                traffic_env["VLLM_SURGERY_DATABASE"] = pg.new_database()
                print(f"(d) records go to a private Postgres ({pg.bin.parent.name}) on port {pg.port}")
            traffic = launch("traffic", base, work, traffic_env, [])
            servers.append(traffic)
        for s in servers:
            s.wait_healthy(STARTUP_TIMEOUT_S)
        print(f"model {args.model} ({base}); servers healthy after {time.perf_counter() - started:.1f} s")
        failed = unexpected = bad = lost = 0

        if run_abc:
            # Plugin really active on one, really absent on the other.
            assert plugin.text("/metrics").count("vllm_surgery_") > 0, "plugin metrics missing"
            assert "vllm_surgery_" not in baseline.text("/metrics"), "baseline server has the plugin loaded"
            status, _ = baseline.post("/v1/surgery/adapters/x/swap", {"version": "original"})
            assert status == 404, f"baseline server answers /v1/surgery routes ({status})"

            fingerprints = {"original": probe(plugin, probe_ids)}
            assert same(probe(baseline, probe_ids), fingerprints["original"]), (
                "servers disagree on the original"
            )
            status, body = swap(plugin, refined)
            assert status == 200 and body["changed"], body
            fingerprints[refined] = probe(plugin, probe_ids)
            gap = max(
                abs(a - b) for a, b in zip(fingerprints["original"], fingerprints[refined], strict=True)
            )
            assert gap > 100 * LOGPROB_TOL, f"the two versions are indistinguishable by the probe ({gap})"

            # (a) swap latency
            order = ["original" if i % 2 == 0 else refined for i in range(args.swaps)]
            rows = measure_swap_latency(plugin, probe_ids, fingerprints, order)
            first = [r["first_new_s"] for r in rows]
            calls = [r["call_s"] for r in rows]
            srv = [r["server_s"] for r in rows]
            inflight = sum(r["inflight_mixed"] for r in rows)
            inflight_other = sum(r["inflight_other"] for r in rows)
            probe_s = [d for r in rows for d in r["probe_s"]]
            stale = sum(r["stale_after_return"] for r in rows)
            unexpected = stale
            print(f"\n(a) swap latency over {len(rows)} swaps (alternating original <-> {refined}), seconds")
            print(f"    {'':34s} {'median':>8s} {'p95':>8s} {'max':>8s}")
            for label, vals in (
                ("swap call -> first new response", first),
                ("swap call -> swap HTTP response", calls),
                ("server-side swap (body.seconds)", srv),
            ):
                print(
                    f"    {label:34s} {statistics.median(vals):8.3f} {pct(vals, 0.95):8.3f} {max(vals):8.3f}"
                )
            print(
                f"    one probe request ({PROBE_TOKENS} tokens) takes median {statistics.median(probe_s):.3f} s; "
                f"probes are sequential, so 'first new response' includes up to ~2 probe durations"
            )
            n_after = sum(len(r["after_classes"]) for r in rows)
            print(
                f"    probes in flight across a swap call: {inflight} answered with mixed versions "
                f"(prefill old, later tokens new), {inflight_other} other; probes sent AFTER the swap "
                f"call returned: {n_after}, of which not the new version: {stale}"
            )
            for i, r in enumerate(rows):
                if r["stale_after_return"]:
                    print(
                        f"    swap {i} -> {r['target'][:12]}: after return {r['after_classes']}, "
                        f"last non-new answer {r['last_not_new_after_return_s']:.3f} s after the call returned"
                    )

            # (b) failures under load
            done, failed, failures = swaps_under_load(
                plugin, prompts, ["original", refined], args.clients, args.load_swaps, 0.5
            )
            print(
                f"\n(b) {args.load_swaps} swaps under load, {args.clients} clients: "
                f"{done} requests ok, {failed} failed"
            )
            for f in failures[:5]:
                print("    ", f)

            # (c) throughput, same weights on both servers: the plugin server back on the original.
            status, body = swap(plugin, "original")
            assert status == 200, body
            assert same(probe(plugin, probe_ids), fingerprints["original"])
            for s in (plugin, baseline):  # warm-up
                throughput(s, prompts, args.concurrency, args.concurrency * 2, args.max_tokens)
            results: dict[str, list[float]] = {"plugin": [], "baseline": []}
            cpu: dict[str, list[float]] = {"plugin": [], "baseline": []}
            for i in range(args.rounds):
                pair = (plugin, baseline) if i % 2 == 0 else (baseline, plugin)
                for s in pair:
                    tps, cpu_per_1k = throughput(s, prompts, args.concurrency, args.requests, args.max_tokens)
                    results[s.label].append(tps)
                    cpu[s.label].append(cpu_per_1k)
            med = {k: statistics.median(v) for k, v in results.items()}
            ratio = med["plugin"] / med["baseline"]
            paired = [p / b for p, b in zip(results["plugin"], results["baseline"], strict=True)]
            print(
                f"\n(c) throughput, adapter x (rank {args.rank}), C={args.concurrency}, R={args.requests}, "
                f"max_tokens={args.max_tokens}, ignore_eos, {args.rounds} interleaved rounds, tokens/s"
            )
            for k, v in results.items():
                print(f"    {k:9s} median {med[k]:8.1f}   rounds {' '.join(f'{x:.1f}' for x in v)}")
            print(f"    per-round ratios plugin/baseline {' '.join(f'{x:.3f}' for x in paired)}")
            for k, v in cpu.items():
                print(
                    f"    {k:9s} server CPU s per 1k tokens: median {statistics.median(v):.2f}   "
                    f"rounds {' '.join(f'{x:.2f}' for x in v)}"
                )
            cpu_ratio = statistics.median(cpu["baseline"]) / statistics.median(cpu["plugin"])
            print(
                f"    CPU-efficiency ratio plugin/baseline (baseline CPU per token / plugin's) {cpu_ratio:.3f}x"
            )
            paired_median = statistics.median(paired)
            verdict = "meets" if paired_median >= 0.98 else "BELOW"
            print(
                f"    ratio of medians {ratio:.3f}x; median of per-round ratios {paired_median:.3f}x "
                f"({verdict} target >= 0.98x)"
            )

            # Cross-check with the plugin's own metrics.
            from prometheus_client.parser import text_string_to_metric_families

            fams = {f.name: f for f in text_string_to_metric_families(plugin.text("/metrics"))}
            swapped = sum(
                s.value
                for s in fams["vllm_surgery_hotswaps"].samples
                if s.name.endswith("_total") and s.labels.get("outcome") == "swapped"
            )
            bad = sum(
                s.value
                for s in fams["vllm_surgery_hotswaps"].samples
                if s.name.endswith("_total") and s.labels.get("outcome") not in ("swapped", "noop")
            )
            print(f"\nplugin /metrics: hotswaps swapped={swapped:.0f} other-than-swapped/noop={bad:.0f}")
        if run_d:
            lost = measure_recording(plugin, traffic, prompts, probe_ids, args)
        print(f"total wall time {time.perf_counter() - started:.1f} s")
        return 1 if failed or unexpected or bad or lost else 0
    finally:
        for s in servers:
            s.stop()
        if pg is not None:
            pg.stop()
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
