"""The job queue on a real database, each test on both backends (a SQLite file, a real Postgres server:
tests/conftest.py): enqueue and dedupe, claim, leases and heartbeats, expiry and take-over, one running
job per adapter (enforced by the database itself), bounded attempts, owner-only updates, pending swaps,
and two processes claiming from one database at once."""

from __future__ import annotations

import itertools
import multiprocessing
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from vllm_surgery.storage import open_database
from vllm_surgery.storage.database import DatabaseError, SQLiteDatabase, TrafficRecord
from vllm_surgery.testing_servers import run_sql

SPEC = {"calibration": {"source": "records", "records": [{"prompt": "1 +", "completion": " 1"}]}}


@pytest.fixture
def db(database_target):
    d = open_database(database_target)
    yield d
    d.close()


def test_enqueue_is_idempotent_by_key_among_active_jobs(db: SQLiteDatabase) -> None:
    first, created = db.enqueue_job("x", "manual", SPEC, "k", now=1.0)
    assert created and (first.state, first.attempts, first.trigger) == ("queued", 0, "manual")
    again, created = db.enqueue_job("x", "manual", {"other": 1}, "k", now=2.0)
    assert not created and again.id == first.id and again.spec == SPEC
    job = db.claim_job("w", 60, now=3.0)
    assert db.enqueue_job("x", "manual", SPEC, "k")[0].id == job.id  # running still holds the key
    assert db.fail_job(job.id, "w", "broken")
    retry, created = db.enqueue_job("x", "manual", SPEC, "k")  # a finished job frees the key...
    assert created and retry.id != first.id
    once, created = db.enqueue_job("x", "first_load", SPEC, "first:x", once=True)
    assert created
    db.claim_job("w", 60)  # takes retry (older), not once
    assert db.enqueue_job("x", "first_load", SPEC, "first:x", once=True) == (db.job(once.id), False)
    with pytest.raises(ValueError, match="trigger must be one of"):
        db.enqueue_job("x", "cron", SPEC)


def test_claim_takes_the_oldest_queued_job_and_sets_the_lease(db: SQLiteDatabase) -> None:
    ids = [db.enqueue_job(a, "manual", SPEC, now=float(i))[0].id for i, a in enumerate("abc")]
    job = db.claim_job("w1", 30, now=100.0)
    assert job.id == ids[0] and job.state == "running" and job.lease_owner == "w1"
    assert (job.lease_expires, job.heartbeat, job.started, job.attempts) == (130.0, 100.0, 100.0, 1)
    assert [db.claim_job("w2", 30, now=100.0).id, db.claim_job("w3", 30, now=100.0).id] == ids[1:]
    assert db.claim_job("w4", 30, now=100.0) is None


def test_one_running_job_per_adapter(db: SQLiteDatabase) -> None:
    a1 = db.enqueue_job("a", "manual", SPEC, now=1.0)[0]
    a2 = db.enqueue_job("a", "manual", SPEC, now=2.0)[0]
    b1 = db.enqueue_job("b", "manual", SPEC, now=3.0)[0]
    assert db.claim_job("w1", 30, now=10.0).id == a1.id
    assert db.claim_job("w2", 30, now=10.0).id == b1.id  # a2 waits: "a" has a running job
    assert db.claim_job("w3", 30, now=10.0) is None
    assert db.finish_job(a1.id, "w1", "kept_original", {"decision": "keep_original"}, now=11.0)
    assert db.claim_job("w3", 30, now=12.0).id == a2.id
    # the database itself refuses a second running job of one adapter, whatever the code above does
    # (SQLite: "UNIQUE constraint failed", Postgres: "violates unique constraint")
    a3 = db.enqueue_job("a", "manual", SPEC)[0]
    with pytest.raises(DatabaseError, match=r"(?i)unique constraint"):
        run_sql(
            db,
            "UPDATE jobs SET state = 'running', lease_owner = 'x', lease_expires = 1 WHERE id = ?",
            (a3.id,),
        )
    assert db.job(a3.id).state == "queued"


