"""Benchmark: the record store at scale (SQLite and Postgres), measured with the project's own API.

For each backend and each size (10k, 100k and 1M records over 10 adapters with 2 versions each, about
1 KB of text per record, a fifth of them with feedback; plus 100k finished jobs), it measures:

- all-adapter traffic stats (`Database.stats()`: the CLI, the writer's periodic gauge refresh) and one
  adapter's (`stats(adapter)`: what a feedback post refreshes), median of 5;
- usable-example counts: the gauge's per-adapter counts (`stats(adapter)` for every adapter), and the
  automatic jobs' new-data check (`usable_since(adapter, 0, at_most=64)`: no job for ages, the worst
  case; the check only compares the count with refine_new_examples, 64 by default);
- a /metrics scrape's job figures (`JobsCollector.collect()`, which calls `job_figures()`);
- the calibration export of one adapter (`export_calibration`, unrated included so that every
  calibratable record is written): records read per second (the better of two runs), and its peak
  Python memory (tracemalloc, a third run);
- a retention sweep that removes 10% of one adapter's records and a job-history prune that removes 10%
  of the finished jobs: the longest transaction of each (the write-lock hold: every transaction of
  the sweep is timed), while another thread enqueues, claims and finishes jobs in a loop (the worst
  wait of those calls).

How the stores are filled fast, through the real schema (migrations, triggers): SQLite with the API's
own `insert()` in 10k-record transactions (the counters' triggers run per row); Postgres with COPY of
the rows `insert()` would write (`_pg_row`, and the tally `insert()` computes), one COPY per 50k rows,
so that its statement-level triggers run once per COPY. Feedback: one INSERT ... SELECT of a rating or
correction for every fifth record, then the same UPDATE of bytes and tally that `add_feedback()` makes,
for those rows in one statement (the triggers move the counts). Jobs: one INSERT ... SELECT of finished
jobs with a result (the job counters' triggers count them), and the stage totals filled by the
migration's own filler. The SQLite file goes under --dir (default /tmp) and is deleted afterwards; the
Postgres server is a private one (vllm_surgery/testing_servers.py), removed afterwards.

Prints a table with the targets (the issue's: < 50 ms for stats, usable counts and a scrape;
>= 50k records/s in bounded memory for the export; <= 50 ms of write lock per batch) and met/missed,
and writes it to --output (default benchmarks/record_store.md).

Run:  python benchmarks/record_store.py [--quick] [--sizes 10000,100000,1000000] [--backends sqlite,postgres]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_surgery.serving.metrics import JobsCollector
from vllm_surgery.storage import Retention, SQLiteDatabase, TrafficRecord, open_database
from vllm_surgery.storage.counters import fill_stage_totals, insert_tally
from vllm_surgery.storage.job_queue import FINISHED_STATES
from vllm_surgery.traffic import export_calibration

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = [f"a{i}" for i in range(10)]
VERSIONS = ("original", "v1")
TARGET_MS = 50.0
TARGET_RATE = 50_000.0


@dataclass
class Row:
    backend: str
    size: int
    jobs: int
    fill_s: float = 0.0
    figures: dict[str, float] = field(default_factory=dict)


CHECKS = (  # (key, label, unit, target, is met when)
    ("stats_all", "all-adapter stats", "ms", f"< {TARGET_MS:g} ms", lambda v: v < TARGET_MS),
    ("stats_one", "one adapter's stats", "ms", f"< {TARGET_MS:g} ms", lambda v: v < TARGET_MS),
    ("usable_gauge", "usable counts, every adapter", "ms", f"< {TARGET_MS:g} ms", lambda v: v < TARGET_MS),
    ("usable_since", "new-data check (usable_since)", "ms", f"< {TARGET_MS:g} ms", lambda v: v < TARGET_MS),
    ("scrape", "/metrics job figures", "ms", f"< {TARGET_MS:g} ms", lambda v: v < TARGET_MS),
    ("export_rate", "export rate", "records/s", f">= {TARGET_RATE:,.0f}/s", lambda v: v >= TARGET_RATE),
    ("export_peak", "export peak memory", "MiB", "bounded (< 64 MiB)", lambda v: v < 64),
    ("sweep_hold", "retention sweep, longest batch", "ms", f"<= {TARGET_MS:g} ms", lambda v: v <= TARGET_MS),
    ("sweep_claim", "job call's worst wait (sweep)", "ms", f"<= {TARGET_MS:g} ms", lambda v: v <= TARGET_MS),
    ("prune_hold", "job prune, longest batch", "ms", f"<= {TARGET_MS:g} ms", lambda v: v <= TARGET_MS),
    ("prune_claim", "job call's worst wait (prune)", "ms", f"<= {TARGET_MS:g} ms", lambda v: v <= TARGET_MS),
)


def records(start: int, n: int) -> list[TrafficRecord]:
    """n records of about 1 KB of text, spread over the adapters and versions, one second apart."""
    out = []
    for i in range(start, start + n):
        out.append(
            TrafficRecord(
                request_id=f"req-{i}",
                response_id=f"cmpl-req-{i}",
                choice=0,
                adapter=ADAPTERS[i % len(ADAPTERS)],
                version=VERSIONS[(i // len(ADAPTERS)) % 2],
                endpoint="completions",
                prompt=f"question {i}: " + "tell me about the weather in the mountains " * 7,
                completion=f"answer {i}: " + "it is usually cold and windy up there, bring a coat " * 10,
                sampling={"temperature": 0.7, "max_tokens": 256},
                created=1_000_000.0 + i,
                calibratable=i % 13 != 0,
            )
        )
    return out


def fill_traffic(db: Any, size: int) -> None:
    chunk = 10_000
    if isinstance(db, SQLiteDatabase):
        for start in range(0, size, chunk):
            db.insert(records(start, min(chunk, size - start)))
        return
    from vllm_surgery.storage.database import TRAFFIC_COLUMNS
    from vllm_surgery.storage.postgres import _pg_row

    columns = ", ".join([*TRAFFIC_COLUMNS, "bytes", "tally"])
    with db.transaction() as conn:
        for start in range(0, size, 50_000):
            with conn.cursor().copy(f"COPY traffic ({columns}) FROM STDIN") as copy:
                for begin in range(start, min(size, start + 50_000), chunk):
                    for r in records(begin, min(chunk, size - begin, start + 50_000 - begin)):
                        copy.write_row([*_pg_row(r), insert_tally(r.calibratable, r.completion)])


def fill_feedback(db: Any) -> None:
    """A rating or a correction on every fifth record, then add_feedback's own UPDATE for those rows."""
    sqlite = isinstance(db, SQLiteDatabase)
    if sqlite:
        from vllm_surgery.storage.database import _ROW_TALLY, FEEDBACK_BYTES, RECORD_BYTES
    else:
        from vllm_surgery.storage.postgres import _ROW_TALLY, FEEDBACK_BYTES, RECORD_BYTES
    trusted = "1" if sqlite else "true"
    with db.transaction() as c:
        c.execute(
            "INSERT INTO feedback (traffic_id, adapter, rating, correction, created, trusted) SELECT id, adapter, "
            "CASE WHEN id % 3 = 0 THEN 'bad' ELSE 'good' END, "
            "CASE WHEN id % 15 = 0 THEN 'a corrected answer' ELSE NULL END, created + 60, "
            f"{trusted} FROM traffic WHERE id % 5 = 0"
        )
        c.execute(
            f"UPDATE traffic SET bytes = {RECORD_BYTES} + (SELECT COALESCE(SUM({FEEDBACK_BYTES}), 0) "
            f"FROM feedback WHERE traffic_id = traffic.id), tally = {_ROW_TALLY} WHERE id % 5 = 0"
        )


