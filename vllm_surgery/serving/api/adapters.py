"""Adapter routes: what is served, and hot-swaps (see `vllm_surgery.serving.hotswap`).

- ``GET  /v1/surgery/adapters``                 every known adapter (name, served path/version, versions
  with ``servable`` and, when false, the ``reason``: the same check a swap makes)
- ``GET  /v1/surgery/adapters/{name}``          one adapter (with its running canary, its live figures
  and the latest canary decisions, see `canary`)
- ``POST /v1/surgery/adapters/{name}/swap``     body `SwapRequest`; hot-swaps without a restart (a version
  the gate did not accept, decision "forced", only with ``"force": true``)
- ``POST /v1/surgery/adapters/{name}/rollback`` back to the version served before the last swap

Swap and rollback change what is served: they need the admin token.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field, StrictBool, StrictInt, model_validator

from ..hotswap import HotSwapError, HotSwapper
from .http import RequestBody, answer_4xx, openapi_body, read_model
from .state import CANARY_KEY, hotswapper

router = APIRouter(prefix="/v1/surgery", tags=["vllm-surgery: adapters"])


class SwapRequest(RequestBody):
    """Serve another version under an adapter's name."""

    version: str = Field(min_length=1, description='a store version id, or "original"')
    force: StrictBool = Field(
        False,
        description='serve a version the gate did not accept (decision "forced") anyway; logged. '
        "A stale version (refined from other content of the original) is refused even so",
    )

    job: StrictInt | None = Field(
        None,
        description="the refinement job whose accepted version this is (the worker's request): with "
        "VLLM_SURGERY_CANARY_SHARE > 0 a canary of the version starts instead of the swap",
    )

    @model_validator(mode="before")
    @classmethod
    def _a_version(cls, body: Any) -> Any:
        version = body.get("version") if isinstance(body, dict) else None
        if not isinstance(version, str) or not version:
            raise ValueError('body must be {"version": ID} with a non-empty string ID')
        return body


@router.get("/adapters")
@answer_4xx
async def list_adapters(raw_request: Request) -> Any:
    swapper = hotswapper(raw_request)
    return {"adapters": await asyncio.to_thread(describe_all, swapper)}


@router.get("/adapters/{name}")
@answer_4xx
async def get_adapter(name: str, raw_request: Request) -> Any:
    swapper = hotswapper(raw_request)
    described = await asyncio.to_thread(swapper.describe, name)
    canaries = getattr(raw_request.app.state, CANARY_KEY, None)
    if canaries is not None and described.get("source") != "static":
        described.update(await asyncio.to_thread(canaries.describe, name))
    return described


@router.post("/adapters/{name}/swap", openapi_extra=openapi_body(SwapRequest))
@answer_4xx
async def swap(name: str, raw_request: Request) -> Any:
    swapper = hotswapper(raw_request, "swap")
    request = await read_model(raw_request, SwapRequest, example='{"version": "original"}')
    canaries = getattr(raw_request.app.state, CANARY_KEY, None)
    share = swapper.settings.canary_share
    if request.job is not None and share > 0 and canaries is not None and not request.force:
        running = await asyncio.to_thread(canaries.db.running_canary, name)
        if running is not None and running.job_id != request.job:
            # not now (the worker keeps the swap pending): the server's sweep starts this job's canary
            # once the running one ends
            raise HotSwapError(
                f"adapter {name!r} runs canary {running.id} of {running.canary_version}; job "
                f"{request.job}'s version starts its own canary after it ends (the pending-swap sweep)",
                503,
                "unavailable",
            )
        canary = running or await canaries.start(
            name, request.version, share, by=f"job {request.job}", job_id=request.job
        )
        return {"adapter": name, "version": request.version, "changed": False, "canary": canary.to_dict()}
    do = swapper.swap_forced if request.force else swapper.swap
    return (await do(name, request.version)).to_dict()


@router.post("/adapters/{name}/rollback")
@answer_4xx
async def rollback(name: str, raw_request: Request) -> Any:
    swapper = hotswapper(raw_request, "rollback")
    return (await swapper.rollback(name)).to_dict()


def describe_all(swapper: HotSwapper) -> list[dict[str, Any]]:
    """Blocking (reads the roots and the store): every known adapter, described."""
    out = []
    for name in swapper.known_names():
        try:
            out.append(swapper.describe(name))
        except HotSwapError:
            continue
    return out
