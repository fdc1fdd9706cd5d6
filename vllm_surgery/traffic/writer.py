"""Recording traffic without slowing serving: the writer thread that stores captured requests in
batches, and the recorder that ties it to the policy (`policy`) and the redaction (`redaction`).

Off the request path: the server's event loop only puts a captured request into a bounded queue
(`TrafficWriter.submit`, a non-blocking put). One daemon thread takes what is queued (up to
`BATCH_SIZE` at a time, waiting up to `LINGER_S` after the first for company), turns it into records
(version lookup, JSON, redaction: the costly parts), writes the batch in one transaction and enforces
the retention of the adapters in it; every `MAINTENANCE_INTERVAL_S` it also enforces the retention of
every adapter and refreshes the usable-calibration-examples gauge. Both read the database's
maintained counters (storage/counters.py), not the records: their cost does not grow with the number
of records, and a retention sweep deletes in short batches that other writers interleave with.

Never silently lost: when the queue is full the record is dropped, counted in
``vllm_surgery_traffic_records_total{outcome="dropped"}`` and logged (the first drop at once, then a
summary at most every 10 s). A batch that the database refuses is retried once, then counted as
``failed`` and logged. `close()` (the server's shutdown) writes everything still queued. Recording
never stops silently: a supervisor thread checks the writer thread every `SUPERVISE_INTERVAL_S` and
starts a new one if it died (an exception no handler expected, a BaseException); the gauge
``vllm_surgery_traffic_writer_up``, the counter ``vllm_surgery_traffic_writer_restarts_total`` and
``GET /v1/surgery/traffic`` ("writer") say so, and the death is logged with its traceback.

Crash bound: a committed batch survives a crash or SIGKILL (SQLite WAL, see `storage.database`). What
can be missing after a crash is at most what was queued (``traffic_queue_size`` records, observable
as the queue-depth gauge) plus the batch being written (at most `BATCH_SIZE`, gathered for at most
`LINGER_S`), plus the requests whose responses were still being sent (they are queued just before
their last byte is sent).
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from ..settings import ServingSettings
from ..storage import Database, DatabaseError, DatabaseUnavailable, Retention, TrafficRecord, record_bytes
from . import metrics
from .policy import TrafficPolicy
from .redaction import apply_redaction, load_redaction, pseudonym

log = logging.getLogger(f"vllm.{__name__}")

BATCH_SIZE = 256
LINGER_S = 0.05  # after the first queued record, wait this long for more to share its transaction
MAINTENANCE_INTERVAL_S = 60.0
DROP_LOG_INTERVAL_S = 10.0
SUPERVISE_INTERVAL_S = 1.0
OUTAGE_RETRY_S = 0.25  # the first wait after the database was found unreachable, doubled per try...
OUTAGE_RETRY_MAX_S = 5.0  # ...up to this
OUTAGE_STALL_S = 2.0  # a database call without an answer this long is an outage (logged, `outage_s`)
OUTAGE_CLOSE_TRIES = 3  # after close(), tries left before a held batch is given up (counted as failed)


# ----------------------------------------------------------------------------- the writer
class TrafficWriter:
    """A bounded queue and one thread that writes what it holds, in batches (module docstring).

    `prepare(item)` runs in the writer thread and turns a queued item into the records to store (an
    empty list: nothing to store). `retention(adapter)` gives an adapter's limits; `maintenance` runs
    every `maintenance_interval_s` after the retention of every adapter (the server refreshes its
    gauges there)."""

    def __init__(
        self,
        db: Database,
        prepare: Callable[[Any], list[TrafficRecord]],
        *,
        queue_size: int,
        retention: Callable[[str], Retention],
        maintenance: Callable[[], None] | None = None,
        batch_size: int = BATCH_SIZE,
        maintenance_interval_s: float = MAINTENANCE_INTERVAL_S,
        linger_s: float = LINGER_S,
        supervise_interval_s: float = SUPERVISE_INTERVAL_S,
    ) -> None:
        self.db = db
        self.linger_s = linger_s
        self.prepare = prepare
        self.retention = retention
        self.maintenance = maintenance
        self.batch_size = batch_size
        self.maintenance_interval_s = maintenance_interval_s
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._cond = threading.Condition()
        self._submitted = 0
        self._done = 0
        self._peak = 0
        self._stop = threading.Event()
        self._dropped_since_log = 0
        self._last_drop_log = 0.0
        self._outage_since: float | None = None  # monotonic time the database was found unreachable
        self._outage_tries = 0
        # the database call in progress, for the supervisor's stall watch (`_watched`), or None
        self._call: _Call | None = None
        self._thread = self._new_thread()
        self._started = False
        self.supervise_interval_s = supervise_interval_s
        self.restarts = 0
        self.last_error: str | None = None  # why the writer thread last died (None: never)
        self._supervisor = threading.Thread(
            target=self._supervise, name="vllm-surgery-traffic-supervisor", daemon=True
        )
        metrics.TRAFFIC_QUEUE_DEPTH.set_function(self.queue.qsize)
        metrics.TRAFFIC_QUEUE_PEAK.set_function(lambda: self._peak)
        metrics.TRAFFIC_WRITER_UP.set_function(lambda: 1.0 if self.up else 0.0)

    def _new_thread(self) -> threading.Thread:
        return threading.Thread(target=self._run_guarded, name="vllm-surgery-traffic-writer", daemon=True)

    @property
    def up(self) -> bool:
        """Whether the writer thread is running (False before start, after close, and after it died
        until the supervisor has started another)."""
        return self._started and self._thread.is_alive()

    def health(self) -> dict[str, Any]:
        """What the traffic route shows: whether records are being written, restarts so far, and how
        long the database has been unreachable (None: it is not)."""
        return {
            "up": self.up,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "outage_s": self.outage_s,
        }

    @property
    def peak_depth(self) -> int:
        return self._peak

    def start(self) -> TrafficWriter:
        """Start the writer thread and its supervisor (idempotent)."""
        if not self._started:
            self._started = True
            self._thread.start()
            self._supervisor.start()
        return self

    def _supervise(self) -> None:
        """Restart a writer thread that died, until close(): what is still queued is written by the new
        thread; the batch it was writing is lost (counted as failed)."""
        while not self._stop.wait(self.supervise_interval_s):
            self.ensure_running()
            self._watch_stall()

    def ensure_running(self) -> bool:
        """Start a new writer thread if the running one died; True if one was started."""
        with self._cond:
            if self._stop.is_set() or not self._started or self._thread.is_alive():
                return False
            self.restarts += 1
            metrics.TRAFFIC_WRITER_RESTARTS.inc()
            log.error(
                "traffic: the writer thread had died (%s); starting a new one (restart %d)",
                self.last_error or "no error recorded",
                self.restarts,
            )
            self._thread = self._new_thread()
            self._thread.start()
            return True

    def _run_guarded(self) -> None:
        try:
            self._run()
        except BaseException as e:  # the supervisor restarts the thread; here it is only recorded
            self.last_error = f"{type(e).__name__}: {e}"
            log.critical("traffic: the writer thread died; the supervisor restarts it", exc_info=True)

    # ------------------------------------------------------------------ producer side (event loop)
    def submit(self, item: Any, adapter: str) -> bool:
        """Queue `item` without blocking. False (and counted, and logged) when it had to be dropped."""
        with self._cond:
            if not self._stop.is_set():
                try:
                    self.queue.put_nowait(item)
                except queue.Full:
                    pass
                else:
                    self._submitted += 1
                    depth = self.queue.qsize()
                    if depth > self._peak:
                        self._peak = depth
                    return True
        self._dropped(adapter, "closed" if self._stop.is_set() else "full")
        return False

    def _dropped(self, adapter: str, why: str) -> None:
        metrics.record_traffic(adapter, "dropped")
        self._dropped_since_log += 1
        now = time.monotonic()
        if self._last_drop_log == 0.0 or now - self._last_drop_log >= DROP_LOG_INTERVAL_S:
            outage = self.outage_s
            if outage is not None and why == "full":
                log.warning(
                    "traffic: %d record(s) dropped since the last report (latest: adapter %r): the queue "
                    "(size %d) is full during a database outage of %.1f s so far",
                    self._dropped_since_log,
                    adapter,
                    self.queue.maxsize,
                    outage,
                )
            else:
                log.warning(
                    "traffic: %d record(s) dropped since the last report (latest: adapter %r; queue %s, "
                    "size %d); raise traffic_queue_size or lower the sample rate",
                    self._dropped_since_log,
                    adapter,
                    why,
                    self.queue.maxsize,
                )
            self._dropped_since_log = 0
            self._last_drop_log = now

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until everything submitted before this call has been written (or given up on).
        True if that happened within `timeout` seconds."""
        with self._cond:
            target = self._submitted
            if self._done >= target:
                return True
            with contextlib.suppress(queue.Full):
                self.queue.put_nowait(_WAKE)
            return self._cond.wait_for(lambda: self._done >= target, timeout)

    def close(self, timeout: float | None = 60.0) -> bool:
        """Stop accepting, write everything queued, stop the thread. Idempotent. True if all was written."""
        with self._cond:
            alive = self._started and self._thread.is_alive()
            self._stop.set()
        if not self._started:
            return self.queue.empty()
        if not alive and not self.queue.empty():  # died, not restarted yet: one more writes what is left
            self._thread = self._new_thread()
            self._thread.start()
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(_WAKE)
        self._thread.join(timeout)
        return not self._thread.is_alive() and self.queue.empty()

    # ------------------------------------------------------------------ consumer side (thread)
    def _run(self) -> None:
        next_maintenance = time.monotonic() + self.maintenance_interval_s
        while True:
            items = self._next_batch(max(0.05, min(1.0, next_maintenance - time.monotonic())))
            if items:
                try:
                    self._write(items)
                except Exception:  # never let one batch end recording for the server's life
                    log.exception("traffic: writing a batch of %d item(s) failed; they are lost", len(items))
            if time.monotonic() >= next_maintenance:
                self._maintain()
                next_maintenance = time.monotonic() + self.maintenance_interval_s
            if self._stop.is_set() and self.queue.empty():
                break
        with contextlib.suppress(Exception):
            self._maintain()

    def _next_batch(self, timeout: float) -> list[Any]:
        """Up to batch_size items: waits `timeout` for the first, then up to linger_s for more (one
        transaction for several records costs little more than for one), unless woken (flush, close)."""
        items: list[Any] = []
        try:
            first = self.queue.get(timeout=timeout)
        except queue.Empty:
            return items
        if first is _WAKE:
            return items
        items.append(first)
        deadline = time.monotonic() + self.linger_s
        while len(items) < self.batch_size:
            try:
                item = (
                    self.queue.get_nowait()
                    if self._stop.is_set()
                    else self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                )
            except queue.Empty:
                break
            if item is _WAKE:
                with contextlib.suppress(queue.Empty):
                    while len(items) < self.batch_size:  # take what is there, without waiting
                        if (more := self.queue.get_nowait()) is not _WAKE:
                            items.append(more)
                break
            items.append(item)
        return items

    def _write(self, items: list[Any]) -> None:
        records: list[TrafficRecord] = []
        for item in items:
            try:
                records.extend(self.prepare(item))
            except Exception:
                adapter = getattr(item, "adapter", "")
                log.exception(
                    "traffic: a record of adapter %r could not be prepared; it is not stored", adapter
                )
                metrics.record_traffic(adapter, "failed")
        try:
            if records and self._insert(records):
                added: dict[str, int] = {}
                for r in records:
                    metrics.record_traffic(r.adapter, "logged")
                    added[r.adapter] = added.get(r.adapter, 0) + 1
                self._retain(added)
        except BaseException:  # unexpected: the batch is lost (counted), the caller or supervisor goes on
            for r in records:
                metrics.record_traffic(r.adapter, "failed")
            raise
        finally:
            with self._cond:
                self._done += len(items)
                self._cond.notify_all()

    def _insert(self, records: list[TrafficRecord]) -> bool:
        """Write one batch, retrying once; False (counted as failed, logged) if it could not be written.

        The batch keeps the ids it drew first (Database.reserve_ids) through every retry: when a
        Postgres connection drops after the server committed and before the answer came, the retry
        finds those ids stored and writes nothing again, so no record is stored twice.

        A record the database cannot take for what it holds (not for the database's state) fails the
        whole batch's transaction: the batch is then written record by record, so that only that record
        is lost (counted as failed, logged), never the others or the writer."""
        attempt = 0
        ids: list[int] | None = None  # drawn once: a retry after a lost commit answer is then skipped
        reserved = False
        while True:
            attempt += 1
            try:
                then = f"the {len(records)} held record(s) are written, and what the queue kept follows"
                with self._watched("writing a batch", len(records), then):
                    if not reserved:
                        ids, reserved = self.db.reserve_ids(len(records)), True
                    self.db.insert(records, ids=ids)
                return True
            except (ValueError, TypeError) as e:  # UnicodeEncodeError, an unstorable value
                return self._insert_one_by_one(records, e)
            except DatabaseUnavailable as e:
                if not self._wait_out_outage(records, e):
                    return False
                continue
            except DatabaseError as e:
                if attempt == 2:
                    log.error("traffic: %d record(s) could not be written and are lost: %s", len(records), e)
                    for r in records:
                        metrics.record_traffic(r.adapter, "failed")
                    return False
                log.warning("traffic: writing %d record(s) failed (%s); retrying once", len(records), e)
                time.sleep(1.0)
        return False

    def _wait_out_outage(self, records: list[TrafficRecord], error: DatabaseError) -> bool:
        """The database server is unreachable (a Postgres outage): hold the batch and wait before the
        next try, doubling the wait up to OUTAGE_RETRY_MAX_S. Meanwhile the queue keeps filling; once
        it is full, new records are dropped and counted (`_dropped`): the queue's bound is the
        outage's memory bound, and nothing is lost silently. True: try again; False after close() when
        OUTAGE_CLOSE_TRIES more tries failed (the batch is counted as failed and logged)."""
        self._outage_began(f"{error}", len(records))
        self._outage_tries += 1
        if self._stop.is_set() and self._outage_tries > OUTAGE_CLOSE_TRIES:
            log.error(
                "traffic: database outage at shutdown: %d record(s) could not be written and are lost: %s",
                len(records),
                error,
            )
            for r in records:
                metrics.record_traffic(r.adapter, "failed")
            return False
        delay = min(OUTAGE_RETRY_MAX_S, OUTAGE_RETRY_S * 2 ** min(self._outage_tries - 1, 10))
        time.sleep(delay * (0.5 + random.random() / 2))  # jittered: replicas do not retry in step
        return True

    def _outage_began(
        self, why: str, held: int, since: float | None = None, call: _Call | None = None
    ) -> None:
        """Log the start of an outage once (from the writer on an error, or from the supervisor when a
        database call has had no answer for OUTAGE_STALL_S: a pool waits for a connection before it
        gives up). `call`: the supervisor's, only while that very call is still in progress (it may have
        been answered since the supervisor looked)."""
        with self._cond:
            if self._outage_since is not None or (call is not None and self._call is not call):
                return
            self._outage_since = time.monotonic() if since is None else since
            self._outage_tries = 0
            self._last_drop_log = 0.0  # the next drop is reported at once, naming the outage
        log.error(
            "traffic: database outage: %s; holding %d record(s) and retrying (every %g s at most); "
            "new records wait in the queue (size %d) and are dropped, counted, once it is full",
            why,
            held,
            OUTAGE_RETRY_MAX_S,
            self.queue.maxsize,
        )

    @contextlib.contextmanager
    def _watched(self, what: str, held: int = 0, then: str = "what the queue kept follows") -> Iterator[None]:
        """Mark a database call of the writer thread for the supervisor's stall watch (`_watch_stall`):
        every call is watched (a batch's insert, a retention check, the periodic listing of adapters and
        the maintenance hook), since the writer is stuck on whichever meets a server that is gone. A
        call that goes through ends an outage (`then`: what the log line says follows)."""
        call = _Call(time.monotonic(), what, held, threading.get_ident())
        with self._cond:
            self._call = call
        try:
            yield
        finally:
            with self._cond:
                self._call = None
        self._outage_over(then)

    def _watch_stall(self) -> None:
        """The supervisor's look at the database call in progress: one that has had no answer from the
        server for OUTAGE_STALL_S is an outage (the Postgres pool waits up to its busy timeout for a
        connection to a server that is down before it raises), logged as such, and shown by `outage_s`.
        "No answer" counts from the call's start or from the calling thread's last answer
        (`Database.answered_at`), whichever is later: a retention sweep of many short queries that takes
        seconds in all is not an outage, and other threads' answers do not hide this one's silence. Not for a local SQLite file, whose long waits are its lock's."""
        call = self._call
        if not self.db.networked or call is None:
            return
        answered = self.db.answered_at(call.thread)
        silent_since = max(call.began, answered if answered is not None else call.began)
        if time.monotonic() - silent_since >= OUTAGE_STALL_S:
            self._outage_began(
                f"{call.what} has had no answer from the database for "
                f"{time.monotonic() - silent_since:.1f} s",
                call.held,
                silent_since,
                call,
            )

    def _outage_over(self, then: str) -> None:
        """End the outage, if one was on, after a database call went through (`then`: what follows)."""
        with self._cond:
            since, self._outage_since = self._outage_since, None
        if since is not None:
            log.warning(
                "traffic: database outage over after %.1f s (%d failed tries); %s",
                time.monotonic() - since,
                self._outage_tries,
                then,
            )

    @property
    def outage_s(self) -> float | None:
        """Seconds since the writer found the database unreachable (None: it is not in an outage)."""
        since = self._outage_since
        return None if since is None else time.monotonic() - since

    def _insert_one_by_one(self, records: list[TrafficRecord], error: Exception) -> bool:
        log.warning(
            "traffic: a batch of %d record(s) could not be written (%s); writing them one by one",
            len(records),
            error,
        )
        kept = []
        for r in records:
            try:
                self.db.insert([r])
                kept.append(r)
            except Exception as e:
                log.error("traffic: a record of adapter %r could not be stored and is lost: %r", r.adapter, e)
                metrics.record_traffic(r.adapter, "failed")
        records[:] = kept  # the caller counts these as logged
        return bool(kept)

    def _retain(self, added: Mapping[str, int] | None = None) -> None:
        """Retention of the adapters just written (`added`: records per adapter) or, with None, of every
        adapter. Cheap when nothing is due: the database reads an adapter's counts from its counters,
        and deletes in short batches (storage/counters.py)."""
        if added is not None:
            adapters = sorted(added)
        else:
            with self._watched("listing the adapters"):
                adapters = self.db.adapters()
        for adapter in adapters:
            try:
                with self._watched(f"the retention check of adapter {adapter!r}"):
                    removed, _ = self.db.enforce_retention(adapter, self.retention(adapter))
            except DatabaseError as e:
                log.error("traffic: retention of adapter %r failed: %s", adapter, e)
                continue
            if removed:
                log.debug("traffic: retention removed %d record(s) of adapter %r", removed, adapter)

    def _maintain(self) -> None:
        try:
            self._retain()
            if self.maintenance is not None:
                with self._watched("the periodic maintenance"):
                    self.maintenance()
        except Exception:
            log.exception("traffic: periodic maintenance failed")