def fill_jobs(db: Any, n: int) -> None:
    """n finished jobs over the adapters, with a result holding timings and held-out losses."""
    sqlite = isinstance(db, SQLiteDatabase)
    result = json.dumps(
        {
            "version": "v",
            "quality_before": {"loss": 2.0},
            "quality_after": {"loss": 1.5},
            "timings": {"queued": 1.0, "calibration": 3.0, "sensitivity": 40.0, "total": 90.0},
        }
    )
    series = (
        "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < ?) SELECT i FROM s"
        if sqlite
        else "SELECT generate_series(1, %s) AS i"
    )
    mod = "%" if sqlite else "%%"  # psycopg's placeholders start with %
    state = f"CASE i {mod} 3 WHEN 0 THEN 'accepted' WHEN 1 THEN 'kept_original' ELSE 'failed' END"
    adapter = f"'a' || (i {mod} 10)" if sqlite else f"'a' || (i {mod} 10)::text"
    with db.transaction() as c:
        c.execute(
            "INSERT INTO jobs (adapter, trigger, state, spec, created, started, finished, attempts, "
            f"max_attempts, result, swap) SELECT {adapter}, 'new_data', {state}, '{{}}', i, i, i + 90, 1, 3, "
            f"{'?' if sqlite else '%s'}, NULL FROM ({series}) s",
            (result, n),
        )
        c.execute("DELETE FROM job_stage_totals")
        fill_stage_totals(c, "?" if sqlite else "%s", FINISHED_STATES)


