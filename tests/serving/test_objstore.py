"""The refined-version store on object storage, against a real S3 server (SeaweedFS,
vllm_surgery/testing_servers.py) through s3fs: versions written by one machine (a writer store with its own
cache) and read by another (a replica store with another cache directory), a version without its manifest,
objects tampered with in the bucket, the cache bound, an S3 server stopped under a hot-swapper (vLLM's
serving models faked as in test_hotswap_unit.py), and the worker refining into an s3:// store. A vLLM server
serving a version that only exists in S3 is the slow test_objstore_server.py."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from vllm_surgery.adapter import PROVENANCE_NAME, load_adapter
from vllm_surgery.storage import StoreError, StoreUnavailable, open_database, open_store
from vllm_surgery.storage.objstore import MANIFEST_NAME, ObjectVersionStore

FILES = ("adapter_config.json", "adapter_model.safetensors", PROVENANCE_NAME)
GIB = 1 << 30


def make_store(url: str, cache: Path, max_bytes: int = GIB) -> ObjectVersionStore:
    store = open_store(url, cache, max_bytes)
    assert isinstance(store, ObjectVersionStore)
    return store


def publish(store: ObjectVersionStore, name: str, source: Path, adapter_hash: str, decision="accept") -> str:
    """A version of `name` with `source`'s adapter files, written and published as the worker does."""
    with store.writer_lock(name):
        out = store.new_version_dir(name)
        for f in FILES[:2]:
            shutil.copyfile(source / f, out / f)
        (out / PROVENANCE_NAME).write_text(json.dumps({"decision": decision, "adapter_hash": adapter_hash}))
        store.publish(name, out)
    return out.name


def cache_contents(store: ObjectVersionStore, name: str) -> list[str]:
    base = store.root / name
    return sorted(p.name for p in base.iterdir() if p.name != ".writer.lock") if base.is_dir() else []


def fetches(outcome: str) -> float:
    return REGISTRY.get_sample_value("vllm_surgery_store_fetches_total", {"outcome": outcome}) or 0.0


def test_a_version_travels_through_s3_byte_for_byte(s3_url, s3_server, tmp_path, tiny_adapter) -> None:
    writer = make_store(s3_url, tmp_path / "worker-cache")
    version = publish(writer, "x", tiny_adapter, "h" * 64)
    bucket_path = s3_url.removeprefix("s3://")
    listed = sorted(p.rsplit("/", 1)[-1] for p in s3_server.client().ls(f"{bucket_path}/x/{version}"))
    assert listed == sorted([*FILES, MANIFEST_NAME])

    replica = make_store(s3_url, tmp_path / "replica-cache")
    (info,) = replica.versions("x")
    assert (info.version_id, info.decision, info.adapter_hash) == (version, "accept", "h" * 64)
    assert cache_contents(replica, "x") == []  # listing read manifests only, downloaded nothing
    assert not replica.cached("x", version)

    path, outcome = replica.fetch("x", version)
    assert outcome == "fetched" and path == replica.root / "x" / version
    for f in FILES[:2]:
        assert (path / f).read_bytes() == (tiny_adapter / f).read_bytes(), f
    assert json.loads((path / PROVENANCE_NAME).read_text()) == {
        "decision": "accept",
        "adapter_hash": "h" * 64,
    }
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert manifest["files"]["adapter_model.safetensors"]["size"] == (
        (tiny_adapter / "adapter_model.safetensors").stat().st_size
    )
    assert replica.fetch("x", version) == (path, "hit")
    assert cache_contents(replica, "x") == [version]  # no temporary directory left

    # served.json and remembered outcomes live in the bucket too: another machine reads them.
    replica.set_served("x", version)
    assert make_store(s3_url, tmp_path / "third").served_version_id("x") == version
    assert writer.served("x", "h" * 64) == writer.root / "x" / version
    assert writer.served("x", "0" * 64) is None  # refined from other content: stale
    assert replica.clear_served("x") and writer.served_version_id("x") is None


