"""Counts that do not scan, and deletes that never hold the write lock long: the record store at scale
(schema version 6 on both backends; `database` and `postgres` use these).

**Traffic counters.** Each traffic row carries ``tally``, the bits of what it counts for (`TALLIED`,
under its latest feedback: the latest of any client for rated/good/bad/corrected/untrusted, the latest
trusted one for usable/unrated_usable, the rule of `usable` in SQL). ``traffic_counts`` holds, per
(adapter, version), the number of records, the sum of each bit and of ``bytes``; triggers keep it in the
same transaction as the rows it counts (insert, delete, and the update that adding feedback makes to
the row's ``tally`` and ``bytes``). Why a bit mask on the row: "the latest feedback wins" means a new
rating can take a count away as well as add one, and a deleted record must take away exactly what it
added; with its contribution on the row, every trigger is a subtraction of OLD and an addition of NEW,
and ON DELETE CASCADE of its feedback needs no trigger at all. ``first``/``last`` (MIN/MAX of
``created``) cannot be kept by counters under deletes: they are two lookups in the index on
(adapter, version, created). So `TrafficStats` costs one small-table read and two index probes per
(adapter, version), whatever the number of records; the retention reads its counts there too.

**Job counters.** ``job_counts`` holds per (adapter, state) the jobs in that state now (a gauge) and the
jobs that ever finished in it (the ``vllm_surgery_jobs_finished`` counter: pruning the history must not
make a Prometheus counter go down), kept by triggers on every insert, state change and delete.
``job_stage_totals`` holds the stage-duration histogram of every job that finished (per stage and
bucket of `JOB_STAGE_BUCKETS`: jobs and seconds), added by the code that records a job's result, in
the same transaction. A /metrics scrape reads these small tables, never the job rows' JSON.

**The feedback's adapter** (a copy of its record's, written with it): the automatic jobs' count of
examples that became usable since an adapter's last job walks that adapter's feedback since then
(index on (adapter, created)) and stops at the threshold it compares with.

**Batched deletes** (`AdaptiveBatch`): a retention sweep or a job-history prune deletes in batches,
each its own short transaction, sized so that each holds the write lock about `TARGET_S` (the size
halves after a slow batch and doubles after a fast one), so traffic writes and job claims interleave
with a sweep of any size.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .usable import LATEST_ANY_FEEDBACK, LATEST_FEEDBACK, USABLE_KINDS, usable_answer

# What a record counts for, in TrafficStats' names; bit i of `tally` is TALLIED[i].
TALLIED = ("rated", "good", "bad", "corrected", "usable", "unrated_usable", "untrusted")
# The columns of traffic_counts after (adapter, version).
COUNTED = ("records", *TALLIED, "bytes")
UNRATED_USABLE_BIT = 1 << TALLIED.index("unrated_usable")
assert "unrated" in USABLE_KINDS
# Upper bounds (seconds) of the job stage-duration histogram's buckets (vllm_surgery_job_stage_seconds):
# stored per bucket in job_stage_totals, so changing them needs a migration that refills that table.
JOB_STAGE_BUCKETS = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)


def tally_sql(usable_by_feedback: str, usable_unrated: str) -> str:
    """The tally of a traffic row ``t`` with its latest trusted feedback ``f`` and latest feedback ``a``
    (joined as `TALLY_JOINS` does), given the usable-example conditions in the backend's SQL."""
    conditions = {
        "rated": "a.rating IS NOT NULL",
        "good": "a.rating = 'good'",
        "bad": "a.rating = 'bad'",
        "corrected": "a.correction IS NOT NULL",
        "usable": usable_by_feedback,
        "unrated_usable": usable_unrated,
        "untrusted": "a.id IS NOT NULL AND NOT a.trusted",
    }
    assert tuple(conditions) == TALLIED
    return " + ".join(f"(CASE WHEN {c} THEN {1 << i} ELSE 0 END)" for i, c in enumerate(conditions.values()))


