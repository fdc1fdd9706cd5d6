"""`vllm-surgery worker`: the companion process that refines deployed adapters beside vLLM.

It takes jobs from the queue in the job database (`vllm_surgery.storage`; queued by the server's refine
route and its automatic triggers, `vllm_surgery.serving.automatic_jobs`), and for each one: builds the calibration set, loads the base
model (once: kept across jobs, least recently used dropped beyond ``--max-models``), runs
``refine(policy="auto")`` with the quality gate (never forced), writes the version into the store,
records the decision with its figures in the job row, and, when the gate accepted it, has it served:
with a SQLite database it asks the server (``--server``) to swap it in; with a shared Postgres
database it points the served pointer at it itself, and every replica follows (no server address
needed; see "The served pointer" below). Progress (stages and seconds) goes to its log. It never imports vLLM.

Why a separate process: the gradient pass needs the base model's weights a second time plus
activations for its token budget. Inside vLLM's API-server process that memory competes with the
engine, and a pass of minutes would share its event loop; a crash would take serving down with it.

Crash and restart safety:

- Leases: a heartbeat thread renews the job's lease every third of ``--lease-seconds``. A worker that
  is killed stops renewing; after the lease expires the next worker takes the job again (bounded by
  the server's ``job_max_attempts``). SIGTERM or Ctrl-C gives the running job back to the queue at
  once (not counted as an attempt) and exits.
- A database outage (Postgres restarting or killed) stops no worker: a failed claim is tried again
  after the poll interval, a failed heartbeat is logged and the next one renews the lease (unless
  another worker took the job after it expired), and a job's stage checks and its outcome wait for the
  database (`_record`: tried again, every RECORD_RETRY_MAX_S at most) instead of failing the job.
- Nothing half-written is ever visible: the version directory is reserved and filled under the store's
  writer lock, refine() writes into a hidden sibling and renames it into place, and any failure or
  stop removes the reservation. A SIGKILL can leave an empty reservation and a hidden temporary
  directory: neither is listed nor served, and the next start of a worker or server removes them.
  served.json is only ever written by the server's swap, which checks the version first.
- A job finished but not swapped: the decision is recorded as "accepted, swap pending" in the same
  transaction as the figures, before the worker asks the server to swap. If that request fails (server
  down, unreachable, or it refuses the worker's token), the job stays pending and the server swaps it
  itself at its next start or check (see `vllm_surgery.serving.automatic_jobs`). A version the server refuses (stale: the
  original changed meanwhile; corrupt) is recorded as a failed swap with the reason.
- Idempotent: before computing, the worker looks the job's store key up (adapter content, base model,
  settings, calibration data). A version already written for it (by a worker killed before it could
  record the result) is reused, not computed again.

Trust: a job row is data, not instructions. The worker resolves the original adapter from the job's
adapter name under its own adapter roots (``VLLM_SURGERY_ADAPTER_DIRS``, then its ``--lora-modules``),
and calibration files from their names under its own ``VLLM_SURGERY_CALIBRATION_DIR``, exactly as the
server does; it writes only into its own store. A row whose stored paths disagree with what the names
resolve to, or that names something outside every root, fails with an error naming the path and the
problem, before anything is read or written: anyone able to write the database could otherwise make
the worker read any file and put its refinement into the store. The settings are checked again by
`job_spec.job_config`, the check the refine route applies when it queues a job.

Cancel: an admin's cancel (``POST /v1/surgery/jobs/ID/cancel``) of a running job marks its row; the
worker looks at the mark between stages, and its heartbeat thread interrupts refine() (through
SIGUSR1, handled in the main thread) when the mark appears. Either way the reserved version directory
is removed, nothing is written into the store, and the job ends ``cancelled``. The last look is taken
under the store's writer lock, after refine() returned and before the version becomes visible; a
cancel that arrives after that does not undo the finished job (the row keeps the time it was asked).

The server: at start the worker asks ``GET /health`` of ``--server`` and exits with status 3, naming the
URL and the error, when it cannot reach it (a wrong URL would otherwise leave every accepted version
waiting). A server that goes away later changes nothing about the jobs: they live in the database, so
the worker keeps running them, records each accepted version as "swap pending" with the error, and
the server swaps it in at its next start (see "A job finished but not swapped" above).

The served pointer (a shared Postgres database: many replicas, workers on any machine): the worker
makes the checks the swap route makes that need no vLLM (a complete version in the store, its
surgery.json's decision "accept", refined from the current content of the original the worker finds
for the adapter's name) and writes the pointer with its history (``by: job N``) in one transaction;
every replica's follower swaps it in within about a second. The job's swap state says what became of
the write: done (written), failed (a check refused it: the reason), pending (the database could not be
written; any server's sweep completes it). ``--server`` is not needed then, and not used.

Sizing (vLLM and the worker on one GPU, another GPU, or the CPU): `SIZING_HELP` below, which is also
the epilog of `vllm-surgery worker --help` and what a job that ran out of memory records (see
docs/sizing.md for the reasoning behind the figures).

Usage::

    VLLM_SURGERY_STORE=... VLLM_SURGERY_ADMIN_TOKEN=... vllm-surgery worker --server http://127.0.0.1:8000

The worker reads the serving settings of the environment (store, database, admin token; the same
variables as the server, so give it the same values) and its flags.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import signal
import socket
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AdapterError, CalibrationError, ConfigError, SurgeryError
from ..names import InvalidAdapterName, path_under, validate_adapter_name
from ..settings import ServingSettings, SettingsError
from ..storage import (
    Database,
    DatabaseError,
    DatabaseUnavailable,
    Job,
    StoreError,
    VersionStore,
    open_database,
    open_store,
    version_key,
)
from ..traffic import build_adapter_calibration
from .job_spec import records_sha256, spec_config

log = logging.getLogger("vllm_surgery.worker")

DESCRIPTION = __doc__.split("\n\n")[0]

DEFAULT_LEASE_S = 120.0
DEFAULT_POLL_S = 5.0
RECORD_RETRY_MAX_S = 5.0  # the longest wait between tries to record a job's outcome in an outage
RECORD_STOP_TRIES = 3  # tries before a stopping worker gives up recording (the lease expires)
HTTP_TIMEOUT_S = 120.0
# The memory-sizing advice, written once: the --help epilog and the error of a job that did not fit
# both say it.
SIZING_REMEDIES = (
    'lower the token budget (the refine setting max_batch_tokens, e.g. {"max_batch_tokens": 2048} in the '
    "refine body or in VLLM_SURGERY_REFINE_SETTINGS); on a GPU shared with vLLM, lower vLLM's "
    "--gpu-memory-utilization so that the worker's copy of the base model (2 bytes per parameter in bf16) "
    "and its sensitivity pass fit in the rest (e.g. 0.6 for an 8B model on 80 GB leaves about 30 GB: 16 GB "
    "of weights and 14 GB for the pass); or run the worker on another GPU (--device cuda:1) or on the CPU "
    "(--device cpu)"
)
SIZING_HELP = "\n\n".join(
    [
        textwrap.fill(
            "sizing: refine plans its token budget from the memory it finds free when a job runs and halves "
            f"it on an out-of-memory error. If a job does not fit: {SIZING_REMEDIES}. A job that does not fit "
            "fails with a message saying what to change; the adapter keeps serving.",
            width=100,
        ),
        textwrap.fill(
            "settings: the serving variables (VLLM_SURGERY_STORE, VLLM_SURGERY_DATABASE, "
            "VLLM_SURGERY_ADMIN_TOKEN, VLLM_SURGERY_ADAPTER_DIRS, VLLM_SURGERY_CALIBRATION_DIR, or "
            "VLLM_SURGERY_CONFIG) with the same values as the server's; --store and --db override them. "
            "A job's adapter and calibration files are found by name there, never at paths stored in the "
            "job.",
            width=100,
        ),
    ]
)


class JobFailure(SurgeryError):
    """A job that cannot be done as asked; the message says why and what to change."""


class WorkerStopped(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT while a job runs: the job is given back."""


