"""Refinement without a person, inside the API server: automatic jobs, and the swaps of accepted
versions that are pending.

Automatic jobs (only with ``auto_refine`` on; a `vllm-surgery worker` runs them):

- **first_load**: when an adapter is first resolved (the plugin's resolver serves its original: it has
  no refined version for its current content), or when the server starts with it as a --lora-modules
  adapter, and its calibration set (traffic, registered files, its own surgery_calibration.jsonl)
  holds at least ``refine_min_examples`` examples. On-the-fly surgery: the original serves meanwhile;
  the refined version is swapped in when the gate accepts it. Asked once per adapter content (dedupe
  key with the content hash), whatever came of it. Checked in a background thread, so the first
  request is not delayed.
- **new_data**: every ``refine_check_interval_s``, an adapter whose recorded traffic gained at least
  ``refine_new_examples`` usable examples since its last job (rated good or corrected since then, or
  recorded since then where unrated completions count), whose last job is not queued or running and
  was created at least ``refine_min_interval_s`` ago, and whose calibration set holds at least
  ``refine_min_examples`` examples. One per "last job" (dedupe key), so servers sharing a database
  queue it once.

Pending swaps. A worker finishes an accepted job as "swap pending" in the same transaction that
records the result, then asks the server to swap it in (POST .../swap). Why the server also swaps
pending versions itself, at start and every ``refine_check_interval_s``: the worker's request can
fail to arrive (the server is restarting, or the worker's admin token is wrong) and the worker may be
killed right after finishing; the database row is the durable record of the decision, so whichever
server owns the adapter completes the swap from it. The worker's request is the fast path, this
sweep the guarantee. A pending swap outdated by a later accepted job is superseded, never applied; a
version the server refuses (stale or corrupt) is marked failed with the reason. The swap itself is the
hot-swap (`hotswap`), which validates the version and never points served.json at a missing one.

A job row is not trusted to say what the gate decided: anyone who can write the database could mark
any version "accepted, swap pending". The swap never forces, so it serves only a version whose own
surgery.json says decision "accept" and records the current original's content hash; any other is
refused (409), the job's swap is marked failed with the reason, and what was served stays served.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import AdapterError, ConfigError
from ..storage import ACTIVE_STATES, Database, DatabaseError, Job, JobQueueFull
from ..traffic import AdapterCalibration
from ..worker import job_config, job_spec
from .hotswap import HotSwapError, HotSwapper

log = logging.getLogger(f"vllm.{__name__}")


async def repeat(step: Callable[[], Awaitable[None]], interval_s: float, what: str) -> None:
    """Run `step` forever, every `interval_s` (first at once); an error is logged and the next round
    comes all the same (a database outage must not end the server's periodic work)."""
    while True:
        try:
            await step()
        except DatabaseError as e:
            log.error("%s: the database is not available: %s", what, e)
        except Exception:
            log.exception("%s: periodic check failed", what)
        await asyncio.sleep(interval_s)


class AutomaticJobs:
    """Automatic jobs and pending swaps of one API server (module docstring). `calibration` gives an
    adapter's calibration set now (and its traffic policy: whether unrated completions count)."""

    def __init__(
        self, swapper: HotSwapper, db: Database, base_model: str, calibration: AdapterCalibration
    ) -> None:
        self.swapper = swapper
        self.settings = swapper.settings
        self.db = db
        self.base_model = str(base_model)
        self.calibration = calibration
        self.policy = calibration.policy
        self._checks = ThreadPoolExecutor(1, thread_name_prefix="vllm-surgery-first-load")
        self._task: asyncio.Task | None = None
        self.canaries: Any = None  # the server's CanaryController: accepted versions go to a canary first

    # ------------------------------------------------------------------ automatic jobs (blocking)
    def _enqueue(
        self, name: str, original: Path, trigger: str, key: str, source: dict[str, Any]
    ) -> tuple[Job, bool] | None:
        """Queue an automatic job; None (logged) when the refine settings are not a job's (checked by
        the worker's own job_config, so no job is queued only to fail) or the adapter's queue is full."""
        s = self.settings
        try:
            job_config(s.refine_settings)
        except ConfigError as e:
            log.error(
                "auto-refine: no %s job for %r: VLLM_SURGERY_REFINE_SETTINGS cannot be run by a job: %s",
                trigger,
                name,
                e,
            )
            return None
        spec = job_spec(
            base_model=self.base_model,
            adapter_path=original,
            config=s.refine_settings,
            calibration=source,
            min_examples=s.refine_min_examples,
        )
        try:
            return self.db.enqueue_job(
                name,
                trigger,
                spec,
                key,
                once=True,
                max_attempts=s.job_max_attempts,
                max_queued=s.job_max_queued,
            )
        except JobQueueFull as e:
            log.warning("auto-refine: no %s job: %s", trigger, e)
            return None

    def first_load(self, name: str, original: Path, adapter_hash: str) -> Job | None:
        """Queue a first_load job for `name` if it qualifies (module docstring); the job, or None."""
        if not self.settings.auto_refine:
            return None
        if any(
            v.adapter_hash == adapter_hash and v.decision == "accept"
            for v in self.swapper.store.versions(name)
        ):
            return None  # refined before (served, or rolled back by a person): not a first load
        data, source = self.calibration(name, original, None, None)
        n, needed = data.count, self.settings.refine_min_examples
        if n < needed:
            log.info(
                "auto-refine: %r has %d of the %d calibration examples a first refinement needs",
                name,
                n,
                needed,
            )
            return None
        queued = self._enqueue(name, original, "first_load", f"first_load:{name}:{adapter_hash}", source)
        if queued is None:
            return None
        job, created = queued
        if created:
            log.info("auto-refine: queued job %d for %r (first load: %s)", job.id, name, data.summary())
        return job

    def first_load_soon(self, name: str, original: Path, adapter_hash: str) -> None:
        """first_load in the background (the resolver calls this: resolution must not wait)."""
        if self.settings.auto_refine:
            self._checks.submit(self._safely, self.first_load, name, original, adapter_hash)

    def first_load_of_startup_adapters(self) -> None:
        """--lora-modules adapters are never resolved: they get their first-load check at start
        (blocking: validates the originals)."""
        for name, original in self.swapper.startup.items():
            try:
                adapter_hash = self.swapper.validator.validate(original)
                if self.swapper.resolver.served_refined(name, adapter_hash) is None:
                    self.first_load_soon(name, original, adapter_hash)
            except (AdapterError, OSError, ValueError, DatabaseError) as e:
                log.warning("adapter %r: no first-load check: %s", name, e)

    @staticmethod
    def _safely(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception:
            log.exception("auto-refine: %s%r failed", getattr(fn, "__name__", fn), args[:1])
            return None

    def check_new_data(self, now: float | None = None) -> list[Job]:
        """Queue a new_data job for every adapter that qualifies (module docstring); the jobs queued."""
        s = self.settings
        if not s.auto_refine:
            return []
        now = time.time() if now is None else now
        queued = []
        for name in self.db.adapters():
            # One adapter's failure (a removed directory, a registered file gone bad) is logged and
            # the others are still checked; a database outage ends the round (repeat logs it).
            try:
                job = self._check_adapter(name, now)
            except DatabaseError:
                raise
            except Exception:
                log.exception("auto-refine: the new-data check of %r failed; the other adapters go on", name)
                continue
            if job is not None:
                queued.append(job)
        return queued

    def _check_adapter(self, name: str, now: float) -> Job | None:
        """check_new_data for one adapter: the job it queued, or None."""
        s = self.settings
        original = self.swapper.find_original(name)
        if original is None:
            return None  # recorded by another server sharing the database, or removed since
        last = self.db.last_job(name)
        if last is not None and (last.state in ACTIVE_STATES or now - last.created < s.refine_min_interval_s):
            return None
        include_unrated = self.policy.for_adapter(name).include_unrated
        # counted up to the threshold only: bounded work whatever the adapter's size
        new = self.db.usable_since(
            name, last.created if last else 0.0, include_unrated, at_most=s.refine_new_examples
        )
        if new < s.refine_new_examples:
            return None
        data, source = self.calibration(name, original, None, None)
        if data.count < s.refine_min_examples:
            return None
        key = f"new_data:{name}:after:{last.id if last else 0}"
        enqueued = self._enqueue(name, original, "new_data", key, source)
        if enqueued is None:
            return None
        job, created = enqueued
        if not created:
            return None
        log.info(
            "auto-refine: queued job %d for %r (at least %d new usable examples since %s; %s)",
            job.id,
            name,
            new,
            f"job {last.id}" if last else "the start",
            data.summary(),
        )
        return job

    # ------------------------------------------------------------------ pending swaps (event loop)
    async def swap_pending(self) -> list[tuple[int, str]]:
        """Swap in every accepted version whose swap is pending; returns (job id, outcome) pairs."""
        done = []
        for job in await asyncio.to_thread(self.db.pending_swaps):
            if await asyncio.to_thread(self.swapper.find_original, job.adapter) is None:
                continue  # not an adapter of this server
            start = time.perf_counter()
            try:
                # Never forced: the version's own surgery.json must say the gate accepted it (module
                # docstring), whatever the row claims.
                if self.canaries is not None and self.settings.canary_share > 0:
                    if not await self._start_canary(job):
                        continue  # another canary of the adapter runs: this one waits for its end
                else:
                    await self.swapper.swap(job.adapter, job.version, by=f"job {job.id}")
            except HotSwapError as e:
                if e.status >= 500:
                    log.error(
                        "auto-refine: job %d: swapping in %s failed (%s); retried later",
                        job.id,
                        job.version,
                        e,
                    )
                    done.append((job.id, "retry"))
                    continue
                await asyncio.to_thread(self.db.set_job_swap, job.id, "failed", str(e))
                log.error(
                    "auto-refine: job %d: version %s of %r was refused: %s",
                    job.id,
                    job.version,
                    job.adapter,
                    e,
                )
                done.append((job.id, "failed"))
                continue
            seconds = time.perf_counter() - start
            await asyncio.to_thread(self.db.set_job_swap, job.id, "done", None, seconds)
            log.info(
                "auto-refine: job %d: swapped in %s for %r (pending swap)", job.id, job.version, job.adapter
            )
            done.append((job.id, "done"))
        return done

    async def _start_canary(self, job: Job) -> bool:
        """With VLLM_SURGERY_CANARY_SHARE > 0: the accepted version starts a canary instead of the swap
        (docs/canary.md). False while another canary of the adapter runs (the job stays pending);
        True once this job's canary runs (started here or, on another replica, just before). Raises
        HotSwapError like `CanaryController.start`."""
        running = await asyncio.to_thread(self.db.running_canary, job.adapter)
        if running is not None:
            return running.job_id == job.id
        try:
            await self.canaries.start(
                job.adapter, job.version, self.settings.canary_share, by=f"job {job.id}", job_id=job.id
            )
        except HotSwapError as e:
            running = await asyncio.to_thread(self.db.running_canary, job.adapter)
            if running is not None and running.job_id == job.id:
                return True  # another replica started it first
            if running is not None:
                return False
            raise e
        return True

    def prune_history(self, now: float | None = None) -> int:
        """Delete finished jobs beyond the job-history settings (job_history_days,
        job_history_per_adapter), in short batches; the number deleted."""
        s = self.settings
        deleted = self.db.prune_jobs(
            s.job_history_days * 86400.0 if s.job_history_days > 0 else None, s.job_history_per_adapter, now
        )
        if deleted:
            log.info("jobs: pruned %d finished job(s) from the history", deleted)
        return deleted

    def forget_replicas(self, now: float | None = None) -> int:
        """Delete the replicas-table rows of replicas silent for longer than replica_forget_days (a
        replica that went away); the number deleted. Only a shared database has replicas (with SQLite,
        one machine, nothing is written: no write transaction)."""
        if not self.db.shares_pointer:
            return 0
        deleted = self.db.prune_replicas(self.settings.replica_forget_days * 86400.0, now)
        if deleted:
            log.info(
                "replicas: forgot %d row(s) of replicas silent for more than %g day(s)",
                deleted,
                self.settings.replica_forget_days,
            )
        return deleted

    async def check(self) -> None:
        """New-data checks, pending swaps, the job history's pruning and forgetting replicas that went
        away, once. Each step runs whatever came of the one before: a new-data check that fails must
        not hold back the swap of a version the gate already accepted.

        Raises the first step's error after all steps ran (repeat logs it), so that a failing round is
        still seen as failing."""
        steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("new-data check", lambda: asyncio.to_thread(self.check_new_data)),
            ("pending swaps", self.swap_pending),
            ("job history pruning", lambda: asyncio.to_thread(self.prune_history)),
            ("forgetting replicas", lambda: asyncio.to_thread(self.forget_replicas)),
        ]
        first: Exception | None = None
        for what, step in steps:
            try:
                await step()
            except Exception as e:
                if first is not None:
                    log.error("auto-refine: %s failed too: %s", what, e)
                first = first or e
        if first is not None:
            raise first

    async def run(self) -> None:
        """Forever: `check` every refine_check_interval_s (first at once)."""
        await repeat(self.check, self.settings.refine_check_interval_s, "auto-refine")

    def start(self) -> asyncio.Task:
        """Start `run` on the running event loop (the server's); the task ends with the loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="vllm-surgery-auto-refine")
        return self._task
