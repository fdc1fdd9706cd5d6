"""Every access to vLLM's internals, in one place, each behind a typed function.

The plugin relies on parts of vLLM 0.32 that are not a stable API: attributes of the API server's
`OpenAIServingModels` (the name -> LoRARequest mapping, the per-name lock, the id counter, the engine
client's `add_lora`), the tokens of vLLM's AuthenticationMiddleware, the `vllm serve` CLI entry and
its argument parser, the runtime LoRA routes and the SageMaker adapter routes vLLM registers. When a
vLLM upgrade moves one of them, the plugin must stop at start-up naming the vLLM version and the
missing piece, instead of failing on the first swap or, worse, leaving a route unguarded:
`self_check()` (run by the general plugin's `register()` for the resolver's pieces and by the
endpoint plugin's `init_state` for everything, on the live objects) does that, and a fast test runs
it against the installed vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import re
import sys
from argparse import Namespace
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

__all__ = ["LoRARequest", "LoRAResolver", "VllmCompatError", "vllm_version"]

# vLLM's runtime adapter routes (entrypoints/serve/lora/api_router.py), registered only when
# VLLM_ALLOW_RUNTIME_LORA_UPDATING is on. An endpoint plugin's route with the same path and method
# replaces vLLM's (plugins/endpoint_plugins/interface.py: attach_endpoint_plugins).
RUNTIME_LOAD_PATH = "/v1/load_lora_adapter"
RUNTIME_UNLOAD_PATH = "/v1/unload_lora_adapter"
RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
RUST_FRONTEND_ENV = "VLLM_USE_RUST_FRONTEND"
TESTED_VERSIONS = "0.32"


class VllmCompatError(RuntimeError):
    """A piece of vLLM the plugin relies on is missing or changed; the message names it and the version."""


def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def _missing(piece: str, detail: str) -> VllmCompatError:
    return VllmCompatError(
        f"vllm-surgery cannot run on vLLM {vllm_version()}: {piece} {detail} (the plugin was written "
        f"against vLLM {TESTED_VERSIONS}; pin that version or update vllm_surgery/serving/vllm_compat.py)"
    )


# --------------------------------------------------------------------------- LoRA requests, resolvers
def lora_request(name: str, path: str, lora_int_id: int = 1) -> LoRARequest:
    """A LoRARequest that is never an in-place load (vLLM 0.32 re-reads such an adapter on every step)."""
    return LoRARequest(lora_name=name, lora_int_id=lora_int_id, lora_path=path, load_inplace=False)


# A hot-swapped version's LoRARequest is named NAME@ID inside the engine ('@' is never in an adapter
# name, see vllm_surgery.names). vLLM 0.32 compares and hashes LoRARequests by lora_name alone: the
# worker builds the batch's set of adapters to activate from them, so two versions of one name in a
# batch (a response still running on the old one, a new request on the new one) collapse into one,
# the other is not activated, and the step fails (KeyError in punica's convert_mapping: the engine
# dies). Its prefix cache also keys blocks on lora_name, so a new version could reuse KV blocks the
# old one computed. A name per version avoids both; clients still see NAME (`install_public_names`).
VERSION_SEPARATOR = "@"
_ENGINE_NAME = re.compile(rf"^(?P<name>.+){VERSION_SEPARATOR}(?P<id>[0-9]+)$")


def version_lora_request(name: str, path: str, lora_int_id: int) -> LoRARequest:
    """The LoRARequest of one version of `name`: named NAME@ID in the engine (see VERSION_SEPARATOR)."""
    return lora_request(f"{name}{VERSION_SEPARATOR}{lora_int_id}", path, lora_int_id)


def public_name(request: LoRARequest) -> str:
    """The name clients use for `request`: NAME for a version's NAME@ID, the lora_name otherwise."""
    found = _ENGINE_NAME.match(request.lora_name)
    if found and int(found["id"]) == request.lora_int_id:
        return found["name"]
    return request.lora_name


