"""The traffic database: schema and migrations, WAL, feedback history, retention, statistics, and two
processes writing one database at once. The tests that take `db` (or `database_target`) run on both
backends, SQLite and a real Postgres server (tests/conftest.py); Postgres-only ones are in
test_postgres.py."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vllm_surgery.storage import database, open_database
from vllm_surgery.storage.database import (
    SCHEMA_VERSION,
    DatabaseError,
    Migration,
    Retention,
    SQLiteDatabase,
    TrafficRecord,
    UnknownRequest,
)
from vllm_surgery.testing_servers import run_sql, table_columns


def record(
    request_id: str = "r1", adapter: str = "x", choice: int = 0, created: float = 1000.0, **kw
) -> TrafficRecord:
    values = {
        "request_id": request_id,
        "response_id": f"cmpl-{request_id}",
        "choice": choice,
        "adapter": adapter,
        "version": "original",
        "endpoint": "completions",
        "prompt": "what is 1 + 2 ?",
        "completion": "3",
        "sampling": {"temperature": 0},
        "created": created,
        "calibratable": True,
    }
    values.update(kw)
    return TrafficRecord(**values)


@pytest.fixture
def db(database_target):
    d = open_database(database_target)
    yield d
    d.close()


def test_new_database_has_the_current_schema_in_wal_mode(tmp_path: Path) -> None:
    db = SQLiteDatabase(tmp_path / "sub" / "t.sqlite3")  # the directory is created
    # one step per version, none skipped
    assert db.schema_version() == SCHEMA_VERSION == len(database.MIGRATIONS)
    db.close()
    raw = sqlite3.connect(tmp_path / "sub" / "t.sqlite3")
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"traffic", "feedback", "jobs", "traffic_counts", "job_counts", "job_stage_totals"} <= tables
    raw.close()


def test_missing_database_is_not_created_when_only_reading(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="no database here"):
        SQLiteDatabase(tmp_path / "missing.sqlite3", create=False)
    assert not (tmp_path / "missing.sqlite3").exists()


def test_a_file_that_is_not_a_database_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "notes.sqlite3"
    path.write_bytes(b"this is not sqlite " * 100)
    with pytest.raises(DatabaseError, match=r"notes\.sqlite3"):
        SQLiteDatabase(path)


def test_database_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite3"
    SQLiteDatabase(path).close()
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA user_version = 99")
    raw.commit()
    raw.close()
    with pytest.raises(DatabaseError, match="schema version 99 was written by a newer"):
        SQLiteDatabase(path)


def test_a_next_migration_applies_on_open_and_keeps_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """How a later table is added: append a Migration. Also: a version-1 file (traffic only, as the first
    release with traffic wrote it) gains the job queue and the bounds and trust columns when opened
    (its feedback counted before trust existed: it stays trusted; each record's bytes are computed),
    and keeps its records."""
    path = tmp_path / "t.sqlite3"
    monkeypatch.setattr(database, "MIGRATIONS", database.MIGRATIONS[:1])
    monkeypatch.setattr(database, "SCHEMA_VERSION", 1)
    db = SQLiteDatabase(path)
    with db.transaction() as c:  # as the first release wrote it (its columns only)
        c.execute(
            "INSERT INTO traffic (request_id, response_id, choice, adapter, version, endpoint, prompt, "
            "completion, sampling, calibratable, created) VALUES "
            "('kept', 'cmpl-kept', 0, 'x', 'original', 'completions', '\"é?\"', 'ok', '{}', 1, 0)"
        )
        c.execute(
            "INSERT INTO feedback (traffic_id, rating, correction, created) VALUES (1, 'bad', 'fixé', 1)"
        )
    db.close()
    monkeypatch.undo()
    db = SQLiteDatabase(path)
    current = database.MIGRATIONS[-1].version  # the job queue and every migration after it
    assert db.schema_version() == current and db.find("kept") is not None
    # '"é?"' is 5 bytes, 'ok' 2, '{}' 2; the correction 'fixé' 5
    assert db.find("kept").bytes == 5 + 2 + 2 + 5
    assert db.records("x", calibration=True)[0].correction == "fixé"
    assert db.enqueue_job("x", "manual", {})[1]
    db.close()
    following = current + 1
    notes = Migration(
        following, "notes", ("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL)",)
    )
    monkeypatch.setattr(database, "MIGRATIONS", (*database.MIGRATIONS, notes))
    monkeypatch.setattr(database, "SCHEMA_VERSION", following)
    db = SQLiteDatabase(path)
    assert db.schema_version() == following
    assert db.find("kept") is not None and len(db.jobs()) == 1
    with db.transaction() as c:
        c.execute("INSERT INTO notes (text) VALUES ('x')")
    assert db.connection().execute("SELECT COUNT(*) FROM notes").fetchone()[0] == 1
    db.close()
    db = SQLiteDatabase(path)  # opening again applies nothing twice
    assert db.schema_version() == following
    db.close()


def test_a_failed_transaction_leaves_nothing(db: SQLiteDatabase) -> None:
    with pytest.raises(RuntimeError), db.transaction() as c:
        c.execute(
            "INSERT INTO traffic (request_id, choice, adapter, version, endpoint, completion, sampling, "
            "calibratable, created) VALUES ('r', 0, 'x', 'original', 'completions', 'c', '{}', TRUE, 0)"
        )
        raise RuntimeError("abort")
    assert db.find("r") is None
    (rid,) = db.insert([record("kept")])
    # SQLite says "CHECK constraint failed", Postgres "violates check constraint"
    with pytest.raises(DatabaseError, match=r"(?i)check constraint"), db.transaction() as c:
        c.execute(f"INSERT INTO feedback (traffic_id, rating, created) VALUES ({rid}, 'meh', 0)")
    assert db.feedback_history(rid) == []


def test_find_by_request_id_or_response_id_and_choice(db: SQLiteDatabase) -> None:
    db.insert([record("r1", choice=0, completion="a"), record("r1", choice=1, completion="b")])
    assert db.find("r1").record.completion == "a"
    assert db.find("r1", 1).record.completion == "b"
    assert db.find("cmpl-r1", 1).record.completion == "b"
    assert db.find("r1", 2) is None
    assert db.find("r2") is None
    # A client that reuses an id: the latest request with it answers.
    db.insert([record("r1", completion="later")])
    assert db.find("r1").record.completion == "later"


def test_json_fields_round_trip(db: SQLiteDatabase) -> None:
    messages = [{"role": "user", "content": "héllo"}]
    db.insert([record("c", endpoint="chat", prompt=messages, sampling={"n": 2, "stop": ["\n"]})])
    got = db.find("c").record
    assert got.prompt == messages and got.sampling == {"n": 2, "stop": ["\n"]} and got.endpoint == "chat"
    db.insert([record("t", prompt=[1, 2, 3], calibratable=False)])
    assert db.find("t").record.prompt == [1, 2, 3] and db.find("t").record.calibratable is False


def test_feedback_latest_wins_and_history_is_kept(db: SQLiteDatabase) -> None:
    (rid,) = db.insert([record("r1")])
    assert db.add_feedback(rid, "bad", None, created=1.0) == 1
    assert db.add_feedback(rid, None, "4", created=2.0) == 2
    assert db.add_feedback(rid, "good", None, created=3.0) == 3
    stored = db.find("r1")
    assert (stored.rating, stored.correction, stored.feedback_count) == ("good", None, 3)
    assert db.feedback_history(rid) == [
        {"rating": "bad", "correction": None, "created": 1.0, "trusted": True},
        {"rating": None, "correction": "4", "created": 2.0, "trusted": True},
        {"rating": "good", "correction": None, "created": 3.0, "trusted": True},
    ]
    with pytest.raises(ValueError, match="rating must be one of"):
        db.add_feedback(rid, "meh", None)
    with pytest.raises(ValueError, match="needs a rating or a correction"):
        db.add_feedback(rid, None, None)
    with pytest.raises(UnknownRequest):
        db.add_feedback(rid + 100, "good", None)


def test_retention_by_count_and_age_per_adapter(db: SQLiteDatabase) -> None:
    ids = db.insert([record(f"x{i}", created=100.0 + i) for i in range(10)])
    db.insert([record(f"y{i}", adapter="y", created=100.0 + i) for i in range(4)])
    db.add_feedback(ids[0], "good", None)
    assert db.enforce_retention("x", Retention(max_records=6)) == (4, 6)
    assert [r.record.request_id for r in db.records("x")] == [f"x{i}" for i in range(4, 10)]
    assert len(db.records("y")) == 4  # other adapters untouched
    assert run_sql(db, "SELECT COUNT(*) FROM feedback")[0][0] == 0  # went with its record
    # Age: records created before now - max_age go.
    assert db.enforce_retention("x", Retention(max_age_s=3.5), now=110.0) == (3, 3)  # 104, 105, 106
    assert [r.record.request_id for r in db.records("x")] == ["x7", "x8", "x9"]
    assert db.enforce_retention("x", Retention()) == (0, 3)
    # The oldest go first.
    assert db.enforce_retention("x", Retention(max_records=2)) == (1, 2)
    assert [r.record.request_id for r in db.records("x")] == ["x8", "x9"]


def test_records_paging_and_since(db: SQLiteDatabase) -> None:
    db.insert([record(f"r{i}", created=float(i)) for i in range(7)])
    first = db.records("x", limit=3)
    second = db.records("x", limit=3, after_id=first[-1].id)
    assert [r.record.request_id for r in first + second] == [f"r{i}" for i in range(6)]
    assert [r.record.request_id for r in db.records("x", since=5.0)] == ["r5", "r6"]


def test_stats_per_adapter_and_version(db: SQLiteDatabase) -> None:
    a, b, c, d, e = db.insert(
        [
            record("a"),
            record("b"),
            record("c"),
            record("d", calibratable=False),
            record("e", version="v2"),
        ]
    )
    db.insert([record("f")])  # unrated
    empty = db.insert([record("g", completion=" "), record("h", completion="\n"), record("i", completion="")])
    db.add_feedback(empty[0], "good", None)  # good, but nothing was answered: not usable
    db.add_feedback(empty[1], None, "the answer")  # a corrected empty answer: usable
    db.add_feedback(a, "good", None)
    db.add_feedback(b, "bad", None)
    db.add_feedback(c, "bad", "fixed")
    db.add_feedback(d, "good", None)  # good but not text: not usable
    db.add_feedback(e, None, "fixed too")
    rows = {(s.adapter, s.version): s for s in db.stats()}
    orig = rows[("x", "original")]
    # records a b c d f g h i; rated a b c d g; good a d g; bad b c; corrected c h; usable a c h;
    # unrated usable f (i is unrated but empty)
    assert (
        orig.records,
        orig.rated,
        orig.good,
        orig.bad,
        orig.corrected,
        orig.usable,
        orig.unrated_usable,
    ) == (
        8,
        5,
        3,
        2,
        2,
        3,
        1,
    )
    v2 = rows[("x", "v2")]
    assert (v2.records, v2.rated, v2.corrected, v2.usable) == (1, 0, 1, 1)
    assert db.stats("y") == []
    assert db.adapters() == ["x"]


WRITER = textwrap.dedent(
    """
    import sys
    from vllm_surgery.storage import open_database, TrafficRecord
    db = open_database(sys.argv[1])
    tag = sys.argv[2]
    for batch in range(40):
        db.insert([
            TrafficRecord(request_id=f"{tag}-{batch}-{i}", choice=0, adapter="x", version="original",
                          endpoint="completions", prompt="p", completion="c", sampling={}, created=0.0,
                          calibratable=True)
            for i in range(10)
        ])
    db.close()
    """
)


def test_two_processes_write_one_database_at_once(database_target) -> None:
    """Several API servers, the CLI and the worker share the database (SQLite: WAL + busy timeout;
    Postgres: a server), no lost row."""
    open_database(database_target).close()
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(database_target), tag], stderr=subprocess.PIPE)
        for tag in ("a", "b")
    ]
    reader = open_database(database_target)
    seen = []
    while any(p.poll() is None for p in procs):
        seen.append(len(reader.records("x", limit=1000)))  # reads while both write
        time.sleep(0.05)
    for p in procs:
        assert p.wait() == 0, p.stderr.read().decode()
    assert len(reader.records("x", limit=1000)) == 800
    assert seen == sorted(seen)  # readers see whole batches, never a count that goes back
    assert all(n % 10 == 0 for n in seen)
    if isinstance(reader, SQLiteDatabase):
        assert reader.integrity_check() == "ok"
    reader.close()


def test_the_tables_columns_are_the_dataclasses_fields(db: SQLiteDatabase) -> None:
    """Rows are read and written by the dataclasses' field names: the tables must have exactly those."""
    from dataclasses import fields

    from vllm_surgery.storage import Job

    assert table_columns(db, "traffic") == {"id", "bytes", "tally", *(f.name for f in fields(TrafficRecord))}
    assert table_columns(db, "jobs") == {f.name for f in fields(Job)}


def test_the_usable_counts_equal_the_export(db: SQLiteDatabase) -> None:
    """The usable-example rule is written once for the records (the export) and once in SQL (the
    counts): on every kind of record and feedback, both give the same examples."""
    from vllm_surgery.traffic import calibration_set

    chat = [{"role": "user", "content": "hi"}]
    cases = [  # (record fields, feedback given in order: (rating, correction))
        ({}, []),  # unrated
        ({"completion": " \t\n"}, []),  # unrated, blank
        ({"completion": "\u00a0"}, []),  # unrated, a non-breaking space is text
        ({}, [("good", None)]),
        ({"completion": "  "}, [("good", None)]),  # good but blank: nothing to learn
        ({}, [("bad", None)]),
        ({}, [("bad", "4")]),  # a correction wins over the rating
        ({"completion": ""}, [(None, "the answer")]),  # a correction of an empty answer
        ({}, [(None, " \r\n")]),  # a blank correction
        ({}, [("good", None), ("bad", None)]),  # the latest wins
        ({}, [("bad", None), ("good", None)]),
        ({"calibratable": False}, [("good", None)]),
        ({"calibratable": False}, []),
        ({"calibratable": False, "prompt": [1, 2, 3]}, [(None, "fixed")]),
        ({"endpoint": "chat", "prompt": chat}, [("good", None)]),
        ({"endpoint": "chat", "prompt": chat}, []),
    ]
    for i, (fields_, feedback) in enumerate(cases):
        (row_id,) = db.insert([record(f"u{i}", adapter="u", created=1000.0 + i, **fields_)])
        for j, (rating, correction) in enumerate(feedback):
            db.add_feedback(row_id, rating, correction, created=2000.0 + 10 * i + j)
    (stats,) = db.stats("u")
    for include_unrated in (False, True):
        exported = calibration_set(db, "u", include_unrated=include_unrated)
        counted = stats.usable + (stats.unrated_usable if include_unrated else 0)
        assert counted == len(exported.records) == db.usable_since("u", 0.0, include_unrated), (
            exported.summary()
        )
    assert (stats.usable, stats.unrated_usable) == (5, 3)  # the cases above, counted by hand


def test_recorded_prompts_are_private_files(tmp_path: Path) -> None:
    """The database, its -wal and -shm files and exported calibration JSONL are readable by their owner
    only (they hold users' prompts); before, they were created 0644 under the usual umask."""
    import os
    import stat

    from vllm_surgery.traffic.calibration_set import write_jsonl

    old = os.umask(0o022)
    try:
        db = SQLiteDatabase(tmp_path / "private.sqlite3")
        db.insert([TrafficRecord("r", 0, "a", "original", "completions", "p", "c", {}, 1.0, True)])
        files = sorted(tmp_path.glob("private.sqlite3*"))
        assert {f.name for f in files} >= {"private.sqlite3", "private.sqlite3-wal", "private.sqlite3-shm"}
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        db.close()
        out = write_jsonl([{"prompt": "p", "completion": "c"}], tmp_path / "export.jsonl")
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
    finally:
        os.umask(old)
