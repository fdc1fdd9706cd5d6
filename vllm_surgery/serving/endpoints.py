"""The `vllm.endpoint_plugins` entry point `vllm_surgery_api`: adapter version routes under /v1/surgery/.

Routes (JSON):

- ``GET  /v1/surgery/adapters``                 every known adapter (name, served path/version, versions)
- ``GET  /v1/surgery/adapters/{name}``          one adapter
- ``POST /v1/surgery/adapters/{name}/swap``     body ``{"version": ID}``; ID is a store version id or
  ``"original"``; hot-swaps without a restart (see `hotswap`)
- ``POST /v1/surgery/adapters/{name}/rollback`` back to the version served before the last swap
- ``POST /v1/surgery/adapters/{name}/refine``   refine the adapter in the server (synchronous; store
  hits answer at once; see `refining` for the body, 409-when-busy and the error statuses)
- ``POST /v1/surgery/feedback``, ``GET /v1/surgery/traffic[/{name}]``: recorded traffic and its
  feedback (see `traffic_api`; recording itself is `capture` and `traffic`)

Errors answer ``{"error": {"message", "type", "code"}}`` with 400 (bad name or body), 404 (unknown
adapter or version), 409 (stale, unservable, nothing to roll back to), 422 (corrupt version; the old
version keeps serving) or 500 (the engine refused the load; the old version keeps serving).

Enabling: vLLM loads endpoint plugins only when ``VLLM_PLUGINS`` names them, and then VLLM_PLUGINS is
an allow-list for every plugin group, so name the general plugin too:
``VLLM_PLUGINS=vllm_surgery,vllm_surgery_api`` (with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``, which
`vllm-surgery-serve` sets, and ``--enable-lora``).

Authentication:

- ``--api-key`` / ``VLLM_API_KEY``: vLLM's own AuthenticationMiddleware guards every path under /v1,
  so all routes here need ``Authorization: Bearer <api key>`` exactly like /v1/completions (401
  otherwise). It runs before these routes and cannot be bypassed by them.
- ``VLLM_SURGERY_ADMIN_TOKEN`` (read at server start): if set, the mutating routes (swap, rollback,
  refine) require it, either as ``Authorization: Bearer <admin token>`` (no API key needed: the token
  is added to the tokens vLLM's AuthenticationMiddleware accepts, so it also passes vLLM's guard; an
  admin may therefore also call the other /v1 routes) or in the header
  ``X-Surgery-Admin-Token: <token>`` beside the API key. Read-only routes do not need it. So the
  inference API key alone cannot change which weights are served.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
from argparse import Namespace
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from .hotswap import HotSwapError, HotSwapper
from .refining import RefineError, Refiner
from .settings import ServingSettings
from .traffic_api import attach_capture, attach_traffic_routes, calibration_source, start_capture

log = logging.getLogger(f"vllm.{__name__}")

PLUGIN_NAME = "vllm_surgery_api"
ENV_ADMIN_TOKEN = "VLLM_SURGERY_ADMIN_TOKEN"
ADMIN_HEADER = "X-Surgery-Admin-Token"
STATE_KEY = "vllm_surgery_hotswapper"
REFINER_KEY = "vllm_surgery_refiner"


def _error(message: str, status: int, err_type: str = "BadRequestError") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": err_type, "code": status}}, status_code=status)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class SurgeryEndpointPlugin:
    """Satisfies vllm.plugins.endpoint_plugins.interface.EndpointPlugin."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self._admin_token = os.environ.get(ENV_ADMIN_TOKEN, "")
        self._admin_digest = _digest(self._admin_token) if self._admin_token else None
        self._app: FastAPI | None = None
        self._capture = None

    def _accept_admin_token_as_bearer(self) -> None:
        """Let vLLM's --api-key guard accept the admin token too, so mutating routes accept it alone.

        vLLM adds its AuthenticationMiddleware after endpoint plugins attach their routes and before
        init_state; its SageMaker bootstrap has already built the middleware stack by then, so the stack
        is rebuilt (the server has not started serving yet).
        """
        if not self._admin_token or self._app is None:
            return
        changed = False
        for m in getattr(self._app, "user_middleware", []):
            tokens = m.kwargs.get("tokens")
            is_auth = getattr(m.cls, "__name__", "") == "AuthenticationMiddleware"
            if is_auth and isinstance(tokens, list) and self._admin_token not in tokens:
                m.kwargs["tokens"] = [*tokens, self._admin_token]
                changed = True
        if changed and getattr(self._app, "middleware_stack", None) is not None:
            self._app.middleware_stack = self._app.build_middleware_stack()

    def _admin_ok(self, request: Request) -> bool:
        if self._admin_digest is None:
            return True
        candidates = [request.headers.get(ADMIN_HEADER, "")]
        scheme, _, param = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            candidates.append(param)
        ok = False
        for c in candidates:
            ok |= bool(c) and secrets.compare_digest(_digest(c), self._admin_digest)
        return ok

    def _guard(
        self, request: Request, action: str | None, key: str = STATE_KEY
    ) -> tuple[Any, JSONResponse | None]:
        """(the HotSwapper or Refiner under `key`, None), or (None, the error to answer with).

        `action` names a mutating route, which needs the admin token when one is configured."""
        if action is not None and not self._admin_ok(request):
            return None, _error(f"{action} needs the admin token ({ADMIN_HEADER})", 403, "Forbidden")
        target = getattr(request.app.state, key, None)
        if target is None:
            return None, _error(
                "hot-swap is not available on this server (no LoRA engine)", 503, "ServiceUnavailable"
            )
        return target, None

    def attach_router(self, app: FastAPI) -> None:
        self._app = app
        router = APIRouter(prefix="/v1/surgery")

        def failed(e: HotSwapError) -> JSONResponse:
            return _error(str(e), int(e.status), e.outcome)

        @router.get("/adapters")
        async def list_adapters(request: Request) -> Any:
            swapper, denied = self._guard(request, None)
            if denied:
                return denied
            out = []
            for name in await _in_thread(swapper.known_names):
                try:
                    out.append(await _in_thread(swapper.describe, name))
                except HotSwapError:
                    continue
            return {"adapters": out}

        @router.get("/adapters/{name}")
        async def get_adapter(name: str, request: Request) -> Any:
            swapper, denied = self._guard(request, None)
            if denied:
                return denied
            try:
                return await _in_thread(swapper.describe, name)
            except HotSwapError as e:
                return failed(e)

        @router.post("/adapters/{name}/swap")
        async def swap(name: str, request: Request) -> Any:
            swapper, denied = self._guard(request, "swap")
            if denied:
                return denied
            try:
                body = await request.json()
            except ValueError:
                return _error('body must be JSON: {"version": ID}', 400)
            version = body.get("version") if isinstance(body, dict) else None
            if not isinstance(version, str) or not version:
                return _error('body must be {"version": ID} with a non-empty string ID', 400)
            try:
                return (await swapper.swap(name, version)).to_dict()
            except HotSwapError as e:
                return failed(e)

        @router.post("/adapters/{name}/rollback")
        async def rollback(name: str, request: Request) -> Any:
            swapper, denied = self._guard(request, "rollback")
            if denied:
                return denied
            try:
                return (await swapper.rollback(name)).to_dict()
            except HotSwapError as e:
                return failed(e)

        @router.post("/adapters/{name}/refine")
        async def refine(name: str, request: Request) -> Any:
            refiner, denied = self._guard(request, "refine", REFINER_KEY)
            if denied:
                return denied
            try:
                body = await request.json()
            except ValueError:
                return _error("body must be a JSON object", 400)
            try:
                return await refiner.refine(name, body)
            except HotSwapError as e:
                return failed(e)
            except RefineError as e:
                status = e.status
                kind = {400: "BadRequestError", 404: "NotFoundError", 409: "Conflict", 422: "Unprocessable"}
                return _error(str(e), status, kind.get(status, "InternalServerError"))

        attach_traffic_routes(router, self._guard)
        app.include_router(router)
        self._capture = attach_capture(app, ServingSettings.from_env())

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        self._accept_admin_token_as_bearer()
        models = getattr(state, "openai_serving_models", None)
        if engine_client is None or models is None or not hasattr(models, "load_lora_adapter"):
            log.warning("%s: no engine or LoRA support; /v1/surgery routes answer 503", PLUGIN_NAME)
            return
        if not getattr(args, "enable_lora", False):
            log.warning("%s: started without --enable-lora; swaps will fail", PLUGIN_NAME)
        settings = ServingSettings.from_env()
        swapper = HotSwapper(models, settings)
        setattr(state, STATE_KEY, swapper)
        await swapper.restore_served_versions()
        refiner = Refiner(swapper, str(args.model))
        setattr(state, REFINER_KEY, refiner)
        recorder = await _in_thread(start_capture, self._capture, engine_client, state, args, settings, swapper)
        refiner.traffic = calibration_source(settings, recorder)


async def _in_thread(fn, *args):
    """describe() and known_names() read the filesystem: keep them off the server's event loop."""
    return await asyncio.to_thread(fn, *args)
