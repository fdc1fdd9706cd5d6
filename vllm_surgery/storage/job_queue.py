"""The refinement job queue: jobs that survive the death of the process running them.

A job asks for one refinement of one adapter (who asked: `trigger`; what to compute: `spec`, see
`vllm_surgery.worker.job_spec`). Its life: ``queued`` -> ``running`` (a worker holds its lease) -> ``accepted`` (a refined
version was written; its swap into the server may still be pending), ``kept_original`` (the gate kept
the original: nothing written), ``failed`` (the error says why and what to change) or ``cancelled``
(an admin cancelled it: a queued job is never claimed; a running one is marked, and its worker stops
it at its next check and writes nothing).

The rules, and where they are enforced:

- **Leases.** A worker that claims a job owns it until ``lease_expires``; it renews the lease with
  heartbeats from a thread while it computes. A job whose lease expired (its worker was killed,
  crashed, or lost its machine) is claimed again by the next worker, before any queued job. Only the
  owner can heartbeat, finish or fail a job: a worker that lost its lease learns it from the False
  answer and its result is not recorded. Times are wall-clock Unix seconds of the writing process, so
  workers on several machines need synchronised clocks (NTP); the lease (default 120 s) is the bound.
- **Bounded attempts.** Every claim counts an attempt. A running job whose lease expired after
  `max_attempts` attempts (one that kills every worker that takes it: out of host memory, a segfault)
  is failed with that reason at the next claim, instead of killing workers forever. A job that fails
  by an error the worker catches (bad data, a broken adapter, out of device memory) is failed at once:
  such errors repeat, retrying would only hide them. A worker stopped on purpose (SIGTERM) releases
  its job without counting the attempt.
- **One running job per adapter**, enforced by the database itself: a partial unique index over
  ``adapter`` WHERE ``state = 'running'``. A claim skips queued jobs of an adapter that has a running
  job (an expired one included: it is taken up again first), so two workers never refine one adapter
  at once, and jobs of one adapter run in the order they were queued.
- **Bounded queue.** ``enqueue_job(max_queued=N)`` refuses (`JobQueueFull`) a new job for an adapter
  that already has N queued or running jobs, counted in the same transaction as the insert.
- **Idempotent enqueue.** A job may carry a dedupe key. Enqueuing a key that a queued or running job
  holds returns that job (a partial unique index over active jobs' keys backs it); with ``once``, a
  key that any job ever held returns that job (e.g. "refine this adapter content on first load" is
  asked once, whatever came of it).

Every state change is one ``BEGIN IMMEDIATE`` transaction (see `database`), so two processes claiming
at once serialise on SQLite's write lock, and ``UPDATE ... RETURNING`` makes check-and-take one
statement. The same semantics map onto a server database (Postgres: ``SELECT ... FOR UPDATE SKIP
LOCKED``) behind the same methods.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .counters import (
    StageHistogram,
    add_stage_samples,
    prune_job_history,
    stage_histograms,
    stage_samples,
)
from .usable import LATEST_FEEDBACK, USABLE_BY_FEEDBACK, USABLE_UNRATED

JOB_TRIGGERS = ("manual", "first_load", "new_data")
JOB_STATES = ("queued", "running", "accepted", "kept_original", "failed", "cancelled")
ACTIVE_STATES = ("queued", "running")
FINISHED_STATES = ("accepted", "kept_original", "failed", "cancelled")
CANCELLED_QUEUED = "cancelled by an admin before it ran"
CANCELLED_RUNNING = "cancelled by an admin while it ran; its worker stopped it and wrote nothing"
# What became of an accepted version's swap into the server: pending (not swapped yet: the server was
# unreachable, or the worker could not authenticate; the server swaps pending versions itself), done,
# failed (the server refused the version: the error says why), superseded (a later accepted version of
# the adapter came first), not_requested (the request said "swap": false).
SWAP_STATES = ("pending", "done", "failed", "superseded", "not_requested")
DEFAULT_MAX_ATTEMPTS = 3


def _jobs_table(name: str, states: tuple[str, ...], cancel_column: bool) -> str:
    cancel = "cancel_requested REAL,\n        " if cancel_column else ""
    return f"""CREATE TABLE {name} (
        id INTEGER PRIMARY KEY,
        adapter TEXT NOT NULL,
        trigger TEXT NOT NULL CHECK (trigger IN {JOB_TRIGGERS}),
        state TEXT NOT NULL CHECK (state IN {states}),
        spec TEXT NOT NULL,
        dedupe_key TEXT,
        created REAL NOT NULL,
        started REAL,
        finished REAL,
        lease_owner TEXT,
        lease_expires REAL,
        heartbeat REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL CHECK (max_attempts >= 1),
        error TEXT,
        result TEXT,
        swap TEXT CHECK (swap IS NULL OR swap IN {SWAP_STATES}),
        swap_error TEXT,
        {cancel}CHECK ((state = 'running') = (lease_owner IS NOT NULL AND lease_expires IS NOT NULL))
    )"""


_JOBS_INDEXES = (
    "CREATE UNIQUE INDEX jobs_one_running_per_adapter ON jobs (adapter) WHERE state = 'running'",
    "CREATE UNIQUE INDEX jobs_active_dedupe_key ON jobs (dedupe_key) "
    "WHERE dedupe_key IS NOT NULL AND state IN ('queued', 'running')",
    "CREATE INDEX jobs_dedupe_key ON jobs (dedupe_key)",
    "CREATE INDEX jobs_state ON jobs (state, id)",
    "CREATE INDEX jobs_adapter ON jobs (adapter, id)",
)
# Schema version 2, as it was first written (a migration never changes once released).
JOBS_SCHEMA = (
    _jobs_table("jobs", ("queued", "running", "accepted", "kept_original", "failed"), cancel_column=False),
    *_JOBS_INDEXES,
    # the new-data trigger counts feedback given since an adapter's last job
    "CREATE INDEX feedback_created ON feedback (created)",
)
# Schema version 3: the 'cancelled' state and the cancel_requested column. SQLite cannot change a CHECK
# constraint in place, so the table is rebuilt (in the migration's one transaction).
_V2_COLUMNS = (
    "id, adapter, trigger, state, spec, dedupe_key, created, started, finished, lease_owner, "
    "lease_expires, heartbeat, attempts, max_attempts, error, result, swap, swap_error"
)
JOBS_CANCEL_MIGRATION = (
    _jobs_table("jobs_v3", JOB_STATES, cancel_column=True),
    f"INSERT INTO jobs_v3 ({_V2_COLUMNS}) SELECT {_V2_COLUMNS} FROM jobs",
    "DROP TABLE jobs",
    "ALTER TABLE jobs_v3 RENAME TO jobs",
    *_JOBS_INDEXES,
)


def check_trigger(trigger: str) -> None:
    """Raises ValueError unless `trigger` is one of JOB_TRIGGERS (every backend's enqueue_job)."""
    if trigger not in JOB_TRIGGERS:
        raise ValueError(f"trigger must be one of {JOB_TRIGGERS}, got {trigger!r}")


def check_swap(swap: str | None, optional: bool = False) -> None:
    """Raises ValueError unless `swap` is one of SWAP_STATES (or None, where `optional`)."""
    if not (optional and swap is None) and swap not in SWAP_STATES:
        raise ValueError(f"swap must be one of {SWAP_STATES}, got {swap!r}")


def check_finish(state: str, swap: str | None) -> None:
    """Raises ValueError unless a job may finish as `state` with `swap` (every backend's finish_job)."""
    if state not in ("accepted", "kept_original"):
        raise ValueError(f"a job finishes as accepted or kept_original, not {state!r} (use fail_job)")
    check_swap(swap, optional=True)


class JobQueueFull(Exception):
    """An adapter already has as many queued or running jobs as `max_queued` allows; the message names
    the adapter, the limit and what to do."""

    def __init__(self, adapter: str, limit: int) -> None:
        super().__init__(
            f"adapter {adapter!r} already has {limit} queued or running refinement job(s), the limit "
            f"(VLLM_SURGERY_JOB_MAX_QUEUED = {limit}): wait for them to finish, or cancel one "
            "(POST /v1/surgery/jobs/ID/cancel)"
        )
        self.adapter = adapter
        self.limit = limit


@dataclass(frozen=True)
class Job:
    """One row of the queue. `spec` and `result` are the decoded JSON objects (see
    `vllm_surgery.worker.job_spec`); the table's columns are these fields."""

    id: int
    adapter: str
    trigger: str
    state: str
    spec: dict[str, Any]
    dedupe_key: str | None
    created: float
    started: float | None
    finished: float | None
    lease_owner: str | None
    lease_expires: float | None
    heartbeat: float | None
    attempts: int
    max_attempts: int
    error: str | None
    result: dict[str, Any] | None
    swap: str | None
    swap_error: str | None
    cancel_requested: float | None = None  # when an admin asked to cancel it while it ran

    @property
    def version(self) -> str | None:
        """The store version the job wrote (or reused), if any."""
        return (self.result or {}).get("version")


# The jobs table's columns are Job's fields; these hold JSON text.
JOB_COLUMNS = tuple(f.name for f in fields(Job))
_JSON_COLUMNS = ("spec", "result")
_COLUMNS = ", ".join(JOB_COLUMNS)


def _job(row: Mapping[str, Any]) -> Job:
    values = {name: row[name] for name in JOB_COLUMNS}
    for name in _JSON_COLUMNS:
        values[name] = None if values[name] is None else json.loads(values[name])
    return Job(**values)


@dataclass(frozen=True)
class JobFigures:
    """What the metrics show, read in one go at scrape time (see metrics.JobsCollector) from counters
    and indexed lookups (storage/counters.py), never from every job's row."""

    by_state: dict[str, int]
    finished: dict[tuple[str, str], int]  # (adapter, state) -> jobs that ever finished so (pruned ones too)
    oldest_queued_age_s: float
    swaps_pending: int
    latest_quality: dict[str, tuple[float, float]]  # adapter -> (before, after) held-out loss
    stages: dict[str, StageHistogram]  # stage -> histogram of the seconds of every job that finished


def latest_quality(result: Mapping[str, Any] | None) -> tuple[float, float] | None:
    """(before, after) held-out loss of a finished job's result, when both are numbers."""
    values = []
    for part in ("quality_before", "quality_after"):
        value = result.get(part) if isinstance(result, Mapping) else None
        value = value.get("loss") if isinstance(value, Mapping) else None
        if not isinstance(value, (int, float)):
            return None
        values.append(float(value))
    return values[0], values[1]


class JobQueue(ABC):
    """The queue's operations (implemented for SQLite by `SQLiteJobQueue`). Methods raise
    DatabaseError when the storage cannot be used; `now` parameters exist for tests."""

    @abstractmethod
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
        """Queue a job; (the job, True), or (the job that holds `dedupe_key`, False): an active one,
        or with `once` any job that ever held it. Raises ValueError for an unknown trigger, and
        JobQueueFull when `adapter` already has `max_queued` queued or running jobs (a job found by
        its dedupe key is returned whatever the count)."""

    @abstractmethod
    def claim_job(self, owner: str, lease_s: float, now: float | None = None) -> Job | None:
        """Take the next job for `owner` with a lease of `lease_s` seconds: a running job whose lease
        expired first, else the oldest queued job of an adapter with no running job. Jobs whose lease
        expired after their last allowed attempt are failed first. None when there is nothing to do."""

    @abstractmethod
    def heartbeat_job(self, job_id: int, owner: str, lease_s: float, now: float | None = None) -> bool:
        """Renew the lease; False if `owner` no longer holds the job (expired and taken, or finished)."""

    @abstractmethod
    def finish_job(
        self,
        job_id: int,
        owner: str,
        state: str,
        result: Mapping[str, Any],
        swap: str | None = None,
        now: float | None = None,
    ) -> bool:
        """Record the outcome (accepted / kept_original) by the owner; False if it lost the job."""

    @abstractmethod
    def fail_job(
        self,
        job_id: int,
        owner: str,
        error: str,
        result: Mapping[str, Any] | None = None,
        now: float | None = None,
    ) -> bool:
        """Record a failure with its message by the owner; False if it lost the job."""

    @abstractmethod
    def cancel_job(self, job_id: int, now: float | None = None) -> tuple[Job | None, str]:
        """An admin's cancel, in one transaction: (job, what happened). "cancelled": it was queued and
        is now cancelled (never claimed); "cancelling": it is running, now marked, and its worker stops
        it at its next check; "finished": it had already ended (nothing changed); (None, "unknown")
        when there is no such job."""

    @abstractmethod
    def cancel_requested(self, job_id: int) -> bool:
        """Whether an admin asked to cancel this running job (the worker's check)."""

    @abstractmethod
    def finish_cancelled(self, job_id: int, owner: str, result: Mapping[str, Any] | None = None) -> bool:
        """Record, by its owner, that a job whose cancel was asked stopped without writing anything;
        False if the owner lost the job."""

    @abstractmethod
    def release_job(self, job_id: int, owner: str) -> bool:
        """Give a running job back to the queue (the worker stops on purpose); the attempt is not
        counted. False if `owner` did not hold it."""

    @abstractmethod
    def set_job_swap(
        self, job_id: int, swap: str, error: str | None = None, seconds: float | None = None
    ) -> bool:
        """Record what became of an accepted job's swap (`seconds`: the swap's duration, added to the
        result's timings). False if the job is not accepted."""

    @abstractmethod
    def job(self, job_id: int) -> Job | None:
        """One job, or None."""

    @abstractmethod
    def jobs(
        self,
        adapter: str | None = None,
        state: str | None = None,
        limit: int = 100,
        before_id: int | None = None,
    ) -> list[Job]:
        """Jobs, newest first, optionally of one adapter and/or in one state."""

    @abstractmethod
    def last_job(self, adapter: str) -> Job | None:
        """An adapter's newest job."""

    @abstractmethod
    def pending_swaps(self) -> list[Job]:
        """Accepted jobs whose swap is pending, oldest first. A pending swap that a later accepted job
        of the same adapter outdates (its swap pending or done) is marked superseded first: swapping
        it now would replace a newer version by an older one."""

    @abstractmethod
    def usable_since(
        self, adapter: str, since: float, include_unrated: bool, at_most: int | None = None
    ) -> int:
        """Recorded examples of `adapter` that became usable calibration data after `since`: rated
        good or corrected then, or (with `include_unrated`) recorded then without feedback. With
        `at_most`, counting stops there (the automatic jobs only compare it with a threshold): the
        cost is then bounded by that number, not by the adapter's size (`usable_since_sql`)."""

    @abstractmethod
    def job_figures(self, now: float | None = None) -> JobFigures:
        """The figures the metrics show."""

    @abstractmethod
    def prune_jobs(
        self, max_age_s: float | None, keep_per_adapter: int | None, now: float | None = None
    ) -> int:
        """Delete finished jobs older than `max_age_s` (by when they finished) or beyond each adapter's
        newest `keep_per_adapter` finished ones (None: no such limit), in short batches; an adapter's
        newest job, its newest accepted or kept_original one, pending swaps and first_load jobs are
        kept (counters.prune_job_history). The metrics' counters are not changed. Returns the jobs
        deleted."""


class SQLiteJobQueue(JobQueue):
    """JobQueue for SQLiteDatabase (mixed in there: it uses its `transaction()` and `_query()`)."""

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
        text = json.dumps(dict(spec), ensure_ascii=False, default=str)
        with self.transaction() as c:
            if dedupe_key is not None:
                active = "" if once else f"AND state IN {ACTIVE_STATES}"
                row = c.execute(
                    f"SELECT {_COLUMNS} FROM jobs WHERE dedupe_key = ? {active} ORDER BY id DESC LIMIT 1",
                    (dedupe_key,),
                ).fetchone()
                if row is not None:
                    return _job(row), False
            if max_queued is not None:
                (active,) = c.execute(
                    f"SELECT COUNT(*) FROM jobs WHERE adapter = ? AND state IN {ACTIVE_STATES}", (adapter,)
                ).fetchone()
                if active >= max_queued:
                    raise JobQueueFull(adapter, int(max_queued))
            row = c.execute(
                "INSERT INTO jobs (adapter, trigger, state, spec, dedupe_key, created, max_attempts) "
                f"VALUES (?, ?, 'queued', ?, ?, ?, ?) RETURNING {_COLUMNS}",
                (adapter, trigger, text, dedupe_key, time.time() if now is None else now, int(max_attempts)),
            ).fetchone()
        return _job(row), True

    def claim_job(self, owner: str, lease_s: float, now: float | None = None) -> Job | None:
        with self.transaction() as c:
            # the time once the write lock is held (BEGIN may wait): the lease runs from the claim
            now = time.time() if now is None else now
            c.execute(
                "UPDATE jobs SET state = 'failed', finished = :now, lease_owner = NULL, lease_expires = NULL, "
                "error = 'its worker stopped ' || attempts || ' time(s) without finishing (killed, crashed or "
                "out of host memory; last worker ' || lease_owner || '): given up after ' || max_attempts || "
                "' attempt(s); see the worker logs, and queue it again once the cause is fixed' "
                "WHERE state = 'running' AND lease_expires < :now AND attempts >= max_attempts",
                {"now": now},
            )
            # a cancelled job whose worker died before it could stop it is not taken up again
            c.execute(
                "UPDATE jobs SET state = 'cancelled', finished = :now, lease_owner = NULL, "
                "lease_expires = NULL, error = :error "
                "WHERE state = 'running' AND lease_expires < :now AND cancel_requested IS NOT NULL",
                {"now": now, "error": CANCELLED_RUNNING},
            )
            row = c.execute(
                "UPDATE jobs SET state = 'running', lease_owner = :owner, lease_expires = :now + :lease, "
                "heartbeat = :now, started = :now, attempts = attempts + 1 "
                "WHERE id = (SELECT j.id FROM jobs j WHERE (j.state = 'running' AND j.lease_expires < :now) "
                "OR (j.state = 'queued' AND NOT EXISTS "
                "(SELECT 1 FROM jobs r WHERE r.adapter = j.adapter AND r.state = 'running')) "
                f"ORDER BY j.state = 'running' DESC, j.id LIMIT 1) RETURNING {_COLUMNS}",
                {"owner": owner, "now": now, "lease": float(lease_s)},
            ).fetchone()
        return _job(row) if row is not None else None

    def heartbeat_job(self, job_id: int, owner: str, lease_s: float, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        with self.transaction() as c:
            return (
                c.execute(
                    "UPDATE jobs SET heartbeat = ?, lease_expires = ? "
                    "WHERE id = ? AND lease_owner = ? AND state = 'running'",
                    (now, now + float(lease_s), job_id, owner),
                ).rowcount
                == 1
            )

    def _end(self, job_id: int, owner: str, state: str, fields: Mapping[str, Any], now: float | None) -> bool:
        values = {"finished": time.time() if now is None else now, **fields}
        sets = ", ".join(f"{k} = :{k}" for k in values)
        with self.transaction() as c:
            ended = (
                c.execute(
                    f"UPDATE jobs SET state = :state, lease_owner = NULL, lease_expires = NULL, {sets} "
                    "WHERE id = :id AND lease_owner = :owner AND state = 'running'",
                    {**values, "state": state, "id": job_id, "owner": owner},
                ).rowcount
                == 1
            )
            if ended and values.get("result"):  # its stage durations join the histogram's totals
                add_stage_samples(c, "?", stage_samples(json.loads(values["result"])))
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
        text = json.dumps(dict(result), ensure_ascii=False, default=str)
        return self._end(job_id, owner, state, {"result": text, "swap": swap, "error": None}, now)

    def fail_job(
        self,
        job_id: int,
        owner: str,
        error: str,
        result: Mapping[str, Any] | None = None,
        now: float | None = None,
    ) -> bool:
        text = json.dumps(dict(result), ensure_ascii=False, default=str) if result is not None else None
        return self._end(job_id, owner, "failed", {"error": str(error), "result": text}, now)

    def cancel_job(self, job_id: int, now: float | None = None) -> tuple[Job | None, str]:
        now = time.time() if now is None else now
        with self.transaction() as c:
            row = c.execute(
                "UPDATE jobs SET state = 'cancelled', finished = ?, error = ? WHERE id = ? AND state = 'queued' "
                f"RETURNING {_COLUMNS}",
                (now, CANCELLED_QUEUED, job_id),
            ).fetchone()
            if row is not None:
                return _job(row), "cancelled"
            row = c.execute(
                "UPDATE jobs SET cancel_requested = COALESCE(cancel_requested, ?) "
                f"WHERE id = ? AND state = 'running' RETURNING {_COLUMNS}",
                (now, job_id),
            ).fetchone()
            if row is not None:
                return _job(row), "cancelling"
            row = c.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return (_job(row), "finished") if row is not None else (None, "unknown")

    def cancel_requested(self, job_id: int) -> bool:
        rows = self._query(
            "SELECT 1 FROM jobs WHERE id = ? AND state = 'running' AND cancel_requested IS NOT NULL",
            (job_id,),
        )
        return bool(rows)

    def finish_cancelled(self, job_id: int, owner: str, result: Mapping[str, Any] | None = None) -> bool:
        text = json.dumps(dict(result), ensure_ascii=False, default=str) if result is not None else None
        return self._end(job_id, owner, "cancelled", {"error": CANCELLED_RUNNING, "result": text}, None)

    def release_job(self, job_id: int, owner: str) -> bool:
        with self.transaction() as c:
            return (
                c.execute(  # a job whose cancel was asked is not given back: it is cancelled
                    "UPDATE jobs SET lease_owner = NULL, lease_expires = NULL, attempts = MAX(attempts - 1, 0), "
                    "state = CASE WHEN cancel_requested IS NULL THEN 'queued' ELSE 'cancelled' END, "
                    "finished = CASE WHEN cancel_requested IS NULL THEN finished ELSE ? END, "
                    "error = CASE WHEN cancel_requested IS NULL THEN error ELSE ? END "
                    "WHERE id = ? AND lease_owner = ? AND state = 'running'",
                    (time.time(), CANCELLED_RUNNING, job_id, owner),
                ).rowcount
                == 1
            )

    def set_job_swap(
        self, job_id: int, swap: str, error: str | None = None, seconds: float | None = None
    ) -> bool:
        check_swap(swap)
        timing = (
            "result" if seconds is None else "json_set(COALESCE(result, '{}'), '$.timings.swap', :seconds)"
        )
        with self.transaction() as c:
            found = c.execute(
                "SELECT result FROM jobs WHERE id = ? AND state = 'accepted'", (job_id,)
            ).fetchone()
            if found is None:
                return False
            c.execute(
                f"UPDATE jobs SET swap = :swap, swap_error = :error, result = {timing} WHERE id = :id",
                {"swap": swap, "error": error, "seconds": seconds, "id": job_id},
            )
            if seconds is not None:  # the swap's duration replaces any earlier one in the histogram
                before = stage_samples(json.loads(found[0]) if found[0] else None).get("swap")
                if before is not None:
                    add_stage_samples(c, "?", {"swap": before}, -1)
                add_stage_samples(c, "?", stage_samples({"timings": {"swap": seconds}}))
            return True

    def job(self, job_id: int) -> Job | None:
        rows = self._query(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
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
                where.append(f"{column} = ?")
                params.append(value)
        if before_id is not None:
            where.append("id < ?")
            params.append(before_id)
        sql = f"SELECT {_COLUMNS} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._query(sql + " ORDER BY id DESC LIMIT ?", (*params, int(limit)))
        return [_job(r) for r in rows]

    def last_job(self, adapter: str) -> Job | None:
        found = self.jobs(adapter=adapter, limit=1)
        return found[0] if found else None

    def pending_swaps(self) -> list[Job]:
        with self.transaction() as c:
            c.execute(
                "UPDATE jobs SET swap = 'superseded' WHERE state = 'accepted' AND swap = 'pending' AND EXISTS "
                "(SELECT 1 FROM jobs k WHERE k.adapter = jobs.adapter AND k.state = 'accepted' "
                "AND k.swap IN ('pending', 'done') AND (k.finished > jobs.finished "
                "OR (k.finished = jobs.finished AND k.id > jobs.id)))"
            )
        rows = self._query(
            f"SELECT {_COLUMNS} FROM jobs WHERE state = 'accepted' AND swap = 'pending' ORDER BY finished, id"
        )
        return [_job(r) for r in rows]

    def usable_since(
        self, adapter: str, since: float, include_unrated: bool, at_most: int | None = None
    ) -> int:
        return usable_since(
            self._query, "?", USABLE_BY_FEEDBACK, USABLE_UNRATED, adapter, since, include_unrated, at_most
        )

    def job_figures(self, now: float | None = None) -> JobFigures:
        return job_figures(self._query, "?", now)

    def prune_jobs(
        self, max_age_s: float | None, keep_per_adapter: int | None, now: float | None = None
    ) -> int:
        return prune_job_history(self, "?", max_age_s, keep_per_adapter, now, FINISHED_STATES)


def usable_since(
    read: Any,
    ph: str,
    usable_by_feedback: str,
    usable_unrated: str,
    adapter: str,
    since: float,
    include_unrated: bool,
    at_most: int | None,
) -> int:
    """`JobQueue.usable_since` for both backends (`read(sql, params)` returns rows; the usable
    conditions in the backend's SQL). The rated part walks the adapter's feedback given after `since`
    (its index on (adapter, created); CROSS JOIN keeps SQLite from walking the records instead), the unrated
    part the adapter's records recorded after it (the index on (adapter, created)); each stops at
    `at_most`."""
    limit = f" LIMIT {ph}" if at_most is not None else ""
    rated = read(
        "SELECT COUNT(*) FROM (SELECT 1 FROM feedback f CROSS JOIN traffic t WHERE t.id = f.traffic_id "
        f"AND f.created > {ph} AND f.adapter = {ph} AND {LATEST_FEEDBACK} AND {usable_by_feedback}{limit}) n",
        (since, adapter) if at_most is None else (since, adapter, int(at_most)),
    )[0][0]
    unrated = 0
    left = None if at_most is None else int(at_most) - int(rated)
    if include_unrated and (left is None or left > 0):
        unrated = read(
            f"SELECT COUNT(*) FROM (SELECT 1 FROM traffic t WHERE t.adapter = {ph} AND t.created > {ph} "
            f"AND {usable_unrated}{limit}) n",
            (adapter, since) if left is None else (adapter, since, left),
        )[0][0]
    return int(rated) + int(unrated)


def job_figures(read: Any, ph: str, now: float | None) -> JobFigures:
    """`JobQueue.job_figures` for both backends (`read(sql, params)` returns rows): from job_counts and
    job_stage_totals, the partial index of pending swaps, and one indexed lookup per adapter for its
    latest quality; never a pass over every job's row or JSON."""
    now = time.time() if now is None else now
    by_state = dict.fromkeys(JOB_STATES, 0)
    finished = {}
    adapters = set()
    for adapter, state, jobs, ever in read("SELECT adapter, state, jobs, finished FROM job_counts", ()):
        by_state[state] = by_state.get(state, 0) + int(jobs)
        if state in FINISHED_STATES and ever:
            finished[(adapter, state)] = int(ever)
        if jobs:
            adapters.add(adapter)
    oldest = read("SELECT MIN(created) FROM jobs WHERE state = 'queued'", ())[0][0]
    # SQLite's planner, without statistics, prefers the index on state (every accepted job) to the
    # partial index that holds only the pending ones: named for it
    hint = "INDEXED BY jobs_swap_pending " if ph == "?" else ""
    pending = read(f"SELECT COUNT(*) FROM jobs {hint}WHERE state = 'accepted' AND swap = 'pending'", ())[0][0]
    quality = {}
    for adapter in sorted(adapters):
        rows = read(
            f"SELECT result FROM jobs WHERE adapter = {ph} AND state IN ('accepted', 'kept_original') "
            "ORDER BY adapter DESC, id DESC LIMIT 1",
            (adapter,),
        )
        found = latest_quality(json.loads(rows[0][0])) if rows and rows[0][0] else None
        if found is not None:
            quality[adapter] = found
    stages = stage_histograms(
        [tuple(r) for r in read("SELECT stage, bucket, jobs, seconds FROM job_stage_totals", ())]
    )
    return JobFigures(
        by_state=by_state,
        finished=finished,
        oldest_queued_age_s=max(0.0, now - oldest) if oldest is not None else 0.0,
        swaps_pending=int(pending),
        latest_quality=quality,
        stages=stages,
    )
