"""The traffic writer (bounded queue, batches, overflow counted, flush and close), redaction, and the
recording policy."""

from __future__ import annotations

import logging
import random
import threading
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from vllm_surgery.settings import AdapterTraffic, ServingSettings, SettingsError
from vllm_surgery.storage import DatabaseUnavailable, open_database
from vllm_surgery.storage.database import Retention, TrafficRecord
from vllm_surgery.traffic import (
    TrafficPolicy,
    TrafficWriter,
    apply_redaction,
    builtin_redaction,
    load_redaction,
    redact_text,
)


def record(i: int, adapter: str = "w", **kw) -> TrafficRecord:
    values = {
        "request_id": f"r{i}",
        "choice": 0,
        "adapter": adapter,
        "version": "original",
        "endpoint": "completions",
        "prompt": f"prompt {i}",
        "completion": f"answer {i}",
        "sampling": {},
        "created": 1000.0 + i,
        "calibratable": True,
    }
    values.update(kw)
    return TrafficRecord(**values)


def counted(adapter: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "vllm_surgery_traffic_records_total", {"adapter": adapter, "outcome": outcome}
    )
    return value or 0.0


@pytest.fixture
def db(database_target):
    """The database the writer writes to, on both backends (SQLite, a real Postgres: conftest.py)."""
    d = open_database(database_target)
    yield d
    d.close()


NO_LIMITS = Retention()


def writer_for(db, queue_size: int = 100, retention: Retention = NO_LIMITS, **kw) -> TrafficWriter:
    return TrafficWriter(db, lambda item: [item], queue_size=queue_size, retention=lambda a: retention, **kw)


def test_overflow_drops_are_counted_and_logged(db, caplog: pytest.LogCaptureFixture) -> None:
    w = writer_for(db, queue_size=3)  # not started: nothing drains the queue
    before = counted("overflow", "dropped")
    with caplog.at_level(logging.WARNING):
        results = [w.submit(record(i, "overflow"), "overflow") for i in range(5)]
    assert results == [True, True, True, False, False]
    assert counted("overflow", "dropped") - before == 2
    assert "dropped" in caplog.text and "'overflow'" in caplog.text
    assert w.peak_depth == 3
    # Closing writes what was queued (and refuses what comes after, counting it too).
    w.start()
    assert w.close(timeout=30)
    assert len(db.records("overflow")) == 3
    assert w.submit(record(9, "overflow"), "overflow") is False
    assert counted("overflow", "dropped") - before == 3


def test_close_flushes_everything_queued(db) -> None:
    release = threading.Event()

    def slow_prepare(item):
        release.wait(10)  # the writer is busy while the producer fills the queue
        return [item]

    w = TrafficWriter(
        db, slow_prepare, queue_size=1000, retention=lambda a: Retention(), batch_size=7
    ).start()
    before = counted("flush", "logged")
    for i in range(100):
        assert w.submit(record(i, "flush"), "flush")
    release.set()
    assert w.close(timeout=30)
    assert len(db.records("flush", limit=1000)) == 100
    assert counted("flush", "logged") - before == 100


def test_flush_waits_for_what_was_submitted(db) -> None:
    w = writer_for(db).start()
    try:
        for i in range(20):
            w.submit(record(i, "f2"), "f2")
        assert w.flush(timeout=10)
        assert len(db.records("f2")) == 20  # written when flush returns, not later
        assert w.flush(timeout=0)  # nothing pending: at once
    finally:
        w.close()


def test_retention_is_enforced_while_writing(db) -> None:
    w = writer_for(db, retention=Retention(max_records=5)).start()
    try:
        for i in range(12):
            w.submit(record(i, "ret"), "ret")
        assert w.flush(timeout=10)
        assert [r.record.request_id for r in db.records("ret")] == [f"r{i}" for i in range(7, 12)]
    finally:
        w.close()


