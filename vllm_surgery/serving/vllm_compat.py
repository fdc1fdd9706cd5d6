"""Every access of the plugin to vLLM (and its web stack) beyond the documented plugin interfaces, in
one module, so that a vLLM upgrade is checked here and nowhere else. Tested against vLLM 0.32.

Each function names what it relies on. When a vLLM release changes one of these, the function fails
loudly (or returns "not available") instead of the plugin misbehaving quietly.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from typing import Any

# ----------------------------------------------------------------------------- traffic capture
_OBSERVED = "_vllm_surgery_observed_generate"


def serving_engine_clients(state: Any) -> list[Any]:
    """The engine clients whose `generate` the completion and chat handlers call
    (`state.openai_serving_completion.engine_client`, `state.openai_serving_chat.engine_client`:
    attributes of vLLM's serving classes, set in init_app_state)."""
    out: list[Any] = []
    for attr in ("openai_serving_completion", "openai_serving_chat"):
        serving = getattr(state, attr, None)
        client = getattr(serving, "engine_client", None)
        if client is not None and all(client is not c for c in out):
            out.append(client)
    return out


def observe_generate(engine_client: Any, observer: Callable[..., Any]) -> bool:
    """Route `engine_client.generate(...)` through `observer(original, *args, **kwargs)`, which must
    return what `original(*args, **kwargs)` returns (an async generator of RequestOutput) or a wrapper
    of it. Relies on EngineClient.generate's documented signature (vllm/engine/protocol.py: prompt,
    sampling_params, request_id, keyword-only lora_request, ...) and on the handlers calling it as an
    attribute of the client object. Idempotent; returns False if it was already observed."""
    if getattr(engine_client, _OBSERVED, False):
        return False
    original = engine_client.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        return observer(original, *args, **kwargs)

    engine_client.generate = generate  # instance attribute: shadows the class's method
    setattr(engine_client, _OBSERVED, True)
    return True


def lora_path(lora_request: Any) -> str | None:
    """The adapter directory a LoRARequest loads (`LoRARequest.lora_path`)."""
    return getattr(lora_request, "lora_path", None)


def outputs_are_deltas(sampling_params: Any) -> bool:
    """Whether each RequestOutput carries only new tokens (RequestOutputKind.DELTA, what the streaming
    handlers ask for) rather than everything so far (CUMULATIVE, FINAL_ONLY)."""
    from vllm.sampling_params import RequestOutputKind

    return getattr(sampling_params, "output_kind", None) == RequestOutputKind.DELTA


def request_id_headers_enabled(args: Any) -> bool:
    """`--enable-request-id-headers`: vLLM's own XRequestIdMiddleware then returns X-Request-Id."""
    return bool(getattr(args, "enable_request_id_headers", False))


def rust_frontend_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """VLLM_USE_RUST_FRONTEND=1 serves HTTP from a Rust binary (vllm/envs.py, entrypoints/cli/serve.py):
    no Python route, middleware or endpoint plugin sees the requests, so nothing can be recorded."""
    env = os.environ if environ is None else environ
    value = env.get("VLLM_USE_RUST_FRONTEND", "0").strip() or "0"
    try:
        return bool(int(value))
    except ValueError:
        return value.lower() in ("true", "yes", "on")


def rust_frontend_conflict(environ: Mapping[str, str] | None = None) -> str | None:
    """Why this server cannot record the traffic its settings ask for, or None. Checked by the launcher
    before vLLM starts (importing nothing that registers metrics: a server with the plugins disabled
    must stay free of them)."""
    from .settings import ServingSettings

    if rust_frontend_enabled(environ) and ServingSettings.from_env(environ).records_traffic:
        return (
            "traffic recording is on (VLLM_SURGERY_TRAFFIC / VLLM_SURGERY_TRAFFIC_ADAPTERS) but "
            "VLLM_USE_RUST_FRONTEND=1 serves HTTP from vLLM's Rust frontend, which no plugin can observe; "
            "unset VLLM_USE_RUST_FRONTEND or turn traffic recording off"
        )
    return None


# ----------------------------------------------------------------------------- the web app
def add_asgi_middleware(app: Any, middleware: type, **kwargs: Any) -> None:
    """Add a pure-ASGI middleware. Called from an endpoint plugin's attach_router, which vLLM runs
    before its own middleware (CORS, --api-key authentication, X-Request-Id) is added: Starlette puts
    later additions outside, so this one runs after authentication, next to the routes."""
    app.add_middleware(middleware, **kwargs)


def on_shutdown(app: Any, callback: Callable[[], Any]) -> None:
    """Run `callback` (blocking; run in a thread) when the app's lifespan ends, by wrapping the app's
    lifespan context (FastAPI(lifespan=...) in vllm/entrypoints/launchers/app.py; Starlette ignores
    on_shutdown handlers when a lifespan is given). On SIGTERM vLLM 0.32 drains or aborts the engine,
    then lets uvicorn shut down, which ends the lifespan ("Waiting for application shutdown" in the
    log) while the event loop still runs. vLLM also cancels the server task right after asking it to
    exit, which could skip the lifespan's end: callers register the callback with atexit as well."""
    import asyncio

    router = app.router
    original = router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: Any):
        async with original(a) as state:
            try:
                yield state
            finally:
                await asyncio.to_thread(callback)

    router.lifespan_context = lifespan
