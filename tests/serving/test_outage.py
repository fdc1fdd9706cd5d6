"""Postgres killed with SIGKILL (the postmaster and its children, vllm_surgery/testing_servers.py `kill`) and
started again on the same data directory and port, below the real-server test: the traffic writer holds its
batch and keeps the queue, and afterwards every record submitted is either stored or counted as dropped
(exactly the ones `submit` refused), with log lines naming the outage; a worker's running job survives
failed heartbeats and finishes after the outage, and a job queued during it runs next. Each test has a
private server (killing the session's would break the others)."""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

import vllm_surgery
from vllm_surgery.storage.database import Retention, TrafficRecord
from vllm_surgery.storage.postgres import PostgresDatabase
from vllm_surgery.storage.store import VersionStore
from vllm_surgery.testing import GAIN_SETTINGS, build_gain_case
from vllm_surgery.testing_servers import PostgresServer
from vllm_surgery.traffic import TrafficWriter
from vllm_surgery.worker.job_spec import job_spec, records_sha256
from vllm_surgery.worker.process import RefinementWorker, WorkerOptions

assert callable(vllm_surgery.refine)  # resolve the package's lazy export before taking the submodule
refine_module = sys.modules["vllm_surgery.refine"]


class Lines(logging.Handler):
    """The messages a logger emitted (its own handler: vLLM's loggers need not propagate)."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.DEBUG)
        self.logger, self.messages = logging.getLogger(name), []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> list[str]:
        self.logger.addHandler(self)
        self.level_before, self.logger.level = self.logger.level, logging.INFO
        return self.messages

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level_before)


@pytest.fixture
def private_postgres():
    server = PostgresServer().start()
    yield server
    server.stop()


def record(i: int, adapter: str) -> TrafficRecord:
    return TrafficRecord(
        request_id=f"r{i}",
        response_id=f"cmpl-r{i}",
        choice=0,
        adapter=adapter,
        version="original",
        endpoint="completions",
        prompt=f"prompt {i}",
        completion=f"answer {i}",
        sampling={},
        created=1000.0 + i,
        calibratable=True,
    )


def counted(adapter: str, outcome: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "vllm_surgery_traffic_records_total", {"adapter": adapter, "outcome": outcome}
        )
        or 0.0
    )


def test_the_writer_waits_out_a_killed_postgres_and_accounts_for_every_record(private_postgres) -> None:
    adapter = "outage-writer"  # its own label: the counters are the process's
    # a pool that gives up on a connection after 1 s: the writer meets the outage as an error here
    # (DatabaseUnavailable) and retries; with the default 30 s the pool's wait is the outage (the
    # real-server test, test_outage_server.py, runs that way)
    db = PostgresDatabase(private_postgres.new_database(), busy_timeout_s=1.0)
    writer = TrafficWriter(
        db, lambda item: [item], queue_size=40, retention=lambda a: Retention(), supervise_interval_s=0.2
    ).start()
    accepted, refused = [], []

    def send(n: int) -> None:  # 100 records a second, as a steady client would
        for _ in range(n):
            i = len(accepted) + len(refused)
            (accepted if writer.submit(record(i, adapter), adapter) else refused).append(f"r{i}")
            time.sleep(0.01)

    try:
        with Lines("vllm.vllm_surgery.traffic.writer") as log:
            send(50)
            assert writer.flush(10)
            killed = private_postgres.kill()
            assert len(killed) >= 2  # the postmaster and its children
            send(300)  # 3 s of traffic while the server is gone: the queue (40) fills, the rest is dropped
            assert writer.outage_s is not None and writer.up
            assert writer.health()["up"] is True
            private_postgres.start_again()
            deadline = time.monotonic() + 60  # the pool reconnects with a backoff of its own
            while writer.outage_s is not None:
                assert time.monotonic() < deadline, (
                    "the writer still finds no database 60 s after the restart"
                )
                time.sleep(0.1)
            send(50)
            assert writer.flush(60), "the writer did not catch up after Postgres came back"
            assert writer.outage_s is None
        stored = [r.record.request_id for r in db.records(adapter)]
        # exact accounting: what submit took is stored, each once; what it refused is counted as dropped
        assert sorted(stored) == sorted(accepted)
        assert len(stored) + len(refused) == 400
        assert counted(adapter, "dropped") == len(refused)
        assert counted(adapter, "logged") == len(stored)
        assert counted(adapter, "failed") == 0
        # the 100 before and after, plus what the queue and the held batch kept during the outage
        assert len(stored) >= 100 + 40 and len(refused) >= 300 - 40 - 256
        assert refused, "nothing was dropped: the outage was not felt"
        assert any(m.startswith("traffic: database outage: ") for m in log), log
        assert any("during a database outage of" in m for m in log), log
        assert any(m.startswith("traffic: database outage over after ") for m in log), log
        # recording goes on
        writer.submit(record(9999, adapter), adapter)
        assert writer.flush(10) and "r9999" in [r.record.request_id for r in db.records(adapter)]
    finally:
        writer.close(10)
        db.close()


def writer_with_retention_check(db: PostgresDatabase, check) -> TrafficWriter:
    """A started writer on `db` whose retention checks call `check(real_check, *args)` instead, watched by
    a supervisor that looks every 0.1 s."""
    real_check = db.enforce_retention
    db.enforce_retention = lambda *args, **kwargs: check(real_check, *args, **kwargs)
    return TrafficWriter(
        db, lambda item: [item], queue_size=40, retention=lambda a: Retention(), supervise_interval_s=0.1
    ).start()


def test_a_postgres_killed_during_a_retention_check_is_named_as_an_outage(private_postgres) -> None:
    """The writer can meet an outage in any of its database calls, not only in an insert: here Postgres is
    killed inside a real retention check, whose pool then waits for a connection (up to 20 s) until the
    server is back 5 s later. The supervisor names the outage and the call it is stuck in, `outage_s`
    shows it, and the check that then goes through ends it (a watch on inserts only logged nothing)."""
    adapter = "outage-retention"
    db = PostgresDatabase(private_postgres.new_database(), busy_timeout_s=20.0)
    during = {}

    def killed_inside(real_check, *args, **kwargs):
        if not during:
            during["killed"] = time.monotonic()
            private_postgres.kill()
            threading.Timer(5.0, private_postgres.start_again).start()
        return real_check(*args, **kwargs)

    writer = writer_with_retention_check(db, killed_inside)
    try:
        with Lines("vllm.vllm_surgery.traffic.writer") as log:
            writer.submit(record(0, adapter), adapter)
            deadline = time.monotonic() + 4.5  # within the 5 s the server is gone
            while writer.outage_s is None:
                assert time.monotonic() < deadline, f"no outage seen during the retention check: {log}"
                time.sleep(0.05)
            during["seen"] = time.monotonic()
            assert writer.flush(60), "the retention check did not end after Postgres came back"
            assert writer.outage_s is None
        assert during["seen"] - during["killed"] >= 2.0  # the watch's 2 s without an answer, not before
        began = [m for m in log if m.startswith("traffic: database outage: ")]
        assert len(began) == 1 and "the retention check of adapter 'outage-retention'" in began[0], log
        assert any(m.startswith("traffic: database outage over after ") for m in log), log
        assert [r.record.request_id for r in db.records(adapter)] == ["r0"]
    finally:
        writer.close(10)
        db.close()


def test_a_long_retention_sweep_of_short_queries_is_no_outage(private_postgres) -> None:
    """A retention check that takes 3 s in all, made of 15 short real queries (a large backlog deleted in
    short batches), is a busy database, not an unreachable one: nothing is logged as an outage and
    `outage_s` stays None, though the supervisor looks every 0.1 s."""
    adapter = "outage-long-sweep"
    db = PostgresDatabase(private_postgres.new_database(), busy_timeout_s=20.0)
    outage_seen = []

    def slow_sweep(real_check, *args, **kwargs):
        for _ in range(15):
            db.stats(adapter)  # one short query that gets its answer
            outage_seen.append(writer.outage_s)
            time.sleep(0.2)
        return real_check(*args, **kwargs)

    writer = writer_with_retention_check(db, slow_sweep)
    try:
        with Lines("vllm.vllm_surgery.traffic.writer") as log:
            began = time.monotonic()
            writer.submit(record(0, adapter), adapter)
            assert writer.flush(30)
            took = time.monotonic() - began
        assert took >= 3.0, took
        assert len(outage_seen) == 15 and set(outage_seen) == {None}
        assert not [m for m in log if "database outage" in m], log
    finally:
        writer.close(10)
        db.close()


def test_a_silent_maintenance_call_is_an_outage_whatever_other_threads_hear_and_ends_when_it_answers(
    private_postgres,
) -> None:
    """The writer's maintenance hook has no answer for 3 s while another thread's queries on the same
    database are answered every 0.1 s: the writer's own call counts (its connection may be the one cut
    off), so the outage is named; when the hook returns, the outage is over, though no record or
    retention check followed."""
    db = PostgresDatabase(private_postgres.new_database(), busy_timeout_s=20.0)
    stop, silent = threading.Event(), threading.Event()

    def chatter() -> None:  # another thread of the server, answered all along
        while not stop.is_set():
            db.stats()
            time.sleep(0.1)

    def silent_maintenance() -> None:
        if not silent.is_set():
            silent.set()
            time.sleep(3.0)

    other = threading.Thread(target=chatter, daemon=True)
    other.start()
    writer = TrafficWriter(
        db,
        lambda item: [item],
        queue_size=40,
        retention=lambda a: Retention(),
        maintenance=silent_maintenance,
        maintenance_interval_s=0.2,
        supervise_interval_s=0.1,
    ).start()
    try:
        with Lines("vllm.vllm_surgery.traffic.writer") as log:
            assert silent.wait(10)
            deadline = time.monotonic() + 2.8
            while writer.outage_s is None:
                assert time.monotonic() < deadline, f"the silent maintenance call was not named: {log}"
                time.sleep(0.05)
            deadline = time.monotonic() + 5
            while writer.outage_s is not None:
                assert time.monotonic() < deadline, f"the outage did not end when the call returned: {log}"
                time.sleep(0.05)
        began = [m for m in log if m.startswith("traffic: database outage: ")]
        assert len(began) == 1 and "the periodic maintenance has had no answer" in began[0], log
        assert any(m.startswith("traffic: database outage over after ") for m in log), log
    finally:
        stop.set()
        writer.close(10)
        other.join(5)
        db.close()


def test_a_killed_postgres_that_is_not_started_again_can_be_stopped() -> None:
    server = PostgresServer().start()
    root = server.root
    server.kill()
    server.stop()  # its stale pid file names a process that is gone: nothing to stop, only data to remove
    assert not root.exists()


def test_a_running_job_and_a_queued_one_finish_after_postgres_is_killed_and_back(
    private_postgres, tmp_path: Path, monkeypatch
) -> None:
    """The first job's refine() ends by killing Postgres (its outcome, its last cancel look and its
    heartbeats then meet the outage); Postgres is back 4 s later. The worker does not die: the first
    job is recorded as accepted once the database answers, the second (queued all along) runs next."""
    gain = build_gain_case(tmp_path / "gain")
    # callers give up on a connection after 1 s (the default waits 30 s, longer than this outage): the
    # heartbeats fail, the last cancel look and the outcome meet DatabaseUnavailable and are retried
    db = PostgresDatabase(private_postgres.new_database(), busy_timeout_s=1.0)
    shutil.copytree(gain.adapter, tmp_path / "adapters" / "x")
    shutil.copytree(gain.adapter, tmp_path / "adapters" / "y")
    options = WorkerOptions(
        server=None, device="cpu", lease_s=3, owner="w", adapter_dirs=(tmp_path / "adapters",)
    )
    worker = RefinementWorker(db, VersionStore(tmp_path / "store"), options)
    records = gain.records()
    source = {"source": "records", "records": records, "sha256": records_sha256(records)}
    ids = []
    for name in ("x", "y"):
        spec = job_spec(
            base_model=str(gain.base),
            adapter_path=tmp_path / "adapters" / name,
            config=GAIN_SETTINGS,
            calibration=source,
        )
        ids.append(db.enqueue_job(name, "manual", spec)[0].id)
    real_refine, outage = refine_module.refine, {}

    def refine_then_kill(*args, **kwargs):
        result = real_refine(*args, **kwargs)
        if not outage:
            outage["killed"] = time.monotonic()
            private_postgres.kill()

            def back() -> None:
                time.sleep(4)
                private_postgres.start_again()
                outage["back"] = time.monotonic()

            threading.Thread(target=back, daemon=True).start()
        return result

    monkeypatch.setattr(refine_module, "refine", refine_then_kill)
    try:
        with Lines("vllm_surgery.worker") as log:
            assert worker.run(drain=True) == 2
        jobs = [db.job(i) for i in ids]
        assert [(j.state, j.attempts, j.swap) for j in jobs] == [("accepted", 1, "done")] * 2
        assert jobs[0].finished > time.time() - (time.monotonic() - outage["back"]) - 0.5  # after it
        assert jobs[1].started >= jobs[0].finished
        assert any("heartbeat failed" in m for m in log), log
        assert any("database outage (try 1)" in m for m in log), log
        assert any("the database answers again after an outage of" in m for m in log), log
        assert [p.version for p in [db.served_pointer("x"), db.served_pointer("y")]] == [
            jobs[0].result["version"],
            jobs[1].result["version"],
        ]
    finally:
        db.close()
