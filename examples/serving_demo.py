"""The whole loop on the embedded default model, with no person in it: vLLM serves a trained adapter
with the vllm-surgery plugin, users send traffic and feedback, the companion worker refines the
adapter from that traffic, the quality gate decides, and an accepted version is swapped in (CPU, a few
minutes).

What it does, and why each step is there:

1. Builds (once) the embedded SmolLM2-135M-Instruct model, and trains (once, cached; the same adapter
   as ``examples/demo.py``) a rank-16 LoRA adapter for 3-digit addition in chat format. Addition has
   an exactly checkable answer, so "better" is measured by exact match, not by eye.
2. Starts a real vLLM server (``vllm-surgery-serve``) that serves the adapter as "addition" from an
   adapter root, with traffic recording and automatic refinement on, and a real ``vllm-surgery
   worker`` process beside it (on a GPU, vLLM gets half the card and the worker the rest).
3. Sends the calibration problems as chat requests (the "users"), and gives feedback the way users
   would: "good" for a right answer, a correction (the right answer) for a wrong one.
4. The server notices the new usable examples and queues a job; the worker takes it, builds the
   calibration set from the recorded traffic and feedback, runs Spectral Surgery with ``policy=auto``
   and the held-out gate, and, if a candidate measurably beats the original, the refined version is
   swapped in while the server keeps serving. The worker's progress is shown as it happens.
5. Measures greedy exact match on unseen test problems (transformers + PEFT, float32) for the original
   and the refined adapter, and prints the decision, held-out quality before/after, exact match, the
   served version and the relevant /metrics lines. Nothing is hard-coded: whatever the decision and the
   numbers are, they are reported as measured.

Everything it starts (vLLM and the worker) is stopped at the end, also on Ctrl-C or a failure.

Run:  python examples/serving_demo.py [--out DIR] [--traffic N] [--test N] [--threads N]
      (``python examples/demo.py`` is the offline version: refine() called directly, no server)
Outputs under --out/loop: the adapter root, the store, the SQLite database, vllm.log and worker.log.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import demo  # the task (3-digit addition in chat format), the cached adapter and the scorer
import torch

from vllm_surgery.default_model import default_model_path
from vllm_surgery.exact_match import sign_test
from vllm_surgery.server_process import ServerProcess, start_server, stop_process

ADAPTER = "addition"
MARKER = ".serving-demo"  # the loop folder is the demo's own: recreated on every run
STEPS = 6
# The server for the demo: float32 (comparable with the transformers scorer), short context, rank 16.
ENGINE_ARGS = (
    "--dtype",
    "float32",
    "--max-model-len",
    "512",
    "--enforce-eager",
    "--seed",
    "0",
    "--enable-lora",
    "--max-lora-rank",
    "16",
    "--max-loras",
    "1",
    "--max-num-seqs",
    "8",
)
# What the summary shows of /metrics: the job, quality, swap and feedback series.
METRIC_PREFIXES = (
    "vllm_surgery_jobs{",
    "vllm_surgery_jobs_finished_total",
    "vllm_surgery_job_queue_oldest_age_seconds",
    "vllm_surgery_job_swaps_pending",
    "vllm_surgery_job_heldout_loss",
    "vllm_surgery_heldout_loss",
    "vllm_surgery_served_version_info",
    "vllm_surgery_job_stage_seconds_sum",
    "vllm_surgery_hotswaps_total",
    "vllm_surgery_traffic_feedback_total",
    "vllm_surgery_calibration_examples",
)


def step(i: int, text: str) -> None:
    print(f"[{i}/{STEPS}] {text}", flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--out", type=Path, default=Path("demo-output"), help="output folder (default demo-output)"
    )
    p.add_argument(
        "--traffic",
        type=int,
        default=256,
        help="requests sent with feedback; they become the calibration set, half held out (default 256)",
    )
    p.add_argument("--test", type=int, default=300, help="unseen test problems for exact match (default 300)")
    p.add_argument("--concurrency", type=int, default=4, help="clients sending traffic at once (default 4)")
    p.add_argument(
        "--steps", type=int, default=100, help="LoRA training steps (default 100, as examples/demo.py)"
    )
    p.add_argument(
        "--job-timeout", type=float, default=1200.0, help="seconds to wait for the refinement (default 1200)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads of the scorer (default: torch's choice; 1 helps on a busy machine)",
    )
    p.add_argument("--cache-dir", type=Path, default=None, help="cache root (default $VLLM_SURGERY_CACHE)")
    args = p.parse_args(argv)
    if args.traffic < 16 or args.test < 1 or args.concurrency < 1:
        p.error("--traffic must be at least 16, --test and --concurrency positive")
    args.lr, args.batch_size = 1e-3, 8  # examples/demo.py's recipe: the same cached adapter
    return args


def prepare_loop_dir(out: Path) -> Path:
    """--out/loop belongs to this demo (marker file): removed and recreated, so every run starts from
    an empty store and database and the loop runs for real."""
    loop = out / "loop"
    if loop.exists():
        if not (loop / MARKER).is_file():
            sys.exit(f"{loop} exists and was not made by this demo; choose another --out")
        shutil.rmtree(loop)
    (loop / "adapters").mkdir(parents=True)
    (loop / MARKER).write_text("made by examples/serving_demo.py; removed by its next run\n")
    return loop


# --------------------------------------------------------------------------------------------------
# The processes
# --------------------------------------------------------------------------------------------------


class Worker:
    """The `vllm-surgery worker` process (its own session: the demo decides when it stops)."""

    def __init__(self, server_url: str, env: dict[str, str], log: Path) -> None:
        self.log = log
        cmd = [
            sys.executable,
            "-m",
            "vllm_surgery.cli",
            "worker",
            "--server",
            server_url,
            "--poll-interval",
            "1",
        ]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._seen = 0

    def new_lines(self) -> list[str]:
        """Worker log lines about jobs written since the last call (timestamps and logger names cut)."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return []
        fresh, self._seen = lines[self._seen :], len(lines)
        return [line.split(": ", 1)[-1] for line in fresh if " vllm_surgery.worker: job " in line]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # gives a running job back to the queue, then exits
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


