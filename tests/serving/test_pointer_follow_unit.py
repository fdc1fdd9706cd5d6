"""Two replicas' HotSwappers sharing one real Postgres database and one store, without an engine (vLLM's
serving models faked as in test_hotswap_unit.py): a swap or rollback on one writes the served pointer
with its history and swaps there; the other's follower (`PointerFollower.sync`, what its thread runs
on every notification and poll) serves it with the same checks, or keeps what it serves and reports
why. The LISTEN thread and real engines are covered by test_served_pointer.py and the slow
test_replicas.py."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import pytest
import vllm  # noqa: F401  (a broken vLLM must fail these tests, not skip them)
from test_hotswap_unit import FakeModels, add_version

from vllm_surgery.adapter import load_adapter
from vllm_surgery.settings import ServingSettings
from vllm_surgery.storage import open_database
from vllm_surgery.storage.store import VersionStore


@pytest.fixture
def loop():
    """The servers' event loop, in a thread of its own (the follower waits on it from another)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


@pytest.fixture
def cluster(tmp_path: Path, tiny_adapter: Path, postgres_url: str, loop):
    from vllm.lora.request import LoRARequest

    from vllm_surgery.serving.follower import PointerFollower
    from vllm_surgery.serving.hotswap import HotSwapper

    roots = tmp_path / "adapters"
    shutil.copytree(tiny_adapter, roots / "x")
    store = VersionStore(tmp_path / "store")
    h = load_adapter(roots / "x").content_hash()
    versions = {
        "good": add_version(store, "x", tiny_adapter, h, decision="accept").name,
        "forced": add_version(store, "x", tiny_adapter, h, decision="forced").name,
        "corrupt": add_version(store, "x", tiny_adapter, h, decision="accept").name,
    }
    (store.version_dir("x", versions["corrupt"]) / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    db = open_database(postgres_url)
    replicas = {}
    for rid in ("a", "b"):
        settings = ServingSettings(
            adapter_dirs=(roots,),
            store=store.root,
            database=postgres_url,
            snapshot_dir=tmp_path / f"snap-{rid}",
        )
        models = FakeModels()
        swapper = HotSwapper(models, settings)
        swapper.resolver.pointers = db
        resolved = swapper.resolver.choose_path("x")  # "x" resolved, as the resolver leaves it
        models.lora_requests["x"] = LoRARequest(lora_name="x", lora_int_id=7, lora_path=str(resolved))
        replicas[rid] = {
            "swapper": swapper,
            "follower": PointerFollower(swapper, db, f"replica-{rid}", 1.0, loop),
        }
    yield {"db": db, "store": store, "loop": loop, **versions, **replicas}
    db.close()


def on_loop(cluster, coro):
    return asyncio.run_coroutine_threadsafe(coro, cluster["loop"]).result(60)


def served(cluster, rid: str) -> str:
    swapper = cluster[rid]["swapper"]
    return swapper.version_of("x", swapper.served_path("x"))


def rows(cluster) -> dict:
    return {r.replica: (r.version, r.state) for r in cluster["db"].replicas("x")}


def test_a_swap_writes_the_pointer_and_the_other_replica_follows(cluster) -> None:
    a, db, good = cluster["a"]["swapper"], cluster["db"], cluster["good"]
    result = on_loop(cluster, a.swap("x", good))
    assert result.changed and served(cluster, "a") == good
    pointer = db.served_pointer("x")
    assert (pointer.version, pointer.forced, pointer.set_by, pointer.revision) == (good, False, "admin", 1)
    assert pointer.adapter_hash == cluster["store"].version_info("x", good).adapter_hash
    assert served(cluster, "b") == "original"  # until its follower looks
    cluster["b"]["follower"].sync()
    assert served(cluster, "b") == good
    cluster["a"]["follower"].sync()
    assert rows(cluster) == {"replica-a": (good, "in_sync"), "replica-b": (good, "in_sync")}
    assert not (cluster["store"].root / "x" / "served.json").exists()  # the database holds the pointer
    view = a.describe("x")
    assert view["pointer"]["version"] == good and view["store_served_version"] is None
    assert [r["id"] for r in view["replicas"]] == ["replica-a", "replica-b"]


def test_a_version_the_gate_did_not_accept_is_followed_only_when_the_pointer_says_forced(cluster) -> None:
    db, forced = cluster["db"], cluster["forced"]
    info = cluster["store"].version_info("x", forced)
    db.set_served_pointer("x", forced, adapter_hash=info.adapter_hash, by="job 5")  # not forced
    cluster["b"]["follower"].sync()
    assert served(cluster, "b") == "original"
    [row] = db.replicas("x")
    assert (row.replica, row.version, row.state) == ("replica-b", "original", "failed")
    assert "not 'accept'" in row.error
    db.set_served_pointer("x", forced, adapter_hash=info.adapter_hash, forced=True, by="admin")
    cluster["b"]["follower"].sync()
    assert served(cluster, "b") == forced
    assert rows(cluster) == {"replica-b": (forced, "in_sync")}


def test_a_replica_that_cannot_validate_keeps_serving_and_reports_failed(cluster) -> None:
    db, good, corrupt = cluster["db"], cluster["good"], cluster["corrupt"]
    on_loop(cluster, cluster["a"]["swapper"].swap("x", good))
    cluster["b"]["follower"].sync()
    db.set_served_pointer(
        "x", corrupt, adapter_hash=cluster["store"].version_info("x", corrupt).adapter_hash, by="job 9"
    )
    cluster["b"]["follower"].sync()
    assert served(cluster, "b") == good  # still serving what it had
    [row] = db.replicas("x")
    assert (row.version, row.state) == (good, "failed") and "corrupt" in row.error
    # the admin route refuses it outright: validated before the pointer is written
    from vllm_surgery.serving.hotswap import HotSwapError

    with pytest.raises(HotSwapError) as refused:
        on_loop(cluster, cluster["a"]["swapper"].swap("x", corrupt))
    assert refused.value.status == 422
    assert db.served_pointer("x").set_by == "job 9"  # unchanged by the refused swap


def test_a_rollback_on_either_replica_goes_back_over_the_latest_change(cluster) -> None:
    a, b, db, good = cluster["a"]["swapper"], cluster["b"]["swapper"], cluster["db"], cluster["good"]
    from vllm_surgery.serving.hotswap import HotSwapError

    with pytest.raises(HotSwapError) as nothing:
        on_loop(cluster, b.rollback("x"))
    assert nothing.value.status == 409
    on_loop(cluster, a.swap("x", good))
    cluster["b"]["follower"].sync()
    result = on_loop(cluster, b.rollback("x"))  # on the replica that did not make the change
    assert (result.version, result.previous_version) == ("original", good)
    last = db.pointer_history("x")[-1]
    assert (last.from_version, last.to_version, last.changed_by, last.revision) == (
        good,
        "original",
        "rollback",
        2,
    )
    cluster["a"]["follower"].sync()
    assert served(cluster, "a") == "original"


def test_a_swap_that_cannot_write_the_pointer_changes_nothing(cluster) -> None:
    from vllm_surgery.serving.hotswap import HotSwapError

    cluster["db"].close()
    with pytest.raises(HotSwapError) as refused:
        on_loop(cluster, cluster["a"]["swapper"].swap("x", cluster["good"]))
    assert refused.value.status == 503 and "nothing changed on any replica" in str(refused.value)
    assert served(cluster, "a") == "original"


def test_the_resolver_serves_the_pointer(cluster) -> None:
    db, good = cluster["db"], cluster["good"]
    resolver = cluster["b"]["swapper"].resolver
    db.set_served_pointer(
        "x", good, adapter_hash=cluster["store"].version_info("x", good).adapter_hash, by="admin"
    )
    assert Path(resolver.choose_path("x")).name == good
    stale = "0" * 64
    assert resolver.served_refined("x", stale) is None  # refined from other content: the original


def test_a_swap_writes_the_pointer_while_holding_the_names_lock(cluster, monkeypatch) -> None:
    """The replica's own follower, woken by the notification of its own swap, must wait for that swap:
    if it swapped first, the route would find the version served and answer "unchanged" (seen on a
    loaded machine: a swap answered changed=False with previous_version equal to the new version)."""
    a, good = cluster["a"]["swapper"], cluster["good"]
    held = []
    write = a._write_pointer

    def spy(name, *args):
        held.append(a._locks[name].locked())
        return write(name, *args)

    monkeypatch.setattr(a, "_write_pointer", spy)
    result = on_loop(cluster, a.swap("x", good))
    assert held == [True] and result.changed and result.previous_version == "original"


def test_a_follow_of_a_version_the_pointer_has_left_changes_nothing(cluster) -> None:
    """A follower that validated the pointer's version while a swap moved the pointer on must not go
    back to the older version once it gets the lock: the newer change is followed on its own."""
    a, b, db, good, forced = (cluster[k] for k in ("a", "b", "db", "good", "forced"))
    on_loop(cluster, a["swapper"].swap_forced("x", forced))  # the pointer now names `forced`
    result = on_loop(cluster, b["swapper"].follow("x", good, False))  # what an older notification said
    assert not result.changed and result.version == "original" == served(cluster, "b")
    b["follower"].sync()  # the pointer's own version is followed
    assert served(cluster, "b") == forced
    assert db.served_pointer("x").version == forced


def test_a_promotion_stands_where_the_pointer_moved_though_this_replicas_engine_refused(cluster) -> None:
    """With a shared database the promotion's swap writes the served pointer before this replica's own
    engine loads the version. If only that load fails, every replica follows the pointer: the canary
    stays promoted (amending it to aborted would misstate what serves), the other replica serves the
    version at its next look, and this one at its next poll once its engine takes it."""
    from vllm_surgery.serving.canaries import CanaryController
    from vllm_surgery.serving.hotswap import HotSwapError

    db, good, a = cluster["db"], cluster["good"], cluster["a"]["swapper"]
    rule = {"margin": 0.05, "error_rate": 0.05, "min_ratings": 30, "max_duration_s": 3600.0}
    canaries = CanaryController(a, db)
    started = db.start_canary("x", "original", good, 0.4, rule, by="admin")
    on_loop(cluster, canaries.check())  # replica a loads the canary's slot
    a.models.engine_client.fail = True
    with pytest.raises(HotSwapError) as refused:
        on_loop(cluster, canaries.promote("x", by="admin"))
    assert refused.value.status == 500 and "engine said no" in str(refused.value)
    ended = db.canary_by_id(started.id)
    assert (ended.state, ended.verdict["decision"]) == ("promoted", "promoted")
    assert [e["event"] for e in db.canary_events(started.id)] == ["started", "promoted"]
    assert db.served_pointer("x").version == good and served(cluster, "a") == "original"
    cluster["b"]["follower"].sync()
    assert served(cluster, "b") == good
    a.models.engine_client.fail = False
    cluster["a"]["follower"].sync()
    assert served(cluster, "a") == good
    assert rows(cluster) == {"replica-a": (good, "in_sync"), "replica-b": (good, "in_sync")}
