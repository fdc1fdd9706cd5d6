"""Many replicas with real processes: two `vllm serve` replicas (via `vllm-surgery-serve`) sharing one
real Postgres database (vllm_surgery/testing_servers.py) and one store directory, a third started later, and a
`vllm-surgery worker` given no server address.

The served version is the served pointer in the database: an admin swap or rollback on either replica
reaches the other through LISTEN/NOTIFY (measured: within 1 s of the swap's answer); a replica started
afterwards serves the pointer on its first request; a worker's accepted job is served by both; a
version a replica cannot validate (corrupt weights) leaves it serving what it had, reporting `failed`.
A canary started on one replica is served by both (the same user gets the same version from
either); its share change and its promotion on the other replica reach both.

Which weights answer is proven as in test_hotswap.py: the replica's greedy tokens and log-probs equal
transformers+PEFT float32 teacher forcing of exactly one candidate version. The versions come from the
shared gain case (`build_gain_case`), on which the gate accepts a real gain, so no swap here needs
force. Pointer rows are read with the Database API on a connection of the test's own.

Slow (three engine starts, one worker, two refinements of a tiny model):
`pytest -m slow tests/serving/test_replicas.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from server import (
    LOGPROB_TOL,
    Server,
    complete,
    generated,
    metric,
    peft_reference,
    replica_cluster,
    start_server,
    stop,
    teacher_forced,
    tokenized,
)

from vllm_surgery.storage.store import VersionStore
from vllm_surgery.testing import GAIN_SETTINGS, build_gain_case

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "replicas-admin-token"
ADMIN = {"X-Surgery-Admin-Token": ADMIN_TOKEN}
PROMPTS = ["what is 12 + 30 ?", "the quick brown fox", "7 + 8 ="]
PROBE_EVERY_S = 0.05  # how often wait_serving asks (its resolution)
PROBES_IN_FLIGHT = 4  # bounded: the probes must not be what keeps the replica busy
FOLLOW_LIMIT_S = 1.0  # the bound: every replica serves a pointer change within a second
# What one follow may take here, at worst. The replicas' logs show the notification arriving 1-2 ms
# after the commit and the local swap (validation and vLLM's add_lora) taking 4-50 ms, but the first
# follow of a version never seen before 0.4 s (its snapshot is copied and validated), and the first
# answers of a new adapter id are slower on these 2 shared cores; with both CPU engines bound to one
# core (vLLM's "auto" binding) add_lora itself took up to 1.0 s. The median is held to the issue's
# second, every single follow to this.
FOLLOW_WORST_S = 2.5
SWAPS = 6  # admin swaps measured (alternating replicas and versions)
JOB_SETTINGS = {k: v for k, v in GAIN_SETTINGS.items() if k != "policy"}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, postgres_server) -> Iterator[dict]:
    """Replicas A and B (started together), the store with an accepted and a corrupt version of "x",
    and "w", an adapter a worker job refines later."""
    from vllm_surgery.refine import refine

    root = tmp_path_factory.mktemp("replicas")
    case = build_gain_case(root / "case")
    other = build_gain_case(root / "case-w", base=case.base, adapter_seed=2)
    adapters = root / "adapters"
    shutil.copytree(case.adapter, adapters / "x")
    shutil.copytree(other.adapter, adapters / "w")
    store = VersionStore(root / "store")
    refined = store.new_version_dir("x")
    result = refine(
        case.base, adapters / "x", case.calibration, refined, device="cpu", progress=False, **GAIN_SETTINGS
    )
    assert result.decision == "accept" and result.written, result.reason  # the gate accepted it: no force
    corrupt = store.new_version_dir("x")
    shutil.copytree(refined, corrupt, dirs_exist_ok=True)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # surgery.json intact: "accept", the right hash
    env = {
        "VLLM_SURGERY_CALIBRATION_DIR": str(case.calibration.parent),
        "VLLM_SURGERY_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    (root / "c").mkdir()
    database = postgres_server.new_database()
    with replica_cluster(case.base, root, adapters, store.root, database, env) as cluster:
        cluster.update(store=store, calibration=case.calibration, refined=refined.name, corrupt=corrupt.name)
        yield cluster


@pytest.fixture(scope="module")
def prompt_ids(cluster: dict) -> list[list[int]]:
    return tokenized(cluster["base"], PROMPTS)


@pytest.fixture(scope="module")
def peft_model(cluster: dict):
    """The base with every candidate loaded: x's original and refined version, w's original."""
    refined = cluster["refined"]
    return peft_reference(
        cluster["base"],
        {
            "x:original": cluster["adapters"] / "x",
            f"x:{refined}": cluster["store"].version_dir("x", refined),
            "w:original": cluster["adapters"] / "w",
        },
    )


# ----------------------------------------------------------------------------- helpers
def version_of_answer(model, name: str, ids: list[int], body: dict) -> str | None:
    """The one candidate version of `name` (loaded in `model` as "NAME:VERSION") whose teacher-forced
    log-probs match this answer's tokens; None when none or several do."""
    gen, logprobs = generated(body)
    matching = [
        a.split(":", 1)[1]
        for a in model.peft_config
        if a.startswith(f"{name}:")
        and max(abs(x - y) for x, y in zip(logprobs, teacher_forced(model, a, ids, gen), strict=True))
        < LOGPROB_TOL
    ]
    return matching[0] if len(matching) == 1 else None