# What the worker shares with the server: the store, the database, the admin token, the adapter roots.
WORKER_SETTINGS = (
    "VLLM_SURGERY_STORE",
    "VLLM_SURGERY_DATABASE",
    "VLLM_SURGERY_ADMIN_TOKEN",
    "VLLM_SURGERY_ADAPTER_DIRS",
)


def serving_env(loop: Path, token: str, traffic: int) -> dict[str, str]:
    """The plugin's settings for the server, and (WORKER_SETTINGS) for the worker."""
    return {
        "VLLM_SURGERY_STORE": str(loop / "store"),
        "VLLM_SURGERY_DATABASE": str(loop / "surgery.sqlite3"),
        "VLLM_SURGERY_ADMIN_TOKEN": token,
        "VLLM_SURGERY_ADAPTER_DIRS": str(loop / "adapters"),
        "VLLM_SURGERY_TRAFFIC": "1",
        "VLLM_SURGERY_AUTO_REFINE": "1",
        # the simulated users are this demo's only clients: their feedback counts as calibration data
        # (by default only a reviewer's does; see docs/security.md)
        "VLLM_SURGERY_FEEDBACK_TRUST": "api-key",
        # a job once all the traffic has its feedback; as examples/demo.py: auto, half held out
        "VLLM_SURGERY_REFINE_MIN_EXAMPLES": str(traffic),
        "VLLM_SURGERY_REFINE_NEW_EXAMPLES": str(traffic),
        "VLLM_SURGERY_REFINE_MIN_INTERVAL_S": "0",
        "VLLM_SURGERY_REFINE_CHECK_INTERVAL_S": "2",
        "VLLM_SURGERY_REFINE_SETTINGS": json.dumps({"heldout_fraction": 0.5}),
    }


# --------------------------------------------------------------------------------------------------
# Traffic, the job, the metrics
# --------------------------------------------------------------------------------------------------


def ask_and_rate(server: ServerProcess, i: int, problem: Any) -> bool:
    """One user: a chat request to the adapter, then feedback (good, or the right answer as a
    correction). Returns whether the served answer was right. Raises RuntimeError on a failed request."""
    rid = f"demo-{i}"
    body = {
        "model": ADAPTER,
        "messages": problem.messages(with_answer=False),
        "max_tokens": 8,
        "temperature": 0.0,
    }
    status, answer = server.post("/v1/chat/completions", body, {"X-Request-Id": rid})
    if status != 200:
        raise RuntimeError(f"request {rid} answered {status}: {answer}")
    right = (answer["choices"][0]["message"]["content"] or "").strip() == problem.answer
    feedback = (
        {"request_id": rid, "rating": "good"} if right else {"request_id": rid, "correction": problem.answer}
    )
    status, got = server.post("/v1/surgery/feedback", feedback)
    if status != 200:
        raise RuntimeError(f"feedback for {rid} answered {status}: {got}")
    return right


