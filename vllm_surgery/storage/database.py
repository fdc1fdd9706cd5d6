"""The plugin's database: recorded traffic and feedback, and the refinement job queue (`job_queue`),
behind one small interface.

`Database` is the interface every caller uses (the traffic writer, the feedback route, the CLI, the
calibration export, the job routes, the worker); `SQLiteDatabase` is the embedded implementation. A server database for many
replicas can implement the same methods later without touching the callers.

SQLite choices, and why:

- WAL journal: readers (the CLI, the feedback route) never block the writer thread and vice versa,
  and several processes (API servers, the CLI, a worker) can use one file. Every connection sets a
  busy timeout, so a writer that finds the file locked waits instead of failing.
- ``synchronous=NORMAL`` in WAL mode: a transaction that has committed survives a crash or SIGKILL of
  the process (the WAL is in the OS page cache, and SQLite recovers it on the next open); only a power
  loss or OS crash can lose the last transactions. That is the bound the traffic log documents.
- Versioned schema: ``PRAGMA user_version`` is the schema version; `MIGRATIONS` lists every step, and
  opening a database applies the missing ones, each in its own ``BEGIN IMMEDIATE`` transaction (so two
  processes opening the file at once cannot both apply a step). A database written by a newer version
  of this package (user_version above the last migration here) is refused rather than misread.
- One connection per thread (`connection()`), and one transaction helper (`transaction()`, which takes
  the write lock at BEGIN so that a transaction never fails half-way on a lock upgrade). New tables
  add a `Migration` and use the same helper, as the job queue (migration 2) does.
- Threads of one process take turns at the write lock in arrival order (`FifoLock`, one per file)
  before BEGIN. SQLite's busy handler is not a queue: a waiter sleeps (up to 100 ms between tries) and
  a thread that writes in a loop takes the lock again before it wakes, so one busy thread (a retention
  sweep, a claim loop) could hold another back until the busy timeout. Other processes still meet at
  the busy handler; a sweep rests between its batches for them (`counters.AdaptiveBatch`).

Times are Unix seconds (float). Prompts and sampling settings are stored as JSON text.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import SurgeryError
from . import canary as _canary
from . import counters
from . import pointer as _pointer
from .canary import CanaryStates
from .job_queue import FINISHED_STATES, JOBS_CANCEL_MIGRATION, JOBS_SCHEMA, JobQueue, SQLiteJobQueue
from .pointer import PointerBackend, ServedPointers
from .usable import LATEST_ANY_FEEDBACK, LATEST_FEEDBACK, USABLE_BY_FEEDBACK, USABLE_UNRATED

BUSY_TIMEOUT_S = 30.0
CLIENT_WINDOW_S = 3600.0  # how long a client's correction counts toward its bound
RATINGS = ("good", "bad")


class FifoLock:
    """A lock granted in the order it was asked for (`threading.Lock` promises no order). Why the
    database needs one: the module docstring. `acquire` gives up after `timeout` seconds."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._holder: int | None = None  # the holding thread's ident
        self._waiters: list[tuple[threading.Event, int]] = []

    def held_here(self) -> bool:
        """Whether the calling thread holds the lock."""
        return self._holder == threading.get_ident()

    def acquire(self, timeout: float) -> bool:
        """Take the lock, after every thread that asked before; False if `timeout` passed first."""
        me = threading.get_ident()
        with self._mutex:
            if self._holder is None and not self._waiters:
                self._holder = me
                return True
            turn = (threading.Event(), me)
            self._waiters.append(turn)
        try:
            if turn[0].wait(timeout):
                return True
        except BaseException:  # interrupted while waiting: leave the queue, or pass on a lock just given
            with self._mutex:
                if turn in self._waiters:
                    self._waiters.remove(turn)
                else:
                    self._hand_on()
            raise
        with self._mutex:
            if turn in self._waiters:
                self._waiters.remove(turn)
                return False
            return True  # handed over as the wait timed out: it is ours

    def release(self) -> None:
        """Hand the lock to the longest waiter, or free it."""
        with self._mutex:
            self._hand_on()

    def _hand_on(self) -> None:
        if self._waiters:
            event, self._holder = self._waiters.pop(0)  # its new holder is that waiter
            event.set()
        else:
            self._holder = None

    def _forget(self) -> None:
        """In a child made by fork: the threads that held or waited for the lock do not exist there."""
        self._mutex = threading.Lock()
        self._holder = None
        self._waiters = []


