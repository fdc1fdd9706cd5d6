"""Snapshots: what vLLM loads is a private, validated, content-addressed copy (no server).

An adapter overwritten in place while vLLM holds it memory-mapped kills the engine (SIGBUS); the slow
test in test_snapshot_server.py shows that on a real server. Here: the copy itself (content address,
atomic rename, permissions, reuse), how an in-place overwrite of the source is answered, and which
snapshots are cleaned up.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import stat
from pathlib import Path

import pytest

from vllm_surgery.adapter import load_adapter
from vllm_surgery.errors import AdapterError
from vllm_surgery.serving import validation
from vllm_surgery.serving.validation import AdapterValidator, Snapshots, snapshot_adapter
from vllm_surgery.testing import build_lora_adapter

FILES = ("adapter_config.json", "adapter_model.safetensors")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*"))


def overwrite_in_place(path: Path, data: bytes) -> None:
    """What `cp other path` does to an existing file: same inode, truncated, then written."""
    inode = path.stat().st_ino
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(data)
    assert path.stat().st_ino == inode


def test_a_snapshot_is_a_private_byte_equal_copy_at_its_content_address(tmp_path, tiny_adapter) -> None:
    parent = tmp_path / "snaps" / "x"
    snap = snapshot_adapter(tiny_adapter, parent, "original", AdapterValidator())
    # the address: 64 hex digits, the parent of the leaf "original"
    assert snap.path.name == "original" and snap.path.parent.parent == parent
    assert snap.path.parent.name == snap.digest and len(snap.digest) == 64
    int(snap.digest, 16)
    # exactly the files vLLM reads, byte for byte; nothing else of the source (README, surgery.json, ...)
    assert sorted(p.name for p in snap.path.iterdir()) == sorted(FILES)
    for name in FILES:
        assert (snap.path / name).read_bytes() == (tiny_adapter / name).read_bytes()
    assert snap.content_hash == load_adapter(tiny_adapter).content_hash()
    # private: directories 0700, files 0600; no temporary copy left
    for d in (parent, snap.path.parent, snap.path):
        assert mode(d) == 0o700, d
    for name in FILES:
        assert mode(snap.path / name) == 0o600
    assert [p.name for p in parent.iterdir()] == [snap.digest]


def test_identical_content_reuses_the_snapshot_and_other_content_gets_another(
    tmp_path, tiny_base, tiny_adapter
) -> None:
    validator = AdapterValidator()
    parent = tmp_path / "snaps" / "x"
    first = snapshot_adapter(tiny_adapter, parent, "original", validator)
    twin = shutil.copytree(tiny_adapter, tmp_path / "twin")  # same bytes, another directory
    inode = (first.path / FILES[1]).stat().st_ino
    again = snapshot_adapter(twin, parent, "original", validator)
    assert again.path == first.path and again.digest == first.digest
    assert (again.path / FILES[1]).stat().st_ino == inode  # the same files, not rewritten
    other = build_lora_adapter(tiny_base, tmp_path / "other", seed=7)
    different = snapshot_adapter(other, parent, "original", validator)
    assert different.digest != first.digest and different.path != first.path
    assert (first.path / FILES[1]).read_bytes() == (tiny_adapter / FILES[1]).read_bytes()  # untouched
    assert sorted(p.name for p in parent.iterdir()) == sorted({first.digest, different.digest})


def test_the_copy_is_validated_and_a_refused_one_leaves_nothing(tmp_path, tiny_adapter) -> None:
    source = shutil.copytree(tiny_adapter, tmp_path / "x")
    (source / FILES[1]).write_bytes(b"\x00" * 16)
    parent = tmp_path / "snaps" / "x"
    with pytest.raises(AdapterError) as e:
        snapshot_adapter(source, parent, "original", AdapterValidator())
    # the error names the operator's file, not the private copy
    assert str(source / FILES[1]) in str(e.value) and "cannot be read as safetensors" in str(e.value)
    assert ".tmp-" not in str(e.value)
    assert files_under(parent) == []


def test_the_directory_is_renamed_into_place_complete(tmp_path, tiny_adapter, monkeypatch) -> None:
    """Atomic: when the snapshot's name appears, every file is in it, validated; before, it does not exist."""
    seen = []
    real_rename = os.rename

    def rename(src, dst):
        src, dst = Path(src), Path(dst)
        seen.append((src.name.startswith(".tmp-"), dst.exists(), sorted(p.name for p in src.iterdir())))
        real_rename(src, dst)

    monkeypatch.setattr(validation.os, "rename", rename)
    snap = snapshot_adapter(tiny_adapter, tmp_path / "snaps" / "x", "original", AdapterValidator())
    assert seen == [(True, False, sorted(FILES))]
    assert snap.path.is_dir()


