"""The Postgres backend on a real server (tests/conftest.py starts one per session): what only it has or
what only several processes and a server can show. The contract both backends share is tested by
test_traffic_db.py, test_job_queue.py and test_traffic_writer.py, which run on both.

- the schema: a schema_version row per migration, the same versions as SQLite's, a next migration
  applied on open with the data kept, two processes opening a fresh database at once applying each
  step once, a newer schema refused by name;
- errors: an unreachable server, a missing database, a bad URL and a missing psycopg give
  DatabaseError naming the server and the problem, never the password;
- leases across processes: a worker killed while it holds a job loses it when the lease expires;
- threads sharing the pool, and a server restart survived.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psycopg
import pytest

from vllm_surgery.storage import DatabaseError, TrafficRecord, database, open_database, postgres
from vllm_surgery.storage.database import Migration
from vllm_surgery.storage.postgres import PostgresDatabase
from vllm_surgery.testing_servers import free_port, run_sql

SPEC = {"calibration": {"source": "records", "records": [{"prompt": "1 +", "completion": " 1"}]}}


def record(request_id: str, adapter: str = "x", **kw) -> TrafficRecord:
    values = {
        "request_id": request_id,
        "choice": 0,
        "adapter": adapter,
        "version": "original",
        "endpoint": "completions",
        "prompt": "p",
        "completion": "c",
        "sampling": {},
        "created": 1000.0,
        "calibratable": True,
    }
    values.update(kw)
    return TrafficRecord(**values)


def applied(url: str) -> list[tuple[int, str]]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT version, description FROM schema_version ORDER BY version").fetchall()


def test_a_postgres_url_opens_postgres_and_a_path_sqlite(postgres_url: str, tmp_path) -> None:
    db = open_database(postgres_url)
    assert isinstance(db, PostgresDatabase)
    assert db.path == postgres_url  # no password in it: the name logs show
    db.close()
    # postgres:// is the same scheme
    db = open_database(postgres_url.replace("postgresql://", "postgres://"))
    assert isinstance(db, PostgresDatabase)
    db.close()
    lite = open_database(tmp_path / "t.sqlite3")
    assert type(lite).__name__ == "SQLiteDatabase" and (tmp_path / "t.sqlite3").exists()
    lite.close()


def test_migrations_are_recorded_and_match_sqlite(postgres_url: str) -> None:
    """One schema_version row per step, with SQLite's version numbers and descriptions: a version
    means the same tables in both (a step added to one backend only fails here)."""
    db = open_database(postgres_url)
    assert db.schema_version() == database.SCHEMA_VERSION == len(database.MIGRATIONS)
    db.close()
    assert applied(postgres_url) == [(m.version, m.description) for m in database.MIGRATIONS]
    assert [m.version for m in postgres.MIGRATIONS] == [m.version for m in database.MIGRATIONS]


def test_a_next_migration_applies_on_open_and_keeps_the_data(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version-1 database (traffic only, as the first release wrote it) gains the job queue, cancel and
    the bounds and trust columns when opened: its feedback counted before trust existed stays trusted,
    each record's bytes are computed from its stored text; then a next step is applied once."""
    monkeypatch.setattr(postgres, "MIGRATIONS", postgres.MIGRATIONS[:1])
    db = open_database(postgres_url)
    assert db.schema_version() == 1
    # as the first release wrote it (its columns only)
    run_sql(
        db,
        "INSERT INTO traffic (request_id, response_id, choice, adapter, version, endpoint, prompt, "
        "completion, sampling, calibratable, created) VALUES "
        "('kept', 'cmpl-kept', 0, 'x', 'original', 'completions', '\"éa\"', 'ok', '{}', true, 0)",
    )
    run_sql(db, "INSERT INTO feedback (traffic_id, rating, correction, created) VALUES (1, 'bad', 'fixé', 1)")
    db.close()
    monkeypatch.undo()
    db = open_database(postgres_url)
    current = database.MIGRATIONS[-1].version
    assert db.schema_version() == current
    kept = db.find("kept")
    # '"éa"' is 5 bytes, 'ok' 2, '{}' 2; the correction 'fixé' 5
    assert (kept.bytes, kept.correction, kept.trusted) == (5 + 2 + 2 + 5, "fixé", True)
    assert db.records("x", calibration=True)[0].correction == "fixé"
    assert len(db.id_secret()) == 32
    job = db.enqueue_job("x", "manual", {})[0]
    assert db.cancel_job(job.id)[1] == "cancelled"  # the state check knows 'cancelled'
    db.close()
    following = current + 1
    notes = Migration(
        following, "notes", ("CREATE TABLE notes (id BIGSERIAL PRIMARY KEY, text TEXT NOT NULL)",)
    )
    monkeypatch.setattr(postgres, "MIGRATIONS", (*postgres.MIGRATIONS, notes))
    db = open_database(postgres_url)
    assert db.schema_version() == following and db.find("kept") is not None and len(db.jobs()) == 1
    run_sql(db, "INSERT INTO notes (text) VALUES ('x')")
    assert run_sql(db, "SELECT COUNT(*) FROM notes") == [(1,)]
    db.close()
    db = open_database(postgres_url)  # opening again applies nothing twice
    db.close()
    assert [v for v, _ in applied(postgres_url)] == list(range(1, following + 1))


