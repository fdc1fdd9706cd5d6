"""A real `vllm serve` (via `vllm-surgery-serve`) whose store is an s3:// bucket on a real S3 server
(SeaweedFS, vllm_surgery/testing_servers.py): a refined version that exists only in the bucket (the machine
that wrote it threw its cache away) is swapped in, fetched into the server's cache, checked against its
manifest and served (log-probs equal transformers+PEFT teacher forcing of that version, as in
test_hotswap.py); then the S3 server is stopped: a swap to a version that is not cached is refused with 503
naming the store, and the version served before keeps answering. Slow (engine start 25-70 s on 2 cores):
`pytest -m slow tests/serving/test_objstore_server.py`."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from server import Server, assert_served_by, metric, peft_reference, refine_forced, running, tokenized

from vllm_surgery.testing import ALL_PROJ, build_lora_adapter, build_tiny_llama

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "test-admin-token"
ADMIN = {"X-Surgery-Admin-Token": ADMIN_TOKEN}
PROMPTS = ["what is 12 + 30 ?", "the quick brown fox"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The S3 server, a bucket holding two published versions of adapter "x", and nothing of them on
    local disk: the writer's cache is deleted."""
    from vllm_surgery.storage import open_store
    from vllm_surgery.testing_servers import S3Server

    root = tmp_path_factory.mktemp("objstore-serve")
    base = build_tiny_llama(root / "base", hidden=128, heads=2, kv_heads=2, layers=2, intermediate=256)
    build_lora_adapter(base, root / "adapters" / "x", r=8, alpha=16, target_modules=ALL_PROJ, seed=1)
    s3 = S3Server().start()
    env = {**s3.env(), "AWS_MAX_ATTEMPTS": "1"}
    url = f"s3://{s3.new_bucket()}/store"
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            writer = open_store(url, root / "writer-cache", 1 << 30)
            with writer.writer_lock("x"):
                first = refine_forced(base, root, "x", writer.new_version_dir("x"))
                writer.publish("x", first)
                second = writer.new_version_dir("x")
                shutil.copytree(first, second, dirs_exist_ok=True)
                (second / "manifest.json").unlink()
                writer.publish("x", second)
        refined = root / "refined"  # the expected weights, kept outside every store and cache
        shutil.copytree(first, refined)
        shutil.rmtree(root / "writer-cache")
        yield {
            "root": root,
            "base": base,
            "s3": s3,
            "url": url,
            "env": env,
            "versions": [first.name, second.name],
        }
    finally:
        s3.stop()


@pytest.fixture(scope="module")
def server(setup: dict) -> Iterator[Server]:
    root = setup["root"]
    env = {
        "VLLM_SURGERY_ADAPTER_DIRS": str(root / "adapters"),
        "VLLM_SURGERY_STORE": setup["url"],
        "VLLM_SURGERY_CACHE_DIR": str(root / "server-cache"),
        "VLLM_SURGERY_ADMIN_TOKEN": ADMIN_TOKEN,
        "VLLM_PLUGINS": "vllm_surgery,vllm_surgery_api",
        **setup["env"],
    }
    with running(root, setup["base"], env) as srv:
        yield srv


@pytest.fixture(scope="module")
def prompt_ids(setup: dict) -> list[list[int]]:
    return tokenized(setup["base"], PROMPTS)


@pytest.fixture(scope="module")
def peft_model(setup: dict):
    root = setup["root"]
    return peft_reference(setup["base"], {"original": root / "adapters" / "x", "refined": root / "refined"})


def fetch_count(server: Server, outcome: str) -> float:
    return metric(server, "vllm_surgery_store_fetches_total", outcome=outcome)


def test_a_version_that_only_exists_in_s3_is_fetched_and_served(
    setup, server, prompt_ids, peft_model
) -> None:
    first = setup["versions"][0]
    assert_served_by(server, "x", prompt_ids, peft_model, expected="original", other="refined")
    cached = setup["root"] / "server-cache"
    assert not any(cached.rglob(first))  # not on this machine yet (neither cached nor a snapshot)
    status, body = server.post(
        "/v1/surgery/adapters/x/swap", {"version": first, "force": True}, headers=ADMIN
    )
    assert status == 200, body
    assert (body["version"], body["changed"]) == (first, True)
    assert_served_by(server, "x", prompt_ids, peft_model, expected="refined", other="original")
    assert fetch_count(server, "fetched") == 1.0
    (local,) = cached.glob(f"*/x/{first}")  # <cache>/<store digest>/x/<version>; snapshots are in .snapshots
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (local / name).read_bytes() == (setup["root"] / "refined" / name).read_bytes()
    assert f"fetched x/{first}" in server.log_path.read_text()


def test_with_s3_down_an_uncached_version_is_refused_and_the_served_one_keeps_serving(
    setup, server, prompt_ids, peft_model
) -> None:
    second = setup["versions"][1]
    setup["s3"].stop()
    status, body = server.post(
        "/v1/surgery/adapters/x/swap", {"version": second, "force": True}, headers=ADMIN
    )
    assert status == 503, body
    message = body["error"]["message"]
    assert f"object store {setup['url']} unavailable" in message
    assert "the version served before keeps serving" in message
    assert_served_by(server, "x", prompt_ids, peft_model, expected="refined", other="original")
    assert fetch_count(server, "failed") == 1.0
    log = server.log_path.read_text()
    assert f"hot-swap of 'x' to '{second}' refused" in log
    # The cached version keeps working without the store: back to the original and to it again.
    first = setup["versions"][0]
    status, body = server.post("/v1/surgery/adapters/x/swap", {"version": "original"}, headers=ADMIN)
    assert status == 200, body
    status, body = server.post(
        "/v1/surgery/adapters/x/swap", {"version": first, "force": True}, headers=ADMIN
    )
    assert status == 200, body
    assert_served_by(server, "x", prompt_ids, peft_model, expected="refined", other="original")
    assert fetch_count(server, "hit") == 1.0