def test_a_version_without_its_manifest_does_not_exist(s3_url, s3_server, tmp_path, tiny_adapter) -> None:
    client = s3_server.client()
    bucket_path = s3_url.removeprefix("s3://")
    version = "20260101T000000000000Z-0badf00d"
    for f in FILES[:2]:
        client.put_file(str(tiny_adapter / f), f"{bucket_path}/x/{version}/{f}")
    client.pipe_file(f"{bucket_path}/x/{version}/{PROVENANCE_NAME}", b'{"decision": "accept"}')
    store = make_store(s3_url, tmp_path / "cache")
    assert store.versions("x") == []
    assert store.version_info("x", version) is None
    with pytest.raises(StoreError, match=f"x/{version} does not exist \\(no manifest.json\\)"):
        store.fetch("x", version)
    assert cache_contents(store, "x") == []
    with pytest.raises(StoreError, match="no complete refined version"):
        store.set_served("x", version)
    # An interrupted write on the writer's machine: the version directory without manifest is removed
    # from its cache at the next start, and nothing of it reached readers.
    writer = make_store(s3_url, tmp_path / "writer")
    out = writer.new_version_dir("x")
    (out / "adapter_model.safetensors").write_bytes(b"half")
    assert writer.remove_leftovers() == [out]
    assert cache_contents(writer, "x") == []


@pytest.mark.parametrize("tamper", ["flipped", "truncated", "missing"])
def test_a_corrupt_object_is_refused_and_nothing_is_cached(s3_url, s3_server, tmp_path, tiny_adapter, tamper):
    writer = make_store(s3_url, tmp_path / "writer")
    version = publish(writer, "x", tiny_adapter, "h" * 64)
    weights = f"{s3_url.removeprefix('s3://')}/x/{version}/adapter_model.safetensors"
    client = s3_server.client()
    data = bytearray(client.cat_file(weights))
    if tamper == "flipped":
        data[-1] ^= 0xFF
        client.pipe_file(weights, bytes(data))
    elif tamper == "truncated":
        client.pipe_file(weights, bytes(data[:100]))
    else:
        client.rm_file(weights)
    replica = make_store(s3_url, tmp_path / "replica")
    expected = {
        "flipped": f"{weights} is corrupt: {len(data)} bytes with SHA-256 ",
        "truncated": f"{weights} is corrupt: 100 bytes with SHA-256 ",
        "missing": f"{weights} is missing \\(listed in the manifest\\)",
    }[tamper]
    with pytest.raises(StoreError, match=expected) as caught:
        replica.fetch("x", version)
    assert not isinstance(caught.value, StoreUnavailable)
    assert cache_contents(replica, "x") == []  # neither the version nor a temporary directory
    assert not replica.cached("x", version)


def test_the_cache_keeps_its_bound_evicting_the_least_recently_used(s3_url, tmp_path, tiny_adapter) -> None:
    writer = make_store(s3_url, tmp_path / "writer")
    v1, v2, v3 = (publish(writer, "x", tiny_adapter, "h" * 64) for _ in range(3))
    size = sum(f.stat().st_size for f in (writer.root / "x" / v1).iterdir())  # one version, manifest included
    replica = make_store(s3_url, tmp_path / "replica", max_bytes=int(size * 2.5))
    replica.fetch("x", v1)
    replica.fetch("x", v2)
    assert replica.fetch("x", v1)[1] == "hit"  # v1 is now more recently used than v2
    replica.fetch("x", v3)
    assert cache_contents(replica, "x") == sorted([v1, v3])  # v2, least recently used, was evicted
    # A version in use is never evicted, even when it is the least recently used.
    replica.in_use = lambda: {("x", v1)}
    assert replica.fetch("x", v2)[1] == "fetched"
    assert cache_contents(replica, "x") == sorted([v1, v2])  # v3 went, v1 stayed
    # Everything in use: the bound is exceeded rather than a served version removed.
    replica.in_use = lambda: {("x", v1), ("x", v2)}
    replica.fetch("x", v3)
    assert cache_contents(replica, "x") == sorted([v1, v2, v3])


