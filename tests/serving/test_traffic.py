"""Traffic recording over real HTTP: one `vllm serve` (via `vllm-surgery-serve`) with traffic on.

Every expected value comes from what the clients received (parsed here from the raw responses) and
from the test's own reading of the SQLite file, never from the plugin's code. The server is killed
with SIGKILL at the end and started again on the same database.

Slow (two engine starts, 25-80 s each on 2 cores): `pytest -m slow tests/serving/test_traffic.py`.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import pacing
import pytest
from server import REQUEST_TIMEOUT_S, Server, metric, refine_forced, start_server, stop

from vllm_surgery.cli import main as cli
from vllm_surgery.storage.database import SCHEMA_VERSION
from vllm_surgery.testing import ALL_PROJ, build_lora_adapter, build_tiny_llama

pytestmark = pytest.mark.slow

API_KEY = "traffic-api-key"
ADMIN_TOKEN = "traffic-admin-token"
ADMIN = {"X-Surgery-Admin-Token": ADMIN_TOKEN}
RETAINED = 3  # adapter "r" keeps this many records


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("traffic")
    base = build_tiny_llama(root / "base", hidden=128, heads=2, kv_heads=2, layers=2, intermediate=256)
    adapters = root / "adapters"
    for i, name in enumerate(("x", "r", "off")):
        build_lora_adapter(base, adapters / name, r=8, alpha=16, target_modules=ALL_PROJ, seed=1 + i)
    static = build_lora_adapter(base, root / "elsewhere" / "static", r=8, alpha=16, seed=7)
    env = {
        "VLLM_SURGERY_ADAPTER_DIRS": str(adapters),
        "VLLM_SURGERY_STORE": str(root / "store"),
        "VLLM_SURGERY_DATABASE": str(root / "traffic.sqlite3"),
        "VLLM_PLUGINS": "vllm_surgery,vllm_surgery_api",
        "VLLM_SURGERY_ADMIN_TOKEN": ADMIN_TOKEN,
        "VLLM_SURGERY_TRAFFIC": "1",
        "VLLM_SURGERY_TRAFFIC_ADAPTERS": json.dumps(
            {"r": {"max_records": RETAINED}, "off": {"capture": False}}
        ),
        # every client's feedback counts here (the behaviour before feedback trust; the default,
        # "reviewer", is tested in test_traffic_security.py), and corrections up to the body limit
        "VLLM_SURGERY_FEEDBACK_TRUST": "api-key",
        "VLLM_SURGERY_FEEDBACK_MAX_CORRECTION_BYTES": str(64 * 1024),
        **pacing.server_env(),
    }
    args = [
        "--api-key",
        API_KEY,
        "--lora-modules",
        f"static={static}",
        "--max-cpu-loras",
        "6",
        *pacing.SERVER_ARGS,
    ]
    # Answers are drawn from letter tokens only: a random model's digit runs would otherwise be
    # redacted (correctly) and no longer equal what the client received.
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(base).get_vocab()
    letters = sorted(
        i for t, i in vocab.items() if t.replace("Ġ", "").isalpha() and t.replace("Ġ", "").isascii()
    )
    return {
        "root": root,
        "base": base,
        "env": env,
        "args": args,
        "db": root / "traffic.sqlite3",
        "letters": letters,
    }


LETTERS: list[int] = []  # set by the server fixture


def launch(setup: dict) -> Server:
    return start_server(
        setup["root"],
        setup["base"],
        setup["env"],
        setup["args"],
        headers={"Authorization": f"Bearer {API_KEY}"},
    )


@pytest.fixture(scope="module")
def server(setup: dict) -> Iterator[Server]:
    LETTERS[:] = setup["letters"]
    srv = launch(setup)
    try:
        yield srv
    finally:
        left = stop(srv.proc)
        assert not left, f"processes left behind after SIGTERM (killed now): {left}"


# ----------------------------------------------------------------------------- helpers
def ask(
    server: Server,
    model: str,
    prompt: str | list[str],
    *,
    chat: bool = False,
    stream: bool = False,
    rid: str | None = None,
    max_tokens: int = 8,
    **extra,
) -> dict:
    """One request; returns what the client received: id (X-Request-Id), texts per choice, finish
    reasons, usage, status."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": stream,
        "allowed_token_ids": LETTERS,
        **extra,
    }
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    status, headers, raw = server.raw_request("POST", path, body, {"X-Request-Id": rid} if rid else None)
    headers = {k.lower(): v for k, v in headers.items()}
    out = {"status": status, "id": headers.get("x-request-id"), "texts": {}, "finish": {}, "usage": None}
    if status != 200:
        out["error"] = raw.decode(errors="replace")
        return out
    events = (
        [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: {")]
        if stream
        else [json.loads(raw)]
    )
    for event in events:
        out["response_id"] = event.get("id")
        out["usage"] = event.get("usage") or out["usage"]
        for c in event.get("choices", []):
            part = c.get("text") if not chat else (c.get("delta") if stream else c.get("message"))
            text = part if not chat else (part or {}).get("content")
            out["texts"][c["index"]] = out["texts"].get(c["index"], "") + (text or "")
            if c.get("finish_reason"):
                out["finish"][c["index"]] = c["finish_reason"]
    if stream:
        assert raw.decode().rstrip().endswith("data: [DONE]"), raw[-200:]
    return out


def db_rows(setup: dict, where: str = "1", params: tuple = ()) -> list[dict]:
    """Rows read straight from the SQLite file (not through the plugin), with the latest feedback."""
    conn = sqlite3.connect(setup["db"])
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute(  # `where` names the record's columns (feedback rows have an adapter too)
            "SELECT * FROM (SELECT t.*, f.rating AS rating, f.correction AS correction, "
            "(SELECT COUNT(*) FROM feedback WHERE traffic_id = t.id) AS feedback_count "
            "FROM traffic t LEFT JOIN feedback f ON f.id = (SELECT MAX(id) FROM feedback WHERE traffic_id = t.id)) "
            f"WHERE {where} ORDER BY id",
            params,
        ).fetchall()
        return [dict(r) for r in rows]
    finally:
        conn.close()


def wait_for_rows(
    setup: dict, n: int, where: str = "1", params: tuple = (), timeout: float = 30.0
) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(rows := db_rows(setup, where, params)) < n:
        assert time.monotonic() < deadline, f"only {len(rows)} of {n} records written after {timeout} s"
        time.sleep(0.1)
    return rows


def check_matches(row: dict, got: dict, choice: int, prompt, version: str = "original") -> None:
    assert row["completion"] == got["texts"][choice], (row, got)
    assert row["finish_reason"] == got["finish"][choice]
    assert row["version"] == version
    assert json.loads(row["prompt"]) == prompt
    assert row["response_id"] == got["response_id"]


# ----------------------------------------------------------------------------- tests
def test_every_request_of_concurrent_clients_is_recorded_as_received(server: Server, setup: dict) -> None:
    """N requests from 6 concurrent clients (streamed and not, completions and chat, with and without
    their own X-Request-Id) give exactly N records whose text is what each client received."""
    jobs = []
    for i in range(24):
        chat, stream, own_id = i % 3 == 0, i % 2 == 0, i % 4 == 1
        prompt = f"question {i} : what is {i} + {2 * i} ?"
        jobs.append((prompt, chat, stream, f"client-id-{i}" if own_id else None))
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda j: ask(server, "x", j[0], chat=j[1], stream=j[2], rid=j[3]), jobs))
    assert all(g["status"] == 200 for g in got), [g for g in got if g["status"] != 200][:2]
    for (_, _, _, own), g in zip(jobs, got, strict=True):
        assert g["id"] == (own or g["id"]) and g["id"], g  # the client's id, or a generated one, comes back
        assert g["response_id"].endswith(g["id"]) and g["response_id"].split("-")[0] in ("cmpl", "chatcmpl")
    ids = [g["id"] for g in got]
    assert len(set(ids)) == len(ids)
    rows = wait_for_rows(setup, len(ids), "adapter = 'x'")
    assert len(rows) == len(ids) == 24  # exactly N: nothing lost, nothing doubled
    by_id = {r["request_id"]: r for r in rows}
    assert set(by_id) == set(ids)
    for (prompt, chat, stream, _), g in zip(jobs, got, strict=True):
        row = by_id[g["id"]]
        check_matches(row, g, 0, [{"role": "user", "content": prompt}] if chat else prompt)
        assert row["endpoint"] == ("chat" if chat else "completions") and row["choice"] == 0
        assert json.loads(row["sampling"])["stream"] is stream
        assert row["completion_tokens"] == 8 or row["finish_reason"] == "stop"
        if g["usage"]:
            assert row["completion_tokens"] == g["usage"]["completion_tokens"]
            assert row["prompt_tokens"] == g["usage"]["prompt_tokens"]
    assert metric(server, "vllm_surgery_traffic_records_total", adapter="x", outcome="logged") == 24


