"""The record store's maintained counters (storage/counters.py) are exact: after a random mix of
inserts, feedback (changed ratings, corrections, untrusted clients, pruned histories), retention by
age, records and bytes, and deletes, on both backends, every count equals a full recount of the rows
done here in Python; the migration fills them for data written before it; the job counters and the
stage-duration histogram survive pruning of the job history; and the batched sweeps' transactions stay
short while a job claim interleaves with them."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import random
import threading
import time
from collections.abc import Iterator

import pytest

from vllm_surgery.storage import Retention, SQLiteDatabase, TrafficRecord, open_database
from vllm_surgery.storage import database as sqlite_module
from vllm_surgery.testing_servers import run_sql

WHITESPACE = " \t\n\r"
ADAPTERS = ("a", "b", "c")
VERSIONS = ("original", "v1")


@pytest.fixture
def db(database_target):
    d = open_database(database_target)
    yield d
    d.close()


def make_record(rng: random.Random, created: float) -> TrafficRecord:
    completion = rng.choice(["the answer", "  \n", "", "ok", "longer answer " * rng.randint(1, 5)])
    return TrafficRecord(
        request_id=f"r{rng.random()}",
        choice=0,
        adapter=rng.choice(ADAPTERS),
        version=rng.choice(VERSIONS),
        endpoint="completions",
        prompt="q" * rng.randint(0, 30),
        completion=completion,
        sampling={"temperature": 0},
        created=created,
        calibratable=rng.random() < 0.8,
    )


def recount(db) -> list[tuple]:
    """Every (adapter, version)'s stats from the raw rows, by the documented rules (written here, not
    taken from the package): the latest feedback of any client for rated/good/bad/corrected/untrusted,
    the latest trusted one for usable; unrated_usable: no trusted feedback at all."""
    traffic = run_sql(
        db, "SELECT id, adapter, version, calibratable, completion, bytes, created FROM traffic"
    )
    feedback = run_sql(db, "SELECT traffic_id, rating, correction, trusted FROM feedback ORDER BY id")
    latest, latest_trusted = {}, {}
    for tid, rating, correction, trusted in feedback:
        latest[tid] = (rating, correction, bool(trusted))
        if trusted:
            latest_trusted[tid] = (rating, correction)
    out: dict[tuple[str, str], list] = {}
    for tid, adapter, version, calibratable, completion, size, created in traffic:
        row = out.setdefault((adapter, version), [0] * 9 + [created, created])
        a, f = latest.get(tid), latest_trusted.get(tid)
        blank = not completion.strip(WHITESPACE)
        row[0] += 1
        row[1] += a is not None and a[0] is not None
        row[2] += a is not None and a[0] == "good"
        row[3] += a is not None and a[0] == "bad"
        row[4] += a is not None and a[1] is not None
        if f is not None and calibratable:
            if f[1] is not None:
                row[5] += bool(f[1].strip(WHITESPACE))
            elif f[0] == "good":
                row[5] += not blank
        row[6] += f is None and bool(calibratable) and not blank
        row[7] += a is not None and not a[2]
        row[8] += size
        row[9], row[10] = min(row[9], created), max(row[10], created)
    return [(adapter, version, *counts) for (adapter, version), counts in sorted(out.items())]


def stats_tuples(db) -> list[tuple]:
    return [tuple(s.to_dict().values()) for s in db.stats()]


def give_feedback(db, rng: random.Random, n: int) -> None:
    ids = [r[0] for r in run_sql(db, "SELECT id FROM traffic")]
    for record_id in rng.sample(ids, min(n, len(ids))):
        for _ in range(rng.randint(1, 3)):  # changed ratings: the latest wins
            rating = rng.choice(["good", "bad", None])
            correction = rng.choice([None, None, "fixed answer", " \t", "another fix"])
            if rating is None and correction is None:
                rating = "good"
            db.add_feedback(
                record_id, rating, correction, trusted=rng.random() < 0.7, keep=rng.choice([None, 1, 2])
            )


def test_counters_equal_a_full_recount_after_a_random_mix(db) -> None:
    rng = random.Random(1234)
    clock = 1000.0
    for round_ in range(4):
        records = []
        for _ in range(120):
            clock += rng.random()
            records.append(make_record(rng, clock))
        for start in range(0, len(records), 37):  # batches of several adapters and versions
            db.insert(records[start : start + 37])
        give_feedback(db, rng, 60)
        assert stats_tuples(db) == recount(db), f"after inserts and feedback, round {round_}"
        adapter = ADAPTERS[round_ % len(ADAPTERS)]
        limits = [
            Retention(max_age_s=clock - 1000.0 - 40.0 * (round_ + 1)),
            Retention(max_records=50 + 10 * round_),
            Retention(max_bytes=1500),
        ][round_ % 3]
        before = sum(s.records for s in db.stats(adapter))
        deleted, left = db.enforce_retention(adapter, limits, now=clock)
        assert deleted > 0 and left == before - deleted == sum(s.records for s in db.stats(adapter))
        if limits.max_bytes is not None:
            assert sum(s.bytes for s in db.stats(adapter)) <= 1500
        if limits.max_records is not None:
            assert left == limits.max_records
        assert stats_tuples(db) == recount(db), f"after retention {limits}, round {round_}"
        # a delete by hand (an operator's), with its feedback going with it
        run_sql(
            db, "DELETE FROM traffic WHERE id IN (SELECT id FROM traffic WHERE adapter = ? LIMIT 7)", ("b",)
        )
        assert stats_tuples(db) == recount(db), f"after a delete, round {round_}"
    # adapters() reads the counters: exactly the adapters that still have records
    assert [s.adapter for s in db.stats("a")] and db.adapters() == sorted({s.adapter for s in db.stats()})


def test_retention_by_bytes_keeps_the_newest_that_fit(db) -> None:
    base = dict(
        choice=0, adapter="x", version="original", endpoint="completions", sampling={}, calibratable=True
    )
    sizes = [10, 20, 30, 40, 50]
    db.insert(
        [
            TrafficRecord(request_id=f"r{i}", prompt=None, completion="x" * n, created=float(i), **base)
            for i, n in enumerate(sizes)
        ]
    )
    # each record's bytes: its completion, plus "{}" (2) for the sampling settings
    assert [r.bytes for r in db.records("x")] == [12, 22, 32, 42, 52]
    assert db.enforce_retention("x", Retention(max_bytes=94)) == (3, 2)  # 42 + 52 fit, + 32 does not
    assert [r.record.request_id for r in db.records("x")] == ["r3", "r4"]
    assert db.enforce_retention("x", Retention(max_bytes=94, max_records=1)) == (1, 1)


def write_old_schema(target, monkeypatch) -> None:
    """A database written before the counters existed: schema step 4, rows by plain SQL."""
    from vllm_surgery.storage import postgres as pg_module

    with monkeypatch.context() as m:
        m.setattr(sqlite_module, "MIGRATIONS", sqlite_module.MIGRATIONS[:4])
        m.setattr(sqlite_module, "SCHEMA_VERSION", 4)
        m.setattr(pg_module, "MIGRATIONS", pg_module.MIGRATIONS[:4])
        old = open_database(target)
        assert old.schema_version() == 4
        yes, no = (1, 0) if isinstance(old, SQLiteDatabase) else (True, False)
        rows = [
            ("x", "original", "fine", yes, 10.0),
            ("x", "original", "  ", yes, 11.0),
            ("x", "v1", "good one", yes, 12.0),
            ("y", "original", "token ids", no, 13.0),
        ]
        for i, (adapter, version, completion, calibratable, created) in enumerate(rows):
            run_sql(
                old,
                "INSERT INTO traffic (request_id, choice, adapter, version, endpoint, prompt, completion, "
                "sampling, calibratable, created, bytes) VALUES (?, 0, ?, ?, 'completions', '\"p\"', ?, '{}', "
                "?, ?, ?)",
                (f"r{i}", adapter, version, completion, calibratable, created, 5 + len(completion)),
            )
        ids = [r[0] for r in run_sql(old, "SELECT id FROM traffic ORDER BY id")]
        for tid, rating, correction, trusted in (
            (ids[0], "bad", None, yes),
            (ids[0], "good", None, yes),  # changed: good wins
            (ids[1], "bad", "a fix", yes),
            (ids[2], "good", None, no),  # untrusted
        ):
            run_sql(
                old,
                "INSERT INTO feedback (traffic_id, rating, correction, created, trusted) VALUES (?, ?, ?, 1.0, ?)",
                (tid, rating, correction, trusted),
            )
        result = {
            "timings": {"total": 4.0, "swap": 0.07},
            "quality_before": {"loss": 2.0},
            "quality_after": {"loss": 1.0},
        }
        for i, state in enumerate(("accepted", "failed", "queued")):
            run_sql(
                old,
                "INSERT INTO jobs (adapter, trigger, state, spec, created, max_attempts, result) "
                "VALUES ('x', 'manual', ?, '{}', ?, 3, ?)",
                (state, float(i), json.dumps(result) if state != "queued" else None),
            )
        old.close()


def test_the_migration_fills_the_counters_from_existing_rows(database_target, monkeypatch) -> None:
    write_old_schema(database_target, monkeypatch)
    db = open_database(database_target)
    try:
        assert stats_tuples(db) == recount(db)
        by = {(s.adapter, s.version): s for s in db.stats()}
        # fine (good) usable; blank (corrected "a fix") usable; v1 good but untrusted: unrated-usable
        assert (by["x", "original"].records, by["x", "original"].usable, by["x", "original"].corrected) == (
            2,
            2,
            1,
        )
        assert (by["x", "v1"].usable, by["x", "v1"].unrated_usable, by["x", "v1"].untrusted) == (0, 1, 1)
        assert (by["y", "original"].usable, by["y", "original"].unrated_usable) == (0, 0)
        # the feedback rows got their record's adapter: the new-data count finds them
        assert db.usable_since("x", 0.0, include_unrated=False) == 2
        assert db.usable_since("x", 0.0, include_unrated=True, at_most=10) == 3
        figures = db.job_figures(now=10.0)
        assert figures.by_state["accepted"] == 1 and figures.by_state["queued"] == 1
        assert figures.finished == {("x", "accepted"): 1, ("x", "failed"): 1}
        assert figures.latest_quality == {"x": (2.0, 1.0)}
        assert (figures.stages["total"].count, figures.stages["total"].total) == (2, 8.0)
        assert figures.stages["swap"].buckets[:2] == (0, 2)  # 0.07 s: in the 0.1 bucket, not 0.05
    finally:
        db.close()


def finish(db, adapter: str, state: str, now: float, seconds: float = 1.0, trigger: str = "manual") -> int:
    job, _ = db.enqueue_job(adapter, trigger, {}, now=now)
    claimed = db.claim_job("w", 60, now=now)
    assert claimed.id == job.id
    result = {"timings": {"total": seconds}, "quality_before": {"loss": 2.0}, "quality_after": {"loss": now}}
    if state == "failed":
        assert db.fail_job(job.id, "w", "broken", result, now=now)
    else:
        assert db.finish_job(job.id, "w", state, result, "done" if state == "accepted" else None, now=now)
    return job.id


def test_pruning_the_job_history_keeps_what_must_stay_and_the_counters(db) -> None:
    day = 86400.0
    first = finish(db, "x", "accepted", 0.0, trigger="first_load")  # first_load: kept whatever its age
    for i in range(5):
        finish(db, "x", "failed", 1.0 + i)
    pending, _ = db.enqueue_job("x", "manual", {}, now=10.0)
    db.claim_job("w", 60, now=10.0)
    db.finish_job(pending.id, "w", "accepted", {"timings": {"total": 2.0}}, "pending", now=10.0)
    kept_quality = finish(db, "x", "kept_original", 11.0)
    recent = [finish(db, "x", "failed", 40 * day + i) for i in range(3)]
    y = [finish(db, "y", "failed", 12.0 + i) for i in range(3)]
    before = db.job_figures(now=41 * day)
    # 30 days: the old failures of x and y go, except y's newest job
    assert db.prune_jobs(30 * day, None, now=41 * day) == 5 + 2
    left = {j.id for j in db.jobs(limit=1000)}
    assert left == {first, pending.id, kept_quality, *recent, y[-1]}
    # 2 per adapter: of x's finished jobs beyond its newest two, all but the protected go
    assert db.prune_jobs(None, 2, now=41 * day) == 1  # recent[0]
    assert {j.id for j in db.jobs(limit=1000)} == {first, pending.id, kept_quality, *recent[1:], y[-1]}
    after = db.job_figures(now=41 * day)
    # counters never go down; the gauge by state does; the histogram keeps every finished job
    assert (
        after.finished
        == before.finished
        == {("x", "accepted"): 2, ("x", "failed"): 8, ("x", "kept_original"): 1, ("y", "failed"): 3}
    )
    assert after.by_state["failed"] == 3 and before.by_state["failed"] == 11
    assert after.stages["total"].count == before.stages["total"].count == 14
    assert after.latest_quality == before.latest_quality == {"x": (2.0, 11.0)}


def test_a_swap_time_replaces_the_earlier_one_in_the_histogram(db) -> None:
    job_id = finish(db, "x", "accepted", 1.0, seconds=1.0)
    assert db.set_job_swap(job_id, "done", seconds=0.07)
    assert db.set_job_swap(job_id, "done", seconds=7.0)  # a second swap: the first no longer counts
    swap = db.job_figures().stages["swap"]
    assert (swap.count, swap.total, swap.buckets[1], swap.buckets[7]) == (1, 7.0, 0, 1)


@contextlib.contextmanager
def timed_transactions(cls: type, thread: threading.Thread) -> Iterator[list[tuple[float, float]]]:
    """While in the block, `cls.transaction` also notes (start, end) of every transaction that
    `thread` runs, into the list it yields."""
    holds: list[tuple[float, float]] = []
    original = cls.transaction

    def timed(self):
        cm = original(self)

        class Timed:
            def __enter__(inner):
                inner.start = time.perf_counter()
                return cm.__enter__()

            def __exit__(inner, *exc):
                try:
                    return cm.__exit__(*exc)
                finally:
                    if threading.current_thread() is thread:
                        holds.append((inner.start, time.perf_counter()))

        return Timed()

    cls.transaction = timed
    try:
        yield holds
    finally:
        cls.transaction = original


def test_a_sweep_is_short_transactions_that_a_job_claim_interleaves_with(db) -> None:
    """50k records, one sweep of 40k: the sweep is many small transactions, and job claims made
    meanwhile from another thread complete between them (one big transaction would hold them all
    back until its end). How long a batch holds the lock is a benchmark figure
    (benchmarks/record_store.py), not asserted here: this machine's timings are too noisy."""
    rng = random.Random(7)
    for start in range(0, 50_000, 5000):
        db.insert(
            [dataclasses.replace(make_record(rng, 1000.0 + start + i), adapter="x") for i in range(5000)]
        )
    waits = []
    done = threading.Event()

    def claims() -> None:
        n = 0
        while not done.is_set():
            db.enqueue_job(f"j{n}", "manual", {})
            t = time.perf_counter()
            db.claim_job("w", 60)
            waits.append((t, time.perf_counter()))
            n += 1

    claimer = threading.Thread(target=claims)
    with timed_transactions(type(db), threading.current_thread()) as holds:
        try:
            claimer.start()
            deleted, left = db.enforce_retention("x", Retention(max_records=10_000))
        finally:
            done.set()
            claimer.join()
    assert (deleted, left) == (40_000, 10_000)
    assert len(holds) > 10, len(holds)
    first_end, last_start = holds[0][1], holds[-1][0]
    between = [w for w in waits if first_end <= w[1] <= last_start]  # claims done mid-sweep
    assert len(between) >= 2, (len(between), len(waits), len(holds))


