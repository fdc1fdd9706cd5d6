"""``POST /v1/surgery/feedback``: a client's rating and/or correction of a recorded answer.

Body `FeedbackRequest`: ``{"request_id": ID, "rating": "good"|"bad", "correction": TEXT, "choice": 0}``
(rating and/or correction; choice defaults to 0). ID is the request's X-Request-Id (returned in the
response header of every recorded request) or the response's ``id`` (``cmpl-...``/``chatcmpl-...``).
Needs the API key only: clients give feedback. 404: no recorded request has that id (records still
queued are written first, so feedback right after the answer works); 400: the body, naming the field;
repeated feedback: the latest wins, the history is kept. A correction goes through the same redaction
as the records. 503 when traffic recording is off on this server.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field, model_validator

from ...storage import RATINGS, DatabaseError, UnknownRequest
from ...traffic import TrafficRecorder, record_feedback
from .http import SMALL_BODY_BYTES, BodyError, RequestBody, error_response, openapi_body, read_model
from .traffic import recorder_or_answer

log = logging.getLogger(f"vllm.{__name__}")

router = APIRouter(prefix="/v1/surgery", tags=["vllm-surgery: traffic"])

FEEDBACK_EXAMPLE = '{"request_id": "...", "rating": "good", "correction": "..."}'
MAX_ID_LENGTH = 256
FLUSH_WAIT_S = 5.0


class FeedbackRequest(RequestBody):
    """A rating and/or a correction of one recorded answer (one returned choice)."""

    request_id: str = Field(
        min_length=1,
        max_length=MAX_ID_LENGTH,
        description="the request's X-Request-Id, or the response's id (cmpl-..., chatcmpl-...)",
    )
    rating: Literal[RATINGS] | None = Field(None, description="how good the answer was")  # type: ignore[valid-type]
    correction: str | None = Field(None, min_length=1, description="the completion the user wanted")
    choice: int = Field(0, ge=0, description="the choice's index (n > 1)")

    @model_validator(mode="before")
    @classmethod
    def _named(cls, body: Any) -> Any:
        """The checks, with messages that name the field."""
        if not isinstance(body, dict):
            raise ValueError(f"body must be a JSON object (e.g. {FEEDBACK_EXAMPLE})")
        request_id = body.get("request_id")
        if not isinstance(request_id, str) or not request_id.strip() or len(request_id) > MAX_ID_LENGTH:
            raise ValueError(f"'request_id' must be a non-empty string of at most {MAX_ID_LENGTH} characters")
        rating = body.get("rating")
        if rating is not None and rating not in RATINGS:
            raise ValueError(f"'rating' must be one of {list(RATINGS)}, got {rating!r}")
        correction = body.get("correction")
        if correction is not None and (not isinstance(correction, str) or not correction.strip()):
            raise ValueError("'correction' must be a non-empty string (the completion the user wanted)")
        if rating is None and correction is None:
            raise ValueError(f"give 'rating' ({' or '.join(RATINGS)}) and/or 'correction'")
        choice = body.get("choice", 0)
        if isinstance(choice, bool) or not isinstance(choice, int) or choice < 0:
            raise ValueError(f"'choice' must be an integer >= 0 (the choice's index), got {choice!r}")
        return body


async def give_feedback(recorder: TrafficRecorder, feedback: FeedbackRequest) -> dict[str, Any]:
    """Store one feedback. Raises BodyError (404/422) or DatabaseError."""
    request_id, choice, correction = feedback.request_id, feedback.choice, feedback.correction
    db = recorder.db
    stored = await asyncio.to_thread(db.find, request_id, choice)
    if stored is None and await asyncio.to_thread(recorder.flush, FLUSH_WAIT_S):
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
        history = await asyncio.to_thread(db.add_feedback, stored.id, feedback.rating, correction)
    except UnknownRequest as e:
        raise BodyError(f"request {request_id!r}: {e}", 404) from e
    record_feedback(stored.record.adapter, feedback.rating)
    await asyncio.to_thread(recorder.refresh_gauges, stored.record.adapter)
    return {
        "request_id": stored.record.request_id,
        "response_id": stored.record.response_id,
        "choice": choice,
        "adapter": stored.record.adapter,
        "version": stored.record.version,
        "rating": feedback.rating,
        "corrected": correction is not None,
        "feedback_count": history,
    }


@router.post("/feedback", openapi_extra=openapi_body(FeedbackRequest))
async def feedback(raw_request: Request) -> Any:
    recorder, denied = recorder_or_answer(raw_request, None)
    if denied:
        return denied
    try:
        body = await read_model(raw_request, FeedbackRequest, SMALL_BODY_BYTES, FEEDBACK_EXAMPLE)
        return await give_feedback(recorder, body)
    except BodyError as e:
        return error_response(str(e), e.status)
    except DatabaseError as e:
        log.error("feedback: %s", e)
        return error_response(f"the traffic database is not available: {e}", 503)
