"""The OpenAPI document (/openapi.json, shown at /docs) lists every route of the plugin with its body."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch) -> FastAPI:
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")  # the guarded runtime routes too
    from vllm_surgery.serving.endpoint_plugin import SurgeryEndpointPlugin

    app = FastAPI()
    SurgeryEndpointPlugin().attach_router(app)
    return app


def test_every_route_is_in_the_schema_with_its_body(app: FastAPI) -> None:
    from vllm_surgery.serving.api import LoadAdapterRequest, UnloadAdapterRequest
    from vllm_surgery.serving.api.adapters import SwapRequest
    from vllm_surgery.serving.api.canary import CanaryShareRequest, StartCanaryRequest
    from vllm_surgery.serving.api.feedback import FeedbackRequest
    from vllm_surgery.serving.api.jobs import CancelBody
    from vllm_surgery.serving.api.refinements import RefineBody

    paths = TestClient(app).get("/openapi.json").json()["paths"]
    ours = [
        r
        for r in app.routes
        if isinstance(r, APIRoute) and r.path.startswith(("/v1/surgery", "/v1/load_", "/v1/unload_"))
    ]
    assert len(ours) == 17
    bodies = {
        ("/v1/surgery/adapters/{name}/swap", "post"): SwapRequest,
        ("/v1/surgery/adapters/{name}/refine", "post"): RefineBody,
        ("/v1/surgery/adapters/{name}/canary", "post"): StartCanaryRequest,
        ("/v1/surgery/adapters/{name}/canary/share", "post"): CanaryShareRequest,
        ("/v1/surgery/feedback", "post"): FeedbackRequest,
        ("/v1/surgery/jobs/{job_id}/cancel", "post"): CancelBody,
        ("/v1/load_lora_adapter", "post"): LoadAdapterRequest,
        ("/v1/unload_lora_adapter", "post"): UnloadAdapterRequest,
    }
    for route in ours:
        for method in route.methods:
            operation = paths[route.path][method.lower()]
            model = bodies.get((route.path, method.lower()))
            if model is None:
                assert "requestBody" not in operation, (route.path, method)
                continue
            schema = operation["requestBody"]["content"]["application/json"]["schema"]
            assert schema["additionalProperties"] is False, route.path  # extra="forbid"
            assert set(schema["properties"]) == set(model.model_fields), route.path
            assert "$defs" not in schema, route.path  # inlined: no references to resolve


def test_the_refine_body_lists_the_refine_settings_but_not_the_refused_ones(app: FastAPI) -> None:
    from vllm_surgery.settings import refine_setting_fields

    paths = TestClient(app).get("/openapi.json").json()["paths"]
    schema = paths["/v1/surgery/adapters/{name}/refine"]["post"]["requestBody"]["content"]["application/json"]
    properties = schema["schema"]["properties"]
    assert set(refine_setting_fields()) <= set(properties)
    assert not {"force", "device", "progress"} & set(properties)
    assert properties["seed"]["description"]  # the setting's help text


def test_query_parameters_are_listed(app: FastAPI) -> None:
    paths = TestClient(app).get("/openapi.json").json()["paths"]
    names = {p["name"] for p in paths["/v1/surgery/jobs"]["get"]["parameters"]}
    assert names == {"adapter", "state", "limit", "before_id"}
    names = {p["name"] for p in paths["/v1/surgery/traffic/{name}"]["get"]["parameters"]}
    assert names == {"name", "since", "limit", "after_id"}


def test_the_job_cancel_route_is_listed_with_an_optional_empty_body(app: FastAPI) -> None:
    paths = TestClient(app).get("/openapi.json").json()["paths"]
    operation = paths["/v1/surgery/jobs/{job_id}/cancel"]["post"]
    assert operation["requestBody"]["required"] is False
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert schema["properties"] == {} and schema["additionalProperties"] is False
