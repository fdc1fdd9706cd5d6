"""vLLM's runtime adapter routes, guarded: only the admin token changes what is served.

`vllm-surgery-serve` turns on ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` (resolvers need it), which also
turns on vLLM's ``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``. vLLM checks only
the API key there, so anyone holding it could load any directory on the server, replace a served
adapter in place (``load_inplace``, the upstream bug the plugin's hot-swap avoids) or unload one.
vLLM's SageMaker bootstrap also mounts ``POST /adapters`` and ``DELETE /adapters/{adapter_name}``,
which call the same handlers outside the /v1 prefix that --api-key guards: no key at all.

The endpoint plugin replaces the two /v1 routes (a plugin route with the same path and method
replaces vLLM's) with these handlers and switches the SageMaker ones off (403 with the reason):

- load (body `LoadAdapterRequest`, the fields of vLLM's own) needs the admin token (see `auth`); ``load_inplace: true`` is refused (400: use the swap
  route); ``lora_path`` must be an original (under an adapter root or given with --lora-modules) or a
  version in the store, and passes the same validation as a swap (`HotSwapper.validated_target`:
  corrupt files, rank, shapes, dtype overflow, staleness); a name the plugin manages (it has an
  original) is changed only through swap. Then vLLM's own load runs (never in place).
- unload (body `UnloadAdapterRequest`) needs the admin token; a name the plugin manages is resolved again (to its served version)
  on its next request.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import Field, SkipValidation

from ...names import InvalidAdapterName, validate_adapter_name
from .. import vllm_compat
from ..auth import AdminGuard
from ..hotswap import HotSwapError, HotSwapper
from .http import BodyError, RequestBody, RequestError, bounded, error_response, json_object_body

log = logging.getLogger(f"vllm.{__name__}")


class LoadAdapterRequest(RequestBody):
    """vLLM's load request (entrypoints/serve/lora/protocol.py), as this plugin accepts it. The values
    are checked by the route, in order, so that each refusal names its reason."""

    lora_name: Annotated[str, SkipValidation] = Field(description="a name the plugin does not manage")
    lora_path: Annotated[str, SkipValidation] = Field(
        description="an original adapter (under an adapter root or given with --lora-modules) or a version "
        "in the store, as an absolute path"
    )
    load_inplace: Annotated[bool, SkipValidation] = Field(False, description="refused when true: use swap")
    is_3d_lora_weight: Annotated[bool, SkipValidation] = Field(False, description="refused when true")


class UnloadAdapterRequest(RequestBody):
    """vLLM's unload request."""

    lora_name: Annotated[str, SkipValidation] = Field(description="the name to unload")
    lora_int_id: Annotated[int | None, SkipValidation] = Field(None, description="ignored (vLLM's own field)")


LOAD_FIELDS = tuple(LoadAdapterRequest.model_fields)
UNLOAD_FIELDS = tuple(UnloadAdapterRequest.model_fields)


class Refused(RequestError):
    """A request answered with `status` and the message."""


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise Refused(f"'{key}' must be true or false, got {value!r}", 400)
    return value


def _name(body: dict[str, Any]) -> str:
    name = body.get("lora_name")
    if not isinstance(name, str):
        raise Refused("'lora_name' must be a string", 400)
    try:
        return validate_adapter_name(name)
    except InvalidAdapterName as e:
        raise Refused(str(e), 400) from e