class JobCancelled(BaseException):
    """Raised in the main thread when an admin cancelled the running job: nothing is written, the job
    ends cancelled and the worker goes on with the next one."""


class ServerUnreachable(SurgeryError):
    """The worker's --server does not answer; the message names the URL and the error."""


CANCEL_SIGNAL = signal.SIGUSR1
SERVER_CHECK_TIMEOUT_S = 10.0


def check_server(url: str, timeout: float = SERVER_CHECK_TIMEOUT_S) -> None:
    """Ask the server's ``/health`` once. Raises ServerUnreachable naming `url`, the error and the
    remedy: a worker pointed at the wrong URL would refine jobs whose swaps never arrive."""
    health = f"{url.rstrip('/')}/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as e:
        raise ServerUnreachable(
            f"the server at {url} answered {e.code} to GET /health: is --server the vLLM server's URL?"
        ) from e
    except (urllib.error.URLError, OSError, TimeoutError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ServerUnreachable(
            f"the server at {url} is unreachable ({reason}): start the server first, or fix --server"
        ) from e


def out_of_memory_message(device: Any, error: BaseException) -> str:
    """What a job that did not fit in memory records: the error, and what to change."""
    return (
        f"out of memory on {device} ({type(error).__name__}: {str(error).strip()[:500]}). What to change: "
        f"{SIZING_REMEDIES}. The adapter keeps serving its current version."
    )


def _out_of_memory_types() -> tuple[type[BaseException], ...]:
    import torch

    return (
        torch.OutOfMemoryError,
        MemoryError,
    )  # errors.DeviceMemoryError (the planner: nothing fits) is one


# ----------------------------------------------------------------------------- base models
class ModelCache:
    """Base models loaded on one device, kept across jobs; the least recently used is dropped when
    more than `max_models` would be held."""

    def __init__(self, device: Any, max_models: int = 1) -> None:
        self.device = device
        self.max_models = max(1, int(max_models))
        self._models: OrderedDict[str, tuple[Any, Any]] = OrderedDict()

    def get(self, base_model: str) -> tuple[Any, Any, bool]:
        """(model, tokenizer, whether it was cached). Raises what loading raises."""
        if base_model in self._models:
            self._models.move_to_end(base_model)
            model, tokenizer = self._models[base_model]
            return model, tokenizer, True
        while len(self._models) >= self.max_models:
            dropped, _ = self._models.popitem(last=False)
            log.info(
                "model cache: dropped %s (least recently used; --max-models %d)", dropped, self.max_models
            )
            self.release()
        from ..refine import load_base_model

        model, tokenizer = load_base_model(base_model, self.device, progress=False)
        self._models[base_model] = (model, tokenizer)
        return model, tokenizer, False

    def release(self) -> None:
        """Give memory back after dropping a model (or after running out of memory)."""
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def names(self) -> list[str]:
        return list(self._models)


# ----------------------------------------------------------------------------- leases
class Heartbeat:
    """Renews a job's lease from a thread every `lease_s / 3` seconds while the job runs. `lost` is
    set when the queue says the lease is no longer this worker's; `cancelled` when an admin cancelled
    the job (then `on_cancel` is called once, from the thread)."""

    def __init__(self, db: Database, job: Job, owner: str, lease_s: float, on_cancel: Any = None) -> None:
        self.db, self.job, self.owner, self.lease_s = db, job, owner, lease_s
        self.on_cancel = on_cancel
        self.lost = threading.Event()
        self.cancelled = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-job-{job.id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                if not self.db.heartbeat_job(self.job.id, self.owner, self.lease_s):
                    log.error(
                        "job %d: lease lost (taken over after expiry?); its result will not count",
                        self.job.id,
                    )
                    self.lost.set()
                    return
                if not self.cancelled.is_set() and self.db.cancel_requested(self.job.id):
                    log.info("job %d: cancelled by an admin; stopping it", self.job.id)
                    self.cancelled.set()
                    if self.on_cancel is not None:
                        self.on_cancel()
            except DatabaseError as e:  # transient (locked, disk): the next beat may succeed
                log.warning("job %d: heartbeat failed: %s", self.job.id, e)


# ----------------------------------------------------------------------------- the worker
@dataclass(frozen=True)
class WorkerOptions:
    server: str | None  # None: the database is shared, the worker writes the served pointer itself
    device: str = "auto"
    lease_s: float = DEFAULT_LEASE_S
    poll_s: float = DEFAULT_POLL_S
    max_models: int = 1
    owner: str = ""
    admin_token: str = ""
    http_timeout_s: float = HTTP_TIMEOUT_S
    # Where the worker finds what a job names (the server's settings; never a job row's paths).
    adapter_dirs: tuple[Path, ...] = ()
    calibration_dir: Path | None = None
    lora_modules: tuple[tuple[str, Path], ...] = ()  # the server's --lora-modules adapters
    base_models: tuple[str, ...] = ()  # --model: the only base models a job may name (empty: any)
    canary_share: float = 0.0  # > 0: accepted versions go to a canary first (a server starts it)


@dataclass
class Calibration:
    """A job's calibration data as refine() takes it, with what the result records about it."""

    data: Any  # a list of records or a file path
    sha256: str
    examples: int
    summary: str


class RefinementWorker:
    """Claims and runs jobs (module docstring). `db` and `store` are the server's."""

    def __init__(self, db: Database, store: VersionStore, options: WorkerOptions) -> None:
        from ..refine import resolve_device

        self.db = db
        self.store = store
        self.options = options
        self.owner = options.owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.device = resolve_device(options.device)  # ConfigError for cuda without CUDA
        self.models = ModelCache(self.device, options.max_models)
        self._stopping = threading.Event()
        self._job: Job | None = None
        self._cancellable = False  # the main thread may be interrupted by a cancel (inside refine())

    # ------------------------------------------------------------------ loop
    def stop(self) -> None:
        """Ask the loop to end: at once when idle; a running job is given back (see handle_signal)."""
        self._stopping.set()

    def handle_signal(self, signum: int, frame: Any) -> None:
        log.info("worker: %s received; stopping", signal.Signals(signum).name)
        self.stop()
        if self._job is not None:
            raise WorkerStopped(signal.Signals(signum).name)

    def handle_cancel_signal(self, signum: int, frame: Any) -> None:
        """The heartbeat thread's interrupt (CANCEL_SIGNAL): stop the running job where it is."""
        if self._job is not None and self._cancellable:
            self._cancellable = False  # once: the cleanup that follows is not interrupted again
            raise JobCancelled(f"job {self._job.id}")

    def _interrupt_for_cancel(self) -> None:
        """Called by the heartbeat thread: interrupt refine() in the main thread. Does nothing unless
        run_from_args installed handle_cancel_signal (then the stage checks catch the cancel)."""
        if self._cancellable and signal.getsignal(CANCEL_SIGNAL) == self.handle_cancel_signal:
            signal.pthread_kill(threading.main_thread().ident, CANCEL_SIGNAL)

    def _check_cancel(self, job: Job) -> None:
        """A stage boundary: raise JobCancelled if an admin cancelled the job (asked again until the
        database answers: a Postgres outage delays the job, never fails it)."""
        if self._record(f"job {job.id}", self.db.cancel_requested, job.id):
            self._cancellable = False
            raise JobCancelled(f"job {job.id}")

    def run(self, once: bool = False, drain: bool = False) -> int:
        """Take jobs until stopped (or: one job with `once`; until none is left with `drain`). Returns
        the number of jobs run."""
        removed = self.store.remove_leftovers()
        if removed:
            log.info("worker: removed %d leftover(s) of interrupted writes from the store", len(removed))
        log.info(
            "worker %s: device %s, server %s, lease %g s, poll %g s, up to %d cached model(s)",
            self.owner,
            self.device,
            self.options.server or "none (accepted versions: the shared served pointer)",
            self.options.lease_s,
            self.options.poll_s,
            self.models.max_models,
        )
        done = 0
        while not self._stopping.is_set():
            try:
                job = self.db.claim_job(self.owner, self.options.lease_s)
            except DatabaseError as e:
                log.error("worker: cannot claim a job: %s; retrying in %g s", e, self.options.poll_s)
                self._stopping.wait(self.options.poll_s)
                continue
            if job is None:
                if once or drain:
                    break
                self._stopping.wait(self.options.poll_s)
                continue
            self.run_job(job)
            done += 1
            if once:
                break
        log.info("worker %s: stopped after %d job(s)", self.owner, done)
        return done

    def run_job(self, job: Job) -> None:
        """Run one claimed job and record its outcome (never raises, except WorkerStopped)."""
        self._job = job
        label = f"job {job.id} [{job.adapter}, {job.trigger}, attempt {job.attempts}/{job.max_attempts}]"
        log.info("%s: claimed", label)
        try:
            with Heartbeat(
                self.db, job, self.owner, self.options.lease_s, self._interrupt_for_cancel
            ) as beat:
                outcome = self._outcome(job, label)
            if beat.lost.is_set():
                log.error("%s: lost its lease while running; its result is not recorded", label)
                return
        except JobCancelled:
            self._cancellable = False
            recorded = self._record(
                label, self.db.finish_cancelled, job.id, self.owner, {"worker": self.owner}
            )
            log.info(
                "%s: %s",
                label,
                "cancelled by an admin; nothing was written" if recorded else "cancelled, but taken over",
            )
            return
        except WorkerStopped:
            released = self._record(label, self.db.release_job, job.id, self.owner, patient=False)
            log.info(
                "%s: stopped; %s", label, "given back to the queue" if released else "already taken over"
            )
            raise
        finally:
            self._cancellable = False
            self._job = None
        state, result, error = outcome
        swap = None
        if error is not None:
            recorded = self._record(label, self.db.fail_job, job.id, self.owner, error, result)
            log.error("%s: failed: %s", label, error)
        else:
            accepted = state == "accepted"
            swap = ("pending" if job.spec.get("swap", True) else "not_requested") if accepted else None
            recorded = self._record(label, self.db.finish_job, job.id, self.owner, state, result, swap)
            log.info("%s: %s: %s", label, state, result.get("reason"))
        if not recorded:
            log.error("%s: the job was taken over meanwhile; this result is not recorded", label)
            return
        if error is None and swap == "pending":
            if self.db.shares_pointer:
                self._point(job, result["version"], label)
            else:
                self._swap(job, result["version"], label)

    def _record(self, label: str, write: Callable[..., bool], *args: Any, patient: bool = True) -> bool:
        """`write(*args)` (a job's outcome), retried while the database is unreachable (a Postgres
        outage: DatabaseUnavailable), every RECORD_RETRY_MAX_S at most, so that an outage never kills
        the worker nor loses a finished job's result: the heartbeat keeps failing meanwhile, and if
        the lease expired and another worker took the job, the write finds it not ours (False). It
        gives up (False, logged) only once the worker is stopping (or, `patient` False, at once)
        after RECORD_STOP_TRIES tries: the job's lease then expires and it is taken again. Raises
        DatabaseError for any other database error."""
        tries, since = 0, time.monotonic()
        while True:
            try:
                done = write(*args)
            except DatabaseUnavailable as e:
                tries += 1
                if (not patient or self._stopping.is_set()) and tries >= RECORD_STOP_TRIES:
                    log.error(
                        "%s: outcome not recorded (database unreachable, %d tries): %s; its lease "
                        "expires and the job is taken again",
                        label,
                        tries,
                        e,
                    )
                    return False
                log.error("%s: database outage (try %d): %s; retrying", label, tries, e)
                time.sleep(min(RECORD_RETRY_MAX_S, 0.25 * 2 ** min(tries, 10)))
                continue
            if tries:
                log.warning(
                    "%s: the database answers again after an outage of %.1f s (%d failed tries)",
                    label,
                    time.monotonic() - since,
                    tries,
                )
            return done

    # ------------------------------------------------------------------ one job
    def _outcome(self, job: Job, label: str) -> tuple[str | None, dict[str, Any], str | None]:
        """(state, result, error): error is None on success. WorkerStopped propagates."""
        start = time.perf_counter()
        timings: dict[str, float] = {"queued": max(0.0, (job.started or job.created) - job.created)}
        result: dict[str, Any] = {"worker": self.owner, "device": str(self.device), "timings": timings}
        try:
            state = self._compute(job, label, result, timings)
            timings["total"] = time.perf_counter() - start
            return state, result, None
        except (WorkerStopped, JobCancelled):
            raise
        except _out_of_memory_types() as e:
            self.models.release()
            error = out_of_memory_message(self.device, e)
        except (
            JobFailure,
            AdapterError,
            CalibrationError,
            ConfigError,
            DatabaseError,
            StoreError,
            OSError,
        ) as e:
            error = str(e)
        except Exception as e:
            log.exception("%s: unexpected error", label)
            error = f"unexpected error: {type(e).__name__}: {e}"
        timings["total"] = time.perf_counter() - start
        return None, result, error

    def _compute(self, job: Job, label: str, result: dict[str, Any], timings: dict[str, float]) -> str:
        from ..adapter import load_adapter
        from ..refine import refine

        spec = job.spec
        original, source = self._resolve(job)  # before anything is read: the row's paths are not trusted
        config = spec_config(spec, device=str(self.device), progress=False)
        base_model = str(spec["base_model"])
        t = time.perf_counter()
        calibration = self._calibration(job, source)
        timings["calibration"] = time.perf_counter() - t
        result["calibration"] = {
            "examples": calibration.examples,
            "sha256": calibration.sha256,
            "summary": calibration.summary,
        }
        log.info("%s: calibration: %s (%.1f s)", label, calibration.summary, timings["calibration"])
        self._check_enough(job, config, calibration.examples)

        self._check_cancel(job)
        lora = load_adapter(original)
        key = version_key(lora.content_hash(), base_model, config.to_dict(), calibration.sha256)
        result["key"] = key
        known = self.store.lookup(job.adapter, key)
        if known is not None:  # written (or kept) before: a worker died before recording it, or a twin job
            log.info("%s: the store already holds this refinement (%s); reused", label, known["decision"])
            result.update(
                {k: known[k] for k in ("reason", "policy", "quality_before", "quality_after", "version")}
            )
            result.update(decision=known["decision"], reused=True)
            return "accepted" if known["decision"] == "accept" else "kept_original"

        self._check_cancel(job)
        t = time.perf_counter()
        model, tokenizer, cached = self.models.get(base_model)
        timings["load_model"] = time.perf_counter() - t
        log.info(
            "%s: base model %s on %s %s (%.1f s)",
            label,
            base_model,
            self.device,
            "from the cache" if cached else "loaded",
            timings["load_model"],
        )

        # The writer lock tells store cleaning (a starting server or worker) that the reserved
        # directory is being filled, not left behind by a killed process.
        self._check_cancel(job)
        with self.store.writer_lock(job.adapter):
            out = self.store.new_version_dir(job.adapter)
            try:
                self._cancellable = True  # the heartbeat may interrupt refine() from here on
                log.info(
                    "%s: refine (%s policy, %d examples) into %s",
                    label,
                    config.policy,
                    calibration.examples,
                    out.name,
                )
                refined = refine(
                    base_model, lora, calibration.data, out, config, model=model, tokenizer=tokenizer
                )
                self._check_cancel(job)  # the last look, before the version is visible to readers
                self._cancellable = False
                if refined.written:  # object storage: upload the files, then the manifest (local: nothing)
                    self.store.publish(job.adapter, out)
            except BaseException:
                self._cancellable = False
                shutil.rmtree(out, ignore_errors=True)
                raise
            if not refined.written:
                shutil.rmtree(out, ignore_errors=True)
        record = refined.to_dict()
        for stage, seconds in refined.timings.items():
            if stage != "total":
                timings["load_adapter" if stage == "load" else stage] = seconds
        result.update(
            decision=refined.decision,
            reason=refined.reason,
            policy=refined.policy,
            quality_before=record["quality_before"],
            quality_after=record["quality_after"],
            gate=record["gate"],
            candidates=record["candidates"],
            version=out.name if refined.written else None,
            reused=False,
        )
        result["calibration"].update(
            heldout_examples=refined.calibration["heldout_examples"],
            truncated=refined.calibration["truncated"],
        )
        stages = ", ".join(
            f"{s} {timings[s]:.1f} s"
            for s in ("prepare", "sensitivity", "search", "evaluation", "write")
            if s in timings
        )
        log.info("%s: %s in %.1f s (%s)", label, refined.decision, refined.timings.get("total", 0.0), stages)
        if refined.decision == "accept":
            return "accepted"
        try:  # the same request again is answered from the store
            self.store.remember(job.adapter, key, record)
        except (OSError, ValueError) as e:
            log.warning("%s: could not remember the kept original: %s", label, e)
        return "kept_original"

    # ------------------------------------------------------------------ what a job names
    def find_original(self, name: str) -> Path | None:
        """`name`'s original as the server finds it: `<root>/<name>` in the first adapter root that has
        it, else the --lora-modules path given to this worker."""
        for root in self.options.adapter_dirs:
            try:
                candidate = path_under(root, name)
            except InvalidAdapterName:
                continue  # a symlink in the root pointing outside it
            if candidate.is_dir():
                return candidate
        for module, path in self.options.lora_modules:
            if module == name and Path(path).is_dir():
                return Path(path).expanduser().resolve()
        return None

    def _calibration_file(self, job: Job, name: Any, stored: Any) -> Path:
        """A calibration file named in a job: `name` under this worker's calibration directory, which
        the row's `stored` path (if any) must equal. Raises JobFailure naming the problem."""
        where = self.options.calibration_dir
        if where is None:
            raise JobFailure(
                f"job {job.id} names calibration file {stored or name!r}, but this worker has no "
                "calibration directory: set VLLM_SURGERY_CALIBRATION_DIR to the server's value"
            )
        try:
            path = path_under(where, name)
        except InvalidAdapterName as e:
            raise JobFailure(
                f"job {job.id}: calibration file {name!r} is not a file name in the calibration "
                f"directory {where} ({e}): refused"
            ) from None
        if stored is not None and Path(str(stored)).expanduser().resolve() != path:
            raise JobFailure(
                f"job {job.id}: the row's calibration path {stored} is not {path}, where {name!r} resolves "
                f"in the calibration directory (VLLM_SURGERY_CALIBRATION_DIR): refused, nothing read or "
                "written; queue the job again through the server (a row edited by hand, or a worker "
                "with other settings than the server's?)"
            )
        return path

    def _resolve(self, job: Job) -> tuple[Path, dict[str, Any]]:
        """(the original, the calibration source with resolved paths): every path from the job's names
        under this worker's roots, checked against the paths the row stores (module docstring).
        Raises JobFailure naming the problem; nothing has been read or written then."""
        spec = job.spec
        try:
            validate_adapter_name(job.adapter)
        except InvalidAdapterName as e:
            raise JobFailure(f"job {job.id}: {e}: refused") from None
        original = self.find_original(job.adapter)
        if original is None:
            roots = ", ".join(str(r) for r in self.options.adapter_dirs) or "none configured"
            raise JobFailure(
                f"job {job.id}: adapter {job.adapter!r} is not in any adapter root of this worker "
                f"(VLLM_SURGERY_ADAPTER_DIRS: {roots}) nor one of its --lora-modules: refused, nothing "
                "read or written; give the worker the server's settings"
            )
        stored = spec.get("adapter_path")
        if stored is not None and Path(str(stored)).expanduser().resolve() != original.resolve():
            raise JobFailure(
                f"job {job.id}: the row's adapter_path {stored} is not {original}, where adapter "
                f"{job.adapter!r} resolves under the adapter roots: refused, nothing read or written; "
                "queue the job again through the server (a row edited by hand, or a worker with other "
                "settings than the server's?)"
            )
        base = str(spec.get("base_model", ""))
        allowed = self.options.base_models
        if allowed and not any(base == m or _same_path(base, m) for m in allowed):
            raise JobFailure(
                f"job {job.id}: the row's base_model {base!r} is not one of this worker's --model "
                f"({', '.join(allowed)}): refused, nothing read or written"
            )
        source = spec.get("calibration")
        if not isinstance(source, dict):
            raise JobFailure(f"job {job.id}: the row's calibration source is not an object: refused")
        source = dict(source)
        kind = source.get("source")
        if kind == "file":
            name = source.get("name") or Path(str(source.get("path", ""))).name
            source["path"] = str(self._calibration_file(job, name, source.get("path")))
        elif kind == "adapter":
            own = source.get("adapter_dir")
            if own is not None and Path(str(own)).expanduser().resolve() != original.resolve():
                raise JobFailure(
                    f"job {job.id}: the row's adapter_dir {own} is not {original}, where adapter "
                    f"{job.adapter!r} resolves: refused, nothing read or written"
                )
            if own is not None:
                source["adapter_dir"] = str(original)
            files = source.get("files") or []
            if not isinstance(files, list):
                raise JobFailure(f"job {job.id}: the row's calibration 'files' is not a list: refused")
            source["files"] = [str(self._calibration_file(job, Path(str(f)).name, f)) for f in files]
        return original, source

    def _calibration(self, job: Job, source: dict[str, Any]) -> Calibration:
        """The job's calibration data from its resolved `source` (see `_resolve`)."""
        from ..calibration import read_jsonl

        kind = source.get("source")
        if kind == "records":
            records = source["records"]
            return Calibration(
                records, records_sha256(records), len(records), f"{len(records)} inline examples"
            )
        if kind == "file":
            path = Path(source["path"])
            records, digest = read_jsonl(path)
            return Calibration(path, digest, len(records), f"{len(records)} examples from {path}")
        if kind == "adapter":
            data = build_adapter_calibration(self.db, job.adapter, source)
            if not data.records:
                raise JobFailure(f"too little calibration data: none usable ({data.summary()})")
            return Calibration(data.records, records_sha256(data.records), len(data.records), data.summary())
        raise JobFailure(f"unknown calibration source {kind!r} (a job queued by a newer vllm-surgery?)")

    def _check_enough(self, job: Job, config: Any, examples: int) -> None:
        """Refuse, before any model work, data that cannot produce an accepted version."""
        from ..calibration import heldout_count
        from ..gate import min_heldout_examples

        needed_auto = job.spec.get("min_examples")
        if needed_auto is not None and examples < needed_auto:
            raise JobFailure(
                f"too little calibration data: {examples} usable examples, automatic jobs need "
                f"{needed_auto} (refine_min_examples): wait for more feedback or add a surgery_calibration.jsonl"
            )
        used = min(examples, config.samples or examples)
        held = heldout_count(used, config.heldout_fraction)
        needed = min_heldout_examples(config.max_false_accept)
        if held < needed:
            raise JobFailure(
                f"too little calibration data: {used} examples give {held} held-out example(s) "
                f"(heldout_fraction {config.heldout_fraction:g}); the gate at max_false_accept "
                f"{config.max_false_accept:g} needs at least {needed} held out, so nothing could be accepted: "
                "send more examples (or feedback), or raise heldout_fraction"
            )

    # ------------------------------------------------------------------ the swap
    def _pointer_refusal(self, name: str, version: str) -> tuple[str | None, str | None]:
        """(None, the original's content hash) when `version` of `name` may be served, else (why not,
        None): the swap route's checks that need no vLLM (blocking: loads the original)."""
        from ..adapter import load_adapter

        info = self.store.version_info(name, version)
        if info is None:
            return f"the store {self.store.root} has no complete version {version!r} of {name!r}", None
        if info.decision != "accept":
            return f"version {version!r} has decision {info.decision!r}, not 'accept': not served", None
        original = self.find_original(name)
        if original is None:
            return f"the original of {name!r} is not found under this worker's adapter roots", None
        try:
            adapter_hash = load_adapter(original).content_hash()
        except (AdapterError, OSError) as e:
            return f"the original {original} cannot be read: {e}", None
        if info.adapter_hash != adapter_hash:
            return (
                f"version {version!r} was refined from other adapter content (stale): the original "
                f"{original} changed meanwhile",
                None,
            )
        return None, adapter_hash

    def _point(self, job: Job, version: str, label: str) -> None:
        """Point the shared served pointer at `version` (every replica follows); record the job's swap
        state from that write: done, failed (refused, with the reason) or pending (database error)."""
        if self.options.canary_share > 0:
            # a canary runs in the servers (both versions loaded); the job stays "swap pending" and a
            # server's sweep starts it (docs/canary.md)
            log.info(
                "%s: swap pending: a server starts the canary of %s (VLLM_SURGERY_CANARY_SHARE)",
                label,
                version,
            )
            return
        start = time.perf_counter()
        refusal, adapter_hash = self._pointer_refusal(job.adapter, version)
        state, error = ("failed", refusal) if refusal is not None else ("done", None)
        if refusal is None:
            try:
                self.db.set_served_pointer(
                    job.adapter,
                    version,
                    adapter_hash=adapter_hash,
                    by=f"job {job.id}",
                    reason=f"accepted by the gate ({job.trigger} job, worker {self.owner})",
                )
            except DatabaseError as e:
                state, error = "pending", f"the served pointer could not be written ({e})"
        seconds = time.perf_counter() - start
        try:
            self.db.set_job_swap(job.id, state, error, seconds if state == "done" else None)
        except DatabaseError as e:
            log.error("%s: its swap state (%s) could not be recorded: %s", label, state, e)
        if state == "done":
            log.info("%s: served pointer -> %s (every replica follows; %.2f s)", label, version, seconds)
        elif state == "pending":
            log.warning("%s: swap pending: %s; a server's sweep completes it", label, error)
        else:
            log.error("%s: not served: %s", label, error)

    def _swap(self, job: Job, version: str, label: str) -> None:
        """Ask the server to serve `version`; record what happened (pending when it cannot be asked)."""
        name = urllib.parse.quote(job.adapter, safe="")
        url = f"{self.options.server.rstrip('/')}/v1/surgery/adapters/{name}/swap"
        headers = {"Content-Type": "application/json"}
        if self.options.admin_token:
            headers["Authorization"] = f"Bearer {self.options.admin_token}"
        # with VLLM_SURGERY_CANARY_SHARE > 0 the job's id: the server starts a canary of the version instead
        # (sent only then: a server from before canaries refuses the field)
        body = {"version": version, **({"job": job.id} if self.options.canary_share > 0 else {})}
        request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=self.options.http_timeout_s) as response:
                response.read()
            state, error = "done", None
        except urllib.error.HTTPError as e:
            error = f"the server answered {e.code}: {_error_message(e)}"
            if e.code in (401, 403):
                error += " (set VLLM_SURGERY_ADMIN_TOKEN to the server's admin token)"
            # Refused on the merits (stale, corrupt, invalid): final. Not authorised, not this server's
            # adapter, or a server error: pending, for the server's own sweep.
            state = "failed" if e.code in (400, 409, 422) else "pending"
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            state, error = "pending", f"the server at {self.options.server} is unreachable ({e})"
        seconds = time.perf_counter() - start
        self.db.set_job_swap(job.id, state, error, seconds if state == "done" else None)
        if state == "done":
            log.info("%s: swapped in %s (%.2f s)", label, version, seconds)
        elif state == "pending":
            log.warning("%s: swap pending: %s; the server swaps it at its next check or start", label, error)
        else:
            log.error("%s: swap refused: %s", label, error)


def _same_path(a: str, b: str) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return False


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read() or b"{}")
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError, OSError):
        return e.reason if isinstance(e.reason, str) else str(e)