def test_a_missing_s3fs_names_the_extra_to_install(tmp_path) -> None:
    # A fresh interpreter where s3fs cannot be imported (None in sys.modules makes `import s3fs` fail).
    code = (
        "import sys; sys.modules['s3fs'] = None\n"
        "from vllm_surgery.storage import StoreError, open_store\n"
        "try:\n"
        f"    open_store('s3://bucket/prefix', {str(tmp_path)!r}, 1 << 30)\n"
        "except StoreError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("store s3://bucket/prefix: the package for this protocol is not installed")
    assert "pip install 'vllm-surgery[s3]'" in done.stdout


def test_local_paths_stay_local_stores(tmp_path) -> None:
    store = open_store(tmp_path / "store", tmp_path / "cache", GIB)
    assert type(store).__name__ == "VersionStore" and store.root == tmp_path / "store"


# ----------------------------------------------------------------------------- S3 down under a swapper
@pytest.fixture
def own_s3(monkeypatch):
    """A private S3 server that the test may stop."""
    from vllm_surgery.testing_servers import S3Server

    server = S3Server().start()
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own setting: fail fast once it is down
    yield server
    server.stop()


def test_store_down_refuses_uncached_versions_and_the_served_one_keeps_serving(
    own_s3, tmp_path, tiny_adapter
) -> None:
    from test_hotswap_unit import FakeModels
    from vllm.lora.request import LoRARequest

    from vllm_surgery.serving.hotswap import HotSwapError, HotSwapper
    from vllm_surgery.settings import ServingSettings

    url = f"s3://{own_s3.new_bucket()}/store"
    roots = tmp_path / "adapters"
    shutil.copytree(tiny_adapter, roots / "x")
    h = load_adapter(roots / "x").content_hash()
    writer = make_store(url, tmp_path / "worker-cache")
    v1, v2 = publish(writer, "x", tiny_adapter, h), publish(writer, "x", tiny_adapter, h)

    settings = ServingSettings(adapter_dirs=(roots,), store=url, cache_dir=tmp_path / "replica-cache")
    models = FakeModels()
    swapper = HotSwapper(models, settings)
    models.lora_requests["x"] = LoRARequest("x", 7, str(swapper.resolver.choose_path("x")))
    fetched = fetches("fetched")
    result = asyncio.run(swapper.swap("x", v1))
    assert result.changed and fetches("fetched") == fetched + 1
    served = models.lora_requests["x"].lora_path
    assert swapper.version_of("x", served) == v1
    assert (Path(served) / "adapter_model.safetensors").read_bytes() == (
        tiny_adapter / "adapter_model.safetensors"
    ).read_bytes()

    # The listing reads manifests only: v2 is listed servable (checked when a swap fetches it), not cached.
    listed = swapper.describe("x")["versions"]
    assert [(v["id"], v["servable"]) for v in listed] == [(v1, True), (v2, True)]
    assert not swapper.store.cached("x", v2)

    own_s3.stop()
    failed = fetches("failed")
    with pytest.raises(HotSwapError) as caught:
        asyncio.run(swapper.swap("x", v2))
    error = caught.value
    assert (error.status, error.outcome) == (503, "unavailable")
    message = str(error)
    assert f"object store {url} unavailable" in message
    assert "the version served before keeps serving" in message
    assert "EndpointConnectionError" in message
    assert models.lora_requests["x"].lora_path == served  # the previous version still serves
    assert fetches("failed") == failed + 1
    assert not swapper.store.cached("x", v2)

    # What is cached keeps working with the store down: back to the original and to v1 again.
    assert asyncio.run(swapper.swap("x", "original")).changed
    hits = fetches("hit")
    again = asyncio.run(swapper.swap("x", v1))
    assert again.changed and swapper.version_of("x", again.path) == v1
    assert fetches("hit") == hits + 1
    # The listing answers from the cache: v1 is known, servable; served.json cannot be read.
    described = swapper.describe("x")
    assert [v["id"] for v in described["versions"]] == [v1]
    assert described["versions"][0]["servable"] is True
    assert described["store_served_version"] is None


# ----------------------------------------------------------------------------- the worker
@pytest.fixture(scope="module")
def gain(tmp_path_factory):
    from vllm_surgery.testing import build_gain_case

    return build_gain_case(tmp_path_factory.mktemp("gain"))


def worker_parts(tmp_path: Path, gain, url: str):
    """A job database, a job spec for adapter "x" (the gain case's) and a worker on the s3 store `url`."""
    from vllm_surgery.testing import GAIN_SETTINGS
    from vllm_surgery.worker.job_spec import job_spec, records_sha256
    from vllm_surgery.worker.process import RefinementWorker, WorkerOptions

    shutil.copytree(gain.adapter, tmp_path / "adapters" / "x")
    db = open_database(tmp_path / "jobs.sqlite3")
    options = WorkerOptions(
        server="http://127.0.0.1:9",
        device="cpu",
        lease_s=30,
        owner="w",
        adapter_dirs=(tmp_path / "adapters",),
    )
    worker = RefinementWorker(db, make_store(url, tmp_path / "worker-cache"), options)
    records = gain.records()
    source = {"source": "records", "records": records, "sha256": records_sha256(records)}
    spec = job_spec(
        base_model=str(gain.base),
        adapter_path=tmp_path / "adapters" / "x",
        config=GAIN_SETTINGS,
        calibration=source,
    )
    return db, worker, spec


def test_the_worker_refines_into_an_s3_store(s3_url, tmp_path, gain) -> None:
    from vllm_surgery.worker.process import RefinementWorker

    db, worker, spec = worker_parts(tmp_path, gain, s3_url)
    store, options = worker.store, worker.options
    first = db.enqueue_job("x", "manual", spec)[0].id
    assert worker.run(once=True) == 1
    job = db.job(first)
    assert (job.state, job.result["decision"], job.result["reused"]) == ("accepted", "accept", False)

    replica = make_store(s3_url, tmp_path / "replica-cache")
    (info,) = replica.versions("x")
    assert info.version_id == job.version and info.decision == "accept"
    assert info.adapter_hash == load_adapter(tmp_path / "adapters" / "x").content_hash()
    path, outcome = replica.fetch("x", job.version)
    assert outcome == "fetched"
    written = store.root / "x" / job.version  # the worker's own cached copy of what it uploaded
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in written.iterdir())
    for f in path.iterdir():
        assert f.read_bytes() == (written / f.name).read_bytes(), f.name
    load_adapter(path)  # a complete, loadable PEFT adapter

    # The same job again is answered from the bucket (another worker, another cache: nothing computed).
    other = RefinementWorker(db, make_store(s3_url, tmp_path / "other-cache"), options)
    second = db.enqueue_job("x", "manual", spec)[0].id
    assert other.run(once=True) == 1
    again = db.job(second)
    assert (again.state, again.version, again.result["reused"]) == ("accepted", job.version, True)
    assert "load_model" not in again.result["timings"]
    db.close()