def test_a_copy_interrupted_half_way_leaves_nothing(tmp_path, tiny_adapter, monkeypatch) -> None:
    calls = []
    real_copy = validation._copy_file

    def copy_then_fail(source, target, digest):
        calls.append(source.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_copy(source, target, digest)

    monkeypatch.setattr(validation, "_copy_file", copy_then_fail)
    parent = tmp_path / "snaps" / "x"
    with pytest.raises(OSError, match="No space left"):
        snapshot_adapter(tiny_adapter, parent, "original", AdapterValidator())
    assert calls == list(FILES) and files_under(parent) == []


def test_an_adapter_overwritten_in_place_keeps_its_snapshot_intact(tmp_path, tiny_base, tiny_adapter) -> None:
    """The finding: `cp broken.safetensors x/adapter_model.safetensors` while x is served. The snapshot
    vLLM loaded is another inode and keeps its bytes; the next snapshot of the broken source is refused
    naming the file; valid new weights get a new snapshot."""
    source = shutil.copytree(tiny_adapter, tmp_path / "adapters" / "x")
    good_bytes = (source / FILES[1]).read_bytes()
    snaps = Snapshots(tmp_path / "snapshots", AdapterValidator(), grace_s=3600)
    first = snaps.take("x", "original", source)
    overwrite_in_place(source / FILES[1], b"garbage" * 10)
    assert (first.path / FILES[1]).read_bytes() == good_bytes
    with pytest.raises(AdapterError) as e:
        snaps.take("x", "original", source)  # same inode, new ctime: copied again, and refused
    assert str(source / FILES[1]) in str(e.value)
    other = build_lora_adapter(tiny_base, tmp_path / "other", seed=9)
    overwrite_in_place(source / FILES[1], (other / FILES[1]).read_bytes())  # legitimately new weights
    second = snaps.take("x", "original", source)
    assert second.path != first.path and second.content_hash == load_adapter(other).content_hash()
    assert (first.path / FILES[1]).read_bytes() == good_bytes  # the old one is still there for vLLM


def test_an_unchanged_source_is_not_copied_again(tmp_path, tiny_adapter, monkeypatch) -> None:
    snaps = Snapshots(tmp_path / "snapshots", AdapterValidator(), grace_s=3600)
    first = snaps.take("x", "original", tiny_adapter)
    copies = []
    real = validation.snapshot_adapter
    monkeypatch.setattr(validation, "snapshot_adapter", lambda *a: copies.append(a) or real(*a))
    assert snaps.take("x", "original", tiny_adapter) == first
    assert copies == []
    # a version of the same content is another leaf (the path says which version it holds)
    version = snaps.take("x", "v1", tiny_adapter)
    assert version.path == first.path.parent / "v1" and len(copies) == 1
    assert snaps.locate(version.path) == ("x", "v1") and snaps.locate(first.path) == ("x", "original")
    assert snaps.locate(tiny_adapter) is None


def test_cleanup_keeps_what_is_served_and_what_is_recent(tmp_path, tiny_adapter) -> None:
    snaps = Snapshots(tmp_path / "snapshots", AdapterValidator(), grace_s=100)
    served = snaps.take("x", "original", tiny_adapter)
    old = snaps.take("x", "v1", tiny_adapter)
    recent = snaps.take("x", "v2", tiny_adapter)
    snaps.in_use = lambda: {str(served.path)}
    now = snaps._last_used[recent.path]
    snaps._last_used[served.path] = snaps._last_used[old.path] = now - 1000  # long unused
    assert snaps.cleanup(now=now + 50) == [old.path]
    assert served.path.is_dir() and recent.path.is_dir() and not old.path.exists()
    assert snaps.cleanup(now=now + 500) == [recent.path]
    assert served.path.is_dir()  # served: never removed, however old
    # a removed snapshot is taken again (copied) when asked for
    again = snaps.take("x", "v1", tiny_adapter)
    assert again.path == old.path and (again.path / FILES[1]).is_file()


def test_a_gone_servers_snapshots_are_removed_a_live_ones_kept(tmp_path, tiny_adapter) -> None:
    root = tmp_path / "snapshots"
    root.mkdir()
    for server in ("dead", "alive"):
        (root / server / "x").mkdir(parents=True)
        (root / f"{server}.lock").touch()
    held = os.open(root / "alive.lock", os.O_RDWR)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # a server still running holds its lock
        snaps = Snapshots(root, AdapterValidator(), grace_s=100)
        own = snaps.take("x", "original", tiny_adapter).path.parents[2]
        assert not (root / "dead").exists() and not (root / "dead.lock").exists()
        assert (root / "alive" / "x").is_dir()
        assert sorted(p.name for p in root.iterdir()) == sorted(
            ["alive", "alive.lock", own.name, f"{own.name}.lock"]
        )
        assert mode(own) == 0o700  # (the root was made by this test; a new one is 0700 too)
    finally:
        os.close(held)


def test_snapshot_digest_covers_file_names_and_bytes(tmp_path, tiny_adapter) -> None:
    """The address changes with one byte of the weights (not only with what validation reads)."""
    a = snapshot_adapter(tiny_adapter, tmp_path / "a", "original", AdapterValidator())
    changed = shutil.copytree(tiny_adapter, tmp_path / "changed")
    config = (changed / FILES[0]).read_text()
    (changed / FILES[0]).write_text(config + "\n")  # same JSON, one more byte
    b = snapshot_adapter(changed, tmp_path / "a", "original", AdapterValidator())
    assert a.digest != b.digest and a.content_hash == b.content_hash
    assert a.digest != hashlib.sha256((tiny_adapter / FILES[1]).read_bytes()).hexdigest()


def test_the_validator_never_reads_weights_in_place_outside_snapshots(
    tmp_path, tiny_adapter, monkeypatch
) -> None:
    """safetensors memory-maps what it reads: the listing's and start-up's checks of an operator's
    directory read a private temporary copy, and their errors still name the operator's file."""
    read = []
    real = validation.load_adapter
    monkeypatch.setattr(validation, "load_adapter", lambda p: read.append(Path(p)) or real(p))
    validator = AdapterValidator()
    source = shutil.copytree(tiny_adapter, tmp_path / "x")
    assert validator.validate(source) == load_adapter(tiny_adapter).content_hash()
    assert read and source not in read and all(p.name == "adapter" for p in read), read
    assert not any(p.exists() for p in read)  # the temporary copy is gone
    overwrite = source / FILES[1]
    overwrite.write_bytes(b"\x00" * 16)
    with pytest.raises(AdapterError) as e:
        validator.validate(source)
    assert str(overwrite) in str(e.value) and "cannot be read as safetensors" in str(e.value)
    (source / FILES[1]).unlink()
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: missing"):
        validator.validate(source)  # said by load_adapter on the source: no weights to map
    # a snapshot (a private copy nobody writes) is read in place
    snaps = Snapshots(tmp_path / "snapshots", validator, grace_s=100)
    read.clear()
    snap = snaps.take("t", "original", tiny_adapter)
    validator.configure(validation.ServingLimits())  # forget the cached verdicts
    read.clear()
    validator.validate(snap.path)
    assert read == [snap.path]