def install_public_names(models: Any) -> None:
    """Make the responses' `model` field and GET /v1/models show NAME, never a version's NAME@ID:
    wraps this OpenAIServingModels' model_name() (every OpenAI route's response names its model
    with it) and show_available_models()."""
    model_name = models.model_name
    show = models.show_available_models

    def public_model_name(lora_request: LoRARequest | None = None) -> str:
        return public_name(lora_request) if lora_request is not None else model_name(lora_request)

    async def public_models() -> Any:
        listing = await show()
        engine_names = {r.lora_name: public_name(r) for r in served_requests(models).values()}
        for card in listing.data:
            card.id = engine_names.get(card.id, card.id)
        return listing

    models.model_name = public_model_name
    models.show_available_models = public_models


def register_resolver(name: str, resolver: LoRAResolver) -> bool:
    """Register `resolver` under `name` unless one is; True if it was registered now."""
    if name in LoRAResolverRegistry.get_supported_resolvers():
        return False
    LoRAResolverRegistry.register_resolver(name, resolver)
    return True


def registered_resolver(name: str) -> LoRAResolver | None:
    if name not in LoRAResolverRegistry.get_supported_resolvers():
        return None
    return LoRAResolverRegistry.get_resolver(name)


# --------------------------------------------------------------------------- the API server's models
# `models` below is vLLM's OpenAIServingModels (`app.state.openai_serving_models`).
def serving_models(state: Any) -> Any | None:
    """The API server's OpenAIServingModels, or None where the server has no LoRA support."""
    models = getattr(state, "openai_serving_models", None)
    return models if models is not None and hasattr(models, "lora_requests") else None


def served_requests(models: Any) -> MutableMapping[str, LoRARequest]:
    """The name -> LoRARequest mapping every request for a name uses (replace an entry to swap)."""
    return models.lora_requests


def name_lock(models: Any, name: str) -> asyncio.Lock:
    """vLLM's per-name lock, held by its resolution and load paths while they change `name`'s entry."""
    return models.lora_resolver_lock[name]


def next_lora_id(models: Any) -> int:
    """A fresh lora_int_id from vLLM's own counter (ids must never collide with vLLM's)."""
    return int(models.lora_id_counter.inc(1))


async def add_lora(models: Any, request: LoRARequest) -> None:
    """Load `request` into the engine (validated by the workers); raises whatever the engine raises."""
    await models.engine_client.add_lora(request)


async def load_named_adapter(models: Any, name: str, path: str) -> tuple[int, str]:
    """vLLM's own runtime load of `path` under `name` (never in place): (HTTP status, message)."""
    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

    result = await models.load_lora_adapter(
        LoadLoRAAdapterRequest(lora_name=name, lora_path=path, load_inplace=False)
    )
    return _outcome(result)


async def unload_named_adapter(models: Any, name: str) -> tuple[int, str]:
    """vLLM's own runtime unload of `name`: (HTTP status, message)."""
    from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

    return _outcome(await models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name)))


def _outcome(result: Any) -> tuple[int, str]:
    if isinstance(result, str):
        return 200, result
    return int(result.error.code), str(result.error.message)


def serving_dtype(engine_client: Any) -> torch.dtype:
    """The dtype the engine computes in (`--dtype` as resolved by vLLM, e.g. float16 for "auto")."""
    dtype = engine_client.model_config.dtype
    if not isinstance(dtype, torch.dtype):
        raise _missing("ModelConfig.dtype", f"is {dtype!r}, not a torch.dtype")
    return dtype


def api_server_count(args: Namespace) -> int:
    """How many API-server processes this server runs (vLLM sets None in a lone server)."""
    count = getattr(args, "api_server_count", None)
    return 1 if count is None else int(count)


def runtime_lora_updating() -> bool:
    """Whether vLLM registers its runtime load/unload routes and consults resolvers."""
    import vllm.envs as envs

    return bool(envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING)


