"""Fast checks of the security review's fixes, below the real-server tests of test_traffic_security.py:
the writer's supervisor, redaction of every stored field and pseudonymous ids, the database's bounds
(feedback history, per-client corrections, bytes per adapter), whose feedback is trusted, and what
the feedback route answers and logs when the database fails."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from prometheus_client import REGISTRY
from starlette.requests import Request

from vllm_surgery.serving.auth import REVIEWER_HEADER, FeedbackTrust
from vllm_surgery.settings import ServingSettings, SettingsError
from vllm_surgery.storage import open_database
from vllm_surgery.storage.database import Retention, TrafficRecord
from vllm_surgery.traffic import TrafficWriter, apply_redaction, builtin_redaction
from vllm_surgery.traffic.redaction import pseudonym

SECRET = b"k" * 32


def record(i: int, adapter: str = "u", **kw) -> TrafficRecord:
    values = {
        "request_id": f"r{i}",
        "response_id": f"cmpl-r{i}",
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


@pytest.fixture
def db(database_target):
    """A fresh database, once per backend (tests/conftest.py): the bounds are the same on both."""
    d = open_database(database_target)
    yield d
    d.close()


# ----------------------------------------------------------------------------- the supervisor
class Dies(BaseException):
    """What no handler of the writer expects."""


def test_a_dead_writer_thread_is_restarted_and_what_is_queued_is_written(db) -> None:
    killed = threading.Event()
    real_insert = db.insert

    def insert(records, **kw):
        if any(r.request_id == "killer" for r in records):
            killed.set()
            raise Dies("killed")
        return real_insert(records, **kw)

    db.insert = insert
    restarts_before = REGISTRY.get_sample_value("vllm_surgery_traffic_writer_restarts_total") or 0.0
    w = TrafficWriter(
        db, lambda item: [item], queue_size=100, retention=lambda a: Retention(), supervise_interval_s=0.05
    ).start()
    try:
        assert w.health() == {"up": True, "restarts": 0, "last_error": None, "outage_s": None}
        w.submit(record(0, request_id="killer"), "u")
        assert killed.wait(10)
        for i in range(1, 4):
            w.submit(record(i), "u")
        deadline = time.monotonic() + 10
        while len(db.records("u")) < 3:
            assert time.monotonic() < deadline, "nothing written after the writer thread died"
            time.sleep(0.05)
        assert [s.record.request_id for s in db.records("u")] == ["r1", "r2", "r3"]
        assert w.restarts == 1 and w.up and w.last_error == "Dies: killed"
        restarts = REGISTRY.get_sample_value("vllm_surgery_traffic_writer_restarts_total")
        assert restarts == restarts_before + 1
        assert REGISTRY.get_sample_value("vllm_surgery_traffic_writer_up") == 1.0
    finally:
        assert w.close(10)
    assert not w.up and REGISTRY.get_sample_value("vllm_surgery_traffic_writer_up") == 0.0


# ----------------------------------------------------------------------------- redaction
def test_builtin_redaction_covers_every_stored_string_and_pseudonymises_ids() -> None:
    r = record(
        0,
        request_id="ann@example.com",
        response_id="cmpl-ann@example.com",
        endpoint="chat",
        prompt=[{"role": "user", "content": "hi", "name": "bob@example.com"}],
        completion="call 555 123 4567",
        sampling={
            "user": "cy@example.com",
            "stop": ["dee@example.com"],
            "metadata": {"eve@example.com": ["x"]},
        },
    )
    out = apply_redaction(builtin_redaction, r, SECRET)
    assert out.prompt == [{"role": "user", "content": "hi", "name": "[EMAIL]"}]
    assert out.completion == "call [NUMBER]"
    assert out.sampling == {"user": "[EMAIL]", "stop": ["[EMAIL]"], "metadata": {"[EMAIL]": ["x"]}}
    assert out.request_id == pseudonym(SECRET, "ann@example.com") != out.response_id
    assert out.response_id == pseudonym(SECRET, "cmpl-ann@example.com")
    assert "@" not in json.dumps([out.request_id, out.response_id])
    # the dict path (the hook called on a record dict) redacts the same fields
    assert builtin_redaction({"prompt": "a@b.co", "completion": "", "sampling": {"k": "a@b.co"}}) == {
        "prompt": "[EMAIL]",
        "completion": "",
        "sampling": {"k": "[EMAIL]"},
    }
    # ids the server generated (no secret given) are kept; a clean record is kept as it is
    assert apply_redaction(builtin_redaction, r).request_id == "ann@example.com"
    clean = record(1)
    assert apply_redaction(builtin_redaction, clean, SECRET) == clean


def test_an_operator_hook_that_changes_an_id_gets_a_pseudonym() -> None:
    def hook(d: dict) -> dict:
        return {**d, "request_id": "hidden"}

    out = apply_redaction(hook, record(0), SECRET)
    assert out.request_id == pseudonym(SECRET, "r0") and out.response_id == "cmpl-r0"
    assert pseudonym(SECRET, "r0") != pseudonym(b"other" * 8, "r0")


# ----------------------------------------------------------------------------- the database's bounds
def test_history_is_pruned_but_keeps_the_latest_trusted(db) -> None:
    (rid,) = db.insert([record(0)])
    db.add_feedback(rid, None, "trusted fix", created=1.0, trusted=True, keep=2)
    for i in range(5):
        db.add_feedback(rid, "bad", None, created=2.0 + i, trusted=False, client="c", keep=2)
    history = db.feedback_history(rid)
    assert [(h["rating"], h["correction"], h["trusted"]) for h in history] == [
        (None, "trusted fix", True),
        ("bad", None, False),
        ("bad", None, False),
    ]
    assert [h["created"] for h in history] == [1.0, 5.0, 6.0]
    shown = db.records("u")[0]
    assert (shown.rating, shown.correction, shown.trusted) == ("bad", None, False)
    used = db.records("u", calibration=True)[0]
    assert (used.rating, used.correction, used.trusted) == (None, "trusted fix", True)
    (row,) = db.stats("u")
    assert (row.usable, row.untrusted, row.bad) == (1, 1, 1)


def test_untrusted_feedback_is_never_usable_nor_hides_an_unrated_record(db) -> None:
    a, b = db.insert([record(0), record(1)])
    db.add_feedback(a, None, "poison", trusted=False, client="c")
    db.add_feedback(b, "bad", None, trusted=False, client="c")
    (row,) = db.stats("u")
    assert (row.corrected, row.usable, row.unrated_usable, row.untrusted) == (1, 0, 2, 2)
    assert db.usable_since("u", 0.0, include_unrated=False) == 0


def test_corrections_per_client_survive_pruning(db) -> None:
    (rid,) = db.insert([record(0)])
    for i in range(4):
        db.add_feedback(rid, None, f"fix {i}", trusted=False, client="c", keep=1)
    db.add_feedback(rid, "good", None, trusted=False, client="c", keep=1)  # a rating is no correction
    assert len(db.feedback_history(rid)) == 1
    assert db.corrections_since("c", time.time() - 60) == 4
    assert db.corrections_since("other", 0.0) == 0


def test_retention_by_bytes_keeps_the_newest_that_fit(db) -> None:
    # each record: prompt '"p0"' (4 bytes) + completion (10 bytes) + sampling '{}' (2 bytes) = 16
    db.insert([record(i, prompt=f"p{i}", completion="c" * 10) for i in range(5)])
    assert sum(s.bytes for s in db.records("u")) == 5 * 16
    removed, left = db.enforce_retention("u", Retention(max_bytes=40))
    assert (removed, left) == (3, 2)
    assert [s.record.prompt for s in db.records("u")] == ["p3", "p4"]
    # feedback counts toward the record's bytes
    last = db.records("u")[-1].id
    db.add_feedback(last, None, "x" * 20)
    assert db.records("u")[-1].bytes == 16 + 20
    assert db.enforce_retention("u", Retention(max_bytes=40)) == (1, 1)
    assert [s.record.prompt for s in db.records("u")] == ["p4"]


# ----------------------------------------------------------------------------- trust
def request(headers: dict[str, str], host: str = "10.0.0.1") -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "headers": raw, "client": (host, 5000), "method": "POST", "path": "/"})


def test_whose_feedback_is_trusted() -> None:
    reviewer = FeedbackTrust(ServingSettings(reviewer_token="rev", admin_token="adm"))
    key = {"Authorization": "Bearer k1"}
    assert reviewer.judge(request(key))[:2] == (False, False)
    assert reviewer.judge(request({**key, REVIEWER_HEADER: "rev"})) == (True, True, "reviewer")
    assert reviewer.judge(request({**key, "X-Surgery-Admin-Token": "adm"}))[:2] == (True, True)
    assert reviewer.judge(request({**key, REVIEWER_HEADER: "wrong"}))[:2] == (False, False)
    # clients differ by key and by address; the key itself is never in the client name
    one, other_key, other_host = (
        reviewer.judge(request(key))[2],
        reviewer.judge(request({"Authorization": "Bearer k2"}))[2],
        reviewer.judge(request(key, host="10.0.0.2"))[2],
    )
    assert len({one, other_key, other_host}) == 3 and "k1" not in one
    nobody = FeedbackTrust(ServingSettings())  # reviewer mode without any token: no feedback counts
    assert nobody.judge(request({REVIEWER_HEADER: ""}))[:2] == (False, False)
    anyone = FeedbackTrust(ServingSettings(feedback_trust="api-key"))
    assert anyone.judge(request(key))[:2] == (True, False)


def test_the_trust_setting_is_checked() -> None:
    assert ServingSettings.from_env({"VLLM_SURGERY_FEEDBACK_TRUST": "API-KEY"}).feedback_trust == "api-key"
    with pytest.raises(
        SettingsError, match="VLLM_SURGERY_FEEDBACK_TRUST must be one of 'reviewer', 'api-key'"
    ):
        ServingSettings.from_env({"VLLM_SURGERY_FEEDBACK_TRUST": "everyone"})
    assert ServingSettings().feedback_trust == "reviewer"


# ----------------------------------------------------------------------------- the feedback route
def test_a_database_error_on_feedback_is_a_bounded_503_and_a_bounded_log_line(
    db, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The route over ASGI with a real recorder and database; only the write of the feedback fails,
    with an error text far longer than any answer or log line may be."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from vllm_surgery.serving.api.state import TRAFFIC_KEY
    from vllm_surgery.serving.endpoint_plugin import SurgeryEndpointPlugin
    from vllm_surgery.storage import DatabaseError
    from vllm_surgery.traffic import TrafficRecorder

    db.insert([record(7)])
    recorder = TrafficRecorder(ServingSettings.from_env({}), db, lambda adapter, path: "original")
    app = FastAPI()
    SurgeryEndpointPlugin().attach_router(app)
    setattr(app.state, TRAFFIC_KEY, recorder)
    text = "disk I/O error on page " + "9" * 200_000 + " (the volume is full)"

    def fails(*args, **kwargs):
        raise DatabaseError(text)

    monkeypatch.setattr(db, "add_feedback", fails)
    with caplog.at_level(logging.ERROR, logger="vllm"):
        answer = TestClient(app).post("/v1/surgery/feedback", json={"request_id": "r7", "rating": "good"})
    assert answer.status_code == 503, answer.text
    message = answer.json()["error"]["message"]
    assert message.startswith("the traffic database is not available: disk I/O error on page 999")
    assert message.endswith("(the volume is full)") and len(message) < 2_200
    lines = [r.getMessage() for r in caplog.records if r.name.endswith("api.feedback")]
    assert len(lines) == 1, caplog.text
    assert lines[0].startswith("feedback: disk I/O error") and lines[0].endswith("(the volume is full)")
    assert len(lines[0]) < 2_200