def test_a_version_2_database_keeps_its_jobs_and_gains_cancel(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 3 changes the state check in place: every job is kept, a running one can be cancelled,
    an unknown state is still refused and the one-running-job-per-adapter index still holds."""
    monkeypatch.setattr(postgres, "MIGRATIONS", postgres.MIGRATIONS[:2])
    db = open_database(postgres_url)
    # as version 2 wrote them (its columns only)
    run_sql(
        db,
        "INSERT INTO jobs (adapter, trigger, state, spec, created, max_attempts, lease_owner, lease_expires) "
        "VALUES ('a', 'manual', 'running', '{}', 1.0, 3, 'w', 1e12), ('b', 'manual', 'queued', '{}', 2.0, 3, "
        "NULL, NULL)",
    )
    db.close()
    monkeypatch.undo()
    db = open_database(postgres_url)
    try:
        assert db.schema_version() == database.SCHEMA_VERSION
        assert [(j.adapter, j.state, j.lease_owner, j.cancel_requested) for j in db.jobs()] == [
            ("b", "queued", None, None),
            ("a", "running", "w", None),
        ]
        queued, running = db.jobs()
        assert db.cancel_job(queued.id)[1] == "cancelled"
        assert db.cancel_job(running.id)[1] == "cancelling" and db.cancel_requested(running.id)
        assert db.finish_cancelled(running.id, "w") and db.job(running.id).state == "cancelled"
        with pytest.raises(DatabaseError, match="jobs_state_check"):
            run_sql(db, "UPDATE jobs SET state = 'paused' WHERE id = ?", (queued.id,))
        db.enqueue_job("a", "manual", SPEC)
        assert db.claim_job("w", 60).adapter == "a"
        with pytest.raises(DatabaseError, match="jobs_one_running_per_adapter"):
            run_sql(
                db,
                "INSERT INTO jobs (adapter, trigger, state, spec, created, max_attempts, lease_owner, "
                "lease_expires) VALUES ('a', 'manual', 'running', '{}', 3.0, 3, 'w2', 99.0)",
            )
    finally:
        db.close()


def test_each_database_has_its_own_identifier_secret(postgres_server) -> None:
    """256 bits from the server's randomness, created once with the schema: stable across opens, and
    different for every database."""
    first, second = postgres_server.new_database(), postgres_server.new_database()
    db = open_database(first)
    secret = db.id_secret()
    db.close()
    again = open_database(first)
    other = open_database(second)
    try:
        assert len(secret) == 32 and again.id_secret() == secret
        assert other.id_secret() != secret and len(set(other.id_secret())) > 8
        assert run_sql(other, "SELECT value FROM traffic_meta")[0][0] == other.id_secret().hex()
    finally:
        again.close()
        other.close()


OPENER = textwrap.dedent(
    """
    import sys, time
    from vllm_surgery.storage import open_database, postgres
    from vllm_surgery.storage.database import Migration
    # every step takes half a second, so that the processes' migrations overlap
    postgres.MIGRATIONS = tuple(
        Migration(m.version, m.description, ("SELECT pg_sleep(0.5)", *m.statements)) for m in postgres.MIGRATIONS
    )
    time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # every process opens at the same instant
    open_database(sys.argv[1]).close()
    """
)


def test_processes_opening_a_fresh_database_at_once_apply_each_migration_once(postgres_url: str) -> None:
    """Without the advisory lock, a second process's CREATE TABLE fails ("already exists") or its
    schema_version insert does (duplicate key): every process must succeed, and each step be recorded
    once."""
    start = time.time() + 6.0  # after the interpreters have started and imported the package
    procs = [
        subprocess.Popen([sys.executable, "-c", OPENER, postgres_url, str(start)], stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    for p in procs:
        assert p.wait(120) == 0, p.stderr.read().decode()
    assert time.time() > start + 1.0  # they did wait for the same instant, and migrated after it
    assert [v for v, _ in applied(postgres_url)] == [m.version for m in database.MIGRATIONS]


WORKER = textwrap.dedent(
    """
    import json, sys, time
    from vllm_surgery.storage import open_database
    db = open_database(sys.argv[1])
    owner = sys.argv[2]
    db.job(0)  # imported, migrated, a pooled connection open: ready to claim
    print("ready", flush=True)
    start = float(sys.stdin.readline())  # sent once both workers are ready
    time.sleep(max(0.0, start - time.time()))  # both workers start claiming at once
    claimed = []
    while (job := db.claim_job(owner, 60)) is not None:
        claimed.append(job.id)
        assert db.finish_job(job.id, owner, "kept_original", {"by": owner})
    print(json.dumps(claimed))
    """
)


def test_two_workers_claiming_jobs_of_the_same_adapters_never_share_one(postgres_url: str) -> None:
    """2 workers x 20 jobs of 2 adapters, claimed with no pause: the workers keep claiming jobs of one
    adapter at the same instant (SKIP LOCKED passes over the row the other one holds). Every job is
    claimed once, without an error, and each adapter's jobs run in the order they were queued (each
    finished before the next began). The workers start at one instant once both have started (under
    CPU load an interpreter can take longer than any fixed delay, and one worker would do it all)."""
    import json

    db = open_database(postgres_url)
    ids = [db.enqueue_job("ab"[i // 10], "manual", SPEC, now=float(i))[0].id for i in range(20)]
    owners = ("w1", "w2")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, postgres_url, owner],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for owner in owners
    ]
    try:
        for p in procs:
            assert p.stdout.readline() == "ready\n", p.stderr.read()
        start = time.time() + 0.5
        for p in procs:
            p.stdin.write(f"{start}\n")
            p.stdin.flush()
        claimed = {}
        for owner, p in zip(owners, procs, strict=True):
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            claimed[owner] = json.loads(out)
    finally:
        for p in procs:
            p.kill()
    assert sorted(claimed["w1"] + claimed["w2"]) == ids  # every job exactly once
    assert claimed["w1"] and claimed["w2"]  # both took part
    jobs = db.jobs(limit=100)
    assert {(j.state, j.attempts) for j in jobs} == {("kept_original", 1)}
    assert {j.id: j.result["by"] for j in jobs} == {i: o for o, got in claimed.items() for i in got}
    for adapter in "ab":
        # one adapter's jobs ran in the order they were queued (each finished before the next began:
        # a job's finish time is taken after its claim, which follows the previous job's finish)
        mine = sorted((j for j in jobs if j.adapter == adapter), key=lambda j: j.finished)
        assert [j.id for j in mine] == sorted(j.id for j in mine)
    db.close()


def test_a_claim_never_takes_a_later_job_of_an_adapter_past_one_another_claim_holds(
    postgres_url: str,
) -> None:
    """The race test_two_workers_claiming_jobs_of_the_same_adapters_never_share_one hits now and then
    under CPU load, made certain: another worker's claim has locked adapter a's oldest queued job and
    not yet made it running. SKIP LOCKED passes over that row; the claim must not take a's next job
    (it would run before the older one: a's order broken), but another adapter's."""
    db = open_database(postgres_url)
    first, second = (db.enqueue_job("a", "manual", SPEC, now=float(i))[0] for i in (1, 2))
    other = db.enqueue_job("b", "manual", SPEC, now=3.0)[0]
    with psycopg.connect(postgres_url) as holder:  # the other worker's claim, between lock and update
        holder.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (first.id,))
        taken = db.claim_job("w2", 60)
        assert taken is not None and taken.id == other.id
        assert db.claim_job("w3", 60) is None  # a's second job waits for its first
    assert db.claim_job("w1", 60).id == first.id  # the lock is gone: a's oldest first
    assert db.job(second.id).state == "queued"
    db.close()


def test_enqueuers_racing_for_one_adapter_never_pass_its_bound(postgres_url: str) -> None:
    """enqueue_job(max_queued=2) counts an adapter's queued and running jobs, then inserts. A trigger
    makes every insert take 0.3 s, so 6 enqueuers (each with its own pool, as separate processes would
    be) starting at once would all count 0 and all insert without the per-adapter lock; with it,
    exactly 2 jobs are queued and the 4 others are refused. Another adapter is not bounded by them."""
    from vllm_surgery.storage import JobQueueFull

    dbs = [open_database(postgres_url) for _ in range(6)]
    run_sql(
        dbs[0],
        "CREATE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM pg_sleep(0.3); RETURN NEW; END $$",
    )
    run_sql(dbs[0], "CREATE TRIGGER slow BEFORE INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION slow_insert()")
    barrier = threading.Barrier(len(dbs))
    outcomes: list[object] = []

    def enqueue(n: int) -> None:
        barrier.wait(30)
        try:
            # distinct dedupe keys: each takes its key's lock, then the adapter's
            outcomes.append(dbs[n].enqueue_job("a", "manual", SPEC, f"k{n}", max_queued=2)[1])
        except JobQueueFull as e:
            outcomes.append(e)
        except BaseException as e:  # reported by the assertion below
            outcomes.append(repr(e))

    threads = [threading.Thread(target=enqueue, args=(n,)) for n in range(len(dbs))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        refused = [o for o in outcomes if isinstance(o, JobQueueFull)]
        assert len(refused) == 4 and [o for o in outcomes if o not in refused] == [True, True], outcomes
        assert len(dbs[0].jobs(adapter="a")) == 2
        assert all(e.adapter == "a" and e.limit == 2 for e in refused)
        assert dbs[0].enqueue_job("b", "manual", SPEC, max_queued=2)[1]
    finally:
        for db in dbs:
            db.close()


def test_a_database_of_a_newer_schema_is_refused_by_name(postgres_url: str) -> None:
    open_database(postgres_url).close()
    with psycopg.connect(postgres_url) as conn:
        conn.execute("INSERT INTO schema_version VALUES (99, 'from the future', 0)")
    with pytest.raises(DatabaseError) as caught:
        open_database(postgres_url)
    message = str(caught.value)
    assert postgres_url in message
    known = database.SCHEMA_VERSION
    assert f"schema version 99 was written by a newer vllm-surgery (this one knows up to {known})" in message


def test_an_empty_database_is_not_created_when_only_reading(postgres_url: str) -> None:
    with pytest.raises(DatabaseError, match="no database here"):
        open_database(postgres_url, create=False)
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT to_regclass('traffic'), to_regclass('schema_version')").fetchone() == (
            None,
            None,
        )


def test_an_unreachable_server_is_named_without_the_password() -> None:
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(DatabaseError) as caught:
        open_database(f"postgresql://surgery:s3cret-pw@127.0.0.1:{port}/traffic")
    message = str(caught.value)
    assert time.monotonic() - t0 < 30
    assert f"postgresql://surgery@127.0.0.1:{port}/traffic" in message
    assert "refused" in message.lower() and "is the server running" in message
    assert "s3cret-pw" not in message


def test_a_missing_database_and_a_bad_url_are_named_without_the_password(postgres_server) -> None:
    url = postgres_server.url("no_such_db", password="s3cret-pw")
    with pytest.raises(DatabaseError) as caught:
        open_database(url)
    message = str(caught.value)
    assert f"127.0.0.1:{postgres_server.port}/no_such_db" in message
    assert 'database "no_such_db" does not exist' in message and "create it first" in message
    assert "s3cret-pw" not in message
    with pytest.raises(DatabaseError) as caught:
        open_database("postgresql://surgery:s3cret-pw@127.0.0.1:notaport/traffic")
    message = str(caught.value)
    assert "notaport" in message and "s3cret-pw" not in message


def test_without_psycopg_a_postgres_url_names_the_extra_to_install(postgres_url: str, tmp_path) -> None:
    """psycopg is optional: SQLite works without it, and a Postgres URL says what to install."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["psycopg"] = None  # as if it were not installed: importing it raises ImportError
        from vllm_surgery.storage import DatabaseError, open_database
        open_database(sys.argv[2]).close()
        try:
            open_database(sys.argv[1])
        except DatabaseError as e:
            print(e)
        """
    )
    url = postgres_url.replace("postgres@", "postgres:s3cret-pw@")
    done = subprocess.run(
        [sys.executable, "-c", script, url, str(tmp_path / "t.sqlite3")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'vllm-surgery[postgres]'" in done.stdout and "psycopg" in done.stdout
    assert "s3cret-pw" not in done.stdout


CLAIMER = textwrap.dedent(
    """
    import sys, time
    from vllm_surgery.storage import open_database
    db = open_database(sys.argv[1])
    job = db.claim_job("doomed", 1.0)
    print(job.id, flush=True)
    time.sleep(600)  # killed while it holds the job, its lease never renewed
    """
)


def test_a_killed_workers_lease_expires_and_the_job_is_claimed_again(postgres_url: str) -> None:
    db = open_database(postgres_url)
    job = db.enqueue_job("a", "manual", SPEC)[0]
    proc = subprocess.Popen([sys.executable, "-c", CLAIMER, postgres_url], stdout=subprocess.PIPE, text=True)
    try:
        assert int(proc.stdout.readline()) == job.id
        assert db.claim_job("w2", 60) is None  # leased to the other process
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    deadline = time.time() + 10
    while (taken := db.claim_job("w2", 60)) is None and time.time() < deadline:
        time.sleep(0.1)
    assert taken is not None and taken.id == job.id
    assert (taken.lease_owner, taken.attempts) == ("w2", 2)
    assert not db.heartbeat_job(job.id, "doomed", 60)  # the old owner learns it lost the job
    assert db.finish_job(job.id, "w2", "kept_original", {})
    db.close()


def test_threads_share_a_small_pool(postgres_url: str) -> None:
    """The writer thread, to_thread calls and heartbeat threads share the pool: with 2 connections for
    8 threads, every insert and read still succeeds and every id is distinct."""
    db = PostgresDatabase(postgres_url, max_connections=2)
    ids: list[int] = []
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(25):
                ids.extend(db.insert([record(f"t{n}-{i}", adapter=f"a{n}")]))
                assert db.find(f"t{n}-{i}") is not None
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert len(ids) == len(set(ids)) == 200
    assert sum(s.records for s in db.stats()) == 200
    db.close()


def test_feedback_from_many_threads_keeps_one_records_bounds(postgres_url: str) -> None:
    """Feedback on one record from 6 threads at once (each with its own pool, as several replicas):
    adding feedback locks the record's row, so the history is pruned to the newest `keep` (and the
    latest trusted one) and the record's bytes are those of what is left, as one writer would leave
    them. Without the lock, READ COMMITTED transactions would each prune what they saw and count
    bytes of a history another one was changing."""
    dbs = [open_database(postgres_url) for _ in range(6)]
    (rid,) = dbs[0].insert([record("r")])  # '"p"' 3 bytes, 'c' 1, '{}' 2
    dbs[0].add_feedback(rid, None, "reviewed", trusted=True, keep=3)
    barrier = threading.Barrier(len(dbs))
    errors: list[BaseException] = []

    def send(n: int) -> None:
        try:
            barrier.wait(30)
            for i in range(10):
                dbs[n].add_feedback(rid, None, f"fix {n}-{i}", trusted=False, client=f"c{n}", keep=3)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(len(dbs))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        history = dbs[0].feedback_history(rid)
        assert len(history) == 4 and history[0] == {**history[0], "correction": "reviewed", "trusted": True}
        assert not any(h["trusted"] for h in history[1:])
        kept = dbs[0].find("r")
        assert kept.feedback_count == 4
        assert kept.bytes == 6 + sum(len(h["correction"].encode()) for h in history)
        assert dbs[0].records("x", calibration=True)[0].correction == "reviewed"
        assert [dbs[0].corrections_since(f"c{n}", 0.0) for n in range(len(dbs))] == [10] * len(dbs)
    finally:
        for db in dbs:
            db.close()


def test_a_server_restart_is_survived(postgres_server, postgres_url: str) -> None:
    db = open_database(postgres_url)
    db.insert([record("before")])
    postgres_server.restart()  # every pooled connection is broken now
    db.insert([record("after")])  # a broken connection is replaced before it is lent
    assert [r.record.request_id for r in db.records("x")] == ["before", "after"]
    db.close()


def test_nul_characters_are_stored_as_replacement_characters(postgres_url: str) -> None:
    """Postgres text cannot hold NUL: it becomes U+FFFD (SQLite keeps it), rather than losing the
    record; JSON columns keep it escaped."""
    db = open_database(postgres_url)
    (rid,) = db.insert([record("n", completion="a\x00b", prompt="p\x00")])
    got = db.find("n").record
    assert got.completion == "a\ufffdb" and got.prompt == "p\x00"
    assert db.add_feedback(rid, None, "fixed\x00") == 1
    assert db.find("n").correction == "fixed\ufffd"
    db.close()


def test_a_closed_database_says_so(postgres_url: str) -> None:
    db = open_database(postgres_url)
    db.close()
    with pytest.raises(DatabaseError, match="database is closed"):
        db.stats()


def test_a_value_postgres_cannot_hold_fails_the_batch_as_a_fault_of_the_record(postgres_url: str) -> None:
    """The traffic writer writes a batch record by record after a ValueError (only the bad record is
    lost); a DatabaseError would make it retry and then drop the whole batch."""
    db = open_database(postgres_url)
    with pytest.raises(ValueError, match="out of range"):
        db.insert([record("fine"), record("huge", prompt_tokens=2**40)])
    assert db.records("x") == []  # one transaction: nothing of the batch
    assert len(db.insert([record("fine")])) == 1
    db.close()


def test_the_usable_rule_is_derived_from_sqlites_spelling() -> None:
    """The Postgres condition is SQLite's, translated (the rule stays written once, in usable.py); a
    spelling the translation does not know is refused rather than silently miscounted."""
    assert postgres.postgres_spelling("TRIM(t.completion, char(32, 9)) != ''") == (
        "BTRIM(t.completion, chr(32) || chr(9)) <> ''"
    )
    assert "char(" not in postgres.USABLE_BY_FEEDBACK and "ELSE false END" in postgres.USABLE_BY_FEEDBACK
    with pytest.raises(ValueError, match="cannot spell"):
        postgres.postgres_spelling("TRIM(t.completion, char(9) || char(10)) != ''")