TALLY_JOINS = f"LEFT JOIN feedback f ON {LATEST_FEEDBACK} LEFT JOIN feedback a ON {LATEST_ANY_FEEDBACK}"


def row_tally(usable_by_feedback: str, usable_unrated: str) -> str:
    """A scalar subquery: the tally of the row ``traffic`` an UPDATE of traffic is at."""
    return (
        f"(SELECT {tally_sql(usable_by_feedback, usable_unrated)} FROM traffic t {TALLY_JOINS} "
        "WHERE t.id = traffic.id)"
    )


def insert_tally(calibratable: bool, completion: str) -> int:
    """The tally of a record as it is inserted (no feedback yet): usable as an unrated example or
    nothing, by the rule of `usable_answer` (the SQL form gives the same; tests compare them)."""
    kind, _ = usable_answer(calibratable, completion, None, None, include_unrated=True)
    return UNRATED_USABLE_BIT if kind == "unrated" else 0


def _bit(column: str, i: int) -> str:
    return f"(({column} >> {i}) & 1)"


def _traffic_counts_table(integer: str) -> str:
    counted = ", ".join(f"{c} {integer} NOT NULL DEFAULT 0" for c in COUNTED)
    return (
        f"CREATE TABLE traffic_counts (adapter TEXT NOT NULL, version TEXT NOT NULL, {counted}, "
        "PRIMARY KEY (adapter, version))"
    )


def _fill_counts(cast: str) -> str:
    sums = ", ".join(
        ["COUNT(*)", *(f"SUM({_bit('tally', i)}){cast}" for i in range(len(TALLIED))), f"SUM(bytes){cast}"]
    )
    return (
        f"INSERT INTO traffic_counts (adapter, version, {', '.join(COUNTED)}) "
        f"SELECT adapter, version, {sums} FROM traffic GROUP BY adapter, version"
    )


# Rows whose tally may be non-zero (the others keep the default 0): the filling skips the rest.
_MAY_COUNT = "calibratable OR EXISTS (SELECT 1 FROM feedback WHERE traffic_id = traffic.id)"
# The index first/last use, the feedback's adapter (what the automatic jobs' new-data count walks:
# an adapter's feedback given since its last job), and the pending swaps' partial index.
_INDEXES = (
    "ALTER TABLE feedback ADD COLUMN adapter TEXT",
    "UPDATE feedback SET adapter = (SELECT adapter FROM traffic WHERE traffic.id = feedback.traffic_id)",
    "CREATE INDEX feedback_adapter_created ON feedback (adapter, created)",
    "CREATE INDEX traffic_adapter_version_created ON traffic (adapter, version, created)",
    "CREATE INDEX jobs_swap_pending ON jobs (finished, id) WHERE state = 'accepted' AND swap = 'pending'",
)
_JOB_COUNTS_TABLE = (
    "CREATE TABLE job_counts (adapter TEXT NOT NULL, state TEXT NOT NULL, jobs {i} NOT NULL DEFAULT 0, "
    "finished {i} NOT NULL DEFAULT 0, PRIMARY KEY (adapter, state))"
)
_JOB_STAGE_TABLE = (
    "CREATE TABLE job_stage_totals (stage TEXT NOT NULL, bucket INTEGER NOT NULL, jobs {i} NOT NULL "
    "DEFAULT 0, seconds {r} NOT NULL DEFAULT 0, PRIMARY KEY (stage, bucket))"
)


def _sql_list(values: tuple[str, ...]) -> str:
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


def _fill_job_counts(cast: str, finished: str) -> str:
    return (
        "INSERT INTO job_counts (adapter, state, jobs, finished) SELECT adapter, state, COUNT(*), "
        f"(CASE WHEN state IN {finished} THEN COUNT(*) ELSE 0 END){cast} FROM jobs GROUP BY adapter, state"
    )


