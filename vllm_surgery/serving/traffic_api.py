"""Traffic routes of the endpoint plugin, and the wiring of traffic capture into the server.

Routes (JSON; under /v1, so vLLM's --api-key guard applies to all of them):

- ``POST /v1/surgery/feedback``   ``{"request_id": ID, "rating": "good"|"bad", "correction": TEXT,
  "choice": 0}`` (rating and/or correction; choice defaults to 0). ID is the request's X-Request-Id
  (returned in the response header of every recorded request) or the response's ``id``
  (``cmpl-...``/``chatcmpl-...``). Needs the API key only: clients give feedback. 404: no recorded
  request has that id (records still queued are written first, so feedback right after the answer
  works); 400: the body, naming the field; repeated feedback: the latest wins, the history is kept.
  A correction goes through the same redaction as the records.
- ``GET /v1/surgery/traffic``          counts per adapter and version (no user data), queue depth
- ``GET /v1/surgery/traffic/{name}``   an adapter's records with prompts and completions: user data,
  so it needs the admin token. Query: ``since`` (7d, 12h, ISO time), ``limit`` (<= 1000), ``after_id``.

All answer 503 when traffic recording is off on this server.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
from argparse import Namespace
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from ..errors import CalibrationError
from . import metrics, vllm_compat
from .capture import CaptureSwitch, TrafficCaptureMiddleware, observe_generate
from .database import RATINGS, Database, DatabaseError, SQLiteDatabase, UnknownRequest
from .http import SMALL_BODY_BYTES, BodyError, error_response, json_object_body
from .names import InvalidAdapterName, validate_adapter_name
from .settings import ServingSettings
from .traffic import TrafficPolicy, TrafficRecorder

log = logging.getLogger(f"vllm.{__name__}")

TRAFFIC_KEY = "vllm_surgery_traffic"
FEEDBACK_FIELDS = ("request_id", "rating", "correction", "choice")
FEEDBACK_EXAMPLE = '{"request_id": "...", "rating": "good", "correction": "..."}'
MAX_ID_LENGTH = 256
MAX_RECORDS_PER_PAGE = 1000
FLUSH_WAIT_S = 5.0

Guard = Callable[[Request, "str | None", str], "tuple[Any, JSONResponse | None]"]


def _recorder(request: Request, guard: Guard, action: str | None) -> tuple[Any, JSONResponse | None]:
    if getattr(request.app.state, TRAFFIC_KEY, None) is None:
        return None, error_response(
            "traffic recording is off on this server (set VLLM_SURGERY_TRAFFIC=1 or list adapters in "
            "VLLM_SURGERY_TRAFFIC_ADAPTERS)",
            503,
        )
    return guard(request, action, TRAFFIC_KEY)


def parse_feedback(body: dict[str, Any]) -> tuple[str, str | None, str | None, int]:
    """(request_id, rating, correction, choice) of a feedback body. Raises BodyError (400) naming the field."""
    request_id = body.get("request_id")
    if not isinstance(request_id, str) or not request_id.strip() or len(request_id) > MAX_ID_LENGTH:
        raise BodyError(f"'request_id' must be a non-empty string of at most {MAX_ID_LENGTH} characters")
    rating = body.get("rating")
    if rating is not None and rating not in RATINGS:
        raise BodyError(f"'rating' must be one of {list(RATINGS)}, got {rating!r}")
    correction = body.get("correction")
    if correction is not None and (not isinstance(correction, str) or not correction.strip()):
        raise BodyError("'correction' must be a non-empty string (the completion the user wanted)")
    if rating is None and correction is None:
        raise BodyError(f"give 'rating' ({' or '.join(RATINGS)}) and/or 'correction'")
    choice = body.get("choice", 0)
    if isinstance(choice, bool) or not isinstance(choice, int) or choice < 0:
        raise BodyError(f"'choice' must be an integer >= 0 (the choice's index), got {choice!r}")
    return request_id, rating, correction, choice


async def give_feedback(recorder: TrafficRecorder, body: dict[str, Any]) -> dict[str, Any]:
    """Store one feedback body. Raises BodyError (400/404/422) or DatabaseError."""
    request_id, rating, correction, choice = parse_feedback(body)
    db = recorder.db
    stored = await asyncio.to_thread(db.find, request_id, choice)
    if stored is None and await asyncio.to_thread(recorder.writer.flush, FLUSH_WAIT_S):
        stored = await asyncio.to_thread(db.find, request_id, choice)  # it may have been queued
    if stored is None:
        raise BodyError(
            f"no recorded request with id {request_id!r} (choice {choice}): unknown, not recorded (sampled "
            "out, base model, or recording off for its adapter), or removed by retention",
            404,
        )
    if correction is not None:
        try:
            correction = await asyncio.to_thread(recorder.redact_correction, stored.record, correction)
        except Exception as e:
            log.exception("feedback: the redaction hook failed on a correction")
            raise BodyError(f"the redaction hook failed on this correction ({type(e).__name__})", 422) from e
        if correction is None:
            raise BodyError("the redaction hook refused this correction; nothing was stored", 422)
    try:
        history = await asyncio.to_thread(db.add_feedback, stored.id, rating, correction)
    except UnknownRequest as e:
        raise BodyError(f"request {request_id!r}: {e}", 404) from e
    metrics.record_feedback(stored.record.adapter, rating)
    await asyncio.to_thread(recorder.refresh_gauges, stored.record.adapter)
    return {
        "request_id": stored.record.request_id,
        "response_id": stored.record.response_id,
        "choice": choice,
        "adapter": stored.record.adapter,
        "version": stored.record.version,
        "rating": rating,
        "corrected": correction is not None,
        "feedback_count": history,
    }


def attach_traffic_routes(router: APIRouter, guard: Guard) -> None:
    """Add the traffic routes to the plugin's /v1/surgery router. `guard(request, action, key)` is the
    plugin's guard: (target, None), or (None, the error answer); an `action` needs the admin token."""

    @router.post("/feedback")
    async def feedback(request: Request) -> Any:
        recorder, denied = _recorder(request, guard, None)
        if denied:
            return denied
        try:
            body = await json_object_body(request, SMALL_BODY_BYTES, FEEDBACK_FIELDS, FEEDBACK_EXAMPLE)
            return await give_feedback(recorder, body)
        except BodyError as e:
            return error_response(str(e), e.status)
        except DatabaseError as e:
            log.error("feedback: %s", e)
            return error_response(f"the traffic database is not available: {e}", 503)

    @router.get("/traffic")
    async def traffic_stats(request: Request) -> Any:
        recorder, denied = _recorder(request, guard, None)
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
        }

    @router.get("/traffic/{name}")
    async def traffic_records(name: str, request: Request) -> Any:
        recorder, denied = _recorder(request, guard, "reading traffic")
        if denied:
            return denied
        from ..traffic_calibration import parse_since

        q = request.query_params
        try:
            validate_adapter_name(name)
            since = parse_since(q["since"]) if "since" in q else None
            limit = int(q.get("limit", "100"))
            after_id = int(q.get("after_id", "0"))
            if not 1 <= limit <= MAX_RECORDS_PER_PAGE:
                raise ValueError(f"'limit' must be in [1, {MAX_RECORDS_PER_PAGE}]")
        except (InvalidAdapterName, CalibrationError, ValueError) as e:
            return error_response(str(e), 400)
        try:
            rows = await asyncio.to_thread(recorder.db.records, name, since, limit, after_id)
        except DatabaseError as e:
            return error_response(f"the traffic database is not available: {e}", 503)
        return {
            "adapter": name,
            "records": [r.to_dict() for r in rows],
            "next_after_id": rows[-1].id if len(rows) == limit else None,
        }


