"""Request bodies and error answers shared by every /v1/surgery route.

Bodies are read with a size bound before anything is parsed (a client cannot make the server buffer a
200 MB body), and parsed strictly: bad JSON, JSON nested too deeply for the parser (which raises
RecursionError, not ValueError) and a body that is not an object all answer 4xx with a message, never a
500 with a traceback. Errors use the shape of vLLM's own: ``{"error": {"message", "type", "code"}}``.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

# Bounds per kind of body. A swap or a feedback body is a few hundred bytes; a refine body may carry
# calibration records inline (the paper's range is 32-256 examples).
SMALL_BODY_BYTES = 64 * 1024
LARGE_BODY_BYTES = 16 * 1024 * 1024
# No body of ours nests deeper than a few levels (refine: body > records > record > value). Deeper
# JSON is refused here, so that no later step (hashing with json.dumps, say) can meet a RecursionError.
MAX_DEPTH = 32

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


class BodyError(ValueError):
    """A request body that cannot be used; `status` is the HTTP status to answer with (400 or 413)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def error_response(message: str, status: int, err_type: str | None = None) -> JSONResponse:
    """An error answer in vLLM's shape; `err_type` defaults to a name derived from the status."""
    kind = err_type or _TYPES.get(status, "InternalServerError")
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


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


def parse_json_object(raw: bytes, allowed: Collection[str] | None = None, example: str = "") -> dict[str, Any]:
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