def sqlite_statements(
    usable_by_feedback: str, usable_unrated: str, finished_states: tuple[str, ...]
) -> tuple[str, ...]:
    """Schema version 5 for SQLite: columns, tables, their filling from the existing rows, triggers
    (`fill_stage_totals` runs after these, in the same transaction). `finished_states`: the job
    states that count as finished."""

    adds = ", ".join(f"{c} = {c} + excluded.{c}" for c in COUNTED)

    def add(prefix: str) -> str:
        values = ", ".join(
            ["1", *(_bit(f"{prefix}.tally", i) for i in range(len(TALLIED))), f"{prefix}.bytes"]
        )
        return (
            f"INSERT INTO traffic_counts (adapter, version, {', '.join(COUNTED)}) VALUES "
            f"({prefix}.adapter, {prefix}.version, {values}) ON CONFLICT (adapter, version) DO UPDATE SET {adds};"
        )

    subtract = (
        "UPDATE traffic_counts SET "
        + ", ".join(
            ["records = records - 1"]
            + [f"{c} = {c} - {_bit('OLD.tally', i)}" for i, c in enumerate(TALLIED)]
            + ["bytes = bytes - OLD.bytes"]
        )
        + " WHERE adapter = OLD.adapter AND version = OLD.version;"
    )
    finished = _sql_list(finished_states)
    job_add = (
        "INSERT INTO job_counts (adapter, state, jobs, finished) VALUES (NEW.adapter, NEW.state, 1, {fin}) "
        "ON CONFLICT (adapter, state) DO UPDATE SET jobs = jobs + 1, finished = finished + excluded.finished;"
    )
    job_subtract = "UPDATE job_counts SET jobs = jobs - 1 WHERE adapter = OLD.adapter AND state = OLD.state;"
    return (
        "ALTER TABLE traffic ADD COLUMN tally INTEGER NOT NULL DEFAULT 0",
        f"UPDATE traffic SET tally = {row_tally(usable_by_feedback, usable_unrated)} WHERE {_MAY_COUNT}",
        _traffic_counts_table("INTEGER"),
        _fill_counts(""),
        f"CREATE TRIGGER traffic_counts_insert AFTER INSERT ON traffic BEGIN {add('NEW')} END",
        f"CREATE TRIGGER traffic_counts_delete AFTER DELETE ON traffic BEGIN {subtract} END",
        "CREATE TRIGGER traffic_counts_update AFTER UPDATE OF tally, bytes, adapter, version ON traffic "
        "WHEN OLD.tally != NEW.tally OR OLD.bytes != NEW.bytes OR OLD.adapter != NEW.adapter "
        f"OR OLD.version != NEW.version BEGIN {subtract} {add('NEW')} END",
        *_INDEXES,
        _JOB_COUNTS_TABLE.format(i="INTEGER"),
        _fill_job_counts("", finished),
        f"CREATE TRIGGER job_counts_insert AFTER INSERT ON jobs BEGIN "
        f"{job_add.format(fin=f'NEW.state IN {finished}')} END",
        "CREATE TRIGGER job_counts_update AFTER UPDATE OF state ON jobs WHEN OLD.state != NEW.state BEGIN "
        f"{job_subtract} {job_add.format(fin=f'NEW.state IN {finished} AND OLD.state NOT IN {finished}')} END",
        f"CREATE TRIGGER job_counts_delete AFTER DELETE ON jobs BEGIN {job_subtract} END",
        _JOB_STAGE_TABLE.format(i="INTEGER", r="REAL"),
    )


