"""Job routes: the refinement jobs in the job database, and how a job is shown.

- ``GET /v1/surgery/jobs``        jobs, newest first (query: adapter, state, limit, before_id)
- ``GET /v1/surgery/jobs/{id}``   one job: state, attempts, lease, timings by stage, the decision and
  its figures, the version and its swap; never the calibration records

Jobs are queued by ``POST /v1/surgery/adapters/{name}/refine`` (`refinements`) and by the automatic
triggers (`vllm_surgery.serving.automatic_jobs`), and run by `vllm-surgery worker`. Both routes answer
503 when the job database cannot be used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Query, Request

from ...names import validate_adapter_name
from ...storage import JOB_STATES, Job
from .http import BodyError, answer_4xx
from .state import JOBS_KEY, state_object

router = APIRouter(prefix="/v1/surgery", tags=["vllm-surgery: jobs"])

JOBS_PATH = "/v1/surgery/jobs"
MAX_JOBS_PER_PAGE = 500
NO_JOBS = "refinement jobs are not available on this server (no job database; see the server log)"


def _calibration_view(calibration: Mapping[str, Any]) -> dict[str, Any]:
    """The calibration source without the records themselves (they may hold user data)."""
    view = {k: v for k, v in calibration.items() if k != "records"}
    if "records" in calibration:
        view["examples"] = len(calibration["records"])
    return view


def describe_job(job: Job) -> dict[str, Any]:
    """A job as the routes show it: state, timings, figures; never the calibration records."""
    spec = job.spec
    result = job.result or {}
    return {
        "id": job.id,
        "adapter": job.adapter,
        "trigger": job.trigger,
        "state": job.state,
        "created": job.created,
        "started": job.started,
        "finished": job.finished,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "lease_owner": job.lease_owner,
        "lease_expires": job.lease_expires,
        "heartbeat": job.heartbeat,
        "error": job.error,
        "swap": job.swap,
        "swap_error": job.swap_error,
        "version": result.get("version"),
        "decision": result.get("decision"),
        "reason": result.get("reason"),
        "policy": result.get("policy"),
        "quality_before": result.get("quality_before"),
        "quality_after": result.get("quality_after"),
        "gate": result.get("gate"),
        "calibration": result.get("calibration"),
        "timings": result.get("timings") or {},
        "reused": result.get("reused"),
        "spec": {
            "base_model": spec.get("base_model"),
            "adapter_path": spec.get("adapter_path"),
            "config": spec.get("config"),
            "calibration": _calibration_view(spec.get("calibration") or {}),
            "swap": spec.get("swap"),
            "min_examples": spec.get("min_examples"),
        },
    }


# Query parameters are declared as text (so that /docs lists them) and converted here, so that a bad
# value answers 400 with a message like every other bad request.
@router.get("/jobs")
@answer_4xx
async def list_jobs(
    raw_request: Request,
    adapter: str | None = Query(None, description="only this adapter's jobs"),
    state: str | None = Query(None, description=f"only jobs in this state: {', '.join(JOB_STATES)}"),
    limit: str | None = Query(None, description=f"jobs per page, 1 to {MAX_JOBS_PER_PAGE} (default 100)"),
    before_id: str | None = Query(None, description="only jobs with a smaller id (the next page)"),
) -> Any:
    db = state_object(raw_request, JOBS_KEY, unavailable=NO_JOBS)
    if adapter is not None:
        validate_adapter_name(adapter)
    if state is not None and state not in JOB_STATES:
        raise BodyError(f"'state' must be one of {list(JOB_STATES)}, got {state!r}")
    page = int(limit if limit is not None else "100")
    before = int(before_id) if before_id is not None else None
    if not 1 <= page <= MAX_JOBS_PER_PAGE:
        raise BodyError(f"'limit' must be in [1, {MAX_JOBS_PER_PAGE}]")
    jobs = await asyncio.to_thread(db.jobs, adapter, state, page, before)
    return {
        "jobs": [describe_job(j) for j in jobs],
        "next_before_id": jobs[-1].id if len(jobs) == page else None,
    }


@router.get("/jobs/{job_id}")
@answer_4xx
async def get_job(job_id: str, raw_request: Request) -> Any:
    db = state_object(raw_request, JOBS_KEY, unavailable=NO_JOBS)
    if not job_id.isdigit() or len(job_id) > 18:
        raise BodyError(f"job id must be a positive integer, got {job_id!r}")
    job = await asyncio.to_thread(db.job, int(job_id))
    if job is None:
        raise BodyError(f"no job {job_id}", 404)
    return describe_job(job)