def test_several_choices_give_one_record_each(server: Server, setup: dict) -> None:
    got = ask(server, "x", "pick two", n=2, stream=True, temperature=1.0, seed=3)
    assert got["status"] == 200 and set(got["texts"]) == {0, 1}
    rows = wait_for_rows(setup, 2, "request_id = ?", (got["id"],))
    assert [r["choice"] for r in rows] == [0, 1]
    for row in rows:
        check_matches(row, got, row["choice"], "pick two")
    many = ask(server, "x", ["first prompt", "second prompt"])  # a list of prompts
    assert many["status"] == 200
    rows = wait_for_rows(setup, 2, "request_id = ?", (many["id"],))
    assert [json.loads(r["prompt"]) for r in rows] == ["first prompt", "second prompt"]
    assert [r["completion"] for r in rows] == [many["texts"][0], many["texts"][1]]


def test_what_is_not_recorded(server: Server, setup: dict) -> None:
    """The base model, an adapter with capture off, an adapter the plugin does not know (loaded
    through vLLM's own route), a failed request: no record, and no id header for the unrecorded."""
    base = ask(server, str(setup["base"]), "base model please")
    assert base["status"] == 200
    off = ask(server, "off", "capture is off for me")
    assert off["status"] == 200 and off["id"] is None
    # vLLM's load route (guarded: admin token, and only originals or store versions) under a new name
    loaded_path = str(setup["root"] / "adapters" / "x")
    status, body = server.post(
        "/v1/load_lora_adapter", {"lora_name": "loaded", "lora_path": loaded_path}, ADMIN
    )
    assert status == 200, body
    loaded = ask(server, "loaded", "loaded by hand", rid="loaded-1")
    assert loaded["status"] == 200
    bad = ask(server, "x", "too long", max_tokens=100_000, rid="too-long-1")
    assert bad["status"] == 400
    static = ask(server, "static", "lora-modules adapters are known")  # a marker written after the others
    assert static["status"] == 200
    rows = wait_for_rows(setup, 1, "request_id = ?", (static["id"],))
    assert rows[0]["adapter"] == "static" and rows[0]["version"] == "original"
    assert db_rows(setup, "adapter IN ('off', 'loaded') OR request_id IN ('loaded-1', 'too-long-1')") == []
    assert db_rows(setup, "prompt LIKE '%base model please%'") == []