_WRITE_LOCKS: dict[str, FifoLock] = {}
_WRITE_LOCKS_MUTEX = threading.Lock()


def _after_fork_in_child() -> None:
    global _WRITE_LOCKS_MUTEX
    _WRITE_LOCKS_MUTEX = threading.Lock()
    for lock in _WRITE_LOCKS.values():
        lock._forget()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _write_lock(path: Path) -> FifoLock:
    """The process's queue for writing the database file at `path` (shared by every
    `SQLiteDatabase` of that file in this process)."""
    key = os.path.realpath(path)
    with _WRITE_LOCKS_MUTEX:
        return _WRITE_LOCKS.setdefault(key, FifoLock())


class DatabaseError(SurgeryError):
    """The database cannot be opened or used; the message names the file and the problem."""


class DatabaseUnavailable(DatabaseError):
    """The database server cannot be reached now (down, restarting, its connection broken, no pooled
    connection within the busy timeout): the same call may succeed later, unlike a refused statement.
    Raised by the Postgres backend; a SQLite file raises DatabaseError."""


class UnknownRequest(DatabaseError):
    """No recorded request has this id (and choice)."""


@dataclass(frozen=True)
class Migration:
    """One schema step: `statements` run in one transaction (then `fill`, given the connection, for
    what SQL alone cannot do), then the schema version becomes `version`."""

    version: int
    description: str
    statements: tuple[str, ...]
    fill: Callable[[Any], None] | None = None