def postgres_statements(
    usable_by_feedback: str, usable_unrated: str, finished_states: tuple[str, ...]
) -> tuple[str, ...]:
    """Schema version 5 for Postgres (the usable conditions in Postgres's spelling). The traffic
    triggers are per statement with transition tables: a statement that inserts or deletes many rows
    (a bulk load, a retention batch) makes one aggregated upsert, in (adapter, version) code-point
    order, the order `PostgresDatabase.insert` writes a batch's rows in, so that two writers never take
    two counter rows in opposite orders (a deadlock)."""

    def delta(sources: list[tuple[int, str]]) -> str:
        rows = " UNION ALL ".join(
            f"SELECT {sign} AS sign, adapter, version, tally, bytes FROM {table}" for sign, table in sources
        )
        sums = ", ".join(
            [
                "SUM(sign)::BIGINT",
                *(f"SUM(sign * {_bit('tally', i)})::BIGINT" for i in range(len(TALLIED))),
                "SUM(sign * bytes)::BIGINT",
            ]
        )
        adds = ", ".join(f"{c} = traffic_counts.{c} + EXCLUDED.{c}" for c in COUNTED)
        return (
            f"INSERT INTO traffic_counts (adapter, version, {', '.join(COUNTED)}) SELECT adapter, version, "
            f"{sums} FROM ({rows}) d GROUP BY adapter, version "
            'ORDER BY adapter COLLATE "C", version COLLATE "C" '
            f"ON CONFLICT (adapter, version) DO UPDATE SET {adds}"
        )

    def function(name: str, body: str) -> str:
        return (
            f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN {body}; "
            "RETURN NULL; END $$"
        )

    finished = _sql_list(finished_states)
    return (
        "ALTER TABLE traffic ADD COLUMN tally INTEGER NOT NULL DEFAULT 0",
        f"UPDATE traffic SET tally = {row_tally(usable_by_feedback, usable_unrated)} WHERE {_MAY_COUNT}",
        _traffic_counts_table("BIGINT"),
        _fill_counts("::BIGINT"),
        function("traffic_counts_insert", delta([(1, "new_rows")])),
        function("traffic_counts_delete", delta([(-1, "old_rows")])),
        function("traffic_counts_update", delta([(1, "new_rows"), (-1, "old_rows")])),
        "CREATE TRIGGER traffic_counts_insert AFTER INSERT ON traffic REFERENCING NEW TABLE AS new_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION traffic_counts_insert()",
        "CREATE TRIGGER traffic_counts_delete AFTER DELETE ON traffic REFERENCING OLD TABLE AS old_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION traffic_counts_delete()",
        "CREATE TRIGGER traffic_counts_update AFTER UPDATE ON traffic REFERENCING OLD TABLE AS old_rows "
        "NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION traffic_counts_update()",
        *_INDEXES,
        _JOB_COUNTS_TABLE.format(i="BIGINT"),
        _fill_job_counts("::BIGINT", finished),
        function(
            "job_counts_row",
            "IF TG_OP IN ('UPDATE', 'DELETE') THEN UPDATE job_counts SET jobs = jobs - 1 "
            "WHERE adapter = OLD.adapter AND state = OLD.state; END IF; "
            "IF TG_OP IN ('INSERT', 'UPDATE') THEN INSERT INTO job_counts (adapter, state, jobs, finished) "
            f"VALUES (NEW.adapter, NEW.state, 1, CASE WHEN NEW.state IN {finished} AND (TG_OP = 'INSERT' "
            f"OR OLD.state NOT IN {finished}) THEN 1 ELSE 0 END) ON CONFLICT (adapter, state) DO UPDATE "
            "SET jobs = job_counts.jobs + 1, finished = job_counts.finished + EXCLUDED.finished; END IF",
        ),
        "CREATE TRIGGER job_counts_insert_delete AFTER INSERT OR DELETE ON jobs FOR EACH ROW "
        "EXECUTE FUNCTION job_counts_row()",
        "CREATE TRIGGER job_counts_update AFTER UPDATE OF state ON jobs FOR EACH ROW "
        "WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION job_counts_row()",
        _JOB_STAGE_TABLE.format(i="BIGINT", r="DOUBLE PRECISION"),
    )


# ---------------------------------------------------------------------------- reading the counters
def stats_sql(ph: str, one_adapter: bool) -> str:
    """TrafficStats' columns, in its field order, from the counters (`ph`: the backend's placeholder)."""
    where = f" AND c.adapter = {ph}" if one_adapter else ""
    edge = "(SELECT {f}(created) FROM traffic WHERE adapter = c.adapter AND version = c.version)"
    return (
        "SELECT c.adapter, c.version, c.records, c.rated, c.good, c.bad, c.corrected, c.usable, "
        "c.unrated_usable, c.untrusted, c.bytes, "
        f'{edge.format(f="MIN")} AS "first", {edge.format(f="MAX")} AS "last" '
        f"FROM traffic_counts c WHERE c.records > 0{where} ORDER BY c.adapter, c.version"
    )


