"""Adapter routes: what is served, and hot-swaps (see `vllm_surgery.serving.hotswap`).

- ``GET  /v1/surgery/adapters``                 every known adapter (name, served path/version, versions
  with ``servable`` and, when false, the ``reason``: the same check a swap makes)
- ``GET  /v1/surgery/adapters/{name}``          one adapter
- ``POST /v1/surgery/adapters/{name}/swap``     body `SwapRequest`; hot-swaps without a restart (a version
  the gate did not accept, decision "forced", only with ``"force": true``)
- ``POST /v1/surgery/adapters/{name}/rollback`` back to the version served before the last swap

Swap and rollback change what is served: they need the admin token.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field, StrictBool, model_validator

from ..hotswap import HotSwapError, HotSwapper
from .http import RequestBody, answer_4xx, openapi_body, read_model
from .state import hotswapper

router = APIRouter(prefix="/v1/surgery", tags=["vllm-surgery: adapters"])


class SwapRequest(RequestBody):
    """Serve another version under an adapter's name."""

    version: str = Field(min_length=1, description='a store version id, or "original"')
    force: StrictBool = Field(
        False,
        description='serve a version the gate did not accept (decision "forced") anyway; logged. '
        "A stale version (refined from other content of the original) is refused even so",
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
    return await asyncio.to_thread(swapper.describe, name)


@router.post("/adapters/{name}/swap", openapi_extra=openapi_body(SwapRequest))
@answer_4xx
async def swap(name: str, raw_request: Request) -> Any:
    swapper = hotswapper(raw_request, "swap")
    request = await read_model(raw_request, SwapRequest, example='{"version": "original"}')
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