# The bytes a record's stored text takes (`record_bytes` computes the same in Python) and a feedback
# row's (its correction): what the `bytes` column holds and retention by bytes counts.
RECORD_BYTES = (
    "(COALESCE(length(CAST(prompt AS BLOB)), 0) + length(CAST(completion AS BLOB)) "
    "+ length(CAST(sampling AS BLOB)))"
)
FEEDBACK_BYTES = "COALESCE(length(CAST(correction AS BLOB)), 0)"

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "recorded traffic (one row per returned choice) and feedback (history kept, latest wins)",
        (
            """CREATE TABLE traffic (
                id INTEGER PRIMARY KEY,
                request_id TEXT NOT NULL,
                response_id TEXT,
                choice INTEGER NOT NULL,
                adapter TEXT NOT NULL,
                version TEXT NOT NULL,
                served_path TEXT,
                endpoint TEXT NOT NULL CHECK (endpoint IN ('completions', 'chat')),
                prompt TEXT,
                completion TEXT NOT NULL,
                finish_reason TEXT,
                sampling TEXT NOT NULL,
                prompt_tokens INTEGER,
                completion_tokens INTEGER,
                calibratable INTEGER NOT NULL,
                created REAL NOT NULL
            )""",
            "CREATE INDEX traffic_request_id ON traffic (request_id)",
            "CREATE INDEX traffic_response_id ON traffic (response_id)",
            "CREATE INDEX traffic_adapter ON traffic (adapter)",
            "CREATE INDEX traffic_adapter_created ON traffic (adapter, created)",
            """CREATE TABLE feedback (
                id INTEGER PRIMARY KEY,
                traffic_id INTEGER NOT NULL REFERENCES traffic (id) ON DELETE CASCADE,
                rating TEXT CHECK (rating IN ('good', 'bad')),
                correction TEXT,
                created REAL NOT NULL,
                CHECK (rating IS NOT NULL OR correction IS NOT NULL)
            )""",
            "CREATE INDEX feedback_traffic ON feedback (traffic_id, id)",
        ),
    ),
    Migration(
        2,
        "refinement jobs (queue with leases, heartbeats, bounded attempts, one running job per adapter)",
        JOBS_SCHEMA,
    ),
    Migration(3, "jobs can be cancelled (state 'cancelled', column cancel_requested)", JOBS_CANCEL_MIGRATION),
    Migration(
        4,
        "bounds and trust: bytes of each record's stored text (with its feedback), whose feedback counts "
        "as calibration data (trusted) and from which client, and the secret that turns identifiers "
        "holding personal data into stable pseudonyms",
        (
            "ALTER TABLE traffic ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE feedback ADD COLUMN trusted INTEGER NOT NULL DEFAULT 1",
            "ALTER TABLE feedback ADD COLUMN client TEXT",
            "CREATE INDEX traffic_adapter_bytes ON traffic (adapter, id, bytes)",
            # one row per correction a client sent in the last hour: the per-client bound, counted
            # apart from the feedback rows (which pruning deletes: it must not reset the bound)
            "CREATE TABLE feedback_clients (client TEXT NOT NULL, created REAL NOT NULL)",
            "CREATE INDEX feedback_clients_client ON feedback_clients (client, created)",
            "CREATE INDEX feedback_clients_created ON feedback_clients (created)",
            "CREATE TABLE traffic_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            "INSERT INTO traffic_meta (key, value) VALUES ('id_secret', lower(hex(randomblob(32))))",
            f"UPDATE traffic SET bytes = {RECORD_BYTES} + (SELECT COALESCE(SUM({FEEDBACK_BYTES}), 0) "
            "FROM feedback WHERE traffic_id = traffic.id)",
        ),
    ),
    Migration(5, _pointer.DESCRIPTION, _pointer.schema(postgres=False)),
    Migration(
        6,
        "the record store at scale: per-(adapter, version) traffic counters and per-(adapter, state) job "
        "counters kept by triggers, the job stage-duration histogram's totals, and the indexes that "
        "first/last, pending swaps and the job-history pruning use (see storage/counters.py)",
        counters.sqlite_statements(USABLE_BY_FEEDBACK, USABLE_UNRATED, FINISHED_STATES),
        lambda conn: counters.fill_stage_totals(conn, "?", FINISHED_STATES),
    ),
    Migration(7, _canary.DESCRIPTION, _canary.schema(postgres=False)),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


@dataclass(frozen=True)
class TrafficRecord:
    """One returned choice of one request, as it is stored.

    `prompt` is the completions prompt of this choice (a string, or a list of token ids as the client
    sent it) or, for chat, the list of messages. `calibratable` says whether prompt and completion are
    text that a calibration file can hold (see vllm_surgery.traffic.calibration_set)."""

    request_id: str
    choice: int
    adapter: str
    version: str
    endpoint: str
    prompt: Any
    completion: str
    sampling: Mapping[str, Any]
    created: float
    calibratable: bool
    response_id: str | None = None
    served_path: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(frozen=True)
class StoredRecord:
    """A stored TrafficRecord with its row id and its latest feedback (None where there is none): the
    latest of any client, or with `Database.records(calibration=True)` the latest trusted one.
    `trusted`: whether that feedback counts as calibration data; `bytes`: its stored text's size."""

    id: int
    record: TrafficRecord
    rating: str | None = None
    correction: str | None = None
    feedback_count: int = 0
    trusted: bool | None = None
    bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        r = self.record
        return {
            "id": self.id,
            **{name: getattr(r, name) for name in TRAFFIC_COLUMNS},
            "sampling": dict(r.sampling),
            "bytes": self.bytes,
            "feedback": {
                "rating": self.rating,
                "correction": self.correction,
                "count": self.feedback_count,
                "trusted": self.trusted,
            },
        }


# The traffic table's columns are TrafficRecord's fields (plus its row id).
TRAFFIC_COLUMNS = tuple(f.name for f in fields(TrafficRecord))
_JSON_COLUMNS = ("prompt", "sampling")