def serving(server: Server, name: str, prompts: list[list[int]], model) -> str:
    """The version of `name` that answers every prompt on `server`; fails when the answers do not
    all match exactly one and the same candidate."""
    found = set()
    for ids in prompts:
        status, body = complete(server, name, ids)
        assert status == 200, f"{name}: {status} {body}\n{server.log_tail()}"
        found.add(version_of_answer(model, name, ids, body))
    assert len(found) == 1 and None not in found, f"{server.label}: {name} answers as {found}"
    return found.pop()


def wait_serving(server: Server, name: str, version: str, prompts, model, timeout: float = 30.0) -> float:
    """Seconds from the call until `server` serves `version` of `name`: a probe (the first prompt) is
    sent every PROBE_EVERY_S, concurrently, so that one slow answer (the first request of a new
    adapter id loads it into the engine's slots) does not hide when the switch happened. The switch is
    the send time of the first probe answered by `version`; every probe sent after it must be answered
    by it too (no answer from the old version once the new one served), and then every prompt."""
    start = time.perf_counter()
    ids = prompts[0]

    def probe() -> tuple[float, str | None]:
        sent = time.perf_counter() - start  # when the request leaves, not when it was queued here
        status, body = complete(server, name, ids)
        assert status == 200, body
        return sent, body

    probes: list[Any] = []
    seen: dict[int, tuple[float, str | None]] = {}

    def collect(block: bool) -> None:
        for i, future in enumerate(probes):
            if i not in seen and (block or future.done()):
                sent, body = future.result()
                seen[i] = (sent, version_of_answer(model, name, ids, body))

    with ThreadPoolExecutor(PROBES_IN_FLIGHT) as pool:
        while not any(v == version for _, v in seen.values()):
            if time.perf_counter() - start > timeout:
                pytest.fail(
                    f"{server.label} did not serve {name} {version} within {timeout} s:\n{server.log_tail()}"
                )
            if len(probes) - len(seen) < PROBES_IN_FLIGHT:
                probes.append(pool.submit(probe))
            time.sleep(PROBE_EVERY_S)
            collect(block=False)
        collect(block=True)  # the probes still in flight
    ordered = sorted(seen.values())  # by send time
    first = next(i for i, (_, v) in enumerate(ordered) if v == version)
    later = [v for _, v in ordered[first:]]
    assert set(later) == {version}, f"answers after the switch: {later}"
    assert serving(server, name, prompts, model) == version
    return ordered[first][0]


def view(server: Server, name: str) -> dict:
    status, body = server.get(f"/v1/surgery/adapters/{name}")
    assert status == 200, body
    return body


