"""HotSwapper and the endpoint plugin without a server: a fake OpenAIServingModels stands in for vLLM's
(same attributes: lora_requests, lora_resolver_lock, lora_id_counter, engine_client.add_lora, async
load/unload_lora_adapter; test_vllm_compat.py checks them against the real class). Imports vLLM,
starts no engine. The real engine path is covered by the slow test_hotswap.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import vllm  # noqa: F401  (a broken vLLM must fail these tests, not skip them)
from prometheus_client import REGISTRY

from vllm_surgery.adapter import PROVENANCE_NAME, load_adapter
from vllm_surgery.serving import vllm_compat
from vllm_surgery.settings import ServingSettings
from vllm_surgery.storage.store import VersionStore


class FakeEngine:
    """Stands in for the engine client: records add_lora calls, or refuses them."""

    def __init__(self) -> None:
        self.loads: list = []
        self.fail = False

    async def add_lora(self, lora_request) -> bool:
        if self.fail:
            raise RuntimeError("engine said no")
        self.loads.append(lora_request)
        return True


class FakeModels:
    """The attributes of vLLM 0.32's OpenAIServingModels that HotSwapper uses."""

    def __init__(self) -> None:
        from vllm.utils.counter import AtomicCounter

        self.lora_requests: dict = {}
        self.lora_resolver_lock = defaultdict(asyncio.Lock)
        self.lora_id_counter = AtomicCounter(100)
        self.engine_client = FakeEngine()

    async def load_lora_adapter(self, request, base_model_name=None):
        raise AssertionError("HotSwapper never uses vLLM's load path")

    async def unload_lora_adapter(self, request):
        raise AssertionError("HotSwapper never uses vLLM's unload path")

    def model_name(self, lora_request=None) -> str:
        return lora_request.lora_name if lora_request is not None else "base"

    async def show_available_models(self):
        cards = [SimpleNamespace(id="base")] + [
            SimpleNamespace(id=r.lora_name) for r in self.lora_requests.values()
        ]
        return SimpleNamespace(data=cards)

    @property
    def loads(self) -> list:
        return self.engine_client.loads

    @property
    def fail(self) -> bool:
        return self.engine_client.fail

    @fail.setter
    def fail(self, value: bool) -> None:
        self.engine_client.fail = value


def add_version(store: VersionStore, name: str, source: Path, adapter_hash: str, decision="forced") -> Path:
    out = store.new_version_dir(name)
    shutil.copytree(source, out, dirs_exist_ok=True)
    (out / PROVENANCE_NAME).write_text(json.dumps({"decision": decision, "adapter_hash": adapter_hash}))
    return out


FILES = ("adapter_config.json", "adapter_model.safetensors")


def is_snapshot_of(path: str, source: Path, store: Path, version: str) -> bool:
    """`path` is a snapshot (under the store's .snapshots, leaf = version) with `source`'s bytes."""
    p = Path(path)
    return (
        p.is_relative_to(store / ".snapshots")
        and p.name == version
        and all((p / f).read_bytes() == (source / f).read_bytes() for f in FILES)
    )


@pytest.fixture
def env(tmp_path: Path, tiny_adapter: Path):
    from vllm.lora.request import LoRARequest

    from vllm_surgery.serving.hotswap import HotSwapper

    roots = tmp_path / "adapters"
    shutil.copytree(tiny_adapter, roots / "x")
    store = VersionStore(tmp_path / "store")
    h = load_adapter(roots / "x").content_hash()
    good = add_version(store, "x", tiny_adapter, h, decision="accept")
    forced = add_version(store, "x", tiny_adapter, h, decision="forced")
    corrupt = add_version(store, "x", tiny_adapter, h, decision="accept")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    stale = add_version(store, "x", tiny_adapter, "0" * 64, decision="accept")
    models = FakeModels()
    swapper = HotSwapper(models, ServingSettings(adapter_dirs=(roots,), store=store.root))
    # "x" already resolved to its original, as the resolver leaves it (a snapshot of it).
    resolved = swapper.resolver.choose_path("x")
    models.lora_requests["x"] = LoRARequest(lora_name="x", lora_int_id=7, lora_path=str(resolved))
    return {
        "swapper": swapper,
        "models": models,
        "store": store,
        "original": roots / "x",
        "good": good,
        "forced": forced,
        "corrupt": corrupt,
        "stale": stale,
    }