def test_a_sweep_rests_between_batches_as_long_as_it_held_the_lock(tmp_path) -> None:
    """Other processes wait for SQLite's write lock in its busy handler, which polls: a sweep that
    started its next batch at once would find the lock free only for an instant between batches.
    After each batch but the first it leaves the lock free as long as that batch held it."""
    db = SQLiteDatabase(tmp_path / "t.db")
    rng = random.Random(3)
    db.insert([dataclasses.replace(make_record(rng, 1000.0 + i), adapter="x") for i in range(20_000)])
    with timed_transactions(SQLiteDatabase, threading.current_thread()) as holds:
        try:
            deleted, left = db.enforce_retention("x", Retention(max_records=1_000))
        finally:
            db.close()
    assert (deleted, left) == (19_000, 1_000)
    assert len(holds) >= 3, holds
    # the batch's own timing wraps the transaction: the rest it takes is at least the hold seen here
    rests = [(b[0] - a[1], a[1] - a[0]) for a, b in itertools.pairwise(holds)]
    assert all(rest >= held for rest, held in rests), rests


def test_threads_take_the_write_lock_in_the_order_they_asked() -> None:
    """`FifoLock`, which SQLiteDatabase takes before BEGIN: five threads queue behind a holder and get
    the lock in arrival order; a waiter that times out leaves the queue and never gets it later."""
    lock = sqlite_module.FifoLock()
    assert lock.acquire(1.0)
    order: list[int] = []

    def take(k: int) -> None:
        assert lock.acquire(10.0)
        order.append(k)
        lock.release()

    threads = []
    for k in range(5):
        threads.append(threading.Thread(target=take, args=(k,)))
        threads[-1].start()
        deadline = time.monotonic() + 10
        while len(lock._waiters) < k + 1:  # wait until thread k is queued before starting the next
            assert time.monotonic() < deadline
            time.sleep(0.001)
    assert order == []  # all held back by the holder
    lock.release()
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2, 3, 4]

    assert lock.acquire(1.0)
    gave_up = []
    waiter = threading.Thread(target=lambda: gave_up.append(lock.acquire(0.05)))
    waiter.start()
    waiter.join(10)
    assert gave_up == [False] and lock._waiters == []
    lock.release()
    assert lock.acquire(0.0)  # free again: the waiter that gave up did not take it
    lock.release()


