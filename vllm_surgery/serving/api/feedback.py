"""``POST /v1/surgery/feedback``: a client's rating and/or correction of a recorded answer.

Body `FeedbackRequest`: ``{"request_id": ID, "rating": "good"|"bad", "correction": TEXT, "choice": 0}``
(rating and/or correction; choice defaults to 0). ID is the request's X-Request-Id (returned in the
response header of every recorded request) or the response's ``id`` (``cmpl-...``/``chatcmpl-...``).
Needs the API key only: clients give feedback. Whether it counts as calibration data (toward the
calibration set and automatic jobs) depends on ``feedback_trust``: with "reviewer" (the default) only
feedback sent with the reviewer token (``X-Surgery-Reviewer-Token``) or the admin token does; other
feedback is stored, counted and marked untrusted (``"trusted": false`` in the answer). See
docs/security.md. 404: no recorded request has that id (records still queued are written first, so
feedback right after the answer works); 400: the body, naming the field; 413: a correction above
``feedback_max_correction_bytes``; 429: a client (not a reviewer) above
``feedback_corrections_per_hour``. Repeated feedback: the latest wins, the newest
``feedback_max_per_record`` rows are kept (and always the latest trusted one). A correction goes
through the same redaction as the records. 503 when traffic recording is off on this server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field, model_validator

from ...settings import env_of
from ...storage import RATINGS, DatabaseError, UnknownRequest
from ...traffic import TrafficRecorder, record_feedback
from ..auth import FeedbackTrust
from .http import SMALL_BODY_BYTES, BodyError, RequestBody, bounded, error_response, openapi_body, read_model
from .state import CANARY_KEY
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


HOUR_S = 3600.0


def _find(recorder: TrafficRecorder, request_id: str, choice: int) -> Any:
    """The record asked for: stored under the id itself or, where redaction changed it, its pseudonym."""
    for stored_id in recorder.stored_ids(request_id):
        if (stored := recorder.db.find(stored_id, choice)) is not None:
            return stored
    return None


def trust_of(recorder: TrafficRecorder) -> FeedbackTrust:
    """The server's FeedbackTrust (made by start_capture; built from the settings if missing)."""
    trust = getattr(recorder, "feedback_trust", None)
    if trust is None:
        trust = recorder.feedback_trust = FeedbackTrust(recorder.settings)
    return trust


async def give_feedback(
    recorder: TrafficRecorder,
    feedback: FeedbackRequest,
    trusted: bool = True,
    reviewer: bool = True,
    client: str | None = None,
) -> dict[str, Any]:
    """Store one feedback (`trusted`: it counts as calibration data; `reviewer`: no per-client bound;
    `client`: who sent it). Raises BodyError (404/413/422/429) or DatabaseError."""
    request_id, choice, correction = feedback.request_id, feedback.choice, feedback.correction
    settings = recorder.settings
    db = recorder.db
    if correction is not None:
        size, limit = len(correction.encode("utf-8", "surrogatepass")), settings.feedback_max_correction_bytes
        if size > limit:
            raise BodyError(
                f"'correction' is {size} bytes, above the limit of {limit} "
                f"({env_of('feedback_max_correction_bytes')}); send a shorter correction",
                413,
            )
        if not reviewer and client is not None:
            sent = await asyncio.to_thread(db.corrections_since, client, time.time() - HOUR_S)
            per_hour = settings.feedback_corrections_per_hour
            if sent >= per_hour:
                raise BodyError(
                    f"'correction': this client sent {sent} corrections in the last hour, the limit is "
                    f"{per_hour} ({env_of('feedback_corrections_per_hour')}); try again later, or send "
                    "them as a reviewer",
                    429,
                )
    stored = await asyncio.to_thread(_find, recorder, request_id, choice)
    if stored is None and await asyncio.to_thread(recorder.flush, FLUSH_WAIT_S):
        stored = await asyncio.to_thread(_find, recorder, request_id, choice)  # it may have been queued
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
        history = await asyncio.to_thread(
            lambda: db.add_feedback(
                stored.id,
                feedback.rating,
                correction,
                trusted=trusted,
                client=client,
                keep=settings.feedback_max_per_record,
            )
        )
    except UnknownRequest as e:
        raise BodyError(f"request {request_id!r}: {e}", 404) from e
    record_feedback(stored.record.adapter, feedback.rating, trusted)
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
        "trusted": trusted,
    }


@router.post("/feedback", openapi_extra=openapi_body(FeedbackRequest))
async def feedback(raw_request: Request) -> Any:
    recorder, denied = recorder_or_answer(raw_request, None)
    if denied:
        return denied
    try:
        body = await read_model(raw_request, FeedbackRequest, SMALL_BODY_BYTES, FEEDBACK_EXAMPLE)
        trusted, reviewer, client = trust_of(recorder).judge(raw_request)
        answer = await give_feedback(recorder, body, trusted, reviewer, client)
        canaries = getattr(raw_request.app.state, CANARY_KEY, None)
        if canaries is not None:  # a running canary of the adapter is evaluated again (docs/canary.md)
            canaries.feedback_arrived(answer["adapter"])
        return answer
    except BodyError as e:
        return error_response(str(e), e.status)
    except DatabaseError as e:
        log.error("feedback: %s", bounded(str(e)))
        return error_response(f"the traffic database is not available: {e}", 503)