# --------------------------------------------------------------------------- HTTP surface
def accept_bearer_token(app: Any, token: str) -> bool:
    """Make vLLM's --api-key guard accept `token` too; True if a guard was changed.

    vLLM adds its AuthenticationMiddleware after endpoint plugins attach their routes and before
    init_state; its SageMaker bootstrap has already built the middleware stack by then, so the stack is
    rebuilt (the server has not started serving yet).
    """
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    changed = False
    for m in getattr(app, "user_middleware", []):
        tokens = m.kwargs.get("tokens")
        if m.cls is AuthenticationMiddleware and isinstance(tokens, list) and token not in tokens:
            m.kwargs["tokens"] = [*tokens, token]
            changed = True
    if changed and getattr(app, "middleware_stack", None) is not None:
        app.middleware_stack = app.build_middleware_stack()
    return changed


def sagemaker_adapter_routes() -> list[tuple[str, str]]:
    """(path, method) of the adapter routes that vLLM's SageMaker bootstrap mounts (POST /adapters,
    DELETE /adapters/{adapter_name}): they call vLLM's unguarded load/unload handlers and lie outside
    the /v1 prefix that --api-key guards."""
    from model_hosting_container_standards.sagemaker.lora.constants import LoRAHandlerType
    from model_hosting_container_standards.sagemaker.lora.routes import LORA_ROUTE_REGISTRY

    out = []
    for kind in (LoRAHandlerType.REGISTER_ADAPTER, LoRAHandlerType.UNREGISTER_ADAPTER):
        config = LORA_ROUTE_REGISTRY.get(kind)
        if config is None:
            raise _missing("model_hosting_container_standards' LORA_ROUTE_REGISTRY", f"has no {kind.value}")
        out.append((config.path, config.method.upper()))
    return out


def replace_routes(app: Any, routes: Sequence[tuple[str, str]], endpoint: Callable[..., Any]) -> list[str]:
    """Point every existing route with one of these (path, method) pairs at `endpoint`; returns what
    was replaced ("METHOD path"). Routes are looked up per request, so this works after the app is built."""
    from fastapi.routing import APIRoute

    wanted = {(path, method) for path, method in routes}
    replaced = []
    new_routes = []
    for route in app.router.routes:
        hit = isinstance(route, APIRoute) and {(route.path, m) for m in route.methods} & wanted
        if hit:
            for path, method in sorted(hit):
                new_routes.append(APIRoute(path, endpoint, methods=[method], include_in_schema=False))
                replaced.append(f"{method} {path}")
            others = set(route.methods) - {m for _, m in hit}
            if others:
                new_routes.append(APIRoute(route.path, route.endpoint, methods=sorted(others)))
            continue
        new_routes.append(route)
    app.router.routes[:] = new_routes
    if replaced:
        app.openapi_schema = None
    return replaced


# --------------------------------------------------------------------------- the CLI
# Plugins vLLM enables only when VLLM_PLUGINS names them, even though they sit in a group that loads
# everything when VLLM_PLUGINS is unset (the Hugging Face hub resolver downloads remote adapters).
EXPLICIT_ONLY_PLUGINS = frozenset({"lora_hf_hub_resolver"})


def plugins_loaded_by_default() -> list[str]:
    """Names of the installed plugins vLLM loads when VLLM_PLUGINS is unset (endpoint plugins never)."""
    from importlib.metadata import entry_points

    import vllm.plugins as plugins

    groups = (
        plugins.DEFAULT_PLUGINS_GROUP,
        plugins.PLATFORM_PLUGINS_GROUP,
        plugins.IO_PROCESSOR_PLUGINS_GROUP,
        plugins.STAT_LOGGER_PLUGINS_GROUP,
    )
    names = {ep.name for group in groups for ep in entry_points(group=group)}
    return sorted(names - EXPLICIT_ONLY_PLUGINS)