def _take_in_child(path, out) -> None:
    out.put(sqlite_module._write_lock(path).acquire(0.5))


def test_a_forked_child_does_not_inherit_a_held_write_queue(tmp_path) -> None:
    """fork copies the queue's state but not the threads that held it or waited in it: the child starts
    with the queue empty, rather than waiting its busy timeout for a holder that does not exist there.
    (SQLite's own lock is another matter: SQLite forbids forking while a thread is in a transaction.)"""
    import multiprocessing

    path = tmp_path / "t.db"
    lock = sqlite_module._write_lock(path)
    assert lock is sqlite_module._write_lock(tmp_path / "." / "t.db")  # one queue per file
    assert lock.acquire(1.0)
    waiter = threading.Thread(target=lambda: lock.acquire(30))
    waiter.start()
    deadline = time.monotonic() + 10
    while not lock._waiters:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_take_in_child, args=(path, out))
    child.start()
    assert out.get(timeout=30) is True
    child.join(30)
    assert child.exitcode == 0
    assert not lock.acquire(0.05)  # in this process it is still held, with a waiter queued
    lock.release()
    waiter.join(10)
    lock.release()


def test_a_transaction_inside_one_of_the_same_thread_fails_at_once(tmp_path) -> None:
    """The write queue is not reentrant, and does not make a nested transaction wait for itself: it
    fails at BEGIN as SQLite fails it, the outer one commits, and the queue is free afterwards."""
    db = SQLiteDatabase(tmp_path / "t.db", busy_timeout_s=5.0)
    start = time.monotonic()
    nested = sqlite_module.DatabaseError
    with db.transaction(), pytest.raises(nested, match="cannot begin a transaction"), db.transaction():
        pass
    assert time.monotonic() - start < 4.0  # not the 5 s busy timeout
    done = []
    other = threading.Thread(target=lambda: done.append(db.enqueue_job("a", "manual", {})[1]))
    other.start()
    other.join(10)
    assert done == [True]
    db.close()