def test_a_worker_whose_store_is_down_fails_the_job_naming_it(own_s3, tmp_path, gain) -> None:
    url = f"s3://{own_s3.new_bucket()}/store"
    db, worker, spec = worker_parts(tmp_path, gain, url)
    job_id = db.enqueue_job("x", "manual", spec)[0].id
    own_s3.stop()
    assert worker.run(once=True) == 1
    job = db.job(job_id)
    assert (job.state, job.version) == ("failed", None)
    assert job.error.startswith(f"object store {url} unavailable: ")
    assert cache_contents(worker.store, "x") == []  # nothing half-written left on the worker either
    db.close()


GRACE_S = 5.0  # long enough that the upload in progress stays younger through two collections


def test_store_gc_deletes_uploads_that_died_before_their_manifest_after_the_grace_period(
    s3_url, s3_server, tmp_path, tiny_adapter
) -> None:
    client = s3_server.client()
    bucket_path = s3_url.removeprefix("s3://")
    store = make_store(s3_url, tmp_path / "cache")
    complete = publish(store, "x", tiny_adapter, "h" * 64)
    store.set_served("x", complete)
    dead = {"x": "20260101T000000000000Z-0badf00d", "y": "20260101T000000000000Z-0badf00e"}
    for name, version in dead.items():  # uploads that died before their manifest
        for f in FILES[:2]:
            client.put_file(str(tiny_adapter / f), f"{bucket_path}/{name}/{version}/{f}")
        client.pipe_file(f"{bucket_path}/{name}/{version}/{PROVENANCE_NAME}", b'{"decision": "accept"}')
    size = sum((tiny_adapter / f).stat().st_size for f in FILES[:2]) + len(b'{"decision": "accept"}')
    time.sleep(6)  # older than the grace (5 s; S3 times have a second's resolution)
    uploading = "20260101T000000000001Z-0badf00f"  # an upload in progress: one file so far
    client.pipe_file(f"{bucket_path}/x/{uploading}/adapter_config.json", b"{}")
    expected = sorted((name, version, 3, size) for name, version in dead.items())

    found = store.collect_garbage(GRACE_S, dry_run=True)
    assert sorted((o.name, o.entry, o.files, o.bytes) for o in found) == expected
    assert client.exists(f"{bucket_path}/x/{dead['x']}/{PROVENANCE_NAME}")  # a dry run deletes nothing
    found = store.collect_garbage(GRACE_S)
    assert sorted((o.name, o.entry, o.files, o.bytes) for o in found) == expected
    client.invalidate_cache()
    for name, version in dead.items():
        assert not client.exists(f"{bucket_path}/{name}/{version}/{PROVENANCE_NAME}")
        left = client.find(f"{bucket_path}/{name}/{version}", detail=True)
        assert [p for p, info in left.items() if info["type"] == "file"] == []
    assert client.exists(f"{bucket_path}/x/{uploading}/adapter_config.json")  # younger than the grace
    listed = sorted(p.rsplit("/", 1)[-1] for p in client.ls(f"{bucket_path}/x/{complete}"))
    assert listed == sorted([*FILES, MANIFEST_NAME])  # the version is whole
    reader = make_store(s3_url, tmp_path / "reader")
    assert [v.version_id for v in reader.versions("x")] == [complete]
    assert reader.served_version_id("x") == complete
    assert reader.fetch("x", complete)[1] == "fetched"
    # nothing else is collected (the upload in progress may have outgrown the grace by now)
    assert [o.entry for o in store.collect_garbage(GRACE_S) if o.entry != uploading] == []


