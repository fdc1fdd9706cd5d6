"""The `vllm.endpoint_plugins` entry point `vllm_surgery_api`: adapter version routes under /v1/surgery/.

Routes (JSON):

- ``GET  /v1/surgery/adapters``                 every known adapter (name, served path/version, versions
  with ``servable`` and, when false, the ``reason``: the same check a swap makes)
- ``GET  /v1/surgery/adapters/{name}``          one adapter
- ``POST /v1/surgery/adapters/{name}/swap``     body ``{"version": ID}``; ID is a store version id or
  ``"original"``; hot-swaps without a restart (see `hotswap`)
- ``POST /v1/surgery/adapters/{name}/rollback`` back to the version served before the last swap
- ``POST /v1/surgery/adapters/{name}/refine``   a store hit answers 200 at once; otherwise the request
  is queued as a job (202 with its id) that a `vllm-surgery worker` runs (see `refining` for the body
  and the statuses, `worker` for the worker)
- ``GET  /v1/surgery/jobs``                     jobs, newest first (query: adapter, state, limit,
  before_id); ``GET /v1/surgery/jobs/{id}``: one job (state, attempts, timings, decision and figures)
- vLLM's ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` are replaced by guarded
  versions, and the SageMaker ``/adapters`` routes switched off (see `runtime_lora`).
- ``POST /v1/surgery/feedback``, ``GET /v1/surgery/traffic[/{name}]``: recorded traffic and its
  feedback (see `traffic_api`; recording itself is `capture` and `traffic`)

Every bad request answers 4xx with ``{"error": {"message", "type", "code"}}``, never a 500 or a
traceback: 400 (bad name, or a body that is not JSON, nested too deeply, of the wrong types or with
unknown fields), 403 (no admin token), 404 (unknown adapter or version), 409 (stale, unservable by
decision, nothing to roll back to, no usable traffic to refine from), 413 (body too large: refused before it is read whole), 422
(the version cannot be served here: corrupt, NaN, rank above --max-lora-rank, shapes that do not fit
the base model, weights that overflow the serving dtype; the old version keeps serving). 500 only when
the engine itself refuses a load that passed every check (the old version keeps serving); 503 when the
job database cannot be used (refine and the job routes only).

Enabling: vLLM loads endpoint plugins only when ``VLLM_PLUGINS`` names them (`vllm-surgery-serve` adds
this one when VLLM_PLUGINS is unset, see `launcher`).

Authentication:

- ``--api-key`` / ``VLLM_API_KEY``: vLLM's own AuthenticationMiddleware guards every path under /v1,
  so all routes here need ``Authorization: Bearer <api key>`` exactly like /v1/completions (401
  otherwise). It runs before these routes and cannot be bypassed by them.
- The admin token (see `auth`): every route that changes what is served needs it, as
  ``Authorization: Bearer <admin token>`` (no API key needed: the token is added to the tokens vLLM's
  AuthenticationMiddleware accepts, so an admin may also call the other /v1 routes) or as
  ``X-Surgery-Admin-Token: <token>`` beside the API key. Without a configured admin token these routes
  answer 403 unless the operator opted in. Read-only routes do not need it.

Start-up (init_state) checks the vLLM internals the plugin uses (`vllm_compat.self_check`), refuses
more than one API-server process, reads the engine's limits (max rank, dtype, base-model shapes),
removes what interrupted refinements left in the store, restores served versions, opens the job
database (migrations; the jobs' figures go to /metrics from there) and starts the automatic jobs and
the pending swaps (`autorefine`). A job database that cannot be opened leaves serving alone: the job
routes answer 503 and the server log says why.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from argparse import Namespace
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from ..base_model import base_layer_shapes
from ..errors import AdapterError
from . import vllm_compat
from .auth import ADMIN_HEADER, AdminGuard
from .autorefine import AutoRefiner
from .database import DatabaseError, SQLiteDatabase
from .hotswap import HotSwapError, HotSwapper
from .http import LARGE_BODY_BYTES, BodyError, error_response, json_object_body
from .job_queue import JOB_STATES
from .jobs import describe_job
from .launcher import ONE_API_SERVER
from .metrics import register_jobs_collector
from .names import validate_adapter_name
from .plugin import RESOLVER_NAME
from .refining import BODY_FIELDS, RefineError, RefineQueue
from .resolver import SurgeryResolver
from .settings import ServingSettings, SettingsError
from .traffic_api import attach_capture, attach_traffic_routes, calibration_source, start_capture
from .validation import ServingLimits

log = logging.getLogger(f"vllm.{__name__}")

PLUGIN_NAME = "vllm_surgery_api"
STATE_KEY = "vllm_surgery_hotswapper"
REFINER_KEY = "vllm_surgery_refiner"
JOBS_KEY = "vllm_surgery_jobs"
MAX_JOBS_PER_PAGE = 500
SWAP_FIELDS = ("version",)
__all__ = ["ADMIN_HEADER", "JOBS_KEY", "PLUGIN_NAME", "REFINER_KEY", "STATE_KEY", "SurgeryEndpointPlugin"]


def server_limits(args: Namespace, engine_client: Any) -> ServingLimits:
    """The engine's limits for adapters (blocking: reads the base model's configuration)."""
    shapes = None
    try:
        shapes = base_layer_shapes(args.model)
    except AdapterError as e:
        log.error("vllm-surgery: adapter shapes cannot be checked against the base model: %s", e)
    rank = getattr(args, "max_lora_rank", None)
    return ServingLimits(
        max_rank=int(rank) if rank is not None else None,
        dtype=vllm_compat.serving_dtype(engine_client),
        shapes=shapes,
    )


def _failed(e: HotSwapError) -> JSONResponse:
    return error_response(str(e), int(e.status), e.outcome)


Handler = Callable[..., Awaitable[Any]]


def _answer_4xx(handler: Handler) -> Handler:
    """Map the errors a route can meet to answers: BodyError (400/413), HotSwapError, RefineError; any
    other error of the request's content (ValueError, TypeError, OverflowError, RecursionError) is a
    400 with its message; nothing escapes as a bare 500 with a traceback."""

    @functools.wraps(handler)  # FastAPI reads the parameters from the wrapped signature
    async def route(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except BodyError as e:
            return error_response(str(e), e.status)
        except HotSwapError as e:
            return _failed(e)
        except RefineError as e:
            return error_response(str(e), e.status)
        except (ValueError, TypeError, OverflowError, RecursionError) as e:
            log.warning("request refused: %s: %s", type(e).__name__, e)
            return error_response(f"bad request: {type(e).__name__}: {e}", 400)

    return route


class SurgeryEndpointPlugin:
    """Satisfies vllm.plugins.endpoint_plugins.interface.EndpointPlugin."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def __init__(self) -> None:
        # vLLM logs and skips a plugin whose constructor raises, which would leave its own runtime LoRA
        # routes unguarded: never raise here; broken settings fail closed (every mutation refused) and
        # stop the server in init_state.
        self._settings_error: SettingsError | None = None
        try:
            self.settings = ServingSettings.from_env()
        except SettingsError as e:
            self._settings_error = e
            self.settings = ServingSettings(allow_unauthenticated_admin=False)
        self.guard = AdminGuard(self.settings)
        self._app: FastAPI | None = None
        self._capture = None

    def _guard(self, request: Request, action: str | None, key: str = STATE_KEY) -> Any:
        """The HotSwapper or Refiner under `key`; raises HotSwapError (403/503) to answer instead.

        `action` names a mutating route, which needs the admin token (see `auth`)."""
        if action is not None:
            reason = self.guard.refusal(request, action)
            if self._settings_error is not None:
                reason = f"{action} is refused: the server's settings are broken ({self._settings_error})"
            if reason is not None:
                raise HotSwapError(reason, 403, "Forbidden")
        target = getattr(request.app.state, key, None)
        if target is None:
            raise HotSwapError(
                "hot-swap is not available on this server (no LoRA engine)", 503, "ServiceUnavailable"
            )
        return target

    def _guard_answer(self, request: Request, action: str | None, key: str) -> tuple[Any, JSONResponse | None]:
        """`_guard` as (target, None) or (None, the error answer), for routes that answer errors themselves."""
        try:
            return self._guard(request, action, key), None
        except HotSwapError as e:
            return None, _failed(e)

    def attach_router(self, app: FastAPI) -> None:
        self._app = app
        router = APIRouter(prefix="/v1/surgery")

        @router.get("/adapters")
        @_answer_4xx
        async def list_adapters(request: Request) -> Any:
            swapper = self._guard(request, None)
            return {"adapters": await asyncio.to_thread(_describe_all, swapper)}

        @router.get("/adapters/{name}")
        @_answer_4xx
        async def get_adapter(name: str, request: Request) -> Any:
            swapper = self._guard(request, None)
            return await asyncio.to_thread(swapper.describe, name)

        @router.post("/adapters/{name}/swap")
        @_answer_4xx
        async def swap(name: str, request: Request) -> Any:
            swapper = self._guard(request, "swap")
            body = await json_object_body(request, allowed=SWAP_FIELDS, example='{"version": "original"}')
            version = body.get("version")
            if not isinstance(version, str) or not version:
                raise BodyError('body must be {"version": ID} with a non-empty string ID')
            return (await swapper.swap(name, version)).to_dict()

        @router.post("/adapters/{name}/rollback")
        @_answer_4xx
        async def rollback(name: str, request: Request) -> Any:
            swapper = self._guard(request, "rollback")
            return (await swapper.rollback(name)).to_dict()

        @router.post("/adapters/{name}/refine")
        @_answer_4xx
        async def refine(name: str, request: Request) -> Any:
            refiner = self._guard(request, "refine", REFINER_KEY)
            body = await json_object_body(
                request, LARGE_BODY_BYTES, allowed=BODY_FIELDS, example='{"records": [...]}'
            )
            status, answer = await refiner.refine(name, body)
            headers = {"Location": answer["location"]} if "location" in answer else None
            return JSONResponse(answer, status_code=int(status), headers=headers)

        @router.get("/jobs")
        @_answer_4xx
        async def list_jobs(request: Request) -> Any:
            db = _job_database(request)
            q = request.query_params
            adapter, state = q.get("adapter"), q.get("state")
            if adapter is not None:
                validate_adapter_name(adapter)
            if state is not None and state not in JOB_STATES:
                raise BodyError(f"'state' must be one of {list(JOB_STATES)}, got {state!r}")
            limit = int(q.get("limit", "100"))
            before = int(q["before_id"]) if "before_id" in q else None
            if not 1 <= limit <= MAX_JOBS_PER_PAGE:
                raise BodyError(f"'limit' must be in [1, {MAX_JOBS_PER_PAGE}]")
            jobs = await asyncio.to_thread(db.jobs, adapter, state, limit, before)
            return {
                "jobs": [describe_job(j) for j in jobs],
                "next_before_id": jobs[-1].id if len(jobs) == limit else None,
            }

        @router.get("/jobs/{job_id}")
        @_answer_4xx
        async def get_job(job_id: str, request: Request) -> Any:
            db = _job_database(request)
            if not job_id.isdigit() or len(job_id) > 18:
                raise BodyError(f"job id must be a positive integer, got {job_id!r}")
            job = await asyncio.to_thread(db.job, int(job_id))
            if job is None:
                raise BodyError(f"no job {job_id}", 404)
            return describe_job(job)

        attach_traffic_routes(router, self._guard_answer)
        app.include_router(router)
        if vllm_compat.runtime_lora_updating():
            # Same path and method as vLLM's: these replace its unguarded runtime LoRA routes.
            from .runtime_lora import RuntimeLoraRoutes

            routes = RuntimeLoraRoutes(
                self.guard, lambda request: getattr(request.app.state, STATE_KEY, None)
            )
            self._runtime_routes = routes
            app.add_api_route(vllm_compat.RUNTIME_LOAD_PATH, routes.load, methods=["POST"])
            app.add_api_route(vllm_compat.RUNTIME_UNLOAD_PATH, routes.unload, methods=["POST"])
        self._capture = attach_capture(app, self.settings)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        if self._settings_error is not None:
            raise self._settings_error
        count = vllm_compat.api_server_count(args)
        if count > 1:
            raise RuntimeError(ONE_API_SERVER.format(version=vllm_compat.vllm_version(), count=count))
        self.guard.log_startup()
        if self._app is not None and hasattr(self, "_runtime_routes"):
            # The SageMaker bootstrap mounted its adapter routes after attach_router: switch them off.
            closed = vllm_compat.replace_routes(
                self._app, vllm_compat.sagemaker_adapter_routes(), self._runtime_routes.switched_off
            )
            if closed:
                log.info("vllm-surgery: switched off %s (unguarded adapter routes)", ", ".join(closed))
        if self.settings.admin_token and self._app is not None:
            vllm_compat.accept_bearer_token(self._app, self.settings.admin_token)
        models = vllm_compat.serving_models(state)
        if engine_client is None or models is None:
            log.warning("%s: no engine or LoRA support; /v1/surgery routes answer 503", PLUGIN_NAME)
            return
        await asyncio.to_thread(vllm_compat.self_check, models)  # imports and parses: off the loop
        if not getattr(args, "enable_lora", False):
            log.warning("%s: started without --enable-lora; swaps will fail", PLUGIN_NAME)
        limits = await asyncio.to_thread(server_limits, args, engine_client)
        registered = vllm_compat.registered_resolver(RESOLVER_NAME)
        resolver = registered if isinstance(registered, SurgeryResolver) else None
        swapper = await asyncio.to_thread(HotSwapper, models, self.settings, resolver)  # stats paths
        swapper.resolver.configure(limits)
        log.info(
            "vllm-surgery: adapters must fit %s (max rank %s, dtype %s)",
            args.model,
            limits.max_rank,
            limits.dtype,
        )
        removed = await asyncio.to_thread(swapper.store.remove_leftovers)
        if removed:
            log.warning(
                "vllm-surgery: removed %d leftover(s) of interrupted writes from the store", len(removed)
            )
        setattr(state, STATE_KEY, swapper)
        await swapper.restore_served_versions()
        refiner = RefineQueue(swapper, str(args.model))
        setattr(state, REFINER_KEY, refiner)
        recorder = await asyncio.to_thread(
            start_capture, self._capture, engine_client, state, args, self.settings, swapper
        )
        db = await asyncio.to_thread(self._open_job_database)
        refiner.db = db
        refiner.traffic = calibration_source(self.settings, recorder, db)
        if db is None:
            return
        setattr(state, JOBS_KEY, db)
        register_jobs_collector(db)
        auto = AutoRefiner(swapper, db, str(args.model), refiner.traffic, recorder.policy if recorder else None)
        swapper.resolver.on_original_served = auto.first_load_soon
        await asyncio.to_thread(_first_load_of_startup_adapters, swapper, auto)
        self._auto_refiner = auto
        auto.start()
        log.info(
            "vllm-surgery: job queue in %s (automatic refinement %s; checks every %g s)",
            db.path, "on" if self.settings.auto_refine else "off", self.settings.refine_check_interval_s,
        )  # fmt: skip

    def _open_job_database(self) -> SQLiteDatabase | None:
        """The job database (blocking: migrations), or None, logged, when it cannot be used: serving
        does not depend on it, only the job routes, automatic jobs and pending swaps do."""
        try:
            db = SQLiteDatabase(self.settings.database_path)
        except DatabaseError as e:
            log.error("vllm-surgery: refinement jobs are unavailable (the job routes answer 503): %s", e)
            return None
        if self._app is not None:
            vllm_compat.on_shutdown(self._app, db.close)
        return db


def _job_database(request: Request) -> Any:
    """The server's job database; raises HotSwapError (503) when it is not available."""
    db = getattr(request.app.state, JOBS_KEY, None)
    if db is None:
        raise HotSwapError(
            "refinement jobs are not available on this server (no job database; see the server log)",
            503,
            "ServiceUnavailable",
        )
    return db


def _first_load_of_startup_adapters(swapper: HotSwapper, auto: AutoRefiner) -> None:
    """--lora-modules adapters are never resolved: they get their first-load check at start."""
    for name, original in swapper.startup.items():
        try:
            adapter_hash = swapper.validator.validate(original)
            if swapper.store.served(name, adapter_hash) is None:
                auto.first_load_soon(name, original, adapter_hash)
        except (AdapterError, OSError, ValueError) as e:
            log.warning("adapter %r: no first-load check: %s", name, e)


def _describe_all(swapper: HotSwapper) -> list[dict[str, Any]]:
    """Blocking (reads the roots and the store): every known adapter, described."""
    out = []
    for name in swapper.known_names():
        try:
            out.append(swapper.describe(name))
        except HotSwapError:
            continue
    return out