def run(coro):
    return asyncio.run(coro)


def test_swap_loads_the_version_under_a_new_id_then_switches_the_name(env) -> None:
    swapper, models, store = env["swapper"], env["models"], env["store"]
    before = models.lora_requests["x"]
    result = run(swapper.swap("x", env["good"].name))
    assert result.changed and result.previous_version == "original"
    (load,) = models.loads
    stored = models.lora_requests["x"]
    # named x@ID in the engine (vLLM compares LoRARequests by name: two versions may share a batch)
    assert stored is load and load.lora_name == f"x@{load.lora_int_id}"
    assert vllm_compat.public_name(load) == "x"
    assert is_snapshot_of(load.lora_path, env["good"], store.root, env["good"].name), load.lora_path
    # a new id: requests already scheduled with the old one (7) finish on the old weights
    assert load.lora_int_id not in (7, before.lora_int_id)
    assert load.load_inplace is False  # never in place (upstream bug in 0.32)
    assert store.served_version_id("x") == env["good"].name
    info = swapper.describe("x")
    assert info["served_version"] == env["good"].name and info["previous_version"] == "original"


def test_swap_of_a_name_not_loaded_yet_loads_it(env) -> None:
    swapper, models = env["swapper"], env["models"]
    del models.lora_requests["x"]
    result = run(swapper.swap("x", env["good"].name))
    assert result.changed and result.previous_version is None
    (load,) = models.loads
    assert load.load_inplace is False
    assert models.lora_requests["x"] is load
    assert is_snapshot_of(load.lora_path, env["good"], env["store"].root, env["good"].name)


def test_same_path_is_a_noop(env) -> None:
    swapper, models = env["swapper"], env["models"]
    assert run(swapper.swap("x", "original")).changed is False
    assert models.loads == []


def test_rollback_returns_to_the_previous_version(env) -> None:
    swapper, models, store = env["swapper"], env["models"], env["store"]
    run(swapper.swap("x", env["good"].name))
    result = run(swapper.rollback("x"))
    assert result.changed and result.version == "original"
    assert is_snapshot_of(models.lora_requests["x"].lora_path, env["original"], store.root, "original")
    assert store.served_version_id("x") is None


def test_a_version_the_gate_did_not_accept_needs_force_and_a_stale_one_is_never_served(env) -> None:
    from vllm_surgery.serving.hotswap import HotSwapError

    swapper, models, store = env["swapper"], env["models"], env["store"]
    before = models.lora_requests["x"]
    forced = env["forced"].name
    with pytest.raises(HotSwapError) as e:
        run(swapper.swap("x", forced))
    assert e.value.status == 409
    assert "decision 'forced'" in str(e.value) and '"force": true' in str(e.value), e.value
    assert models.loads == [] and models.lora_requests["x"] is before
    assert store.served_version_id("x") is None
    with pytest.raises(HotSwapError) as e:
        run(swapper.swap_forced("x", env["stale"].name))
    assert e.value.status == 409 and "stale" in str(e.value)
    assert models.lora_requests["x"] is before
    result = run(swapper.swap_forced("x", forced))  # an operator's explicit choice
    assert result.changed and store.served_version_id("x") == forced
    assert is_snapshot_of(models.lora_requests["x"].lora_path, env["forced"], store.root, forced)


def test_rollback_without_history_is_a_conflict(env) -> None:
    from vllm_surgery.serving.hotswap import HotSwapError

    with pytest.raises(HotSwapError) as e:
        run(env["swapper"].rollback("x"))
    assert e.value.status == 409