def serve_arg_parser() -> Any:
    """vLLM's own `vllm serve` parser (FlexibleArgumentParser: also reads --config YAML files)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="vllm-surgery-serve"))


def planned_api_server_count(args: Namespace) -> int:
    """The number of API-server processes `vllm serve` will start for parsed `args` (vLLM 0.32's rule
    in entrypoints/cli/serve.py: an explicit --api-server-count, else one per data-parallel rank
    behind its internal load balancer, else 1)."""
    if getattr(args, "headless", False):
        return 0
    if args.api_server_count is not None:
        return int(args.api_server_count)
    external = args.data_parallel_external_lb or args.data_parallel_rank is not None
    if args.data_parallel_multi_port_external_lb or external:
        return 1
    if args.data_parallel_hybrid_lb or args.data_parallel_start_rank is not None:
        return int(args.data_parallel_size_local or 1)
    return int(args.data_parallel_size or 1)


def run_serve_cli(serve_args: Sequence[str]) -> None:
    """Run `vllm serve SERVE_ARGS` in this process (vLLM's CLI entry reads sys.argv)."""
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *serve_args]
    vllm_main()


def rust_frontend_requested(environ: Mapping[str, str] | None = None) -> bool:
    """VLLM_USE_RUST_FRONTEND on: vLLM serves HTTP from a Rust binary, bypassing every Python hook."""
    value = (os.environ if environ is None else environ).get(RUST_FRONTEND_ENV, "0").strip()
    try:
        return bool(int(value or "0"))
    except ValueError:
        return True  # vLLM would fail on it; treat an unreadable value as "on", never as "off"


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


# ----------------------------------------------------------------------------- canary routing
_ROUTED = "_vllm_surgery_routed_generate"
# The completion and chat handlers (vllm/entrypoints/openai/{completion,chat_completion}/serving.py):
# `create_*(request, raw_request)` parse nothing more and call engine_client.generate for every prompt
# before they return (a stream's generator is built after the generate calls), so a context variable
# set around them is seen by every generate call of the request.
REQUEST_HANDLERS = (
    ("openai_serving_completion", "create_completion"),
    ("openai_serving_chat", "create_chat_completion"),
)


def request_routing_key(request: Any, raw_request: Any) -> tuple[str | None, str | None]:
    """(the body's `user` field, the request's id as vLLM names it: the X-Request-Id header, else the
    body's request_id) of a completion or chat request."""
    user = getattr(request, "user", None)
    header = None
    headers = getattr(raw_request, "headers", None)
    if headers is not None:
        header = headers.get("X-Request-Id")
    request_id = header or getattr(request, "request_id", None)
    return (user if isinstance(user, str) and user else None), (str(request_id) if request_id else None)


def around_request_handlers(state: Any, around: Callable[[Any, Any], Any]) -> list[str]:
    """Run the completion and chat handlers inside `around(request, raw_request)` (a context manager);
    returns the handlers wrapped ("attribute.method"). Idempotent per handler object."""
    wrapped = []
    for attr, method in REQUEST_HANDLERS:
        serving = getattr(state, attr, None)
        original = getattr(serving, method, None)
        if original is None or getattr(serving, f"_vllm_surgery_{method}", False):
            continue

        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            async def handler(request: Any, raw_request: Any = None, *args: Any, **kwargs: Any) -> Any:
                with around(request, raw_request):
                    return await original(request, raw_request, *args, **kwargs)

            return handler

        setattr(serving, method, make(original))
        setattr(serving, f"_vllm_surgery_{method}", True)
        wrapped.append(f"{attr}.{method}")
    return wrapped


def route_generate(engine_client: Any, choose: Callable[[Any], Any]) -> bool:
    """Make `engine_client.generate(..., lora_request=R)` run with `choose(R)` instead of R (`choose`
    returns R itself to keep it). Installed outside the traffic observer (`observe_generate`), so
    capture records the LoRARequest the engine really runs. Idempotent; False if already routed."""
    if getattr(engine_client, _ROUTED, False):
        return False
    original = engine_client.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        request = kwargs.get("lora_request")
        if request is not None:
            kwargs["lora_request"] = choose(request)
        return original(*args, **kwargs)

    engine_client.generate = generate
    setattr(engine_client, _ROUTED, True)
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