_WAKE = object()  # put into the queue to wake the writer (flush, close); never stored


@dataclass(frozen=True)
class _Call:
    """A database call of the writer thread in progress (for the supervisor's stall watch)."""

    began: float  # time.monotonic()
    what: str  # named in the outage's log line
    held: int  # records the writer holds meanwhile
    thread: int  # threading.get_ident() of the calling thread


_SURROGATE = re.compile("[\ud800-\udfff]")


def _clean(value: Any) -> Any:
    """`value` with lone surrogates replaced by U+FFFD; the very same object when it holds none, so that a
    clean record (nearly every one) is neither copied nor rebuilt."""
    if isinstance(value, str):
        if _SURROGATE.search(value) is None:
            return value
        # a lone surrogate (JSON "\\ud800" decodes to one): U+FFFD instead
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, Mapping):
        items = [(_clean(k), _clean(v)) for k, v in value.items()]
        unchanged = all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(items, value.items(), strict=True))
        return value if unchanged else dict(items)
    if isinstance(value, (list, tuple)):
        cleaned = [_clean(v) for v in value]
        return value if all(c is v for c, v in zip(cleaned, value, strict=True)) else type(value)(cleaned)
    return value


def without_surrogates(record: TrafficRecord) -> TrafficRecord:
    """The record with every lone surrogate in its strings replaced by U+FFFD: such a string (valid JSON,
    "\\ud800") cannot be encoded as UTF-8, so the database could not store it."""
    changes = {f.name: _clean(getattr(record, f.name)) for f in fields(record)}
    if all(changes[k] is getattr(record, k) for k in changes):
        return record
    return replace(record, **changes)


