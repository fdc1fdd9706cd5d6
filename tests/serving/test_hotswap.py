"""Hot-swap over real HTTP: one `vllm serve` (via `vllm-surgery-serve`) with the endpoint plugin.

Adapter "x" lives in an operator root; the store holds a refined version of it (refine(force=True):
decision "forced", so swaps to it say "force": true) and a corrupt copy of that version (truncated
weights, intact surgery.json). Which weights answered
is proven by log-probs against transformers+PEFT float32 teacher forcing, as in test_server.py.
The server runs with --api-key and an admin token, so every route is exercised authenticated.

Slow (engine start 25-70 s on 2 cores): `pytest -m slow tests/serving/test_hotswap.py`.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pacing
import pytest
import torch
from server import (
    LOGPROB_TOL,
    REQUEST_TIMEOUT_S,
    Server,
    assert_served_by,
    complete,
    refine_forced,
    start_server,
    stop,
    teacher_forced,
)

from vllm_surgery.testing import ALL_PROJ, build_lora_adapter, build_tiny_llama

pytestmark = pytest.mark.slow

API_KEY = "test-api-key"
ADMIN_TOKEN = "test-admin-token"
ADMIN = {"X-Surgery-Admin-Token": ADMIN_TOKEN}
PROMPTS = ["what is 12 + 30 ?", "the quick brown fox"]


STREAM_TOKENS = 240  # the in-flight test's streamed answer (the test engine's context is 256 tokens)
PACE_MS = 20  # per engine step while it runs: the stream lasts at least 4.8 s, longer than any swap


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("hotswap")
    base = build_tiny_llama(root / "base", hidden=128, heads=2, kv_heads=2, layers=2, intermediate=256)
    adapters = root / "adapters"
    build_lora_adapter(base, adapters / "x", r=8, alpha=16, target_modules=ALL_PROJ, seed=1)
    # an adapter given the classic way, outside every operator root
    static = build_lora_adapter(base, root / "elsewhere" / "static", r=8, alpha=16, seed=2)
    env = {
        "VLLM_SURGERY_ADAPTER_DIRS": str(adapters),
        "VLLM_SURGERY_STORE": str(root / "store"),
        "VLLM_PLUGINS": "vllm_surgery,vllm_surgery_api",
        "VLLM_SURGERY_ADMIN_TOKEN": ADMIN_TOKEN,
        "VLLM_SURGERY_CALIBRATION_DIR": str(root),  # calib.jsonl, written by the versions fixture
        **pacing.server_env(),
    }
    srv = start_server(
        root,
        base,
        env,
        ["--api-key", API_KEY, "--lora-modules", f"static={static}", *pacing.SERVER_ARGS],
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    try:
        yield srv
    finally:
        left = stop(srv.proc)
        assert not left, f"processes left behind after SIGTERM (killed now): {left}"


@pytest.fixture(scope="module")
def versions(server: Server) -> dict[str, Path]:
    """The refined version of "x" and a corrupt copy of it, both complete store versions."""
    from vllm_surgery.storage.store import VersionStore

    store = VersionStore(server.root / "store")
    refined = refine_forced(server.base, server.root, "x", store.new_version_dir("x"))
    corrupt = store.new_version_dir("x")
    shutil.copytree(refined, corrupt, dirs_exist_ok=True)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return {"refined": refined, "corrupt": corrupt}


@pytest.fixture(scope="module")
def prompt_ids(server: Server) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server.base)
    return [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def peft_model(server: Server, versions: dict[str, Path]):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(server.base, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, server.root / "adapters" / "x", adapter_name="original")
    model.load_adapter(versions["refined"], adapter_name="refined")
    return model.eval()


def swap(server: Server, version: str, name: str = "x", force: bool = True) -> tuple[int, dict]:
    """The versions here were written with force (the gate did not accept them): an operator's swap."""
    return server.post(
        f"/v1/surgery/adapters/{name}/swap", {"version": version, "force": force}, headers=ADMIN
    )


def served_json(server: Server) -> dict | None:
    path = server.root / "store" / "x" / "served.json"
    return json.loads(path.read_text()) if path.exists() else None