def test_a_thread_writing_in_a_loop_does_not_hold_back_another_thread(tmp_path) -> None:
    """One thread commits transactions back to back; another writes now and then (as a worker claims,
    or a sweep between its rests): each of the second's transactions waits at most one of the first's
    turns. With SQLite's busy handler alone, the second slept between tries while the first took the
    lock again (over 100 of its transactions passed during one of the second's)."""
    db = SQLiteDatabase(tmp_path / "t.db", busy_timeout_s=5.0)
    stop = threading.Event()
    errors: list[BaseException] = []
    looped = [0]

    def loop() -> None:
        try:
            while not stop.is_set():
                db.enqueue_job("busy", "manual", {})
                looped[0] += 1
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    busy = threading.Thread(target=loop)
    busy.start()
    waits: list[int] = []
    try:
        for k in range(40):
            time.sleep(0.01)
            before = looped[0]
            db.enqueue_job(f"now-and-then-{k}", "manual", {})
            waits.append(looped[0] - before)
    finally:
        stop.set()
        busy.join(30)
        db.close()
    assert errors == [] and looped[0] > 40
    # the busy thread's transactions that ended while one of ours waited: the one it was in when we
    # asked (counted when it returns: up to two), not a stream of them
    assert max(waits) <= 3, sorted(waits)[-5:]


def test_concurrent_writers_keep_the_counters_exact(db) -> None:
    """Four threads (on Postgres: four pooled connections, as replicas would) insert batches of
    several adapters and give feedback at once: the counters still equal the recount, and a batch
    that fails leaves them as they were (they change in its transaction)."""
    errors = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(15):
                ids = db.insert([make_record(rng, 1000.0 + rng.random()) for _ in range(20)])
                for record_id in rng.sample(ids, 5):
                    db.add_feedback(record_id, rng.choice(["good", "bad"]), rng.choice([None, "fix"]))
        except Exception as e:  # reported below, with the thread's seed
            errors.append((seed, e))

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sum(s.records for s in db.stats()) == 4 * 15 * 20
    assert stats_tuples(db) == recount(db)
    before = stats_tuples(db)
    rng = random.Random(99)
    bad = dataclasses.replace(make_record(rng, 2000.0), choice=2**70)
    # a number neither backend can store: SQLite's driver refuses it, Postgres's refusal is a ValueError
    with pytest.raises(OverflowError if isinstance(db, SQLiteDatabase) else ValueError):
        db.insert([make_record(rng, 2000.0), bad])
    assert stats_tuples(db) == before
