"""The refined-version store on object storage (``VLLM_SURGERY_STORE=s3://bucket/prefix``), through fsspec.

Remote layout (one prefix per adapter, as in the local store)::

    <url>/<name>/<version id>/<adapter files>   uploaded first (adapter_config.json, weights, surgery.json)
    <url>/<name>/<version id>/manifest.json     uploaded LAST: {"files": {file: {"sha256", "size"}},
                                                "record": <surgery.json>}; a version without it does
                                                not exist for readers; one without it for longer
                                                than the grace period is deleted by `collect_garbage`
    <url>/<name>/served.json                    {"version": ...}, one PUT (atomic on S3)
    <url>/<name>/.outcomes/<key>.json           remembered refinements that wrote no version

Why a separate manifest rather than hashes inside surgery.json: surgery.json is one of the files the
manifest covers (a file cannot carry its own hash), refine() writes it identically for local stores
and the CLI, and the manifest's presence is the one commit point of an upload. It carries the
surgery.json record, so listing versions reads one small object per version (and each only once:
versions are immutable, so a manifest read is kept for the life of the process).

Every machine keeps a local cache of the versions it used: ``<cache dir>/<sha256 of the URL>[:16]/
<name>/<version id>/``, written into a hidden temporary directory, every file's size and SHA-256
checked against the manifest, the manifest copied last, then renamed into place; a directory without
manifest.json is never read. The cache is bounded in bytes: least recently used versions are evicted,
never one that `in_use` names (the versions this server serves). This cache is the source that the
server's snapshots (serving.validation) copy and validate; vLLM still only sees a snapshot.

A writer (the worker) gets a new version directory inside its own cache (`new_version_dir`), refine()
renames the finished version there, and `publish` uploads the files, then the manifest, then marks
the cache copy complete. Originals stay in local adapter roots.

fsspec and s3fs are imported only when such a store is opened (the ``s3`` extra). Credentials and the
endpoint are read the standard way by botocore (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL, AWS_MAX_ATTEMPTS, ~/.aws/...) and by fsspec (FSSPEC_S3_* variables).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..adapter import PROVENANCE_NAME, fsync_dir
from ..names import InvalidAdapterName, validate_adapter_name
from .store import (
    OUTCOMES_DIR,
    SERVED_NAME,
    Orphan,
    StoreError,
    StoreUnavailable,
    VersionInfo,
    VersionStore,
    _remove_leftovers_in,
    key_of_record,
)

log = logging.getLogger(f"vllm.{__name__}")

MANIFEST_NAME = "manifest.json"
# An upload that has taken longer than this is not committed (no manifest: `publish` raises), so that
# `collect_garbage`, which deletes only files without a manifest older than its grace period (at least
# twice this: VLLM_SURGERY_STORE_GC_GRACE_HOURS), can never delete the files of an upload that may still
# commit. The margin covers clock differences between the writer and the object store's servers.
UPLOAD_LIMIT_S = 6 * 3600.0
MANIFEST_FORMAT = 1
INSTALL_S3 = "pip install 'vllm-surgery[s3]'"
_CHUNK = 1 << 20
# What the cache may hold beyond its bound: the version just fetched or published, and those in use.
CACHE_LOCK = ".cache.lock"


def _sha256_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _touch(manifest: Path) -> None:
    """Record a use of a cached version: its manifest's mtime, from the precise clock (a file system's
    own timestamps are coarse: two uses a few milliseconds apart would look simultaneous)."""
    now = time.time_ns()
    os.utime(manifest, ns=(now, now))


def _modified(info: dict[str, Any]) -> float:
    """An object's modification time (epoch seconds) from an fsspec listing entry (s3fs: LastModified,
    a datetime; others: mtime or created as numbers or datetimes). Raises StoreError when it has none:
    an object of unknown age is never deleted."""
    for key in ("LastModified", "mtime", "last_modified", "created"):
        value = info.get(key)
        if value is not None:
            return value.timestamp() if hasattr(value, "timestamp") else float(value)
    raise StoreError(f"{info.get('name')}: the store gives no modification time; cannot tell its age")


def open_filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of a store URL. Raises StoreError naming the package to
    install when fsspec or the protocol's package (s3fs) is missing."""
    try:
        import fsspec
    except ImportError as e:
        raise StoreError(
            f"store {url}: object storage needs fsspec and s3fs ({e}); install: {INSTALL_S3}"
        ) from e
    try:
        # A private instance: fsspec would otherwise share one per argument set, with the endpoint and
        # credentials botocore read when the first one was made.
        fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True)
    except ImportError as e:
        raise StoreError(
            f"store {url}: the package for this protocol is not installed ({e}); for s3://: {INSTALL_S3}"
        ) from e
    except (ValueError, TypeError) as e:
        raise StoreError(f"store {url}: not a usable object-storage URL ({e})") from e
    path = path.rstrip("/")
    if not path:
        raise StoreError(f"store {url}: name a bucket (s3://bucket or s3://bucket/prefix)")
    return fs, path