def test_routes_need_the_api_key(server: Server, versions) -> None:
    bare = {"Authorization": ""}
    assert server.get("/v1/surgery/adapters", headers=bare)[0] == 401
    assert server.get("/v1/surgery/adapters/x", headers=bare)[0] == 401
    assert server.post("/v1/surgery/adapters/x/swap", {"version": "original"}, headers=bare)[0] == 401
    assert server.post("/v1/surgery/adapters/x/rollback", {}, headers={**bare, **ADMIN})[0] == 401
    # The API key alone may read but not mutate: mutations also need the admin token.
    assert server.get("/v1/surgery/adapters")[0] == 200
    status, body = server.post("/v1/surgery/adapters/x/swap", {"version": versions["refined"].name})
    assert status == 403, body
    assert (
        server.post("/v1/surgery/adapters/x/swap", {"version": "x"}, headers={"X-Surgery-Admin-Token": "no"})[
            0
        ]
        == 403
    )
    # The admin token alone, as the bearer token, passes vLLM's guard and ours (nothing to roll back yet).
    as_admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert server.get("/v1/surgery/adapters", headers=as_admin)[0] == 200
    status, body = server.post("/v1/surgery/adapters/x/rollback", {}, headers=as_admin)
    assert status == 409, body


def test_original_is_served_first(server, prompt_ids, peft_model, versions) -> None:
    assert_served_by(server, "x", prompt_ids, peft_model, expected="original", other="refined")
    status, body = server.get("/v1/surgery/adapters")
    assert status == 200, body
    (x,) = [a for a in body["adapters"] if a["name"] == "x"]
    assert x["served_version"] == "original" and x["loaded"]
    assert {v["id"] for v in x["versions"]} == {versions["refined"].name, versions["corrupt"].name}


def test_swap_to_refined_version(server, prompt_ids, peft_model, versions) -> None:
    refined = versions["refined"].name
    status, body = swap(server, refined, force=False)  # the gate did not accept it: only with force
    assert status == 409 and "decision 'forced'" in body["error"]["message"], body
    assert served_json(server) is None
    status, body = swap(server, refined)
    assert status == 200, (body, server.log_tail())
    assert body["changed"] and body["version"] == refined and body["previous_version"] == "original"
    assert_served_by(server, "x", prompt_ids, peft_model, expected="refined", other="original")
    assert served_json(server)["version"] == refined  # a restart serves the same version
    status, body = swap(server, refined)  # idempotent
    assert status == 200 and body["changed"] is False, body
    status, body = server.get("/v1/surgery/adapters/x")
    assert status == 200 and body["served_version"] == refined, body
    # The stored request must not be an in-place load (upstream bug: re-read from disk every step).
    assert body["served_load_inplace"] is False, body
    assert_served_by(server, "x", prompt_ids, peft_model, expected="refined", other="original")


class PacedStream:
    """A streamed greedy completion of `ids` on "x", paced (at least STREAM_TOKENS x PACE_MS of
    generation, on a fast machine too), read in a thread: its tokens, log-probs, the time each event
    arrived and the model names the events carried. `start()` returns once the first token is in."""

    def __init__(self, server: Server, ids: list[int]) -> None:
        body = {
            "model": "x",
            "prompt": ids,
            "max_tokens": STREAM_TOKENS,
            **pacing.paced(PACE_MS),
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "logprobs": 1,
            "return_tokens_as_token_ids": True,
        }
        self.request = urllib.request.Request(
            server.url + "/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **server.headers},
        )
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.arrivals: list[float] = []
        self.models: set[str] = set()
        self.first = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.started = 0.0

    def _read(self) -> None:
        with urllib.request.urlopen(self.request, timeout=REQUEST_TIMEOUT_S) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                self.models.add(event["model"])
                lp = event["choices"][0]["logprobs"]
                self.tokens.extend(int(t.removeprefix("token_id:")) for t in lp["tokens"])
                self.logprobs.extend(lp["token_logprobs"])
                self.arrivals.append(time.monotonic())
                self.first.set()

    def start(self) -> PacedStream:
        self.started = time.monotonic()
        self.reader.start()
        assert self.first.wait(REQUEST_TIMEOUT_S), "no streamed token"
        return self

    def finish(self) -> None:
        """Wait for the whole answer; fails unless it has STREAM_TOKENS tokens and was paced."""
        self.reader.join(REQUEST_TIMEOUT_S)
        assert len(self.tokens) == STREAM_TOKENS
        assert self.arrivals[-1] - self.started >= STREAM_TOKENS * PACE_MS / 1000, "the pacing did not apply"

    def worst_gap(self, peft_model, version: str, ids: list[int]) -> float:
        """The largest difference between the streamed log-probs and `version`'s (teacher forcing)."""
        want = teacher_forced(peft_model, version, ids, self.tokens)
        return max(abs(a - b) for a, b in zip(self.logprobs, want, strict=True))