def test_redaction_before_storing(server: Server, setup: dict) -> None:
    got = ask(server, "x", "mail jane@example.com or call 555-123-4567 about 12 + 30", chat=True)
    row = wait_for_rows(setup, 1, "request_id = ?", (got["id"],))[0]
    assert json.loads(row["prompt"]) == [
        {"role": "user", "content": "mail [EMAIL] or call [NUMBER] about 12 + 30"}
    ]
    files = [setup["db"], setup["db"].with_name(setup["db"].name + "-wal")]
    stored = b"".join(f.read_bytes() for f in files if f.exists())
    assert b"jane@example.com" not in stored and b"[EMAIL]" in stored


def test_a_hostile_value_never_stops_recording(server: Server, setup: dict) -> None:
    """A lone surrogate ("\\ud800", valid JSON) in a string field, with the API key alone, once killed the
    writer thread: no later request was recorded. It is stored as U+FFFD, and recording goes on; a
    correction of 60,000 letters without "@" (the e-mail pattern once took seconds on it, stalling the
    server) is redacted and stored. (On adapter r, whose records the other tests do not count.)"""
    got = ask(server, "r", "a hostile user field", user="\ud800", rid="hostile-1")
    assert got["status"] == 200, got
    later = ask(server, "r", "a request after it", rid="hostile-2")
    (row,) = wait_for_rows(setup, 1, "request_id = ?", ("hostile-2",))
    check_matches(row, later, 0, "a request after it")
    (hostile,) = db_rows(setup, "request_id = 'hostile-1'")
    assert json.loads(hostile["sampling"])["user"] == "\ufffd"
    letters = "a" * 60_000
    status, body = server.post("/v1/surgery/feedback", {"request_id": "hostile-2", "correction": letters})
    assert status == 200 and body["corrected"] is True, body
    (row,) = db_rows(setup, "request_id = 'hostile-2'")
    assert row["correction"] == letters


