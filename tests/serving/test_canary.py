"""The canary on live traffic, over real HTTP: one `vllm serve` (via `vllm-surgery-serve`) with traffic
capture, adapter "x" (an original under an operator root) and a refined version of it that the gate
accepted (the shared gain case), SQLite and a local store, the one-machine default.

- Sticky assignment: 2,000 requests of 2,000 users at share 0.25 (and 400 more of 200 of them); the version of each answer is read
  from what capture recorded (the version whose LoRA path the engine ran), and its text is checked
  against that version's own greedy answer to the prompt.
- Promote and rollback driven by simulated users through POST /v1/surgery/feedback: the reference
  answer of a prompt is what one version answers greedily (taken from the server before any canary),
  a user rates an answer "good" when it equals the reference and posts the reference as a correction
  otherwise. Reference = the canary's answers: the canary is truly better and is promoted, then served
  to all; reference = the current version's: the canary is truly worse and is rolled back. Client
  threads load the server throughout; none of their requests fails and none is answered by a mix of
  versions (every text is exactly one version's greedy answer).

Slow (one engine start, one refinement of a tiny model): `pytest -m slow tests/serving/test_canary.py`.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from server import metric, start_server, stop

from vllm_surgery.storage import open_database
from vllm_surgery.storage.store import VersionStore
from vllm_surgery.testing import GAIN_SETTINGS, build_gain_case

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "canary-admin-token"
ADMIN = {"X-Surgery-Admin-Token": ADMIN_TOKEN}
MIN_RATINGS = 10
SHARE = 0.25
STICKY_USERS = 2000
MAX_TOKENS = 6
CANDIDATE_PROMPTS = [f"what is {a} + {b} ?" for a in range(10) for b in range(0, 10, 3)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from transformers import AutoTokenizer

    from vllm_surgery.refine import refine

    root = tmp_path_factory.mktemp("canary")
    case = build_gain_case(root / "case")
    adapters = root / "adapters"
    shutil.copytree(case.adapter, adapters / "x")
    store = VersionStore(root / "store")
    refined = store.new_version_dir("x")
    result = refine(
        case.base, adapters / "x", case.calibration, refined, device="cpu", progress=False, **GAIN_SETTINGS
    )
    assert result.decision == "accept" and result.written, result.reason  # a canary is never forced
    second = store.new_version_dir("x")  # another accepted version (the same files): a job's, below
    shutil.copytree(refined, second, dirs_exist_ok=True)
    vocab = AutoTokenizer.from_pretrained(case.base).get_vocab()
    letters = sorted(i for t, i in vocab.items() if t.replace("Ġ", "").isalpha() and t.isascii())
    env = {
        "VLLM_SURGERY_ADAPTER_DIRS": str(adapters),
        "VLLM_SURGERY_STORE": str(store.root),
        "VLLM_SURGERY_DATABASE": str(root / "traffic.sqlite3"),
        "VLLM_PLUGINS": "vllm_surgery,vllm_surgery_api",
        "VLLM_SURGERY_ADMIN_TOKEN": ADMIN_TOKEN,
        "VLLM_SURGERY_TRAFFIC": "1",
        "VLLM_SURGERY_CANARY_MIN_RATINGS": str(MIN_RATINGS),
        "VLLM_SURGERY_POINTER_POLL_S": "1",
        # accepted jobs start canaries (the operator's swaps stay swaps); the pending-swap sweep every second
        "VLLM_SURGERY_CANARY_SHARE": str(SHARE),
        "VLLM_SURGERY_REFINE_CHECK_INTERVAL_S": "1",
    }
    srv = start_server(root, case.base, env)
    db = open_database(root / "traffic.sqlite3")
    try:
        yield {"server": srv, "db": db, "refined": refined.name, "second": second.name, "letters": letters}
    finally:
        db.close()
        left = stop(srv.proc)
        assert not left, f"processes left behind after SIGTERM (killed now): {left}"


def ask(setup: dict, prompt: str, user: str | None, rid: str) -> tuple[int, str]:
    body: dict[str, Any] = {
        "model": "x",
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "ignore_eos": True,
        "allowed_token_ids": setup["letters"],
    }
    if user is not None:
        body["user"] = user
    status, _headers, raw = setup["server"].raw_request(
        "POST", "/v1/completions", body, {"X-Request-Id": rid}
    )
    if status != 200:
        return status, raw.decode(errors="replace")
    answer = json.loads(raw)
    assert answer["model"] == "x", answer  # the client sees the name it asked for, never NAME@ID
    return status, answer["choices"][0]["text"]


def recorded_versions(setup: dict, rids: list[str]) -> dict[str, str]:
    """The version capture recorded for each request id (waits for the writer)."""
    db = setup["db"]
    deadline = time.monotonic() + 60
    while True:
        found = {}
        for rid in rids:
            stored = db.find(rid, 0)
            if stored is not None:
                found[rid] = stored.record.version
        if len(found) == len(rids) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def admin(setup: dict, path: str, body: Any = None) -> dict:
    status, answer = setup["server"].post(f"/v1/surgery/adapters/x{path}", body, ADMIN)
    assert status == 200, (path, status, answer, setup["server"].log_tail())
    return answer


@pytest.fixture(scope="module")
def answers(setup: dict) -> dict:
    """Each version's greedy answer to each candidate prompt, from the server itself (a swap to the
    refined version and back), and the prompts on which the two differ."""
    by_version: dict[str, dict[str, str]] = {}
    for version in (setup["refined"], "original"):
        admin(setup, "/swap", {"version": version})
        by_version[version] = {}
        for i, prompt in enumerate(CANDIDATE_PROMPTS):
            status, text = ask(setup, prompt, None, f"probe-{version}-{i}")
            assert status == 200, text
            by_version[version][prompt] = text
    differ = [p for p in CANDIDATE_PROMPTS if by_version["original"][p] != by_version[setup["refined"]][p]]
    assert len(differ) >= 3, (
        f"the two versions answer alike on {len(CANDIDATE_PROMPTS) - len(differ)} prompts"
    )
    return {"by_version": by_version, "differ": differ}


class Load:
    """Client threads asking "x" the differing prompts until stopped; every answer must be 200 and
    exactly one version's greedy answer (never a mix)."""

    def __init__(self, setup: dict, answers: dict, threads: int = 2) -> None:
        self.setup, self.answers = setup, answers
        self.stop = threading.Event()
        self.results: list[tuple[int, str, str]] = []
        self.threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(threads)]

    def _run(self, t: int) -> None:
        i = 0
        prompts = self.answers["differ"]
        while not self.stop.is_set():
            prompt = prompts[i % len(prompts)]
            status, text = ask(
                self.setup, prompt, f"load-{t}-{i % 50}", f"load-{t}-{i}-{time.monotonic_ns()}"
            )
            self.results.append((status, prompt, text))
            i += 1

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)

    def check(self) -> int:
        failed = [r for r in self.results if r[0] != 200]
        assert not failed, failed[:3]
        versions = self.answers["by_version"]
        mixed = [r for r in self.results if r[2] not in {v[r[1]] for v in versions.values()}]
        assert not mixed, mixed[:3]
        return len(self.results)