# --------------------------------------------------------------------------- self-check
def _require(ok: bool, piece: str, detail: str) -> None:
    if not ok:
        raise _missing(piece, detail)


def _params(fn: Any) -> list[str]:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []


def check_resolver_api() -> None:
    """What the resolver needs: LoRARequest's fields and the resolver base class and registry."""
    request = lora_request("x", "/x", 3)
    for attr in ("lora_name", "lora_int_id", "lora_path", "load_inplace"):
        _require(hasattr(request, attr), "vllm.lora.request.LoRARequest", f"has no attribute {attr!r}")
    _require(
        inspect.iscoroutinefunction(getattr(LoRAResolver, "resolve_lora", None))
        and _params(LoRAResolver.resolve_lora)[1:] == ["base_model_name", "lora_name"],
        "vllm.lora.resolver.LoRAResolver.resolve_lora",
        "is not `async def resolve_lora(self, base_model_name, lora_name)`",
    )
    for method in ("register_resolver", "get_resolver", "get_supported_resolvers"):
        _require(
            hasattr(LoRAResolverRegistry, method),
            "vllm.lora.resolver.LoRAResolverRegistry",
            f"lacks {method}",
        )


def check_serving_models(models: Any) -> None:
    """`models` (a live OpenAIServingModels) has what hot-swap and the guarded routes use."""
    where = "OpenAIServingModels"
    requests = getattr(models, "lora_requests", None)
    _require(isinstance(requests, MutableMapping), where, "has no dict lora_requests")
    locks = getattr(models, "lora_resolver_lock", None)
    probe = "__vllm_surgery_check__"
    try:
        lock = locks[probe]  # a defaultdict: any name gets its lock
        locks.pop(probe, None)
    except (TypeError, KeyError, AttributeError):
        lock = None
    _require(
        isinstance(lock, asyncio.Lock), where, "has no lora_resolver_lock giving each name an asyncio.Lock"
    )
    counter = getattr(models, "lora_id_counter", None)
    _require(callable(getattr(counter, "inc", None)), where, "has no lora_id_counter.inc")
    engine = getattr(models, "engine_client", None)
    add = getattr(engine, "add_lora", None)
    _require(inspect.iscoroutinefunction(add), where, "has no engine_client with an async add_lora")
    for method in ("load_lora_adapter", "unload_lora_adapter"):
        _require(inspect.iscoroutinefunction(getattr(models, method, None)), where, f"has no async {method}")
    _require(callable(getattr(models, "model_name", None)), where, "has no model_name(lora_request)")
    _require(
        inspect.iscoroutinefunction(getattr(models, "show_available_models", None)),
        where,
        "has no async show_available_models",
    )


def check_traffic_api() -> None:
    """What traffic capture uses: EngineClient.generate's parameters, RequestOutputKind.DELTA, and the
    app's lifespan context (FastAPI's router.lifespan_context) that on_shutdown wraps."""
    from fastapi import FastAPI
    from vllm.engine.protocol import EngineClient
    from vllm.sampling_params import RequestOutputKind

    names = _params(EngineClient.generate)
    _require(
        names[1:4] == ["prompt", "sampling_params", "request_id"] and "lora_request" in names,
        "vllm.engine.protocol.EngineClient.generate",
        "is not generate(self, prompt, sampling_params, request_id, ..., lora_request=...)",
    )
    _require(hasattr(RequestOutputKind, "DELTA"), "vllm.sampling_params.RequestOutputKind", "has no DELTA")
    _require(
        callable(getattr(FastAPI().router, "lifespan_context", None)),
        "fastapi.FastAPI().router",
        "has no lifespan_context",
    )