def test_retention_while_serving(server: Server, setup: dict) -> None:
    ids = [ask(server, "r", f"retained {i}")["id"] for i in range(RETAINED + 3)]
    deadline = time.monotonic() + 30
    while [r["request_id"] for r in db_rows(setup, "adapter = 'r'")] != ids[-RETAINED:]:
        assert time.monotonic() < deadline, db_rows(setup, "adapter = 'r'")
        time.sleep(0.1)


def _cut_stream(server: Server, request_id: str) -> None:
    """Start a long streamed answer, read its first event, then go away. The socket's receive window
    is kept small and the events are large (logprobs), so the server stalls on a full buffer long
    before the answer ends: the disconnect reaches it mid-stream even on a fast machine."""
    url = urlparse(server.url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window stays small
    sock.settimeout(REQUEST_TIMEOUT_S)
    sock.connect((url.hostname, url.port))
    body = json.dumps(
        {
            "model": "x",
            "prompt": "a long answer",
            "max_tokens": 240,
            "ignore_eos": True,
            "stream": True,
            "logprobs": 20,
        }
    ).encode()
    head = "".join(
        f"{k}: {v}\r\n"
        for k, v in {
            **server.headers,
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            "X-Request-Id": request_id,
        }.items()
    )
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\n{head}\r\n".encode() + body)
    received = b""
    while b"data: " not in received:  # the status line, the headers and the first event
        chunk = sock.recv(1024)
        assert chunk, received
        received += chunk
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def test_client_disconnect_is_not_recorded(server: Server, setup: dict) -> None:
    # A server that had already sent the whole answer before the disconnect reached it rightly records
    # it (all 240 tokens): then the cut is tried again; a real cut must be counted and never stored.
    for attempt in range(3):
        request_id = f"gone-{attempt}"
        before = metric(server, "vllm_surgery_traffic_records_total", adapter="x", outcome="incomplete")
        _cut_stream(server, request_id)
        deadline = time.monotonic() + 30
        while True:
            if (
                metric(server, "vllm_surgery_traffic_records_total", adapter="x", outcome="incomplete")
                > before
            ):
                time.sleep(0.5)  # a record written despite the cut would show up by now
                assert db_rows(setup, "request_id = ?", (request_id,)) == []
                return
            if rows := db_rows(setup, "request_id = ?", (request_id,)):
                assert rows[0]["finish_reason"] == "length", rows[0]  # the whole answer had gone out
                break
            assert time.monotonic() < deadline, (
                "the cut stream was neither counted as incomplete nor recorded"
            )
            time.sleep(0.2)
    pytest.fail("every stream ended before the server saw the client go away: no cut could be tried")


def test_feedback(server: Server, setup: dict) -> None:
    got = ask(server, "x", "rate me", rid="fb-1")
    assert server.post("/v1/surgery/feedback", {"request_id": "fb-1", "rating": "bad"}) == (
        200,
        {
            "request_id": "fb-1",
            "response_id": "cmpl-fb-1",
            "choice": 0,
            "adapter": "x",
            "version": "original",
            "rating": "bad",
            "corrected": False,
            "feedback_count": 1,
            "trusted": True,
        },
    )
    # by the response id, with a correction: the latest wins, the history is kept
    status, body = server.post("/v1/surgery/feedback", {"request_id": got["response_id"], "correction": "42"})
    assert status == 200 and body["feedback_count"] == 2, body
    (row,) = db_rows(setup, "request_id = 'fb-1'")
    assert (row["rating"], row["correction"], row["feedback_count"]) == (None, "42", 2)
    # feedback right after the answer (the record may still be queued) is found
    for i in range(5):
        fresh = ask(server, "x", f"quick feedback {i}", stream=bool(i % 2))
        status, body = server.post("/v1/surgery/feedback", {"request_id": fresh["id"], "rating": "good"})
        assert status == 200, body
    # clients need only the API key, not the admin token; without the API key: 401
    assert (
        server.post("/v1/surgery/feedback", {"request_id": "fb-1", "rating": "good"}, {"Authorization": ""})[
            0
        ]
        == 401
    )
    assert (
        metric(server, "vllm_surgery_traffic_feedback_total", adapter="x", rating="good", trusted="true") == 5
    )
    assert (
        metric(
            server, "vllm_surgery_traffic_feedback_total", adapter="x", rating="correction", trusted="true"
        )
        == 1
    )
    stats = {(s["adapter"], s["version"]): s for s in server.get("/v1/surgery/traffic")[1]["stats"]}
    assert (
        metric(server, "vllm_surgery_calibration_examples", adapter="x")
        == stats[("x", "original")]["usable"]
        == 6
    )


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"rating": "good"}, 400, "'request_id'"),
        ({"request_id": "fb-1", "rating": "meh"}, 400, "'rating' must be one of"),
        ({"request_id": "fb-1"}, 400, "give 'rating'"),
        ({"request_id": "fb-1", "correction": "  "}, 400, "'correction' must be a non-empty string"),
        ({"request_id": "fb-1", "rating": "good", "choice": -1}, 400, "'choice' must be an integer"),
        ({"request_id": "fb-1", "rating": "good", "stars": 5}, 400, "unknown field(s) ['stars']"),
        ({"request_id": "no-such-request", "rating": "good"}, 404, "no recorded request"),
        ({"request_id": "fb-1", "rating": "good", "choice": 1}, 404, "choice 1"),
        (b"not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        ({"request_id": "fb-1", "correction": "x" * 100_000}, 413, "exceeds the limit"),
    ],
)
def test_bad_feedback_is_refused_by_name(server: Server, body, status: int, message: str) -> None:
    got_status, got = server.post("/v1/surgery/feedback", body)
    assert got_status == status, got
    assert message in got["error"]["message"]