def test_heartbeat_renews_only_for_the_owner_and_expiry_hands_the_job_over(db: SQLiteDatabase) -> None:
    job = db.enqueue_job("a", "manual", SPEC, now=0.0)[0]
    db.enqueue_job("a", "manual", SPEC, now=1.0)  # queued behind it: never claimed while it runs
    assert db.claim_job("w1", 10, now=100.0).id == job.id
    assert db.heartbeat_job(job.id, "w1", 10, now=108.0)
    assert not db.heartbeat_job(job.id, "w2", 10, now=108.0)
    assert db.job(job.id).lease_expires == 118.0
    assert db.claim_job("w2", 10, now=117.0) is None  # renewed: still w1's
    taken = db.claim_job("w2", 10, now=118.5)  # w1 stopped beating: expired
    assert taken.id == job.id and taken.lease_owner == "w2" and taken.attempts == 2
    # the old owner learns it lost the job; nothing it says is recorded
    assert not db.heartbeat_job(job.id, "w1", 10, now=119.0)
    assert not db.finish_job(job.id, "w1", "accepted", {"version": "v-old"}, "pending")
    assert not db.fail_job(job.id, "w1", "late")
    assert db.finish_job(job.id, "w2", "accepted", {"version": "v"}, "pending", now=120.0)
    done = db.job(job.id)
    assert (done.state, done.version, done.swap, done.lease_owner, done.finished) == (
        "accepted",
        "v",
        "pending",
        None,
        120.0,
    )


def test_attempts_are_bounded(db: SQLiteDatabase) -> None:
    job = db.enqueue_job("a", "manual", SPEC, max_attempts=2, now=0.0)[0]
    assert db.claim_job("w1", 10, now=100.0).attempts == 1
    assert db.claim_job("w2", 10, now=111.0).attempts == 2  # w1 died
    assert db.claim_job("w3", 10, now=122.0) is None  # w2 died too: given up
    failed = db.job(job.id)
    assert failed.state == "failed" and failed.lease_owner is None
    assert "stopped 2 time(s) without finishing" in failed.error and "last worker w2" in failed.error
    assert "given up after 2 attempt(s)" in failed.error


def test_release_gives_the_job_back_without_counting_the_attempt(db: SQLiteDatabase) -> None:
    job = db.enqueue_job("a", "manual", SPEC)[0]
    db.claim_job("w1", 10)
    assert not db.release_job(job.id, "w2")
    assert db.release_job(job.id, "w1")
    back = db.job(job.id)
    assert (back.state, back.attempts, back.lease_owner) == ("queued", 0, None)
    assert db.claim_job("w2", 10).id == job.id


def test_swaps_pending_are_superseded_by_a_later_accepted_version(db: SQLiteDatabase) -> None:
    jobs = [db.enqueue_job("a", "manual", SPEC, now=float(i))[0] for i in range(3)]
    other = db.enqueue_job("b", "manual", SPEC, now=4.0)[0]
    for i, job in enumerate(jobs):
        assert db.claim_job("w", 10, now=10.0 + i).id == job.id
        assert db.finish_job(job.id, "w", "accepted", {"version": f"v{i}"}, "pending", now=20.0 + i)
    db.claim_job("w", 10, now=30.0)
    assert db.finish_job(other.id, "w", "accepted", {"version": "b0"}, "pending", now=31.0)
    assert db.set_job_swap(jobs[2].id, "done", seconds=0.25)
    assert db.pending_swaps() == [db.job(other.id)]  # a's older versions are outdated by v2
    assert [db.job(j.id).swap for j in jobs] == ["superseded", "superseded", "done"]
    assert db.job(jobs[2].id).result["timings"]["swap"] == 0.25
    assert not db.set_job_swap(db.enqueue_job("c", "manual", SPEC)[0].id, "done")  # not accepted