# ----------------------------------------------------------------------------- the recorder
class TrafficRecorder:
    """Everything the server needs to record traffic: the policy (consulted by the capture middleware),
    the writer, the redaction, and the mapping of a served adapter path to its version.

    `version_of(adapter, path)` answers 'original', a store version id, or None for an adapter the
    plugin does not know (loaded through vLLM's own /v1/load_lora_adapter): those are not recorded."""

    def __init__(
        self,
        settings: ServingSettings,
        db: Database,
        version_of: Callable[[str, str], str | None],
        *,
        rng: random.Random | None = None,
        maintenance_interval_s: float = MAINTENANCE_INTERVAL_S,
        supervise_interval_s: float = SUPERVISE_INTERVAL_S,
    ) -> None:
        self.settings = settings
        self.policy = TrafficPolicy(settings, rng)
        self.redaction = load_redaction(settings.traffic_redact)
        self.db = db
        self._secret: bytes | None = None
        self._oversized_logged = -math.inf
        self.feedback_trust: Any = None  # the server's serving.auth.FeedbackTrust (set by start_capture)
        self.version_of = version_of
        self._versions: dict[tuple[str, str], str | None] = {}
        self._gauged: set[str] = set()
        self.writer = TrafficWriter(
            db,
            self.prepare,
            queue_size=settings.traffic_queue_size,
            retention=lambda adapter: self.policy.for_adapter(adapter).retention,
            maintenance=self.refresh_gauges,
            maintenance_interval_s=maintenance_interval_s,
            supervise_interval_s=supervise_interval_s,
        )

    def start(self) -> TrafficRecorder:
        self.writer.start()
        self.refresh_gauges()
        return self

    def submit(self, capture: Any) -> bool:
        return self.writer.submit(capture, capture.adapter)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until what was submitted before this call is written (see TrafficWriter.flush)."""
        return self.writer.flush(timeout)

    def _version(self, adapter: str, path: str) -> str | None:
        key = (adapter, path)
        if key not in self._versions:
            if len(self._versions) > 4096:
                self._versions.clear()
            self._versions[key] = self.version_of(adapter, path)
        return self._versions[key]

    @property
    def secret(self) -> bytes:
        """The database's identifier secret (read once). Raises DatabaseError."""
        if self._secret is None:
            self._secret = self.db.id_secret()
        return self._secret

    def stored_ids(self, request_id: str) -> list[str]:
        """The ids a record asked for as `request_id` may be stored under: the id itself, or its
        pseudonym where the redaction changed it (see `redaction`). Blocking (reads the database
        once); raises DatabaseError."""
        if self.redaction is None:
            return [request_id]
        return [request_id, pseudonym(self.secret, request_id)]

    def prepare(self, capture: Any) -> list[TrafficRecord]:
        """A capture's records, redacted (writer thread). Unknown adapters give none, and a record
        whose stored text would exceed traffic_max_record_bytes is left out (counted as oversized)."""
        version = self._version(capture.adapter, capture.lora_path)
        if version is None:
            log.debug(
                "traffic: adapter %r (%s) is not known to the plugin; not recorded",
                capture.adapter,
                capture.lora_path,
            )
            return []
        out = []
        limit = self.settings.traffic_max_record_bytes
        # the client's ids are pseudonymised where redaction would change them; ids we generated are not
        secret = self.secret if self.redaction and not getattr(capture, "generated_id", False) else None
        for record in capture.to_records(version, capture.lora_path):
            record = without_surrogates(record)
            try:
                redacted = apply_redaction(self.redaction, record, secret)
            except Exception:
                log.exception(
                    "traffic: the redaction hook failed; record of adapter %r not stored", record.adapter
                )
                metrics.record_traffic(record.adapter, "failed")
                continue
            if redacted is None:
                metrics.record_traffic(record.adapter, "redacted_out")
            elif (size := record_bytes(redacted)) > limit:
                metrics.record_traffic(record.adapter, "oversized")
                now = time.monotonic()
                if now - self._oversized_logged < DROP_LOG_INTERVAL_S:
                    continue  # counted; logged at most every DROP_LOG_INTERVAL_S (clients choose sizes)
                self._oversized_logged = now
                log.warning(
                    "traffic: a record of adapter %r takes %d bytes, above VLLM_SURGERY_TRAFFIC_MAX_RECORD_BYTES"
                    "=%d; it is not stored (raise the limit to keep such records)",
                    record.adapter,
                    size,
                    limit,
                )
            else:
                out.append(redacted)
        return out

    def redact_correction(self, record: TrafficRecord, correction: str) -> str | None:
        """A user's correction is a completion for the recorded prompt: it goes through the same
        redaction as the record (None: the hook dropped it). Raises ValueError for a broken hook."""
        redacted = apply_redaction(self.redaction, replace(record, completion=_clean(correction)))
        return None if redacted is None else redacted.completion

    def usable_examples(self, adapter: str | None = None) -> dict[str, int]:
        """Usable calibration examples from traffic per adapter (the rules of `calibration_set`)."""
        out: dict[str, int] = {}
        for row in self.db.stats(adapter):
            extra = row.unrated_usable if self.policy.for_adapter(row.adapter).include_unrated else 0
            out[row.adapter] = out.get(row.adapter, 0) + row.usable + extra
        return out

    def refresh_gauges(self, adapter: str | None = None) -> None:
        """Set the usable-examples gauge of one adapter (after feedback) or of all (periodically)."""
        counts = self.usable_examples(adapter)
        if adapter is None:
            for gone in self._gauged - set(counts):
                metrics.CALIBRATION_EXAMPLES.labels(adapter=gone).set(0)
        elif adapter not in counts:
            counts[adapter] = 0
        for name, n in counts.items():
            metrics.CALIBRATION_EXAMPLES.labels(adapter=name).set(n)
        self._gauged |= set(counts)

    def close(self, timeout: float | None = 60.0) -> bool:
        """Write everything queued and release the database. Idempotent."""
        ok = self.writer.close(timeout)
        if not ok:
            log.error(
                "traffic: %d queued record(s) could not be written at shutdown", self.writer.queue.qsize()
            )
        self.db.close()
        return ok