@pytest.mark.parametrize(
    ("name", "version", "status"),
    [
        ("x", "corrupt", 422),
        ("x", "stale", 409),
        ("x", "missing", 404),
        ("x", "../x", 400),
        ("../x", "original", 400),
        ("nope", "original", 404),
    ],
)
def test_refusals_leave_the_old_version_serving(env, name, version, status) -> None:
    from vllm_surgery.serving.hotswap import HotSwapError

    swapper, models = env["swapper"], env["models"]
    version = env[version].name if version in env else version
    before = models.lora_requests["x"]
    with pytest.raises(HotSwapError) as e:
        run(swapper.swap(name, version))
    assert e.value.status == status, e.value
    assert models.loads == []  # validated before the engine was touched
    assert models.lora_requests["x"] is before


def test_engine_refusal_leaves_the_old_version(env) -> None:
    from vllm_surgery.serving.hotswap import HotSwapError

    swapper, models = env["swapper"], env["models"]
    models.fail = True
    before = models.lora_requests["x"]
    with pytest.raises(HotSwapError) as e:
        run(swapper.swap("x", env["good"].name))
    assert e.value.status == 500
    assert models.lora_requests["x"] is before
    assert env["store"].served_version_id("x") is None


def test_concurrent_swaps_of_one_name_are_serialised(env) -> None:
    swapper, models = env["swapper"], env["models"]

    async def both():
        return await asyncio.gather(swapper.swap("x", env["good"].name), swapper.swap("x", env["good"].name))

    results = run(both())
    assert sorted(r.changed for r in results) == [False, True]
    assert len(models.loads) == 1


def test_endpoint_routes_and_admin_token(env, monkeypatch) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from vllm_surgery.serving.api import STATE_KEY
    from vllm_surgery.serving.auth import ADMIN_HEADER
    from vllm_surgery.serving.endpoint_plugin import SurgeryEndpointPlugin

    monkeypatch.setenv("VLLM_SURGERY_ADMIN_TOKEN", "sesame")
    plugin = SurgeryEndpointPlugin()
    app = FastAPI()
    plugin.attach_router(app)
    setattr(app.state, STATE_KEY, env["swapper"])
    client = TestClient(app)
    listing = client.get("/v1/surgery/adapters").json()
    assert [a["name"] for a in listing["adapters"]] == ["x"]
    assert client.get("/v1/surgery/adapters/.x").status_code == 400
    good = env["good"].name
    assert client.post("/v1/surgery/adapters/x/swap", json={"version": good}).status_code == 403
    bad = client.post("/v1/surgery/adapters/x/swap", json={"version": good}, headers={ADMIN_HEADER: "no"})
    assert bad.status_code == 403
    ok = client.post("/v1/surgery/adapters/x/swap", json={"version": good}, headers={ADMIN_HEADER: "sesame"})
    assert ok.status_code == 200 and ok.json()["changed"], ok.text
    bearer = client.post("/v1/surgery/adapters/x/rollback", headers={"Authorization": "Bearer sesame"})
    assert bearer.status_code == 200, bearer.text
    assert (
        client.post("/v1/surgery/adapters/x/swap", json={}, headers={ADMIN_HEADER: "sesame"}).status_code
        == 400
    )
    corrupt = client.post(
        "/v1/surgery/adapters/x/swap", json={"version": env["corrupt"].name}, headers={ADMIN_HEADER: "sesame"}
    )
    assert corrupt.status_code == 422 and "corrupt" in corrupt.json()["error"]["message"]
    admin = {ADMIN_HEADER: "sesame"}
    forced = env["forced"].name
    refused = client.post("/v1/surgery/adapters/x/swap", json={"version": forced}, headers=admin)
    assert refused.status_code == 409 and "decision 'forced'" in refused.json()["error"]["message"]
    not_bool = client.post(
        "/v1/surgery/adapters/x/swap", json={"version": forced, "force": "yes"}, headers=admin
    )
    assert not_bool.status_code == 400, not_bool.text
    forced_ok = client.post(
        "/v1/surgery/adapters/x/swap", json={"version": forced, "force": True}, headers=admin
    )
    assert forced_ok.status_code == 200 and forced_ok.json()["version"] == forced, forced_ok.text


