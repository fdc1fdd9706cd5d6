"""The plugin's HTTP routes, one module per resource, in the style of vLLM's own
(``vllm/entrypoints/serve/*/api_router.py``): a module-level router whose handlers find the
server's objects on ``request.app.state`` (`state`), with typed request bodies (`http.RequestBody`).

- `adapters`: ``GET /v1/surgery/adapters[/{name}]``, ``POST .../{name}/swap``, ``POST .../{name}/rollback``
- `canary`: ``POST /v1/surgery/adapters/{name}/canary`` (start), ``.../canary/share``,
  ``.../canary/promote``, ``.../canary/abort``
- `refinements`: ``POST /v1/surgery/adapters/{name}/refine`` (answered from the store, or a job)
- `jobs`: ``GET /v1/surgery/jobs[/{id}]``
- `feedback`: ``POST /v1/surgery/feedback``
- `traffic`: ``GET /v1/surgery/traffic[/{name}]``
- `runtime_lora`: vLLM's ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, guarded, and
  the SageMaker adapter routes switched off

Every bad request answers 4xx with ``{"error": {"message", "type", "code"}}``, never a 500 or a
traceback: 400 (bad name, or a body that is not JSON, nested too deeply, of the wrong types or with
unknown fields), 403 (no admin token), 404 (unknown adapter or version), 409 (stale, unservable by
decision, nothing to roll back to, no usable traffic to refine from), 413 (body too large: refused
before it is read whole), 422 (the version cannot be served here: corrupt, NaN, rank above
--max-lora-rank, shapes that do not fit the base model, weights that overflow the serving dtype; the
old version keeps serving). 500 only when the engine itself refuses a load that passed every check
(the old version keeps serving); 503 when what a route needs is not available on this server (no
LoRA engine, no job database, traffic recording off).

This module is the package's front door: the endpoint plugin attaches the routes with
`attach_routes` and fills the state under the keys re-exported here.
"""

from __future__ import annotations

from fastapi import FastAPI

from . import adapters, canary, feedback, jobs, refinements, traffic
from .http import openapi_body
from .refinements import RefineRoute
from .runtime_lora import LoadAdapterRequest, RuntimeLoraRoutes, UnloadAdapterRequest
from .state import ACCESS_KEY, CANARY_KEY, JOBS_KEY, REFINER_KEY, STATE_KEY, TRAFFIC_KEY, AdminAccess

ROUTERS = (adapters.router, canary.router, refinements.router, jobs.router, feedback.router, traffic.router)

__all__ = [
    "ACCESS_KEY",
    "CANARY_KEY",
    "JOBS_KEY",
    "REFINER_KEY",
    "ROUTERS",
    "STATE_KEY",
    "TRAFFIC_KEY",
    "AdminAccess",
    "LoadAdapterRequest",
    "RefineRoute",
    "RuntimeLoraRoutes",
    "UnloadAdapterRequest",
    "attach_routes",
    "openapi_body",
]


def attach_routes(app: FastAPI, access: AdminAccess) -> None:
    """Add every /v1/surgery route to `app`; `access` decides who may change what is served."""
    setattr(app.state, ACCESS_KEY, access)
    for router in ROUTERS:
        app.include_router(router)