class RuntimeLoraRoutes:
    """Handlers for vLLM's runtime load/unload paths. `swapper(request)` is the app's HotSwapper or None."""

    def __init__(self, guard: AdminGuard, swapper: Any) -> None:
        self.guard = guard
        self.swapper = swapper

    def _ready(self, request: Request, action: str) -> HotSwapper:
        reason = self.guard.refusal(request, action)
        if reason is not None:
            raise Refused(reason, 403)
        swapper = self.swapper(request)
        if swapper is None:
            raise Refused("adapter loading is not available on this server (no LoRA engine)", 503)
        return swapper

    async def load(self, request: Request) -> Response:
        """POST /v1/load_lora_adapter, guarded (see the module docstring)."""
        try:
            swapper = self._ready(request, "loading an adapter")
            body = await json_object_body(
                request, allowed=LOAD_FIELDS, example='{"lora_name": "x-v2", "lora_path": "/store/x/ID"}'
            )
            if _flag(body, "load_inplace"):
                raise Refused(
                    "load_inplace is refused on this server: it rewrites an adapter's weights under running "
                    "requests and vLLM 0.32 then re-reads the adapter from disk on every step; to change the "
                    "weights served under a name, use POST /v1/surgery/adapters/{name}/swap",
                    400,
                )
            if _flag(body, "is_3d_lora_weight"):
                raise Refused("3-D (fused MoE) LoRA weights are not supported by vllm-surgery", 400)
            name = _name(body)
            raw_path = body.get("lora_path")
            if not isinstance(raw_path, str) or not raw_path:
                raise Refused("'lora_path' must be a non-empty string", 400)
            path = await asyncio.to_thread(self._validated_path, swapper, name, Path(raw_path))
            status, message = await vllm_compat.load_named_adapter(swapper.models, name, str(path))
        except (Refused, BodyError) as e:
            log.warning("runtime load refused: %s", bounded(str(e)))
            return error_response(str(e), e.status)
        if status != 200:
            return error_response(message, status)
        log.info("runtime load: adapter %r now serves %s", name, path)
        return Response(content=message, status_code=200)

    def _validated_path(self, swapper: HotSwapper, name: str, path: Path) -> Path:
        """Blocking (resolves paths, reads files): the directory to load for `name`, or Refused."""
        if swapper.find_original(name) is not None:
            raise Refused(
                f"adapter {name!r} is managed by vllm-surgery (it has an original); change what it serves "
                f"with POST /v1/surgery/adapters/{name}/swap",
                409,
            )
        if not path.is_absolute():
            raise Refused(f"lora_path {str(path)!r} must be an absolute path", 400)
        located = swapper.locate(path)
        if located is None:
            roots = [str(r) for r in swapper.settings.adapter_dirs]
            raise Refused(
                f"lora_path {str(path)!r} is neither an original adapter (under {roots} or given with "
                f"--lora-modules) nor a version in the store {swapper.store.location}",
                403,
            )
        try:
            target, _ = swapper.validated_target(*located)
        except HotSwapError as e:
            raise Refused(str(e), int(e.status)) from e
        return target

    async def unload(self, request: Request) -> Response:
        """POST /v1/unload_lora_adapter, guarded."""
        try:
            swapper = self._ready(request, "unloading an adapter")
            body = await json_object_body(request, allowed=UNLOAD_FIELDS, example='{"lora_name": "x"}')
            name = body.get("lora_name")
            if not isinstance(name, str) or not name:
                raise Refused("'lora_name' must be a non-empty string", 400)
        except (Refused, BodyError) as e:
            log.warning("runtime unload refused: %s", bounded(str(e)))
            return error_response(str(e), e.status)
        status, message = await vllm_compat.unload_named_adapter(swapper.models, name)
        if status != 200:
            return error_response(message, status)
        log.info("runtime unload: adapter %r unloaded", name)
        return Response(content=message, status_code=200)

    async def switched_off(self, request: Request) -> Response:
        """The SageMaker adapter routes: answered without loading or unloading anything."""
        return error_response(
            f"{request.method} {request.url.path} is switched off by vllm-surgery: it loads or unloads adapters "
            f"outside the /v1 prefix that --api-key guards. Use POST {vllm_compat.RUNTIME_LOAD_PATH} or "
            f"{vllm_compat.RUNTIME_UNLOAD_PATH} with the admin token",
            HTTPStatus.FORBIDDEN,
        )
