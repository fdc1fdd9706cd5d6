"""The served pointer, its history and the replicas table: one contract on both backends (SQLite and a
real Postgres server), and Postgres's LISTEN/NOTIFY (a notification reaches a listener; a listener
whose connection broke reconnects and says so, so that its owner reads every pointer again)."""

from __future__ import annotations

import time

import pytest

from vllm_surgery.storage import POINTER_CHANNEL, SCHEMA_VERSION, PointerConflict, open_database
from vllm_surgery.storage.database import MIGRATIONS as SQLITE_MIGRATIONS
from vllm_surgery.storage.postgres import MIGRATIONS as POSTGRES_MIGRATIONS

HASH = "a" * 64


@pytest.fixture
def db(database_target):
    database = open_database(database_target)
    yield database
    database.close()


def test_the_pointer_migration_is_one_step_of_the_same_number_on_both_backends(database_target) -> None:
    db = open_database(database_target)
    try:
        assert db.schema_version() == SCHEMA_VERSION
        numbers = set()
        for migrations in (SQLITE_MIGRATIONS, POSTGRES_MIGRATIONS):
            steps = [m for m in migrations if "served pointer" in m.description]
            assert len(steps) == 1 and steps[0].version <= SCHEMA_VERSION == migrations[-1].version
            numbers.add(steps[0].version)
        assert len(numbers) == 1
    finally:
        db.close()


def test_a_database_says_whether_it_holds_the_pointer(database_target) -> None:
    db = open_database(database_target)
    try:
        assert db.shares_pointer is isinstance(database_target, str)  # Postgres URL: shared
    finally:
        db.close()


def test_no_pointer_until_one_is_set(db) -> None:
    assert db.served_pointer("x") is None
    assert db.served_pointers() == []
    assert db.pointer_history("x") == []


def test_set_records_the_pointer_and_its_history(db) -> None:
    pointer, changed = db.set_served_pointer(
        "x", "v1", adapter_hash=HASH, by="job 7", reason="accepted by the gate", now=100.0
    )
    assert changed
    assert (pointer.adapter, pointer.version, pointer.adapter_hash, pointer.forced) == (
        "x",
        "v1",
        HASH,
        False,
    )
    assert (pointer.revision, pointer.set_at, pointer.set_by) == (1, 100.0, "job 7")
    assert db.served_pointer("x") == pointer
    [change] = db.pointer_history("x")
    assert (change.from_version, change.to_version, change.revision) == ("original", "v1", 1)
    assert (change.changed_by, change.changed_at, change.reason, change.forced) == (
        "job 7",
        100.0,
        "accepted by the gate",
        False,
    )


def test_the_same_pointer_again_is_no_change(db) -> None:
    first, _ = db.set_served_pointer("x", "v1", adapter_hash=HASH, by="admin", now=1.0)
    again, changed = db.set_served_pointer("x", "v1", adapter_hash=HASH, by="job 3", now=2.0)
    assert not changed and again == first
    assert len(db.pointer_history("x")) == 1
    # the same version, now forced, is a change (its row says what a follower may serve)
    forced, changed = db.set_served_pointer("x", "v1", adapter_hash=HASH, forced=True, by="admin", now=3.0)
    assert changed and (forced.revision, forced.forced) == (2, True)


def test_revisions_grow_and_the_history_keeps_every_change(db) -> None:
    db.set_served_pointer("x", "v1", adapter_hash=HASH, by="job 1", now=1.0)
    db.set_served_pointer("x", "v2", adapter_hash=HASH, forced=True, by="admin", reason="try it", now=2.0)
    db.set_served_pointer("x", "v1", adapter_hash=HASH, by="rollback", now=3.0)
    assert db.served_pointer("x").revision == 3
    assert [
        (c.revision, c.from_version, c.to_version, c.forced, c.changed_by) for c in db.pointer_history("x")
    ] == [
        (1, "original", "v1", False, "job 1"),
        (2, "v1", "v2", True, "admin"),
        (3, "v2", "v1", False, "rollback"),
    ]
    assert [c.to_version for c in db.pointer_history("x", limit=2)] == ["v2", "v1"]


def test_original_is_never_forced(db) -> None:
    pointer, _ = db.set_served_pointer("x", "original", adapter_hash=HASH, forced=True, by="admin")
    assert pointer.forced is False


def test_a_write_over_another_revision_is_refused(db) -> None:
    db.set_served_pointer("x", "v1", adapter_hash=HASH, by="admin", now=1.0)
    with pytest.raises(PointerConflict, match="revision 1, not 0"):
        db.set_served_pointer("x", "v2", adapter_hash=HASH, by="rollback", expect_revision=0)
    assert db.served_pointer("x").version == "v1"
    pointer, changed = db.set_served_pointer("x", "v2", adapter_hash=HASH, by="rollback", expect_revision=1)
    assert changed and pointer.revision == 2


def test_every_adapter_has_its_own_pointer(db) -> None:
    db.set_served_pointer("b", "v9", adapter_hash=None, by="admin", now=1.0)
    db.set_served_pointer("a", "v1", adapter_hash=HASH, by="admin", now=2.0)
    assert [(p.adapter, p.version, p.revision) for p in db.served_pointers()] == [
        ("a", "v1", 1),
        ("b", "v9", 1),
    ]
    assert db.pointer_history("a")[0].to_version == "v1"