def test_a_failing_prepare_loses_only_its_item_and_is_counted(db, caplog) -> None:
    def prepare(item):
        if item.request_id == "r1":
            raise RuntimeError("broken")
        return [item]

    w = TrafficWriter(db, prepare, queue_size=10, retention=lambda a: Retention()).start()
    before = counted("bad", "failed")
    with caplog.at_level(logging.ERROR):
        for i in range(3):
            w.submit(record(i, "bad"), "bad")
        assert w.flush(10)
    w.close()
    assert [r.record.request_id for r in db.records("bad")] == ["r0", "r2"]
    assert counted("bad", "failed") - before == 1
    assert "could not be prepared" in caplog.text


def test_redact_text_removes_emails_and_long_digit_runs() -> None:
    text = "mail jane.doe+x@example.co.uk or call 555-123-4567, card 4111 1111 1111 1111, id 12345678"
    assert redact_text(text) == "mail [EMAIL] or call [NUMBER], card [NUMBER], id [NUMBER]"
    kept = "what is 123 + 456 ? 579. In 2024 we sold 1,250 units, order 123456 (6 digits)"
    assert redact_text(kept) == kept


def test_builtin_redaction_covers_prompt_messages_and_completion() -> None:
    r = record(0, prompt="I am bob@corp.com", completion="call 0123456789")
    out = apply_redaction(builtin_redaction, r)
    assert (out.prompt, out.completion) == ("I am [EMAIL]", "call [NUMBER]")
    messages = [
        {"role": "system", "content": "x@y.org"},
        {"role": "user", "content": [{"type": "text", "text": "id 99999999"}]},
    ]
    out = apply_redaction(builtin_redaction, record(1, endpoint="chat", prompt=messages))
    assert out.prompt == [
        {"role": "system", "content": "[EMAIL]"},
        {"role": "user", "content": [{"type": "text", "text": "id [NUMBER]"}]},
    ]
    assert messages[0]["content"] == "x@y.org"  # the input is not modified in place
    ids = record(2, prompt=[1234567, 2345678])
    assert apply_redaction(builtin_redaction, ids).prompt == [1234567, 2345678]  # token ids are not text


def drop_secret(r: dict) -> dict | None:
    return None if "secret" in r["prompt"] else {**r, "completion": r["completion"].upper()}


def test_operator_hook_rewrites_or_drops() -> None:
    hook = load_redaction(f"{__name__}:drop_secret")
    assert apply_redaction(hook, record(0, prompt="top secret")) is None
    assert apply_redaction(hook, record(1)).completion == "ANSWER 1"
    assert load_redaction("none") is None
    assert load_redaction("builtin") is builtin_redaction
    assert load_redaction(f"{__name__}.drop_secret") is drop_secret
    with pytest.raises(ValueError, match="not a record dict"):
        apply_redaction(lambda r: {"oops": 1}, record(2))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:f", "cannot be imported"),
        (f"{__name__}:missing", "cannot be imported"),
        (f"{__name__}:SettingsError.__doc__", "cannot be imported"),
        ("justaname", "expected 'builtin', 'none'"),
    ],
)
def test_bad_hook_setting_is_a_clear_error(spec: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message) as info:
        load_redaction(spec)
    assert "VLLM_SURGERY_TRAFFIC_REDACT" in str(info.value)


def test_policy_global_switch_per_adapter_entries_and_retention() -> None:
    off = TrafficPolicy(ServingSettings())
    assert not off.enabled and not off.sample("x")
    on = TrafficPolicy(
        ServingSettings(traffic=True, traffic_max_records=50, traffic_max_age_days=0, traffic_max_bytes=900)
    )
    assert on.enabled and on.sample("x")
    assert on.for_adapter("x").retention == Retention(max_records=50, max_age_s=None, max_bytes=900)
    entries = (
        AdapterTraffic(
            "a", sample_rate=1.0, max_records=7, max_age_days=2, include_unrated=True, max_bytes=5000
        ),
        AdapterTraffic("b", capture=False, calibration_files=("b.jsonl",)),
    )
    only = TrafficPolicy(ServingSettings(traffic_adapters=entries))
    assert only.enabled
    assert only.sample("a") and not only.sample("b") and not only.sample("c")
    pa = only.for_adapter("a")
    assert (
        pa.retention == Retention(max_records=7, max_age_s=2 * 86400.0, max_bytes=5000) and pa.include_unrated
    )
    assert only.for_adapter("c").retention.max_bytes == 1024**3  # the global default
    assert only.for_adapter("b").calibration_files == ("b.jsonl",)
    assert not TrafficPolicy(ServingSettings(traffic_adapters=(entries[1],))).enabled