# ----------------------------------------------------------------------------- wiring
def attach_capture(app: FastAPI, settings: ServingSettings) -> CaptureSwitch | None:
    """At attach_router: add the capture middleware when the settings record anything (else nothing
    is added, so serving pays nothing) and make the server's shutdown write what is queued."""
    if not TrafficPolicy(settings).enabled:
        return None
    if vllm_compat.rust_frontend_requested():
        log.warning(
            "traffic: VLLM_USE_RUST_FRONTEND is set: no Python hook sees requests; nothing is recorded"
        )
        return None
    switch = CaptureSwitch()
    vllm_compat.add_asgi_middleware(app, TrafficCaptureMiddleware, switch=switch)

    def close() -> None:
        recorder = switch.recorder
        if recorder is not None:
            switch.recorder = None
            recorder.close()
            log.info(
                "traffic: writer closed; queued records written (peak queue depth %d)",
                recorder.writer.peak_depth,
            )

    vllm_compat.on_shutdown(app, close)
    atexit.register(close)  # vLLM may cancel the HTTP server without running the lifespan's end
    return switch


def start_capture(
    switch: CaptureSwitch | None,
    engine_client: Any,
    state: Any,
    args: Namespace,
    settings: ServingSettings,
    swapper: Any,
) -> TrafficRecorder | None:
    """At init_state: open the database (migrations), start the writer, observe the engine's generate.
    Raises DatabaseError or SettingsError (the server must not start half-configured)."""
    if switch is None:
        return None
    db = SQLiteDatabase(settings.database_path)
    recorder = TrafficRecorder(settings, db, swapper.version_of).start()
    clients = vllm_compat.serving_engine_clients(state) or [engine_client]
    for client in clients:
        vllm_compat.observe_generate(client, observe_generate)
    switch.add_response_header = not vllm_compat.request_id_headers_enabled(args)
    switch.recorder = recorder
    setattr(state, TRAFFIC_KEY, recorder)
    log.info(
        "traffic: recording to %s (schema %d; queue %d; redaction %s)",
        db.path, db.schema_version(), settings.traffic_queue_size, settings.traffic_redact,
    )  # fmt: skip
    return recorder


def calibration_source(
    settings: ServingSettings, recorder: TrafficRecorder | None, db: Database | None
) -> Callable[..., Any]:
    """What the refine route and the automatic jobs call to learn an adapter's calibration set:
    (adapter, adapter_dir, include_unrated or None, since or None) -> (CalibrationFromTraffic, the job
    spec's "adapter" source). `db`: the server's database (traffic and jobs), or None (no traffic)."""
    return partial(_adapter_calibration, settings, recorder, db)


def _adapter_calibration(
    settings: ServingSettings,
    recorder: TrafficRecorder | None,
    db: Database | None,
    adapter: str,
    adapter_dir: Path | None,
    include_unrated: bool | None,
    since: float | None,
) -> tuple[Any, dict[str, Any]]:
    from ..traffic_calibration import registered_files
    from .jobs import adapter_source, build_adapter_calibration

    policy = recorder.policy if recorder is not None else TrafficPolicy(settings)
    adapter_policy = policy.for_adapter(adapter)
    if include_unrated is None:
        include_unrated = adapter_policy.include_unrated
    files = registered_files(settings.calibration_dir, adapter_policy.calibration_files, adapter)
    source = adapter_source(include_unrated=include_unrated, since=since, files=files, adapter_dir=adapter_dir)
    if recorder is not None:
        recorder.writer.flush(FLUSH_WAIT_S)  # what was answered before this call counts
    return build_adapter_calibration(db, adapter, source), source