def test_two_versions_of_one_name_in_one_batch_are_both_served(
    server, prompt_ids, peft_model, versions
) -> None:
    """A response still running on the old version and a new request on the new one share a batch.

    vLLM 0.32 compares LoRARequests by name: with both versions named "x", the worker activated only
    one of them and the step failed (KeyError in punica's mapping; the engine died). The sequence
    makes the new version non-resident first: with 2 LoRA slots, a request for another adapter
    ("static") evicts it while the old version's paced stream keeps its own slot busy."""
    assert swap(server, versions["refined"].name)[0] == 200
    ids = prompt_ids[0]
    stream = PacedStream(server, ids).start()
    try:
        status, result = swap(server, "original")
        assert status == 200 and result["changed"], result
        status, body = complete(server, "static", ids)  # evicts the new version from its GPU slot
        assert status == 200, body
        alive = "the stream ended before the new version was {}; nothing overlapped"
        assert stream.reader.is_alive(), alive.format("evicted")
        # the new version, while the old one's stream still runs: both in one batch
        assert_served_by(server, "x", prompt_ids, peft_model, expected="original", other="refined")
        assert stream.reader.is_alive(), alive.format("asked")
        stream.finish()
        assert stream.worst_gap(peft_model, "refined", ids) < LOGPROB_TOL
        assert server.get("/health")[0] == 200
        # clients see the name they asked for, never the engine's name of a version
        status, listing = server.get("/v1/models")
        assert status == 200 and "x" in {m["id"] for m in listing["data"]}, listing
        assert not [m["id"] for m in listing["data"] if "@" in m["id"]], listing
        assert stream.models == {"x"}, stream.models
        status, body = complete(server, "x", ids)
        assert status == 200 and body["model"] == "x", body
    finally:
        assert swap(server, versions["refined"].name)[0] == 200


def test_response_in_flight_during_a_swap_stays_on_its_version(
    server, prompt_ids, peft_model, versions
) -> None:
    """A long streamed completion that spans a swap is generated entirely by the version it started on."""
    assert swap(server, versions["refined"].name)[0] == 200  # idempotent if already served
    ids = prompt_ids[0]
    stream = PacedStream(server, ids).start()
    try:
        status, result = swap(server, "original")
        swapped_at = time.monotonic()
        assert status == 200 and result["changed"], result
        stream.finish()
        late = sum(t > swapped_at for t in stream.arrivals)
        assert late > 0, "the stream finished before the swap; nothing was in flight"
        worst = stream.worst_gap(peft_model, "refined", ids)
        assert worst < LOGPROB_TOL, (
            f"response mixed versions across the swap ({late} chunks after it): {worst}"
        )
        # and the next request is served by the new version
        assert_served_by(server, "x", prompt_ids, peft_model, expected="original", other="refined")
    finally:  # leave "x" as the next tests expect, whatever happened here
        assert swap(server, versions["refined"].name)[0] == 200


def test_swaps_under_load_fail_no_request(server, prompt_ids, versions) -> None:
    stop_flag = threading.Event()
    failures: list[str] = []
    done = [0]
    lock = threading.Lock()

    def stream_once(ids: list[int]) -> None:
        body = {
            "model": "x",
            "prompt": ids,
            "max_tokens": 8,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
        }
        req = urllib.request.Request(
            server.url + "/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **server.headers},
        )
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:
            text = r.read().decode()
        if "data: [DONE]" not in text or '"error"' in text:
            raise AssertionError(f"bad stream: {text[-300:]}")

    def client(i: int) -> None:
        n = 0
        while not stop_flag.is_set():
            ids = prompt_ids[n % len(prompt_ids)]
            try:
                if (i + n) % 2:
                    stream_once(ids)
                else:
                    status, body = complete(server, "x", ids)
                    if status != 200:
                        raise AssertionError(f"{status} {body}")
            except Exception as e:  # any failure at all counts
                with lock:
                    failures.append(f"client {i}: {e!r}")
            else:
                with lock:
                    done[0] += 1
            n += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        for version in ["original", versions["refined"].name, "original", versions["refined"].name]:
            status, body = swap(server, version)
            assert status == 200 and body["changed"], body
            time.sleep(0.5)
    finally:
        stop_flag.set()
        for t in threads:
            t.join(timeout=REQUEST_TIMEOUT_S)
    assert not failures, failures[:5]
    assert done[0] >= 8, done[0]


