"""Traffic routes: what was recorded (capture itself is `vllm_surgery.serving.capture`; feedback is
`feedback`).

- ``GET /v1/surgery/traffic``          counts per adapter and version (no user data), queue depth, and
  whether the writer thread is recording ("writer": up, restarts, last_error, outage_s)
- ``GET /v1/surgery/traffic/{name}``   an adapter's records with prompts and completions: user data,
  so it needs the admin token. Query: ``since`` (7d, 12h, ISO time), ``limit`` (<= 1000), ``after_id``.

Both answer 503 when traffic recording is off on this server.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from ...errors import CalibrationError
from ...names import InvalidAdapterName, validate_adapter_name
from ...storage import DatabaseError
from ...traffic import parse_since
from ..hotswap import HotSwapError
from .http import error_response
from .state import TRAFFIC_KEY, state_object

log = logging.getLogger(f"vllm.{__name__}")

router = APIRouter(prefix="/v1/surgery", tags=["vllm-surgery: traffic"])

MAX_RECORDS_PER_PAGE = 1000
RECORDING_OFF = (
    "traffic recording is off on this server (set VLLM_SURGERY_TRAFFIC=1 or list adapters in "
    "VLLM_SURGERY_TRAFFIC_ADAPTERS)"
)


def recorder_or_answer(request: Request, action: str | None) -> tuple[Any, JSONResponse | None]:
    """(the TrafficRecorder, None), or (None, the error answer): 503 while recording is off, 403 when
    `action` needs the admin token the request lacks."""
    if getattr(request.app.state, TRAFFIC_KEY, None) is None:
        return None, error_response(RECORDING_OFF, 503)
    try:
        return state_object(request, TRAFFIC_KEY, action), None
    except HotSwapError as e:
        return None, error_response(str(e), int(e.status), e.outcome)


@router.get("/traffic")
async def traffic_stats(raw_request: Request) -> Any:
    recorder, denied = recorder_or_answer(raw_request, None)
    if denied:
        return denied
    try:
        rows = await asyncio.to_thread(recorder.db.stats)
    except DatabaseError as e:
        return error_response(f"the traffic database is not available: {e}", 503)
    writer = recorder.writer
    return {
        "stats": [r.to_dict() for r in rows],
        "queue": {
            "depth": writer.queue.qsize(),
            "peak": writer.peak_depth,
            "capacity": writer.queue.maxsize,
        },
        "writer": writer.health(),
    }


@router.get("/traffic/{name}")
async def traffic_records(
    name: str,
    raw_request: Request,
    since: str | None = Query(None, description="only records since: 7d, 12h, 30m, or an ISO 8601 time"),
    limit: str | None = Query(
        None, description=f"records per page, 1 to {MAX_RECORDS_PER_PAGE} (default 100)"
    ),
    after_id: str | None = Query(None, description="only records with a larger id (the next page)"),
) -> Any:
    recorder, denied = recorder_or_answer(raw_request, "reading traffic")
    if denied:
        return denied
    try:
        validate_adapter_name(name)
        start = parse_since(since) if since is not None else None
        page = int(limit if limit is not None else "100")
        after = int(after_id if after_id is not None else "0")
        if not 1 <= page <= MAX_RECORDS_PER_PAGE:
            raise ValueError(f"'limit' must be in [1, {MAX_RECORDS_PER_PAGE}]")
    except (InvalidAdapterName, CalibrationError, ValueError) as e:
        return error_response(str(e), 400)
    try:
        rows = await asyncio.to_thread(recorder.db.records, name, start, page, after)
    except DatabaseError as e:
        return error_response(f"the traffic database is not available: {e}", 503)
    return {
        "adapter": name,
        "records": [r.to_dict() for r in rows],
        "next_after_id": rows[-1].id if len(rows) == page else None,
    }