def test_reading_traffic_needs_the_admin_token(server: Server) -> None:
    assert server.get("/v1/surgery/traffic/x")[0] == 403
    status, body = server.get("/v1/surgery/traffic/x?limit=2", ADMIN)
    assert status == 200 and len(body["records"]) == 2 and body["next_after_id"] is not None
    assert body["records"][0]["prompt"] and "completion" in body["records"][0]
    assert server.get("/v1/surgery/traffic/x?limit=5000", ADMIN)[0] == 400
    assert server.get("/v1/surgery/traffic/x?since=someday", ADMIN)[0] == 400
    status, body = server.get("/v1/surgery/traffic")  # counts only: the API key suffices
    assert status == 200 and "prompt" not in json.dumps(body)


@pytest.fixture(scope="module")
def refined(server: Server, setup: dict) -> str:
    """A servable refined version of "x" in the store (refine(force=True), as in test_hotswap)."""
    from vllm_surgery.storage.store import VersionStore

    out = VersionStore(setup["root"] / "store").new_version_dir("x")
    return refine_forced(setup["base"], setup["root"], "x", out).name


def swap(server: Server, version: str) -> None:
    # The refined version was written with force (decision "forced"): an operator's swap says force.
    status, body = server.post("/v1/surgery/adapters/x/swap", {"version": version, "force": True}, ADMIN)
    assert status == 200, body


def test_the_version_that_served_is_recorded_across_a_hot_swap(
    server: Server, setup: dict, refined: str
) -> None:
    swap(server, refined)
    after = [ask(server, "x", f"after swap {i}", stream=bool(i % 2)) for i in range(3)]
    # A long stream starts on the refined version; the swap back to the original happens mid-stream.
    body = {
        "model": "x",
        "prompt": "long stream",
        "max_tokens": 240,
        **pacing.paced(20),  # at least 4.8 s of generation: the swap lands mid-stream on a fast machine too
        "ignore_eos": True,
        "stream": True,
        "temperature": 0.0,
        "allowed_token_ids": LETTERS,
    }
    req = urllib.request.Request(
        server.url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-Request-Id": "spans-swap", **server.headers},
    )
    text, chunks_after, first = [], [0], threading.Event()
    swapped = threading.Event()

    def read() -> None:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:
            for raw in r:
                line = raw.decode().strip()
                if line.startswith("data: {"):
                    text.append(json.loads(line[6:])["choices"][0]["text"])
                    chunks_after[0] += swapped.is_set()
                    first.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert first.wait(REQUEST_TIMEOUT_S)
    swap(server, "original")
    swapped.set()
    reader.join(REQUEST_TIMEOUT_S)
    assert chunks_after[0] > 0, "the stream ended before the swap: nothing was in flight"
    back = ask(server, "x", "after swapping back")
    rows = {
        r["request_id"]: r
        for r in wait_for_rows(
            setup, 5, "request_id IN (?,?,?,?,?)", (*[a["id"] for a in after], "spans-swap", back["id"])
        )
    }
    for i, a in enumerate(after):
        check_matches(rows[a["id"]], a, 0, f"after swap {i}", version=refined)
    assert rows["spans-swap"]["version"] == refined  # the version that served it, not the one now
    assert rows["spans-swap"]["completion"] == "".join(text)
    assert rows["spans-swap"]["served_path"].endswith(refined)
    assert rows[back["id"]]["version"] == "original"
    stats = {(s["adapter"], s["version"]): s for s in server.get("/v1/surgery/traffic")[1]["stats"]}
    assert stats[("x", refined)]["records"] == 4


