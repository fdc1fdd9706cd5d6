"""Canaries inside the API server: a refined version serves a share of an adapter's live traffic beside
the current one, and live feedback promotes or rolls it back (docs/canary.md).

The state is the database's (`storage.canary`: one running canary per adapter, its decisions); this
module serves it:

- **Two slots.** The current version is served under the adapter's name as always (vLLM's name ->
  LoRARequest mapping). The canary version is loaded into the engine as its own LoRARequest (its own
  lora_int_id, named NAME@ID there like every version) and kept here, never in that mapping: it is not
  listed in /v1/models, and clients cannot name it.
- **Routing.** The completion and chat handlers run inside `around` (vllm_compat), which notes the
  request's body `user` field (else its request id); engine_client.generate is routed through
  `choose`, which gives requests assigned to the canary its LoRARequest instead of the current one.
  Assignment is sticky: sha256(adapter, user or request id) as a number in [0, 1) below the share goes
  to the canary, so one user always gets one version while the share stands (raising the share only
  adds users). One HTTP request is assigned once, so all its prompts run on one version. Responses
  name the adapter (the engine name NAME@ID is shown as NAME). Capture records the path the engine
  ran, so each recorded answer names the version that produced it.
- **Decisions.** After every feedback on an adapter with a running canary (coalesced) and every
  ``pointer_poll_s`` (deadlines), the rule (`vllm_surgery.canary.evaluate`) is evaluated on both
  versions' live figures (`Database.canary_counts`). A decision is written with a conditional update
  (one replica wins); then promote = the served pointer / served.json moves to the canary version by
  the hot-swap (requests in flight finish on what they started with: 0 failed, none mixed), rollback,
  expired or aborted = the canary slot is dropped (the current version never stopped serving).
- **Replicas.** A Postgres trigger notifies the served pointer's channel on every canary change; the
  replica's follower then calls `sync`, as does the periodic check, so every replica loads, re-shares
  and drops canary slots as the database says.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from ..canary import ArmCounts, CanaryRule, Verdict, evaluate
from ..errors import ConfigError
from ..storage import Canary, CanaryConflict, Database, DatabaseError, check_share
from . import metrics, vllm_compat
from .automatic_jobs import repeat
from .hotswap import ORIGINAL, HotSwapError, HotSwapper

log = logging.getLogger(f"vllm.{__name__}")

DECISION_STATES = {"promote": "promoted", "rollback": "rolled_back", "expired": "expired"}
ARMS = ("current", "canary")


@dataclass
class Assignment:
    """One HTTP request's routing: its sticky key and, per adapter, the version it was given."""

    key: str | None
    chosen: dict[str, Any] = field(default_factory=dict)


ASSIGNMENT: contextvars.ContextVar[Assignment | None] = contextvars.ContextVar(
    "vllm_surgery_canary_assignment", default=None
)