def send_traffic(server: ServerProcess, problems: Sequence[Any], concurrency: int) -> list[bool]:
    rights: list[bool] = []
    with ThreadPoolExecutor(concurrency) as pool:
        for right in pool.map(lambda ip: ask_and_rate(server, *ip), enumerate(problems)):
            rights.append(right)
            if len(rights) % 32 == 0 or len(rights) == len(problems):
                print(
                    f"      {len(rights):4d}/{len(problems)} answered and rated ({sum(rights)} right)",
                    flush=True,
                )
    return rights


def wait_for_job(server: ServerProcess, worker: Worker, timeout: float) -> dict[str, Any]:
    """The adapter's job, once it is finished (and, when accepted, swapped in); the worker's progress
    lines are printed as they appear. Raises TimeoutError."""
    deadline = time.monotonic() + timeout
    announced = None
    while True:
        for line in worker.new_lines():
            print(f"      worker: {line}", flush=True)
        status, listed = server.get(f"/v1/surgery/jobs?adapter={ADAPTER}")
        job = listed["jobs"][0] if status == 200 and listed["jobs"] else None
        if job is not None and job["id"] != announced:
            announced = job["id"]
            print(f"      server: queued job {job['id']} ({job['trigger']})", flush=True)
        if job is not None and job["state"] in ("kept_original", "failed"):
            return job
        if job is not None and job["state"] == "accepted" and job["swap"] not in (None, "pending"):
            for line in worker.new_lines():
                print(f"      worker: {line}", flush=True)
            return job
        if worker.proc.poll() is not None:
            raise RuntimeError(f"the worker exited ({worker.proc.returncode}); see {worker.log}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no finished job after {timeout:.0f} s; see {worker.log}")
        time.sleep(1.0)


def metric_lines(server: ServerProcess) -> list[str]:
    """The /metrics lines about the loop (this adapter, or no adapter label)."""
    out = []
    for line in server.text("/metrics").splitlines():
        if line.startswith(METRIC_PREFIXES) and ("adapter=" not in line or f'adapter="{ADAPTER}"' in line):
            if (
                "_stage_seconds_sum" in line
                and 'stage="total"' not in line
                and 'stage="sensitivity"' not in line
            ):
                continue
            out.append(line)
    return out


# --------------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    loop = prepare_loop_dir(args.out)

    step(1, "Embedded model (SmolLM2-135M-Instruct) and its trained addition adapter (both cached)")
    t = time.perf_counter()
    model_dir = default_model_path(args.cache_dir)
    adapter_dir, train_info, cached = demo.cached_adapter(model_dir, model_dir.parent.parent, args)
    timings["model and adapter"] = time.perf_counter() - t
    origin = "cached" if cached else f"trained in {train_info['seconds']:.0f} s"
    print(f"      {model_dir}\n      {adapter_dir} ({origin})")
    shutil.copytree(adapter_dir, loop / "adapters" / ADAPTER)
    rng = random.Random(f"demo-data-{args.seed}")  # the same test and calibration problems as demo.py
    test = demo.draw_problems(rng, args.test, eval_slice=True, exclude=set())
    traffic = demo.draw_problems(rng, args.traffic, eval_slice=True, exclude=set(test))

    token = secrets.token_hex(16)
    env = serving_env(loop, token, args.traffic)
    engine = list(ENGINE_ARGS)
    if torch.cuda.is_available():  # one GPU shared: vLLM half, the worker the rest (README: Sizing)
        engine += ["--gpu-memory-utilization", "0.5"]
    server: ServerProcess | None = None
    worker: Worker | None = None
    try:
        step(2, f"vLLM with the plugin serves {ADAPTER!r}; the refinement worker starts beside it (~30-90 s)")
        t = time.perf_counter()
        server = start_server(model_dir, loop, env, engine_args=engine, label="vllm")
        worker_env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_SURGERY_")}
        worker_env.update(
            {k: env[k] for k in WORKER_SETTINGS}  # the worker finds adapters by name under the same roots
        )
        worker = Worker(server.url, worker_env, loop / "worker.log")
        timings["server start"] = time.perf_counter() - t
        print(f"      {server.url} (log {server.log_path}); worker log {worker.log}")

        step(3, f"{args.traffic} users ask, and rate the answers (good, or a correction with the right sum)")
        t = time.perf_counter()
        rights = send_traffic(server, traffic, args.concurrency)
        timings["traffic"] = time.perf_counter() - t

        step(4, "The server queues a refinement job; the worker refines, the gate decides, accepted -> swap")
        t = time.perf_counter()
        job = wait_for_job(server, worker, args.job_timeout)
        timings["refinement job"] = time.perf_counter() - t
        status, info = server.get(f"/v1/surgery/adapters/{ADAPTER}")
        served = info.get("served_version") if status == 200 else None
        metrics = metric_lines(server)

        step(5, f"Exact match on {args.test} unseen problems (transformers + PEFT, greedy, float32)")
        t = time.perf_counter()
        adapters = {"original": loop / "adapters" / ADAPTER}
        if job.get("version") and job["state"] == "accepted":
            adapters["refined"] = loop / "store" / ADAPTER / job["version"]
        scores = demo.evaluate(model_dir, adapters, test, with_base=False)
        timings["exact match"] = time.perf_counter() - t
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the worker and vLLM", flush=True)
        return 130
    finally:
        step(6, "Stopping the worker and vLLM")
        if worker is not None:
            worker.stop()
        if server is not None:
            left = stop_process(server.proc)
            print(f"      stopped{' (processes had to be killed: ' + ', '.join(left) + ')' if left else ''}")
    timings["total"] = time.perf_counter() - t_start
    print_summary(args, job, rights, scores, served, metrics, timings, loop)
    if job["state"] == "failed":  # the loop did not run: the demo failed, whatever else it printed
        print(f"FAILED: the refinement job failed; see {loop / 'worker.log'}", file=sys.stderr)
        return 1
    return 0