def check_canary_api() -> None:
    """What canary routing uses (`around_request_handlers`, `request_routing_key`): the completion and
    chat handlers' `create_*(request, raw_request)` coroutines, and the `user` and `request_id` fields
    of their request bodies."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

    for cls, method in (
        (OpenAIServingCompletion, "create_completion"),
        (OpenAIServingChat, "create_chat_completion"),
    ):
        fn = getattr(cls, method, None)
        _require(
            inspect.iscoroutinefunction(fn) and _params(fn)[1:3] == ["request", "raw_request"],
            f"vllm.entrypoints.openai.{cls.__name__}.{method}",
            "is not `async def " + method + "(self, request, raw_request, ...)`",
        )
    for body in (CompletionRequest, ChatCompletionRequest):
        missing = [f for f in ("user", "request_id") if f not in body.model_fields]
        _require(not missing, f"vllm.entrypoints.openai {body.__name__}", f"lacks {missing}")


def _stand_in_serving_models() -> Any:
    """A real OpenAIServingModels built around a minimal engine client (no engine is started)."""
    from vllm.entrypoints.openai.models.protocol import BaseModelPath
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    async def add_lora(request: LoRARequest) -> bool:
        return True

    engine = SimpleNamespace(model_config=SimpleNamespace(model="m"), renderer=None, input_processor=None)
    engine.add_lora = add_lora
    try:
        return OpenAIServingModels(engine, [BaseModelPath(name="m", model_path="m")])
    except Exception as e:
        raise _missing(
            "OpenAIServingModels(engine_client, base_model_paths)", f"cannot be built ({e!r})"
        ) from e


def self_check(models: Any | None = None) -> None:
    """Check every piece of vLLM this module touches; raises VllmCompatError naming the first missing one.

    `models`: the live OpenAIServingModels to check (init_state); without it, one is built around a
    minimal engine client, which checks the class as installed.
    """
    check_resolver_api()
    check_serving_models(models if models is not None else _stand_in_serving_models())
    from vllm.entrypoints.serve.lora import protocol
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    for cls, field_names in (
        (protocol.LoadLoRAAdapterRequest, ("lora_name", "lora_path", "load_inplace", "is_3d_lora_weight")),
        (protocol.UnloadLoRAAdapterRequest, ("lora_name",)),
    ):
        missing = [f for f in field_names if f not in cls.model_fields]
        _require(not missing, f"vllm.entrypoints.serve.lora.protocol.{cls.__name__}", f"lacks {missing}")
    _require(
        _params(AuthenticationMiddleware.__init__)[1:3] == ["app", "tokens"],
        "vllm.entrypoints.serve.middleware.authenticate.AuthenticationMiddleware",
        "no longer takes (app, tokens)",
    )
    check_traffic_api()
    check_canary_api()
    from vllm.config import ModelConfig

    fields = getattr(ModelConfig, "__dataclass_fields__", {})
    _require("dtype" in fields, "vllm.config.ModelConfig", "has no dtype field")
    import vllm.envs as envs

    for name in (RUNTIME_LORA_ENV, RUST_FRONTEND_ENV):
        _require(name in envs.environment_variables, "vllm.envs", f"does not know {name}")
    sagemaker_adapter_routes()
    plugins_loaded_by_default()
    from vllm.entrypoints.cli import main as cli_main

    _require(callable(getattr(cli_main, "main", None)), "vllm.entrypoints.cli.main", "has no main()")
    args = serve_arg_parser().parse_args(["m"])
    for attr in (
        "api_server_count",
        "data_parallel_size",
        "data_parallel_size_local",
        "data_parallel_rank",
        "data_parallel_start_rank",
        "data_parallel_external_lb",
        "data_parallel_hybrid_lb",
        "data_parallel_multi_port_external_lb",
        "headless",
        "max_lora_rank",
        "model_tag",
    ):
        _require(hasattr(args, attr), "`vllm serve` arguments", f"have no {attr!r}")