def test_usable_since_counts_examples_that_became_usable_after_a_time(db: SQLiteDatabase) -> None:
    def rec(i: int, created: float) -> TrafficRecord:
        return TrafficRecord(
            request_id=f"r{i}",
            choice=0,
            adapter="a",
            version="original",
            endpoint="completions",
            prompt="p",
            completion="c",
            sampling={},
            created=created,
            calibratable=True,
        )

    ids = db.insert([rec(i, 10.0 + i) for i in range(6)])
    empty = db.insert([replace(rec(6, 16.0), completion=" "), replace(rec(7, 17.0), completion="")])
    db.add_feedback(empty[0], "good", None, created=90.0)  # good, but nothing was answered: not usable
    db.add_feedback(empty[1], None, "the answer", created=90.0)  # a corrected empty answer: usable
    db.add_feedback(ids[0], "good", None, created=20.0)  # before
    db.add_feedback(ids[1], "good", None, created=50.0)  # after
    db.add_feedback(ids[2], None, "fixed", created=60.0)  # a correction, after
    db.add_feedback(ids[3], "bad", None, created=70.0)  # bad: never usable
    db.add_feedback(ids[0], "bad", "better", created=80.0)  # corrected later: newly usable
    assert db.usable_since("a", 40.0, include_unrated=False) == 4
    assert db.usable_since("a", 85.0, include_unrated=False) == 1
    assert db.usable_since("a", 0.0, include_unrated=True) == 6  # + r4, r5 (never rated)
    assert db.usable_since("a", 14.5, include_unrated=True) == 5  # r5 recorded at 15
    assert db.usable_since("b", 0.0, include_unrated=True) == 0
    # counted up to a threshold only (the automatic jobs' check): rated first, then unrated
    assert [db.usable_since("a", 0.0, True, at_most=n) for n in (1, 3, 4, 5, 6, 100)] == [1, 3, 4, 5, 6, 6]
    assert db.usable_since("a", 40.0, False, at_most=2) == 2


def test_figures_for_the_metrics(db: SQLiteDatabase) -> None:
    a = db.enqueue_job("a", "manual", SPEC, now=0.0)[0]
    db.enqueue_job("b", "manual", SPEC, now=5.0)
    db.enqueue_job("c", "manual", SPEC, now=7.0)
    db.claim_job("w", 10, now=8.0)
    result = {
        "version": "v",
        "quality_before": {"loss": 2.0},
        "quality_after": {"loss": 1.5},
        "timings": {"sensitivity": 3.0, "total": 4.0},
    }
    db.finish_job(a.id, "w", "accepted", result, "pending", now=9.0)
    db.claim_job("w", 10, now=9.0)
    figures = db.job_figures(now=10.0)
    assert figures.by_state == {
        "queued": 1,
        "running": 1,
        "accepted": 1,
        "kept_original": 0,
        "failed": 0,
        "cancelled": 0,
    }
    assert figures.finished == {("a", "accepted"): 1}
    assert figures.oldest_queued_age_s == 3.0 and figures.swaps_pending == 1
    assert figures.latest_quality == {"a": (2.0, 1.5)}
    # one job's stages, cumulative per bucket bound (0.05 ... 2.5 hold neither; 5.0 and above both)
    assert set(figures.stages) == {"sensitivity", "total"}
    for stage, seconds in (("sensitivity", 3.0), ("total", 4.0)):
        h = figures.stages[stage]
        assert h.buckets == (0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1)
        assert (h.count, h.total) == (1, seconds)


def _claim_all(target, owner: str, out: multiprocessing.Queue, ready, go) -> None:
    import time

    db = open_database(target)
    ready.release()
    go.wait(60)
    claimed = []
    held = {}  # job id -> (when its claim had returned, when its finish was called): this machine's clock
    while (job := db.claim_job(owner, 60)) is not None:
        claimed.append(job.id)
        got = time.time()
        time.sleep(0.005)  # some work while holding the job: the other process claims meanwhile
        held[job.id] = (got, time.time())
        assert db.finish_job(job.id, owner, "kept_original", {"by": owner})
    out.put((owner, claimed, held))
    db.close()


def _claim_in_processes(target, n: int, spans: dict[int, tuple[float, float]] | None = None):
    """`n` processes (spawned: each its own connection) claiming and finishing jobs until none is left,
    all started at once: ({owner: the job ids it claimed, in order}, seconds from start to the last).
    `spans` gets each job's (claimed, finishing) times as its process saw them."""
    import time

    ctx = multiprocessing.get_context("spawn")
    out, ready, go = ctx.Queue(), ctx.Semaphore(0), ctx.Event()
    procs = [ctx.Process(target=_claim_all, args=(target, f"p{i}", out, ready, go)) for i in range(n)]
    for p in procs:
        p.start()
    for _ in procs:
        assert ready.acquire(timeout=120)
    start = time.perf_counter()
    go.set()  # all start claiming at once
    owners = {}
    for _ in procs:
        owner, claimed, held = out.get(timeout=600)
        owners[owner] = claimed
        if spans is not None:
            spans.update(held)
    seconds = time.perf_counter() - start
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return owners, seconds