def test_endpoint_plugin_is_registered() -> None:
    from importlib.metadata import entry_points

    from vllm.plugins.endpoint_plugins.interface import EndpointPlugin

    (ep,) = [e for e in entry_points(group="vllm.endpoint_plugins") if e.name == "vllm_surgery_api"]
    assert isinstance(ep.load()(), EndpointPlugin)


def test_lora_modules_adapter_is_an_original_and_its_served_version_is_restored(
    tmp_path, tiny_adapter
) -> None:
    from vllm.lora.request import LoRARequest

    from vllm_surgery.serving.hotswap import HotSwapper

    outside = tmp_path / "elsewhere" / "y"
    shutil.copytree(tiny_adapter, outside)
    store = VersionStore(tmp_path / "store")
    good = add_version(store, "y", tiny_adapter, load_adapter(outside).content_hash(), decision="accept")
    plain = tmp_path / "elsewhere" / "z"
    shutil.copytree(tiny_adapter, plain)
    store.set_served("y", good.name)
    models = FakeModels()
    # as vLLM leaves an adapter given with --lora-modules y=<path> before plugins start
    models.lora_requests["y"] = LoRARequest(lora_name="y", lora_int_id=3, lora_path=str(outside))
    models.lora_requests["z"] = LoRARequest(lora_name="z", lora_int_id=4, lora_path=str(plain))
    swapper = HotSwapper(models, ServingSettings(adapter_dirs=(tmp_path / "roots",), store=store.root))
    assert swapper.describe("y")["source"] == "lora-modules"
    run(swapper.restore_served_versions())  # what a restarted server does at start
    assert is_snapshot_of(models.lora_requests["y"].lora_path, good, store.root, good.name)
    assert swapper.describe("y")["served_version"] == good.name
    # without a refined version, the --lora-modules adapter is moved onto a snapshot of its original
    assert is_snapshot_of(models.lora_requests["z"].lora_path, plain, store.root, "original")
    assert swapper.describe("z")["served_version"] == "original"
    assert swapper.describe("z")["previous_version"] is None  # nothing to roll back to: not a swap
    assert run(swapper.swap("y", "original")).changed
    assert is_snapshot_of(models.lora_requests["y"].lora_path, outside, store.root, "original")


def test_the_pending_swap_sweep_never_forces(env, tmp_path) -> None:
    """A job row that says "accepted, swap pending" is not the gate's word: the version's own
    surgery.json is. A forced or stale version is refused and the job says why; an accepted one is
    swapped in."""
    from vllm_surgery.serving.automatic_jobs import AutomaticJobs
    from vllm_surgery.storage import SQLiteDatabase
    from vllm_surgery.traffic import AdapterCalibration

    swapper, models, store = env["swapper"], env["models"], env["store"]
    db = SQLiteDatabase(tmp_path / "jobs.sqlite3")
    try:
        sweep = AutomaticJobs(swapper, db, "base", AdapterCalibration(swapper.settings, db))
        before = models.lora_requests["x"]

        def forge(version: str) -> int:
            job = db.enqueue_job("x", "manual", {})[0]
            db.claim_job("w", 60)
            db.finish_job(job.id, "w", "accepted", {"decision": "accept", "version": version}, "pending")
            return job.id

        forced = forge(env["forced"].name)
        assert run(sweep.swap_pending()) == [(forced, "failed")]
        error = db.job(forced).swap_error
        assert db.job(forced).swap == "failed" and "decision 'forced'" in error and "not 'accept'" in error
        stale = forge(env["stale"].name)
        assert run(sweep.swap_pending()) == [(stale, "failed")]
        assert "stale" in db.job(stale).swap_error
        assert models.loads == [] and models.lora_requests["x"] is before  # the original still serves
        assert store.served_version_id("x") is None
        good = forge(env["good"].name)
        assert run(sweep.swap_pending()) == [(good, "done")]
        assert swapper.describe("x")["served_version"] == env["good"].name
    finally:
        db.close()


