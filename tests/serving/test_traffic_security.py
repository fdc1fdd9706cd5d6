"""Findings of the security review, each against one real `vllm serve` (via `vllm-surgery-serve`) with
traffic and automatic refinement on, and the default trust ("reviewer"):

- redaction reaches every stored field (user, stop, unknown extra fields, the X-Request-Id);
- everything a client can grow is bounded (feedback per record, correction size, corrections per
  client, bytes per record, bytes per adapter), each refusal a 4xx naming the limit;
- feedback of a client with the API key alone is stored and counted but never calibration data and
  never queues a job; a reviewer's is and does;
- corrections are counted as rating="correction" on /metrics;
- a writer thread that dies is restarted and recording goes on (tests/serving/writer_killer kills it).

Expected values come from what the test sent and received and from its own reading of the SQLite file.
Slow (one engine start, 25-80 s on 2 cores): `pytest -m "" tests/serving/test_traffic_security.py`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from server import Server, metric, start_server, stop

from vllm_surgery.cli import main as cli
from vllm_surgery.testing import ALL_PROJ, build_lora_adapter, build_tiny_llama

pytestmark = pytest.mark.slow

API_KEY = "security-api-key"
ADMIN_TOKEN = "security-admin-token"
REVIEWER_TOKEN = "security-reviewer-token"
REVIEWER = {"X-Surgery-Reviewer-Token": REVIEWER_TOKEN}
ADMIN = {"X-Surgery-Admin-Token": ADMIN_TOKEN}
MAX_RECORD_BYTES = 4000
MAX_ADAPTER_BYTES = 3000  # adapter "b"
MAX_CORRECTION_BYTES = 1000
MAX_PER_RECORD = 3
CORRECTIONS_PER_HOUR = 10
MIN_EXAMPLES = 3  # refine_min_examples = refine_new_examples
KILLER = Path(__file__).resolve().parent / "writer_killer"
KILL = "kill-the-traffic-writer"  # writer_killer.sitecustomize.KILL

# Untrusted corrections this module has had accepted (they count toward the per-client bound).
UNTRUSTED_CORRECTIONS: list[str] = []


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("security")
    base = build_tiny_llama(root / "base", hidden=128, heads=2, kv_heads=2, layers=2, intermediate=256)
    for i, name in enumerate(("x", "t", "b")):
        build_lora_adapter(base, root / "adapters" / name, r=8, alpha=16, target_modules=ALL_PROJ, seed=1 + i)
    env = {
        "VLLM_SURGERY_ADAPTER_DIRS": str(root / "adapters"),
        "VLLM_SURGERY_STORE": str(root / "store"),
        "VLLM_SURGERY_DATABASE": str(root / "traffic.sqlite3"),
        "VLLM_PLUGINS": "vllm_surgery,vllm_surgery_api",
        "VLLM_SURGERY_ADMIN_TOKEN": ADMIN_TOKEN,
        "VLLM_SURGERY_REVIEWER_TOKEN": REVIEWER_TOKEN,
        "VLLM_SURGERY_TRAFFIC": "1",
        "VLLM_SURGERY_TRAFFIC_ADAPTERS": json.dumps({"b": {"max_bytes": MAX_ADAPTER_BYTES}}),
        "VLLM_SURGERY_TRAFFIC_MAX_RECORD_BYTES": str(MAX_RECORD_BYTES),
        "VLLM_SURGERY_FEEDBACK_MAX_CORRECTION_BYTES": str(MAX_CORRECTION_BYTES),
        "VLLM_SURGERY_FEEDBACK_MAX_PER_RECORD": str(MAX_PER_RECORD),
        "VLLM_SURGERY_FEEDBACK_CORRECTIONS_PER_HOUR": str(CORRECTIONS_PER_HOUR),
        "VLLM_SURGERY_AUTO_REFINE": "1",
        "VLLM_SURGERY_REFINE_MIN_EXAMPLES": str(MIN_EXAMPLES),
        "VLLM_SURGERY_REFINE_NEW_EXAMPLES": str(MIN_EXAMPLES),
        "VLLM_SURGERY_REFINE_MIN_INTERVAL_S": "0",
        "VLLM_SURGERY_REFINE_CHECK_INTERVAL_S": "0.5",
        "PYTHONPATH": os.pathsep.join(p for p in (str(KILLER), os.environ.get("PYTHONPATH")) if p),
    }
    return {"root": root, "base": base, "env": env, "db": root / "traffic.sqlite3"}


@pytest.fixture(scope="module")
def server(setup: dict) -> Iterator[Server]:
    srv = start_server(
        setup["root"],
        setup["base"],
        setup["env"],
        ["--api-key", API_KEY, "--max-cpu-loras", "4"],
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    try:
        yield srv
    finally:
        left = stop(srv.proc)
        assert not left, f"processes left behind after SIGTERM (killed now): {left}"


# ----------------------------------------------------------------------------- helpers
def ask(server: Server, model: str, prompt: str, rid: str | None = None, **extra) -> dict:
    """One completion; returns status, the X-Request-Id and the text the client received."""
    body = {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0.0, **extra}
    status, headers, raw = server.raw_request(
        "POST", "/v1/completions", body, {"X-Request-Id": rid} if rid else None
    )
    assert status == 200, raw[:500]
    answer = json.loads(raw)
    headers = {k.lower(): v for k, v in headers.items()}
    return {"id": headers.get("x-request-id"), "text": answer["choices"][0]["text"], "body": body}


def feedback(server: Server, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    status, got = server.post("/v1/surgery/feedback", body, headers)
    if status == 200 and body.get("correction") is not None and got.get("trusted") is not True:
        UNTRUSTED_CORRECTIONS.append(body["correction"])
    return status, got


def query(setup: dict, sql: str, params: tuple = ()) -> list[dict]:
    """Rows read straight from the SQLite file (not through the plugin)."""
    conn = sqlite3.connect(setup["db"])
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params).fetchall()]
    finally:
        conn.close()


def wait_for(setup: dict, sql: str, params: tuple = (), n: int = 1, timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(rows := query(setup, sql, params)) < n:
        assert time.monotonic() < deadline, f"{sql} {params}: {len(rows)} of {n} rows after {timeout} s"
        time.sleep(0.1)
    return rows


def stats(server: Server, adapter: str) -> dict:
    status, body = server.get("/v1/surgery/traffic")
    assert status == 200, body
    rows = [s for s in body["stats"] if s["adapter"] == adapter]
    assert len(rows) == 1, body
    return rows[0]


def jobs(server: Server, adapter: str) -> list[dict]:
    status, body = server.get(f"/v1/surgery/jobs?adapter={adapter}")
    assert status == 200, body
    return body["jobs"]


def stored_text(setup: dict) -> bytes:
    files = [setup["db"], setup["db"].with_name(setup["db"].name + "-wal")]
    return b"".join(f.read_bytes() for f in files if f.exists())


# ----------------------------------------------------------------------------- finding 3: redaction
def test_every_stored_field_is_redacted(server: Server, setup: dict) -> None:
    """An e-mail address in the prompt, `user`, `stop`, an unknown extra field (`metadata`, nested and
    as a key) and the X-Request-Id: none is stored. The request is still found by its X-Request-Id."""
    rid = "req-of-jane.roe@example.com"
    got = ask(
        server,
        "x",
        "write to alice@example.com please",
        rid=rid,
        user="bob@example.org",
        stop=["carol@example.net"],
        metadata={"contact": "dave@example.com", "list": ["erin@example.com"], "frank@example.com": 1},
    )
    assert got["id"] == rid
    (row,) = wait_for(setup, "SELECT * FROM traffic WHERE prompt LIKE '%write to%'")
    assert json.loads(row["prompt"]) == "write to [EMAIL] please"
    sampling = json.loads(row["sampling"])
    assert sampling["user"] == "[EMAIL]" and sampling["stop"] == ["[EMAIL]"]
    assert sampling["metadata"] == {"contact": "[EMAIL]", "list": ["[EMAIL]"], "[EMAIL]": 1}
    assert "@" not in row["request_id"] and "@" not in row["response_id"]
    assert row["request_id"] != row["response_id"]  # two ids, two pseudonyms: never confused
    everything = stored_text(setup)
    for address in ("alice@", "bob@", "carol@", "dave@", "erin@", "frank@", "jane.roe@"):
        assert address.encode() not in everything, address
    # feedback by the id the client knows finds the record
    status, body = feedback(server, {"request_id": rid, "rating": "good"})
    assert status == 200 and body["request_id"] == row["request_id"], body
    assert query(setup, "SELECT COUNT(*) AS n FROM feedback WHERE traffic_id = ?", (row["id"],))[0]["n"] == 1


# ----------------------------------------------------------------------------- finding 9: trust
def test_untrusted_corrections_never_count_and_reviewer_ones_do(server: Server, setup: dict) -> None:
    """Three answers of adapter t corrected with the API key alone: stored and counted, marked
    untrusted, no usable example, no job (automatic refinement on, 3 examples would queue one). The
    same three corrected by a reviewer: usable, and a new_data job is queued. A later untrusted
    correction changes nothing the calibration set holds."""
    asked = [ask(server, "t", f"trust question {i}", rid=f"t-{i}") for i in range(MIN_EXAMPLES)]
    answers = []
    for i, a in enumerate(asked):
        status, body = feedback(server, {"request_id": a["id"], "correction": f"client answer {i}"})
        assert status == 200 and body["corrected"] is True, body
        answers.append(body)
    time.sleep(3.0)  # six automatic checks (refine_check_interval_s 0.5)
    assert jobs(server, "t") == []
    s = stats(server, "t")
    assert (s["corrected"], s["usable"]) == (MIN_EXAMPLES, 0), s
    assert s["untrusted"] == MIN_EXAMPLES and [b["trusted"] for b in answers] == [False] * MIN_EXAMPLES
    assert metric(server, "vllm_surgery_calibration_examples", adapter="t") == 0
    assert (
        metric(
            server, "vllm_surgery_traffic_feedback_total", adapter="t", rating="correction", trusted="false"
        )
        == 3
    )
    rows = query(
        setup, "SELECT trusted FROM feedback f JOIN traffic t ON t.id = f.traffic_id WHERE t.adapter = 't'"
    )
    assert [r["trusted"] for r in rows] == [0, 0, 0]

    for i, a in enumerate(asked):
        status, body = feedback(server, {"request_id": a["id"], "correction": f"reviewed {i}"}, REVIEWER)
        assert status == 200 and body.get("trusted") is True, body
    deadline = time.monotonic() + 30
    while not (queued := jobs(server, "t")):
        assert time.monotonic() < deadline, "no automatic job after the reviewer's corrections"
        time.sleep(0.25)
    assert [j["trigger"] for j in queued] == ["new_data"], queued
    assert stats(server, "t")["usable"] == MIN_EXAMPLES
    assert (
        metric(
            server, "vllm_surgery_traffic_feedback_total", adapter="t", rating="correction", trusted="true"
        )
        == 3
    )

    # poison after review: the latest feedback shown is the client's, the calibration set keeps the reviewer's
    status, body = feedback(server, {"request_id": "t-0", "correction": "poisoned"})
    assert status == 200 and body.get("trusted") is False
    out = setup["root"] / "t.jsonl"
    assert cli(["calibration", "export", "t", "--output", str(out), "--db", str(setup["db"])]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["completion"] for line in lines) == [f"reviewed {i}" for i in range(MIN_EXAMPLES)]
    status, page = server.get("/v1/surgery/traffic/t", ADMIN)
    shown = {r["request_id"]: r["feedback"] for r in page["records"]}
    assert shown["t-0"]["correction"] == "poisoned" and shown["t-0"]["trusted"] is False


def test_the_admin_token_counts_as_a_reviewer(server: Server) -> None:
    a = ask(server, "x", "admin rates this", rid="admin-rated")
    status, body = feedback(server, {"request_id": a["id"], "rating": "good"}, ADMIN)
    assert status == 200 and body.get("trusted") is True, body
    status, body = feedback(
        server, {"request_id": a["id"], "rating": "good"}, {"X-Surgery-Reviewer-Token": "wrong"}
    )
    assert status == 200 and body.get("trusted") is False, body


# ----------------------------------------------------------------------------- finding 5: bounds
def test_feedback_history_per_record_is_bounded_and_keeps_the_reviewers(server: Server, setup: dict) -> None:
    """A reviewer's correction, then ten ratings from a client: the newest three are kept, and the
    reviewer's correction (the latest trusted) too, so a flood cannot push it out."""
    a = ask(server, "x", "flood me", rid="flood-1")
    assert feedback(server, {"request_id": a["id"], "correction": "the reviewed answer"}, REVIEWER)[0] == 200
    ratings = ["good", "bad"] * 5
    for i, rating in enumerate(ratings):
        status, body = feedback(server, {"request_id": a["id"], "rating": rating})
        assert status == 200 and body["feedback_count"] == min(i + 2, MAX_PER_RECORD + 1), (i, body)
    rows = query(
        setup,
        "SELECT f.rating, f.correction, f.trusted FROM feedback f JOIN traffic t ON t.id = f.traffic_id "
        "WHERE t.request_id = 'flood-1' ORDER BY f.id",
    )
    assert rows == [
        {"rating": None, "correction": "the reviewed answer", "trusted": 1},
        *({"rating": r, "correction": None, "trusted": 0} for r in ratings[-MAX_PER_RECORD:]),
    ]


