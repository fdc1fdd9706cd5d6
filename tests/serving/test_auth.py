"""Who may change what is served (AdminGuard), on real Starlette requests and settings from variables."""

from __future__ import annotations

import logging

import pytest
from starlette.requests import Request

from vllm_surgery.serving.auth import ADMIN_HEADER, AdminGuard, FeedbackTrust
from vllm_surgery.settings import ServingSettings


def request(headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": raw})


def guard(**env: str) -> AdminGuard:
    return AdminGuard(ServingSettings.from_env(env))


def test_no_token_refuses_and_names_the_setting() -> None:
    reason = guard().refusal(request({"Authorization": "Bearer anything"}), "swap")
    assert reason is not None and "VLLM_SURGERY_ADMIN_TOKEN" in reason
    assert "VLLM_SURGERY_ALLOW_UNAUTHENTICATED_ADMIN" in reason


def test_explicit_opt_in_allows_without_a_token() -> None:
    assert guard(VLLM_SURGERY_ALLOW_UNAUTHENTICATED_ADMIN="1").refusal(request({}), "swap") is None


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ({}, False),
        ({"Authorization": "Bearer the-api-key"}, False),
        ({ADMIN_HEADER: "wrong"}, False),
        ({"Authorization": "Basic sesame"}, False),
        ({ADMIN_HEADER: "sesame", "Authorization": "Bearer the-api-key"}, True),
        ({"Authorization": "Bearer sesame"}, True),
    ],
)
def test_the_token_is_required_when_set(headers: dict[str, str], allowed: bool) -> None:
    # The opt-in is ignored once a token is configured.
    g = guard(VLLM_SURGERY_ADMIN_TOKEN="sesame", VLLM_SURGERY_ALLOW_UNAUTHENTICATED_ADMIN="1")
    assert (g.refusal(request(headers), "swap") is None) is allowed


@pytest.mark.parametrize(
    ("env", "level", "phrase"),
    [
        ({}, logging.WARNING, "refused with 403 until one is set"),
        ({"VLLM_SURGERY_ALLOW_UNAUTHENTICATED_ADMIN": "yes"}, logging.WARNING, "anyone who passes"),
        ({"VLLM_SURGERY_ADMIN_TOKEN": "sesame"}, logging.INFO, "need the admin token"),
    ],
)
def test_start_up_says_how_mutations_are_protected(caplog, env, level, phrase) -> None:
    with caplog.at_level(logging.INFO, logger="vllm"):
        guard(**env).log_startup()
    assert any(r.levelno == level and phrase in r.getMessage() for r in caplog.records), caplog.text


def test_the_token_is_never_shown_with_the_settings() -> None:
    settings = ServingSettings.from_env({"VLLM_SURGERY_ADMIN_TOKEN": "sesame-secret"})
    assert settings.admin_token == "sesame-secret"
    assert "sesame-secret" not in repr(settings)


def test_the_reviewer_token_is_never_shown_with_the_settings() -> None:
    settings = ServingSettings.from_env({"VLLM_SURGERY_REVIEWER_TOKEN": "reviewer-secret"})
    assert settings.reviewer_token == "reviewer-secret"
    assert "reviewer-secret" not in repr(settings)


@pytest.mark.parametrize(
    ("env", "level", "phrase"),
    [
        ({}, logging.WARNING, "none counts as calibration data"),
        ({"VLLM_SURGERY_REVIEWER_TOKEN": "r"}, logging.INFO, "only with the reviewer or admin token"),
        ({"VLLM_SURGERY_FEEDBACK_TRUST": "api-key"}, logging.WARNING, "queues automatic refinements"),
    ],
)
def test_start_up_says_whose_feedback_counts(caplog, env, level, phrase) -> None:
    with caplog.at_level(logging.INFO, logger="vllm"):
        FeedbackTrust(ServingSettings.from_env(env)).log_startup(auto_refine=True)
    assert any(r.levelno == level and phrase in r.getMessage() for r in caplog.records), caplog.text