def bucket(adapter: str, key: str) -> float:
    """The sticky position of `key` for `adapter` in [0, 1): the first 8 bytes of sha256."""
    digest = hashlib.sha256(f"{adapter}\x00{key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclass
class LocalCanary:
    """A running canary this server serves: its row and the canary version's LoRARequest."""

    canary: Canary
    request: Any
    path: str


class CanaryController:
    """The canaries of one API server (module docstring)."""

    def __init__(self, swapper: HotSwapper, db: Database) -> None:
        self.swapper = swapper
        self.db = db
        self.settings = swapper.settings
        self._local: dict[str, LocalCanary] = {}
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._dirty: set[str] = set()
        self._evaluating: set[str] = set()
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        swapper.extra_paths = self.paths_in_use  # snapshots a canary serves are never cleaned up

    # ------------------------------------------------------------------ routing (event loop, hot path)
    def paths_in_use(self) -> set[str]:
        return {c.path for c in tuple(self._local.values())}

    @contextlib.contextmanager
    def around(self, request: Any, raw_request: Any) -> Iterator[None]:
        """Around one completion or chat handler call: note its sticky key."""
        user, request_id = vllm_compat.request_routing_key(request, raw_request)
        token = ASSIGNMENT.set(Assignment(user or request_id))
        try:
            yield
        finally:
            ASSIGNMENT.reset(token)

    def choose(self, lora_request: Any) -> Any:
        """The LoRARequest the engine runs for a request that asked for `lora_request`."""
        if not self._local:
            return lora_request
        name = vllm_compat.public_name(lora_request)
        local = self._local.get(name)
        assignment = ASSIGNMENT.get()
        if local is None or assignment is None:
            return lora_request
        if name not in assignment.chosen:
            canary = assignment.key is not None and bucket(name, assignment.key) < local.canary.share
            assignment.chosen[name] = local.request if canary else None
            metrics.CANARY_REQUESTS.labels(name, "canary" if canary else "current").inc()
        chosen = assignment.chosen[name]
        return chosen if chosen is not None else lora_request

    # ------------------------------------------------------------------ the state
    def _current_version(self, name: str) -> str:
        """The version `name` serves now (blocking)."""
        path = self.swapper.served_path(name)
        if path is not None:
            version = self.swapper.version_of(name, path)
            if version is not None:
                return version
        if self.swapper.shared:
            pointer = self.db.served_pointer(name)
            return pointer.version if pointer is not None else ORIGINAL
        return self.swapper.store.served_version_id(name) or ORIGINAL

    async def _load(self, canary: Canary) -> LocalCanary:
        """Load the canary version into the engine as its own slot (the hot-swap's checks, never
        forced). Raises HotSwapError."""
        name = canary.adapter
        path, _ = await asyncio.to_thread(
            self.swapper.validated_target, name, canary.canary_version, force=False
        )
        models = self.swapper.models
        request = vllm_compat.version_lora_request(name, str(path), vllm_compat.next_lora_id(models))
        try:
            await vllm_compat.add_lora(models, request)
        except Exception as e:
            raise HotSwapError(
                f"vLLM refused to load {path} for the canary of {name!r}: {e}", 500, "failed"
            ) from e
        local = LocalCanary(canary, request, str(path))
        self._local[name] = local
        metrics.CANARY_SHARE.labels(name).set(canary.share)
        metrics.CANARY_RUNNING.labels(name).set(1)
        log.info(
            "adapter %r: canary %d serves %s to %.1f%% of requests beside %s",
            name,
            canary.id,
            canary.canary_version,
            100 * canary.share,
            canary.current_version,
        )
        return local

    def _drop(self, name: str) -> None:
        local = self._local.pop(name, None)
        if local is not None:
            metrics.clear_canary(name)
            log.info("adapter %r: canary %d's slot dropped", name, local.canary.id)

    async def sync(self) -> None:
        """Serve what the database says: load running canaries of this server's adapters, follow share
        changes, drop ended ones. Raises DatabaseError when the canaries cannot be read."""
        rows = {c.adapter: c for c in await asyncio.to_thread(self.db.running_canaries)}
        for name in list(self._local):
            if name not in rows:
                async with self._locks[name]:
                    self._drop(name)
        for name, canary in rows.items():
            if await asyncio.to_thread(self.swapper.find_original, name) is None:
                continue  # not an adapter of this server
            async with self._locks[name]:
                local = self._local.get(name)
                if local is not None and local.canary.id == canary.id:
                    if local.canary.revision != canary.revision:
                        local.canary = canary
                        metrics.CANARY_SHARE.labels(name).set(canary.share)
                    continue
                self._drop(name)
                try:
                    await self._load(canary)
                except HotSwapError as e:
                    log.error(
                        "adapter %r: cannot serve canary %d (%s): %s",
                        name,
                        canary.id,
                        canary.canary_version,
                        e,
                    )

    # ------------------------------------------------------------------ operator and job actions
    def rule(self) -> CanaryRule:
        """The rule of the canary settings (`ServingSettings.canary_rule`)."""
        return self.settings.canary_rule()

    async def start(
        self, name: str, version: str, share: float, *, by: str = "admin", job_id: int | None = None
    ) -> Canary:
        """Start a canary of `version` of `name` at `share` beside the version served now. Raises
        HotSwapError: 400 (bad share), 404, 409 (a canary runs already; the version is the one served,
        stale or not accepted by the gate), 422 (corrupt), 500 (engine refused: the canary is aborted),
        503 (database)."""
        try:
            share = check_share(share)
        except ValueError as e:
            raise HotSwapError(str(e), HTTPStatus.BAD_REQUEST, "invalid") from e
        await asyncio.to_thread(self.swapper.original_of, name)
        await asyncio.to_thread(self.swapper.validated_target, name, version, force=False)
        try:
            current = await asyncio.to_thread(self._current_version, name)
        except DatabaseError as e:
            raise HotSwapError(f"adapter {name!r}: {e}", 503, "unavailable") from e
        if current == version:
            raise HotSwapError(
                f"adapter {name!r} serves {version!r} already: nothing to compare it with", 409, "conflict"
            )
        rule = dataclasses.asdict(self.rule())
        try:
            canary = await asyncio.to_thread(
                lambda: self.db.start_canary(name, current, version, share, rule, by=by, job_id=job_id)
            )
        except CanaryConflict as e:
            raise HotSwapError(str(e), HTTPStatus.CONFLICT, "conflict") from e
        except DatabaseError as e:
            raise HotSwapError(
                f"adapter {name!r}: the canary could not be recorded: {e}", 503, "unavailable"
            ) from e
        log.info(
            "adapter %r: canary %d started by %s: %s at share %g beside %s (rule %s)",
            name,
            canary.id,
            by,
            version,
            share,
            current,
            rule,
        )
        async with self._locks[name]:
            self._drop(name)
            try:
                await self._load(canary)
            except HotSwapError as e:
                verdict = {"decision": "aborted", "reason": str(e)}
                await asyncio.to_thread(
                    lambda: self.db.decide_canary(canary.id, "aborted", verdict, by="server")
                )
                metrics.CANARY_DECISIONS.labels(name, "aborted").inc()
                raise
        return canary

    async def set_share(self, name: str, share: float, *, by: str = "admin") -> Canary:
        """Change the running canary's share. Raises HotSwapError 400, 404, 409 (none running), 503."""
        try:
            share = check_share(share)
        except ValueError as e:
            raise HotSwapError(str(e), HTTPStatus.BAD_REQUEST, "invalid") from e
        canary = await self._running(name)
        try:
            updated = await asyncio.to_thread(lambda: self.db.set_canary_share(canary.id, share, by=by))
        except CanaryConflict as e:
            raise HotSwapError(str(e), HTTPStatus.CONFLICT, "conflict") from e
        log.info("adapter %r: canary %d's share %g -> %g (by %s)", name, canary.id, canary.share, share, by)
        async with self._locks[name]:
            local = self._local.get(name)
            if local is not None and local.canary.id == updated.id:
                local.canary = updated
                metrics.CANARY_SHARE.labels(name).set(share)
        return updated

    async def _running(self, name: str) -> Canary:
        await asyncio.to_thread(self.swapper.original_of, name)
        try:
            canary = await asyncio.to_thread(self.db.running_canary, name)
        except DatabaseError as e:
            raise HotSwapError(f"adapter {name!r}: {e}", 503, "unavailable") from e
        if canary is None:
            raise HotSwapError(f"adapter {name!r} has no running canary", HTTPStatus.CONFLICT, "conflict")
        return canary

    async def promote(self, name: str, *, by: str = "admin") -> Canary:
        """An operator promotes the running canary (the rule's figures are recorded with it)."""
        canary = await self._running(name)
        verdict = await asyncio.to_thread(self.verdict, canary)
        return await self._decide(canary, "promoted", verdict.to_dict(), by, f"promoted by {by}")

    async def abort(self, name: str, *, by: str = "admin") -> Canary:
        """An operator ends the running canary; the current version stays."""
        canary = await self._running(name)
        verdict = await asyncio.to_thread(self.verdict, canary)
        return await self._decide(canary, "aborted", verdict.to_dict(), by, f"aborted by {by}")

    async def _decide(self, canary: Canary, state: str, verdict: dict[str, Any], by: str, why: str) -> Canary:
        """Write the decision (conditional: one replica wins), then act on it here. Raises
        HotSwapError (409: decided meanwhile; the promote's swap errors)."""
        name = canary.adapter
        if (
            state == "promoted"
        ):  # the swap's own checks first: never end a canary on a version that cannot serve
            await asyncio.to_thread(self.swapper.validated_target, name, canary.canary_version, force=False)
        verdict = {**verdict, "decision": state, "reason": f"{why}: {verdict.get('reason', '')}".rstrip(": ")}
        try:
            decided = await asyncio.to_thread(lambda: self.db.decide_canary(canary.id, state, verdict, by=by))
        except DatabaseError as e:
            raise HotSwapError(
                f"adapter {name!r}: the decision could not be recorded: {e}", 503, "unavailable"
            ) from e
        if decided is None:
            raise HotSwapError(
                f"canary {canary.id} of {name!r} was decided meanwhile", HTTPStatus.CONFLICT, "conflict"
            )
        if state != "promoted":  # a promotion is counted once its swap went through (or stands)
            metrics.CANARY_DECISIONS.labels(name, state).inc()
        log.warning(
            "adapter %r: canary %d (%s beside %s) %s: %s; figures %s",
            name,
            canary.id,
            canary.canary_version,
            canary.current_version,
            state,
            verdict.get("reason"),
            verdict.get("figures"),
        )
        if state == "promoted":
            # the served pointer / served.json moves by the hot-swap; then the canary slot goes (requests
            # given it meanwhile ran the very version now served)
            ended: str | None = "promoted"
            try:
                await self.swapper.swap(name, canary.canary_version, by=f"canary {canary.id}")
            except Exception as e:  # HotSwapError, or an error no check expected: the same question
                ended = await self._promotion_failed(canary, verdict, e)
                raise
            finally:
                if ended is not None:  # once, as what it ended as
                    metrics.CANARY_DECISIONS.labels(name, ended).inc()
                async with self._locks[name]:
                    self._drop(name)
        else:
            async with self._locks[name]:
                self._drop(name)
        return decided

    async def _promotion_failed(
        self, canary: Canary, verdict: dict[str, Any], error: Exception
    ) -> str | None:
        """The promotion was written, then its hot-swap failed. Where nothing will serve the canary's
        version (one machine, or a shared pointer that could not be written), the decision is amended to
        aborted, with the swap's error as its reason: the version served before still serves, and the
        canary must not read as promoted. Where the shared pointer names the version, every replica
        follows it and this one retries at its next poll: the promotion stands. Where the database
        cannot be read or written (an outage), it stays promoted, logged. Returns the state it ended as
        (promoted or aborted; None when it was changed meanwhile: not counted here)."""
        name = canary.adapter
        try:
            pointed = await asyncio.to_thread(self.swapper.pointed_version, name)
        except (DatabaseError, HotSwapError) as e:
            log.error(
                "adapter %r: canary %d was promoted but its hot-swap failed (%s), and the served pointer "
                "cannot be read (%s): it stays promoted; check GET /v1/surgery/adapters/%s",
                name,
                canary.id,
                error,
                e,
                name,
            )
            return "promoted"
        if pointed == canary.canary_version:
            log.error(
                "adapter %r: canary %d promoted: the served pointer names %s and every replica follows it; "
                "this replica's own load failed (%s) and is tried again at its next poll",
                name,
                canary.id,
                pointed,
                error,
            )
            return "promoted"
        amended = {
            **verdict,
            "decision": "aborted",
            "reason": f"promoted, but the hot-swap failed, so the version served before still serves: {error}",
        }
        try:
            done = await asyncio.to_thread(
                lambda: self.db.decide_canary(
                    canary.id, "aborted", amended, by="server", from_state="promoted"
                )
            )
        except DatabaseError as e:
            log.error(
                "adapter %r: canary %d: the failed promotion could not be amended: %s", name, canary.id, e
            )
            return "promoted"
        if done is None:  # no longer promoted: changed meanwhile, and counted by whoever changed it
            return None
        log.error(
            "adapter %r: canary %d aborted: its promotion's hot-swap failed (%s); the version served "
            "before still serves",
            name,
            canary.id,
            error,
        )
        return "aborted"

    # ------------------------------------------------------------------ the rule
    def counts(self, canary: Canary) -> tuple[ArmCounts, ArmCounts]:
        """(current, canary) live figures since the canary started (blocking)."""
        return (
            self.db.canary_counts(canary.adapter, canary.current_version, canary.started),
            self.db.canary_counts(canary.adapter, canary.canary_version, canary.started),
        )

    def verdict(self, canary: Canary, now: float | None = None) -> Verdict:
        """The rule's verdict on `canary` now (blocking), its figures exported as metrics."""
        current, candidate = self.counts(canary)
        try:
            rule = CanaryRule(**canary.rule)
        except (ConfigError, TypeError) as e:  # a row written by another version of the rule
            log.error(
                "canary %d: its rule %s is not usable (%s); using the settings'", canary.id, canary.rule, e
            )
            rule = self.rule()
        now = time.time() if now is None else now
        verdict = evaluate(current, candidate, rule, elapsed_s=now - canary.started)
        metrics.record_canary(canary.adapter, {"current": current, "canary": candidate}, verdict.figures)
        return verdict

    async def evaluate(self, name: str) -> Canary | None:
        """Evaluate the running canary of `name` and act on a decision; the decided canary or None."""
        canary = await asyncio.to_thread(self.db.running_canary, name)
        if canary is None:
            return None
        verdict = await asyncio.to_thread(self.verdict, canary)
        state = DECISION_STATES.get(verdict.decision)
        if state is None:
            return None
        try:
            return await self._decide(canary, state, verdict.to_dict(), "rule", "the rule decided")
        except HotSwapError as e:
            if e.status != HTTPStatus.CONFLICT or "decided meanwhile" not in str(e):
                log.error("adapter %r: canary %d: acting on %s failed: %s", name, canary.id, state, e)
            return None

    def feedback_arrived(self, name: str) -> None:
        """A feedback on `name` was stored: evaluate its canary soon (coalesced; on the event loop)."""
        if name not in self._local:
            return  # no canary here (one this server cannot serve is evaluated by the periodic check)
        self._dirty.add(name)
        if name not in self._evaluating:
            self._evaluating.add(name)
            asyncio.get_running_loop().create_task(self._evaluate_dirty(name))

    async def _evaluate_dirty(self, name: str) -> None:
        try:
            while name in self._dirty:
                self._dirty.discard(name)
                try:
                    await self.evaluate(name)
                except DatabaseError as e:
                    log.warning("adapter %r: the canary cannot be evaluated now: %s", name, e)
        finally:
            self._evaluating.discard(name)

    # ------------------------------------------------------------------ the periodic check
    async def check(self) -> None:
        """Sync with the database, then evaluate every running canary (deadlines, metrics)."""
        await self.sync()
        for name in list(self._local):
            await self.evaluate(name)

    async def run(self) -> None:
        """Forever: `check` every pointer_poll_s."""
        await repeat(self.check, self.settings.pointer_poll_s, "canaries")

    def start_checks(self) -> asyncio.Task:
        """Start the periodic check on the running loop (once)."""
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self.run(), name="vllm-surgery-canaries")
        return self._task

    def sync_from_thread(self, timeout: float) -> None:
        """`sync` on the server's loop, from another thread (the follower); waits up to `timeout`."""
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.sync(), self._loop).result(timeout=timeout)

    # ------------------------------------------------------------------ the view
    def describe(self, name: str, history: int = 5) -> dict[str, Any]:
        """The canary part of GET /v1/surgery/adapters/NAME (blocking): the running canary with both
        versions' live figures and the rule's figures, and the latest decisions."""
        try:
            running = self.db.running_canary(name)
            past = [c for c in self.db.canary_history(name, history + 1) if not c.running][:history]
        except DatabaseError as e:
            return {"canary": None, "canary_error": str(e)}
        out: dict[str, Any] = {"canary": None, "canary_history": [c.to_dict() for c in past]}
        if running is not None:
            verdict = self.verdict(running)
            local = self._local.get(name)
            out["canary"] = {
                **running.to_dict(),
                "served_here": local is not None and local.canary.id == running.id,
                "figures": verdict.figures,
                "verdict_now": {
                    "decision": verdict.decision,
                    "better": verdict.better,
                    "reason": verdict.reason,
                },
            }
        return out