def median_ms(fn: Any, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


class Timed:
    """Times every transaction the measuring thread opens on `db` (the write-lock hold of a sweep's
    batches), by switching the instance to a subclass whose transaction() is timed."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.holds: list[float] = []
        self.thread = threading.current_thread()
        base = type(db)
        timer = self

        class TimedDatabase(base):  # type: ignore[misc, valid-type]
            @contextlib.contextmanager
            def transaction(self):
                t = time.perf_counter()
                try:
                    with base.transaction(self) as c:
                        yield c
                finally:
                    if threading.current_thread() is timer.thread:
                        timer.holds.append((time.perf_counter() - t) * 1000)

        self.base = base
        db.__class__ = TimedDatabase

    def close(self) -> None:
        self.db.__class__ = self.base


def with_claims(db: Any, action: Any) -> tuple[Any, float, float]:
    """Run `action()` timing its transactions while another thread enqueues, claims and finishes jobs
    in a loop; (its result, longest transaction ms, the worst of those job calls in ms: each is a write
    transaction that had to wait its turn)."""
    stop = threading.Event()
    waits: list[float] = []

    def waited(call: Any, *args: Any) -> Any:
        t = time.perf_counter()
        result = call(*args)
        waits.append((time.perf_counter() - t) * 1000)
        return result

    def claims() -> None:
        n = 0
        while not stop.is_set():
            waited(db.enqueue_job, f"claims{n % 4}", "manual", {})
            claimed = waited(db.claim_job, "bench", 60)
            if claimed is not None:
                waited(db.finish_job, claimed.id, "bench", "kept_original", {})
            n += 1
            time.sleep(0.002)

    timer = Timed(db)
    thread = threading.Thread(target=claims, daemon=True)
    thread.start()
    try:
        result = action()
    finally:
        stop.set()
        thread.join()
        timer.close()
    return result, max(timer.holds, default=0.0), max(waits, default=0.0)


def measure(db: Any, size: int, jobs: int, workdir: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    out["stats_all"] = median_ms(db.stats)
    out["stats_one"] = median_ms(lambda: db.stats("a3"))
    out["usable_gauge"] = median_ms(lambda: [db.stats(a) for a in db.adapters()])
    # the automatic jobs' check, as they call it (up to refine_new_examples, default 64), for an adapter
    # whose last job was long ago (since 0: the worst case)
    out["usable_since"] = median_ms(lambda: db.usable_since("a3", 0.0, True, at_most=64))
    collector = JobsCollector(db)
    out["scrape"] = median_ms(collector.collect)
    per_adapter = sum(s.records for s in db.stats("a1"))
    target = workdir / "a1.jsonl"
    rates = []
    for _ in range(2):  # the better of two: the first also warms the caches
        t = time.perf_counter()
        data = export_calibration(db, "a1", target, include_unrated=True)
        rates.append(per_adapter / (time.perf_counter() - t))
    out["export_rate"] = max(rates)
    out["export_lines"] = data.count
    tracemalloc.start()
    try:
        export_calibration(db, "a1", target, include_unrated=True)
        out["export_peak"] = tracemalloc.get_traced_memory()[1] / 1024**2
    finally:
        tracemalloc.stop()
    target.unlink()
    keep = per_adapter - per_adapter // 10
    (deleted, _), out["sweep_hold"], out["sweep_claim"] = with_claims(
        db, lambda: db.enforce_retention("a2", Retention(max_records=keep))
    )
    out["sweep_deleted"] = deleted
    keep_jobs = (jobs // len(ADAPTERS)) - (jobs // len(ADAPTERS)) // 10
    out["pruned"], out["prune_hold"], out["prune_claim"] = with_claims(
        db, lambda: db.prune_jobs(None, keep_jobs, now=time.time())
    )
    return out


def run_backend(backend: str, size: int, jobs: int, workdir: Path, pg: Any) -> Row:
    if backend == "sqlite":
        path = workdir / f"records-{size}.sqlite3"
        target: Any = path
    else:
        target = pg.new_database()
    row = Row(backend, size, jobs)
    db = open_database(target)
    try:
        t = time.perf_counter()
        fill_traffic(db, size)
        fill_feedback(db)
        fill_jobs(db, jobs)
        row.fill_s = time.perf_counter() - t
        if backend != "sqlite":
            with db.transaction() as c:
                c.execute("ANALYZE")
        print(f"  {backend} {size:,}: filled in {row.fill_s:.0f} s; measuring", flush=True)
        row.figures = measure(db, size, jobs, workdir)
    finally:
        db.close()
        if backend == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
    return row


def table(rows: list[Row]) -> str:
    lines = [
        "| backend | records | finished jobs | measure | value | target | |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for key, label, unit, target, met in CHECKS:
            value = row.figures[key]
            shown = f"{value:,.0f} {unit}" if unit == "records/s" else f"{value:.1f} {unit}"
            lines.append(
                f"| {row.backend} | {row.size:,} | {row.jobs:,} | {label} | {shown} | {target} | "
                f"{'met' if met(value) else 'MISSED'} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="10k records and 10k finished jobs only")
    p.add_argument("--sizes", default="10000,100000,1000000", help="record counts (default 10k,100k,1M)")
    p.add_argument("--jobs", type=int, default=100_000, help="finished jobs (default 100000)")
    p.add_argument("--backends", default="sqlite,postgres", help="sqlite,postgres (default both)")
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the SQLite file goes")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "record_store.md")
    args = p.parse_args(argv)
    sizes = [10_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    jobs = 10_000 if args.quick else args.jobs
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - {"sqlite", "postgres"}
    if unknown:
        p.error(f"--backends: unknown {sorted(unknown)}; use sqlite and/or postgres")
    workdir = Path(tempfile.mkdtemp(prefix="record-store-", dir=args.dir))
    pg = None
    rows = []
    try:
        if "postgres" in backends:
            from vllm_surgery.testing_servers import PostgresServer

            pg = PostgresServer().start()
        for size in sizes:
            for backend in backends:
                rows.append(run_backend(backend, size, jobs, workdir, pg))
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    text = table(rows)
    print(text)
    missed = sum(not met(r.figures[k]) for r in rows for k, *_, met in CHECKS)
    fills = "; ".join(f"{r.backend} {r.size:,}: {r.fill_s:.0f} s" for r in rows)
    report = io.StringIO()
    report.write("# The record store at scale\n\n")
    report.write(f"`python benchmarks/record_store.py{' --quick' if args.quick else ''}` ")
    report.write(f"on {platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}, ")
    report.write(
        f"{time.strftime('%Y-%m-%d')}. How it fills and what each line measures: the script's docstring.\n\n"
    )
    report.write(f"{text}\n\nFilling (not a target): {fills}. Targets missed: {missed}.\n")
    args.output.write_text(report.getvalue())
    print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