@dataclass(frozen=True)
class TrafficStats:
    """Counts for one (adapter, version). `usable` follows the calibration rules (`usable`) without
    unrated records; `unrated_usable` is what --include-unrated would add."""

    adapter: str
    version: str
    records: int
    rated: int
    good: int
    bad: int
    corrected: int
    usable: int
    unrated_usable: int
    untrusted: int = 0  # records whose latest feedback is untrusted (stored, never calibration data)
    bytes: int = 0  # stored text of the records and their feedback (what retention by bytes counts)
    first: float | None = None
    last: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Retention:
    """Per-adapter retention: at most `max_records` rows holding at most `max_bytes` bytes of text, none
    older than `max_age_s` (None: no limit)."""

    max_records: int | None = None
    max_age_s: float | None = None
    max_bytes: int | None = None  # bytes of stored text (records and their feedback: `bytes` column)


class Database(JobQueue, ServedPointers, CanaryStates, ABC):
    """What the plugin, the CLI, the calibration export and the worker need from storage (the job
    queue's methods are declared by `JobQueue`, the served pointer's by `ServedPointers`, the canaries'
    by `CanaryStates`). Methods
    raise DatabaseError when the storage cannot be used."""

    # A server reached over the network, which can be unreachable for a while (DatabaseUnavailable):
    # the traffic writer then treats a long wait for it as an outage. False for a local SQLite file.
    networked: bool = False

    def answered_at(self, thread: int) -> float | None:
        """When (time.monotonic()) a call of `thread` (threading.get_ident()) last got an answer from the
        server: a networked backend tracks it, so that a long run of short calls (a retention sweep) is
        told apart from one call waiting on a server that is gone. Per thread, because other threads'
        answers say nothing of this one's connection. None: never answered, or not tracked (SQLite)."""
        return None

    @abstractmethod
    def insert(self, records: Sequence[TrafficRecord], *, ids: Sequence[int] | None = None) -> list[int]:
        """Store records in one transaction; returns their ids. `ids`: ids drawn by reserve_ids for
        these records; a record whose id is already stored is skipped, so that a batch written again
        after a commit whose answer was lost is stored once. ValueError where ids cannot be given."""

    def reserve_ids(self, n: int) -> list[int] | None:
        """Ids for `n` records to be inserted, drawn now, or None where a commit's outcome cannot be
        lost in flight (a local SQLite file: the writer that commits is the process that would see it
        fail). Postgres: a connection can drop after the server committed and before the client heard,
        so a writer retrying the batch must be able to tell (insert with `ids`)."""
        return None

    @abstractmethod
    def find(self, request_id: str, choice: int = 0) -> StoredRecord | None:
        """The latest record whose request id or response id is `request_id`, for `choice`."""

    @abstractmethod
    def add_feedback(
        self,
        record_id: int,
        rating: str | None,
        correction: str | None,
        created: float | None = None,
        *,
        trusted: bool = True,
        client: str | None = None,
        keep: int | None = None,
    ) -> int:
        """Append feedback to a record (the latest wins; history is kept, at most `keep` rows: the
        newest, and always the latest trusted one); returns the history length. `trusted`: whether it
        counts as calibration data; `client`: who sent it (a correction is counted for
        `corrections_since` for an hour, whatever pruning deletes). Raises UnknownRequest if the
        record is gone, ValueError for a rating or feedback that is not one."""

    @abstractmethod
    def corrections_since(self, client: str, since: float) -> int:
        """Corrections `client` sent after `since` (counted for an hour after each)."""

    @abstractmethod
    def id_secret(self) -> bytes:
        """This database's secret for pseudonymous identifiers (created with the schema; never shown)."""

    @abstractmethod
    def records(
        self,
        adapter: str,
        since: float | None = None,
        limit: int | None = None,
        after_id: int = 0,
        calibration: bool = False,
    ) -> list[StoredRecord]:
        """An adapter's records in id order, with their latest feedback (with `calibration`: their
        latest trusted feedback, the one the calibration rules use)."""

    @abstractmethod
    def calibration_rows(self, adapter: str, since: float | None = None) -> Iterator[CalibrationRow]:
        """An adapter's records in id order with their latest trusted feedback, only what the
        calibration rules read (`CALIBRATION_COLUMNS`, prompts as stored JSON text), streamed: SQLite
        reads `PAGE` rows per query by keyset pagination on the id, Postgres through a server-side
        cursor; memory stays one page whatever the adapter's size. For the export and the worker."""

    @abstractmethod
    def feedback_history(self, record_id: int) -> list[dict[str, Any]]:
        """Every feedback row of a record, oldest first."""

    @abstractmethod
    def stats(self, adapter: str | None = None) -> list[TrafficStats]:
        """Counts per (adapter, version), sorted."""

    @abstractmethod
    def adapters(self) -> list[str]:
        """Names of adapters with at least one record."""

    @abstractmethod
    def enforce_retention(
        self, adapter: str, retention: Retention, now: float | None = None
    ) -> tuple[int, int]:
        """Delete an adapter's records beyond its retention, oldest first (their feedback goes with
        them), in short batches, each its own transaction (counters.sweep_traffic): other writers and
        job claims interleave with a sweep of any size. Returns (records deleted, records left)."""

    @abstractmethod
    def close(self) -> None:
        """Release connections."""


