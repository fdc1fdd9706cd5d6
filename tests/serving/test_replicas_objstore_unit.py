"""Two replicas' HotSwappers on one real Postgres database (the served pointer) and one real s3://
store (SeaweedFS), each with its OWN cache directory, as on two machines; no engine (vLLM's serving
models faked as in test_hotswap_unit.py). What the slow test_replicas_s3.py checks with real engines,
here in seconds: a version published into the bucket by a writer whose cache is gone is followed by
the other replica (fetched into its own cache, checked), and with the store stopped a pointer to a
version not cached there is refused, the previous version keeps serving and the replica says why."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import vllm  # noqa: F401  (a broken vLLM must fail these tests, not skip them)
from test_hotswap_unit import FakeModels
from test_pointer_follow_unit import loop, on_loop, rows, served  # noqa: F401 (loop: a fixture)

from vllm_surgery.adapter import load_adapter
from vllm_surgery.settings import ServingSettings
from vllm_surgery.storage import open_database, open_store


@pytest.fixture
def s3(monkeypatch):
    """An S3 server of this test's own: the test stops it."""
    from vllm_surgery.testing_servers import S3Server

    server = S3Server().start()
    for key, value in {**server.env(), "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(key, value)
    yield server
    server.stop()


def publish(url: str, cache: Path, source: Path, adapter_hash: str) -> str:
    """A version of "x" (`source`'s files, accepted by the gate) published into the bucket by a writer
    on another machine, whose cache is then thrown away."""
    import json

    writer = open_store(url, cache, 1 << 30)
    with writer.writer_lock("x"):
        out = writer.new_version_dir("x")
        shutil.copytree(source, out, dirs_exist_ok=True)
        (out / "surgery.json").write_text(json.dumps({"decision": "accept", "adapter_hash": adapter_hash}))
        writer.publish("x", out)
    shutil.rmtree(cache)
    return out.name


@pytest.fixture
def cluster(tmp_path: Path, tiny_adapter: Path, postgres_url: str, s3, loop):  # noqa: F811 (the fixture)
    from vllm.lora.request import LoRARequest

    from vllm_surgery.serving.follower import PointerFollower
    from vllm_surgery.serving.hotswap import HotSwapper

    roots = tmp_path / "adapters"
    shutil.copytree(tiny_adapter, roots / "x")
    url = f"s3://{s3.new_bucket()}/store"
    h = load_adapter(roots / "x").content_hash()
    versions = [publish(url, tmp_path / f"writer-{i}", tiny_adapter, h) for i in range(2)]
    db = open_database(postgres_url)
    replicas = {}
    for rid in ("a", "b"):
        settings = ServingSettings(
            adapter_dirs=(roots,), store=url, database=postgres_url, cache_dir=tmp_path / f"cache-{rid}"
        )
        models = FakeModels()
        swapper = HotSwapper(models, settings)
        swapper.resolver.pointers = db
        resolved = swapper.resolver.choose_path("x")
        models.lora_requests["x"] = LoRARequest(lora_name="x", lora_int_id=7, lora_path=str(resolved))
        replicas[rid] = {
            "swapper": swapper,
            "follower": PointerFollower(swapper, db, f"replica-{rid}", 1.0, loop),
            "cache": tmp_path / f"cache-{rid}",
        }
    yield {"db": db, "s3": s3, "url": url, "loop": loop, "versions": versions, **replicas}
    db.close()


def test_a_swap_on_one_replica_is_fetched_into_the_others_own_cache(cluster) -> None:
    first = cluster["versions"][0]
    a, b, db = cluster["a"], cluster["b"], cluster["db"]
    assert not any(b["cache"].rglob(first))
    result = on_loop(cluster, a["swapper"].swap("x", first))
    assert result.changed and served(cluster, "a") == first
    assert db.served_pointer("x").version == first
    b["follower"].sync()
    assert served(cluster, "b") == first
    assert [p.name for p in b["cache"].rglob(first) if p.parent.name == "x"] == [first]
    a["follower"].sync()
    assert rows(cluster) == {"replica-a": (first, "in_sync"), "replica-b": (first, "in_sync")}


def test_with_the_store_stopped_a_pointer_to_an_uncached_version_is_refused_and_reported(cluster) -> None:
    first, second = cluster["versions"]
    a, b, db = cluster["a"], cluster["b"], cluster["db"]
    on_loop(cluster, a["swapper"].swap("x", first))
    b["follower"].sync()
    assert served(cluster, "b") == first
    cluster["s3"].stop()
    # the pointer is written by a worker that published `second` before the store went down
    db.set_served_pointer("x", second, adapter_hash=None, by="job 7")
    b["follower"].sync()
    assert served(cluster, "b") == first
    state = {r.replica: r for r in db.replicas("x")}["replica-b"]
    assert (state.version, state.state) == (first, "behind"), state
    assert "unavailable" in state.error and cluster["url"] in state.error, state.error
    assert not any(p.name == second for p in b["cache"].rglob("*"))  # nothing half-copied
