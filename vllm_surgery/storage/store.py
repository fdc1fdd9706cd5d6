"""The store of refined adapter versions, one directory tree on local disk.

Layout::

    <store>/<adapter name>/<version id>/   a complete PEFT adapter written by refine(), with surgery.json
    <store>/<adapter name>/served.json     {"version": "<version id>"}: the accepted version to serve
    <store>/<adapter name>/.outcomes/<key>.json   a remembered refinement that wrote no version
                                           (decision keep_original), so the same request is not rerun

Every refinement has a key (`version_key`): SHA-256 over what determines its result, i.e. the
original adapter's content hash, the base model identity (the server's --model string), the
result-affecting SurgeryConfig fields (`KEY_CONFIG_FIELDS`) and the calibration data's SHA-256. A
version's key is computed from its own surgery.json (which records all of these), so versions written
by the CLI into the store are found too, and nothing is ever added to a finished version directory.

A version directory is never modified after refine() renamed it into place: vLLM's prefix cache keys
LoRA requests by (name, path), so new weights always get a new directory. served.json is replaced
atomically, so a resolver reads either the old or the new choice, never a torn file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapter import PROVENANCE_NAME
from ..config import SurgeryConfig
from ..errors import SurgeryError
from ..names import path_under

# Under vLLM's logger tree, like every module of the plugin: a plain package logger has no handler in
# the server process, and its warnings (a corrupt served.json, say) would never reach the server log.
log = logging.getLogger(f"vllm.{__name__}")

SERVED_NAME = "served.json"
OUTCOMES_DIR = ".outcomes"
LOCK_NAME = ".writer.lock"
# Temporary names of save_adapter (".<version>.tmp-<12 hex>", a directory) and of _atomic_write
# (".<file>.tmp-<12 hex>", a file): what a process killed while writing leaves behind.
_TEMP_NAME = re.compile(r"\..+\.tmp-[0-9a-f]{12}")
# SurgeryConfig fields that change what refine() computes, as the config declares them (field metadata
# affects_result). device, max_batch_tokens and progress only change how fast (and, for device, float
# rounding); force only changes whether a losing candidate is written, which lookups handle separately
# (a remembered keep_original does not answer a forced request).
KEY_CONFIG_FIELDS = SurgeryConfig.result_fields()
# 2: min_z was replaced by max_false_accept (the gate's statistics changed, so old results do not answer).
# 3: the gate's statistic became a setting (gate_statistic) whose default, signed ranks, decides some
#    candidates differently from the loss differences before it.
KEY_VERSION = 3
# Decisions under which refine() wrote a version that may be served ("keep_original" writes nothing).
SERVABLE_DECISIONS = frozenset({"accept", "forced"})


def version_key(
    adapter_hash: str, base_model: str, config: Mapping[str, Any], calibration_sha256: str
) -> str:
    """The store key of a refinement: equal keys mean refine() would produce the same result.

    `config` is a SurgeryConfig.to_dict() (or the "config" of a surgery.json); only KEY_CONFIG_FIELDS
    are used. Values are normalised through JSON (tuples become lists), as surgery.json stores them.
    """
    missing = [f for f in KEY_CONFIG_FIELDS if f not in config]
    if missing:
        raise StoreError(f"config lacks field(s) {missing} needed for the store key")
    record = {
        "key_version": KEY_VERSION,
        "adapter_hash": adapter_hash,
        "base_model": str(base_model),
        "config": {f: config[f] for f in KEY_CONFIG_FIELDS},
        "calibration_sha256": calibration_sha256,
    }
    text = json.dumps(json.loads(json.dumps(record, default=str)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def key_of_record(record: Mapping[str, Any]) -> str | None:
    """The key of a surgery.json record, or None if it lacks what the key needs."""
    try:
        calibration = record["calibration"]
        return version_key(
            record["adapter_hash"], record["base_model"], record["config"], calibration["sha256"]
        )
    except (KeyError, TypeError, StoreError):
        return None


class StoreError(SurgeryError, ValueError):
    """A store operation that cannot be done as asked (unknown version, unservable decision, ...)."""


@dataclass(frozen=True)
class VersionInfo:
    """One refined version as recorded by its surgery.json."""

    name: str
    version_id: str
    path: Path
    decision: str | None
    adapter_hash: str | None
    key: str | None = None
    record: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def servable(self) -> bool:
        return self.decision in SERVABLE_DECISIONS and bool(self.adapter_hash)


@dataclass(frozen=True)
class Orphan:
    """What an interrupted write left in a store (`VersionStore.collect_garbage`): a version directory
    that never became a version (object storage: files without manifest.json; a directory: an empty
    reserved version directory, or a hidden temporary file or directory of an atomic write)."""

    name: str  # the adapter
    entry: str  # the version id, or the temporary entry's name (under .outcomes/ for outcomes)
    files: int
    bytes: int
    newest: float  # when its newest file was written (epoch seconds)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class StoreUnavailable(StoreError):
    """The store's backend (object storage) cannot be reached or answered an error: nothing was
    changed, and a version that is not in this machine's cache cannot be served until it answers."""