def test_the_servers_periodic_pass_forgets_replicas_that_went_away(env, postgres_url) -> None:
    """With a shared (Postgres) database, the rows of a replica silent for longer than
    VLLM_SURGERY_REPLICA_FORGET_DAYS are deleted by the server's periodic pass (the one that prunes the
    job history); a replica that reports stays."""
    from vllm_surgery.serving.automatic_jobs import AutomaticJobs
    from vllm_surgery.storage import open_database
    from vllm_surgery.traffic import AdapterCalibration

    swapper = env["swapper"]
    assert swapper.settings.replica_forget_days == 1.0  # the default
    db = open_database(postgres_url)
    try:
        now = time.time()
        db.report_replica("scaled-down:8000", "x", "original", "in_sync", now=now - 86400.0 - 60)
        db.report_replica("running:8000", "x", "original", "in_sync", now=now - 86400.0 + 600)
        sweep = AutomaticJobs(swapper, db, "base", AdapterCalibration(swapper.settings, db))

        async def until_forgotten() -> None:
            task = asyncio.get_running_loop().create_task(sweep.run())
            try:
                deadline = time.monotonic() + 30
                while len(db.replicas("x")) > 1:
                    assert time.monotonic() < deadline, "the periodic pass did not forget the replica"
                    await asyncio.sleep(0.05)
            finally:
                task.cancel()

        run(until_forgotten())
        assert [r.replica for r in db.replicas("x")] == ["running:8000"]
    finally:
        db.close()


def test_with_sqlite_the_periodic_pass_leaves_the_replicas_table_alone(env, tmp_path) -> None:
    """One machine (SQLite) has no replicas: the pass writes nothing there (no write transaction)."""
    from vllm_surgery.serving.automatic_jobs import AutomaticJobs
    from vllm_surgery.storage import SQLiteDatabase
    from vllm_surgery.traffic import AdapterCalibration

    db = SQLiteDatabase(tmp_path / "jobs.sqlite3")
    try:
        db.report_replica("written-by-hand", "x", "original", "in_sync", now=1.0)
        sweep = AutomaticJobs(env["swapper"], db, "base", AdapterCalibration(env["swapper"].settings, db))
        assert sweep.forget_replicas() == 0
        assert [r.replica for r in db.replicas("x")] == ["written-by-hand"]
    finally:
        db.close()


def test_clients_see_the_name_not_a_versions_engine_name(env) -> None:
    """After a swap the engine knows the version as x@ID; the responses' model field and the model
    listing still say x (a name a client sent, or a --served-model-name, is left as it is)."""
    swapper, models = env["swapper"], env["models"]
    run(swapper.swap("x", env["good"].name))
    vllm_compat.install_public_names(models)
    version = models.lora_requests["x"]
    assert version.lora_name != "x"
    assert models.model_name(version) == "x"
    assert models.model_name(None) == "base"
    lookalike = vllm_compat.lora_request("y@3", "/p", 4)  # not NAME@ITS-OWN-ID: a name of its own
    assert models.model_name(lookalike) == "y@3"
    listing = run(models.show_available_models())
    assert [c.id for c in listing.data] == ["base", "x"]


