"""Job routes: the refinement jobs in the job database, and how a job is shown.

- ``GET /v1/surgery/jobs``        jobs, newest first (query: adapter, state, limit, before_id)
- ``GET /v1/surgery/jobs/{id}``   one job: state, attempts, lease, timings by stage, the decision and
  its figures, the version and its swap; never the calibration records
- ``POST /v1/surgery/jobs/{id}/cancel``  (admin token) a queued job is cancelled at once and never
  runs (200); a running one is marked and its worker stops it at its next check, writing nothing (202);
  a finished one answers 409

Who sees what: the admin token sees every job in full (the server's paths: the original, the base
model, the calibration files; the worker's identity, host:pid, in ``lease_owner``). The API key alone
sees the same jobs without them: a path becomes ``…/`` and its last name, ``lease_owner`` and the
base model's directory are left out. Paths tell an attacker where to look on the server, and a
worker's host and pid where to aim; a client following its job needs neither.

Jobs are queued by ``POST /v1/surgery/adapters/{name}/refine`` (`refinements`) and by the automatic
triggers (`vllm_surgery.serving.automatic_jobs`), and run by `vllm-surgery worker`. Both routes answer
503 when the job database cannot be used.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from ...names import validate_adapter_name
from ...storage import JOB_STATES, Job
from .http import (
    SMALL_BODY_BYTES,
    BodyError,
    RequestBody,
    answer_4xx,
    openapi_body,
    parse_json_object,
    read_body,
    validated,
)
from .state import ACCESS_KEY, JOBS_KEY, state_object

router = APIRouter(prefix="/v1/surgery", tags=["vllm-surgery: jobs"])

JOBS_PATH = "/v1/surgery/jobs"
MAX_JOBS_PER_PAGE = 500
NO_JOBS = "refinement jobs are not available on this server (no job database; see the server log)"


CANCEL_ACTION = "cancelling a job"
# An absolute path inside a message (not a URL: no ':' or '/' right before it).
_PATH = re.compile(r"(?<![\w.:/~])/[^\s'\"(),;]+")


def without_paths(value: Any) -> Any:
    """`value` (JSON) with every absolute path in its strings cut to ``…/`` and its last name."""
    if isinstance(value, str):
        return _PATH.sub(_cut, value)
    if isinstance(value, list):
        return [without_paths(v) for v in value]
    if isinstance(value, dict):
        return {k: without_paths(v) for k, v in value.items()}
    return value


def _cut(match: re.Match[str]) -> str:
    path = match.group()
    kept = path.rstrip(".:")  # the sentence's punctuation after a path stays
    return f"…/{PurePosixPath(kept).name}{path[len(kept) :]}"


def is_admin(request: Request) -> bool:
    """Whether `request` carries the admin token (or the server lets anyone act as admin)."""
    access = getattr(request.app.state, ACCESS_KEY, None)
    return access is not None and access.refusal(request, "reading job details") is None


def _calibration_view(calibration: Mapping[str, Any]) -> dict[str, Any]:
    """The calibration source without the records themselves (they may hold user data)."""
    view = {k: v for k, v in calibration.items() if k != "records"}
    if "records" in calibration:
        view["examples"] = len(calibration["records"])
    return view


def describe_job(job: Job, full: bool = True) -> dict[str, Any]:
    """A job as the routes show it: state, timings, figures; never the calibration records. Without
    `full` (a caller without the admin token): no server paths and no worker identity (module
    docstring)."""
    view = _describe(job)
    if full:
        return view
    view["lease_owner"] = None
    view["spec"]["base_model"] = None
    return without_paths(view)


def _describe(job: Job) -> dict[str, Any]:
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
        "cancel_requested": job.cancel_requested,
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
    full = is_admin(raw_request)
    return {
        "jobs": [describe_job(j, full) for j in jobs],
        "next_before_id": jobs[-1].id if len(jobs) == page else None,
    }


def _job_id(job_id: str) -> int:
    if not job_id.isdigit() or len(job_id) > 18:
        raise BodyError(f"job id must be a positive integer, got {job_id!r}")
    return int(job_id)


@router.get("/jobs/{job_id}")
@answer_4xx
async def get_job(job_id: str, raw_request: Request) -> Any:
    db = state_object(raw_request, JOBS_KEY, unavailable=NO_JOBS)
    job = await asyncio.to_thread(db.job, _job_id(job_id))
    if job is None:
        raise BodyError(f"no job {job_id}", 404)
    view = describe_job(job, is_admin(raw_request))
    # the canaries its accepted version served (docs/canary.md): each with its decision and figures
    view["canaries"] = [c.to_dict() for c in await asyncio.to_thread(db.canaries_of_job, job.id)]
    return view


class CancelBody(RequestBody):
    """Cancel a job: no fields (an empty body, or {})."""


def _optional_body(model: type[RequestBody]) -> dict[str, Any]:
    extra = openapi_body(model)
    extra["requestBody"]["required"] = False
    return extra


@router.post("/jobs/{job_id}/cancel", openapi_extra=_optional_body(CancelBody))
@answer_4xx
async def cancel_job(job_id: str, raw_request: Request) -> Any:
    """Cancel a job (admin token). 200: it was queued and is now cancelled (never claimed); 202: it is
    running, is now marked, and its worker stops it at its next check and writes nothing; 409: it has
    already finished; 404: no such job."""
    db = state_object(raw_request, JOBS_KEY, CANCEL_ACTION, unavailable=NO_JOBS)
    number = _job_id(job_id)
    raw = await read_body(raw_request, SMALL_BODY_BYTES)
    if raw.strip():
        validated(CancelBody, parse_json_object(raw, CancelBody.model_fields))
    job, outcome = await asyncio.to_thread(db.cancel_job, number)
    if job is None:
        raise BodyError(f"no job {job_id}", 404)
    if outcome == "finished":
        raise BodyError(
            f"job {number} has already finished ({job.state}): there is nothing to cancel; roll back "
            f"its version with POST /v1/surgery/adapters/{job.adapter}/rollback if it should not serve",
            409,
        )
    status = 200 if outcome == "cancelled" else 202
    return JSONResponse(
        {"job_id": job.id, "state": job.state, "cancel": outcome, "job": describe_job(job)},
        status_code=status,
    )