def test_two_processes_never_take_the_same_job(database_target) -> None:
    db = open_database(database_target)
    ids = {db.enqueue_job(f"adapter-{i % 7}", "manual", SPEC)[0].id for i in range(60)}
    owners, _ = _claim_in_processes(database_target, 2)
    results = list(owners.values())
    claimed = [i for r in results for i in r]
    assert sorted(claimed) == sorted(ids)  # every job exactly once
    assert all(results), results  # both took part
    jobs = db.jobs(limit=1000)
    assert {(j.state, j.attempts) for j in jobs} == {("kept_original", 1)}
    by = {j.id: j.result["by"] for j in jobs}  # each job finished by the process that claimed it
    assert by == {i: owner for owner, claimed in owners.items() for i in claimed}
    db.close()


def test_four_processes_on_a_thousand_jobs_lose_none_double_none_and_keep_each_adapters_order(
    database_target,
) -> None:
    """4 worker processes, each with its own connection (the claim/finish API, no model work: what a
    worker does around a job), on 1,000 jobs over 10 adapters, all claiming at once. Every job is
    claimed exactly once and finished by its claimer; per adapter, each job was claimed only after the
    one before it (in id order) had finished: the claims of one adapter ran one at a time, in id order.
    That order is read from the processes' own clock (a job's claim returned after the call finishing
    the one before it began), not from the jobs' `started`, which a claim takes before its statement
    runs."""
    db = open_database(database_target)
    ids = [db.enqueue_job(f"adapter-{i % 10}", "manual", SPEC)[0].id for i in range(1000)]
    spans: dict[int, tuple[float, float]] = {}
    owners, seconds = _claim_in_processes(database_target, 4, spans)
    claimed = [i for r in owners.values() for i in r]
    assert len(claimed) == len(set(claimed)) == 1000 and sorted(claimed) == ids  # none twice, none lost
    assert all(len(r) > 0 for r in owners.values()), {o: len(r) for o, r in owners.items()}
    jobs = db.jobs(limit=2000)
    assert len(jobs) == 1000 and {(j.state, j.attempts) for j in jobs} == {("kept_original", 1)}
    assert {j.id: j.result["by"] for j in jobs} == {i: o for o, r in owners.items() for i in r}
    for adapter in {j.adapter for j in jobs}:
        mine = sorted((j for j in jobs if j.adapter == adapter), key=lambda j: j.id)
        assert len(mine) == 100
        for before, after in itertools.pairwise(mine):
            assert spans[after.id][0] > spans[before.id][1], (adapter, before.id, after.id)
    print(f"\n4 processes, 1,000 jobs, 10 adapters ({database_target}): {seconds:.2f} s")
    db.close()


def test_a_cancelled_queued_job_is_never_claimed(db: SQLiteDatabase) -> None:
    job = db.enqueue_job("a", "manual", SPEC, "k", now=1.0)[0]
    cancelled, outcome = db.cancel_job(job.id, now=2.0)
    assert outcome == "cancelled"
    assert (cancelled.state, cancelled.finished, cancelled.lease_owner) == ("cancelled", 2.0, None)
    assert cancelled.error == "cancelled by an admin before it ran"
    assert db.claim_job("w", 30, now=3.0) is None
    again, created = db.enqueue_job("a", "manual", SPEC, "k", now=4.0)  # the key is free again
    assert created and again.id != job.id
    assert db.cancel_job(again.id + 1000) == (None, "unknown")


