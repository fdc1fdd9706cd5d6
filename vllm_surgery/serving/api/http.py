"""Request bodies and error answers shared by every route of the plugin.

Bodies are read with a size bound before anything is parsed (a client cannot make the server buffer a
200 MB body), and parsed strictly: bad JSON, JSON nested too deeply for the parser (which raises
RecursionError, not ValueError) and a body that is not an object all answer 4xx with a message, never a
500 with a traceback. Errors use the shape of vLLM's own: ``{"error": {"message", "type", "code"}}``.

Each body is a pydantic model (`RequestBody`: unknown fields are refused), as vLLM's own routes
declare theirs. The routes read the body themselves, so that the size bound and the messages above
hold, and declare the model's schema in the OpenAPI document (`openapi_body`), so that /docs shows
every route with its body.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from ..hotswap import HotSwapError

log = logging.getLogger(f"vllm.{__name__}")

# Bounds per kind of body. A swap or a feedback body is a few hundred bytes; a refine body may carry
# calibration records inline (the paper's range is 32-256 examples).
SMALL_BODY_BYTES = 64 * 1024
LARGE_BODY_BYTES = 16 * 1024 * 1024
# No body of ours nests deeper than a few levels (refine: body > records > record > value). Deeper
# JSON is refused here, so that no later step (hashing with json.dumps, say) can meet a RecursionError.
MAX_DEPTH = 32
# An error that quotes a client's value (a 16 MB setting, say) is cut to about this many characters
# before it is answered or logged: the body bound limits what a client sends, this what we send back.
MAX_MESSAGE_CHARS = 2_000

_TYPES = {
    400: "BadRequestError",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFoundError",
    409: "Conflict",
    413: "PayloadTooLarge",
    415: "UnsupportedMediaType",
    422: "Unprocessable",
    503: "ServiceUnavailable",
}


class RequestError(Exception):
    """A request answered with `status` (4xx/5xx) and the message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = int(status)


class BodyError(RequestError, ValueError):
    """A request body (or query) that cannot be used; `status` is the HTTP status to answer with."""


def bounded(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` cut in the middle to about `limit` characters, saying how many were left out. Why the
    middle: our messages name the problem first and the remedy last ("unknown gate_statistic '...':
    gate_statistic must be one of ..."), and what a client sent sits between them."""
    if len(text) <= limit:
        return text
    head, tail = limit * 2 // 3, limit // 3
    return f"{text[:head]} [... {len(text) - head - tail:,} characters left out ...] {text[-tail:]}"


def error_response(message: str, status: int, err_type: str | None = None) -> JSONResponse:
    """An error answer in vLLM's shape, its message `bounded`; `err_type` defaults to a name derived
    from the status."""
    kind = err_type or _TYPES.get(status, "InternalServerError")
    return JSONResponse(
        {"error": {"message": bounded(message), "type": kind, "code": status}}, status_code=status
    )


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, refused with 413 as soon as it exceeds `max_bytes` (declared or actually sent)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BodyError("Content-Length is not a number") from None
        if size > max_bytes:
            raise BodyError(f"body of {size} bytes exceeds the limit of {max_bytes} bytes", 413)
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise BodyError(f"body exceeds the limit of {max_bytes} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_object(
    raw: bytes, allowed: Collection[str] | None = None, example: str = ""
) -> dict[str, Any]:
    """`raw` parsed as a JSON object; with `allowed`, unknown fields are refused by name (400)."""
    hint = f" (e.g. {example})" if example else ""
    if not raw.strip():
        raise BodyError(f"body is empty; send a JSON object{hint}")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise BodyError("body is JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BodyError(f"body is not valid JSON ({e}){hint}") from None
    if not isinstance(body, dict):
        raise BodyError(f"body must be a JSON object, got {type(body).__name__}{hint}")
    if _depth(body) > MAX_DEPTH:
        raise BodyError(f"body is JSON nested deeper than {MAX_DEPTH} levels")
    if allowed is not None:
        unknown = sorted(set(body) - set(allowed))
        if unknown:
            raise BodyError(f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    return body


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion (1 for a flat object)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            deepest = max(deepest, depth)
            stack.extend((item, depth + 1) for item in v)
    return deepest


async def json_object_body(
    request: Request,
    max_bytes: int = SMALL_BODY_BYTES,
    allowed: Collection[str] | None = None,
    example: str = "",
) -> dict[str, Any]:
    """Read and parse a bounded JSON-object body. Raises BodyError (400 or 413) saying what is wrong."""
    return parse_json_object(await read_body(request, max_bytes), allowed, example)


# ----------------------------------------------------------------------------- typed bodies
class RequestBody(BaseModel):
    """Base of the request models: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")


Model = TypeVar("Model", bound=RequestBody)


def openapi_body(model: type[RequestBody]) -> dict[str, Any]:
    """The `openapi_extra` of a route that reads a `model` body itself (see the module docstring)."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def validation_message(error: ValidationError) -> str:
    """The first problem of a ValidationError as one line: a check's own message where it raised one,
    else the field and pydantic's message."""
    first = error.errors()[0]
    raised = (first.get("ctx") or {}).get("error")
    if raised is not None:
        return str(raised)
    where = ".".join(str(p) for p in first.get("loc", ())) or "body"
    return f"'{where}': {first.get('msg')}"


def validated(model: type[Model], body: Any) -> Model:
    """`body` (parsed JSON) as a `model`; raises BodyError (400) saying what is wrong."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise BodyError(validation_message(e)) from None


async def read_model(
    request: Request, model: type[Model], max_bytes: int = SMALL_BODY_BYTES, example: str = ""
) -> Model:
    """Read, parse and validate a bounded `model` body. Raises BodyError (400 or 413)."""
    return validated(model, await json_object_body(request, max_bytes, model.model_fields, example))


# ----------------------------------------------------------------------------- answers
Handler = Callable[..., Awaitable[Any]]


def answer_4xx(handler: Handler) -> Handler:
    """Map the errors a route can meet to answers: RequestError (BodyError and the routes' own) with its
    status, HotSwapError with its status and outcome; any other error of the request's content
    (ValueError, TypeError, OverflowError, RecursionError) is a 400 with its message; nothing escapes
    as a bare 500 with a traceback."""

    @functools.wraps(handler)  # FastAPI reads the parameters from the wrapped signature
    async def route(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except RequestError as e:
            return error_response(str(e), e.status)
        except HotSwapError as e:
            return error_response(str(e), int(e.status), e.outcome)
        except (ValueError, TypeError, OverflowError, RecursionError) as e:
            log.warning("request refused: %s: %s", type(e).__name__, bounded(str(e)))
            return error_response(f"bad request: {type(e).__name__}: {e}", 400)

    return route