def test_canary_routes_admin_token_bodies_and_refusals(env, monkeypatch, tmp_path) -> None:
    """The canary routes (docs/canary.md) need the admin token, refuse unknown fields and bad shares by
    name, never start a canary of a version a swap would refuse, keep the current version served while
    the canary has its own slot, and promote through the hot-swap."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from vllm_surgery.serving.api import CANARY_KEY, STATE_KEY
    from vllm_surgery.serving.auth import ADMIN_HEADER
    from vllm_surgery.serving.canaries import CanaryController
    from vllm_surgery.serving.endpoint_plugin import SurgeryEndpointPlugin
    from vllm_surgery.storage import SQLiteDatabase

    monkeypatch.setenv("VLLM_SURGERY_ADMIN_TOKEN", "sesame")
    plugin = SurgeryEndpointPlugin()
    app = FastAPI()
    plugin.attach_router(app)
    swapper, models = env["swapper"], env["models"]
    db = SQLiteDatabase(tmp_path / "canary.sqlite3")
    canaries = CanaryController(swapper, db)
    setattr(app.state, STATE_KEY, swapper)
    setattr(app.state, CANARY_KEY, canaries)
    client = TestClient(app)
    admin = {ADMIN_HEADER: "sesame"}
    good = env["good"].name
    before = models.lora_requests["x"]
    try:
        assert (
            client.post("/v1/surgery/adapters/x/canary", json={"version": good, "share": 0.3}).status_code
            == 403
        )

        def start(body: dict) -> tuple[int, str]:
            answer = client.post("/v1/surgery/adapters/x/canary", json=body, headers=admin)
            return answer.status_code, answer.text

        status, text = start({"version": good, "share": 0.3, "color": "red"})
        assert status == 400 and "unknown field(s) ['color']" in text
        for share in (0, 1, 1.5, -0.1):
            status, text = start({"version": good, "share": share})
            assert status == 400 and "'share' must be a number between 0 and 1" in text, (share, text)
        status, text = start({"version": good, "share": "0.3"})
        assert status == 400 and "share" in text
        assert start({"version": env["forced"].name, "share": 0.3})[0] == 409
        assert start({"version": env["stale"].name, "share": 0.3})[0] == 409
        assert start({"version": env["corrupt"].name, "share": 0.3})[0] == 422
        assert start({"version": "original", "share": 0.3})[0] == 409  # the version served now
        # hostile bodies: refused by name before anything is loaded or stored (checked just below)
        status, text = start({"version": "../../etc/passwd", "share": 0.3})
        assert status == 400 and "contains a path separator" in text
        status, text = start({"version": "x'; DROP TABLE canaries; --", "share": 0.3})
        assert status == 400 and "contains characters outside [A-Za-z0-9._-]" in text
        status, text = start({"version": [good], "share": 0.3})
        assert status == 400 and "'version': Input should be a valid string" in text

        def raw(body: bytes):
            headers = {**admin, "content-type": "application/json"}
            return client.post("/v1/surgery/adapters/x/canary", content=body, headers=headers)

        lone = raw(b'{"version": "\\ud800", "share": 0.3}')  # a lone surrogate
        assert lone.status_code == 400 and "'version'" in lone.text
        huge = raw(b'{"version": "' + b"a" * 10_000_000 + b'", "share": 0.3}')
        assert huge.status_code == 413 and "exceeds the limit of 65536 bytes" in huge.text
        assert models.loads == [] and db.running_canaries() == []  # nothing loaded, nothing recorded

        status, text = start({"version": good, "share": 0.3})
        assert status == 200, text
        assert models.lora_requests["x"] is before  # the current version still serves the name
        (slot,) = models.loads
        assert slot.lora_int_id != before.lora_int_id and is_snapshot_of(
            slot.lora_path, env["good"], env["store"].root, good
        )
        assert start({"version": good, "share": 0.3})[0] == 409  # one at a time
        view = client.get("/v1/surgery/adapters/x").json()
        assert view["canary"]["canary_version"] == good and view["canary"]["served_here"]
        # no rating yet: the rule continues (its figures' layout is the rule's own, vllm_surgery.canary)
        assert (
            isinstance(view["canary"]["figures"], dict)
            and view["canary"]["verdict_now"]["decision"] == "continue"
        )

        # sticky routing: sha256("x" NUL key) as a fraction of 2**64 below the share goes to the slot
        def routed(key: str):
            with canaries.around(SimpleNamespace(user=key, request_id="r"), None):
                return canaries.choose(before)

        for key in (f"user-{i}" for i in range(20)):
            digest = hashlib.sha256(f"x\x00{key}".encode()).digest()
            expected = slot if int.from_bytes(digest[:8], "big") / 2**64 < 0.3 else before
            assert routed(key) is expected, key

        shared = client.post("/v1/surgery/adapters/x/canary/share", json={"share": 0.6}, headers=admin)
        assert shared.status_code == 200 and shared.json()["share"] == 0.6
        promoted = client.post("/v1/surgery/adapters/x/canary/promote", headers=admin)
        assert promoted.status_code == 200 and promoted.json()["state"] == "promoted", promoted.text
        assert is_snapshot_of(models.lora_requests["x"].lora_path, env["good"], env["store"].root, good)
        assert env["store"].served_version_id("x") == good
        assert all(routed(f"user-{i}") is before for i in range(20))  # no canary slot any more: as asked
        none = client.post("/v1/surgery/adapters/x/canary/abort", headers=admin)
        assert none.status_code == 409 and "no running canary" in none.text
    finally:
        db.close()


def test_a_canary_past_its_deadline_expires_and_the_current_version_stays(env, tmp_path) -> None:
    """The periodic check finds a running canary (recorded by any server), serves it, and ends it as
    expired once its rule's time is up with no decision: the slot goes, the name keeps its version."""
    from vllm_surgery.serving.canaries import CanaryController
    from vllm_surgery.storage import SQLiteDatabase

    swapper, models = env["swapper"], env["models"]
    db = SQLiteDatabase(tmp_path / "canary.sqlite3")
    before = models.lora_requests["x"]
    rule = {"margin": 0.05, "error_rate": 0.05, "min_ratings": 30, "max_duration_s": 60.0}
    try:
        canaries = CanaryController(swapper, db)
        started = db.start_canary(
            "x", "original", env["good"].name, 0.4, rule, by="admin", now=time.time() - 30
        )

        async def check_twice():
            await canaries.check()  # loads it; 30 s of 60: continues
            assert canaries.paths_in_use() and db.running_canary("x").id == started.id
            with db.transaction() as conn:
                conn.execute("UPDATE canaries SET started = started - 60 WHERE id = ?", (started.id,))
            await canaries.check()

        run(check_twice())
        ended = db.canary_by_id(started.id)
        assert (ended.state, ended.decided_by, ended.verdict["decision"]) == ("expired", "rule", "expired")
        assert canaries.paths_in_use() == set() and models.lora_requests["x"] is before
        assert len(models.loads) == 1  # the canary slot only; no swap
    finally:
        db.close()