# ----------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `vllm-surgery worker` options."""
    parser.add_argument(
        "--server",
        default=None,
        help="the vLLM server's URL (swaps go there), e.g. http://127.0.0.1:8000; needed with a SQLite "
        "database, not used with a shared Postgres one (the worker writes the served pointer itself)",
    )
    parser.add_argument(
        "--device", default="auto", help="where refinements run: auto (CUDA if present), cpu, cuda, cuda:N"
    )
    parser.add_argument(
        "--store",
        default=None,
        help="refined-version store, a directory or an s3:// URL (default: the serving settings' "
        "VLLM_SURGERY_STORE)",
    )
    parser.add_argument("--db", default=None, help="job database (default: the serving settings' database)")
    parser.add_argument(
        "--poll-interval", type=float, default=DEFAULT_POLL_S, help="seconds between looks at an empty queue"
    )
    parser.add_argument(
        "--lease-seconds",
        type=float,
        default=DEFAULT_LEASE_S,
        help="a job's lease; renewed every third of it while the job runs, taken over when it expires",
    )
    parser.add_argument(
        "--max-models", type=int, default=1, help="base models kept loaded (least recently used dropped)"
    )
    parser.add_argument("--once", action="store_true", help="run at most one job, then exit")
    parser.add_argument(
        "--drain", action="store_true", help="run jobs until the queue has none to give, then exit"
    )
    parser.add_argument(
        "--owner", default=None, help="this worker's name in the job rows (default host:pid:random)"
    )
    parser.add_argument(
        "--lora-modules",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help="the server's --lora-modules adapters (jobs of other adapters are found under "
        "VLLM_SURGERY_ADAPTER_DIRS); a job naming an adapter found in neither fails",
    )
    parser.add_argument(
        "--model",
        nargs="+",
        default=[],
        metavar="BASE",
        help="the server's base model (its --model): a job naming another base model fails (default: "
        "the base model a job names is loaded, safetensors only)",
    )


