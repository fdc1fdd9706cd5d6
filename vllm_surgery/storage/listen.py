"""LISTEN for served-pointer changes on Postgres (`pointer.POINTER_CHANNEL`).

A replica's follower waits here for the trigger's notifications. LISTEN belongs to a session, so the
listener has its own connection, never one from the pool (a pooled connection is another session on
every borrow, and a transaction-mode pooler in front of Postgres would drop the LISTEN). A
notification sent while the connection is down is lost: `wait` reports a (re)connection, and the
caller reads every pointer again then; it also polls the table every few seconds whatever arrives.
Imported only for Postgres (psycopg is the ``postgres`` extra).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg

from .database import DatabaseError
from .pointer import POINTER_CHANNEL

log = logging.getLogger(f"vllm.{__name__}")

CONNECT_TIMEOUT_S = 10


@dataclass(frozen=True)
class PointerEvents:
    """What one `PointerListener.wait` saw: `connected` (the session is new: anything may have changed
    while it was down, read every pointer) and the adapters whose pointer was notified."""

    connected: bool = False
    adapters: frozenset[str] = field(default_factory=frozenset)


class PointerListener:
    """A session-level connection LISTENing on the pointer channel. One thread uses it."""

    def __init__(self, url: str, shown: str, scrub: Callable[[str], str] = lambda text: text) -> None:
        self.url = url
        self.shown = shown  # the URL without its password, for messages
        self._scrub = scrub
        self._conn: psycopg.Connection | None = None

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    def _connect(self) -> None:
        try:
            conn = psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT_S,
                application_name="vllm-surgery-pointer-listener",
            )
            conn.execute(f"LISTEN {POINTER_CHANNEL}")
        except psycopg.Error as e:
            raise DatabaseError(
                f"{self.shown}: cannot LISTEN for served-pointer changes: {self._scrub(str(e).strip())}"
            ) from e
        self._conn = conn

    def wait(self, timeout: float) -> PointerEvents:
        """Wait up to `timeout` seconds for notifications; returns at the first (and whatever else has
        arrived by then). Not connected (first call, or the connection broke): connect, LISTEN and
        return at once with ``connected=True``. Raises DatabaseError when the server cannot be reached
        (the next call tries again)."""
        if not self.connected:
            self.close()
            self._connect()
            return PointerEvents(connected=True)
        assert self._conn is not None
        names: set[str] = set()
        try:
            for note in self._conn.notifies(timeout=timeout, stop_after=1):
                names.add(note.payload)
            if names:  # others that arrived with it
                for note in self._conn.notifies(timeout=0.001):
                    names.add(note.payload)
            else:  # notifies() returns quietly when the connection dies: find out now
                self._conn.execute("SELECT 1")
        except psycopg.Error as e:
            log.warning("%s: the served-pointer listener lost its connection (%s)", self.shown, e)
            self.close()
            self._connect()
            return PointerEvents(connected=True)
        return PointerEvents(adapters=frozenset(names))

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()
