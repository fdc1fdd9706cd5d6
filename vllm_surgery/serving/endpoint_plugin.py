"""The `vllm.endpoint_plugins` entry point `vllm_surgery_api`: the plugin's start-up, in one place.

vLLM builds the plugin (``SurgeryEndpointPlugin()``), calls `attach_router` while it builds the app and
`init_state` once the engine runs. The routes are `vllm_surgery.serving.api` (one module per resource:
adapters, refinements, jobs, feedback, traffic, and vLLM's runtime LoRA routes, guarded). This module
only wires: it builds each object with the collaborators it needs and puts what the routes use on
the app's state.

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
removes what interrupted refinements left in the store, opens the job database (migrations; the jobs'
figures go to /metrics from there), restores served versions (from the served pointer when the
database is a shared Postgres one, and then starts this replica's `follower` of it) and starts the
automatic jobs and the pending swaps (`automatic_jobs`). A job database that cannot be opened leaves serving alone: the
job routes answer 503 and the server log says why.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from argparse import Namespace
from typing import Any

from fastapi import FastAPI

from ..base_model import base_layer_shapes
from ..errors import AdapterError
from ..settings import ServingSettings, SettingsError
from ..storage import Database, DatabaseError, open_database
from ..traffic import AdapterCalibration
from . import vllm_compat
from .api import (
    CANARY_KEY,
    JOBS_KEY,
    REFINER_KEY,
    STATE_KEY,
    TRAFFIC_KEY,
    AdminAccess,
    LoadAdapterRequest,
    RefineRoute,
    RuntimeLoraRoutes,
    UnloadAdapterRequest,
    attach_routes,
    openapi_body,
)
from .auth import AdminGuard
from .automatic_jobs import AutomaticJobs
from .canaries import CanaryController
from .capture import CaptureSwitch, attach_capture, start_capture
from .follower import PointerFollower
from .general_plugin import ENDPOINT_PLUGIN, RESOLVER_NAME
from .hotswap import HotSwapper
from .launcher import ONE_API_SERVER
from .metrics import register_jobs_collector
from .resolver import SurgeryResolver
from .validation import ServingLimits

log = logging.getLogger(f"vllm.{__name__}")

PLUGIN_NAME = ENDPOINT_PLUGIN
__all__ = ["PLUGIN_NAME", "SurgeryEndpointPlugin"]


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


class SurgeryEndpointPlugin:
    """Satisfies vllm.plugins.endpoint_plugins.interface.EndpointPlugin."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def __init__(self) -> None:
        # vLLM logs and skips a plugin whose constructor raises, which would leave its own runtime LoRA
        # routes unguarded: never raise here; broken settings fail closed (every mutation refused) and
        # stop the server in init_state.
        self.settings_error: SettingsError | None = None
        try:
            self.settings = ServingSettings.from_env()
        except SettingsError as e:
            self.settings_error = e
            self.settings = ServingSettings(allow_unauthenticated_admin=False)
        self.guard = AdminGuard(self.settings)
        self.app: FastAPI | None = None
        self.capture: CaptureSwitch | None = None
        self.runtime_routes: RuntimeLoraRoutes | None = None
        self.automatic_jobs: AutomaticJobs | None = None
        self.follower: PointerFollower | None = None
        self.canaries: CanaryController | None = None

    def attach_router(self, app: FastAPI) -> None:
        self.app = app
        attach_routes(app, AdminAccess(self.guard, self.settings_error))
        if vllm_compat.runtime_lora_updating():
            # Same path and method as vLLM's: these replace its unguarded runtime LoRA routes.
            routes = RuntimeLoraRoutes(
                self.guard, lambda request: getattr(request.app.state, STATE_KEY, None)
            )
            self.runtime_routes = routes
            app.add_api_route(
                vllm_compat.RUNTIME_LOAD_PATH,
                routes.load,
                methods=["POST"],
                openapi_extra=openapi_body(LoadAdapterRequest),
            )
            app.add_api_route(
                vllm_compat.RUNTIME_UNLOAD_PATH,
                routes.unload,
                methods=["POST"],
                openapi_extra=openapi_body(UnloadAdapterRequest),
            )
        self.capture = attach_capture(app, self.settings)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        if self.settings_error is not None:
            raise self.settings_error
        count = vllm_compat.api_server_count(args)
        if count > 1:
            raise RuntimeError(ONE_API_SERVER.format(version=vllm_compat.vllm_version(), count=count))
        self.guard.log_startup()
        if self.app is not None and self.runtime_routes is not None:
            # The SageMaker bootstrap mounted its adapter routes after attach_router: switch them off.
            closed = vllm_compat.replace_routes(
                self.app, vllm_compat.sagemaker_adapter_routes(), self.runtime_routes.switched_off
            )
            if closed:
                log.info("vllm-surgery: switched off %s (unguarded adapter routes)", ", ".join(closed))
        if self.settings.admin_token and self.app is not None:
            vllm_compat.accept_bearer_token(self.app, self.settings.admin_token)
        models = vllm_compat.serving_models(state)
        if engine_client is None or models is None:
            log.warning("%s: no engine or LoRA support; /v1/surgery routes answer 503", PLUGIN_NAME)
            return
        await asyncio.to_thread(vllm_compat.self_check, models)  # imports and parses: off the loop
        vllm_compat.install_public_names(models)  # clients see NAME, never a version's NAME@ID
        if not getattr(args, "enable_lora", False):
            log.warning("%s: started without --enable-lora; swaps will fail", PLUGIN_NAME)
        base_model = str(args.model)
        limits = await asyncio.to_thread(server_limits, args, engine_client)
        # The resolver the general plugin registered, so that resolution and swaps share one validator
        # (limits and cached verdicts); a private one where it is not registered.
        registered = vllm_compat.registered_resolver(RESOLVER_NAME)
        resolver = registered if isinstance(registered, SurgeryResolver) else SurgeryResolver(self.settings)
        resolver.configure(limits)
        log.info(
            "vllm-surgery: adapters must fit %s (max rank %s, dtype %s)",
            base_model,
            limits.max_rank,
            limits.dtype,
        )
        swapper = await asyncio.to_thread(HotSwapper, models, self.settings, resolver)  # stats paths
        removed = await asyncio.to_thread(swapper.store.remove_leftovers)
        if removed:
            log.warning(
                "vllm-surgery: removed %d leftover(s) of interrupted writes from the store", len(removed)
            )
        setattr(state, STATE_KEY, swapper)
        db = await asyncio.to_thread(self._open_job_database)
        if db is not None and resolver.shared_pointer:
            resolver.pointers = db  # before anything is served: the resolver reads the served pointer
        await swapper.restore_served_versions()
        if db is not None and resolver.shared_pointer:
            self._follow_pointers(swapper, db, args)

        recorder = await asyncio.to_thread(
            start_capture, self.capture, engine_client, state, args, self.settings, swapper.version_of
        )
        if recorder is not None:
            setattr(state, TRAFFIC_KEY, recorder)
        if db is not None:
            await self._serve_canaries(swapper, db, state, engine_client)
        calibration = AdapterCalibration(self.settings, db, recorder)
        setattr(state, REFINER_KEY, RefineRoute(swapper, base_model, db, calibration))
        if db is None:
            return
        setattr(state, JOBS_KEY, db)
        register_jobs_collector(db)
        automatic = AutomaticJobs(swapper, db, base_model, calibration)
        automatic.canaries = self.canaries
        resolver.call_when_original_served(automatic.first_load_soon)
        await asyncio.to_thread(automatic.first_load_of_startup_adapters)
        self.automatic_jobs = automatic
        automatic.start()
        log.info(
            "vllm-surgery: job queue in %s (automatic refinement %s; checks every %g s)",
            db.path,
            "on" if self.settings.auto_refine else "off",
            self.settings.refine_check_interval_s,
        )

    async def _serve_canaries(
        self, swapper: HotSwapper, db: Database, state: Any, engine_client: Any
    ) -> None:
        """Route requests between an adapter's current and canary versions (`canaries`): the handlers
        note each request's sticky key, generate is routed outside the traffic observer (installed
        before, so capture records the version that ran); then the canaries running in the database
        are loaded and the periodic check starts."""
        canaries = CanaryController(swapper, db)
        canaries.rule()  # the rule's own checks of the canary settings: a bad one stops the start (SettingsError)
        vllm_compat.around_request_handlers(state, canaries.around)
        for client in vllm_compat.serving_engine_clients(state) or [engine_client]:
            vllm_compat.route_generate(client, canaries.choose)
        setattr(state, CANARY_KEY, canaries)
        try:
            await canaries.sync()
        except DatabaseError as e:
            log.error("vllm-surgery: running canaries cannot be read now (tried again every poll): %s", e)
        canaries.start_checks()
        if self.follower is not None:
            self.follower.canaries = canaries
        self.canaries = canaries

    def _follow_pointers(self, swapper: HotSwapper, db: Database, args: Namespace) -> PointerFollower:
        """Start this replica's follower of the shared served pointer (`follower`); stopped at shutdown."""
        replica_id = (
            self.settings.replica_id or f"{socket.gethostname()}:{getattr(args, 'port', None) or 8000}"
        )
        follower = PointerFollower(
            swapper, db, replica_id, self.settings.pointer_poll_s, asyncio.get_running_loop()
        )
        follower.start()
        if self.app is not None:
            vllm_compat.on_shutdown(self.app, follower.stop)
        log.info(
            "vllm-surgery: replica %s follows the served pointer in %s (LISTEN, and a poll every %g s)",
            replica_id,
            db.path,
            self.settings.pointer_poll_s,
        )
        self.follower = follower
        return follower

    def _open_job_database(self) -> Database | None:
        """The job database (blocking: migrations), or None, logged, when it cannot be used: serving
        does not depend on it, only the job routes, automatic jobs and pending swaps do."""
        try:
            db = open_database(self.settings.database_path)
        except DatabaseError as e:
            log.error("vllm-surgery: refinement jobs are unavailable (the job routes answer 503): %s", e)
            return None
        if self.app is not None:
            vllm_compat.on_shutdown(self.app, db.close)
        return db