def test_an_upload_slower_than_the_limit_is_not_committed(s3_url, s3_server, tmp_path, tiny_adapter) -> None:
    """`publish` writes no manifest for an upload that took longer than its limit (the store's garbage
    collection may have deleted its first files by then): nothing is visible, and gc deletes it."""
    client = s3_server.client()
    bucket_path = s3_url.removeprefix("s3://")
    store = make_store(s3_url, tmp_path / "cache")
    store.upload_limit_s = 0.0  # every upload takes longer than this
    with pytest.raises(StoreError, match=r"took \d+ s, more than 0 s: not committed"):
        publish(store, "x", tiny_adapter, "h" * 64)
    (version,) = [p.rsplit("/", 1)[-1] for p in client.ls(f"{bucket_path}/x")]
    assert not client.exists(f"{bucket_path}/x/{version}/{MANIFEST_NAME}")
    assert make_store(s3_url, tmp_path / "reader").versions("x") == []
    (orphan,) = store.collect_garbage(0.0, now=time.time() + 2)
    assert (orphan.name, orphan.entry, orphan.files) == ("x", version, 3)


def test_the_gc_grace_period_is_at_least_twice_the_upload_limit() -> None:
    """The guarantee that gc never deletes an upload that may still commit rests on this."""
    from vllm_surgery.settings import ServingSettings, SettingsError
    from vllm_surgery.storage.objstore import UPLOAD_LIMIT_S

    least = 2 * UPLOAD_LIMIT_S / 3600
    variable = "VLLM_SURGERY_STORE_GC_GRACE_HOURS"
    assert ServingSettings.from_env({variable: str(least)}).store_gc_grace_hours == least
    with pytest.raises(SettingsError, match=variable):
        ServingSettings.from_env({variable: str(least - 0.01)})
    assert ServingSettings.from_env({}).store_gc_grace_hours == 24.0


def test_store_gc_on_an_unreachable_store_exits_2_naming_it(s3_url, s3_server, tmp_path) -> None:
    """`vllm-surgery store gc` as a user runs it: against the real server it says what it found; with
    nothing answering at the endpoint it exits 2 with the store's URL, and deletes nothing."""
    from vllm_surgery.testing_servers import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_SURGERY_")}
    env.update(s3_server.env(), AWS_MAX_ATTEMPTS="1", VLLM_SURGERY_CACHE_DIR=str(tmp_path / "cache"))
    command = [sys.executable, "-m", "vllm_surgery.cli", "store", "gc", "--store", s3_url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "nothing to delete"
    env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert f"vllm-surgery: error: object store {s3_url} unavailable" in done.stderr


def test_the_s3_fixtures_ports_are_drawn_without_collisions(monkeypatch) -> None:
    """weed binds P and P + 10000 for its master, volume and filer: ports drawn together never share a
    port or a + 10000 with another or with those already taken (a clean-clone CI run once drew the master
    30801 and the volume 20801, whose gRPC port is 30801, and weed exited)."""
    import vllm_surgery.testing_servers as servers

    draws = iter([20801, 26001, 36001, 16001 + 10000, 26002, 36002, 27003])

    class Scripted:
        def randrange(self, low: int, high: int) -> int:
            return next(draws)

    monkeypatch.setattr(servers.random, "Random", Scripted)
    monkeypatch.setattr(servers, "_free", lambda port: True)
    # 20801 + 10000 is taken; 26001 ok; 36001 = 26001 + 10000; 26001 again; 26002 ok; 36002 = 26002 +
    # 10000; 27003 ok
    assert servers.free_port_pairs(3, {30801}) == [26001, 26002, 27003]