def wait_view(server: Server, name: str, check, what: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = view(server, name)
        if check(body):
            return body
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s; the view is {json.dumps(body)[:2000]}")
        time.sleep(0.2)


def replica_states(body: dict) -> dict[str, tuple]:
    return {r["id"]: (r["version"], r["state"]) for r in body["replicas"]}


def swap(server: Server, name: str, version: str) -> tuple[int, dict]:
    return server.post(f"/v1/surgery/adapters/{name}/swap", {"version": version}, headers=ADMIN)


def run_worker(settings: dict[str, str], root) -> str:
    """Run `vllm-surgery worker --drain` (no --server) with this environment's variables but for
    VLLM_SURGERY_* and AWS_*, plus `settings`; its log is ROOT/worker.log. Returns the log's text;
    fails the test when the worker fails."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_SURGERY_", "AWS_"))}
    env.update(settings)
    log = root / "worker.log"
    with open(log, "wb") as out:
        done = subprocess.run(
            [sys.executable, "-m", "vllm_surgery.cli", "worker", "--device", "cpu", "--drain"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    text = log.read_text(errors="replace")
    assert done.returncode == 0, text[-3000:]
    return text


# ----------------------------------------------------------------------------- tests
def test_both_replicas_start_on_the_original(cluster, prompt_ids, peft_model) -> None:
    a, b, db = cluster["a"], cluster["b"], cluster["db"]
    assert serving(a, "x", prompt_ids, peft_model) == "original"
    assert serving(b, "x", prompt_ids, peft_model) == "original"
    assert db.served_pointer("x") is None
    body = wait_view(
        a,
        "x",
        lambda v: (
            replica_states(v) == {"replica-a": ("original", "in_sync"), "replica-b": ("original", "in_sync")}
        ),
        "both replicas report serving the original",
    )
    assert body["pointer"] is None and body["store_served_version"] is None


def test_an_admin_swap_on_one_replica_is_served_by_the_other_within_a_second(
    cluster, prompt_ids, peft_model
) -> None:
    a, b, db = cluster["a"], cluster["b"], cluster["db"]
    refined = cluster["refined"]
    from_answer, from_request = [], []
    for i in range(SWAPS):
        here, there = (a, b) if i % 2 == 0 else (b, a)
        version = refined if i % 2 == 0 else "original"
        start = time.perf_counter()
        status, body = swap(here, "x", version)
        answered = time.perf_counter()
        assert status == 200 and body["version"] == version and body["changed"], body
        waited = wait_serving(there, "x", version, prompt_ids, peft_model)  # starts at once
        from_answer.append(waited)  # measured from the answer: wait_serving began right after it
        from_request.append(answered - start + waited)
        assert here.get("/v1/surgery/adapters/x")[1]["served_version"] == version
        assert serving(here, "x", prompt_ids, peft_model) == version  # and where it was asked
    print(
        f"\nthe other replica serves the swapped version, seconds after the swap's answer: "
        f"{[round(t, 3) for t in from_answer]}; after its request: {[round(t, 3) for t in from_request]}"
    )
    assert statistics.median(from_answer) < FOLLOW_LIMIT_S, from_answer
    assert max(from_answer) < FOLLOW_WORST_S, from_answer
    pointer = db.served_pointer("x")
    assert (pointer.version, pointer.revision, pointer.set_by, pointer.forced) == (
        "original",
        SWAPS,
        "admin",
        False,
    )
    history = db.pointer_history("x")
    assert [(c.from_version, c.to_version) for c in history] == [
        ("original", refined) if i % 2 == 0 else (refined, "original") for i in range(SWAPS)
    ]
    assert not (cluster["store"].root / "x" / "served.json").exists()  # the database holds the pointer


def test_a_rollback_on_either_replica_acts_on_all(cluster, prompt_ids, peft_model) -> None:
    a, b, db = cluster["a"], cluster["b"], cluster["db"]
    refined = cluster["refined"]
    status, body = swap(a, "x", refined)
    assert status == 200, body
    wait_serving(b, "x", refined, prompt_ids, peft_model)
    status, body = b.post("/v1/surgery/adapters/x/rollback", {}, headers=ADMIN)  # on the other replica
    assert status == 200 and (body["version"], body["previous_version"]) == ("original", refined), body
    waited = wait_serving(a, "x", "original", prompt_ids, peft_model)
    print(f"\nrollback on B: A serves the original {waited:.3f} s after the answer")
    assert waited < FOLLOW_WORST_S, waited
    last = db.pointer_history("x")[-1]
    assert (last.from_version, last.to_version, last.changed_by) == (refined, "original", "rollback")
    assert last.reason.startswith(f"rollback of revision {last.revision - 1} ({refined}, by admin)")
    # a rollback goes back over the latest change: the rollback itself, here
    status, body = a.post("/v1/surgery/adapters/x/rollback", {}, headers=ADMIN)
    assert status == 200 and body["version"] == refined, body
    wait_serving(b, "x", refined, prompt_ids, peft_model)
    assert serving(a, "x", prompt_ids, peft_model) == refined


def test_a_replica_that_cannot_validate_the_version_keeps_serving_and_reports_failed(
    cluster, prompt_ids, peft_model
) -> None:
    """The pointer names a version whose copy is corrupt (written as a worker on another machine whose
    copy was intact would): neither replica serves it, both keep the refined version and say why."""
    a, b, db = cluster["a"], cluster["b"], cluster["db"]
    refined, corrupt = cluster["refined"], cluster["corrupt"]
    failed_before = metric(b, "vllm_surgery_pointer_follows_total", adapter="x", outcome="failed")
    info = cluster["store"].version_info("x", corrupt)
    db.set_served_pointer("x", corrupt, adapter_hash=info.adapter_hash, by="job 999")
    body = wait_view(
        a,
        "x",
        lambda v: {s for _, s in replica_states(v).values()} == {"failed"},
        "both replicas report failed",
    )
    assert replica_states(body) == {"replica-a": (refined, "failed"), "replica-b": (refined, "failed")}
    for r in body["replicas"]:
        assert "corrupt" in r["error"] and corrupt in r["error"], r
    assert body["pointer"]["version"] == corrupt and body["served_version"] == refined
    for srv in (a, b):
        assert serving(srv, "x", prompt_ids, peft_model) == refined  # still served, nothing failed
    assert metric(b, "vllm_surgery_pointer_follows_total", adapter="x", outcome="failed") > failed_before
    assert metric(b, "vllm_surgery_replica_in_sync", adapter="x") == 0.0
    assert "cannot serve " + corrupt in b.log_tail(400)
    # an admin points it back at the refined version: both are in sync again
    status, body = swap(a, "x", refined)
    assert status == 200 and not body["changed"], body  # A already served it
    wait_view(
        b,
        "x",
        lambda v: replica_states(v) == {"replica-a": (refined, "in_sync"), "replica-b": (refined, "in_sync")},
        "both replicas in sync again",
    )
    assert metric(a, "vllm_surgery_replica_in_sync", adapter="x") == 1.0


def test_a_replica_started_later_serves_the_current_pointer_on_its_first_request(
    cluster, prompt_ids, peft_model
) -> None:
    refined = cluster["refined"]
    assert cluster["db"].served_pointer("x").version == refined
    check_a_later_replica(
        cluster["root"] / "c", cluster["base"], cluster["env"], refined, prompt_ids, peft_model
    )


def check_a_later_replica(root, base, env: dict[str, str], version: str, prompt_ids, model) -> None:
    """Start "replica-c" in `root` with `env`: its very first request for x is answered by `version`,
    and it reports serving it in sync; then stop it."""
    c = start_server(root, base, {**env, "VLLM_SURGERY_REPLICA_ID": "replica-c"})
    try:
        assert serving(c, "x", prompt_ids, model) == version  # its very first request for x
        body = wait_view(c, "x", lambda v: "replica-c" in replica_states(v), "replica c reports")
        assert replica_states(body)["replica-c"] == (version, "in_sync")
    finally:
        left = stop(c.proc)
        assert not left, left


def test_a_worker_without_a_server_address_has_its_accepted_version_served_by_every_replica(
    cluster, prompt_ids, peft_model
) -> None:
    a, b = cluster["a"], cluster["b"]
    for srv in (a, b):
        assert serving(srv, "w", prompt_ids, peft_model) == "original"  # loaded on both
    status, got = a.post(
        "/v1/surgery/adapters/w/refine", {"calibration": cluster["calibration"].name, **JOB_SETTINGS}, ADMIN
    )
    assert status == 202 and got["queued"], got
    text = run_worker(
        {k: v for k, v in cluster["env"].items() if k.startswith("VLLM_SURGERY_")}, cluster["root"]
    )
    check_the_job_is_served(
        cluster,
        "w",
        got["job_id"],
        lambda v: cluster["store"].version_dir("w", v),
        prompt_ids,
        peft_model,
        text,
    )


def check_the_job_is_served(cluster: dict, name: str, job_id: int, local_copy, prompt_ids, model, log: str):
    """Job `job_id` (run by a worker that logged `log`) was accepted and swapped by writing the served
    pointer itself, and both replicas serve its version of `name` (its weights from `local_copy(version)`
    loaded into `model`) and report it in sync. Returns the job."""
    a, b, db = cluster["a"], cluster["b"], cluster["db"]
    job = db.job(job_id)
    assert (job.state, job.swap, job.swap_error) == ("accepted", "done", None), (job, log[-3000:])
    pointer = db.served_pointer(name)
    assert (pointer.version, pointer.set_by, pointer.forced) == (job.version, f"job {job.id}", False)
    model.load_adapter(local_copy(job.version), adapter_name=f"{name}:{job.version}")
    start = time.perf_counter()
    for srv in (a, b):
        wait_serving(srv, name, job.version, prompt_ids, model)  # fails unless it serves the version
    print(
        f"\nworker job {job.id}: both replicas checked serving {job.version} in {time.perf_counter() - start:.2f} s"
    )
    body = wait_view(
        b,
        name,
        lambda v: (
            replica_states(v)
            == {"replica-a": (job.version, "in_sync"), "replica-b": (job.version, "in_sync")}
        ),
        "both replicas report the worker's version",
    )
    assert body["pointer"]["set_by"] == f"job {job.id}"
    return job


def test_both_replicas_follow_one_canary(cluster, prompt_ids, peft_model) -> None:
    """A canary started on one replica is served by both (traffic capture is off here: the routing does
    not need it); one user gets one version from either replica; a share change and a promote made on
    the other replica reach both (the canary's changes notify the pointer channel)."""
    a, b, refined = cluster["a"], cluster["b"], cluster["refined"]
    status, body = swap(a, "x", "original")
    assert status == 200, body
    for srv in (a, b):
        wait_serving(srv, "x", "original", prompt_ids, peft_model)
    status, canary = a.post("/v1/surgery/adapters/x/canary", {"version": refined, "share": 0.5}, ADMIN)
    assert status == 200, canary
    for srv in (a, b):
        wait_view(
            srv,
            "x",
            lambda v: (
                v["canary"] is not None and v["canary"]["id"] == canary["id"] and v["canary"]["served_here"]
            ),
            f"{srv.label} serves the canary",
        )
    ids = prompt_ids[0]

    def version_for(srv: Server, user: str) -> str | None:
        status, body = srv.post(
            "/v1/completions",
            {
                "model": "x",
                "prompt": ids,
                "max_tokens": 6,
                "temperature": 0.0,
                "logprobs": 1,
                "ignore_eos": True,
                "return_tokens_as_token_ids": True,
                "user": user,
            },
        )
        assert status == 200 and body["model"] == "x", body
        return version_of_answer(peft_model, "x", ids, body)

    users = [f"user-{i}" for i in range(16)]
    on_a = {u: version_for(a, u) for u in users}
    on_b = {u: version_for(b, u) for u in users}
    assert on_a == on_b and set(on_a.values()) == {"original", refined}, (on_a, on_b)

    status, changed = b.post("/v1/surgery/adapters/x/canary/share", {"share": 0.2}, ADMIN)
    assert status == 200 and changed["share"] == 0.2, changed
    wait_view(
        a, "x", lambda v: v["canary"]["share"] == 0.2 and v["canary"]["revision"] == 2, "a follows the share"
    )
    status, promoted = b.post("/v1/surgery/adapters/x/canary/promote", None, ADMIN)
    assert status == 200 and promoted["state"] == "promoted", promoted
    for srv in (a, b):
        wait_serving(srv, "x", refined, prompt_ids, peft_model)
        body = wait_view(srv, "x", lambda v: v["canary"] is None, f"{srv.label} drops the canary slot")
        assert (
            body["canary_history"][0]["id"] == canary["id"]
            and body["pointer"]["set_by"] == f"canary {canary['id']}"
        )
    assert {u: version_for(a, u) for u in users} == {u: refined for u in users}
    assert {u: version_for(b, u) for u in users} == {u: refined for u in users}