def test_sampling_rate_is_respected() -> None:
    policy = TrafficPolicy(ServingSettings(traffic=True, traffic_sample_rate=0.25), rng=random.Random(7))
    hits = sum(policy.sample("x") for _ in range(4000))
    assert 900 <= hits <= 1100  # 1000 expected; binomial sd ~27
    assert not TrafficPolicy(ServingSettings(traffic=True, traffic_sample_rate=0.0)).enabled


def test_traffic_settings_from_env_and_file(tmp_path: Path) -> None:
    env = {
        "VLLM_SURGERY_TRAFFIC": "on",
        "VLLM_SURGERY_TRAFFIC_SAMPLE_RATE": "0.5",
        "VLLM_SURGERY_TRAFFIC_ADAPTERS": '{"x": {"max_records": 10, "calibration_files": ["x.jsonl"]}}',
        "VLLM_SURGERY_STORE": str(tmp_path / "store"),
    }
    s = ServingSettings.from_env(env)
    assert s.traffic and s.traffic_sample_rate == 0.5
    assert s.adapter_traffic("x") == AdapterTraffic("x", max_records=10, calibration_files=("x.jsonl",))
    assert s.database_path == tmp_path / "store.sqlite3"
    assert ServingSettings.from_env(
        {**env, "VLLM_SURGERY_DATABASE": str(tmp_path / "d.db")}
    ).database_path == (tmp_path / "d.db")
    cfg = tmp_path / "s.json"
    cfg.write_text('{"traffic_adapters": {"y": {"sample_rate": 0.1}}, "database": "traffic.db"}')
    s = ServingSettings.from_env({"VLLM_SURGERY_CONFIG": str(cfg)})
    assert s.adapter_traffic("y").sample_rate == 0.1 and s.database_path == tmp_path / "traffic.db"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{not json", "must be a JSON object"),
        ('["x"]', "must be a JSON object mapping adapter names"),
        ('{"../x": {}}', "adapter name"),
        ('{"x": 1}', "'x' must be an object"),
        ('{"x": {"rate": 1}}', r"'x': unknown key\(s\) \['rate'\]"),
        ('{"x": {"sample_rate": 2}}', r"'x': 'sample_rate' must be a number in \[0, 1\]"),
        ('{"x": {"max_records": 0}}', "'max_records' must be an integer >= 1"),
        ('{"x": {"calibration_files": "x.jsonl"}}', "'calibration_files' must be a list"),
    ],
)
def test_bad_adapter_traffic_setting_names_the_problem(value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message) as info:
        ServingSettings.from_env({"VLLM_SURGERY_TRAFFIC_ADAPTERS": value})
    assert "VLLM_SURGERY_TRAFFIC_ADAPTERS" in str(info.value)


def test_a_record_the_database_cannot_store_loses_only_itself_and_the_writer_goes_on(db, caplog) -> None:
    """A lone surrogate (valid JSON: "\\ud800") cannot be encoded as UTF-8: before, the writer thread died
    on the UnicodeEncodeError and nothing was recorded for the rest of the server's life."""
    w = writer_for(db, batch_size=8, linger_s=0.2).start()
    before = counted("sur", "failed")
    with caplog.at_level(logging.ERROR):
        w.submit(record(0, "sur"), "sur")
        w.submit(record(1, "sur", completion="bad \ud800 text"), "sur")  # same batch as r0 and r2
        w.submit(record(2, "sur"), "sur")
        assert w.flush(10)
        w.submit(record(3, "sur"), "sur")  # a later batch: the writer is still alive
        assert w.flush(10)
    assert w._thread.is_alive()
    w.close()
    assert [r.record.request_id for r in db.records("sur")] == ["r0", "r2", "r3"]
    assert counted("sur", "failed") - before == 1
    assert "could not be stored and is lost" in caplog.text


