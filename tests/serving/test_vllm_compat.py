"""The vLLM boundary against the INSTALLED vLLM (no fakes, no engine): the start-up self-check, the
contract the unit tests' fakes imitate, and the real vLLM app's adapter routes once the endpoint plugin
has run (vLLM's own build_app, as `vllm serve` calls it)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import vllm
from fastapi.testclient import TestClient

from vllm_surgery.serving import vllm_compat
from vllm_surgery.serving.vllm_compat import VllmCompatError

API_KEY, ADMIN_TOKEN = "compat-api-key", "compat-admin-token"


@pytest.fixture(scope="module")
def real_models():
    """A real OpenAIServingModels (built around a minimal engine client, as the self-check does)."""
    return vllm_compat._stand_in_serving_models()


def test_self_check_passes_on_the_installed_vllm(real_models) -> None:
    vllm_compat.self_check()
    vllm_compat.self_check(real_models)
    assert vllm_compat.vllm_version() == vllm.__version__


def test_self_check_names_the_version_and_the_missing_piece(monkeypatch) -> None:
    with pytest.raises(VllmCompatError) as e:
        vllm_compat.check_serving_models(SimpleNamespace(lora_requests={}))
    assert f"vLLM {vllm.__version__}" in str(e.value) and "lora_resolver_lock" in str(e.value)
    from vllm.entrypoints.serve.middleware import authenticate

    def moved(self, app, api_tokens):  # a renamed keyword: our token injection would silently miss
        pass

    monkeypatch.setattr(authenticate.AuthenticationMiddleware, "__init__", moved)
    with pytest.raises(VllmCompatError, match="AuthenticationMiddleware"):
        vllm_compat.self_check()


def test_the_canary_check_names_a_moved_handler(monkeypatch) -> None:
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

    async def moved(self, completion_request, raw_request=None):  # a renamed parameter
        pass

    monkeypatch.setattr(OpenAIServingCompletion, "create_completion", moved)
    with pytest.raises(VllmCompatError, match=r"OpenAIServingCompletion\.create_completion"):
        vllm_compat.check_canary_api()


def test_hotswap_fakes_match_the_real_classes(real_models) -> None:
    """What test_hotswap_unit's FakeModels / FakeEngine imitate exists, with the same types and
    signatures, on vLLM's OpenAIServingModels and engine client."""
    from test_hotswap_unit import FakeEngine, FakeModels
    from vllm.engine.protocol import EngineClient

    fake = FakeModels()
    vllm_compat.check_serving_models(fake)  # the checker that init_state runs on the live object
    for attr in ("lora_requests", "lora_resolver_lock", "lora_id_counter"):
        assert type(getattr(fake, attr)) is type(getattr(real_models, attr)), attr
    assert type(fake.lora_resolver_lock["n"]) is type(real_models.lora_resolver_lock["n"])
    for method in ("load_lora_adapter", "unload_lora_adapter"):
        real = list(inspect.signature(getattr(type(real_models), method)).parameters)
        assert list(inspect.signature(getattr(FakeModels, method)).parameters) == real, method
    real = list(inspect.signature(type(real_models).model_name).parameters)
    assert list(inspect.signature(FakeModels.model_name).parameters) == real
    real = list(inspect.signature(type(real_models).show_available_models).parameters)
    assert list(inspect.signature(FakeModels.show_available_models).parameters) == real
    assert inspect.iscoroutinefunction(type(real_models).show_available_models)
    real_add = list(inspect.signature(EngineClient.add_lora).parameters)
    assert list(inspect.signature(FakeEngine.add_lora).parameters) == real_add
    assert inspect.iscoroutinefunction(EngineClient.add_lora)