class VersionStore:
    """Refined versions of named adapters under one root directory (created on first write).

    `ObjectVersionStore` (storage.objstore) is the same interface over object storage; the methods
    `fetch`, `cached` and `publish` are what differ: here a version's directory is already local.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()
        # (name, version id) pairs a server serves now, set by the server: an object store's cache
        # never evicts them (a local store keeps every version anyway).
        self.in_use: Callable[[], set[tuple[str, str]]] | None = None

    @property
    def location(self) -> str:
        """What messages call this store: its directory (or an object store's URL)."""
        return str(self.root)

    def fetch(self, name: str, version_id: str) -> tuple[Path, str | None]:
        """(local directory of the version, how it got there): here the store's own directory, and
        None (nothing was fetched). An object store answers its verified local copy and "hit" or
        "fetched". Raises ValueError for an invalid id."""
        return self.version_dir(name, version_id), None

    def cached(self, name: str, version_id: str) -> bool:
        """Whether the version's files are on this machine (always, for a local directory)."""
        return True

    def publish(self, name: str, path: Path) -> None:
        """Make the version refine() wrote into `path` (from `new_version_dir`) visible to readers:
        here it already is (refine renamed it into place). An object store uploads it."""

    def adapter_dir(self, name: str) -> Path:
        """`<store>/<name>`, validated: the name comes from requests and must stay inside the store."""
        return path_under(self.root, name)

    def version_dir(self, name: str, version_id: str) -> Path:
        return path_under(self.adapter_dir(name), version_id)

    def versions(self, name: str) -> list[VersionInfo]:
        """Complete versions of `name`, oldest first (version ids sort by creation time).

        In-progress or abandoned directories (refine()'s hidden temp dirs, an empty reserved dir, one
        without a readable surgery.json) are skipped: they are not versions yet.
        """
        base = self.adapter_dir(name)
        if not base.is_dir():
            return []
        out: list[VersionInfo] = []
        for entry in sorted(base.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            info = self._read_version(name, entry)
            if info is not None:
                out.append(info)
        return out

    def _read_version(self, name: str, path: Path) -> VersionInfo | None:
        try:
            record: Any = json.loads((path / PROVENANCE_NAME).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("refined version %s: unreadable %s (%s); ignored", path, PROVENANCE_NAME, e)
            return None
        if not isinstance(record, dict):
            log.warning("refined version %s: %s is not a JSON object; ignored", path, PROVENANCE_NAME)
            return None
        decision, adapter_hash = record.get("decision"), record.get("adapter_hash")
        return VersionInfo(
            name=name,
            version_id=path.name,
            path=path,
            decision=decision if isinstance(decision, str) else None,
            adapter_hash=adapter_hash if isinstance(adapter_hash, str) else None,
            key=key_of_record(record),
            record=record,
        )

    def served_version_id(self, name: str) -> str | None:
        """The version id recorded in served.json, or None when none is recorded (or it is unreadable)."""
        path = self.adapter_dir(name) / SERVED_NAME
        try:
            record: Any = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable (%s); serving the original adapter", path, e)
            return None
        version = record.get("version") if isinstance(record, dict) else None
        if not isinstance(version, str):
            log.warning("%s: no 'version' string; serving the original adapter", path)
            return None
        return version

    def served(self, name: str, adapter_hash: str) -> Path | None:
        """The directory of the version to serve for `name`, or None to serve the original.

        Only a version refined from exactly this original content qualifies: when the operator
        replaces the original adapter, its old refined versions go stale and are ignored here,
        rather than silently serving a refinement of weights that are no longer deployed.
        (An object store answers its local cache directory, which `fetch` fills.)
        """
        version_id = self.served_version_id(name)
        if version_id is None:
            return None
        try:
            info = self.version_info(name, version_id)
        except StoreUnavailable:
            raise
        except ValueError as e:
            log.warning(
                "store %s: served version of %r is invalid (%s); serving the original", self.location, name, e
            )
            return None
        if info is None:
            log.warning(
                "store: served version %s of %r is missing or incomplete; serving the original",
                version_id,
                name,
            )
            return None
        if not info.servable:
            log.warning(
                "store: served version %s of %r has decision %r; serving the original",
                version_id,
                name,
                info.decision,
            )
            return None
        if info.adapter_hash != adapter_hash:
            log.info(
                "store: served version %s of %r was refined from other adapter content (stale); "
                "serving the original",
                version_id,
                name,
            )
            return None
        return info.path

    def version_info(self, name: str, version_id: str) -> VersionInfo | None:
        """The complete version `version_id` of `name`, or None if there is none (invalid ids raise)."""
        path = self.version_dir(name, version_id)
        return self._read_version(name, path) if path.is_dir() else None

    def clear_served(self, name: str) -> bool:
        """Forget the served choice of `name` (the original is served again); True if one was recorded."""
        target = self.adapter_dir(name) / SERVED_NAME
        try:
            target.unlink()
        except FileNotFoundError:
            return False
        return True

    def set_served(self, name: str, version_id: str) -> Path:
        """Record `version_id` as the version to serve for `name` (atomically); returns served.json.

        Only complete versions with a servable decision can be chosen. Already-resolved names keep
        what they were resolved to until the server restarts (vLLM caches resolutions by name).
        """
        info = self.version_info(name, version_id)
        where = f"{self.location}: {name}/{version_id}"
        if info is None:
            raise StoreError(f"{where}: no complete refined version (missing directory or {PROVENANCE_NAME})")
        if not info.servable:
            raise StoreError(
                f"{where}: decision {info.decision!r} with adapter_hash {info.adapter_hash!r} cannot be "
                f"served; only {sorted(SERVABLE_DECISIONS)} versions with a hash can"
            )
        record = {"version": version_id, "adapter_hash": info.adapter_hash, "set_at": time.time()}
        return self._write_served(name, json.dumps(record, indent=2) + "\n")

    def _write_served(self, name: str, text: str) -> Path:
        target = self.adapter_dir(name) / SERVED_NAME
        _atomic_write(target, text)
        return target

    def find(self, name: str, key: str) -> Path | None:
        """The newest complete, servable version of `name` with store key `key`, or None."""
        for info in reversed(self.versions(name)):
            if info.key == key and info.servable:
                return info.path
        return None

    def lookup(self, name: str, key: str) -> dict[str, Any] | None:
        """The answer the store holds for refinement `key` of `name` (`stored_answer`): an accepted
        version, or a remembered or forced outcome (which a job would have kept as the original);
        None when it was not computed yet."""
        matches = [v for v in self.versions(name) if v.key == key and v.servable]
        accepted = [v for v in matches if v.decision == "accept"]
        info: VersionInfo | None = (accepted or matches or [None])[-1]
        if info is not None:
            record = dict(info.record or {})
            if info.decision != "accept":  # forced: the gate did not accept it, so a job keeps the original
                return stored_answer(record, "keep_original", None)
            return stored_answer(record, "accept", info.version_id)
        remembered = self.recall(name, key)
        return stored_answer(remembered, "keep_original", None) if remembered is not None else None

    def _outcome_path(self, name: str, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise StoreError(f"invalid store key {key!r}")
        return self.adapter_dir(name) / OUTCOMES_DIR / f"{key}.json"

    def remember(self, name: str, key: str, record: Mapping[str, Any]) -> Path:
        """Remember a refinement that wrote no version (keep_original) under its key; atomic."""
        path = self._outcome_path(name, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, json.dumps({**record, "key": key}, indent=2, default=str) + "\n")
        return path

    def recall(self, name: str, key: str) -> dict[str, Any] | None:
        """A remembered outcome for `key` (see remember), or None."""
        path = self._outcome_path(name, key)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable (%s); ignored", path, e)
            return None
        return record if isinstance(record, dict) and record.get("key") == key else None

    @contextlib.contextmanager
    def writer_lock(self, name: str) -> Iterator[None]:
        """Hold the exclusive writer lock of adapter `name` (blocking) while writing a new version.

        A lock held by a process that dies is released by the kernel, so start-up cleaning
        (`remove_leftovers`) can tell an interrupted write from one still running in another server
        that shares this store.
        """
        base = self.adapter_dir(name)
        base.mkdir(parents=True, exist_ok=True)
        fd = os.open(base / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def remove_leftovers(self) -> list[Path]:
        """Delete what interrupted writes left (blocking; run at server start); returns what was removed.

        Removed: empty version directories (reserved by `new_version_dir`, never filled) and hidden
        temporary files and directories of atomic writes. Nothing else: a non-empty directory without
        surgery.json may be an operator's and is only skipped by listings. Adapters whose writer lock is
        held (a refinement running in another server sharing the store) are left alone.
        """
        removed: list[Path] = []
        for base in self._idle_adapters("cleaned"):
            removed.extend(self._remove_leftovers_in(base))
        return removed

    def _idle_adapters(self, what: str) -> Iterator[Path]:
        """Each adapter directory whose writer lock is free, holding that lock while the caller works
        on it (so no refinement starts writing there meanwhile); one being written by another process
        is skipped, and logged as not `what`."""
        if not self.root.is_dir():
            return
        for base in sorted(self.root.iterdir()):
            if base.name.startswith(".") or not base.is_dir() or base.is_symlink():
                continue
            fd = os.open(base / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    log.info("store: %s is being written by another process; not %s", base, what)
                    continue
                yield base
            finally:
                os.close(fd)

    def _remove_leftovers_in(self, base: Path) -> list[Path]:
        return _remove_leftovers_in(base)

    def collect_garbage(
        self, grace_s: float, now: float | None = None, dry_run: bool = False
    ) -> list[Orphan]:
        """Delete what interrupted writes left (`remove_leftovers`' kinds: empty reserved version
        directories, hidden temporary entries) whose newest file is older than `grace_s` seconds, in
        adapters whose writer lock is free (a refinement in progress holds it, so nothing it is writing
        is touched); with `dry_run`, only say what would go. Complete versions, served.json and
        non-empty directories without surgery.json (perhaps an operator's) are never touched. Returns
        what was (or would be) deleted. Unlike `remove_leftovers` (server start) it can run at any time,
        e.g. `vllm-surgery store gc`."""
        cutoff = (time.time() if now is None else now) - grace_s
        found: list[Orphan] = []
        for base in self._idle_adapters("collected"):
            for entry in _leftovers(base):
                files, size, newest = _extent(entry)
                if newest < cutoff and (dry_run or _try_remove(entry)):
                    found.append(Orphan(base.name, entry.relative_to(base).as_posix(), files, size, newest))
        return found

    def new_version_dir(self, name: str) -> Path:
        """Reserve a fresh, empty version directory for refine() to write into.

        The id sorts by creation time (UTC, microseconds) and has a random suffix; the directory is
        created here with exist_ok=False, so two writers can never be handed the same one.
        """
        base = self.adapter_dir(name)
        base.mkdir(parents=True, exist_ok=True)
        while True:
            now_us = time.time_ns() // 1000
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now_us // 1_000_000))
            version_id = f"{stamp}{now_us % 1_000_000:06d}Z-{secrets.token_hex(4)}"
            path = path_under(base, version_id)
            try:
                path.mkdir()
            except FileExistsError:
                continue
            return path


def _quality(q: Any) -> dict[str, Any] | None:
    if q is None:
        return None
    return q if isinstance(q, dict) else q.to_dict()


def stored_answer(record: Mapping[str, Any], decision: str | None, version: str | None) -> dict[str, Any]:
    """A refinement's figures from its surgery.json (or a remembered outcome), shaped for answers."""
    return {
        "decision": decision,
        "reason": record.get("reason"),
        "policy": record.get("policy"),
        "quality_before": _quality(record.get("quality_before")),
        "quality_after": _quality(record.get("quality_after")),
        "version": version,
        "timings": record.get("timings") or {},
    }


def _leftovers(base: Path, incomplete: Callable[[Path], bool] | None = None) -> list[Path]:
    """The leftovers of interrupted writes in the adapter directory `base` (see remove_leftovers):
    hidden temporary entries there and in its outcomes directory, and empty version directories;
    `incomplete(entry)`: a version directory that counts as one too."""
    found = []
    for parent in (base, base / OUTCOMES_DIR):
        if not parent.is_dir():
            continue
        for entry in sorted(parent.iterdir()):
            if _TEMP_NAME.fullmatch(entry.name) is not None or (
                parent == base
                and not entry.name.startswith(".")
                and entry.is_dir()
                and not entry.is_symlink()
                and (not any(entry.iterdir()) or (incomplete is not None and incomplete(entry)))
            ):
                found.append(entry)
    return found


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()


def _extent(entry: Path) -> tuple[int, int, float]:
    """(files, bytes, newest modification time) of a file or a directory tree (the directories' own
    times count: an empty reserved version directory is as old as its creation)."""
    stat = entry.lstat()
    files, size, newest = (0, 0, stat.st_mtime) if entry.is_dir() else (1, stat.st_size, stat.st_mtime)
    if entry.is_dir() and not entry.is_symlink():
        for top, dirs, names in os.walk(entry):
            for d in dirs:
                newest = max(newest, (Path(top) / d).lstat().st_mtime)
            for n in names:
                st = (Path(top) / n).lstat()
                files, size, newest = files + 1, size + st.st_size, max(newest, st.st_mtime)
    return files, size, newest


def _remove_leftovers_in(base: Path, incomplete: Callable[[Path], bool] | None = None) -> list[Path]:
    """Remove the leftovers of interrupted writes in the adapter directory `base` (`_leftovers`)."""
    return [entry for entry in _leftovers(base, incomplete) if _try_remove(entry)]


def _try_remove(entry: Path) -> bool:
    """Remove one leftover of an interrupted write; False (logged) when it cannot be removed."""
    try:
        _remove(entry)
    except OSError as e:
        log.error("store: cannot remove %s, left by an interrupted write: %s", entry, e)
        return False
    log.warning("store: removed %s, left by an interrupted write (a killed refinement?)", entry)
    return True


def _atomic_write(target: Path, text: str) -> None:
    """Write via a temp file in the same directory, fsync, then os.replace: readers never see a torn file."""
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
