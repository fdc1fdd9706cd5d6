"""Hot-swap: switch a served adapter name to another version directory inside a running API server.

`HotSwapper.swap(name, version)` makes requests for adapter `name` use `version` ("original", the
operator's adapter under its root, or the id of a refined version in the store) without a restart:

1. the name, the version and its directory are checked, and the directory is fully loaded with
   `vllm_surgery.adapter.load_adapter` BEFORE the engine is touched; a corrupt or stale version
   raises HotSwapError and the previous version keeps serving;
2. under a per-name asyncio.Lock, a swap to the path already served is a no-op;
3. the new version is loaded into the engine under a NEW lora_int_id (engine `add_lora`), then the
   name's stored LoRARequest (`OpenAIServingModels.lora_requests[name]`) is replaced under vLLM's
   per-name lock: requests already running finish on the old version (no response mixes versions),
   new ones get the new version; nothing fails or waits;
4. vLLM's in-place load (`load_inplace=True`) is deliberately not used: it rewrites the weights under
   running requests, and in 0.32 a stored request with load_inplace=True makes the worker re-read the
   adapter from disk on every step (upstream bug). Stored requests are always load_inplace=False;
5. the store's served.json is updated, so a restarted server (whose resolver reads it) serves the same
   version, and the previous version is remembered so that `rollback(name)` is one call.

The rollback history (one step per name) lives in the API-server process and is lost on restart;
served.json is what survives. A server runs exactly one API-server process (`vllm-surgery-serve` and
init_state refuse --api-server-count > 1), so the mapping, the history and the metrics are those of
the only process that answers; scale out with several servers sharing one store instead.

Many replicas (a shared Postgres database): the served version is the served pointer in the database
(`vllm_surgery.storage.pointer`), not served.json. A swap or rollback on any replica validates the
version here, writes the pointer (with its history) in one transaction, and swaps here at once; every
other replica's `follower` sees the change (LISTEN/NOTIFY, a re-read on reconnect, a periodic poll)
and swaps itself with `follow`, which makes the same checks but writes nothing. A rollback goes back
to the `from` of the pointer's latest change, whichever replica made it.

Validation is one function, `validated_target`: the listing's `servable` is computed with it too, and
it checks the adapter against this server (see `validation`): corrupt files, NaN, a rank above
--max-lora-rank, shapes that do not fit the base model, weights that overflow the serving dtype, a
version or file that leads out of the store. Blocking work (file reads, served.json writes with
fsync, path resolution) runs in worker threads, never on the event loop.

Every version lives in its own directory, so vLLM's prefix cache (keyed by name and path) never mixes
blocks computed with different weights.

What vLLM loads is a snapshot (`validation.Snapshots`): a private copy of the version's files, validated
as copied, at `<snapshots>/<server>/<name>/<sha256 of the files>/<version>`; an adapter overwritten in
place while served never reaches the engine. Adapters given with --lora-modules, which vLLM loaded from
the operator's directory before the plugin started, are moved onto their snapshot at start.

The gate's promise holds at the swap: `swap` serves a refined version only when its own surgery.json
says the gate accepted it (decision "accept") and it was refined from the original's current content.
A version written with force (decision "forced") is swapped in only when the caller says so
(`swap_forced`: the admin route's `"force": true`, logged); a stale one never. The automatic swaps of
accepted jobs (`automatic_jobs`) never force, whatever the job row says.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

from ..adapter import PROVENANCE_NAME
from ..errors import AdapterError, SurgeryError
from ..names import InvalidAdapterName, validate_adapter_name
from ..settings import ServingSettings
from ..storage import DatabaseError, PointerConflict, StoreError, StoreUnavailable
from . import metrics, vllm_compat
from .resolver import ORIGINAL, SurgeryResolver

log = logging.getLogger(f"vllm.{__name__}")

__all__ = ["ORIGINAL", "HotSwapError", "HotSwapper", "SwapResult"]


class HotSwapError(SurgeryError):
    """A swap that was refused or failed; `status` is the HTTP status the endpoint answers with.
    Whenever this is raised, the version served before the call is still served."""

    def __init__(self, message: str, status: int, outcome: str) -> None:
        super().__init__(message)
        self.status = status
        self.outcome = outcome


@dataclass(frozen=True)
class SwapResult:
    name: str
    version: str
    path: str
    previous_version: str | None
    previous_path: str | None
    changed: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.name,
            "version": self.version,
            "path": self.path,
            "previous_version": self.previous_version,
            "previous_path": self.previous_path,
            "changed": self.changed,
            "seconds": round(self.seconds, 6),
        }


def _qualities(info: Any) -> dict[str, Any] | None:
    """Held-out quality before/after recorded in a version's surgery.json (None for the original)."""
    if info is None:
        return None
    record = info.record or {}
    return {"quality_before": record.get("quality_before"), "quality_after": record.get("quality_after")}