def test_a_correction_above_the_limit_is_refused_by_name(server: Server, setup: dict) -> None:
    a = ask(server, "x", "a long correction", rid="long-1")
    status, body = feedback(
        server, {"request_id": a["id"], "correction": "é" * (MAX_CORRECTION_BYTES // 2) + "x"}
    )
    assert status == 413, body
    message = body["error"]["message"]
    assert "'correction'" in message and "VLLM_SURGERY_FEEDBACK_MAX_CORRECTION_BYTES" in message
    assert str(MAX_CORRECTION_BYTES) in message
    assert (
        query(
            setup,
            "SELECT * FROM feedback f JOIN traffic t ON t.id = f.traffic_id WHERE t.request_id = 'long-1'",
        )
        == []
    )
    status, body = feedback(
        server, {"request_id": a["id"], "correction": "é" * (MAX_CORRECTION_BYTES // 2)}, REVIEWER
    )
    assert status == 200, body  # exactly at the limit


def test_a_record_above_the_limit_is_not_stored_but_served(server: Server, setup: dict) -> None:
    before = metric(server, "vllm_surgery_traffic_records_total", adapter="x", outcome="oversized")
    # the size in a field that is no prompt token (the test model takes 512 tokens)
    big = ask(server, "x", "big", rid="big-1", user="y" * MAX_RECORD_BYTES)  # answered as usual
    after = ask(server, "x", "small after big", rid="small-1")
    wait_for(setup, "SELECT id FROM traffic WHERE request_id = ?", (after["id"],))
    assert query(setup, "SELECT id FROM traffic WHERE request_id = ?", (big["id"],)) == []
    assert (
        metric(server, "vllm_surgery_traffic_records_total", adapter="x", outcome="oversized") == before + 1
    )


def test_retention_by_bytes_per_adapter(server: Server, setup: dict) -> None:
    """Adapter b keeps at most MAX_ADAPTER_BYTES of stored text: of five records of about 1 kB, the
    newest that fit are kept (sizes computed here from what was sent and received)."""
    sent = [ask(server, "b", f"bytes {i}", rid=f"bytes-{i}", user="z" * 900) for i in range(5)]
    wait_for(setup, "SELECT id FROM traffic WHERE request_id = 'bytes-4'")
    time.sleep(0.5)  # retention runs in the same batch as the write; let any later batch finish
    rows = query(
        setup, "SELECT request_id, prompt, completion, sampling FROM traffic WHERE adapter = 'b' ORDER BY id"
    )
    sampling_bytes = {len(r["sampling"].encode()) for r in rows}
    assert len(sampling_bytes) == 1  # every request had the same settings
    (settings_size,) = sampling_bytes

    def size(a: dict) -> int:
        return (
            len(json.dumps(a["body"]["prompt"], ensure_ascii=False).encode())
            + len(a["text"].encode())
            + settings_size
        )

    expected, total = [], 0
    for a in reversed(sent):  # the newest that fit
        if total + size(a) > MAX_ADAPTER_BYTES:
            break
        expected.insert(0, a["id"])
        total += size(a)
    assert 1 <= len(expected) < len(sent)
    assert [r["request_id"] for r in rows] == expected
    stored = sum(
        len(r["prompt"].encode()) + len(r["completion"].encode()) + len(r["sampling"].encode()) for r in rows
    )
    assert stored == total <= MAX_ADAPTER_BYTES


def test_corrections_per_client_are_bounded(server: Server, setup: dict) -> None:
    """A client with the API key alone may send CORRECTIONS_PER_HOUR corrections an hour (the earlier
    tests' count too, deleted history included); then 429 naming the limit. A reviewer is not bound."""
    a = ask(server, "x", "correct me often", rid="often-1")
    left = CORRECTIONS_PER_HOUR - len(UNTRUSTED_CORRECTIONS)
    assert left > MAX_PER_RECORD  # so that pruning of this record's history is part of the test
    for i in range(left):
        status, body = feedback(server, {"request_id": a["id"], "correction": f"again {i}"})
        assert status == 200, (i, body)
    status, body = feedback(server, {"request_id": a["id"], "correction": "one too many"})
    assert status == 429, body
    message = body["error"]["message"]
    assert "VLLM_SURGERY_FEEDBACK_CORRECTIONS_PER_HOUR" in message and str(CORRECTIONS_PER_HOUR) in message
    assert feedback(server, {"request_id": a["id"], "rating": "bad"})[0] == 200  # ratings still go in
    assert feedback(server, {"request_id": a["id"], "correction": "reviewed"}, REVIEWER)[0] == 200


# ----------------------------------------------------------------------------- recording never stops silently
def test_a_dead_writer_thread_is_restarted_and_recording_goes_on(server: Server, setup: dict) -> None:
    """writer_killer makes the database call raise a BaseException that no handler expects: the
    writer thread dies. The supervisor starts a new one; the metric and the traffic route say so, and
    later requests are recorded again."""
    up_before = metric(server, "vllm_surgery_traffic_writer_up")
    ask(server, "x", f"please {KILL} now", rid="killer-1")
    time.sleep(0.5)  # the batch with the killer is written (and the thread dies) before the next ones
    later = [ask(server, "x", f"after the restart {i}", rid=f"later-{i}") for i in range(3)]
    rows = wait_for(
        setup, "SELECT request_id, completion FROM traffic WHERE request_id LIKE 'later-%' ORDER BY id", n=3
    )
    assert [(r["request_id"], r["completion"]) for r in rows] == [(a["id"], a["text"]) for a in later]
    assert query(setup, "SELECT id FROM traffic WHERE request_id = 'killer-1'") == []
    assert up_before == 1 and metric(server, "vllm_surgery_traffic_writer_restarts_total") == 1
    status, body = server.get("/v1/surgery/traffic")
    assert status == 200 and body["writer"]["restarts"] == 1, body
    assert "WriterKilled" in body["writer"]["last_error"]
    assert metric(server, "vllm_surgery_traffic_writer_up") == 1
    assert server.get("/v1/surgery/traffic")[1]["writer"]["up"] is True
    assert metric(server, "vllm_surgery_traffic_records_total", adapter="x", outcome="failed") == 1
