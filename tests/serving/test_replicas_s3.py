"""Many replicas on real parts, as on separate machines: two `vllm serve` replicas (via
`vllm-surgery-serve`) on one real Postgres database (the served pointer, the traffic, the jobs) and one
s3:// store on a real S3 server (SeaweedFS, vllm_surgery/testing_servers.py), EACH WITH ITS OWN CACHE
DIRECTORY, a
`vllm-surgery worker` without a server address refining into the bucket, a third replica started
afterwards, and then the S3 server stopped.

- Traffic sent to both replicas is one calibration set: the job's example count is the records sent to
  A plus those sent to B (each corrected by a reviewer); the worker's version is accepted by the gate
  (no force), published into the bucket and named by the pointer; both replicas fetch it into their
  own caches and serve it.
- A replica started afterwards (its cache empty) serves that version on its first request.
- With object storage stopped, a swap to a version that is in the bucket but cached on no replica is
  refused (503 naming the store) and writes no pointer; a pointer written to it anyway (by a worker
  that published it before the store went down) leaves both replicas serving what they served,
  reporting `behind` with the store's error; nothing of that version is in any cache.

Which weights answer is proven as in test_replicas.py (greedy tokens and log-probs equal to
transformers+PEFT teacher forcing of exactly one candidate version); its helpers are reused.
Slow (three engine starts, one worker): `pytest -m slow tests/serving/test_replicas_s3.py`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator

import pytest
import test_replicas
from server import peft_reference, replica_cluster
from test_replicas import (
    ADMIN,
    ADMIN_TOKEN,
    JOB_SETTINGS,
    check_a_later_replica,
    check_the_job_is_served,
    replica_states,
    run_worker,
    serving,
    swap,
    view,
    wait_view,
)

from vllm_surgery.storage import open_store
from vllm_surgery.testing import build_gain_case

pytestmark = pytest.mark.slow

NEW_TOKENS = 4  # of each traffic request (the reviewer's correction replaces them)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, postgres_server) -> Iterator[dict]:
    """An S3 server of this module's own (a test stops it), replicas A and B with their own caches,
    and "spare": a version of "x" in the bucket that no replica has cached (its writer's cache gone)."""
    from vllm_surgery.testing_servers import S3Server

    root = tmp_path_factory.mktemp("replicas-s3")
    case = build_gain_case(root / "case")
    adapters = root / "adapters"
    shutil.copytree(case.adapter, adapters / "x")
    s3 = S3Server().start()
    aws = {**s3.env(), "AWS_MAX_ATTEMPTS": "1"}
    url = f"s3://{s3.new_bucket()}/store"
    try:
        spare = publish_copy(url, root / "writer-cache", adapters / "x", aws)
        env = {**aws, "VLLM_SURGERY_ADMIN_TOKEN": ADMIN_TOKEN, "VLLM_SURGERY_TRAFFIC": "1"}
        database = postgres_server.new_database()
        with replica_cluster(case.base, root, adapters, url, database, env) as cluster:
            cluster.update(calibration=case.calibration, s3=s3, url=url, aws=aws, spare=spare)
            yield cluster
    finally:
        s3.stop()


def publish_copy(url: str, cache, source, aws: dict[str, str]) -> str:
    """Publish `source`'s files as a version of "x" the gate accepted (its hash recorded), from a writer
    whose cache is thrown away afterwards; returns the version id."""
    from vllm_surgery.adapter import load_adapter

    with pytest.MonkeyPatch.context() as mp:
        for key, value in aws.items():
            mp.setenv(key, value)
        writer = open_store(url, cache, 1 << 30)
        with writer.writer_lock("x"):
            out = writer.new_version_dir("x")
            shutil.copytree(source, out, dirs_exist_ok=True)
            record = {"decision": "accept", "adapter_hash": load_adapter(source).content_hash()}
            (out / "surgery.json").write_text(json.dumps(record))
            writer.publish("x", out)
    shutil.rmtree(cache)
    return out.name


prompt_ids = test_replicas.prompt_ids  # the fixture, on this module's cluster


@pytest.fixture(scope="module")
def peft_model(cluster: dict):
    """The base with x's original loaded; the worker's version is added when it exists."""
    return peft_reference(cluster["base"], {"x:original": cluster["adapters"] / "x"})


def fetched_copy(cluster: dict, version: str):
    """The test's own checked copy of `version` from the bucket (not a replica's cache)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in cluster["aws"].items():
            mp.setenv(key, value)
        store = open_store(cluster["url"], cluster["root"] / "test-cache", 1 << 30)
        path, _ = store.fetch("x", version)
    return path


def cached_versions(cache) -> set[str]:
    """Every directory name under a replica's cache (versions, snapshots, temporary downloads)."""
    return {p.name for p in cache.rglob("*") if p.is_dir()}


# ----------------------------------------------------------------------------- tests
def test_traffic_on_both_replicas_refined_by_a_worker_into_the_bucket_is_served_by_both(
    cluster, prompt_ids, peft_model
) -> None:
    a, b, db = cluster["a"], cluster["b"], cluster["db"]
    for srv in (a, b):
        assert serving(srv, "x", prompt_ids, peft_model) == "original"
    examples = [json.loads(line) for line in cluster["calibration"].read_text().splitlines()]
    sent = {"a": 0, "b": 0}
    for i, example in enumerate(examples):  # alternately to A and B; a reviewer corrects each answer
        name = "ab"[i % 2]
        srv, rid = cluster[name], f"e2e-{i}"
        status, _, raw = srv.raw_request(
            "POST",
            "/v1/completions",
            {"model": "x", "prompt": example["prompt"], "max_tokens": NEW_TOKENS, "temperature": 0.0},
            {"X-Request-Id": rid},
        )
        assert status == 200, raw
        sent[name] += 1
        deadline = time.monotonic() + 30
        while db.find(rid) is None:  # recorded by the replica's writer thread
            assert time.monotonic() < deadline, f"{rid} not recorded by replica {name}"
            time.sleep(0.05)
        status, body = srv.post(
            "/v1/surgery/feedback", {"request_id": rid, "correction": example["completion"]}, ADMIN
        )
        assert status == 200, body
    assert sent == {"a": 24, "b": 24}
    status, got = a.post("/v1/surgery/adapters/x/refine", {"from_traffic": True, **JOB_SETTINGS}, ADMIN)
    assert status == 202 and got["examples"] == sent["a"] + sent["b"], got
    text = run_worker(
        {**cluster["env"], "VLLM_SURGERY_CACHE_DIR": str(cluster["root"] / "worker-cache")}, cluster["root"]
    )
    job = check_the_job_is_served(
        cluster, "x", got["job_id"], lambda v: fetched_copy(cluster, v), prompt_ids, peft_model, text
    )
    assert job.result["calibration"]["examples"] == 48, job.result
    for name in "ab":  # each fetched it into its own cache
        assert job.version in cached_versions(cluster["root"] / name / "cache"), name
    cluster["accepted"] = job.version


def test_a_replica_started_later_serves_the_current_version_on_its_first_request(
    cluster, prompt_ids, peft_model
) -> None:
    version = cluster["accepted"]
    assert cluster["db"].served_pointer("x").version == version
    root = cluster["root"] / "c"
    root.mkdir()
    env = {**cluster["env"], "VLLM_SURGERY_CACHE_DIR": str(root / "cache")}  # empty: a new machine
    check_a_later_replica(root, cluster["base"], env, version, prompt_ids, peft_model)


def test_with_object_storage_stopped_an_uncached_version_is_refused_and_the_served_one_keeps_serving(
    cluster, prompt_ids, peft_model
) -> None:
    """Last: stops the module's S3 server."""
    from vllm_surgery.testing_servers import wait_closed

    a, b, db = cluster["a"], cluster["b"], cluster["db"]
    version, spare = cluster["accepted"], cluster["spare"]
    revision = db.served_pointer("x").revision
    cluster["s3"].stop()
    wait_closed(cluster["s3"].port)
    status, body = swap(a, "x", spare)
    assert status == 503, body
    message = body["error"]["message"]
    assert spare in message and cluster["url"] in message and "unavailable" in message, message
    assert db.served_pointer("x").revision == revision  # nothing written
    # a worker that published `spare` before the store went down names it in the pointer
    db.set_served_pointer("x", spare, adapter_hash=None, by="job 999")
    body = wait_view(
        a,
        "x",
        lambda v: (
            replica_states(v)["replica-a"][1] == "behind" and replica_states(v)["replica-b"][1] == "behind"
        ),
        "both replicas report behind",
        timeout=60,
    )
    for rid in ("replica-a", "replica-b"):
        row = next(r for r in body["replicas"] if r["id"] == rid)
        assert row["version"] == version and cluster["url"] in row["error"], row
    for srv in (a, b):
        assert serving(srv, "x", prompt_ids, peft_model) == version  # still served
        assert view(srv, "x")["served_version"] == version
    for name in "ab":  # nothing of the unreachable version, not even a partial download
        assert not any(spare in n for n in cached_versions(cluster["root"] / name / "cache")), name
