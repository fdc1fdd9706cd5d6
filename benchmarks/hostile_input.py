"""Benchmark: do the traffic and feedback routes answer hostile input in milliseconds, and does the
server stay responsive (and keep recording) meanwhile?

One real `vllm serve` (tiny random Llama, the plugin with traffic recording on, an API key and an admin
token) is started. For each case, the request is sent `--repeat` times and the median and the worst
latency are printed, with the ratio of the median to the benign request of the same route measured in
the same run (these machines are noisy: compare ratios, not seconds). While the hostile requests are
sent, a thread asks /health every 20 ms; its worst latency is printed too. At the end a benign request
must still be recorded: the process exits 1 if recording stopped, or if any case answered 5xx.

Cases (the attack each once was, or could be):
- completion, `user` a lone surrogate: once killed the traffic writer for the server's life;
- completion, 1 MiB of redaction-adversarial text in `user` (letters without "@"): the e-mail pattern
  was quadratic; redaction runs in the writer thread, never on the request path;
- feedback, a 32,000-letter correction (just within the 32 KiB correction bound): redacted before it is
  stored; a 60,000-letter one (within the 64 KiB body bound): refused (413) naming the bound;
- feedback, a correction with a lone surrogate: refused (400, naming the field: not a valid string);
- feedback for an unknown request id: once waited 5 s on a dead writer;
- feedback, a 1 MiB body: refused (413) before it is read whole;
- feedback, invalid JSON: refused (400).

    .venv/bin/python benchmarks/hostile_input.py [--repeat 5]      # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from vllm_surgery.server_process import ServerProcess, start_server
from vllm_surgery.testing import build_lora_adapter, build_tiny_llama

API_KEY = "bench-api-key"
ADMIN_TOKEN = "bench-admin-token"
HEALTH_EVERY_S = 0.02
MIB = 1024 * 1024


def timed(call: Callable[[], int], repeat: int) -> tuple[list[int], list[float]]:
    statuses, seconds = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        statuses.append(call())
        seconds.append(time.perf_counter() - t)
    return statuses, seconds


class HealthProbe(threading.Thread):
    """Asks /health every HEALTH_EVERY_S while running; keeps the worst latency."""

    def __init__(self, server: ServerProcess) -> None:
        super().__init__(daemon=True)
        self.server, self.worst, self.count = server, 0.0, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            t = time.perf_counter()
            status, _, _ = self.server.raw_request("GET", "/health", timeout=60)
            self.worst = max(self.worst, time.perf_counter() - t)
            self.count += 1
            if status != 200:
                self.worst = float("inf")
            self.done.wait(HEALTH_EVERY_S)


def completion(server: ServerProcess, request_id: str, **extra) -> Callable[[], int]:
    body = {"model": "x", "prompt": "hello there", "max_tokens": 4, "temperature": 0.0, **extra}
    data = json.dumps(body, ensure_ascii=True).encode()  # a lone surrogate travels as "\\ud800"
    return lambda: server.raw_request("POST", "/v1/completions", data, {"X-Request-Id": request_id})[0]


def feedback(server: ServerProcess, body: bytes) -> Callable[[], int]:
    return lambda: server.raw_request("POST", "/v1/surgery/feedback", body)[0]


def feedback_body(**fields) -> bytes:
    return json.dumps(fields, ensure_ascii=True).encode()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5, help="requests per case; median and worst (default 5)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, database)")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="vllm-surgery-hostile-"))
    base = build_tiny_llama(work / "base", hidden=128, heads=2, kv_heads=2, layers=2, intermediate=256)
    build_lora_adapter(base, work / "adapters" / "x", r=8, alpha=16)
    env = {
        "VLLM_PLUGINS": "vllm_surgery,vllm_surgery_api",
        "VLLM_SURGERY_ADAPTER_DIRS": str(work / "adapters"),
        "VLLM_SURGERY_STORE": str(work / "store"),
        "VLLM_SURGERY_DATABASE": str(work / "traffic.sqlite3"),
        "VLLM_SURGERY_ADMIN_TOKEN": ADMIN_TOKEN,
        "VLLM_SURGERY_TRAFFIC": "1",
    }
    t0 = time.perf_counter()
    server = start_server(
        base, work, env, ["--api-key", API_KEY], headers={"Authorization": f"Bearer {API_KEY}"}
    )
    print(f"server up in {time.perf_counter() - t0:.0f} s; work directory {work}")
    failed = False
    try:
        # Benign references, and a recorded request for the feedback cases to name.
        for i in range(2):  # warm-up: the adapter is loaded, the routes compiled
            completion(server, f"warm-{i}")()
        benign = {
            "completion": timed(completion(server, "benign"), args.repeat),
            "feedback": timed(
                feedback(server, feedback_body(request_id="benign", rating="good")), args.repeat
            ),
        }
        adversarial = "a" * MIB  # letters without "@": the old e-mail pattern's worst case
        cases: list[tuple[str, str, Callable[[], int], set[int]]] = [
            ("completion", "user: lone surrogate", completion(server, "h-surrogate", user="\ud800"), {200}),
            (
                "completion",
                "user: 1 MiB of letters",
                completion(server, "h-letters", user=adversarial),
                {200},
            ),
            (
                "feedback",
                "correction: 32,000 letters",
                feedback(server, feedback_body(request_id="benign", correction="a" * 32_000)),
                {200},
            ),
            (
                "feedback",
                "correction: 60,000 letters",
                feedback(server, feedback_body(request_id="benign", correction="a" * 60_000)),
                {413},
            ),
            (
                "feedback",
                "correction: lone surrogate",
                feedback(server, feedback_body(request_id="benign", correction="ok \ud800")),
                {400},
            ),
            (
                "feedback",
                "unknown request id",
                feedback(server, feedback_body(request_id="never-sent", rating="bad")),
                {404},
            ),
            (
                "feedback",
                "1 MiB body",
                feedback(server, feedback_body(request_id="benign", correction="a" * MIB)),
                {413},
            ),
            ("feedback", "invalid JSON", feedback(server, b'{"request_id": '), {400}),
        ]
        probe = HealthProbe(server)
        probe.start()
        results = [(route, name, *timed(call, args.repeat), want) for route, name, call, want in cases]
        probe.done.set()
        probe.join()

        print(f"\n{'route':<11} {'case':<28} {'status':>7} {'median ms':>10} {'worst ms':>9} {'/ benign':>9}")
        for route, (statuses, seconds) in benign.items():
            med = statistics.median(seconds)
            print(
                f"{route:<11} {'benign':<28} {statuses[0]:>7} {1000 * med:>10.1f} {1000 * max(seconds):>9.1f} "
                f"{1.0:>9.2f}"
            )
        for route, name, statuses, seconds, want in results:
            med = statistics.median(seconds)
            ratio = med / statistics.median(benign[route][1])
            bad = set(statuses) - want
            failed |= bool(bad)
            shown = ",".join(str(s) for s in sorted(set(statuses)))
            print(
                f"{route:<11} {name:<28} {shown:>7} {1000 * med:>10.1f} {1000 * max(seconds):>9.1f} "
                f"{ratio:>9.2f}{'   UNEXPECTED STATUS' if bad else ''}"
            )
        print(f"\n/health meanwhile: {probe.count} probes, worst {1000 * probe.worst:.1f} ms")
        failed |= probe.worst == float("inf")

        # Recording must still work after all of it.
        status = completion(server, "after-hostile")()
        deadline = time.monotonic() + 30
        recorded = False
        while time.monotonic() < deadline and not recorded:
            recorded = feedback(server, feedback_body(request_id="after-hostile", rating="good"))() == 200
            time.sleep(0.2)
        print(f"a benign request after the hostile ones: answered {status}, recorded: {recorded}")
        failed |= status != 200 or not recorded
    finally:
        server.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    if failed:
        print("FAILED: an unexpected status, a failed /health or recording stopped", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
