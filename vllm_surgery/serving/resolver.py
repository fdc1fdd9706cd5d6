"""SurgeryResolver: answers a request for adapter X with X's served refined version, else X itself.

vLLM calls a resolver once per unknown model name (under a per-name lock), then loads the returned
path and caches the name -> LoRARequest mapping for the life of the server. So this runs rarely, and a
refined version marked served later reaches only names resolved after that (or after a restart).

The path returned is never the operator's directory nor the store's, but a snapshot of it
(`validation.Snapshots`): a private copy, validated as copied. vLLM memory-maps the weights it loads;
an original overwritten in place (`cp new.safetensors x/adapter_model.safetensors`) while vLLM holds
it would kill the engine. An original replaced with new weights is picked up by names resolved
afterwards, by a swap to "original", or at a restart; a name already resolved keeps serving the
snapshot it was resolved to (as before, when it kept its resolution until a restart), and refined
versions of the old content go stale.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from ..base_model import base_layer_shapes
from ..errors import AdapterError
from ..names import InvalidAdapterName, path_under, validate_adapter_name
from ..settings import ServingSettings
from ..storage import Database, DatabaseError, StoreError, StoreUnavailable, is_postgres_url, open_store
from . import metrics
from .validation import AdapterValidator, ServingLimits, Snapshot, Snapshots
from .vllm_compat import LoRARequest, LoRAResolver, lora_request

# Under vLLM's "vllm" logger tree so the messages appear in the server log with vLLM's format and
# level (VLLM_LOGGING_LEVEL); a plain package logger would have no handler in the server process.
log = logging.getLogger(f"vllm.{__name__}")

ORIGINAL = "original"  # the version name of an operator's adapter (a store version has an id)


class SurgeryResolver(LoRAResolver):
    """Resolve adapter names against the operator's adapter roots and the refined-version store."""

    def __init__(self, settings: ServingSettings) -> None:
        self.settings = settings
        # A local directory, or object storage with this machine's checked cache (storage.objstore):
        # vLLM only ever gets a snapshot of a local copy.
        self.store = open_store(settings.store, settings.cache_dir, settings.cache_max_bytes)
        # Where the served version is chosen: the store's served.json (one machine), or the served
        # pointer in a shared database (`pointers`, set by the endpoint plugin's start-up once the
        # database is open) when the database is Postgres, shared by every replica.
        self.shared_pointer = is_postgres_url(settings.database_path)
        self.pointers: Database | None = None
        # Limits come from the engine (endpoint plugin's init_state calls validator.configure); until
        # then, or under plain `vllm serve` without the endpoint plugin, see _default_limits.
        self.validator = AdapterValidator()
        # What vLLM is handed: validated private copies (created on first use, in this process only).
        self.snapshots = Snapshots(settings.snapshot_root, self.validator, settings.snapshot_grace_s)
        self.configured = False
        # (name, original path, content hash), called when a name resolves to its original: the
        # endpoint plugin's start-up hands it the automatic jobs' first-load check.
        self._on_original_served: Callable[[str, Path, str], None] | None = None

    def call_when_original_served(self, hook: Callable[[str, Path, str], None]) -> None:
        """Call `hook(name, original path, content hash)` whenever a name resolves to its original (it has
        no refined version for its current content). A hook that raises is logged; serving goes on."""
        self._on_original_served = hook

    def configure(self, limits: ServingLimits) -> None:
        """The running engine's limits (max rank, dtype, base-model shapes), from the endpoint plugin."""
        self.validator.configure(limits)
        self.configured = True

    def _default_limits(self, base_model_name: str) -> None:
        """Without the endpoint plugin, the resolver knows only the base model (vLLM passes --model):
        shapes are checked against its configuration and weights against float32's range (bfloat16's
        too); the engine itself checks the rank. Logged once."""
        shapes = None
        try:
            shapes = base_layer_shapes(base_model_name)
        except AdapterError as e:
            log.error("adapter shapes cannot be checked against the base model: %s", e)
        log.warning(
            "vllm-surgery's endpoint plugin is not enabled: adapters are checked against the base model's "
            "shapes and float32's range; --max-lora-rank and the serving dtype are left to the engine"
        )
        self.configure(ServingLimits(dtype=torch.float32, shapes=shapes))

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        """None means "not mine": vLLM then tries other resolvers and finally answers 404."""
        try:
            validate_adapter_name(lora_name)
        except InvalidAdapterName as e:
            log.warning("refusing to resolve adapter name: %s", e)
            return None
        if not self.configured:
            await asyncio.to_thread(self._default_limits, base_model_name)
        # Disk reads, hashing and safetensors parsing block: keep them off the server's event loop.
        path = await asyncio.to_thread(self.choose_path, lora_name)
        if path is None:
            return None
        # vLLM overwrites lora_int_id with its own counter; any positive value is fine here.
        return lora_request(lora_name, str(path))

    def find_original(self, name: str) -> Path | None:
        """`<root>/<name>` in the first configured root that has it as a directory."""
        for root in self.settings.adapter_dirs:
            try:
                candidate = path_under(root, name)
            except InvalidAdapterName as e:  # e.g. a symlink in the root pointing outside it
                log.warning("adapter %r under %s: %s; skipped", name, root, e)
                continue
            if candidate.is_dir():
                return candidate
        return None

    def snapshot_original(self, name: str, original: Path) -> Snapshot:
        """The snapshot of `name`'s original at `original` (blocking); raises AdapterError."""
        return self.snapshots.take(name, ORIGINAL, original)

    def snapshot_version(self, name: str, version_dir: Path) -> Snapshot:
        """The snapshot of the store version at `version_dir` (blocking; its files may not leave the
        store's directory of `name`). With object storage the version is first copied into this
        machine's cache and checked against its manifest (`fetch`), which is what the snapshot copies.
        Raises AdapterError (the files), StoreUnavailable (the store cannot be read and the version is
        not cached), StoreError (not in the store, or a corrupt download: never served)."""
        local = self.fetch_version(name, version_dir.name)
        return self.snapshots.take(name, version_dir.name, local, inside=self.store.adapter_dir(name))

    def fetch_version(self, name: str, version: str) -> Path:
        """The local directory of store version `version` of `name` (see snapshot_version), counted in
        vllm_surgery_store_fetches_total and logged when it fails."""
        try:
            local, outcome = self.store.fetch(name, version)
        except StoreUnavailable as e:
            metrics.record_store_fetch("failed")
            log.error("adapter %r: version %s cannot be fetched: %s", name, version, e)
            raise
        except StoreError as e:
            metrics.record_store_fetch("corrupt")
            log.error("adapter %r: version %s refused: %s", name, version, e)
            raise
        if outcome is not None:
            metrics.record_store_fetch(outcome)
        return local

    def served_refined(self, name: str, adapter_hash: str) -> Path | None:
        """The store directory of the refined version `name` is to serve, or None to serve the original
        (blocking). One machine: the store's served.json (`VersionStore.served`). Shared database: the
        served pointer, with the same checks (a complete version, a servable decision, refined from
        this original's content `adapter_hash`) and one more: a version the gate did not accept only
        where the pointer says an operator forced it. Raises DatabaseError when the shared database
        cannot be read (or was never opened), OSError/ValueError for an unusable store."""
        if not self.shared_pointer:
            return self.store.served(name, adapter_hash)
        if self.pointers is None:
            raise DatabaseError(
                f"the shared database {self.settings.database_path} is not open (see the start-up log): "
                "the served pointer cannot be read"
            )
        pointer = self.pointers.served_pointer(name)
        if pointer is None or pointer.version == ORIGINAL:
            return None
        info = self.store.version_info(name, pointer.version)
        problem = None
        if info is None:
            problem = "is missing or incomplete in the store"
        elif not info.servable:
            problem = f"has decision {info.decision!r}"
        elif info.adapter_hash != adapter_hash:
            problem = "was refined from other adapter content (stale)"
        elif info.decision != "accept" and not pointer.forced:
            problem = f"has decision {info.decision!r} and the served pointer does not say it was forced"
        if problem is not None:
            log.warning(
                "adapter %r: the served pointer names version %s (revision %d), which %s; serving the "
                "original",
                name,
                pointer.version,
                pointer.revision,
                problem,
            )
            return None
        return info.path

    def choose_path(self, name: str) -> Path | None:
        """The snapshot directory to serve for a validated `name`, or None if there is nothing servable.

        The original is snapshot and validated even when a refined version will be served: its content
        hash is what ties a refined version to it, and a broken original means the operator's
        deployment is broken, which should be visible rather than masked by an older refinement.
        """
        original = self.find_original(name)
        if original is None:
            log.debug("adapter %r not found under %s", name, [str(d) for d in self.settings.adapter_dirs])
            return None
        try:
            original_snapshot = self.snapshot_original(name, original)
        except (AdapterError, OSError) as e:
            log.error("adapter %r at %s is not servable: %s", name, original, e)
            return None
        adapter_hash = original_snapshot.content_hash
        try:
            refined = self.served_refined(name, adapter_hash)
        except (OSError, ValueError, DatabaseError) as e:
            log.error(
                "adapter %r: the served version cannot be looked up (store %s: %s); serving the original",
                name,
                self.store.location,
                e,
            )
            refined = None
        if refined is not None:
            try:
                snapshot = self.snapshot_version(name, refined)
            except (AdapterError, OSError, StoreError) as e:
                log.error(
                    "adapter %r: refined version %s cannot be served (%s); serving the original",
                    name,
                    refined,
                    e,
                )
            else:
                log.info("adapter %r: serving refined version %s (snapshot %s)", name, refined, snapshot.path)
                metrics.record_store_lookup(hit=True)
                info = self.store.version_info(name, refined.name)
                metrics.record_served(name, refined.name, info.record if info else None)
                return snapshot.path
        log.info("adapter %r: serving the original %s (snapshot %s)", name, original, original_snapshot.path)
        metrics.record_store_lookup(hit=False)
        metrics.record_served(name, "original")
        if self._on_original_served is not None:
            try:
                self._on_original_served(name, original, adapter_hash)
            except Exception:  # a hook must never stop an adapter from being served
                log.exception("adapter %r: the first-load hook failed", name)
        return original_snapshot.path