# What the calibration rules read of a record (`Database.calibration_rows`): its id, endpoint, prompt
# (stored JSON text), completion, calibratable, and its latest trusted feedback's rating and correction.
CALIBRATION_COLUMNS = ("id", "endpoint", "prompt", "completion", "calibratable", "rating", "correction")
CalibrationRow = tuple[int, str, str | None, str, Any, str | None, str | None]
PAGE = 2000


def calibration_sql(ph: str, since: bool, page: bool) -> str:
    """`calibration_rows`' query (`ph`: the backend's placeholder): adapter, after_id, [since], [limit]."""
    sql = (
        "SELECT t.id, t.endpoint, t.prompt, t.completion, t.calibratable, f.rating, f.correction "
        f"FROM traffic t LEFT JOIN feedback f ON {LATEST_FEEDBACK} WHERE t.adapter = {ph} AND t.id > {ph}"
    )
    if since:
        sql += f" AND t.created >= {ph}"
    return sql + " ORDER BY t.id" + (f" LIMIT {ph}" if page else "")


# The latest feedback row of a traffic row (by id): "the latest wins". `_LATEST` of any client (shown),
# `_LATEST_TRUSTED` the latest that counts as calibration data.
_LATEST = f"LEFT JOIN feedback f ON {LATEST_ANY_FEEDBACK.replace('a.id', 'f.id')}"
_LATEST_TRUSTED = f"LEFT JOIN feedback f ON {LATEST_FEEDBACK}"
# what a traffic row counts for under its latest feedback, recomputed when feedback is added
_ROW_TALLY = counters.row_tally(USABLE_BY_FEEDBACK, USABLE_UNRATED)
_COLUMNS = ", ".join(
    [
        "t.id",
        *(f"t.{c}" for c in TRAFFIC_COLUMNS),
        "t.bytes",
        "f.rating",
        "f.correction",
        "f.trusted",
        "(SELECT COUNT(*) FROM feedback WHERE traffic_id = t.id) AS feedback_count",
    ]
)


def _to_row(record: TrafficRecord) -> tuple[Any, ...]:
    """A record's column values, in TRAFFIC_COLUMNS order (JSON columns as text), then its bytes."""
    values = {name: getattr(record, name) for name in TRAFFIC_COLUMNS}
    values["prompt"] = None if record.prompt is None else json.dumps(record.prompt, ensure_ascii=False)
    values["sampling"] = json.dumps(dict(record.sampling), ensure_ascii=False, default=str)
    values["calibratable"] = int(bool(record.calibratable))
    size = sum(len(values[k].encode("utf-8")) for k in ("prompt", "completion", "sampling") if values[k])
    return (*(values[name] for name in TRAFFIC_COLUMNS), size)


