"""The canary state in the database: one contract on both backends (SQLite and a real Postgres server).
One running canary per adapter; a share change and a decision only while it runs, the decision by one
writer only; every change in the events; the live figures of a version counted from its records since
the start with their latest feedback; on Postgres a change notifies the served pointer's channel."""

from __future__ import annotations

import threading

import pytest

from vllm_surgery.canary import ArmCounts
from vllm_surgery.storage import SCHEMA_VERSION, CanaryConflict, TrafficRecord, open_database
from vllm_surgery.storage.database import MIGRATIONS as SQLITE_MIGRATIONS
from vllm_surgery.storage.postgres import MIGRATIONS as POSTGRES_MIGRATIONS

RULE = {"margin": 0.05, "error_rate": 0.05, "min_ratings": 30, "max_duration_s": 3600.0}


@pytest.fixture
def db(database_target):
    database = open_database(database_target)
    yield database
    database.close()


def test_the_canary_migration_is_one_step_of_the_same_number_on_both_backends(database_target) -> None:
    db = open_database(database_target)
    try:
        numbers = set()
        for migrations in (SQLITE_MIGRATIONS, POSTGRES_MIGRATIONS):
            steps = [m for m in migrations if m.description.startswith("canaries:")]
            assert len(steps) == 1 and steps[0].version <= SCHEMA_VERSION == db.schema_version()
            numbers.add(steps[0].version)
        assert len(numbers) == 1
    finally:
        db.close()


def test_one_running_canary_per_adapter_and_its_lifecycle(db) -> None:
    assert db.running_canary("x") is None and db.running_canaries() == []
    canary = db.start_canary("x", "original", "v1", 0.25, RULE, by="job 3", job_id=3, now=100.0)
    assert (canary.adapter, canary.current_version, canary.canary_version, canary.share) == (
        "x",
        "original",
        "v1",
        0.25,
    )
    assert (canary.state, canary.revision, canary.started, canary.started_by, canary.job_id) == (
        "running",
        1,
        100.0,
        "job 3",
        3,
    )
    assert canary.rule == RULE and canary.verdict is None
    with pytest.raises(CanaryConflict, match="running canary already"):
        db.start_canary("x", "original", "v2", 0.5, RULE, by="admin")
    other = db.start_canary("y", "v7", "original", 0.1, RULE, by="admin")  # another adapter: fine
    assert [c.adapter for c in db.running_canaries()] == ["x", "y"]

    shared = db.set_canary_share(canary.id, 0.5, by="admin", now=110.0)
    assert (shared.share, shared.revision) == (0.5, 2)
    decided = db.decide_canary(
        canary.id, "promoted", {"reason": "better", "figures": {"d": 0.2}}, by="rule", now=120.0
    )
    assert (decided.state, decided.decided_at, decided.decided_by, decided.revision) == (
        "promoted",
        120.0,
        "rule",
        3,
    )
    assert decided.verdict == {"reason": "better", "figures": {"d": 0.2}}
    # ended: no second decision, no share change; a new canary may start
    assert db.decide_canary(canary.id, "aborted", None, by="admin") is None
    with pytest.raises(CanaryConflict, match="not running"):
        db.set_canary_share(canary.id, 0.3, by="admin")
    assert db.running_canary("x") is None
    again = db.start_canary("x", "v1", "v2", 0.2, RULE, by="admin", now=130.0)
    assert [c.id for c in db.canary_history("x")] == [again.id, canary.id]
    assert [c.id for c in db.canaries_of_job(3)] == [canary.id]
    assert db.canary_events(canary.id) == [
        {"event": "started", "share": 0.25, "at": 100.0, "by": "job 3", "detail": None},
        {"event": "share", "share": 0.5, "at": 110.0, "by": "admin", "detail": None},
        {"event": "promoted", "share": None, "at": 120.0, "by": "rule", "detail": "better"},
    ]
    assert db.running_canary("y").id == other.id


def test_a_promotion_whose_swap_failed_is_amended_to_aborted_once(db) -> None:
    def amend(canary_id: int, verdict: dict, **kw):  # what the server does after a failed promotion's swap
        return db.decide_canary(canary_id, "aborted", verdict, by="server", from_state="promoted", **kw)

    canary = db.start_canary("x", "original", "v1", 0.25, RULE, by="admin", now=100.0)
    assert amend(canary.id, {"reason": "no"}) is None  # running: not promoted
    db.decide_canary(
        canary.id, "promoted", {"decision": "promoted", "reason": "better"}, by="rule", now=110.0
    )
    verdict = {"decision": "aborted", "reason": "promoted, but the hot-swap failed: engine said no"}
    amended = amend(canary.id, verdict, now=120.0)
    assert (amended.state, amended.decided_at, amended.decided_by, amended.revision) == (
        "aborted",
        120.0,
        "server",
        3,
    )
    assert amended.verdict == verdict
    assert amend(canary.id, verdict) is None  # only from promoted: once
    assert [(e["event"], e["at"], e["by"], e["detail"]) for e in db.canary_events(canary.id)] == [
        ("started", 100.0, "admin", None),
        ("promoted", 110.0, "rule", "better"),
        ("aborted", 120.0, "server", "promoted, but the hot-swap failed: engine said no"),
    ]
    rolled = db.start_canary("x", "original", "v2", 0.25, RULE, by="admin")
    db.decide_canary(rolled.id, "rolled_back", {"reason": "worse"}, by="rule")
    assert amend(rolled.id, verdict) is None  # rolled back stays rolled back