def test_export_then_refine_from_the_exported_file(server: Server, setup: dict, tmp_path: Path) -> None:
    out = tmp_path / "x.jsonl"
    assert cli(["calibration", "export", "x", "--output", str(out), "--db", str(setup["db"])]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    # the rated-good records of test_feedback, and the corrected one (its correction is the answer)
    assert len(lines) == 6 and {"prompt": "rate me", "completion": "42", "feedback": "correction"} in lines
    assert (
        cli(
            [
                "calibration",
                "export",
                "x",
                "--output",
                str(out),
                "--db",
                str(setup["db"]),
                "--include-unrated",
            ]
        )
        == 0
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) > 30
    code = cli(
        [
            "refine",
            "--base-model",
            str(setup["base"]),
            "--adapter",
            str(setup["root"] / "adapters" / "x"),
            "--calibration",
            str(out),
            "--output",
            str(tmp_path / "refined"),
            "--modules",
            "all",
            "--force",
            "--quiet",
            "--device",
            "cpu",
        ]
    )
    assert code == 0 and (tmp_path / "refined" / "adapter_model.safetensors").is_file()


def test_refine_route_from_traffic(server: Server) -> None:
    body = {"from_traffic": True, "include_unrated": True, "modules": "all", "swap": False}
    status, got = server.post("/v1/surgery/adapters/x/refine", body, ADMIN)
    assert status == 202, got  # queued for a worker, with the adapter's set built when it runs
    assert got["state"] == "queued" and got["examples"] > 30, got
    source = got["job"]["spec"]["calibration"]
    assert (
        source["source"] == "adapter"
        and source["include_unrated"] is True
        and got["job"]["spec"]["swap"] is False
    )
    status, got = server.post("/v1/surgery/adapters/r/refine", {"from_traffic": True}, ADMIN)
    assert status == 409 and "no usable calibration examples" in got["error"]["message"], got
    status, got = server.post("/v1/surgery/adapters/x/refine", {"from_traffic": True, "records": []}, ADMIN)
    assert status == 400 and "exactly one of" in got["error"]["message"]


def test_sigkill_keeps_every_committed_record_and_the_schema(server: Server, setup: dict) -> None:
    """Last: kills the module's server. Records committed before the kill survive; the file is intact."""
    ids = [ask(server, "x", f"before the crash {i}")["id"] for i in range(5)]
    wait_for_rows(setup, 5, f"request_id IN ({','.join('?' * 5)})", tuple(ids))
    committed = db_rows(setup)
    server.kill()
    assert not server.members()
    restarted = launch(setup)
    try:
        conn = sqlite3.connect(setup["db"])
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
        assert db_rows(setup) == committed
        got = ask(restarted, "x", "after the restart")
        assert wait_for_rows(setup, 1, "request_id = ?", (got["id"],))[0]["completion"] == got["texts"][0]
        # A clean stop right after the last answers: the shutdown closes the writer (log line), and
        # nothing answered is missing. (That close() writes a non-empty queue is shown by
        # test_traffic_writer.py; here the records may also be written during vLLM's own shutdown.)
        last = [ask(restarted, "x", f"just before the stop {i}")["id"] for i in range(3)]
    finally:
        assert not restarted.stop()
    assert len(db_rows(setup, "request_id IN (?,?,?)", tuple(last))) == 3
    assert "traffic: writer closed" in restarted.log_tail(400)
