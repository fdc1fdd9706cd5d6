"""The refinement loop with real processes: one `vllm serve` (via `vllm-surgery-serve`) with traffic
and automatic refinement on, `vllm-surgery worker` processes, one SQLite file, one store.

Adapters are copies of the shared gain case (`vllm_surgery.testing.build_gain_case`): on its 48
calibration examples, half held out, the gate accepts a real gain, so every refinement here that is
given them is pinned to `accepted`. Job rows are read straight from the SQLite file and the store from
disk, never through the plugin's code; which version serves is checked on the server.

Slow (two engine starts, worker processes, about ten refinements of a tiny model):
`pytest -m slow tests/serving/test_worker.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from server import Server, start_server, stop

from vllm_surgery.calibration import ADAPTER_CALIBRATION_NAME
from vllm_surgery.testing import GAIN_SETTINGS, build_gain_case

pytestmark = pytest.mark.slow

API_KEY = "worker-api-key"
ADMIN_TOKEN = "worker-admin-token"
ADMIN = {"X-Surgery-Admin-Token": ADMIN_TOKEN}
NAMES = ("gain", "own", "thin", "fragile", "kill", "p1", "p2", "p3", "r1", "r2")
JOB_SETTINGS = {k: v for k, v in GAIN_SETTINGS.items() if k != "policy"}  # policy: a job's default, auto
WAIT_S = 600.0
HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("worker")
    case = build_gain_case(root / "case")
    adapters = root / "adapters"
    for name in NAMES:
        shutil.copytree(case.adapter, adapters / name)
    records = case.records()
    (adapters / "own" / ADAPTER_CALIBRATION_NAME).write_text(case.calibration.read_text())
    env = {
        "VLLM_SURGERY_ADAPTER_DIRS": str(adapters),
        "VLLM_SURGERY_STORE": str(root / "store"),
        "VLLM_SURGERY_DATABASE": str(root / "surgery.sqlite3"),
        "VLLM_PLUGINS": "vllm_surgery,vllm_surgery_api",
        "VLLM_SURGERY_ADMIN_TOKEN": ADMIN_TOKEN,
        "VLLM_SURGERY_TRAFFIC": "1",
        "VLLM_SURGERY_TRAFFIC_REDACT": "none",
        "VLLM_SURGERY_FEEDBACK_TRUST": "api-key",  # the test's clients correct: their feedback counts
        "VLLM_SURGERY_AUTO_REFINE": "1",
        "VLLM_SURGERY_REFINE_MIN_EXAMPLES": "24",
        "VLLM_SURGERY_REFINE_NEW_EXAMPLES": str(len(records)),
        "VLLM_SURGERY_REFINE_MIN_INTERVAL_S": "0",
        "VLLM_SURGERY_REFINE_CHECK_INTERVAL_S": "1",
        "VLLM_SURGERY_REFINE_SETTINGS": json.dumps(JOB_SETTINGS),
    }
    return {
        "root": root,
        "base": case.base,
        "env": env,
        "records": records,
        "db": root / "surgery.sqlite3",
        "store": root / "store",
        "adapters": adapters,
        "workers": 0,
    }


def launch(setup: dict) -> Server:
    return start_server(
        setup["root"],
        setup["base"],
        setup["env"],
        ["--api-key", API_KEY],
        headers={"Authorization": f"Bearer {API_KEY}"},
    )


@pytest.fixture(scope="module")
def servers(setup: dict) -> Iterator[dict]:
    """{"now": the running server}; the restart test replaces it."""
    holder = {"now": launch(setup)}
    try:
        yield holder
    finally:
        left = stop(holder["now"].proc)
        assert not left, f"processes left behind after SIGTERM (killed now): {left}"


@pytest.fixture
def server(servers: dict) -> Server:
    return servers["now"]


class Worker:
    """One `vllm-surgery worker` process, its log in the test directory."""

    def __init__(self, setup: dict, url: str, *args: str, stop_in_refine: bool = False) -> None:
        """`stop_in_refine`: the worker stops itself (SIGSTOP) as it enters refine() (paused_worker.py)."""
        setup["workers"] += 1
        self.log = setup["root"] / f"worker-{setup['workers']}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_SURGERY_")}
        shared = (  # the server's: the worker finds what a job names where the server does
            "VLLM_SURGERY_STORE",
            "VLLM_SURGERY_DATABASE",
            "VLLM_SURGERY_ADMIN_TOKEN",
            "VLLM_SURGERY_ADAPTER_DIRS",
            "VLLM_SURGERY_CALIBRATION_DIR",
        )
        env.update({k: setup["env"][k] for k in shared if k in setup["env"]})
        launcher = [str(HERE / "paused_worker.py")] if stop_in_refine else ["-m", "vllm_surgery.cli"]
        cmd = [
            sys.executable,
            *launcher,
            "worker",
            "--server",
            url,
            "--device",
            "cpu",
            "--poll-interval",
            "0.5",
            "--owner",
            f"w{setup['workers']}",
            *args,
        ]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.owner = f"w{setup['workers']}"

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = WAIT_S) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"worker did not exit in {timeout:.0f} s:\n{self.text()[-3000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(60)


# ----------------------------------------------------------------------------- helpers
def jobs(setup: dict, where: str = "1", params: tuple = ()) -> list[dict]:
    """Job rows read straight from the SQLite file, spec and result decoded."""
    conn = sqlite3.connect(setup["db"])
    conn.row_factory = sqlite3.Row
    try:
        rows = [dict(r) for r in conn.execute(f"SELECT * FROM jobs WHERE {where} ORDER BY id", params)]
    finally:
        conn.close()
    for row in rows:
        row["spec"] = json.loads(row["spec"])
        row["result"] = json.loads(row["result"]) if row["result"] else None
    return rows


def wait_for(what: str, check, timeout: float = WAIT_S, logs: tuple = ()):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            tails = "\n".join(p.read_text(errors="replace")[-3000:] for p in logs)
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")
        time.sleep(0.25)
    return value


def finished_job(setup: dict, adapter: str, swap_done: bool = True, logs: tuple = ()) -> dict:
    """The adapter's only job, once it is finished (and, for an accepted one, swapped in)."""

    def done():
        rows = jobs(setup, "adapter = ?", (adapter,))
        last = rows[-1] if rows else {"state": None}
        finished = last["state"] in ("accepted", "kept_original", "failed")
        swapped = not swap_done or last["state"] != "accepted" or last["swap"] in ("done", "failed")
        return rows if finished and swapped else None

    rows = wait_for(f"the job of {adapter!r} to finish", done, logs=logs)
    assert len(rows) == 1, rows
    return rows[0]


