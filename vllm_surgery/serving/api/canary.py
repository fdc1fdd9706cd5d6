"""Canary routes (see `vllm_surgery.serving.canaries` and docs/canary.md); all need the admin token.

- ``POST /v1/surgery/adapters/{name}/canary``          body `StartCanaryRequest`: serve a version to a
  share of the adapter's requests beside the version served now
- ``POST /v1/surgery/adapters/{name}/canary/share``    body `CanaryShareRequest`: change the share
- ``POST /v1/surgery/adapters/{name}/canary/promote``  serve the canary version to everyone
- ``POST /v1/surgery/adapters/{name}/canary/abort``    end the canary; the current version stays

GET /v1/surgery/adapters/{name} shows the running canary with both versions' live figures and the
rule's (`adapters`). 409 when no canary runs (or one does, for a start), 503 without a job database.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field, StrictFloat, StrictInt

from ..canaries import CanaryController
from .http import RequestBody, answer_4xx, openapi_body, read_model
from .state import CANARY_KEY, state_object

router = APIRouter(prefix="/v1/surgery", tags=["vllm-surgery: canaries"])

NO_CANARIES = "canaries are not available on this server (no job database: see the server log at start)"


class StartCanaryRequest(RequestBody):
    """Serve `version` to `share` of the adapter's requests beside the version served now."""

    version: str = Field(min_length=1, description="a store version id the gate accepted")
    share: StrictFloat | StrictInt = Field(description="share of requests (sticky per user), in (0, 1)")


class CanaryShareRequest(RequestBody):
    """A new share for the running canary."""

    share: StrictFloat | StrictInt = Field(description="share of requests (sticky per user), in (0, 1)")


def controller(request: Request, action: str | None) -> CanaryController:
    """The server's CanaryController (403 without the admin token for `action`, 503 without one)."""
    return state_object(request, CANARY_KEY, action, NO_CANARIES)


@router.post("/adapters/{name}/canary", openapi_extra=openapi_body(StartCanaryRequest))
@answer_4xx
async def start_canary(name: str, raw_request: Request) -> Any:
    canaries = controller(raw_request, "canary start")
    body = await read_model(raw_request, StartCanaryRequest, example='{"version": "...", "share": 0.1}')
    return (await canaries.start(name, body.version, float(body.share), by="admin")).to_dict()


@router.post("/adapters/{name}/canary/share", openapi_extra=openapi_body(CanaryShareRequest))
@answer_4xx
async def canary_share(name: str, raw_request: Request) -> Any:
    canaries = controller(raw_request, "canary share")
    body = await read_model(raw_request, CanaryShareRequest, example='{"share": 0.25}')
    return (await canaries.set_share(name, float(body.share), by="admin")).to_dict()


@router.post("/adapters/{name}/canary/promote")
@answer_4xx
async def promote_canary(name: str, raw_request: Request) -> Any:
    canaries = controller(raw_request, "canary promote")
    return (await canaries.promote(name, by="admin")).to_dict()


@router.post("/adapters/{name}/canary/abort")
@answer_4xx
async def abort_canary(name: str, raw_request: Request) -> Any:
    canaries = controller(raw_request, "canary abort")
    return (await canaries.abort(name, by="admin")).to_dict()
