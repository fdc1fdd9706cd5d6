"""The Postgres backend: `PostgresDatabase` implements `Database` (traffic, feedback) and `JobQueue`
(refinement jobs) with the SQLite backend's semantics, for many vLLM replicas and workers sharing one
server. Opened by `open_database` for a ``postgresql://`` URL; needs psycopg 3 (the ``postgres`` extra).

Choices, and why:

- **A connection pool (psycopg_pool), not one connection per thread.** The callers are the traffic
  writer thread, the event loop's ``asyncio.to_thread`` calls (up to 32 executor threads), the worker
  and its heartbeat threads (a new one per job). One connection per thread would hold up to ~35
  server connections per process, never give back those of threads that ended, and stay broken
  after a server restart. The pool bounds a process to `max_connections` (default 10; callers wait
  up to `busy_timeout_s` for one, as SQLite callers wait for its lock), checks a connection before
  lending it (a restarted server costs no failed request), and closes idle extras. Every method
  borrows a connection for one statement or one transaction, so no state lives between calls.
- **Transactions are READ COMMITTED**, each write one short transaction (`transaction()`).
- **Job claims** take the row with ``SELECT ... FOR UPDATE SKIP LOCKED`` inside the claiming
  ``UPDATE``: two workers never block on, nor take, the same job. A queued job is claimable only as
  its adapter's oldest queued job, with no running job of that adapter: when one worker's claim holds
  an adapter's oldest job, another's SKIP LOCKED passes over it and must not take that adapter's next
  job (it would run first: the order of one adapter's jobs broken), so it takes another adapter's.
  The partial unique index "one running job per adapter" still holds whatever happens: a claim whose
  update fails on it (another worker made a job of that adapter running at the same instant) is
  retried, and then sees the running job. Leases, heartbeats, bounded attempts and owner-only
  updates are the SQLite statements' (`job_queue` docstring); times are the writing process's wall
  clock, as there.
- **Enqueue with a dedupe key** takes a transaction-scoped advisory lock on the key, so two replicas
  enqueuing one key at once create one job (SQLite gets this from its single writer). **Enqueue with
  a bound** (``max_queued``) takes one on the adapter (after the key's), so that two processes
  counting one adapter's jobs at once never both pass the bound.
- **Cancel** (schema version 3): a queued job becomes ``cancelled`` in one ``UPDATE``; a running one
  is marked (``cancel_requested``) and its worker ends it. A cancel racing a claim either waits for
  the claim's row lock and then finds the job running (so marks it), or holds the row, and the claim
  skips it.
- **Versioned schema**: the ``schema_version`` table holds a row per applied migration (`MIGRATIONS`,
  the same version numbers as SQLite's: a version means the same tables in both). Each missing step is
  applied in its own transaction under an advisory lock (`MIGRATION_LOCK`), so two processes opening
  a fresh database at once apply each step once; a database whose schema is newer than this package
  is refused by name, never misread.
- **Bounds and trust** (schema version 4): the identifier secret is made by the server (SHA-256 of
  three gen_random_uuid(), from its strong random source; no pgcrypto); a record's ``bytes`` are
  those of its stored text (octet_length: a NUL stored as U+FFFD counts its 3 bytes); adding feedback
  locks the record's row, so its history pruning and bytes are one writer's at a time.
- **Types**: ids are identity BIGINTs, times DOUBLE PRECISION Unix seconds, `calibratable` a BOOLEAN,
  prompts, sampling settings and job specs/results JSON text (as in SQLite: read back exactly as
  written). Postgres text cannot hold NUL characters: in stored text they become U+FFFD, as the
  traffic writer does with lone surrogates (SQLite keeps them).
- **Errors** are DatabaseError naming the server as ``postgresql://user@host:port/dbname`` (never
  the password) and the problem; a psycopg error's own message is kept, with any password removed.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from . import counters
from .canary import DESCRIPTION as CANARY_DESCRIPTION
from .canary import schema as canary_schema
from .database import (
    _COLUMNS,
    _LATEST,
    _LATEST_TRUSTED,
    BUSY_TIMEOUT_S,
    CLIENT_WINDOW_S,
    PAGE,
    RATINGS,
    TRAFFIC_COLUMNS,
    CalibrationRow,
    Database,
    DatabaseError,
    DatabaseUnavailable,
    Migration,
    Retention,
    StoredRecord,
    TrafficRecord,
    TrafficStats,
    UnknownRequest,
    _row_to_record,
    _to_row,
    calibration_sql,
)
from .job_queue import (
    _COLUMNS as _JOB_COLUMNS,
)
from .job_queue import (
    CANCELLED_QUEUED,
    CANCELLED_RUNNING,
    DEFAULT_MAX_ATTEMPTS,
    FINISHED_STATES,
    Job,
    JobFigures,
    JobQueueFull,
    _job,
    check_finish,
    check_swap,
    check_trigger,
    job_figures,
    usable_since,
)
from .pointer import DESCRIPTION as POINTER_DESCRIPTION
from .pointer import PointerBackend
from .pointer import schema as pointer_schema
from .urls import redact_url
from .usable import USABLE_BY_FEEDBACK as _SQLITE_USABLE_BY_FEEDBACK
from .usable import USABLE_UNRATED as _SQLITE_USABLE_UNRATED

CONNECT_TIMEOUT_S = 10
MAX_CONNECTIONS = 10
CLAIM_RETRIES = 10
# pg_advisory_xact_lock keys: the schema migration lock, and the namespace of dedupe-key locks.
MIGRATION_LOCK = int.from_bytes(b"vsurgmig", "big")
DEDUPE_LOCK_SPACE = int.from_bytes(b"vsdk", "big")
# the namespace of per-adapter locks around enqueue_job(max_queued=...)'s count and insert
ADAPTER_LOCK_SPACE = int.from_bytes(b"vsad", "big")
# the namespace of per-adapter locks around a served-pointer write
POINTER_LOCK_SPACE = int.from_bytes(b"vspt", "big")

_SQLITE_NOT_BLANK = re.compile(r"TRIM\(([\w.]+), char\(([\d, ]+)\)\) != ''")


def postgres_spelling(condition: str) -> str:
    """A usable-example condition of `usable` (SQLite's SQL) in Postgres's: ``TRIM(x, char(32, 9))``
    becomes ``BTRIM(x, chr(32) || chr(9))`` (Postgres's chr() takes one code) and ``ELSE 0`` becomes
    ``ELSE false`` (a boolean CASE). Derived, not rewritten, so that the rule stays written once; the
    tests check the counts against the export on both backends. Raises ValueError if SQLite's
    spelling changed in a way this does not know."""
    translated = _SQLITE_NOT_BLANK.sub(
        lambda m: f"BTRIM({m[1]}, {' || '.join(f'chr({c.strip()})' for c in m[2].split(','))}) <> ''",
        condition,
    ).replace(" ELSE 0 END", " ELSE false END")
    if "char(" in translated or " ELSE 0" in translated:
        raise ValueError(f"cannot spell this usable-example condition for Postgres: {condition}")
    return translated


USABLE_BY_FEEDBACK = postgres_spelling(_SQLITE_USABLE_BY_FEEDBACK)
USABLE_UNRATED = postgres_spelling(_SQLITE_USABLE_UNRATED)
# what a traffic row counts for under its latest feedback, recomputed when feedback is added
_ROW_TALLY = counters.row_tally(USABLE_BY_FEEDBACK, USABLE_UNRATED)

# The bytes of a record's stored text and of a feedback row's correction (database.RECORD_BYTES and
# FEEDBACK_BYTES: SQLite's length(CAST(x AS BLOB)) is Postgres's octet_length, UTF-8 bytes in both).
RECORD_BYTES = "(COALESCE(octet_length(prompt), 0) + octet_length(completion) + octet_length(sampling))"
FEEDBACK_BYTES = "COALESCE(octet_length(correction), 0)"

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "recorded traffic (one row per returned choice) and feedback (history kept, latest wins)",
        (
            """CREATE TABLE traffic (
                id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
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
                calibratable BOOLEAN NOT NULL,
                created DOUBLE PRECISION NOT NULL
            )""",
            "CREATE INDEX traffic_request_id ON traffic (request_id)",
            "CREATE INDEX traffic_response_id ON traffic (response_id)",
            "CREATE INDEX traffic_adapter ON traffic (adapter)",
            "CREATE INDEX traffic_adapter_created ON traffic (adapter, created)",
            """CREATE TABLE feedback (
                id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                traffic_id BIGINT NOT NULL REFERENCES traffic (id) ON DELETE CASCADE,
                rating TEXT CHECK (rating IN ('good', 'bad')),
                correction TEXT,
                created DOUBLE PRECISION NOT NULL,
                CHECK (rating IS NOT NULL OR correction IS NOT NULL)
            )""",
            "CREATE INDEX feedback_traffic ON feedback (traffic_id, id)",
        ),
    ),
    Migration(
        2,
        "refinement jobs (queue with leases, heartbeats, bounded attempts, one running job per adapter)",
        (
            # the states and triggers as version 2 knew them (a released migration never changes)
            """CREATE TABLE jobs (
                id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                adapter TEXT NOT NULL,
                trigger TEXT NOT NULL CHECK (trigger IN ('manual', 'first_load', 'new_data')),
                state TEXT NOT NULL
                    CHECK (state IN ('queued', 'running', 'accepted', 'kept_original', 'failed')),
                spec TEXT NOT NULL,
                dedupe_key TEXT,
                created DOUBLE PRECISION NOT NULL,
                started DOUBLE PRECISION,
                finished DOUBLE PRECISION,
                lease_owner TEXT,
                lease_expires DOUBLE PRECISION,
                heartbeat DOUBLE PRECISION,
                attempts INTEGER NOT NULL DEFAULT 0,
                max_attempts INTEGER NOT NULL CHECK (max_attempts >= 1),
                error TEXT,
                result TEXT,
                swap TEXT CHECK (swap IS NULL OR swap IN ('pending', 'done', 'failed', 'superseded',
                                                          'not_requested')),
                swap_error TEXT,
                CHECK ((state = 'running') = (lease_owner IS NOT NULL AND lease_expires IS NOT NULL))
            )""",
            "CREATE UNIQUE INDEX jobs_one_running_per_adapter ON jobs (adapter) WHERE state = 'running'",
            "CREATE UNIQUE INDEX jobs_active_dedupe_key ON jobs (dedupe_key) "
            "WHERE dedupe_key IS NOT NULL AND state IN ('queued', 'running')",
            "CREATE INDEX jobs_dedupe_key ON jobs (dedupe_key)",
            "CREATE INDEX jobs_state ON jobs (state, id)",
            "CREATE INDEX jobs_adapter ON jobs (adapter, id)",
            "CREATE INDEX feedback_created ON feedback (created)",
        ),
    ),
    Migration(
        3,
        "jobs can be cancelled (state 'cancelled', column cancel_requested)",
        (
            # Postgres changes a CHECK constraint in place (SQLite rebuilds the table); jobs_state_check
            # is the name Postgres gave version 2's column constraint
            "ALTER TABLE jobs DROP CONSTRAINT jobs_state_check",
            "ALTER TABLE jobs ADD CONSTRAINT jobs_state_check "
            "CHECK (state IN ('queued', 'running', 'accepted', 'kept_original', 'failed', 'cancelled'))",
            "ALTER TABLE jobs ADD COLUMN cancel_requested DOUBLE PRECISION",
        ),
    ),
    Migration(
        4,
        "bounds and trust: bytes of each record's stored text (with its feedback), whose feedback counts "
        "as calibration data (trusted) and from which client, and the secret that turns identifiers "
        "holding personal data into stable pseudonyms",
        (
            "ALTER TABLE traffic ADD COLUMN bytes BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE feedback ADD COLUMN trusted BOOLEAN NOT NULL DEFAULT true",
            "ALTER TABLE feedback ADD COLUMN client TEXT",
            "CREATE INDEX traffic_adapter_bytes ON traffic (adapter, id, bytes)",
            # one row per correction a client sent in the last hour: the per-client bound, counted
            # apart from the feedback rows (which pruning deletes: it must not reset the bound)
            "CREATE TABLE feedback_clients (client TEXT NOT NULL, created DOUBLE PRECISION NOT NULL)",
            "CREATE INDEX feedback_clients_client ON feedback_clients (client, created)",
            "CREATE INDEX feedback_clients_created ON feedback_clients (created)",
            "CREATE TABLE traffic_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            # 32 bytes as 64 lowercase hex digits, as SQLite's lower(hex(randomblob(32))): the SHA-256
            # of three version-4 UUIDs (366 bits from the server's pg_strong_random; both functions are
            # built in since Postgres 13, no pgcrypto)
            "INSERT INTO traffic_meta (key, value) VALUES ('id_secret', encode(sha256(convert_to("
            "gen_random_uuid()::text || gen_random_uuid()::text || gen_random_uuid()::text, 'UTF8')), 'hex'))",
            f"UPDATE traffic SET bytes = {RECORD_BYTES} + (SELECT COALESCE(SUM({FEEDBACK_BYTES}), 0) "
            "FROM feedback WHERE traffic_id = traffic.id)",
        ),
    ),
    Migration(5, POINTER_DESCRIPTION, pointer_schema(postgres=True)),
    Migration(
        6,
        "the record store at scale: per-(adapter, version) traffic counters and per-(adapter, state) job "
        "counters kept by triggers, the job stage-duration histogram's totals, and the indexes that "
        "first/last, pending swaps and the job-history pruning use (see storage/counters.py)",
        counters.postgres_statements(USABLE_BY_FEEDBACK, USABLE_UNRATED, FINISHED_STATES),
        lambda conn: counters.fill_stage_totals(conn, "%s", FINISHED_STATES),
    ),
    Migration(7, CANARY_DESCRIPTION, canary_schema(postgres=True)),
)

_SCHEMA_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied DOUBLE PRECISION NOT NULL
)"""


_CALIBRATABLE = TRAFFIC_COLUMNS.index("calibratable")
_ADAPTER = TRAFFIC_COLUMNS.index("adapter")
_VERSION = TRAFFIC_COLUMNS.index("version")


def _text(value: Any) -> Any:
    """A string Postgres can store (NUL characters become U+FFFD); anything else as it is."""
    if isinstance(value, str) and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


_BYTES_OF = tuple(TRAFFIC_COLUMNS.index(name) for name in ("prompt", "completion", "sampling"))


def _pg_row(record: TrafficRecord) -> list[Any]:
    """A record's column values (TRAFFIC_COLUMNS, then bytes) as Postgres stores them: its bytes are
    those of the stored text (a NUL that became U+FFFD counts 3 bytes), as RECORD_BYTES recomputes them
    when feedback is added."""
    row = [_text(v) for v in _to_row(record)]
    row[_CALIBRATABLE] = bool(record.calibratable)
    row[-1] = sum(len(row[i].encode("utf-8")) for i in _BYTES_OF if row[i])
    return row


def _json(value: Mapping[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(dict(value), ensure_ascii=False, default=str)


def describe(url: str) -> str:
    """``postgresql://user@host:port/dbname`` for `url`, without its password (what messages show)."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.Error:
        return redact_url(url)
    user = f"{info['user']}@" if info.get("user") else ""
    host = info.get("host") or "localhost"
    if "," in host or host.startswith("/"):
        host = f"[{host}]"
    return (
        f"postgresql://{user}{host}:{info.get('port') or 5432}/{info.get('dbname') or info.get('user') or ''}"
    )


#: `n` fresh traffic ids (the sequence is not transactional: ids drawn are never given again)
_NEXT_TRAFFIC_IDS = "SELECT nextval(pg_get_serial_sequence('traffic', 'id')) FROM generate_series(1, %s)"


class PostgresDatabase(Database):
    """Traffic, feedback and the job queue in a Postgres database (see the module docstring).

    Safe for several threads (a bounded connection pool) and several processes and machines (row
    locks, SKIP LOCKED claims, advisory locks around migrations and dedupe keys)."""

    def __init__(
        self,
        url: str,
        create: bool = True,
        busy_timeout_s: float = BUSY_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        """Connect to the database `url` names (``postgresql://user[:password]@host:port/dbname``; a
        password is better given by PGPASSWORD or ~/.pgpass) and bring its schema up to date (with
        `create` False, a database without this package's tables is refused instead).

        Raises DatabaseError naming the server and the problem: unreachable or refusing the login,
        no such database, no tables (create=False), or a schema written by a newer vllm-surgery."""
        self.url = url.strip()
        self.path = describe(self.url)  # the name logs and messages show, as SQLiteDatabase's path
        try:
            self._password = conninfo_to_dict(self.url).get("password") or ""
        except psycopg.Error as e:
            raise DatabaseError(
                f"{redact_url(self.url)}: not a valid Postgres URL ({self._scrub(str(e))}); "
                "expected postgresql://user@host:port/dbname"
            ) from e
        self.busy_timeout_s = busy_timeout_s
        self._closed = False
        self._pool: ConnectionPool | None = None
        self._answered: dict[int, float] = {}  # thread ident -> its last answer (`answered_at`)
        extra: dict[str, Any] = {"application_name": "vllm-surgery"}
        if "connect_timeout" not in conninfo_to_dict(self.url):
            extra["connect_timeout"] = CONNECT_TIMEOUT_S
        try:
            with psycopg.connect(self.url, autocommit=True, **extra) as conn:
                self._migrate(conn, create)
        except psycopg.Error as e:
            raise self._error("cannot be used as the traffic database", e) from e
        self._pool = ConnectionPool(
            self.url,
            min_size=1,
            max_size=max_connections,
            kwargs={"autocommit": True, **extra},
            timeout=busy_timeout_s,
            check=ConnectionPool.check_connection,
            name="vllm-surgery",
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=float(extra.get("connect_timeout", CONNECT_TIMEOUT_S)) + 5)
        except psycopg.Error as e:
            self._pool.close()
            raise self._error("cannot open a connection pool", e) from e

    # ------------------------------------------------------------------ errors
    def _scrub(self, text: str) -> str:
        password = getattr(self, "_password", "")
        return text.replace(password, "***") if password else text

    def _error(self, problem: str, error: BaseException) -> DatabaseError:
        detail = self._scrub(str(error).strip()) or type(error).__name__
        hint, kind = "", DatabaseError
        if isinstance(error, psycopg.OperationalError) and "does not exist" in detail:
            hint = " (create it first: createdb, or CREATE DATABASE)"
        elif isinstance(error, psycopg.OperationalError):
            # a broken connection, a server that refuses connections or a pool that found none in
            # time: the caller may retry (the pool checks connections and reconnects by itself)
            hint = " (is the server running and reachable, and are the user and password right?)"
            kind = DatabaseUnavailable
        return kind(f"{self.path}: {problem}: {detail}{hint}")

    # ------------------------------------------------------------------ connections and transactions
    @contextlib.contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        if self._closed or self._pool is None:
            raise DatabaseError(f"{self.path}: database is closed")
        thread = threading.get_ident()
        with self._pool.connection() as conn:
            self._answered[thread] = time.monotonic()  # the pool handed over a checked connection
            yield conn
        self._answered[thread] = time.monotonic()  # the call's work (and commit) went through

    def answered_at(self, thread: int) -> float | None:
        return self._answered.get(thread)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        """A write transaction on a pooled connection (``%s`` placeholders); committed on success,
        rolled back on any exception. Raises DatabaseError for psycopg errors (the server's message
        kept: a constraint that failed is named)."""
        try:
            with self._connection() as conn, conn.transaction():
                yield conn
        except psycopg.Error as e:
            raise self._error("transaction failed", e) from e

    def _rows(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        try:
            with self._connection() as conn:
                return conn.cursor(row_factory=dict_row).execute(sql, params).fetchall()
        except psycopg.Error as e:
            raise self._error("query failed", e) from e

    def _tuples(self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> list[tuple]:
        try:
            with self._connection() as conn:
                return conn.execute(sql, params).fetchall()
        except psycopg.Error as e:
            raise self._error("query failed", e) from e

    @staticmethod
    def _current(conn: psycopg.Connection) -> int | None:
        """The schema version, or None when the database has no schema_version table."""
        if conn.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None:
            return None
        return conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]

    def _migrate(self, conn: psycopg.Connection, create: bool) -> None:
        migrations = MIGRATIONS  # read at call time: tests add a step
        latest = migrations[-1].version
        current = self._current(conn)
        if current == latest:
            return
        if current is None and not create:
            raise DatabaseError(
                f"{self.path}: no database here: it has no vllm-surgery tables (nothing has been "
                "recorded yet?)"
            )
        for migration in migrations:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                conn.execute(_SCHEMA_TABLE)
                current = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]
                if current > latest:
                    raise DatabaseError(
                        f"{self.path}: schema version {current} was written by a newer vllm-surgery "
                        f"(this one knows up to {latest}); upgrade vllm-surgery"
                    )
                if current >= migration.version:
                    continue
                if current != migration.version - 1:
                    raise DatabaseError(f"{self.path}: schema version {current} has no migration path")
                for statement in migration.statements:
                    conn.execute(statement)
                if migration.fill is not None:
                    migration.fill(conn)
                conn.execute(
                    "INSERT INTO schema_version (version, description, applied) VALUES (%s, %s, %s)",
                    (migration.version, migration.description, time.time()),
                )

    def schema_version(self) -> int:
        """The version of the newest applied migration."""
        return self._tuples("SELECT COALESCE(MAX(version), 0) FROM schema_version")[0][0]

    # ------------------------------------------------------------------ traffic
    def reserve_ids(self, n: int) -> list[int]:
        """`n` ids from the traffic sequence, ascending (Database.reserve_ids says why)."""
        return sorted(int(r["nextval"]) for r in self._rows(_NEXT_TRAFFIC_IDS, (int(n),)))

    def insert(self, records: Sequence[TrafficRecord], *, ids: Sequence[int] | None = None) -> list[int]:
        """Store records in one transaction; returns their ids. With `ids` (reserve_ids), a record whose
        id is stored already is skipped: a batch written again after a lost commit answer is stored
        once (its counters too: the counting triggers see inserted rows only). Raises ValueError when a
        record holds a value Postgres cannot store (nothing of the batch is stored) or ids do not match
        the records, DatabaseError otherwise."""
        rows = [[*_pg_row(r), counters.insert_tally(r.calibratable, r.completion)] for r in records]
        if ids is not None and len(ids) != len(rows):
            raise ValueError(f"{len(ids)} ids for {len(rows)} records")
        if not rows:
            return []
        sql = (
            f"INSERT INTO traffic (id, {', '.join(TRAFFIC_COLUMNS)}, bytes, tally) "
            f"VALUES ({', '.join(['%s'] * (len(TRAFFIC_COLUMNS) + 3))}) ON CONFLICT (id) DO NOTHING"
        )
        # Each row's statement moves its (adapter, version) counter row, locked until commit. Rows are
        # written in (adapter, version) order, the order every writer takes counter rows in (the
        # triggers sort theirs the same way: COLLATE "C" is code-point order, Python's), so two
        # writers never wait on each other in a cycle; the ids, drawn first, keep the batch's order.
        order = sorted(range(len(rows)), key=lambda i: (rows[i][_ADAPTER], rows[i][_VERSION]))
        try:
            with self.transaction() as conn:
                if ids is None:
                    ids = sorted(int(r[0]) for r in conn.execute(_NEXT_TRAFFIC_IDS, (len(rows),)).fetchall())
                given = list(ids)
                conn.cursor().executemany(sql, [[given[i], *rows[i]] for i in order])
        except DatabaseError as e:
            if isinstance(e.__cause__, psycopg.DataError):
                # a value this database cannot hold (a number out of range): a fault of the record, not
                # of the database, as SQLite's ValueError/TypeError is (the traffic writer then writes
                # the batch record by record, losing only that one)
                raise ValueError(str(e)) from e
            raise
        return list(ids)

    def find(self, request_id: str, choice: int = 0) -> StoredRecord | None:
        rows = self._rows(
            f"SELECT {_COLUMNS} FROM traffic t {_LATEST} "
            "WHERE (t.request_id = %s OR t.response_id = %s) AND t.choice = %s ORDER BY t.id DESC LIMIT 1",
            (_text(request_id), _text(request_id), choice),
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
        with self.transaction() as conn:
            # the row lock keeps retention from deleting the record between the check and the insert,
            # and makes one record's feedback one writer at a time (its pruning and its bytes)
            if (
                conn.execute("SELECT 1 FROM traffic WHERE id = %s FOR NO KEY UPDATE", (record_id,)).fetchone()
                is None
            ):
                raise UnknownRequest(f"record {record_id} no longer exists (removed by retention?)")
            conn.execute(
                "INSERT INTO feedback (traffic_id, rating, correction, created, trusted, client, adapter) "
                "VALUES (%s, %s, %s, %s, %s, %s, (SELECT adapter FROM traffic WHERE id = %s))",
                (
                    record_id,
                    rating,
                    _text(correction),
                    time.time() if created is None else created,
                    bool(trusted),
                    _text(client),
                    record_id,
                ),
            )
            if client is not None and correction is not None:
                now = time.time()
                conn.execute("DELETE FROM feedback_clients WHERE created < %s", (now - CLIENT_WINDOW_S,))
                conn.execute(
                    "INSERT INTO feedback_clients (client, created) VALUES (%s, %s)", (_text(client), now)
                )
            if keep is not None:
                # the newest `keep` rows stay, and the latest trusted one: an untrusted client's flood
                # can never push a reviewer's correction out of the calibration data
                conn.execute(
                    "DELETE FROM feedback WHERE traffic_id = %(id)s AND id NOT IN "
                    "(SELECT id FROM feedback WHERE traffic_id = %(id)s ORDER BY id DESC LIMIT %(keep)s) "
                    "AND id <> COALESCE((SELECT MAX(id) FROM feedback WHERE traffic_id = %(id)s AND trusted), -1)",
                    {"id": record_id, "keep": int(keep)},
                )
            # its bytes and what it counts for change in the same transaction (the counters' triggers)
            conn.execute(
                f"UPDATE traffic SET bytes = {RECORD_BYTES} + (SELECT COALESCE(SUM({FEEDBACK_BYTES}), 0) "
                f"FROM feedback WHERE traffic_id = traffic.id), tally = {_ROW_TALLY} WHERE id = %s",
                (record_id,),
            )
            return conn.execute(
                "SELECT COUNT(*) FROM feedback WHERE traffic_id = %s", (record_id,)
            ).fetchone()[0]

    def corrections_since(self, client: str, since: float) -> int:
        return self._tuples(
            "SELECT COUNT(*) FROM feedback_clients WHERE client = %s AND created > %s", (_text(client), since)
        )[0][0]

    def id_secret(self) -> bytes:
        secret = getattr(self, "_id_secret", None)
        if secret is None:
            rows = self._tuples("SELECT value FROM traffic_meta WHERE key = 'id_secret'")
            if not rows:
                raise DatabaseError(f"{self.path}: the identifier secret is missing (traffic_meta)")
            secret = self._id_secret = bytes.fromhex(rows[0][0])
        return secret

    def calibration_rows(self, adapter: str, since: float | None = None) -> Iterator[CalibrationRow]:
        # one snapshot, read PAGE rows per round trip by a server-side (named) cursor
        sql = calibration_sql("%s", since is not None, page=False)
        params = (_text(adapter), 0, since) if since is not None else (_text(adapter), 0)
        try:
            with (
                self._connection() as conn,
                conn.transaction(),
                conn.cursor(name="vllm_surgery_calibration") as cur,
            ):
                cur.itersize = PAGE
                cur.execute(sql, params)
                yield from cur
        except psycopg.Error as e:
            raise self._error("query failed", e) from e

    def feedback_history(self, record_id: int) -> list[dict[str, Any]]:
        rows = self._tuples(
            "SELECT rating, correction, created, trusted FROM feedback WHERE traffic_id = %s ORDER BY id",
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
        sql = f"SELECT {_COLUMNS} FROM traffic t {join} WHERE t.adapter = %s AND t.id > %s"
        params: list[Any] = [_text(adapter), after_id]
        if since is not None:
            sql += " AND t.created >= %s"
            params.append(since)
        sql += " ORDER BY t.id"
        if limit is not None:
            sql += " LIMIT %s"
            params.append(int(limit))
        return [_row_to_record(r) for r in self._rows(sql, params)]

    def stats(self, adapter: str | None = None) -> list[TrafficStats]:
        # from the counters (storage/counters.py): no scan of the records, whatever their number
        rows = self._tuples(
            counters.stats_sql("%s", adapter is not None), () if adapter is None else (_text(adapter),)
        )
        return [TrafficStats(*row) for row in rows]

    def adapters(self) -> list[str]:
        return [r[0] for r in self._tuples(counters.ADAPTERS_SQL)]

    def enforce_retention(
        self, adapter: str, retention: Retention, now: float | None = None
    ) -> tuple[int, int]:
        return counters.sweep_traffic(self, "%s", _text(adapter), retention, now)

    def _read_all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self._tuples(sql, params)

    def _read_one(self, sql: str, params: Sequence[Any] = ()) -> tuple:
        return self._tuples(sql, params)[0]

    # ------------------------------------------------------------------ jobs
    def enqueue_job(
        self,
        adapter: str,
        trigger: str,
        spec: Mapping[str, Any],
        dedupe_key: str | None = None,
        *,
        once: bool = False,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        max_queued: int | None = None,
        now: float | None = None,
    ) -> tuple[Job, bool]:
        check_trigger(trigger)
        text = _json(spec)
        with self.transaction() as conn:
            cur = conn.cursor(row_factory=dict_row)
            if dedupe_key is not None:
                # one enqueuer of a key at a time, across processes: the check and the insert are one step
                cur.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (DEDUPE_LOCK_SPACE, dedupe_key))
                active = "" if once else "AND state IN ('queued', 'running')"
                row = cur.execute(
                    f"SELECT {_JOB_COLUMNS} FROM jobs WHERE dedupe_key = %s {active} ORDER BY id DESC LIMIT 1",
                    (dedupe_key,),
                ).fetchone()
                if row is not None:
                    return _job(row), False
            if max_queued is not None:
                # one bounded enqueuer of an adapter at a time, across processes: under READ COMMITTED
                # two transactions would each count the jobs committed before either inserted, and both
                # pass the bound. The lock is taken after the dedupe key's (always in this order), and
                # the count, a new statement, sees every job committed by the lock's previous holder.
                cur.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (ADAPTER_LOCK_SPACE, adapter))
                active = cur.execute(
                    "SELECT COUNT(*) AS n FROM jobs WHERE adapter = %s AND state IN ('queued', 'running')",
                    (adapter,),
                ).fetchone()["n"]
                if active >= max_queued:
                    raise JobQueueFull(adapter, int(max_queued))
            row = cur.execute(
                "INSERT INTO jobs (adapter, trigger, state, spec, dedupe_key, created, max_attempts) "
                f"VALUES (%s, %s, 'queued', %s, %s, %s, %s) RETURNING {_JOB_COLUMNS}",
                (adapter, trigger, text, dedupe_key, time.time() if now is None else now, int(max_attempts)),
            ).fetchone()
        return _job(row), True

    def claim_job(self, owner: str, lease_s: float, now: float | None = None) -> Job | None:
        for attempt in range(CLAIM_RETRIES):
            try:
                with self.transaction() as conn:
                    # the time of this try, once it has a connection (the pool may make it wait; a
                    # retry follows a wait on the other worker's claim): the lease runs from the claim
                    params = {
                        "owner": owner,
                        "now": time.time() if now is None else now,
                        "lease": float(lease_s),
                    }
                    conn.execute(
                        "UPDATE jobs SET state = 'failed', finished = %(now)s, lease_owner = NULL, "
                        "lease_expires = NULL, error = 'its worker stopped ' || attempts || ' time(s) without "
                        "finishing (killed, crashed or out of host memory; last worker ' || lease_owner || "
                        "'): given up after ' || max_attempts || ' attempt(s); see the worker logs, and queue "
                        "it again once the cause is fixed' "
                        "WHERE state = 'running' AND lease_expires < %(now)s AND attempts >= max_attempts",
                        params,
                    )
                    # a cancelled job whose worker died before it could stop it is not taken up again
                    conn.execute(
                        "UPDATE jobs SET state = 'cancelled', finished = %(now)s, lease_owner = NULL, "
                        "lease_expires = NULL, error = %(error)s "
                        "WHERE state = 'running' AND lease_expires < %(now)s AND cancel_requested IS NOT NULL",
                        {**params, "error": CANCELLED_RUNNING},
                    )
                    row = (
                        conn.cursor(row_factory=dict_row)
                        .execute(
                            "UPDATE jobs SET state = 'running', lease_owner = %(owner)s, "
                            "lease_expires = %(now)s + %(lease)s, heartbeat = %(now)s, started = %(now)s, "
                            "attempts = attempts + 1 WHERE id = (SELECT j.id FROM jobs j "
                            "WHERE (j.state = 'running' AND j.lease_expires < %(now)s) "
                            # a queued job only when its adapter has no running job and no older
                            # queued one: SKIP LOCKED passes over the oldest one when another claim
                            # holds it, and its adapter's next job must not run before it
                            "OR (j.state = 'queued' AND NOT EXISTS (SELECT 1 FROM jobs r "
                            "WHERE r.adapter = j.adapter AND (r.state = 'running' "
                            "OR (r.state = 'queued' AND r.id < j.id)))) "
                            "ORDER BY j.state = 'running' DESC, j.id LIMIT 1 FOR UPDATE SKIP LOCKED) "
                            f"RETURNING {_JOB_COLUMNS}",
                            params,
                        )
                        .fetchone()
                    )
                return _job(row) if row is not None else None
            except DatabaseError as e:
                # another worker made a job of the same adapter running at the same instant (module
                # docstring): its running job is committed now, and the next try skips that adapter
                if not isinstance(e.__cause__, pg_errors.UniqueViolation) or attempt == CLAIM_RETRIES - 1:
                    raise
        return None

    def heartbeat_job(self, job_id: int, owner: str, lease_s: float, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        with self.transaction() as conn:
            return (
                conn.execute(
                    "UPDATE jobs SET heartbeat = %s, lease_expires = %s "
                    "WHERE id = %s AND lease_owner = %s AND state = 'running'",
                    (now, now + float(lease_s), job_id, owner),
                ).rowcount
                == 1
            )

    def _end(self, job_id: int, owner: str, state: str, fields: Mapping[str, Any], now: float | None) -> bool:
        values = {"finished": time.time() if now is None else now, **fields}
        sets = ", ".join(f"{k} = %({k})s" for k in values)
        with self.transaction() as conn:
            ended = (
                conn.execute(
                    f"UPDATE jobs SET state = %(state)s, lease_owner = NULL, lease_expires = NULL, {sets} "
                    "WHERE id = %(id)s AND lease_owner = %(owner)s AND state = 'running'",
                    {**values, "state": state, "id": job_id, "owner": owner},
                ).rowcount
                == 1
            )
            if ended and values.get("result"):  # its stage durations join the histogram's totals
                counters.add_stage_samples(conn, "%s", counters.stage_samples(json.loads(values["result"])))
            return ended

    def finish_job(
        self,
        job_id: int,
        owner: str,
        state: str,
        result: Mapping[str, Any],
        swap: str | None = None,
        now: float | None = None,
    ) -> bool:
        check_finish(state, swap)
        return self._end(job_id, owner, state, {"result": _json(result), "swap": swap, "error": None}, now)

    def fail_job(
        self,
        job_id: int,
        owner: str,
        error: str,
        result: Mapping[str, Any] | None = None,
        now: float | None = None,
    ) -> bool:
        return self._end(job_id, owner, "failed", {"error": _text(str(error)), "result": _json(result)}, now)

    def cancel_job(self, job_id: int, now: float | None = None) -> tuple[Job | None, str]:
        # A claim racing this: the UPDATE of a queued job waits for the claim's row lock and then finds
        # it running (READ COMMITTED re-reads the row), so the running job is marked instead; a claim
        # skips (SKIP LOCKED) a row this holds, and finds it cancelled afterwards.
        now = time.time() if now is None else now
        with self.transaction() as conn:
            cur = conn.cursor(row_factory=dict_row)
            row = cur.execute(
                "UPDATE jobs SET state = 'cancelled', finished = %s, error = %s WHERE id = %s AND state = 'queued' "
                f"RETURNING {_JOB_COLUMNS}",
                (now, CANCELLED_QUEUED, job_id),
            ).fetchone()
            if row is not None:
                return _job(row), "cancelled"
            row = cur.execute(
                "UPDATE jobs SET cancel_requested = COALESCE(cancel_requested, %s) "
                f"WHERE id = %s AND state = 'running' RETURNING {_JOB_COLUMNS}",
                (now, job_id),
            ).fetchone()
            if row is not None:
                return _job(row), "cancelling"
            row = cur.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = %s", (job_id,)).fetchone()
        return (_job(row), "finished") if row is not None else (None, "unknown")

    def cancel_requested(self, job_id: int) -> bool:
        rows = self._tuples(
            "SELECT 1 FROM jobs WHERE id = %s AND state = 'running' AND cancel_requested IS NOT NULL",
            (job_id,),
        )
        return bool(rows)

    def finish_cancelled(self, job_id: int, owner: str, result: Mapping[str, Any] | None = None) -> bool:
        return self._end(
            job_id, owner, "cancelled", {"error": CANCELLED_RUNNING, "result": _json(result)}, None
        )

    def release_job(self, job_id: int, owner: str) -> bool:
        with self.transaction() as conn:
            return (
                conn.execute(  # a job whose cancel was asked is not given back: it is cancelled
                    "UPDATE jobs SET lease_owner = NULL, lease_expires = NULL, "
                    "attempts = GREATEST(attempts - 1, 0), "
                    "state = CASE WHEN cancel_requested IS NULL THEN 'queued' ELSE 'cancelled' END, "
                    "finished = CASE WHEN cancel_requested IS NULL THEN finished ELSE %s END, "
                    "error = CASE WHEN cancel_requested IS NULL THEN error ELSE %s END "
                    "WHERE id = %s AND lease_owner = %s AND state = 'running'",
                    (time.time(), CANCELLED_RUNNING, job_id, owner),
                ).rowcount
                == 1
            )

    def set_job_swap(
        self, job_id: int, swap: str, error: str | None = None, seconds: float | None = None
    ) -> bool:
        check_swap(swap)
        with self.transaction() as conn:
            found = conn.execute(
                "SELECT result FROM jobs WHERE id = %s AND state = 'accepted' FOR UPDATE", (job_id,)
            ).fetchone()
            if found is None:
                return False
            result = found[0]
            if seconds is not None:  # SQLite's json_set(result, '$.timings.swap', seconds)
                data = json.loads(result) if result else {}
                before = counters.stage_samples(data).get("swap")
                if not isinstance(data.get("timings"), dict):
                    data["timings"] = {}
                data["timings"]["swap"] = seconds
                result = json.dumps(data, ensure_ascii=False, default=str)
                # the swap's duration replaces any earlier one in the histogram
                if before is not None:
                    counters.add_stage_samples(conn, "%s", {"swap": before}, -1)
                counters.add_stage_samples(conn, "%s", counters.stage_samples({"timings": {"swap": seconds}}))
            conn.execute(
                "UPDATE jobs SET swap = %s, swap_error = %s, result = %s WHERE id = %s",
                (swap, _text(error), result, job_id),
            )
        return True

    def job(self, job_id: int) -> Job | None:
        rows = self._rows(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = %s", (job_id,))
        return _job(rows[0]) if rows else None

    def jobs(
        self,
        adapter: str | None = None,
        state: str | None = None,
        limit: int = 100,
        before_id: int | None = None,
    ) -> list[Job]:
        where, params = [], []
        for column, value in (("adapter", adapter), ("state", state)):
            if value is not None:
                where.append(f"{column} = %s")
                params.append(value)
        if before_id is not None:
            where.append("id < %s")
            params.append(before_id)
        sql = f"SELECT {_JOB_COLUMNS} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [_job(r) for r in self._rows(sql + " ORDER BY id DESC LIMIT %s", (*params, int(limit)))]

    def last_job(self, adapter: str) -> Job | None:
        found = self.jobs(adapter=adapter, limit=1)
        return found[0] if found else None

    def pending_swaps(self) -> list[Job]:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET swap = 'superseded' WHERE state = 'accepted' AND swap = 'pending' AND EXISTS "
                "(SELECT 1 FROM jobs k WHERE k.adapter = jobs.adapter AND k.state = 'accepted' "
                "AND k.swap IN ('pending', 'done') AND (k.finished > jobs.finished "
                "OR (k.finished = jobs.finished AND k.id > jobs.id)))"
            )
        rows = self._rows(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state = 'accepted' AND swap = 'pending' ORDER BY finished, id"
        )
        return [_job(r) for r in rows]

    def usable_since(
        self, adapter: str, since: float, include_unrated: bool, at_most: int | None = None
    ) -> int:
        return usable_since(
            self._tuples,
            "%s",
            USABLE_BY_FEEDBACK,
            USABLE_UNRATED,
            _text(adapter),
            since,
            include_unrated,
            at_most,
        )

    def job_figures(self, now: float | None = None) -> JobFigures:
        return job_figures(self._tuples, "%s", now)

    def prune_jobs(
        self, max_age_s: float | None, keep_per_adapter: int | None, now: float | None = None
    ) -> int:
        return counters.prune_job_history(self, "%s", max_age_s, keep_per_adapter, now, FINISHED_STATES)

    # ------------------------------------------------------------------ the served pointer
    shares_pointer = True  # a database many replicas share: the served pointer lives here
    networked = True  # a server that can be down for a while (DatabaseUnavailable)

    def _pointer_backend(self) -> PointerBackend:
        def lock(conn: psycopg.Connection, adapter: str) -> None:
            conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (POINTER_LOCK_SPACE, adapter))

        return PointerBackend(self._tuples, self.transaction, lock, postgres=True)

    def listener(self) -> Any:
        """A `listen.PointerListener` on its own session connection (not from the pool): LISTEN needs a
        connection that stays the same session. Connects on its first wait."""
        from .listen import PointerListener

        return PointerListener(self.url, self.path, self._scrub)

    def close(self) -> None:
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