def queue(server: Server, adapter: str, **body) -> int:
    status, got = server.post(f"/v1/surgery/adapters/{adapter}/refine", {**JOB_SETTINGS, **body}, ADMIN)
    assert status == 202 and got["state"] == "queued" and got["queued"], got
    return got["job_id"]


def complete(server: Server, model: str, prompt: str, rid: str | None = None) -> int:
    headers = {"X-Request-Id": rid} if rid else None
    status, _ = server.post("/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 1}, headers)
    return status


def versions_on_disk(setup: dict, adapter: str) -> list[str]:
    """Complete versions: directories of the store with a surgery.json (what readers can see)."""
    base = setup["store"] / adapter
    if not base.is_dir():
        return []
    return sorted(
        p.name for p in base.iterdir() if not p.name.startswith(".") and (p / "surgery.json").is_file()
    )


def served(server: Server, adapter: str) -> str | None:
    status, body = server.get(f"/v1/surgery/adapters/{adapter}")
    assert status == 200, body
    return body["served_version"]


def metrics(server: Server) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(server.text("/metrics")):
        for s in family.samples:
            if s.name.startswith("vllm_surgery"):
                out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


def sample(values: dict, name: str, **labels: str) -> float | None:
    return values.get((name, *sorted(labels.items())))


def check_accepted(setup: dict, server: Server, job: dict, examples: int) -> str:
    """An accepted, swapped-in job: figures, a complete version on disk, served by the server."""
    result = job["result"]
    assert (job["state"], result["decision"], job["swap"], job["error"]) == (
        "accepted",
        "accept",
        "done",
        None,
    ), job
    assert result["quality_after"]["loss"] < result["quality_before"]["loss"]
    assert (
        result["calibration"]["examples"] == examples
        and result["calibration"]["heldout_examples"] == examples // 2
    )
    assert result["gate"]["accepted"] and result["gate"]["p_value"] <= 0.025
    for stage in ("queued", "calibration", "sensitivity", "evaluation", "write", "swap", "total"):
        assert result["timings"][stage] >= 0, stage
    version = result["version"]
    assert version in versions_on_disk(setup, job["adapter"])
    assert served(server, job["adapter"]) == version
    served_json = json.loads((setup["store"] / job["adapter"] / "served.json").read_text())
    assert served_json["version"] == version
    return version


# ----------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def first_worker(servers: dict, setup: dict) -> Iterator[Worker]:
    worker = Worker(setup, servers["now"].url)
    try:
        yield worker
    finally:
        assert worker.stop() == 0, worker.text()[-3000:]


def test_traffic_with_feedback_is_refined_and_swapped_in_without_a_person(
    server, setup, first_worker
) -> None:
    """48 answered requests corrected by their users -> a new_data job -> the worker -> accepted ->
    swapped in -> the figures on /metrics."""
    records = setup["records"]
    for i, record in enumerate(records):
        assert complete(server, "gain", record["prompt"], rid=f"gain-{i}") == 200
        status, body = server.post(
            "/v1/surgery/feedback", {"request_id": f"gain-{i}", "correction": record["completion"]}
        )
        assert status == 200, body
    job = finished_job(setup, "gain", logs=(first_worker.log, server.log_path))
    assert job["trigger"] == "new_data" and job["attempts"] == 1
    assert job["spec"]["calibration"]["source"] == "adapter" and job["spec"]["config"]["policy"] == "auto"
    version = check_accepted(setup, server, job, len(records))
    assert f"{len(records)} corrected" in job["result"]["calibration"]["summary"]
    # the refined version answers now, and the traffic log says so
    assert complete(server, "gain", "what is 1 + 2 ?", rid="gain-after") == 200
    deadline = time.monotonic() + 30
    while True:
        status, body = server.get("/v1/surgery/traffic/gain?limit=1000", ADMIN)
        row = [r for r in body["records"] if r["request_id"] == "gain-after"]
        if row or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert row and row[0]["version"] == version
    # /metrics agrees with the job row (read from the database at scrape time)
    values = metrics(server)
    before, after = job["result"]["quality_before"]["loss"], job["result"]["quality_after"]["loss"]
    assert sample(values, "vllm_surgery_jobs_finished_total", adapter="gain", outcome="accepted") == 1
    assert sample(values, "vllm_surgery_job_heldout_loss", adapter="gain", which="before") == pytest.approx(
        before
    )
    assert sample(values, "vllm_surgery_job_heldout_loss", adapter="gain", which="after") == pytest.approx(
        after
    )
    assert sample(values, "vllm_surgery_heldout_loss", adapter="gain", which="before") == pytest.approx(
        before
    )
    assert sample(values, "vllm_surgery_heldout_loss", adapter="gain", which="after") == pytest.approx(after)
    assert sample(values, "vllm_surgery_served_version_info", adapter="gain", version=version) == 1
    assert sample(values, "vllm_surgery_jobs", state="queued") == 0
    assert sample(values, "vllm_surgery_job_queue_oldest_age_seconds") == 0
    assert sample(values, "vllm_surgery_job_stage_seconds_count", stage="sensitivity") >= 1
    # the job routes show the same
    status, listed = server.get("/v1/surgery/jobs?adapter=gain")
    assert status == 200 and [j["id"] for j in listed["jobs"]] == [job["id"]]
    status, shown = server.get(f"/v1/surgery/jobs/{job['id']}")
    assert status == 200 and (shown["state"], shown["version"], shown["swap"]) == (
        "accepted",
        version,
        "done",
    )
    assert shown["quality_after"]["loss"] == pytest.approx(after) and "records" not in json.dumps(
        shown["spec"]
    )
    # the same refinement asked by a person: answered from the store at once, nothing queued
    status, hit = server.post(
        "/v1/surgery/adapters/gain/refine", {"from_traffic": True, **JOB_SETTINGS}, ADMIN
    )
    assert status == 200 and hit["cached"] and (hit["decision"], hit["version"]) == ("accept", version), hit
    assert hit["served_version"] == version and len(jobs(setup, "adapter = 'gain'")) == 1


def test_an_adapters_own_calibration_file_refines_it_on_first_load(server, setup, first_worker) -> None:
    """No traffic at all: the first request resolves "own", which carries surgery_calibration.jsonl;
    the original answers at once, and the refined version is swapped in when accepted."""
    assert complete(server, "own", "what is 1 + 2 ?") == 200  # vLLM ignores the extra file
    job = finished_job(setup, "own", logs=(first_worker.log, server.log_path))
    assert job["trigger"] == "first_load" and job["spec"]["calibration"]["adapter_dir"].endswith("own")
    assert (
        f"{len(setup['records'])} from the adapter's own {ADAPTER_CALIBRATION_NAME}"
        in job["result"]["calibration"]["summary"]
    )
    version = check_accepted(setup, server, job, len(setup["records"]))
    assert not (
        setup["store"] / "own" / version / ADAPTER_CALIBRATION_NAME
    ).exists()  # not copied into versions
    assert complete(server, "own", "what is 1 + 2 ?") == 200


def test_the_first_worker_stops_cleanly(first_worker: Worker) -> None:
    assert first_worker.stop() == 0
    text = first_worker.text()
    assert "stopped after 2 job(s)" in text, text[-3000:]
    assert "Traceback" not in text


def test_failed_jobs_are_recorded_and_the_adapters_keep_serving(server, setup) -> None:
    records = setup["records"]
    thin = queue(server, "thin", records=records[:4])
    assert complete(server, "fragile", "what is 1 + 2 ?") == 200  # loaded by the engine before it breaks
    fragile = queue(server, "fragile", records=records)
    weights = setup["adapters"] / "fragile" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    worker = Worker(setup, server.url, "--drain")
    assert worker.wait() == 0, worker.text()[-3000:]
    (thin_job,) = jobs(setup, "id = ?", (thin,))
    assert thin_job["state"] == "failed" and thin_job["attempts"] == 1
    assert thin_job["error"].startswith("too little calibration data: 4 examples give 2 held-out example(s)")
    assert "needs at least 6 held out" in thin_job["error"]
    (fragile_job,) = jobs(setup, "id = ?", (fragile,))
    assert fragile_job["state"] == "failed" and "adapter_model.safetensors" in fragile_job["error"], (
        fragile_job
    )
    assert versions_on_disk(setup, "thin") == versions_on_disk(setup, "fragile") == []
    assert complete(server, "thin", "what is 1 + 2 ?") == 200
    assert complete(server, "fragile", "what is 1 + 2 ?") == 200
    assert served(server, "thin") == served(server, "fragile") == "original"
    values = metrics(server)
    assert sample(values, "vllm_surgery_jobs_finished_total", adapter="thin", outcome="failed") == 1
    assert sample(values, "vllm_surgery_jobs_finished_total", adapter="fragile", outcome="failed") == 1
    status, listed = server.get("/v1/surgery/jobs?state=failed")
    assert status == 200 and {j["id"] for j in listed["jobs"]} == {thin, fragile}


def stopped(worker: Worker) -> bool:
    """Whether a `stop_in_refine` worker stopped itself in refine() (its version directory reserved)."""
    if worker.proc.poll() is not None:
        pytest.fail(f"the worker exited ({worker.proc.returncode}):\n{worker.text()[-3000:]}")
    return Path(f"/proc/{worker.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def test_a_killed_worker_leaves_nothing_visible_and_another_finishes_its_job(server, setup) -> None:
    job_id = queue(server, "kill", records=setup["records"])
    first = Worker(setup, server.url, "--lease-seconds", "3", "--once", stop_in_refine=True)
    store = setup["store"] / "kill"
    wait_for("the first worker to enter refine()", lambda: stopped(first), logs=(first.log,))
    assert [p for p in store.iterdir() if not p.name.startswith(".") and p.is_dir()]  # reserved
    first.proc.kill()  # SIGKILL: no cleanup of any kind
    first.proc.wait(30)
    (row,) = jobs(setup, "id = ?", (job_id,))
    assert (row["state"], row["lease_owner"], row["attempts"]) == ("running", first.owner, 1)
    assert versions_on_disk(setup, "kill") == []  # nothing half-written is visible...
    status, info = server.get("/v1/surgery/adapters/kill")
    assert status == 200 and info["versions"] == [] and info["served_version"] in (None, "original")
    assert not (store / "served.json").exists()  # ...and nothing points at it
    second = Worker(setup, server.url, "--lease-seconds", "3")
    try:
        job = finished_job(setup, "kill", logs=(second.log, server.log_path))
    finally:
        assert second.stop() == 0
    assert job["attempts"] == 2 and job["lease_owner"] is None
    assert job["result"]["worker"].startswith(second.owner)
    version = check_accepted(setup, server, job, len(setup["records"]))
    assert versions_on_disk(setup, "kill") == [version]
    # the killed worker's reservation (and temporary directory, if it got that far) were removed
    assert sorted(p.name for p in store.iterdir()) == sorted([version, "served.json", ".writer.lock"])
    assert "leftover(s) of interrupted writes from the store" in second.text()


def test_two_workers_never_run_a_job_twice(server, setup) -> None:
    records = setup["records"]
    ids = [queue(server, name, records=records) for name in ("p1", "p2", "p3")]
    ids.append(queue(server, "p1", records=records, min_improvement=0.002))  # another key, same adapter
    workers = [Worker(setup, server.url, "--drain") for _ in range(2)]
    for w in workers:
        assert w.wait() == 0, w.text()[-3000:]
    rows = jobs(setup, f"id IN ({','.join('?' * len(ids))})", tuple(ids))
    assert [(r["state"], r["attempts"], r["swap"]) for r in rows] == [("accepted", 1, "done")] * 4, rows
    claimed = [
        [int(line.split("job ")[1].split()[0]) for line in w.text().splitlines() if "]: claimed" in line]
        for w in workers
    ]
    assert sorted(claimed[0] + claimed[1]) == sorted(ids), claimed  # each job claimed once, by one worker
    owners = {w.owner: set(c) for w, c in zip(workers, claimed, strict=True)}
    for r in rows:
        assert r["id"] in owners[r["result"]["worker"]]  # recorded by the worker that claimed it
    first_p1, second_p1 = (r for r in rows if r["adapter"] == "p1")
    assert first_p1["finished"] <= second_p1["started"]  # one adapter's jobs ran one after the other
    assert len(versions_on_disk(setup, "p1")) == 2
    assert versions_on_disk(setup, "p2") == [rows[1]["result"]["version"]]
    assert served(server, "p1") == second_p1["result"]["version"]  # the later accepted version serves


def test_jobs_queued_before_a_restart_run_after_it_and_pending_swaps_complete(servers, setup) -> None:
    """Last: restarts the module's server. r1 is refined while the server is down (its swap stays
    pending, and the restarted server swaps it in); r2 stays queued and runs after the restart. The
    worker starts while the server is up (it refuses to start without one) and is stopped in refine()
    until the server is gone: a server that goes away later does not stop a worker."""
    server = servers["now"]
    r1, r2 = (queue(server, name, records=setup["records"]) for name in ("r1", "r2"))
    worker = Worker(setup, server.url, "--once", stop_in_refine=True)
    wait_for("the worker to enter refine()", lambda: stopped(worker), logs=(worker.log,))
    assert not stop(server.proc)
    worker.proc.send_signal(signal.SIGCONT)
    assert worker.wait() == 0, worker.text()[-3000:]
    rows = {r["id"]: r for r in jobs(setup, "id IN (?, ?)", (r1, r2))}
    assert (rows[r1]["state"], rows[r1]["swap"]) == ("accepted", "pending")
    assert "unreachable" in rows[r1]["swap_error"]
    assert rows[r2]["state"] == "queued"
    # the log file is appended to by both servers; the first one's shutdown may log vLLM's own
    # EngineDeadError (mode=abort kills the engine under its output handler): read only the new one's
    before = server.log_path.stat().st_size
    servers["now"] = server = launch(setup)
    first = finished_job(setup, "r1", logs=(server.log_path,))  # swapped in by the server itself
    check_accepted(setup, server, first, len(setup["records"]))
    assert f"job {r1}: swapped in" in server.log_path.read_text()
    worker = Worker(setup, server.url, "--drain")
    assert worker.wait() == 0, worker.text()[-3000:]
    second = finished_job(setup, "r2", logs=(worker.log,))
    check_accepted(setup, server, second, len(setup["records"]))
    with server.log_path.open("rb") as log:
        log.seek(before)
        assert b"Traceback" not in log.read()
