"""The refined-version store on real directories, including one version written by refine() itself."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from vllm_surgery.adapter import load_adapter
from vllm_surgery.names import InvalidAdapterName
from vllm_surgery.storage.store import SERVED_NAME, StoreError, VersionStore


def fake_version(store: VersionStore, name: str, adapter: Path, decision: str, adapter_hash: str) -> Path:
    """A version directory as refine() leaves it: the adapter's files plus surgery.json."""
    path = store.new_version_dir(name)
    path.rmdir()
    shutil.copytree(adapter, path)
    (path / "surgery.json").write_text(json.dumps({"decision": decision, "adapter_hash": adapter_hash}))
    return path


@pytest.fixture
def original_hash(tiny_adapter: Path) -> str:
    return load_adapter(tiny_adapter).content_hash()


def test_empty_store(tmp_path: Path, original_hash: str) -> None:
    store = VersionStore(tmp_path / "store")
    assert store.versions("math") == []
    assert store.served("math", original_hash) is None
    assert not (tmp_path / "store").exists()  # reading never creates anything


def test_new_version_dirs_are_unique_empty_and_time_sorted(tmp_path: Path) -> None:
    store = VersionStore(tmp_path / "store")
    dirs = [store.new_version_dir("math") for _ in range(50)]
    assert len(set(dirs)) == 50
    assert all(d.is_dir() and not any(d.iterdir()) for d in dirs)
    assert [d.name for d in dirs] == sorted(d.name for d in dirs)
    assert all(d.parent == (tmp_path / "store" / "math").resolve() for d in dirs)
    # Reserved but never written: not a version.
    assert store.versions("math") == []


def test_refined_version_round_trip(
    tmp_path, tiny_base, tiny_adapter, tiny_calibration, original_hash
) -> None:
    from vllm_surgery.refine import refine

    store = VersionStore(tmp_path / "store")
    out = store.new_version_dir("math")
    result = refine(tiny_base, tiny_adapter, tiny_calibration, out, device="cpu", force=True, progress=False)
    assert result.written and result.decision in ("accept", "forced")

    (info,) = store.versions("math")
    assert info.path == out and info.version_id == out.name
    assert info.decision == result.decision and info.adapter_hash == original_hash and info.servable

    assert store.served("math", original_hash) is None  # written, but not chosen yet
    served_file = store.set_served("math", out.name)
    assert served_file == out.parent / SERVED_NAME
    assert json.loads(served_file.read_text())["version"] == out.name
    assert store.served("math", original_hash) == out
    load_adapter(store.served("math", original_hash))  # a complete adapter
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_stale_version_is_ignored(tmp_path: Path, tiny_adapter: Path, original_hash: str) -> None:
    store = VersionStore(tmp_path / "store")
    old = fake_version(store, "math", tiny_adapter, "accept", "0" * 64)
    store.set_served("math", old.name)
    assert store.served("math", "0" * 64) == old
    # The operator replaced the original: its hash changed, the old refinement must not be served.
    assert store.served("math", original_hash) is None


def test_served_follows_the_latest_choice(tmp_path: Path, tiny_adapter: Path, original_hash: str) -> None:
    store = VersionStore(tmp_path / "store")
    first = fake_version(store, "math", tiny_adapter, "accept", original_hash)
    second = fake_version(store, "math", tiny_adapter, "forced", original_hash)
    assert [v.path for v in store.versions("math")] == [first, second]
    store.set_served("math", second.name)
    assert store.served("math", original_hash) == second
    store.set_served("math", first.name)
    assert store.served("math", original_hash) == first


def test_unservable_versions_cannot_be_chosen(tmp_path: Path, tiny_adapter: Path, original_hash: str) -> None:
    store = VersionStore(tmp_path / "store")
    kept = fake_version(store, "math", tiny_adapter, "keep_original", original_hash)
    with pytest.raises(StoreError, match="keep_original"):
        store.set_served("math", kept.name)
    with pytest.raises(StoreError, match="no complete refined version"):
        store.set_served("math", "20990101T000000000000Z-deadbeef")
    empty = store.new_version_dir("math")
    with pytest.raises(StoreError, match="no complete refined version"):
        store.set_served("math", empty.name)
    assert not (store.root / "math" / SERVED_NAME).exists()


def test_served_json_pointing_at_bad_versions(tmp_path: Path, tiny_adapter: Path, original_hash: str) -> None:
    """A hand-edited or damaged served.json degrades to the original, never to an error or a bad path."""
    store = VersionStore(tmp_path / "store")
    good = fake_version(store, "math", tiny_adapter, "accept", original_hash)
    served = store.root / "math" / SERVED_NAME
    for content in (
        "{broken",
        "[]",
        json.dumps({"version": 3}),
        json.dumps({"version": "../../elsewhere"}),
        json.dumps({"version": "missing"}),
    ):
        served.write_text(content)
        assert store.served("math", original_hash) is None, content
    kept = fake_version(store, "math", tiny_adapter, "keep_original", original_hash)
    served.write_text(json.dumps({"version": kept.name}))
    assert store.served("math", original_hash) is None
    store.set_served("math", good.name)
    assert store.served("math", original_hash) == good