@pytest.mark.parametrize(
    ("share", "message"),
    [(0, "between 0 and 1"), (1, "between 0 and 1"), (1.5, "between 0 and 1"), (True, "share")],
)
def test_bad_shares_are_refused_by_name(db, share, message) -> None:
    with pytest.raises(ValueError, match=message):
        db.start_canary("x", "original", "v1", share, RULE, by="admin")


def test_the_canary_version_must_differ_from_the_current_one(db) -> None:
    with pytest.raises(ValueError, match="is the version served now"):
        db.start_canary("x", "v1", "v1", 0.2, RULE, by="admin")


def test_only_one_of_concurrent_deciders_wins(database_target) -> None:
    dbs = [open_database(database_target) for _ in range(4)]
    try:
        canary = dbs[0].start_canary("x", "original", "v1", 0.3, RULE, by="admin")
        results = []
        barrier = threading.Barrier(len(dbs))

        def decide(db, state) -> None:
            barrier.wait()
            results.append(db.decide_canary(canary.id, state, {"reason": state}, by=state))

        threads = [
            threading.Thread(target=decide, args=(d, s))
            for d, s in zip(dbs, ("promoted", "rolled_back", "expired", "aborted"), strict=True)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        won = [r for r in results if r is not None]
        assert len(results) == 4 and len(won) == 1
        assert [e["event"] for e in dbs[0].canary_events(canary.id)] == ["started", won[0].state]
    finally:
        for d in dbs:
            d.close()


def record(rid: str, version: str, created: float) -> TrafficRecord:
    return TrafficRecord(
        request_id=rid,
        choice=0,
        adapter="x",
        version=version,
        endpoint="completions",
        prompt="q",
        completion="a",
        sampling={},
        created=created,
        calibratable=True,
    )


def test_live_figures_count_records_since_the_start_with_their_latest_feedback(db) -> None:
    ids = db.insert(
        [
            record("old-1", "original", 50.0),  # before the start: never counted, whatever its feedback
            record("c-1", "original", 100.0),
            record("c-2", "original", 101.0),
            record("c-3", "original", 102.0),
            record("n-1", "v1", 103.0),
            record("n-2", "v1", 104.0),
            record("n-3", "v1", 105.0),
            record("n-4", "v1", 106.0),
            record("n-5", "v1", 107.0),  # unrated
        ]
    )
    db.add_feedback(ids[0], "good", None)
    db.add_feedback(ids[1], "good", None)
    db.add_feedback(ids[2], "bad", None)
    db.add_feedback(ids[2], "good", None)  # the latest wins: good
    db.add_feedback(ids[3], "bad", "the right answer")  # a correction counts as corrected, not bad
    db.add_feedback(ids[4], "good", None)
    db.add_feedback(ids[5], "bad", None)
    db.add_feedback(ids[6], None, "fixed")
    db.add_feedback(ids[6], "good", None, trusted=False)  # any client's latest: good now
    assert db.canary_counts("x", "original", 100.0) == ArmCounts(answers=3, good=2, bad=0, corrected=1)
    assert db.canary_counts("x", "v1", 100.0) == ArmCounts(answers=5, good=2, bad=1, corrected=0)
    assert db.canary_counts("x", "v1", 106.5) == ArmCounts(answers=1, good=0, bad=0, corrected=0)
    assert db.canary_counts("z", "v1", 0.0) == ArmCounts(0, 0, 0, 0)


def test_a_canary_change_notifies_the_pointer_channel(postgres_url) -> None:
    db = open_database(postgres_url)
    listener = db.listener()
    try:
        assert listener.wait(1.0).connected
        canary = db.start_canary("x", "original", "v1", 0.3, RULE, by="admin")
        assert listener.wait(5.0).adapters == frozenset({"x"})
        db.set_canary_share(canary.id, 0.4, by="admin")
        assert listener.wait(5.0).adapters == frozenset({"x"})
        db.decide_canary(canary.id, "aborted", None, by="admin")
        assert listener.wait(5.0).adapters == frozenset({"x"})
    finally:
        listener.close()
        db.close()
