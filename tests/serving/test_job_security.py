"""The job findings of the security review, end to end: one real `vllm serve` (via
`vllm-surgery-serve`) with an API key and an admin token, `vllm-surgery worker` processes, one SQLite
file, one store.

- Rows written straight into the database (as an attacker with access to the file would) that name an
  adapter or a calibration file outside every root fail in the worker, and the store stays untouched.
- Refine settings a job cannot run (samples 1e15, max_length 1e12, module names that are paths) are
  refused when queued, with a 400 naming the field and the limit.
- A bad setting as long as the body bound allows (1 MB) is answered in a message of about 2,000
  characters that still names the field and the allowed values.
- The queue holds at most VLLM_SURGERY_JOB_MAX_QUEUED jobs per adapter (429 naming the limit).
- Jobs can be cancelled by the admin: a queued one never runs, a running one is stopped by its worker,
  which writes nothing; a finished one answers 409; the API key alone may not cancel.
- The API key alone sees jobs without the server's paths and without the worker's host:pid.

Job rows are read straight from the SQLite file and the store from disk, never through the plugin's
code. Slow (one engine start, two short refinements of a tiny model):
`pytest -m "" tests/serving/test_job_security.py`.
"""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import time
from collections.abc import Iterator

import pytest
from server import Server, start_server, stop
from test_worker import JOB_SETTINGS, Worker, jobs, stopped, versions_on_disk, wait_for

from vllm_surgery.testing import build_gain_case

pytestmark = pytest.mark.slow

API_KEY = "security-api-key"
ADMIN_TOKEN = "security-admin-token"
ADMIN = {"X-Surgery-Admin-Token": ADMIN_TOKEN}
NAMES = ("victim", "bounded", "busy")
MAX_QUEUED = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("security")
    case = build_gain_case(root / "case")
    adapters = root / "adapters"
    for name in NAMES:
        shutil.copytree(case.adapter, adapters / name)
    calibration = root / "calibration"
    calibration.mkdir()
    (calibration / "gain.jsonl").write_text(case.calibration.read_text())
    outside = root / "outside"  # what an attacker controls: in no root of the server
    shutil.copytree(case.adapter, outside / "victim")
    (outside / "gain.jsonl").write_text(case.calibration.read_text())
    env = {
        "VLLM_SURGERY_ADAPTER_DIRS": str(adapters),
        "VLLM_SURGERY_CALIBRATION_DIR": str(calibration),
        "VLLM_SURGERY_STORE": str(root / "store"),
        "VLLM_SURGERY_DATABASE": str(root / "surgery.sqlite3"),
        "VLLM_PLUGINS": "vllm_surgery,vllm_surgery_api",
        "VLLM_SURGERY_ADMIN_TOKEN": ADMIN_TOKEN,
        "VLLM_SURGERY_JOB_MAX_QUEUED": str(MAX_QUEUED),
    }
    return {
        "root": root,
        "base": case.base,
        "env": env,
        "records": case.records(),
        "db": root / "surgery.sqlite3",
        "store": root / "store",
        "adapters": adapters,
        "calibration": calibration,
        "outside": outside,
        "workers": 0,
    }


@pytest.fixture(scope="module")
def server(setup: dict) -> Iterator[Server]:
    running = start_server(
        setup["root"],
        setup["base"],
        setup["env"],
        ["--api-key", API_KEY],
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    try:
        yield running
    finally:
        left = stop(running.proc)
        assert not left, f"processes left behind after SIGTERM (killed now): {left}"


def insert_row(setup: dict, adapter: str, spec: dict) -> int:
    """A queued job written by SQL, bypassing the server (an attacker with the database file)."""
    conn = sqlite3.connect(setup["db"])
    try:
        with conn:
            (job_id,) = conn.execute(
                "INSERT INTO jobs (adapter, trigger, state, spec, created, max_attempts) "
                "VALUES (?, 'manual', 'queued', ?, ?, 3) RETURNING id",
                (adapter, json.dumps(spec), time.time()),
            ).fetchone()
    finally:
        conn.close()
    return job_id


def store_files(setup: dict) -> list[str]:
    """Everything in the store but its lock files."""
    store = setup["store"]
    if not store.is_dir():
        return []
    return sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.name != ".writer.lock")


def refine(server: Server, adapter: str, headers: dict | None = None, **body) -> tuple[int, dict]:
    return server.post(f"/v1/surgery/adapters/{adapter}/refine", body, ADMIN if headers is None else headers)