def test_a_running_job_is_marked_and_its_owner_ends_it_cancelled(db: SQLiteDatabase) -> None:
    job = db.enqueue_job("a", "manual", SPEC, now=1.0)[0]
    db.claim_job("w", 30, now=2.0)
    assert not db.cancel_requested(job.id)
    marked, outcome = db.cancel_job(job.id, now=3.0)
    assert (outcome, marked.state, marked.cancel_requested) == ("cancelling", "running", 3.0)
    assert db.cancel_requested(job.id)
    assert db.cancel_job(job.id, now=4.0)[0].cancel_requested == 3.0  # the first request's time stays
    assert not db.finish_cancelled(job.id, "someone-else")
    assert db.finish_cancelled(job.id, "w", {"worker": "w"})
    ended = db.job(job.id)
    assert (ended.state, ended.lease_owner, ended.result) == ("cancelled", None, {"worker": "w"})
    assert "wrote nothing" in ended.error
    finished, outcome = db.cancel_job(job.id)
    assert outcome == "finished" and finished.state == "cancelled"


def test_a_cancelled_job_is_not_taken_up_again_after_its_worker_died_or_stopped(db: SQLiteDatabase) -> None:
    died = db.enqueue_job("a", "manual", SPEC, now=1.0)[0]
    stopped = db.enqueue_job("b", "manual", SPEC, now=1.0)[0]
    db.claim_job("w1", 30, now=2.0)
    db.claim_job("w2", 30, now=2.0)
    db.cancel_job(died.id, now=3.0)
    db.cancel_job(stopped.id, now=3.0)
    assert db.release_job(stopped.id, "w2")  # SIGTERM: a cancelled job is not given back to the queue
    assert db.job(stopped.id).state == "cancelled"
    assert db.claim_job("w3", 30, now=100.0) is None  # w1's lease expired: cancelled, not claimed
    assert db.job(died.id).state == "cancelled" and db.job(died.id).lease_owner is None


def test_the_queue_is_bounded_per_adapter(db: SQLiteDatabase) -> None:
    from vllm_surgery.storage import JobQueueFull

    first = db.enqueue_job("a", "manual", SPEC, "k1", max_queued=2)[0]
    db.enqueue_job("a", "manual", SPEC, "k2", max_queued=2)
    db.claim_job("w", 30)  # running jobs count as well
    with pytest.raises(JobQueueFull, match=r"'a' already has 2 queued or running .*= 2\)"):
        db.enqueue_job("a", "manual", SPEC, "k3", max_queued=2)
    assert db.enqueue_job("a", "manual", SPEC, "k1", max_queued=2) == (db.job(first.id), False)
    assert db.enqueue_job("b", "manual", SPEC, "k3", max_queued=2)[1]  # another adapter's own bound
    assert db.finish_job(first.id, "w", "kept_original", {})
    assert db.enqueue_job("a", "manual", SPEC, "k4", max_queued=2)[1]  # a finished job frees a place
    assert len(db.jobs(adapter="a")) == 3


def test_a_version_2_database_keeps_its_jobs_and_gains_cancel(tmp_path: Path) -> None:
    """A database written before jobs could be cancelled: the migration keeps every row."""
    from vllm_surgery.storage.database import MIGRATIONS

    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    for migration in MIGRATIONS[:2]:
        for statement in migration.statements:
            conn.execute(statement)
    conn.execute(
        "INSERT INTO jobs (adapter, trigger, state, spec, created, max_attempts, lease_owner, lease_expires) "
        "VALUES ('a', 'manual', 'running', '{}', 1.0, 3, 'w', 99.0), ('b', 'manual', 'queued', '{}', 2.0, 3, "
        "NULL, NULL)"
    )
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    db = SQLiteDatabase(path)
    try:
        assert db.schema_version() == MIGRATIONS[-1].version  # every later step applied too
        assert [(j.adapter, j.state, j.lease_owner) for j in db.jobs()] == [
            ("b", "queued", None),
            ("a", "running", "w"),
        ]
        assert db.cancel_job(db.jobs(adapter="b")[0].id)[1] == "cancelled"
        with pytest.raises(DatabaseError, match="UNIQUE constraint failed"), db.transaction() as c:
            c.execute(  # the one-running-job-per-adapter index is back after the rebuild
                "INSERT INTO jobs (adapter, trigger, state, spec, created, max_attempts, lease_owner, "
                "lease_expires) VALUES ('a', 'manual', 'running', '{}', 3.0, 3, 'w2', 99.0)"
            )
    finally:
        db.close()