def adapter_totals_sql(ph: str) -> str:
    """(records, bytes) of one adapter, all versions, from the counters."""
    return (
        f"SELECT COALESCE(SUM(records), 0), COALESCE(SUM(bytes), 0) FROM traffic_counts WHERE adapter = {ph}"
    )


ADAPTERS_SQL = "SELECT DISTINCT adapter FROM traffic_counts WHERE records > 0 ORDER BY adapter"


# ---------------------------------------------------------------------------- job stage durations
def stage_samples(result: Any) -> dict[str, float]:
    """The stage durations of a job's result that the histogram counts: the numbers of its "timings"
    object (finite ones; booleans count as 0/1, as json numbers they are)."""
    timings = result.get("timings") if isinstance(result, Mapping) else None
    if not isinstance(timings, Mapping):
        return {}
    out = {}
    for stage, value in timings.items():
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            out[str(stage)] = float(value)
    return out


def bucket_of(seconds: float) -> int:
    """The index of the first bucket of JOB_STAGE_BUCKETS that holds `seconds` (len: only +Inf)."""
    for i, bound in enumerate(JOB_STAGE_BUCKETS):
        if seconds <= bound:
            return i
    return len(JOB_STAGE_BUCKETS)


def add_stage_samples(conn: Any, ph: str, samples: Mapping[str, float], sign: int = 1) -> None:
    """Add (sign -1: take away) a job's stage durations to job_stage_totals, in the caller's
    transaction."""
    for stage, seconds in sorted(samples.items()):
        conn.execute(
            f"INSERT INTO job_stage_totals (stage, bucket, jobs, seconds) VALUES ({ph}, {ph}, {ph}, {ph}) "
            "ON CONFLICT (stage, bucket) DO UPDATE SET jobs = job_stage_totals.jobs + EXCLUDED.jobs, "
            "seconds = job_stage_totals.seconds + EXCLUDED.seconds",
            (stage, bucket_of(seconds), sign, sign * seconds),
        )


def fill_stage_totals(conn: Any, ph: str, finished_states: tuple[str, ...]) -> None:
    """Migration 5's filling of job_stage_totals from the finished jobs' results (read in Python:
    result text is Python's JSON, NaN included, which Postgres's JSON types refuse)."""
    states = _sql_list(finished_states)
    rows = conn.execute(f"SELECT result FROM jobs WHERE state IN {states} AND result IS NOT NULL").fetchall()
    totals: dict[tuple[str, int], list[float]] = {}
    for (text,) in rows:
        for stage, seconds in stage_samples(json.loads(text)).items():
            entry = totals.setdefault((stage, bucket_of(seconds)), [0, 0.0])
            entry[0] += 1
            entry[1] += seconds
    for (stage, bucket), (jobs, seconds) in sorted(totals.items()):
        conn.execute(
            f"INSERT INTO job_stage_totals (stage, bucket, jobs, seconds) VALUES ({ph}, {ph}, {ph}, {ph})",
            (stage, bucket, int(jobs), seconds),
        )


@dataclass(frozen=True)
class StageHistogram:
    """One stage's histogram: cumulative counts per JOB_STAGE_BUCKETS bound, then all (+Inf), and the
    sum of seconds."""

    buckets: tuple[int, ...]
    count: int
    total: float