def test_corrupt_surgery_json_is_skipped(tmp_path: Path, tiny_adapter: Path, original_hash: str) -> None:
    store = VersionStore(tmp_path / "store")
    good = fake_version(store, "math", tiny_adapter, "accept", original_hash)
    bad = fake_version(store, "math", tiny_adapter, "accept", original_hash)
    (bad / "surgery.json").write_text("{")
    (store.root / "math" / ".tmp-in-progress").mkdir()
    assert [v.path for v in store.versions("math")] == [good]


@pytest.mark.parametrize("name", ["../x", ".hidden", "/abs", ""])
def test_store_refuses_bad_names(tmp_path: Path, name: str) -> None:
    store = VersionStore(tmp_path / "store")
    for call in (store.versions, store.new_version_dir, lambda n: store.served(n, "h")):
        with pytest.raises(InvalidAdapterName):
            call(name)
    with pytest.raises(InvalidAdapterName):
        store.set_served("math", name or "../x")
    assert not (tmp_path / "store").exists()


def leave_leftovers(store: VersionStore, name: str) -> list[Path]:
    """What a refinement killed with SIGKILL leaves: the reserved (empty) version directory and the
    hidden temporary directory save_adapter was writing into, plus a torn served.json temp file."""
    reserved = store.new_version_dir(name)
    temp_dir = reserved.parent / f".{reserved.name}.tmp-0123456789ab"
    temp_dir.mkdir()
    (temp_dir / "adapter_model.safetensors").write_bytes(b"partial")
    temp_file = reserved.parent / ".served.json.tmp-abcdef012345"
    temp_file.write_text('{"vers')
    return [reserved, temp_dir, temp_file]


def store_with_leftovers(root: Path, tiny_adapter: Path, original_hash: str) -> tuple:
    """(store, a complete version, leftovers of an interrupted write, an operator's directory without
    surgery.json) of adapter "math"."""
    store = VersionStore(root)
    complete = fake_version(store, "math", tiny_adapter, "accept", original_hash)
    leftovers = leave_leftovers(store, "math")
    operators = store.adapter_dir("math") / "copied-by-hand"
    shutil.copytree(tiny_adapter, operators)  # no surgery.json: not a version, but not ours to delete
    return store, complete, leftovers, operators


def test_leftovers_of_interrupted_writes_are_removed(
    tmp_path: Path, tiny_adapter: Path, original_hash
) -> None:
    store, complete, leftovers, operators = store_with_leftovers(
        tmp_path / "store", tiny_adapter, original_hash
    )
    assert [v.path for v in store.versions("math")] == [complete]  # never listed
    assert sorted(store.remove_leftovers()) == sorted(leftovers)
    assert not any(p.exists() for p in leftovers)
    assert complete.is_dir() and operators.is_dir()
    assert store.remove_leftovers() == []


def test_leftovers_of_a_refinement_still_running_elsewhere_are_kept(tmp_path: Path) -> None:
    store = VersionStore(tmp_path / "store")
    in_progress = leave_leftovers(store, "math")
    done = leave_leftovers(store, "code")
    with store.writer_lock("math"):  # another server sharing the store is writing "math"
        assert sorted(store.remove_leftovers()) == sorted(done)
    assert all(p.exists() for p in in_progress)
    assert sorted(store.remove_leftovers()) == sorted(in_progress)


def make_old(paths: list[Path], seconds: float) -> None:
    """Set the modification time of every path (and everything below a directory) `seconds` back."""
    when = time.time() - seconds
    for path in paths:
        below = sorted(path.rglob("*"), reverse=True) if path.is_dir() else []
        for p in [*below, path]:
            os.utime(p, (when, when), follow_symlinks=False)


def test_store_gc_deletes_leftovers_older_than_the_grace_period_only(
    tmp_path: Path, tiny_adapter: Path, original_hash
) -> None:
    store, complete, old, operators = store_with_leftovers(tmp_path / "store", tiny_adapter, original_hash)
    store.set_served("math", complete.name)
    make_old([store.adapter_dir("math")], 2 * 86400)  # everything of "math", two days ago
    fresh = leave_leftovers(store, "code")  # an interrupted write a minute ago: within the grace period
    make_old(fresh, 60)
    expected = [
        ("math", old[0].name, 0, 0),  # the reserved, empty version directory
        ("math", old[1].name, 1, len(b"partial")),
        ("math", old[2].name, 1, len('{"vers')),
    ]
    found = store.collect_garbage(86400, dry_run=True)
    assert sorted((o.name, o.entry, o.files, o.bytes) for o in found) == sorted(expected)
    assert all(p.exists() for p in old)  # a dry run deletes nothing
    found = store.collect_garbage(86400)
    assert sorted((o.name, o.entry, o.files, o.bytes) for o in found) == sorted(expected)
    assert not any(p.exists() for p in old)
    assert all(p.exists() for p in fresh)
    assert complete.is_dir() and operators.is_dir() and store.served_version_id("math") == complete.name
    assert [v.path for v in store.versions("math")] == [complete]
    assert store.collect_garbage(86400) == []
    # past the grace period, but a refinement of "code" is running (its writer lock is held): kept
    make_old(fresh, 2 * 86400)
    with store.writer_lock("code"):
        assert store.collect_garbage(86400) == []
    assert sorted(o.entry for o in store.collect_garbage(86400)) == sorted(p.name for p in fresh)