def print_summary(
    args: argparse.Namespace,
    job: dict[str, Any],
    rights: list[bool],
    scores: dict[str, list[bool]],
    served: str | None,
    metrics: list[str],
    timings: dict[str, float],
    loop: Path,
) -> None:
    rule = "=" * 100
    print(f"\n{rule}\nSummary\n{rule}")
    print(
        f"traffic: {len(rights)} requests, {sum(rights)} answered right (rated good), "
        f"{len(rights) - sum(rights)} corrected by their users"
    )
    print(
        f"job {job['id']} ({job['trigger']}, attempt {job['attempts']}): {job['state']}"
        + (f", swap {job['swap']}" if job["swap"] else "")
    )
    if job["state"] == "failed":
        print(f"error:    {job['error']}")
    else:
        print(f"decision: {job['decision']}  (policy {job['policy']})")
        print(f"reason:   {job['reason']}")
    before, after = job.get("quality_before"), job.get("quality_after")
    if before and after:
        change = (after["loss"] - before["loss"]) / before["loss"]
        label = "refined (served)" if job["state"] == "accepted" else "best candidate (not written)"
        print(
            f"held-out answer loss (nats/token) on {job['calibration']['heldout_examples']} held-out examples:"
        )
        print(f"    original {before['loss']:.4f} -> {label} {after['loss']:.4f} ({100 * change:+.2f}%)")
    print(f"exact match on {args.test} unseen test problems:")
    for name, correct in scores.items():
        acc = sum(correct) / len(correct)
        se = math.sqrt(acc * (1 - acc) / len(correct))
        print(f"    {name + ' adapter':<20} {acc:6.1%}  (± {se:.1%} SE, {sum(correct)}/{len(correct)})")
    if "refined" in scores:
        fixed = sum(1 for o, r in zip(scores["original"], scores["refined"], strict=True) if r and not o)
        broken = sum(1 for o, r in zip(scores["original"], scores["refined"], strict=True) if o and not r)
        print(
            f"    refined vs original: {fixed} fixed, {broken} broken (sign test p = {sign_test(fixed, broken):.2f})"
        )
    print(f"served version of {ADAPTER!r} at the end: {served}")
    stages = job.get("timings") or {}
    shown = ", ".join(
        f"{k} {v:.1f} s"
        for k, v in stages.items()
        if k in ("queued", "load_model", "calibration", "sensitivity", "evaluation", "write", "swap", "total")
    )
    print(f"job stages: {shown}")
    print("/metrics (the loop's series):")
    for line in metrics:
        print(f"    {line}")
    print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"files: {loop} (vllm.log, worker.log, store/, surgery.sqlite3)")


if __name__ == "__main__":
    sys.exit(main())