def stage_histograms(rows: list[tuple[str, int, int, float]]) -> dict[str, StageHistogram]:
    """The histograms from job_stage_totals' rows (stage, bucket, jobs, seconds)."""
    per: dict[str, list[int]] = {}
    sums: dict[str, float] = {}
    for stage, bucket, jobs, seconds in rows:
        counts = per.setdefault(stage, [0] * (len(JOB_STAGE_BUCKETS) + 1))
        counts[int(bucket)] += int(jobs)
        sums[stage] = sums.get(stage, 0.0) + float(seconds)
    out = {}
    for stage, counts in per.items():
        cumulative, running = [], 0
        for n in counts[:-1]:
            running += n
            cumulative.append(running)
        out[stage] = StageHistogram(tuple(cumulative), running + counts[-1], sums[stage])
    return out


# ---------------------------------------------------------------------------- batched deletes
class AdaptiveBatch:
    """The size of the next batch of a sweep: each batch is one transaction meant to hold the write
    lock about `target_s`; the size halves after a batch that took longer and doubles after one that
    took under half of it (within [`smallest`, `largest`]). `longest_s` is the slowest batch seen.

    Between two batches the sweep rests `rest_ratio` times as long as the last batch took. Short
    transactions alone do not let others in: a writer that finds SQLite's write lock taken sleeps in
    the busy handler (polling at up to 100 ms) and wakes to find the next batch holding it, so a
    sweep that starts its next batch at once can hold a job claim back for the whole sweep (seen in CI:
    1 claim in 86 batches). Resting as long as it held the lock leaves it free half the time."""

    # 10 ms: a batch's time as its caller sees it also holds the wait at BEGIN for another writer and,
    # on SQLite, a WAL checkpoint at COMMIT (proportional to what the batch wrote); at 20 ms one batch
    # of a 1M-record sweep took 57.5 ms (benchmarks/record_store.md), above the 50 ms bound
    TARGET_S = 0.01
    REST_RATIO = 1.0

    def __init__(
        self,
        size: int = 256,
        target_s: float = TARGET_S,
        smallest: int = 8,
        largest: int = 20_000,
        rest_ratio: float = REST_RATIO,
    ):
        self.size = size
        self.target_s = target_s
        self.smallest = smallest
        self.largest = largest
        self.rest_ratio = rest_ratio
        self.longest_s = 0.0
        self.last_s = 0.0
        self.batches = 0

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Time one batch (around its transaction) and size the next; after the first batch, rest
        first (class docstring). A sweep's first batch starts at once: a sweep that needs one batch
        (the traffic writer trimming what it just added) never waits."""
        if self.batches and self.rest_ratio > 0:
            time.sleep(self.rest_ratio * self.last_s)
        start = time.perf_counter()
        try:
            yield
        finally:
            took = time.perf_counter() - start
            self.last_s = took
            self.batches += 1
            self.longest_s = max(self.longest_s, took)
            if took > self.target_s:
                self.size = max(self.smallest, self.size // 2)
            elif took < self.target_s / 2:
                self.size = min(self.largest, self.size * 2)


def sweep_traffic(db: Any, ph: str, adapter: str, retention: Any, now: float | None) -> tuple[int, int]:
    """`Database.enforce_retention` for both backends, in batches (module docstring): records older
    than the age limit first (by the index on (adapter, created)), then the oldest by id while the
    adapter holds more records or bytes than allowed (counted by the counters, read again in each
    batch's transaction: other writers go on meanwhile). Returns (records deleted, records left)."""
    batch = AdaptiveBatch()
    deleted = 0
    if retention.max_age_s is not None:
        cutoff = (time.time() if now is None else now) - retention.max_age_s
        while True:
            size = batch.size
            with batch.timed(), db.transaction() as c:
                n = c.execute(
                    f"DELETE FROM traffic WHERE id IN (SELECT id FROM traffic WHERE adapter = {ph} "
                    f"AND created < {ph} ORDER BY adapter, created LIMIT {ph})",
                    (adapter, cutoff, size),
                ).rowcount
            deleted += n
            if n < size:
                break
    if retention.max_records is not None or retention.max_bytes is not None:
        while True:
            with batch.timed(), db.transaction() as c:
                records, total = c.execute(adapter_totals_sql(ph), (adapter,)).fetchone()
                excess = records - retention.max_records if retention.max_records is not None else 0
                over = total - retention.max_bytes if retention.max_bytes is not None else 0
                cut = None
                if excess > 0 or over > 0:
                    for row_id, size in c.execute(
                        f"SELECT id, bytes FROM traffic WHERE adapter = {ph} ORDER BY adapter, id LIMIT {ph}",
                        (adapter, batch.size),
                    ).fetchall():
                        if excess <= 0 and over <= 0:
                            break
                        cut, excess, over = row_id, excess - 1, over - size
                n = 0
                if cut is not None:
                    n = c.execute(
                        f"DELETE FROM traffic WHERE adapter = {ph} AND id <= {ph}", (adapter, cut)
                    ).rowcount
            deleted += n
            if n == 0 or (excess <= 0 and over <= 0):
                break
    left = db._read_one(adapter_totals_sql(ph), (adapter,))[0]
    return deleted, int(left)


def prune_job_history(
    db: Any,
    ph: str,
    max_age_s: float | None,
    keep_per_adapter: int | None,
    now: float | None,
    finished_states: tuple[str, ...],
) -> int:
    """`JobQueue.prune_jobs` for both backends, in batches: finished jobs older than `max_age_s`
    (by their end) or beyond an adapter's newest `keep_per_adapter` finished ones. Never pruned: an
    adapter's newest job (the automatic jobs measure new data from it), its newest accepted or
    kept_original job (the held-out loss gauge), an accepted job whose swap is pending, and first_load
    jobs (their dedupe key means "once per adapter content"). Returns the jobs deleted."""
    if max_age_s is None and keep_per_adapter is None:
        return 0
    finished = _sql_list(finished_states)
    cutoff = (time.time() if now is None else now) - max_age_s if max_age_s is not None else None
    batch = AdaptiveBatch()
    deleted = 0
    adapters = [
        r[0] for r in db._read_all("SELECT DISTINCT adapter FROM job_counts WHERE jobs > 0 ORDER BY adapter")
    ]
    for adapter in adapters:
        newest = db._read_one(f"SELECT MAX(id) FROM jobs WHERE adapter = {ph}", (adapter,))[0]
        if newest is None:
            continue
        quality = db._read_one(
            f"SELECT MAX(id) FROM jobs WHERE adapter = {ph} AND state IN ('accepted', 'kept_original')",
            (adapter,),
        )[0]
        beyond = 0  # jobs with an id below this one are beyond the newest keep_per_adapter finished
        if keep_per_adapter is not None:
            found = db._read_all(
                f"SELECT id FROM jobs WHERE adapter = {ph} AND state IN {finished} ORDER BY adapter DESC, "
                f"id DESC LIMIT 1 OFFSET {ph}",
                (adapter, int(keep_per_adapter) - 1),
            )
            beyond = found[0][0] if found else 0
        rule = [f"id < {ph}"]
        params: list[Any] = [beyond]
        if cutoff is not None:
            rule.append(f"finished < {ph}")
            params.append(cutoff)
        after = 0
        while True:
            size = batch.size
            with batch.timed(), db.transaction() as c:
                ids = [
                    r[0]
                    for r in c.execute(
                        f"SELECT id FROM jobs WHERE adapter = {ph} AND id > {ph} AND id < {ph} AND id <> {ph} "
                        f"AND state IN {finished} AND trigger <> 'first_load' "
                        f"AND NOT (state = 'accepted' AND swap = 'pending') AND ({' OR '.join(rule)}) "
                        f"ORDER BY adapter, id LIMIT {ph}",
                        (adapter, after, newest, quality if quality is not None else -1, *params, size),
                    ).fetchall()
                ]
                if ids:
                    marks = ", ".join([ph] * len(ids))
                    deleted += c.execute(
                        f"DELETE FROM jobs WHERE id IN ({marks}) AND state IN {finished} "
                        "AND NOT (state = 'accepted' AND swap = 'pending')",
                        ids,
                    ).rowcount
            if len(ids) < size:
                break
            after = ids[-1]
    return deleted