class ObjectVersionStore(VersionStore):
    """`VersionStore` over an fsspec URL with a bounded, content-checked local cache (module docstring).

    `root`, `adapter_dir` and `version_dir` are the local cache's, so the server's containment checks
    and snapshots work on local files exactly as with a local store.
    """

    def __init__(self, url: str, cache_dir: Path, cache_max_bytes: int) -> None:
        self.url = url.strip().rstrip("/")
        self.fs, self.base = open_filesystem(self.url)
        digest = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        super().__init__(Path(cache_dir).expanduser() / digest)
        self.cache_max_bytes = int(cache_max_bytes)
        self.upload_limit_s = UPLOAD_LIMIT_S  # longer uploads are not committed (UPLOAD_LIMIT_S)
        self._manifests: dict[tuple[str, str], dict[str, Any]] = {}
        self._mutex = threading.Lock()

    @property
    def location(self) -> str:
        return self.url

    # ---------------------------------------------------------------- remote access
    def _remote(self, name: str, *parts: str) -> str:
        """The store path of `name` (a validated adapter name: it comes from requests) and `parts`."""
        validate_adapter_name(name)
        return "/".join((self.base, name, *parts))

    def _unavailable(self, what: str, e: BaseException) -> StoreUnavailable:
        return StoreUnavailable(
            f"object store {self.url} unavailable: {what} failed ({type(e).__name__}: {e}); nothing was "
            "changed, the version served before keeps serving, and only versions already in this "
            f"machine's cache ({self.root}) can be served until it answers"
        )

    def _cat_json(self, *parts: str) -> Any | None:
        """The JSON object at `parts`, or None when there is none. Raises StoreUnavailable."""
        path = self._remote(*parts)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        except Exception as e:  # botocore/aiohttp errors: not one base class
            raise self._unavailable(f"reading {path}", e) from e
        try:
            return json.loads(data)
        except ValueError as e:
            log.warning("store %s: %s is not JSON (%s); ignored", self.url, path, e)
            return None

    def _put(self, data: bytes, *parts: str) -> None:
        path = self._remote(*parts)
        try:
            self.fs.pipe_file(path, data)
        except Exception as e:
            raise self._unavailable(f"writing {path}", e) from e

    # ---------------------------------------------------------------- versions
    def _info(self, name: str, version_id: str, manifest: dict[str, Any]) -> VersionInfo | None:
        record = manifest.get("record")
        files = manifest.get("files")
        if not isinstance(record, dict) or not isinstance(files, dict) or PROVENANCE_NAME not in files:
            log.warning(
                "store %s: %s/%s has a malformed %s; ignored", self.url, name, version_id, MANIFEST_NAME
            )
            return None
        decision, adapter_hash = record.get("decision"), record.get("adapter_hash")
        return VersionInfo(
            name=name,
            version_id=version_id,
            path=self.version_dir(name, version_id),
            decision=decision if isinstance(decision, str) else None,
            adapter_hash=adapter_hash if isinstance(adapter_hash, str) else None,
            key=key_of_record(record),
            record=record,
        )

    def _manifest(self, name: str, version_id: str) -> dict[str, Any] | None:
        """The manifest of a version: remembered, else the local cache's copy, else the store's."""
        key = (name, version_id)
        with self._mutex:
            known = self._manifests.get(key)
        if known is not None:
            return known
        local = self.version_dir(name, version_id) / MANIFEST_NAME
        try:
            manifest = json.loads(local.read_text(encoding="utf-8"))
        except FileNotFoundError:
            manifest = self._cat_json(name, version_id, MANIFEST_NAME)
        except (OSError, ValueError) as e:
            log.warning("cache %s: unreadable (%s); reading the store's", local, e)
            manifest = self._cat_json(name, version_id, MANIFEST_NAME)
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            return None
        with self._mutex:
            self._manifests[key] = manifest
        return manifest

    def version_info(self, name: str, version_id: str) -> VersionInfo | None:
        """The complete version (its manifest exists), or None. Raises ValueError for an invalid id,
        StoreUnavailable when the store cannot be read and the version is not cached."""
        self.version_dir(name, version_id)  # validates the id
        manifest = self._manifest(name, version_id)
        return self._info(name, version_id, manifest) if manifest is not None else None

    def versions(self, name: str) -> list[VersionInfo]:
        """Complete versions of `name`, oldest first, from their manifests only (no adapter file is
        read). With the store unreachable: the versions in the local cache, logged."""
        base = self.adapter_dir(name)
        try:
            self.fs.invalidate_cache(self._remote(name))
            entries = self.fs.ls(self._remote(name), detail=True)
            ids = sorted(
                e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory"
            )
        except FileNotFoundError:
            ids = []
        except Exception as e:
            log.error(
                "%s; listing the cached versions of %r only", self._unavailable(f"listing {name}", e), name
            )
            ids = (
                sorted(p.name for p in base.iterdir() if (p / MANIFEST_NAME).is_file())
                if base.is_dir()
                else []
            )
        out = []
        for version_id in ids:
            if version_id.startswith("."):
                continue
            try:
                validate_adapter_name(version_id)
                info = self.version_info(name, version_id)
            except InvalidAdapterName:
                continue
            except StoreUnavailable as e:
                log.error("%s", e)
                continue
            if info is not None:
                out.append(info)
        return out

    # ---------------------------------------------------------------- served.json and outcomes
    def served_version_id(self, name: str) -> str | None:
        """The version recorded in the store's served.json, or None. Raises StoreUnavailable."""
        record = self._cat_json(name, SERVED_NAME)
        version = record.get("version") if isinstance(record, dict) else None
        if record is not None and not isinstance(version, str):
            log.warning(
                "store %s: %s/%s has no 'version' string; serving the original", self.url, name, SERVED_NAME
            )
        return version if isinstance(version, str) else None

    def _write_served(self, name: str, text: str) -> Path:
        self._put(text.encode(), name, SERVED_NAME)
        return Path(self._remote(name, SERVED_NAME))

    def clear_served(self, name: str) -> bool:
        path = self._remote(name, SERVED_NAME)
        try:
            self.fs.invalidate_cache(path)
            if not self.fs.exists(path):
                return False
            self.fs.rm_file(path)
        except Exception as e:
            raise self._unavailable(f"deleting {path}", e) from e
        return True

    def remember(self, name: str, key: str, record: Any) -> Path:
        self._outcome_path(name, key)  # validates the key
        self._put(
            (json.dumps({**record, "key": key}, indent=2, default=str) + "\n").encode(),
            name,
            OUTCOMES_DIR,
            f"{key}.json",
        )
        return Path(self._remote(name, OUTCOMES_DIR, f"{key}.json"))

    def recall(self, name: str, key: str) -> dict[str, Any] | None:
        self._outcome_path(name, key)
        record = self._cat_json(name, OUTCOMES_DIR, f"{key}.json")
        return record if isinstance(record, dict) and record.get("key") == key else None

    # ---------------------------------------------------------------- the local cache
    @contextlib.contextmanager
    def _cache_lock(self) -> Iterator[None]:
        """Exclusive among the processes sharing this cache directory (renames and evictions)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / CACHE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def cached(self, name: str, version_id: str) -> bool:
        return (self.version_dir(name, version_id) / MANIFEST_NAME).is_file()

    def fetch(self, name: str, version_id: str) -> tuple[Path, str | None]:
        """(local directory, "hit" or "fetched"): the version's verified copy in the cache, downloaded
        first when it is not there (blocking). Raises StoreError: unknown version, or a file whose size
        or SHA-256 differs from the manifest (the download is discarded, nothing becomes visible);
        StoreUnavailable when the store cannot be read."""
        final = self.version_dir(name, version_id)
        if (final / MANIFEST_NAME).is_file():
            _touch(final / MANIFEST_NAME)
            return final, "hit"
        manifest = self._manifest(name, version_id)
        if manifest is None:
            raise StoreError(f"store {self.url}: {name}/{version_id} does not exist (no {MANIFEST_NAME})")
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            raise StoreError(f"store {self.url}: {name}/{version_id}/{MANIFEST_NAME} lists no files")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{version_id}.tmp-{secrets.token_hex(6)}"
        tmp.mkdir()
        try:
            t0 = time.perf_counter()
            total = 0
            for file_name, expected in sorted(files.items()):
                total += self._download(name, version_id, file_name, expected, tmp)
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            _touch(tmp / MANIFEST_NAME)
            fsync_dir(tmp)
            with self._cache_lock():
                try:
                    os.rename(tmp, final)
                except OSError as e:
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    shutil.rmtree(tmp)  # another process fetched it meanwhile: the same checked bytes
                    if not (final / MANIFEST_NAME).is_file():
                        raise StoreError(f"cache {final}: occupied by an incomplete directory") from e
                self._evict(keep={(name, version_id)})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info(
            "store %s: fetched %s/%s (%d bytes, checked) into %s in %.2f s",
            self.url,
            name,
            version_id,
            total,
            final,
            time.perf_counter() - t0,
        )
        return final, "fetched"

    def _download(self, name: str, version_id: str, file_name: str, expected: Any, tmp: Path) -> int:
        """Download one file into `tmp`, checking it against the manifest's entry; returns its size."""
        try:
            validate_adapter_name(file_name)  # one path component, inside the version
        except InvalidAdapterName as e:
            raise StoreError(f"store {self.url}: {name}/{version_id}: bad file name in manifest: {e}") from e
        if not isinstance(expected, dict) or not isinstance(expected.get("sha256"), str):
            raise StoreError(
                f"store {self.url}: {name}/{version_id}: manifest entry of {file_name} malformed"
            )
        remote = self._remote(name, version_id, file_name)
        digest, size = hashlib.sha256(), 0
        # Errors of the store (any exception of s3fs/botocore/aiohttp, OSErrors with an errno included)
        # are told apart from this machine's own (a full disk): only the first make it "unavailable".
        try:
            fin = self.fs.open(remote, "rb")
        except FileNotFoundError as e:
            raise StoreError(f"store {self.url}: {remote} is missing (listed in the manifest)") from e
        except Exception as e:
            raise self._unavailable(f"downloading {remote}", e) from e
        with fin, open(tmp / file_name, "xb") as fout:
            while True:
                try:
                    chunk = fin.read(_CHUNK)
                except Exception as e:
                    raise self._unavailable(f"downloading {remote}", e) from e
                if not chunk:
                    break
                digest.update(chunk)
                fout.write(chunk)
                size += len(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        if size != expected.get("size") or digest.hexdigest() != expected["sha256"]:
            raise StoreError(
                f"store {self.url}: {remote} is corrupt: {size} bytes with SHA-256 {digest.hexdigest()}, the "
                f"manifest says {expected.get('size')} bytes with {expected['sha256']}; not served"
            )
        return size

    def cache_entries(self) -> list[tuple[float, int, str, str, Path]]:
        """(last use, bytes, name, version id, directory) of each complete cached version."""
        out = []
        if not self.root.is_dir():
            return out
        for name_dir in self.root.iterdir():
            if name_dir.name.startswith(".") or not name_dir.is_dir():
                continue
            for version in name_dir.iterdir():
                manifest = version / MANIFEST_NAME
                if version.name.startswith(".") or not manifest.is_file():
                    continue
                size = sum(f.stat().st_size for f in version.iterdir() if f.is_file())
                out.append((manifest.stat().st_mtime, size, name_dir.name, version.name, version))
        return out

    def _evict(self, keep: set[tuple[str, str]]) -> list[Path]:
        """Remove least recently used versions until the cache fits its bound; never one in `keep` or
        `in_use`. Called under the cache lock."""
        entries = sorted(self.cache_entries())
        total = sum(e[1] for e in entries)
        if total <= self.cache_max_bytes:
            return []
        protected = set(keep)
        if self.in_use is not None:
            try:
                protected |= set(self.in_use())
            except RuntimeError:  # the served mapping changed while read: protect by skipping this round
                return []
        removed = []
        for _, size, name, version_id, path in entries:
            if total <= self.cache_max_bytes:
                break
            if (name, version_id) in protected:
                continue
            (path / MANIFEST_NAME).unlink()  # first: a half-removed directory is never read as complete
            shutil.rmtree(path, ignore_errors=True)
            total -= size
            removed.append(path)
            log.info(
                "cache %s: evicted %s/%s (%d bytes, least recently used)", self.root, name, version_id, size
            )
        if total > self.cache_max_bytes:
            log.warning(
                "cache %s: %d bytes, above its bound %d: what is left is in use or was just fetched",
                self.root,
                total,
                self.cache_max_bytes,
            )
        return removed

    # ---------------------------------------------------------------- writing
    def publish(self, name: str, path: Path) -> None:
        """Upload the version refine() wrote into `path` (a `new_version_dir` of this store): every file,
        then the manifest, then mark the cache copy complete. Raises StoreUnavailable (nothing is
        visible then: an upload without manifest is not a version) or StoreError (also for an upload
        that took longer than `upload_limit_s`: not committed, see UPLOAD_LIMIT_S)."""
        version_id = path.name
        if path.parent != self.adapter_dir(name):
            raise StoreError(f"{path}: not a version directory of {name!r} in this store's cache")
        files = {}
        for f in sorted(path.iterdir()):
            if not f.is_file() or f.name == MANIFEST_NAME:
                raise StoreError(f"{f}: a version holds plain files only (and no {MANIFEST_NAME})")
            sha, size = _sha256_file(f)
            files[f.name] = {"sha256": sha, "size": size}
        if PROVENANCE_NAME not in files:
            raise StoreError(f"{path}: no {PROVENANCE_NAME}; not a refined version")
        record = json.loads((path / PROVENANCE_NAME).read_text(encoding="utf-8"))
        manifest = {"format": MANIFEST_FORMAT, "version": version_id, "files": files, "record": record}
        t0 = time.perf_counter()
        for file_name in files:
            remote = self._remote(name, version_id, file_name)
            try:
                self.fs.put_file(str(path / file_name), remote)
            except Exception as e:
                raise self._unavailable(f"uploading {remote}", e) from e
        took = time.perf_counter() - t0
        if took > self.upload_limit_s:  # its files may be collected as garbage by now: never commit it
            raise StoreError(
                f"store {self.url}: uploading {name}/{version_id} took {took:.0f} s, more than "
                f"{self.upload_limit_s:.0f} s: not committed (no {MANIFEST_NAME}; `vllm-surgery store gc` "
                "deletes its files after the grace period); refine it again"
            )
        text = json.dumps(manifest, indent=2) + "\n"
        self._put(text.encode(), name, version_id, MANIFEST_NAME)  # the commit point
        tmp = path / f".{MANIFEST_NAME}.tmp-{secrets.token_hex(6)}"
        tmp.write_text(text, encoding="utf-8")
        _touch(tmp)
        os.replace(tmp, path / MANIFEST_NAME)
        with self._mutex:
            self._manifests[(name, version_id)] = manifest
        log.info(
            "store %s: published %s/%s (%d files, %d bytes) in %.2f s",
            self.url,
            name,
            version_id,
            len(files),
            sum(v["size"] for v in files.values()),
            time.perf_counter() - t0,
        )
        with self._cache_lock():
            self._evict(keep={(name, version_id)})

    def collect_garbage(
        self, grace_s: float, now: float | None = None, dry_run: bool = False
    ) -> list[Orphan]:
        """Delete from the store the version directories without manifest.json (uploads that died before
        their commit point) whose newest object is older than `grace_s` seconds; with `dry_run`, only
        say what would go. An upload in progress is never touched: `publish` commits no upload that
        took longer than `upload_limit_s`, and the grace period is at least twice that, so a version
        that may still get its manifest always has an object younger than the grace period. Only the
        objects listed are deleted. Versions with a manifest, served.json and .outcomes are never
        touched; neither is this machine's cache (`remove_leftovers` cleans it). Returns what was (or
        would be) deleted. Raises StoreUnavailable when the store cannot be listed or written."""
        cutoff = (time.time() if now is None else now) - grace_s
        found: list[Orphan] = []
        try:
            self.fs.invalidate_cache()
            adapters = sorted(
                e["name"] for e in self.fs.ls(self.base, detail=True) if e["type"] == "directory"
            )
        except FileNotFoundError:
            return []
        except Exception as e:
            raise self._unavailable(f"listing {self.base}", e) from e
        for adapter in adapters:
            name = adapter.rstrip("/").rsplit("/", 1)[-1]
            try:
                validate_adapter_name(name)
            except InvalidAdapterName:
                continue  # not an adapter of this store (its own name rules)
            try:
                entries = self.fs.ls(adapter, detail=True)
            except Exception as e:
                raise self._unavailable(f"listing {adapter}", e) from e
            for entry in sorted(e["name"] for e in entries if e["type"] == "directory"):
                version_id = entry.rstrip("/").rsplit("/", 1)[-1]
                if version_id.startswith("."):
                    continue  # .outcomes
                try:
                    listed = self.fs.find(entry, detail=True)
                except Exception as e:
                    raise self._unavailable(f"listing {entry}", e) from e
                # files only: a store with real directories (SeaweedFS's filer) keeps the emptied one
                objects = {p: info for p, info in listed.items() if info.get("type") == "file"}
                if not objects or any(p.rsplit("/", 1)[-1] == MANIFEST_NAME for p in objects):
                    continue  # a version (or nothing at all)
                newest = max(_modified(info) for info in objects.values())
                if newest >= cutoff:
                    continue  # perhaps still uploading
                if not dry_run:
                    try:
                        self.fs.rm(sorted(objects))
                    except Exception as e:
                        raise StoreUnavailable(
                            f"object store {self.url} unavailable: deleting {name}/{version_id} failed "
                            f"({type(e).__name__}: {e}); some of its objects may be gone (no reader saw "
                            "them: it has no manifest); run `vllm-surgery store gc` again"
                        ) from e
                    log.warning(
                        "store %s: deleted %s/%s: %d object(s) without %s, the newest %.1f h old",
                        self.url,
                        name,
                        version_id,
                        len(objects),
                        MANIFEST_NAME,
                        (time.time() - newest) / 3600,
                    )
                size = sum(int(info.get("size") or 0) for info in objects.values())
                found.append(Orphan(name, version_id, len(objects), size, newest))
        return found

    def _remove_leftovers_in(self, base: Path) -> list[Path]:
        """`remove_leftovers` (run at start) in the local cache: interrupted downloads and writes, and a
        version directory without manifest.json (a write killed before `publish` finished). Objects
        uploaded without a manifest stay in the store, invisible to readers."""
        return _remove_leftovers_in(base, incomplete=lambda entry: not (entry / MANIFEST_NAME).exists())