def test_rollback_restores_the_previous_version(server, prompt_ids, peft_model, versions) -> None:
    assert swap(server, "original")[0] == 200
    assert swap(server, versions["refined"].name)[0] == 200
    status, body = server.post("/v1/surgery/adapters/x/rollback", {}, headers=ADMIN)
    assert status == 200, body
    assert body["version"] == "original" and body["changed"]
    assert_served_by(server, "x", prompt_ids, peft_model, expected="original", other="refined")
    assert served_json(server) is None  # original again: nothing recorded in the store


def test_corrupt_version_is_refused_and_old_version_keeps_serving(
    server, prompt_ids, peft_model, versions
) -> None:
    assert swap(server, versions["refined"].name)[0] == 200
    status, body = swap(server, versions["corrupt"].name)
    assert status == 422, body
    assert "corrupt" in body["error"]["message"]
    assert_served_by(server, "x", prompt_ids, peft_model, expected="refined", other="original")
    assert served_json(server)["version"] == versions["refined"].name
    assert server.proc.poll() is None


@pytest.mark.parametrize(
    ("name", "version", "expected", "expected_get"),
    [
        (".hidden", "original", 400, 400),
        ("a..b", "original", 400, 400),
        ("nope", "original", 404, 404),
        ("x", "no-such-version", 404, 200),
        ("x", "..", 400, 200),
    ],
)
def test_bad_names_and_versions_are_refused(server, name, version, expected, expected_get) -> None:
    status, body = swap(server, name=name, version=version)
    assert status == expected, body
    assert "error" in body
    assert server.get(f"/v1/surgery/adapters/{name}")[0] == expected_get


def test_metrics_are_valid_prometheus_text(server, versions) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    text = server.get_text("/metrics")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    swaps = families["vllm_surgery_hotswaps"]
    counts = {
        (s.labels["adapter"], s.labels["outcome"]): s.value
        for s in swaps.samples
        if s.name.endswith("_total")
    }
    assert counts[("x", "swapped")] >= 6
    assert counts[("x", "noop")] >= 1
    assert counts[("x", "corrupt")] >= 1
    assert counts[("", "not_found")] >= 1
    assert {a for a, _ in counts} <= {"x", ""}  # bounded: only existing adapters are labels
    latency = families["vllm_surgery_swap_latency_seconds"]
    (count,) = [s.value for s in latency.samples if s.name.endswith("_count")]
    assert count >= 6
    info = [s for s in families["vllm_surgery_served_version_info"].samples if s.labels.get("adapter") == "x"]
    assert len(info) == 1 and info[0].value == 1.0
    assert info[0].labels["version"] == versions["refined"].name  # the corrupt swap changed nothing
    lookups = {
        s.labels["result"]: s.value
        for s in families["vllm_surgery_store_lookups"].samples
        if s.name.endswith("_total") and s.labels["by"] == "resolver"
    }
    assert lookups.get("miss", 0) >= 1  # "x" was first resolved to its original


# ---------------------------------------------------------------------------------------------------
# POST /v1/surgery/adapters/{name}/refine (after the swap tests: "x" serves versions["refined"] here).
# No worker runs here: requests are queued (test_worker.py runs them with real worker processes).


def refine_body(server: Server, **extra) -> dict:
    lines = (server.root / "calib.jsonl").read_text().splitlines()
    return {"records": [json.loads(line) for line in lines if line.strip()], "modules": "all", **extra}


def store_version_dirs(server: Server) -> set[str]:
    return {p.name for p in (server.root / "store" / "x").iterdir() if p.is_dir() and p.name[0] != "."}


def test_refine_needs_the_admin_token(server: Server) -> None:
    assert server.post("/v1/surgery/adapters/x/refine", refine_body(server))[0] == 403


def test_refine_is_queued_once_and_shown_on_the_job_routes(server, versions) -> None:
    before = store_version_dirs(server)
    status, body = server.post("/v1/surgery/adapters/x/refine", refine_body(server, seed=3), ADMIN)
    assert status == 202, (body, server.log_tail())
    assert body["state"] == "queued" and body["queued"] and body["examples"] == 16
    status, again = server.post("/v1/surgery/adapters/x/refine", refine_body(server, seed=3), ADMIN)
    assert status == 202 and again["job_id"] == body["job_id"] and not again["queued"]  # no 409: one job
    status, job = server.get(body["location"])
    assert status == 200 and (job["adapter"], job["trigger"], job["state"]) == ("x", "manual", "queued")
    assert job["spec"]["config"] == {"policy": "auto", "modules": "all", "seed": 3}
    assert job["spec"]["calibration"]["examples"] == 16 and "records" not in job["spec"]["calibration"]
    status, listed = server.get("/v1/surgery/jobs?adapter=x&state=queued")
    assert status == 200 and [j["id"] for j in listed["jobs"]] == [body["job_id"]]
    assert server.get("/v1/surgery/jobs/999999")[0] == 404
    assert server.get("/v1/surgery/jobs/abc")[0] == 400
    assert server.get("/v1/surgery/jobs?state=done")[0] == 400
    assert server.get("/v1/surgery/jobs?adapter=../x")[0] == 400
    assert store_version_dirs(server) == before  # the server computes nothing itself
    status, x = server.get("/v1/surgery/adapters/x")
    assert x["served_version"] == versions["refined"].name