def record_bytes(record: TrafficRecord) -> int:
    """The bytes the record's text takes when stored (prompt and sampling as JSON, the completion):
    what `RECORD_BYTES` computes in SQL and the per-record limit is compared with. Raises
    UnicodeEncodeError for a lone surrogate (the writer replaces those first)."""
    return _to_row(record)[-1]


def _row_to_record(row: sqlite3.Row) -> StoredRecord:
    values = {name: row[name] for name in TRAFFIC_COLUMNS}
    for name in _JSON_COLUMNS:
        values[name] = None if values[name] is None else json.loads(values[name])
    values["calibratable"] = bool(values["calibratable"])
    trusted = None if row["trusted"] is None else bool(row["trusted"])
    return StoredRecord(
        row["id"],
        TrafficRecord(**values),
        row["rating"],
        row["correction"],
        row["feedback_count"],
        trusted,
        row["bytes"],
    )


class SQLiteDatabase(SQLiteJobQueue, Database):
    """The embedded database: one SQLite file in WAL mode (see the module docstring).

    Safe for several threads (each gets its own connection) and several processes (WAL, busy timeout,
    write transactions that take the lock at BEGIN)."""

    def __init__(self, path: str | Path, create: bool = True, busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        """Open (with `create`, create) the database at `path` and bring its schema up to date.
        Raises DatabaseError naming the file: missing (create=False), unreadable, not a database, or
        written by a newer version."""
        self.path = Path(path).expanduser()
        self.busy_timeout_s = busy_timeout_s
        self._write_lock = _write_lock(self.path)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        if not self.path.exists():
            if not create:
                raise DatabaseError(f"{self.path}: no database here (nothing has been recorded yet?)")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # Recorded prompts are private: the file is created 0600 before SQLite opens it, and
                # SQLite gives its -wal and -shm files the database file's permissions.
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass
            except OSError as e:
                raise DatabaseError(f"{self.path}: cannot create it ({e.strerror or e})") from e
        try:
            self._migrate()
        except sqlite3.DatabaseError as e:
            self.close()
            raise DatabaseError(f"{self.path}: cannot be used as the traffic database ({e})") from e

    # ------------------------------------------------------------------ connections and transactions
    def connection(self) -> sqlite3.Connection:
        """This thread's connection (autocommit mode: use `transaction()` to group writes)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise DatabaseError(f"{self.path}: database is closed")
            try:
                conn = sqlite3.connect(
                    self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
                )
                conn.row_factory = sqlite3.Row  # rows by column name (and by index)
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
                conn.execute("PRAGMA foreign_keys = ON")
                conn.execute("PRAGMA synchronous = NORMAL")
            except sqlite3.Error as e:
                raise DatabaseError(f"{self.path}: cannot open ({e})") from e
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE: the write lock is taken at once, after this process's
        earlier writers (`FifoLock`), waiting up to the busy timeout); committed on success, rolled back
        on any exception. Raises DatabaseError for SQLite errors and when the lock stays taken past
        the busy timeout."""
        conn = self.connection()
        if self._write_lock.held_here():
            # a transaction inside one of this thread's own: BEGIN fails at once (same connection) or
            # waits for the outer one (another `SQLiteDatabase` of the file), as without the queue
            with self._raw_transaction(conn) as inner:
                yield inner
            return
        if not self._write_lock.acquire(self.busy_timeout_s):
            raise DatabaseError(
                f"{self.path}: cannot begin a transaction (other threads of this process kept the write "
                f"lock for the whole busy timeout, {self.busy_timeout_s:g} s)"
            )
        try:
            with self._raw_transaction(conn) as c:
                yield c
        finally:
            self._write_lock.release()

    @contextlib.contextmanager
    def _raw_transaction(self, conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT on `conn` (ROLLBACK on any exception); SQLite errors as
        DatabaseError naming the file."""
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise DatabaseError(f"{self.path}: cannot begin a transaction ({e})") from e
        try:
            yield conn
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise DatabaseError(f"{self.path}: {e}") from e
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise DatabaseError(f"{self.path}: commit failed ({e})") from e

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        try:
            return self.connection().execute(sql, params).fetchall()
        except sqlite3.Error as e:
            raise DatabaseError(f"{self.path}: query failed ({e})") from e

    def _migrate(self) -> None:
        conn = self.connection()
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise DatabaseError(f"{self.path}: cannot switch to WAL mode (journal_mode is {mode})")
        if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return
        for migration in MIGRATIONS:
            with self.transaction() as c:
                current = c.execute("PRAGMA user_version").fetchone()[0]
                if current > SCHEMA_VERSION:
                    raise DatabaseError(
                        f"{self.path}: schema version {current} was written by a newer vllm-surgery "
                        f"(this one knows up to {SCHEMA_VERSION}); upgrade vllm-surgery"
                    )
                if current >= migration.version:
                    continue
                if current != migration.version - 1:
                    raise DatabaseError(f"{self.path}: schema version {current} has no migration path")
                for statement in migration.statements:
                    c.execute(statement)
                if migration.fill is not None:
                    migration.fill(c)
                c.execute(f"PRAGMA user_version = {migration.version}")

    def schema_version(self) -> int:
        return self._query("PRAGMA user_version")[0][0]

    def integrity_check(self) -> str:
        """SQLite's own check of the whole file: 'ok' when intact."""
        return "; ".join(str(r[0]) for r in self._query("PRAGMA integrity_check"))

    # ------------------------------------------------------------------ traffic
    def insert(self, records: Sequence[TrafficRecord], *, ids: Sequence[int] | None = None) -> list[int]:
        if ids is not None:
            raise ValueError("SQLite draws record ids itself (reserve_ids gives none): insert without ids")
        rows = [(*_to_row(r), counters.insert_tally(r.calibratable, r.completion)) for r in records]
        sql = (
            f"INSERT INTO traffic ({', '.join(TRAFFIC_COLUMNS)}, bytes, tally) "
            f"VALUES ({', '.join('?' * (len(TRAFFIC_COLUMNS) + 2))})"
        )
        ids = []
        with self.transaction() as c:
            for row in rows:
                ids.append(int(c.execute(sql, row).lastrowid))
        return ids

    def find(self, request_id: str, choice: int = 0) -> StoredRecord | None:
        rows = self._query(
            f"SELECT {_COLUMNS} FROM traffic t {_LATEST} "
            "WHERE (t.request_id = ? OR t.response_id = ?) AND t.choice = ? ORDER BY t.id DESC LIMIT 1",
            (request_id, request_id, choice),
        )
        return _row_to_record(rows[0]) if rows else None

    def add_feedback(
        self,
        record_id: int,
        rating: str | None,
        correction: str | None,
        created: float | None = None,
        *,
        trusted: bool = True,
        client: str | None = None,
        keep: int | None = None,
    ) -> int:
        if rating is not None and rating not in RATINGS:
            raise ValueError(f"rating must be one of {RATINGS}, got {rating!r}")
        if rating is None and correction is None:
            raise ValueError("feedback needs a rating or a correction")
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep!r}")
        with self.transaction() as c:
            if c.execute("SELECT 1 FROM traffic WHERE id = ?", (record_id,)).fetchone() is None:
                raise UnknownRequest(f"record {record_id} no longer exists (removed by retention?)")
            c.execute(
                "INSERT INTO feedback (traffic_id, rating, correction, created, trusted, client, adapter) "
                "VALUES (?,?,?,?,?,?,(SELECT adapter FROM traffic WHERE id = ?))",
                (
                    record_id,
                    rating,
                    correction,
                    time.time() if created is None else created,
                    int(trusted),
                    client,
                    record_id,
                ),
            )
            if client is not None and correction is not None:
                now = time.time()
                c.execute("DELETE FROM feedback_clients WHERE created < ?", (now - CLIENT_WINDOW_S,))
                c.execute("INSERT INTO feedback_clients (client, created) VALUES (?, ?)", (client, now))
            if keep is not None:
                # the newest `keep` rows stay, and the latest trusted one: an untrusted client's flood
                # can never push a reviewer's correction out of the calibration data
                c.execute(
                    "DELETE FROM feedback WHERE traffic_id = ? "
                    "AND id NOT IN (SELECT id FROM feedback WHERE traffic_id = ? ORDER BY id DESC LIMIT ?) "
                    "AND id != COALESCE((SELECT MAX(id) FROM feedback WHERE traffic_id = ? AND trusted), -1)",
                    (record_id, record_id, keep, record_id),
                )
            # its bytes and what it counts for change in the same transaction (the counters' triggers)
            c.execute(
                f"UPDATE traffic SET bytes = {RECORD_BYTES} + (SELECT COALESCE(SUM({FEEDBACK_BYTES}), 0) "
                f"FROM feedback WHERE traffic_id = traffic.id), tally = {_ROW_TALLY} WHERE id = ?",
                (record_id,),
            )
            return c.execute("SELECT COUNT(*) FROM feedback WHERE traffic_id = ?", (record_id,)).fetchone()[0]

    def corrections_since(self, client: str, since: float) -> int:
        return self._query(
            "SELECT COUNT(*) FROM feedback_clients WHERE client = ? AND created > ?", (client, since)
        )[0][0]

    def id_secret(self) -> bytes:
        secret = getattr(self, "_id_secret", None)
        if secret is None:
            rows = self._query("SELECT value FROM traffic_meta WHERE key = 'id_secret'")
            if not rows:
                raise DatabaseError(f"{self.path}: the identifier secret is missing (traffic_meta)")
            secret = self._id_secret = bytes.fromhex(rows[0][0])
        return secret

    def calibration_rows(self, adapter: str, since: float | None = None) -> Iterator[CalibrationRow]:
        after = 0
        sql = calibration_sql("?", since is not None, page=True)
        while True:
            params = (adapter, after, since, PAGE) if since is not None else (adapter, after, PAGE)
            rows = self._query(sql, params)
            for row in rows:
                yield tuple(row)
            if len(rows) < PAGE:
                return
            after = rows[-1][0]

    def feedback_history(self, record_id: int) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT rating, correction, created, trusted FROM feedback WHERE traffic_id = ? ORDER BY id",
            (record_id,),
        )
        return [{"rating": r, "correction": c, "created": t, "trusted": bool(u)} for r, c, t, u in rows]

    def records(
        self,
        adapter: str,
        since: float | None = None,
        limit: int | None = None,
        after_id: int = 0,
        calibration: bool = False,
    ) -> list[StoredRecord]:
        join = _LATEST_TRUSTED if calibration else _LATEST
        sql = f"SELECT {_COLUMNS} FROM traffic t {join} WHERE t.adapter = ? AND t.id > ?"
        params: list[Any] = [adapter, after_id]
        if since is not None:
            sql += " AND t.created >= ?"
            params.append(since)
        sql += " ORDER BY t.id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [_row_to_record(r) for r in self._query(sql, params)]

    def stats(self, adapter: str | None = None) -> list[TrafficStats]:
        # from the counters (storage/counters.py): no scan of the records, whatever their number
        rows = self._query(
            counters.stats_sql("?", adapter is not None), () if adapter is None else (adapter,)
        )
        return [TrafficStats(*row) for row in rows]

    def adapters(self) -> list[str]:
        return [r[0] for r in self._query(counters.ADAPTERS_SQL)]

    def enforce_retention(
        self, adapter: str, retention: Retention, now: float | None = None
    ) -> tuple[int, int]:
        return counters.sweep_traffic(self, "?", adapter, retention, now)

    def _read_all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self._query(sql, params)

    def _read_one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._query(sql, params)[0]

    def _pointer_backend(self) -> PointerBackend:
        # BEGIN IMMEDIATE holds the database's only write lock: writers of one adapter are serialised
        return PointerBackend(self._query, self.transaction, lambda conn, adapter: None, postgres=False)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._all = self._all, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()