def test_long_reasons_are_cut_and_bad_values_refused(db) -> None:
    db.set_served_pointer("x", "v1", adapter_hash=HASH, by="admin", reason="r" * 5000)
    assert len(db.pointer_history("x")[0].reason) == 2000
    for bad in ({"version": ""}, {"by": " "}):
        args = {"version": "v2", "by": "admin", **bad}
        with pytest.raises(ValueError, match="non-empty"):
            db.set_served_pointer("x", args["version"], adapter_hash=HASH, by=args["by"])
    assert db.served_pointer("x").version == "v1"


def test_replicas_report_what_they_serve(db) -> None:
    db.report_replica("host-b:8001", "x", "v1", "in_sync", now=10.0)
    db.report_replica("host-a:8000", "x", "original", "failed", "corrupt weights", now=11.0)
    db.report_replica("host-a:8000", "y", "v3", "behind", now=12.0)
    assert [r.to_dict() for r in db.replicas("x")] == [
        {
            "id": "host-a:8000",
            "version": "original",
            "state": "failed",
            "error": "corrupt weights",
            "seen_at": 11.0,
        },
        {"id": "host-b:8001", "version": "v1", "state": "in_sync", "error": None, "seen_at": 10.0},
    ]
    db.report_replica("host-a:8000", "x", "v1", "in_sync", now=13.0)  # one row per replica and adapter
    assert [(r.replica, r.version, r.state, r.error, r.seen_at) for r in db.replicas("x")] == [
        ("host-a:8000", "v1", "in_sync", None, 13.0),
        ("host-b:8001", "v1", "in_sync", None, 10.0),
    ]
    with pytest.raises(ValueError, match="in_sync"):
        db.report_replica("host-a:8000", "x", "v1", "lost")


def test_replicas_silent_for_longer_than_the_age_are_forgotten(db) -> None:
    day = 86400.0
    db.report_replica("gone", "x", "v1", "in_sync", now=1 * day)  # went away on day 1
    db.report_replica("gone", "y", "v1", "failed", "corrupt", now=1 * day)
    db.report_replica("alive", "x", "v1", "in_sync", now=1 * day)
    db.report_replica("alive", "x", "v2", "in_sync", now=10 * day - 60)  # reported a minute ago
    db.report_replica("quiet", "y", "v1", "in_sync", now=9 * day)  # exactly one day ago: kept
    assert db.prune_replicas(day, now=10 * day) == 2
    assert [(r.replica, r.version) for r in db.replicas("x")] == [("alive", "v2")]
    assert [(r.replica, r.version) for r in db.replicas("y")] == [("quiet", "v1")]
    assert db.prune_replicas(day, now=10 * day) == 0  # nothing more: the same pass again deletes nothing
    db.report_replica("gone", "x", "v2", "in_sync", now=10 * day)  # it came back: listed again
    assert [r.replica for r in db.replicas("x")] == ["alive", "gone"]
    with pytest.raises(ValueError, match="max_age_s"):
        db.prune_replicas(-1.0)


def test_two_openers_share_the_pointer(database_target) -> None:
    one, two = open_database(database_target), open_database(database_target)
    try:
        one.set_served_pointer("x", "v1", adapter_hash=HASH, by="admin")
        assert two.served_pointer("x").version == "v1"
        two.set_served_pointer("x", "v2", adapter_hash=HASH, by="job 2")
        assert one.served_pointer("x").revision == 2
    finally:
        one.close()
        two.close()


# ----------------------------------------------------------------------------- LISTEN (Postgres only)
def test_a_pointer_change_notifies_a_listener(postgres_url) -> None:
    db = open_database(postgres_url)
    listener = db.listener()
    try:
        assert listener.wait(1.0).connected  # the first wait connects and says so
        assert listener.wait(0.2).adapters == frozenset()  # nothing changed
        start = time.monotonic()
        db.set_served_pointer("x", "v1", adapter_hash=HASH, by="admin")
        events = listener.wait(5.0)
        latency = time.monotonic() - start
        assert events.adapters == {"x"} and not events.connected
        assert latency < 1.0, latency
        # a write that changes nothing sends nothing... (no row update)
        db.set_served_pointer("x", "v1", adapter_hash=HASH, by="admin")
        assert listener.wait(0.3).adapters == frozenset()
        # ...and a replica's report is not a pointer change
        db.report_replica("r", "x", "v1", "in_sync")
        assert listener.wait(0.3).adapters == frozenset()
        print(f"\nnotification after {latency * 1000:.1f} ms ({POINTER_CHANNEL})")
    finally:
        listener.close()
        db.close()


def test_a_listener_that_lost_its_connection_reconnects_and_says_so(postgres_server, postgres_url) -> None:
    db = open_database(postgres_url)
    listener = db.listener()
    try:
        assert listener.wait(1.0).connected
        postgres_server.restart()  # the listener's session is gone; the change below is not notified to it
        db.set_served_pointer("x", "v2", adapter_hash=HASH, by="admin")
        events = listener.wait(2.0)
        assert events.connected and events.adapters == frozenset()
        # what its owner then does: read every pointer again, and finds the change it was not told about
        assert [(p.adapter, p.version) for p in db.served_pointers()] == [("x", "v2")]
        db.set_served_pointer("x", "v3", adapter_hash=HASH, by="admin")
        assert listener.wait(5.0).adapters == {"x"}  # and it listens again
    finally:
        listener.close()
        db.close()


def test_sqlite_has_no_listener(tmp_path) -> None:
    db = open_database(tmp_path / "one.sqlite3")
    try:
        assert not hasattr(db, "listener")
    finally:
        db.close()