def test_refining_fake_matches_hotswapper(tmp_path, real_models) -> None:
    """test_refining_unit's FakeSwapper imitates HotSwapper: same attributes, same method signatures."""
    from test_refining_unit import FakeSwapper

    from vllm_surgery.serving.hotswap import HotSwapper
    from vllm_surgery.settings import ServingSettings

    real = HotSwapper(real_models, ServingSettings(store=tmp_path / "store"))
    fake = FakeSwapper(tmp_path, tmp_path)
    for name, value in vars(FakeSwapper).items():
        if callable(value) and not name.startswith("__"):
            assert list(inspect.signature(value).parameters) == list(
                inspect.signature(getattr(HotSwapper, name)).parameters
            ), name
    for attr in ("store", "settings"):
        assert type(getattr(fake, attr)) is type(getattr(real, attr)), attr


def test_resolver_registry_attribute_the_unit_tests_patch() -> None:
    from vllm.lora.resolver import LoRAResolverRegistry

    assert isinstance(LoRAResolverRegistry.resolvers, dict)  # test_resolver monkeypatches it


@pytest.fixture(scope="module")
def vllm_app(tmp_path_factory) -> Iterator[TestClient]:
    """vLLM's real FastAPI app (build_app, as `vllm serve` builds it) with our endpoint plugin attached
    and its init_state run (no engine: engine_client=None)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")
    mp.setenv("VLLM_PLUGINS", "vllm_surgery,vllm_surgery_api")
    mp.setenv("VLLM_SURGERY_ADMIN_TOKEN", ADMIN_TOKEN)
    mp.setenv("VLLM_SURGERY_STORE", str(tmp_path_factory.mktemp("store")))
    try:
        from vllm.entrypoints.launchers.app import build_app

        args = vllm_compat.serve_arg_parser().parse_args(["/nonexistent/model", "--api-key", API_KEY])
        app = build_app(args, ("generate",), None)
        (plugin,) = app.state.endpoint_plugins
        asyncio.run(plugin.init_state(None, app.state, args))
        yield TestClient(app)
    finally:
        mp.undo()


def test_every_adapter_loading_route_is_ours(vllm_app) -> None:
    from fastapi.routing import APIRoute

    from vllm_surgery.serving.api.runtime_lora import RuntimeLoraRoutes

    loading = {(vllm_compat.RUNTIME_LOAD_PATH, "POST"), (vllm_compat.RUNTIME_UNLOAD_PATH, "POST")}
    loading |= set(vllm_compat.sagemaker_adapter_routes())
    found = {}
    for route in vllm_app.app.routes:
        if isinstance(route, APIRoute):
            for method in route.methods:
                if (route.path, method) in loading:
                    assert (route.path, method) not in found, f"{method} {route.path} registered twice"
                    found[(route.path, method)] = route.endpoint
    assert set(found) == loading
    for (path, method), endpoint in found.items():
        assert isinstance(getattr(endpoint, "__self__", None), RuntimeLoraRoutes), f"{method} {path}"


def test_sagemaker_adapter_routes_are_switched_off(vllm_app) -> None:
    # No credentials at all: these paths lie outside the /v1 prefix that vLLM's --api-key guards.
    status = vllm_app.post("/adapters", json={"name": "a", "src": "/tmp"})
    assert status.status_code == 403 and "switched off" in status.json()["error"]["message"]
    gone = vllm_app.delete("/adapters/a")
    assert gone.status_code == 403 and "switched off" in gone.json()["error"]["message"]


def test_runtime_routes_need_the_admin_token_which_vllms_guard_accepts(vllm_app) -> None:
    body = {"lora_name": "a", "lora_path": "/tmp"}
    assert vllm_app.post("/v1/load_lora_adapter", json=body).status_code == 401  # vLLM's API-key guard
    key_only = vllm_app.post(
        "/v1/load_lora_adapter", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
    )
    assert key_only.status_code == 403 and "admin token" in key_only.json()["error"]["message"]
    unload = vllm_app.post(
        "/v1/unload_lora_adapter", json={"lora_name": "a"}, headers={"Authorization": f"Bearer {API_KEY}"}
    )
    assert unload.status_code == 403
    # The admin token alone passes vLLM's guard (accept_bearer_token) and ours; no engine here: 503.
    admin = vllm_app.post(
        "/v1/load_lora_adapter", json=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert admin.status_code == 503, admin.text
