"""The replica's follower: serve what the shared served pointer names (many replicas, one Postgres).

A thread of the API-server process. It LISTENs for the pointer trigger's notifications on its own
session connection (`storage.listen`, never a pooled one), and reads every pointer again on each
notification, on each (re)connection (a notification sent while it was disconnected is lost) and every
``pointer_poll_s`` seconds whatever arrived (the backstop). For every adapter this replica has loaded
whose served version differs from its pointer, it runs the local hot-swap (`HotSwapper.follow`: the
same validation as a swap, a version the gate did not accept only when the pointer says forced, a
stale one never) on the server's event loop, and waits for it.

A replica that cannot fetch or validate the pointer's version keeps serving the one it has and says
so: in its log (once per pointer revision), in ``vllm_surgery_pointer_follows_total{outcome="failed"}``
and ``vllm_surgery_replica_in_sync`` (0), and in its row of the replicas table, which GET
/v1/surgery/adapters/NAME lists (state ``failed`` with the error; ``behind`` for a retryable failure,
such as the engine refusing the load). It tries again at every poll, so a version that becomes
servable (its copy repaired) is picked up without a restart.

An adapter without a pointer row serves its original (as the resolver does). Adapters not loaded yet
are left alone: their first request resolves them, and the resolver reads the
pointer then. Canaries (`canaries`) notify the same channel: after the pointers, the follower has the
server's canary controller load, re-share or drop canary slots as the database says. The replica's rows are written when what it serves, its state or its error changes, and
at least every `REPORT_EVERY_S` (so `seen_at` shows it is alive).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from ..storage import Database, DatabaseError, ServedPointer
from . import metrics
from .hotswap import ORIGINAL, HotSwapError, HotSwapper

log = logging.getLogger(f"vllm.{__name__}")

REPORT_EVERY_S = 30.0
FOLLOW_TIMEOUT_S = 300.0  # one local swap (snapshot copy, validation, engine load)
RETRY_S = 1.0  # after the database could not be reached


class PointerFollower:
    """Follows the served pointers of `db` for the adapters of `swapper` (module docstring); `loop` is
    the server's event loop, where swaps run."""

    def __init__(
        self,
        swapper: HotSwapper,
        db: Database,
        replica_id: str,
        poll_s: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.swapper = swapper
        self.db = db
        self.replica_id = replica_id
        self.poll_s = poll_s
        self.loop = loop
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported: dict[str, tuple[Any, ...]] = {}  # adapter -> (version, state, error), time
        self._logged: dict[str, tuple[int, str]] = {}  # adapter -> (revision, state) already logged
        self.canaries: Any = None  # the server's CanaryController, set once it runs

    def start(self) -> threading.Thread:
        """Start the thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="vllm-surgery-pointer-follower", daemon=True
            )
            self._thread.start()
        return self._thread

    def stop(self) -> None:
        """Ask the thread to end (within a poll interval)."""
        self._stop.set()

    def _run(self) -> None:
        listener = self.db.listener()
        down_since: float | None = None
        try:
            while not self._stop.is_set():
                try:
                    events = listener.wait(self.poll_s)
                except DatabaseError as e:
                    metrics.POINTER_LISTENER_UP.set(0)
                    if down_since is None:
                        down_since = time.monotonic()
                        log.error(
                            "replica %s: cannot listen for served-pointer changes (%s); polling, and "
                            "reconnecting every %g s",
                            self.replica_id,
                            e,
                            RETRY_S,
                        )
                    self.sync()  # the poll still works if only the listener's connection failed
                    self._stop.wait(RETRY_S)
                    continue
                metrics.POINTER_LISTENER_UP.set(1)
                if events.adapters:
                    log.debug(
                        "replica %s: served pointer changed: %s", self.replica_id, sorted(events.adapters)
                    )
                if events.connected and down_since is not None:
                    log.info(
                        "replica %s: listening for served-pointer changes again (after %.1f s); reading "
                        "every pointer",
                        self.replica_id,
                        time.monotonic() - down_since,
                    )
                    down_since = None
                self.sync()
        except Exception:
            log.exception("replica %s: the served-pointer follower stopped", self.replica_id)
            raise
        finally:
            metrics.POINTER_LISTENER_UP.set(0)
            listener.close()

    def sync(self) -> None:
        """Read every pointer and follow each that this replica serves otherwise (blocking: waits for
        the swaps). Never raises: a database error is logged and the next wake-up tries again."""
        try:
            pointers = {p.adapter: p for p in self.db.served_pointers()}
        except DatabaseError as e:
            log.warning("replica %s: cannot read the served pointers: %s", self.replica_id, e)
            return
        for name in self.swapper.loaded_names():  # no pointer yet: the original, as the resolver serves
            pointers.setdefault(name, ServedPointer(name, ORIGINAL, None, False, 0, 0.0, "nobody"))
        for pointer in pointers.values():
            try:
                self._follow(pointer)
            except DatabaseError as e:
                log.warning("replica %s: cannot report on %r: %s", self.replica_id, pointer.adapter, e)
            except Exception:
                log.exception(
                    "replica %s: following the pointer of %r failed", self.replica_id, pointer.adapter
                )
        if self.canaries is not None:  # canary changes notify the same channel (storage.canary)
            try:
                self.canaries.sync_from_thread(FOLLOW_TIMEOUT_S)
            except Exception as e:
                log.warning("replica %s: cannot follow the canaries now: %s", self.replica_id, e)

    def _follow(self, pointer: ServedPointer) -> None:
        name = pointer.adapter
        if self.swapper.find_original(name) is None:
            return  # not an adapter of this replica
        path = self.swapper.served_path(name)
        if path is None:
            return  # not loaded: its first request resolves it, reading the pointer
        current = self.swapper.version_of(name, path)
        if current == pointer.version:
            metrics.record_follow(name, None, True)
            self._report(name, current, "in_sync", None)
            return
        future = asyncio.run_coroutine_threadsafe(
            self.swapper.follow(name, pointer.version, pointer.forced), self.loop
        )
        try:
            result = future.result(timeout=FOLLOW_TIMEOUT_S)
        except (HotSwapError, TimeoutError) as e:
            state = "failed" if isinstance(e, HotSwapError) and e.status < 500 else "behind"
            error = str(e) or f"the swap took longer than {FOLLOW_TIMEOUT_S:g} s"
            if self._logged.get(name) != (pointer.revision, state):
                self._logged[name] = (pointer.revision, state)
                log.error(
                    "replica %s: adapter %r: cannot serve %s, which the served pointer names (revision %d, "
                    "by %s); still serving %s: %s",
                    self.replica_id,
                    name,
                    pointer.version,
                    pointer.revision,
                    pointer.set_by,
                    current,
                    error,
                )
            metrics.record_follow(name, state, False)
            self._report(name, current, state, error)
            return
        self._logged.pop(name, None)
        if result.version != pointer.version:
            return  # the pointer moved meanwhile: its newer change is followed on its own notification
        log.info(
            "replica %s: adapter %r follows the served pointer (revision %d, by %s): %s -> %s in %.3f s",
            self.replica_id,
            name,
            pointer.revision,
            pointer.set_by,
            current,
            pointer.version,
            result.seconds,
        )
        metrics.record_follow(name, "swapped" if result.changed else None, True)
        self._report(name, pointer.version, "in_sync", None)

    def _report(self, name: str, version: str | None, state: str, error: str | None) -> None:
        """Write this replica's row for `name` when it changed or is older than REPORT_EVERY_S."""
        now = time.monotonic()
        last = self._reported.get(name)
        if last is not None and last[0] == (version, state, error) and now - last[1] < REPORT_EVERY_S:
            return
        self.db.report_replica(self.replica_id, name, version, state, error)
        self._reported[name] = ((version, state, error), now)