def test_sticky_assignment_at_a_quarter(setup: dict, answers: dict) -> None:
    refined = setup["refined"]
    canary = admin(setup, "/canary", {"version": refined, "share": SHARE})
    assert (canary["state"], canary["current_version"], canary["canary_version"]) == (
        "running",
        "original",
        refined,
    )
    # /v1/models lists the adapter once, never the canary's engine name
    status, models = setup["server"].get("/v1/models")
    assert status == 200 and sorted(m["id"] for m in models["data"] if m["id"].startswith("x")) == ["x"]

    prompts = CANDIDATE_PROMPTS
    # 2,000 users once each (the share), then 200 of them twice more (stickiness)
    jobs = [(f"user-{u}", prompts[u % len(prompts)], f"sticky-{u}-0") for u in range(STICKY_USERS)]
    jobs += [
        (f"user-{u}", prompts[(u + k) % len(prompts)], f"sticky-{u}-{k}") for k in (1, 2) for u in range(200)
    ]
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda j: ask(setup, j[1], j[0], j[2]), jobs))
    assert all(status == 200 for status, _ in texts), [t for t in texts if t[0] != 200][:3]
    versions = recorded_versions(setup, [j[2] for j in jobs])
    assert len(versions) == len(jobs)
    # what capture recorded is the version whose answer the client received
    by_version = answers["by_version"]
    for (_, prompt, rid), (_, text) in zip(jobs, texts, strict=True):
        assert text == by_version[versions[rid]][prompt], (rid, versions[rid], text)
    per_user = defaultdict(set)
    for user, _, rid in jobs:
        per_user[user].add(versions[rid])
    assert all(len(v) == 1 for v in per_user.values()), [u for u, v in per_user.items() if len(v) > 1][:5]
    counts = Counter(versions[rid] for _, _, rid in jobs[:STICKY_USERS])
    measured = counts[refined] / STICKY_USERS
    assert abs(measured - SHARE) <= 0.02, (measured, counts)
    assert metric(setup["server"], "vllm_surgery_canary_share", adapter="x") == SHARE
    to_canary = sum(1 for _, _, rid in jobs if versions[rid] == refined)
    assert (
        metric(setup["server"], "vllm_surgery_canary_requests_total", adapter="x", arm="canary") == to_canary
    )

    # chat, streamed: the same users get the same versions (routing does not depend on the endpoint)
    chat_ids = []
    for u in range(40):
        body = {
            "model": "x",
            "messages": [{"role": "user", "content": prompts[u % len(prompts)]}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "stream": True,
            "user": f"user-{u}",
        }
        status, _, raw = setup["server"].raw_request(
            "POST", "/v1/chat/completions", body, {"X-Request-Id": f"chat-{u}"}
        )
        assert status == 200 and b"[DONE]" in raw, raw[-300:]
        chat_ids.append(f"chat-{u}")
    chat_versions = recorded_versions(setup, chat_ids)
    assert chat_versions == {f"chat-{u}": versions[f"sticky-{u}-0"] for u in range(40)}
    assert len(set(chat_versions.values())) == 2

    # the share can change; an abort keeps the current version
    admin(setup, "/canary/share", {"share": 0.5})
    ended = admin(setup, "/canary/abort")
    assert ended["state"] == "aborted" and ended["decided_by"] == "admin"
    status, view = setup["server"].get("/v1/surgery/adapters/x")
    assert status == 200 and view["canary"] is None and view["served_version"] == "original"
    assert view["canary_history"][0]["id"] == canary["id"]
    assert [e["event"] for e in setup["db"].canary_events(canary["id"])] == ["started", "share", "aborted"]


def rate_until_decided(
    setup: dict, answers: dict, reference: dict[str, str], tag: str, limit: int = 1500
) -> dict:
    """Simulated users ask the differing prompts and rate every answer by `reference` (good when equal,
    else a correction) until the canary is decided; returns the decided canary row."""
    server = setup["server"]
    prompts = answers["differ"]
    for i in range(limit):
        prompt = prompts[i % len(prompts)]
        rid = f"{tag}-{i}"
        status, text = ask(setup, prompt, f"{tag}-user-{i}", rid)
        assert status == 200, text
        feedback = {"request_id": rid}
        feedback.update(
            {"rating": "good"} if text == reference[prompt] else {"correction": reference[prompt]}
        )
        status, stored = server.post("/v1/surgery/feedback", feedback, ADMIN)
        assert status == 200, stored
        if i % 10 == 9:
            status, view = server.get("/v1/surgery/adapters/x")
            if view["canary"] is None:
                decided = view["canary_history"][0]
                print(
                    f"\n{tag}: {decided['state']} after {i + 1} rated requests: {decided['verdict']['reason']}"
                )
                return decided
    pytest.fail(
        f"no decision after {limit} rated requests: {server.get('/v1/surgery/adapters/x')[1]['canary']}"
    )


def test_feedback_promotes_a_better_canary_and_rolls_back_a_worse_one(setup: dict, answers: dict) -> None:
    refined = setup["refined"]
    by_version = answers["by_version"]
    server = setup["server"]
    with Load(setup, answers) as load:
        time.sleep(1)
        started = admin(setup, "/canary", {"version": refined, "share": SHARE})
        status, view = server.get("/v1/surgery/adapters/x")
        assert view["canary"]["id"] == started["id"] and view["canary"]["figures"]
        decided = rate_until_decided(setup, answers, by_version[refined], "better")
        assert (decided["id"], decided["state"], decided["decided_by"]) == (started["id"], "promoted", "rule")
        assert decided["verdict"]["decision"] == "promoted" and decided["verdict"]["figures"]
        # served to all now
        for i, prompt in enumerate(answers["differ"] * 3):
            status, text = ask(setup, prompt, f"after-promote-{i}", f"after-promote-{i}")
            assert text == by_version[refined][prompt]
        status, view = server.get("/v1/surgery/adapters/x")
        assert status == 200 and view["served_version"] == refined

        # the original as a canary beside the refined version: truly worse here
        worse = admin(setup, "/canary", {"version": "original", "share": SHARE})
        decided = rate_until_decided(setup, answers, by_version[refined], "worse")
        assert (decided["id"], decided["state"], decided["decided_by"]) == (
            worse["id"],
            "rolled_back",
            "rule",
        )
        for i, prompt in enumerate(answers["differ"] * 3):
            _status, text = ask(setup, prompt, f"after-rollback-{i}", f"after-rollback-{i}")
            assert text == by_version[refined][prompt]
    served = load.check()
    assert served > 50, served
    assert metric(server, "vllm_surgery_canary_decisions_total", adapter="x", decision="promoted") == 1
    assert metric(server, "vllm_surgery_canary_decisions_total", adapter="x", decision="rolled_back") == 1
    assert metric(server, "vllm_surgery_canary_running", adapter="x") == 0


def wait_for(what: str, check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"no {what} after {timeout:g} s"
        time.sleep(0.25)
    return found


def test_an_accepted_job_starts_a_canary_instead_of_a_swap(setup: dict) -> None:
    """VLLM_SURGERY_CANARY_SHARE > 0: the server's pending-swap sweep and the worker's swap request
    (which names its job) start a canary of an accepted version; one at a time per adapter."""
    db, server, second = setup["db"], setup["server"], setup["second"]
    served = server.get("/v1/surgery/adapters/x")[1]["served_version"]

    def forge(version: str) -> int:  # what a worker records for an accepted job
        job = db.enqueue_job("x", "manual", {})[0]
        assert db.claim_job("w", 60).id == job.id
        assert db.finish_job(job.id, "w", "accepted", {"decision": "accept", "version": version}, "pending")
        return job.id

    first = forge(second)
    canary = wait_for("canary", lambda: db.running_canary("x"))
    assert (
        canary.job_id,
        canary.canary_version,
        canary.current_version,
        canary.share,
        canary.started_by,
    ) == (
        first,
        second,
        served,
        SHARE,
        f"job {first}",
    )
    wait_for("swap done", lambda: db.job(first).swap == "done")
    status, job_view = server.get(f"/v1/surgery/jobs/{first}")
    assert status == 200 and [c["id"] for c in job_view["canaries"]] == [canary.id]
    assert server.get("/v1/surgery/adapters/x")[1]["served_version"] == served  # not swapped
    # another job's version waits while this canary runs: its swap stays pending, and the worker's
    # request (SQLite) is answered "not now"
    other = "original" if served != "original" else setup["refined"]
    later = forge(other)
    status, answer = server.post("/v1/surgery/adapters/x/swap", {"version": other, "job": later}, ADMIN)
    assert status == 503 and "starts its own canary after it ends" in answer["error"]["message"]
    time.sleep(3)
    assert db.job(later).swap == "pending" and db.running_canary("x").id == canary.id
    admin(setup, "/canary/abort")
    after = wait_for(
        "the later job's canary", lambda: (c := db.running_canary("x")) and c.job_id == later and c
    )
    assert (after.started_by, after.canary_version) == (f"job {later}", other)
    # the worker's request for the running job's canary answers with it (a retry is no new canary)
    status, answer = server.post("/v1/surgery/adapters/x/swap", {"version": other, "job": later}, ADMIN)
    assert status == 200 and answer["canary"]["id"] == after.id
    admin(setup, "/canary/abort")