def test_a_forced_version_in_the_store_answers_as_keep_original(server, versions) -> None:
    """The request that wrote versions["refined"] (forced: the gate did not accept it) is answered
    from the store at once: a job would have kept the original, so nothing is queued or swapped."""
    body = {"calibration": "calib.jsonl", "policy": "grad_direction", "modules": "all"}  # what wrote it
    status, got = server.post("/v1/surgery/adapters/x/refine", body, ADMIN)
    assert status == 200 and got["cached"] and got["decision"] == "keep_original", got
    assert got["version"] is None and got["swapped"] is False
    assert got["served_version"] == versions["refined"].name


def test_bad_refine_requests_are_refused_and_nothing_is_queued(server) -> None:
    status, listed = server.get("/v1/surgery/jobs")
    jobs_before = len(listed["jobs"])
    bad = refine_body(server, seed=4)
    bad["records"][1] = {"prompt": "no answer here"}
    status, body = server.post("/v1/surgery/adapters/x/refine", bad, ADMIN)
    assert status == 400 and body["error"]["message"] == "record 1: missing 'completion'", body
    status, body = server.post("/v1/surgery/adapters/x/refine", refine_body(server, policy="nope"), ADMIN)
    assert status == 400 and "unknown policy" in body["error"]["message"], body
    status, body = server.post("/v1/surgery/adapters/x/refine", refine_body(server, force=True), ADMIN)
    assert status == 400 and "'force' is not available" in body["error"]["message"], body
    assert server.post("/v1/surgery/adapters/nope/refine", refine_body(server), ADMIN)[0] == 404
    assert len(server.get("/v1/surgery/jobs")[1]["jobs"]) == jobs_before


def test_refine_and_job_metrics(server, versions) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(server.get_text("/metrics"))}
    outcomes = {
        s.labels["outcome"]: s.value
        for s in families["vllm_surgery_refinements"].samples
        if s.name.endswith("_total") and s.labels["adapter"] == "x"
    }
    assert outcomes["queued"] == 2 and outcomes["cached"] >= 1 and outcomes["error"] >= 3
    states = {s.labels["state"]: s.value for s in families["vllm_surgery_jobs"].samples}
    assert states["queued"] >= 1 and states["running"] == 0
    (age,) = families["vllm_surgery_job_queue_oldest_age_seconds"].samples
    assert age.value > 0
    lookups = {
        s.labels["result"]: s.value
        for s in families["vllm_surgery_store_lookups"].samples
        if s.name.endswith("_total") and s.labels["by"] == "refine"
    }
    assert lookups["hit"] >= 1 and lookups["miss"] >= 1
    # The loss series describe the served version: none while the original is served.
    losses = {
        s.labels["which"]: s.value
        for s in families["vllm_surgery_heldout_loss"].samples
        if s.labels["adapter"] == "x"
    }
    record = json.loads((versions["refined"] / "surgery.json").read_text())
    assert losses == {
        "before": pytest.approx(record["quality_before"]["loss"]),
        "after": pytest.approx(record["quality_after"]["loss"]),
    }
    assert swap(server, "original")[0] == 200
    families = {f.name: f for f in text_string_to_metric_families(server.get_text("/metrics"))}
    family = families.get("vllm_surgery_heldout_loss")
    assert family is None or not [s for s in family.samples if s.labels.get("adapter") == "x"]
    assert swap(server, versions["refined"].name)[0] == 200


def test_lora_modules_adapter_can_be_refined_and_swapped(server, versions, prompt_ids) -> None:
    status, info = server.get("/v1/surgery/adapters/static")
    assert status == 200 and info["source"] == "lora-modules", info
    assert info["served_version"] == "original"
    status, body = server.post("/v1/surgery/adapters/static/refine", refine_body(server), ADMIN)
    assert status == 202 and body["job"]["spec"]["adapter_path"] == info["original_path"], body
    assert complete(server, "static", prompt_ids[0])[0] == 200
    assert swap(server, "original", name="static")[0] == 200