class HotSwapper:
    """Hot-swaps adapters of one API server. `serving_models` is vLLM's OpenAIServingModels
    (`app.state.openai_serving_models`): its `lora_requests` dict maps a name to the LoRARequest
    every request for that name uses."""

    def __init__(
        self, serving_models: Any, settings: ServingSettings, resolver: SurgeryResolver | None = None
    ) -> None:
        self.models = serving_models
        self.settings = settings
        # The registered resolver when there is one, so that resolution and swaps share one validator
        # (limits and cached verdicts); else a private one, used for find_original and validation.
        self.resolver = resolver if resolver is not None else SurgeryResolver(settings)
        self.validator = self.resolver.validator
        self.store = self.resolver.store
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._previous: dict[str, tuple[str, str]] = {}  # name -> (version, path) served before the last swap
        # Adapters given with --lora-modules: vLLM registered them before this object exists. They are
        # originals like those under an operator root (refinable, swappable), found by name here.
        self.startup: dict[str, Path] = {}
        # Paths other slots serve (a canary's version, see `canaries`): in use too.
        self.extra_paths: Callable[[], set[str]] = set
        for name, request in dict(vllm_compat.served_requests(self.models)).items():
            try:
                validate_adapter_name(name)
            except InvalidAdapterName:
                continue
            if Path(request.lora_path).is_dir():
                self.startup[name] = Path(request.lora_path)
        # Snapshots that a name serves are never cleaned up, nor (object storage) their cached versions.
        self.resolver.snapshots.in_use = self._paths_in_use
        self.store.in_use = self._versions_in_use

    @property
    def shared(self) -> bool:
        """Whether the served version is the shared database's served pointer (not served.json)."""
        return self.resolver.shared_pointer

    def _pointers(self) -> Any:
        """The shared database (`storage.Database`). Raises HotSwapError 503 when it is not open."""
        if self.resolver.pointers is None:
            raise HotSwapError(
                f"the shared database {self.settings.database_path} is not open (see the server log at "
                "start): the served pointer cannot be read or written, so nothing changed",
                HTTPStatus.SERVICE_UNAVAILABLE,
                "failed",
            )
        return self.resolver.pointers

    def pointed_version(self, name: str) -> str | None:
        """With a shared database, the version the served pointer names for `name` (every replica
        follows it, whatever this replica's engine did with it; None where the pointer was never
        written); None on one machine, where served.json names what this server serves. Blocking.
        Raises HotSwapError 503 when the shared database is not open, DatabaseError when it cannot be
        read."""
        if not self.shared:
            return None
        pointer = self._pointers().served_pointer(name)
        return None if pointer is None else pointer.version

    def _paths_in_use(self) -> set[str]:
        """The paths vLLM's name -> request mapping points at (may raise RuntimeError while it changes)."""
        served = {r.lora_path for r in tuple(vllm_compat.served_requests(self.models).values())}
        return served | self.extra_paths()

    def _versions_in_use(self) -> set[tuple[str, str]]:
        """(name, store version id) of what names serve now (may raise RuntimeError, as above)."""
        located = (self.resolver.snapshots.locate(p) for p in self._paths_in_use())
        return {v for v in located if v is not None and v[1] != ORIGINAL}

    def find_original(self, name: str) -> Path | None:
        """The operator's original of `name`: under an adapter root, else as given with --lora-modules."""
        return self.resolver.find_original(name) or self.startup.get(name)

    async def restore_served_versions(self) -> None:
        """Serve the store's chosen version of each --lora-modules adapter, as the resolver does for the
        others, so that a restart keeps serving what was swapped in before it; and serve every
        --lora-modules adapter from a snapshot (vLLM loaded it from the operator's directory).

        served.json is written only by this server's swap, after its checks (forced versions only on
        an operator's explicit force), so restoring it does not ask again."""
        for name, original in self.startup.items():
            try:
                refined = await asyncio.to_thread(
                    lambda o=original, n=name: self.resolver.served_refined(
                        n, self.resolver.snapshot_original(n, o).content_hash
                    )
                )
                version = refined.name if refined is not None else ORIGINAL
                path, version = await asyncio.to_thread(self.validated_target, name, version)
                async with self._locks[name]:
                    await self._swap_locked(name, version, str(path), time.perf_counter(), remember=False)
            except (AdapterError, HotSwapError, OSError, ValueError, DatabaseError) as e:
                log.error(
                    "adapter %r: could not serve it from a snapshot (%s); vLLM serves %s as it loaded it at "
                    "start: do not overwrite its files in place",
                    name,
                    e,
                    original,
                )

    # ----------------------------------------------------------------- inspection
    def loaded_names(self) -> list[str]:
        """The names vLLM serves now (resolved, swapped or given at start), sorted."""
        return sorted(vllm_compat.served_requests(self.models))

    def served_path(self, name: str) -> str | None:
        request = vllm_compat.served_requests(self.models).get(name)
        return request.lora_path if request is not None else None

    def version_of(self, name: str, path: str | None) -> str | None:
        """'original', a store version id, or None (nothing loaded, or a path from elsewhere)."""
        if path is None:
            return None
        snapshot = self.resolver.snapshots.locate(path)
        if snapshot is not None:
            return snapshot[1] if snapshot[0] == name else None
        p = Path(path).resolve()
        original = self.find_original(name)
        if original is not None and p == original.resolve():
            return ORIGINAL
        if p.parent == self.store.adapter_dir(name):
            return p.name
        return None

    def known_names(self) -> list[str]:
        names: set[str] = set()
        for root in self.settings.adapter_dirs:
            if root.is_dir():
                names.update(e.name for e in root.iterdir() if e.is_dir() and not e.name.startswith("."))
        static = set(vllm_compat.served_requests(self.models))
        names.update(static)
        out = []
        for name in sorted(names):
            try:
                validate_adapter_name(name)
            except InvalidAdapterName:
                continue
            if name in static or self.find_original(name) is not None:
                out.append(name)
        return out

    def describe(self, name: str) -> dict[str, Any]:
        """What is known about one adapter; raises HotSwapError (400/404) for bad or unknown names.

        Originals come from an operator root (source "root") or from --lora-modules (source
        "lora-modules"). An adapter loaded at run time with vLLM's /v1/load_lora_adapter is described
        with source "static": it is served as registered and cannot be swapped or refined here.
        """
        stored = vllm_compat.served_requests(self.models).get(name)
        try:
            original = self.original_of(name)
        except HotSwapError:
            if stored is None:
                raise
            return {
                "name": name,
                "source": "static",
                "original_path": None,
                "loaded": True,
                "served_path": stored.lora_path,
                "served_version": None,
                "served_load_inplace": stored.load_inplace,
                "served_quality": None,
                "store_served_version": None,
                "previous_version": None,
                "versions": [],
            }
        path = stored.lora_path if stored is not None else None
        previous = self._previous.get(name)
        versions = self.store.versions(name)
        served_version = self.version_of(name, path)
        served_info = next((v for v in versions if v.version_id == served_version), None)
        return {
            "name": name,
            "source": "lora-modules" if self.resolver.find_original(name) is None else "root",
            "original_path": str(original),
            "loaded": path is not None,
            "served_path": path,
            "served_version": served_version,
            "served_quality": _qualities(served_info),
            "served_load_inplace": stored.load_inplace if stored is not None else None,
            "store_served_version": None if self.shared else self._store_served_version(name),
            "previous_version": previous[0] if previous else None,
            "versions": [self._describe_version(v) for v in versions],
            **self._describe_pointer(name),
        }

    def _store_served_version(self, name: str) -> str | None:
        try:
            return self.store.served_version_id(name)
        except StoreError as e:  # object storage unreachable: the listing still answers
            log.error("adapter %r: %s", name, e)
            return None

    def _describe_pointer(self, name: str) -> dict[str, Any]:
        """With a shared database: the served pointer and what every replica serves (blocking)."""
        if not self.shared:
            return {}
        try:
            db = self._pointers()
            pointer = db.served_pointer(name)
            return {
                "pointer": pointer.to_dict() if pointer is not None else None,
                "replicas": [r.to_dict() for r in db.replicas(name)],
            }
        except (DatabaseError, HotSwapError) as e:
            return {"pointer": None, "replicas": None, "pointer_error": str(e)}

    def _describe_version(self, info: Any) -> dict[str, Any]:
        """One listed version; `servable` and `reason` come from the very check a swap makes."""
        try:
            self.validated_target(info.name, info.version_id, snapshot=False)
            servable, reason = True, None
        except HotSwapError as e:
            servable, reason = False, str(e)
        return {
            "id": info.version_id,
            "decision": info.decision,
            "servable": servable,
            "reason": reason,
            **_qualities(info),
        }

    # ----------------------------------------------------------------- swapping
    def original_of(self, name: str) -> Path:
        """The original of `name` (see find_original); raises HotSwapError: 400 for a bad name, 404 for
        an unknown adapter."""
        try:
            validate_adapter_name(name)
        except InvalidAdapterName as e:
            raise HotSwapError(str(e), HTTPStatus.BAD_REQUEST, "invalid") from e
        original = self.find_original(name)
        if original is None:
            raise HotSwapError(f"adapter {name!r} not found", HTTPStatus.NOT_FOUND, "not_found")
        return original

    def validated_target(
        self, name: str, version: str, *, snapshot: bool = True, force: bool = True
    ) -> tuple[Path, str]:
        """The directory to serve for `version` of `name`, validated for this server (blocking: reads
        files, once per change thanks to the validator's cache). The one check behind swaps, the
        listing's `servable` and the guarded runtime-load route.

        `snapshot`: return the snapshot vLLM is to load (copied, then the copy validated) rather than
        validating the directory in place (the listing, which loads nothing). `force=False`: a version
        the gate did not accept (its surgery.json's decision is not "accept") is refused too.

        Raises HotSwapError: 400 (bad name or id), 404 (unknown), 409 (not servable by decision, not
        accepted by the gate without force, or refined from other content), 422 (the files cannot be
        served here: corrupt, NaN, rank, shapes, dtype overflow, outside the store, or a download from
        object storage that differs from its manifest), 503 (object storage unreachable and the version
        not in this machine's cache)."""
        original = self.original_of(name)
        try:
            if snapshot:
                original_snapshot = self.resolver.snapshot_original(name, original)
                original_hash = original_snapshot.content_hash
            else:
                original_hash = self.validator.validate(original)
        except (AdapterError, OSError) as e:
            raise HotSwapError(f"adapter {name!r}: original is not servable: {e}", 422, "corrupt") from e
        if version == ORIGINAL:
            return (original_snapshot.path if snapshot else original), ORIGINAL
        try:
            validate_adapter_name(version)  # a version id is a path component too
        except InvalidAdapterName as e:
            raise HotSwapError(f"version {version!r}: {e}", HTTPStatus.BAD_REQUEST, "invalid") from e
        try:
            info = self.store.version_info(name, version)
        except StoreUnavailable as e:  # its manifest cannot be read, so it is not in this machine's cache
            if snapshot:
                metrics.record_store_fetch("failed")
            raise HotSwapError(f"version {version!r} of {name!r}: {e}", 503, "unavailable") from e
        except ValueError as e:  # the id is fine, but the directory resolves outside the store
            raise HotSwapError(f"version {version!r} of {name!r} is not servable: {e}", 422, "corrupt") from e
        if info is None:
            raise HotSwapError(
                f"adapter {name!r} has no complete version {version!r}", HTTPStatus.NOT_FOUND, "not_found"
            )
        if not info.servable:
            raise HotSwapError(
                f"version {version!r} of {name!r} has decision {info.decision!r}; not servable",
                HTTPStatus.CONFLICT,
                "conflict",
            )
        if info.adapter_hash != original_hash:
            raise HotSwapError(
                f"version {version!r} of {name!r} was refined from other adapter content (stale): its "
                f"{PROVENANCE_NAME} records adapter_hash {info.adapter_hash}, the original {original} now "
                f"has {original_hash}; refine the current original instead",
                HTTPStatus.CONFLICT,
                "conflict",
            )
        if not force and info.decision != "accept":
            raise HotSwapError(
                f"version {version!r} of {name!r}: its {PROVENANCE_NAME} says decision {info.decision!r}, "
                "not 'accept': the gate did not accept it, so it is not swapped in automatically; an "
                f'operator may serve it anyway with {{"version": "{version}", "force": true}}',
                HTTPStatus.CONFLICT,
                "conflict",
            )
        try:
            if snapshot:
                return self.resolver.snapshot_version(name, info.path).path, version
            if not self.store.cached(name, version):
                # Object storage: a version not on this machine is listed from its manifest; its files
                # are checked when a swap fetches it (listing never downloads).
                return info.path, version
            self.validator.validate(info.path, inside=self.store.adapter_dir(name))
        except StoreUnavailable as e:
            raise HotSwapError(
                f"version {version!r} of {name!r} cannot be fetched: {e}", 503, "unavailable"
            ) from e
        except (AdapterError, OSError, StoreError) as e:
            raise HotSwapError(
                f"version {version!r} of {name!r} is not servable (corrupt): {e}", 422, "corrupt"
            ) from e
        return info.path, version

    def locate(self, path: Path) -> tuple[str, str] | None:
        """(adapter name, version) of the original or store version that `path` is, or None if it is
        neither (blocking: resolves symlinks, so a link out of a root or the store is not either)."""
        resolved = path.resolve()
        for name, original in self.startup.items():
            if original.resolve() == resolved:
                return name, ORIGINAL
        try:
            original = self.resolver.find_original(validate_adapter_name(resolved.name))
        except InvalidAdapterName:
            original = None
        if original is not None and original.resolve() == resolved:
            return resolved.name, ORIGINAL
        if resolved.parent.parent == self.store.root.resolve():
            return resolved.parent.name, resolved.name
        return None

    async def swap(self, name: str, version: str, *, by: str = "admin") -> SwapResult:
        """Serve `version` of `name` (module docstring): only a version the gate accepted, refined from
        the current original (or "original"). With a shared database the served pointer is written
        first (`by`: who, for its history) and every replica follows. Raises HotSwapError (see
        `validated_target`; 500 when the engine refuses the load, 503 when the shared database cannot
        be written): the version served before is still served then. (With a shared database, an
        engine refusal comes after the pointer was written: the other replicas follow it, and this one
        tries again at its next poll, reported as ``behind``.)"""
        return await self._swap(name, version, force=False, by=by)

    async def swap_forced(self, name: str, version: str, *, by: str = "admin") -> SwapResult:
        """`swap`, but a version the gate did not accept (decision "forced") is served too: an
        operator's explicit request (the admin route's ``"force": true``), logged. A stale version is
        refused even so. Raises HotSwapError like `swap`."""
        return await self._swap(name, version, force=True, by=by)

    async def _swap(
        self,
        name: str,
        version: str,
        force: bool,
        by: str = "admin",
        reason: str | None = None,
        expect_revision: int | None = None,
    ) -> SwapResult:
        start = time.perf_counter()
        known = None
        try:
            if not isinstance(version, str) or not version:
                raise HotSwapError("'version' must be a non-empty string", HTTPStatus.BAD_REQUEST, "invalid")
            await asyncio.to_thread(self.original_of, name)
            known = name
            path, version = await asyncio.to_thread(self.validated_target, name, version, force=force)
            async with self._locks[name]:
                # the pointer is written under the name's lock: this replica's own follower, woken by
                # the notification, waits here and then finds the version already served (else it
                # could swap first and this swap would answer "unchanged")
                if self.shared:
                    await asyncio.to_thread(self._write_pointer, name, version, by, reason, expect_revision)
                result = await self._swap_locked(name, version, str(path), start)
        except HotSwapError as e:
            metrics.record_swap(known, e.outcome)
            log.warning("hot-swap of %r to %r refused: %s", name, version, e)
            raise
        if force and result.changed and version != ORIGINAL:
            info = await asyncio.to_thread(self.store.version_info, name, version)
            if info is not None and info.decision != "accept":
                log.warning(
                    "adapter %r: version %s (decision %r: not accepted by the gate) swapped in on an "
                    "operator's explicit force",
                    name,
                    version,
                    info.decision,
                )
        metrics.record_swap(name, "swapped" if result.changed else "noop")
        if result.changed:
            metrics.SWAP_LATENCY.observe(result.seconds)
        return result

    def _write_pointer(
        self, name: str, version: str, by: str, reason: str | None, expect_revision: int | None
    ) -> None:
        """Point every replica at the validated `version` (blocking). Raises HotSwapError: 409 when the
        pointer moved since a rollback read it, 503 when the database cannot be written (nothing
        changed: not here, not elsewhere)."""
        if version == ORIGINAL:
            original = self.original_of(name)
            adapter_hash, forced = self.resolver.snapshot_original(name, original).content_hash, False
        else:
            info = self.store.version_info(name, version)
            if info is None:  # validated a moment ago: removed since
                raise HotSwapError(f"adapter {name!r} has no complete version {version!r}", 404, "not_found")
            adapter_hash, forced = info.adapter_hash, info.decision != "accept"
        try:
            pointer, changed = self._pointers().set_served_pointer(
                name,
                version,
                adapter_hash=adapter_hash,
                forced=forced,
                by=by,
                reason=reason,
                expect_revision=expect_revision,
            )
        except PointerConflict as e:
            raise HotSwapError(str(e), HTTPStatus.CONFLICT, "conflict") from e
        except DatabaseError as e:
            raise HotSwapError(
                f"adapter {name!r}: the served pointer could not be written, so nothing changed on any "
                f"replica: {e}",
                HTTPStatus.SERVICE_UNAVAILABLE,
                "failed",
            ) from e
        if changed:
            log.info(
                "adapter %r: served pointer -> %s (revision %d, by %s)", name, version, pointer.revision, by
            )

    async def follow(self, name: str, version: str, forced: bool) -> SwapResult:
        """Serve the version the shared served pointer names, here only (the follower calls this; the
        pointer is not written): the checks of `swap`, with a version the gate did not accept only when
        the pointer says `forced`; a version the pointer no longer names (it moved while this one was
        validated) is not swapped in (changed False). Raises HotSwapError like `swap` (what was served
        stays served) and DatabaseError when the pointer cannot be read again."""
        start = time.perf_counter()
        path, version = await asyncio.to_thread(self.validated_target, name, version, force=forced)
        async with self._locks[name]:
            if self.shared:
                # a swap on this replica may have moved the pointer while this version was validated:
                # never go back to the older one (the newer change is followed on its own notification)
                latest = await asyncio.to_thread(self._pointers().served_pointer, name)
                if (latest.version if latest is not None else ORIGINAL) != version:
                    old_path = self.served_path(name)
                    old_version = await asyncio.to_thread(self.version_of, name, old_path)
                    seconds = time.perf_counter() - start
                    return SwapResult(name, old_version, old_path, old_version, old_path, False, seconds)
            return await self._swap_locked(name, version, str(path), start)

    async def rollback(self, name: str) -> SwapResult:
        """Serve the version served before the last swap: with a shared database, the `from` of the
        served pointer's latest change (on every replica), else this server's previous version. Raises
        HotSwapError (409 when there is nothing to go back to) like `swap`."""
        await asyncio.to_thread(self.original_of, name)
        if self.shared:
            try:
                history = await asyncio.to_thread(lambda: self._pointers().pointer_history(name, 1))
            except DatabaseError as e:
                raise HotSwapError(
                    f"adapter {name!r}: cannot read the served pointer: {e}", 503, "failed"
                ) from e
            if not history:
                metrics.record_swap(name, "conflict")
                raise HotSwapError(f"adapter {name!r}: no earlier version to roll back to", 409, "conflict")
            last = history[-1]
            return await self._swap(
                name,
                last.from_version,
                force=True,
                by="rollback",
                reason=f"rollback of revision {last.revision} ({last.to_version}, by {last.changed_by})",
                expect_revision=last.revision,
            )
        previous = self._previous.get(name)
        if previous is None:
            metrics.record_swap(name, "conflict")
            raise HotSwapError(f"adapter {name!r}: no earlier version to roll back to", 409, "conflict")
        # The previous version was served (a forced one only on an operator's force): going back to it
        # is the operator's request again, never an automatic one.
        return await self.swap_forced(name, previous[0])

    def _same_as_served(self, name: str, old_path: str | None, path: str) -> tuple[str | None, bool]:
        """(version of `old_path`, whether it is `path`): blocking path resolution, run in a thread."""
        same = old_path is not None and Path(old_path).resolve() == Path(path).resolve()
        return self.version_of(name, old_path), same

    def _record_served(self, name: str, version: str) -> Any:
        """Update served.json (fsync: blocking, run in a thread; not with a shared database, whose
        served pointer was written before the swap); returns the version's surgery.json."""
        try:
            if not self.shared and version == ORIGINAL:
                self.store.clear_served(name)
            elif not self.shared:
                self.store.set_served(name, version)
        except (OSError, ValueError) as e:
            log.error("adapter %r now serves %s, but served.json could not be updated: %s", name, version, e)
        info = None if version == ORIGINAL else self.store.version_info(name, version)
        return info.record if info else None

    async def _swap_locked(
        self, name: str, version: str, path: str, start: float, remember: bool = True
    ) -> SwapResult:
        old_path = self.served_path(name)
        old_version, same = await asyncio.to_thread(self._same_as_served, name, old_path, path)
        if same:
            return SwapResult(name, version, path, old_version, old_path, False, time.perf_counter() - start)
        # Each version gets its own lora_int_id: requests already running keep the LoRARequest they
        # were scheduled with and finish on the old weights; requests arriving after the mapping below
        # is replaced get the new ones. (vLLM's load_inplace would instead rewrite the weights under
        # running requests, mixing versions inside one response, and 0.32 re-reads such an adapter
        # from disk on every step.) The old version's weights leave the worker caches by LRU.
        async with vllm_compat.name_lock(self.models, name):
            # named NAME@ID in the engine: two versions of one name may share a batch (vllm_compat)
            request = vllm_compat.version_lora_request(name, path, vllm_compat.next_lora_id(self.models))
            try:
                await vllm_compat.add_lora(self.models, request)  # loads and validates in the workers
            except Exception as e:
                raise HotSwapError(
                    f"vLLM refused to load {path} for {name!r}: {e}",
                    HTTPStatus.INTERNAL_SERVER_ERROR,
                    "failed",
                ) from e
            vllm_compat.served_requests(self.models)[name] = request
        if remember and old_path is not None and old_version is not None:
            self._previous[name] = (old_version, old_path)
        record = await asyncio.to_thread(self._record_served, name, version)
        metrics.record_served(name, version, record)
        seconds = time.perf_counter() - start
        log.info("adapter %r: hot-swapped %s -> %s (%s) in %.3f s", name, old_version, version, path, seconds)
        return SwapResult(name, version, path, old_version, old_path, True, seconds)