def test_lone_surrogates_are_replaced_before_storing() -> None:
    from vllm_surgery.traffic.writer import without_surrogates

    bad = record(
        0, prompt=[{"role": "user", "content": "a\udc00b"}], completion="x\ud800", sampling={"user": "\ud800"}
    )
    clean = without_surrogates(bad)
    assert clean.prompt == [{"role": "user", "content": "a\ufffdb"}] and clean.completion == "x\ufffd"
    assert clean.sampling == {"user": "\ufffd"}
    assert without_surrogates(record(1)) == record(1)


def test_redaction_finds_addresses_at_the_start_of_a_run_only_once() -> None:
    """The e-mail pattern starts a match only where no local-part character precedes it (what keeps it
    linear-time, see benchmarks/redaction.py): addresses glued to long runs are still found whole."""
    assert redact_text("x" * 1000 + " jane@example.com") == "x" * 1000 + " [EMAIL]"
    assert redact_text("y" * 5000 + "@example.com and z") == "[EMAIL] and z"
    assert redact_text("(a.b+c@d.example.org)") == "([EMAIL])"
    assert redact_text("a" * 20_000) == "a" * 20_000


def test_a_record_without_surrogates_is_passed_on_as_it_is() -> None:
    """The writer thread cleans every record: a clean one (nearly all) must not be copied or rebuilt."""
    from vllm_surgery.traffic.writer import without_surrogates

    clean = record(2, prompt=[{"role": "user", "content": "hi"}], sampling={"user": "u", "stop": ["x"]})
    assert without_surrogates(clean) is clean


def test_a_batch_whose_commit_answer_was_lost_is_stored_once(postgres_url, caplog) -> None:
    """Postgres can commit a batch and drop the connection before the client hears: the writer's
    retry must not store it twice (a killed Postgres did this to 3 of 656 records in a CI run)."""
    db = open_database(postgres_url)
    real_insert = db.insert
    lost = []

    def insert(records, **kw):
        ids = real_insert(records, **kw)  # committed ...
        if not lost:
            lost.append(ids)  # ... and the answer lost once, as when the server dies at that moment
            raise DatabaseUnavailable("server closed the connection unexpectedly")
        return ids

    db.insert = insert
    w = TrafficWriter(db, lambda item: [item], queue_size=100, retention=lambda a: Retention()).start()
    try:
        with caplog.at_level(logging.WARNING):
            for i in range(5):
                assert w.submit(record(i, "lost"), "lost")
            assert w.close(timeout=60)
        stored = db.records("lost", limit=100)
        assert sorted(r.record.request_id for r in stored) == [f"r{i}" for i in range(5)]
        assert sorted(r.id for r in stored) == sorted(lost[0])  # the first, committed write
        (stats,) = db.stats("lost")
        assert stats.records == 5  # the counters were not moved twice either
        assert "database outage over" in caplog.text
    finally:
        db.close()


def test_inserting_with_reserved_ids_twice_stores_once(postgres_url) -> None:
    db = open_database(postgres_url)
    try:
        batch = [record(i, "twice") for i in range(3)]
        ids = db.reserve_ids(3)
        assert db.insert(batch, ids=ids) == ids
        assert db.insert(batch, ids=ids) == ids
        assert len(db.records("twice", limit=10)) == 3 and db.stats("twice")[0].records == 3
        with pytest.raises(ValueError, match="2 ids for 3 records"):
            db.insert(batch, ids=ids[:2])
    finally:
        db.close()


def test_sqlite_draws_its_own_ids(tmp_path: Path) -> None:
    db = open_database(tmp_path / "t.sqlite3")
    try:
        assert db.reserve_ids(3) is None
        with pytest.raises(ValueError, match="SQLite draws record ids itself"):
            db.insert([record(0, "s")], ids=[1])
    finally:
        db.close()