def run_from_args(args: argparse.Namespace) -> int:
    """`vllm-surgery worker`; exit codes: 0 stopped (signal, --once, --drain), 2 bad settings, 3 the
    server does not answer at start (the message names the URL and the error)."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    try:
        settings = ServingSettings.from_env()
        if args.lease_seconds < 3 or args.poll_interval <= 0 or args.max_models < 1:
            raise SettingsError("--lease-seconds must be >= 3, --poll-interval > 0 and --max-models >= 1")
        lora_modules = []
        for item in args.lora_modules:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise SettingsError(f"--lora-modules takes NAME=PATH, got {item!r}")
            lora_modules.append((validate_adapter_name(name), Path(path)))
        db = open_database(args.db or settings.database_path)
        if not db.shares_pointer and not args.server:
            db.close()
            raise SettingsError(
                f"--server is needed with the SQLite database {db.path}: accepted versions are swapped in "
                "by the server at that URL (a shared Postgres database needs none)"
            )
        server = None if db.shares_pointer else args.server
        if db.shares_pointer and args.server:
            log.info(
                "--server %s is not used: the database is shared, the served pointer is written", args.server
            )
        store = open_store(args.store or settings.store, settings.cache_dir, settings.cache_max_bytes)
        options = WorkerOptions(
            server=server,
            device=args.device,
            lease_s=args.lease_seconds,
            poll_s=args.poll_interval,
            max_models=args.max_models,
            owner=args.owner or "",
            admin_token=settings.admin_token,
            adapter_dirs=tuple(settings.adapter_dirs),
            calibration_dir=settings.calibration_dir,
            lora_modules=tuple(lora_modules),
            base_models=tuple(args.model),
            canary_share=settings.canary_share,
        )
        worker = RefinementWorker(db, store, options)
    except (SurgeryError, ValueError) as e:
        print(f"vllm-surgery worker: error: {e}", file=sys.stderr)
        return 2
    try:
        if server is not None:
            check_server(server)
    except ServerUnreachable as e:
        print(f"vllm-surgery worker: error: {e}", file=sys.stderr)
        db.close()
        return 3
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, worker.handle_signal)
    signal.signal(CANCEL_SIGNAL, worker.handle_cancel_signal)
    try:
        worker.run(once=args.once, drain=args.drain)
    except WorkerStopped:
        pass
    finally:
        db.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vllm-surgery worker",
        description=DESCRIPTION,
        epilog=SIZING_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