# ----------------------------------------------------------------------------- finding 7
def test_rows_naming_paths_outside_the_roots_fail_and_the_store_is_untouched(server, setup) -> None:
    outside = setup["outside"]
    base = str(setup["base"])
    config = {"policy": "auto", **JOB_SETTINGS}
    records = setup["records"]
    inline = {"source": "records", "records": records, "sha256": "0" * 64}
    rows = {
        # a served adapter's name, but the row's path is the attacker's copy
        "the row's adapter_path": insert_row(
            setup,
            "victim",
            {
                "base_model": base,
                "adapter_path": str(outside / "victim"),
                "config": config,
                "calibration": inline,
            },
        ),
        # an adapter in no root at all
        "is not in any adapter root": insert_row(
            setup,
            "intruder",
            {
                "base_model": base,
                "adapter_path": str(outside / "victim"),
                "config": config,
                "calibration": inline,
            },
        ),
        # the right adapter, a calibration file outside the calibration directory
        "the row's calibration path": insert_row(
            setup,
            "victim",
            {
                "base_model": base,
                "adapter_path": str(setup["adapters"] / "victim"),
                "config": config,
                "calibration": {"source": "file", "name": "gain.jsonl", "path": str(outside / "gain.jsonl")},
            },
        ),
    }
    before = store_files(setup)
    worker = Worker(setup, server.url, "--drain")
    assert worker.wait() == 0, worker.text()[-3000:]
    for problem, job_id in rows.items():
        (row,) = jobs(setup, "id = ?", (job_id,))
        assert row["state"] == "failed" and row["result"].get("version") is None, row
        assert problem in row["error"] and "refused, nothing read or written" in row["error"], row["error"]
        assert "load_model" not in row["result"]["timings"]  # nothing was loaded either
    assert store_files(setup) == before == []
    assert versions_on_disk(setup, "victim") == versions_on_disk(setup, "intruder") == []
    status, info = server.get("/v1/surgery/adapters/victim")
    assert status == 200 and info["versions"] == [] and info["served_version"] in (None, "original")


# ----------------------------------------------------------------------------- finding 10
@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"samples": 1e15}, "'samples' is 1e+15; a refinement job allows at most 1,000,000"),
        ({"max_length": 1e12}, "'max_length' is 1e+12; a refinement job allows at most 1,048,576"),
        ({"modules": ["../../etc"]}, "'modules' entry '../../etc' is not a module name"),
    ],
)
def test_settings_a_job_cannot_run_are_refused_when_queued(server, setup, settings, needle) -> None:
    count = len(jobs(setup))
    status, body = refine(server, "bounded", records=setup["records"], **settings)
    assert status == 400, body
    assert needle in body["error"]["message"]
    assert len(jobs(setup)) == count  # nothing queued


def test_a_huge_bad_setting_is_refused_with_a_short_answer(server, setup) -> None:
    """A 1 MB gate_statistic (under the 16 MB refine body bound) is named, not echoed back whole."""
    count = len(jobs(setup))
    status, body = refine(server, "bounded", records=setup["records"], gate_statistic="z" * 1_000_000)
    assert status == 400, body
    message = body["error"]["message"]
    assert len(message) < 2_100, len(message)
    assert message.startswith("invalid settings: unknown gate_statistic 'zzz")
    assert message.endswith("gate_statistic must be one of both, signed_rank, t")
    assert "characters left out" in message
    assert len(jobs(setup)) == count  # nothing queued