def test_a_promotion_whose_swap_the_engine_refuses_ends_aborted(env, tmp_path) -> None:
    """The decision is written before the hot-swap (one replica wins it). On one machine, when the engine
    then refuses the version, nothing serves it: the canary must not read as promoted. It is amended to
    aborted with the engine's error, the current version keeps serving, and the events say both."""
    from vllm_surgery.serving.canaries import CanaryController
    from vllm_surgery.serving.hotswap import HotSwapError
    from vllm_surgery.storage import SQLiteDatabase

    models, db = env["models"], SQLiteDatabase(tmp_path / "canary.sqlite3")
    before, canaries = models.lora_requests["x"], CanaryController(env["swapper"], db)
    try:
        rule = {"margin": 0.05, "error_rate": 0.05, "min_ratings": 30, "max_duration_s": 3600.0}
        started = db.start_canary("x", "original", env["good"].name, 0.4, rule, by="admin")
        run(canaries.check())  # loads its slot
        assert canaries.paths_in_use()
        models.engine_client.fail = True

        def decisions(outcome: str) -> float:
            labels = {"adapter": "x", "decision": outcome}
            return REGISTRY.get_sample_value("vllm_surgery_canary_decisions_total", labels) or 0.0

        counted = {o: decisions(o) for o in ("promoted", "aborted")}
        with pytest.raises(HotSwapError) as refused:
            run(canaries.promote("x", by="admin"))
        # counted once, as what it ended as: aborted, not promoted as well
        assert {o: decisions(o) - counted[o] for o in counted} == {"promoted": 0.0, "aborted": 1.0}
        assert refused.value.status == 500 and "engine said no" in str(refused.value)
        ended = db.canary_by_id(started.id)
        assert (ended.state, ended.decided_by, ended.verdict["decision"]) == ("aborted", "server", "aborted")
        assert "the hot-swap failed, so the version served before still serves" in ended.verdict["reason"]
        assert "engine said no" in ended.verdict["reason"]
        assert [e["event"] for e in db.canary_events(started.id)] == ["started", "promoted", "aborted"]
        assert models.lora_requests["x"] is before and env["store"].served_version_id("x") is None
        assert canaries.paths_in_use() == set()  # the slot is dropped
        assert db.running_canary("x") is None
    finally:
        db.close()
