"""Files that someone else can write, against a real `vllm serve` (via `vllm-surgery-serve`).

1. An adapter overwritten in place while served (`cp broken.safetensors a/adapter_model.safetensors`
   keeps the inode and truncates it). With `--max-loras 1 --max-cpu-loras 4`, requesting a then b moves
   a out of the engine's LoRA slot into vLLM's CPU LoRA cache, whose tensors are memory-mapped from the
   file vLLM loaded: touching a truncated mapping is SIGBUS, the engine died and every adapter with it
   (500 "EngineCore encountered an issue"). vLLM now loads private snapshots, so the server stays up.
2. A job row that says "accepted, swap pending" for a version whose own surgery.json says "forced"
   (the gate did not accept it), written by SQL as an attacker with file access would: the server's
   sweep swapped it in within a second. It is now refused, the job says why, the original stays.

Slow (engine start 25-70 s on 2 cores): `pytest -m "" tests/serving/test_untrusted_files.py`.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bad_adapters import scaled, write_version
from server import Server, complete, generated, start_server, stop

from vllm_surgery.testing import ALL_PROJ, build_lora_adapter, build_tiny_llama

pytestmark = pytest.mark.slow

API_KEY = "files-api-key"
ADMIN_TOKEN = "files-admin-token"
ADMIN = {"X-Surgery-Admin-Token": ADMIN_TOKEN}
IDS = [5, 6, 7, 8, 9]
WEIGHTS = "adapter_model.safetensors"
SWEEP_S = 0.5  # the server's pending-swap sweep interval here


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("untrusted")
    base = build_tiny_llama(root / "base", hidden=128, heads=2, kv_heads=2, layers=2, intermediate=256)
    adapters = root / "adapters"
    for seed, name in enumerate(("a", "b", "c", "x"), start=1):
        build_lora_adapter(base, adapters / name, r=8, alpha=16, target_modules=ALL_PROJ, seed=seed)
    store = root / "store"
    x = adapters / "x"
    write_version(store, "x", "v-forced", x, x, scaled(0.5), decision="forced")
    write_version(store, "x", "v-accepted", x, x, scaled(0.7), decision="accept")
    env = {
        "VLLM_SURGERY_ADAPTER_DIRS": str(adapters),
        "VLLM_SURGERY_STORE": str(store),
        "VLLM_PLUGINS": "vllm_surgery,vllm_surgery_api",
        "VLLM_SURGERY_ADMIN_TOKEN": ADMIN_TOKEN,
        "VLLM_SURGERY_REFINE_CHECK_INTERVAL_S": str(SWEEP_S),
    }
    srv = start_server(
        root,
        base,
        env,
        ["--api-key", API_KEY, "--max-loras", "1", "--max-cpu-loras", "4"],
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    try:
        yield srv
    finally:
        left = stop(srv.proc)
        assert not left, f"processes left behind after SIGTERM (killed now): {left}"


def answer(server: Server, name: str) -> tuple[list[int], list[float]]:
    status, body = complete(server, name, IDS)
    assert status == 200, f"{name}: {status} {body}\n{server.log_tail()}"
    return generated(body)


def overwrite_in_place(path: Path, data: bytes) -> None:
    """What `cp other path` does to an existing file: the same inode, truncated, then written."""
    inode = path.stat().st_ino
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(data)
        f.flush()
    assert path.stat().st_ino == inode


def test_an_adapter_overwritten_in_place_while_cached_does_not_kill_the_server(server: Server) -> None:
    a_before = answer(server, "a")
    answer(server, "b")  # a leaves the only LoRA slot; it stays in vLLM's CPU LoRA cache
    weights = server.root / "adapters" / "a" / WEIGHTS
    overwrite_in_place(weights, b"\x00garbage, not safetensors" * 64)

    status, body = complete(server, "a", IDS)
    assert status != 500, f"{status} {body}\n{server.log_tail()}"
    if status == 200:  # served from its validated snapshot: the weights it was resolved with
        tokens, logprobs = generated(body)
        assert tokens == a_before[0]
        assert max(abs(x - y) for x, y in zip(logprobs, a_before[1], strict=True)) < 1e-4
    else:
        assert 400 <= status < 500 and "a" in body["error"]["message"], body
    assert server.get("/health")[0] == 200, server.log_tail()
    assert server.proc.poll() is None
    answer(server, "b")
    answer(server, "c")  # resolved and loaded after the overwrite: the engine is alive
    answer(server, "a")
    assert "EngineDeadError" not in server.log_path.read_text()

    # An operator who now asks to serve a's original gets a 4xx naming the file and the problem,
    # and a keeps answering from what it was validated as.
    status, body = server.post("/v1/surgery/adapters/a/swap", {"version": "original"}, headers=ADMIN)
    assert status == 422, body
    message = body["error"]["message"]
    assert str(weights) in message and "cannot be read as safetensors" in message, message
    assert answer(server, "a")[0] == a_before[0]


def job_db(server: Server) -> sqlite3.Connection:
    return sqlite3.connect(server.root / "store.sqlite3", timeout=30)


def forge_accepted_job(server: Server, adapter: str, version: str) -> int:
    """A finished job row marked "accepted, swap pending" for `version`, written directly by SQL."""
    now = time.time()
    result = {"decision": "accept", "version": version, "reused": False}
    with job_db(server) as db:
        cursor = db.execute(
            "INSERT INTO jobs (adapter, trigger, state, spec, created, started, finished, attempts, "
            "max_attempts, result, swap) VALUES (?, 'manual', 'accepted', '{}', ?, ?, ?, 1, 3, ?, 'pending')",
            (adapter, now, now, now, json.dumps(result)),
        )
        return int(cursor.lastrowid)


def swap_state(server: Server, job_id: int, timeout: float = 60.0) -> dict:
    """The job as the job route shows it, once its swap is no longer pending."""
    deadline = time.monotonic() + timeout
    while True:
        status, job = server.get(f"/v1/surgery/jobs/{job_id}")
        assert status == 200, job
        if job["swap"] != "pending" or time.monotonic() > deadline:
            return job
        time.sleep(0.2)


def swap_counts(server: Server) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(server.get_text("/metrics"))}
    return {
        s.labels["outcome"]: s.value
        for s in families["vllm_surgery_hotswaps"].samples
        if s.name.endswith("_total") and s.labels["adapter"] == "x"
    }


def test_a_forged_job_row_never_swaps_in_a_version_the_gate_did_not_accept(server: Server) -> None:
    x_original = answer(server, "x")  # resolved: serving its original
    conflicts = swap_counts(server).get("conflict", 0)
    job_id = forge_accepted_job(server, "x", "v-forced")
    time.sleep(4 * SWEEP_S)  # it "went live within a second" before
    job = swap_state(server, job_id)
    assert job["swap"] == "failed", job
    assert "decision 'forced'" in job["swap_error"] and "not 'accept'" in job["swap_error"], job
    status, x = server.get("/v1/surgery/adapters/x")
    assert status == 200 and x["served_version"] == "original", x
    assert not (server.root / "store" / "x" / "served.json").exists()
    assert answer(server, "x")[0] == x_original[0]
    log = server.log_path.read_text()
    assert f"job {job_id}: version v-forced of 'x' was refused" in log
    assert swap_counts(server).get("conflict", 0) >= conflicts + 1

    # The sweep does swap in a version the gate accepted (so the refusal above is the check, not a
    # sweep that never ran); an operator may still serve the forced one, explicitly.
    accepted = forge_accepted_job(server, "x", "v-accepted")
    job = swap_state(server, accepted)
    assert job["swap"] == "done", job
    assert server.get("/v1/surgery/adapters/x")[1]["served_version"] == "v-accepted"
    status, body = server.post("/v1/surgery/adapters/x/swap", {"version": "v-forced"}, headers=ADMIN)
    assert status == 409 and '"force": true' in body["error"]["message"], body
    status, body = server.post(
        "/v1/surgery/adapters/x/swap", {"version": "v-forced", "force": True}, headers=ADMIN
    )
    assert status == 200 and body["version"] == "v-forced", body
    assert "swapped in on an operator's explicit force" in server.log_path.read_text()