def test_the_queue_is_bounded_and_jobs_are_cancelled_by_the_admin_only(server, setup) -> None:
    records = setup["records"]
    queued = []
    for seed in range(MAX_QUEUED):
        status, body = refine(server, "bounded", records=records, seed=seed + 1)
        assert status == 202 and body["queued"], body
        queued.append(body["job_id"])
    status, body = refine(server, "bounded", records=records, seed=99)
    assert status == 429, body
    message = body["error"]["message"]
    assert f"'bounded' already has {MAX_QUEUED} queued or running" in message
    assert f"VLLM_SURGERY_JOB_MAX_QUEUED = {MAX_QUEUED}" in message
    assert len(jobs(setup, "adapter = 'bounded'")) == MAX_QUEUED
    # the API key alone may not cancel
    status, body = server.post(f"/v1/surgery/jobs/{queued[0]}/cancel", {})
    assert status == 403 and "admin token" in body["error"]["message"], body
    assert jobs(setup, "id = ?", (queued[0],))[0]["state"] == "queued"
    # the admin cancels a queued job: it is over at once, and its place in the queue is free
    status, body = server.post(f"/v1/surgery/jobs/{queued[0]}/cancel", None, ADMIN)
    assert status == 200 and (body["state"], body["cancel"]) == ("cancelled", "cancelled"), body
    status, body = refine(server, "bounded", records=records, seed=99)
    assert status == 202, body
    queued.append(body["job_id"])
    status, body = server.post(f"/v1/surgery/jobs/{queued[0]}/cancel", {}, ADMIN)
    assert status == 409 and "already finished (cancelled)" in body["error"]["message"], body
    status, body = server.post("/v1/surgery/jobs/999999/cancel", {}, ADMIN)
    assert status == 404, body
    status, body = server.post(f"/v1/surgery/jobs/{queued[1]}/cancel", {"why": "x"}, ADMIN)
    assert status == 400 and "unknown field" in body["error"]["message"], body
    for job_id in queued[1:]:
        assert server.post(f"/v1/surgery/jobs/{job_id}/cancel", {}, ADMIN)[0] == 200
    # a worker never runs a cancelled job
    worker = Worker(setup, server.url, "--drain")
    assert worker.wait() == 0, worker.text()[-3000:]
    assert "stopped after 0 job(s)" in worker.text()
    rows = jobs(setup, "adapter = 'bounded'")
    assert [(r["state"], r["attempts"], r["started"]) for r in rows] == [("cancelled", 0, None)] * 3
    assert versions_on_disk(setup, "bounded") == []
    status, listed = server.get("/v1/surgery/jobs?adapter=bounded&state=cancelled")
    assert status == 200 and sorted(j["id"] for j in listed["jobs"]) == sorted(queued)


def test_a_running_job_cancelled_by_the_admin_is_stopped_and_writes_nothing(server, setup) -> None:
    """The worker is stopped in refine() (its version directory reserved, its lease held) while the
    cancel arrives; continued, it stops the job and writes nothing. Meanwhile the job's views differ:
    the admin sees paths and the worker's identity, the API key alone neither."""
    status, body = refine(server, "busy", calibration="gain.jsonl")
    assert status == 202, body
    job_id = body["job_id"]
    worker = Worker(setup, server.url, "--once", "--lease-seconds", "3", stop_in_refine=True)
    wait_for("the worker to enter refine()", lambda: stopped(worker), logs=(worker.log,))

    status, public = server.get(f"/v1/surgery/jobs/{job_id}")
    assert status == 200 and public["state"] == "running"
    text = json.dumps(public)
    assert public["lease_owner"] is None and public["spec"]["base_model"] is None
    assert str(setup["root"]) not in text and worker.owner not in text
    assert public["spec"]["adapter_path"] == "…/busy"
    assert public["spec"]["calibration"]["path"] == "…/gain.jsonl"
    status, listed = server.get("/v1/surgery/jobs?adapter=busy")
    assert (
        status == 200
        and str(setup["root"]) not in json.dumps(listed)
        and worker.owner not in json.dumps(listed)
    )
    status, full = server.get(f"/v1/surgery/jobs/{job_id}", ADMIN)
    assert status == 200 and full["lease_owner"] == worker.owner
    assert full["spec"]["adapter_path"] == str((setup["adapters"] / "busy").resolve())
    assert full["spec"]["calibration"]["path"] == str((setup["calibration"] / "gain.jsonl").resolve())

    status, body = server.post(f"/v1/surgery/jobs/{job_id}/cancel", {}, ADMIN)
    assert status == 202 and (body["state"], body["cancel"]) == ("running", "cancelling"), body
    assert body["job"]["cancel_requested"] is not None
    worker.proc.send_signal(signal.SIGCONT)
    assert worker.wait() == 0, worker.text()[-3000:]
    (row,) = jobs(setup, "id = ?", (job_id,))
    assert (row["state"], row["lease_owner"]) == ("cancelled", None), row
    assert "wrote nothing" in row["error"]
    assert versions_on_disk(setup, "busy") == []
    assert [p for p in (setup["store"] / "busy").iterdir() if p.name != ".writer.lock"] == []
    assert "cancelled by an admin; nothing was written" in worker.text()
    assert "Traceback" not in worker.text()
    status, info = server.get("/v1/surgery/adapters/busy")
    assert status == 200 and info["versions"] == []
