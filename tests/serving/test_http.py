"""Bounded, strict JSON bodies: every bad body is a 4xx with a message (a real FastAPI app over ASGI)."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from vllm_surgery.serving.api.http import (
    BodyError,
    bounded,
    error_response,
    json_object_body,
    parse_json_object,
)

app = FastAPI()


@app.post("/echo")
async def echo(request: Request):
    try:
        return await json_object_body(request, max_bytes=1024, allowed={"version"})
    except BodyError as e:
        return error_response(str(e), e.status)


client = TestClient(app)


def test_a_good_body_passes():
    assert client.post("/echo", json={"version": "v1"}).json() == {"version": "v1"}


def post(content: bytes):
    return client.post("/echo", content=content)


def test_bad_bodies_are_400_with_a_message():
    cases = {
        b"": "body is empty",
        b"{not json": "not valid JSON",
        b"[1, 2]": "must be a JSON object, got list",
        b'{"version": "v", "extra": 1}': "unknown field(s) ['extra']",
        b"\xff\xfe": "not valid JSON",
    }
    for body, message in cases.items():
        r = post(body)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert message in error["message"], (body, error)
        assert error["code"] == 400 and error["type"] == "BadRequestError"


def test_json_nested_past_the_parser_limit_is_a_body_error_not_a_recursion_error():
    with pytest.raises(BodyError, match="nested too deeply") as info:
        parse_json_object(b"[" * 200_000 + b"]" * 200_000)
    assert info.value.status == 400


def test_a_body_over_the_bound_is_413_whether_declared_or_not():
    r = post(b'{"version": "' + b"x" * 2000 + b'"}')
    assert r.status_code == 413 and "exceeds the limit of 1024 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: streamed, cut off once the bound is passed
        for _ in range(10):
            yield b" " * 512

    r = client.post("/echo", content=chunks())
    assert r.status_code == 413


def test_long_messages_are_cut_in_the_middle_keeping_problem_and_remedy():
    assert bounded("short", limit=6) == "short"
    assert bounded("0123456789", limit=6) == "0123 [... 4 characters left out ...] 89"
    message = "unknown policy '" + "x" * 1_000_000 + "': policy must be one of auto, grad_direction"
    cut = bounded(message)
    assert len(cut) < 2_100
    assert cut.startswith("unknown policy 'xxx")
    assert cut.endswith("': policy must be one of auto, grad_direction")
    assert "[... 998,062 characters left out ...]" in cut  # 16 + 1,000,000 + 45 characters; 1,333 + 666 kept


def test_error_answers_are_bounded():
    answer = error_response("bad value " + "y" * 50_000 + " remedy", 400)
    body = answer.body.decode()
    assert answer.status_code == 400 and len(body) < 2_200
    assert "characters left out" in body and body.count("y") < 2_000 and "remedy" in body
