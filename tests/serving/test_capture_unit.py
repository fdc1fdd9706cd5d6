"""Capture without a server: response parsing (JSON, server-sent events cut anywhere), choices of
several prompts, token counts from vLLM's RequestOutput objects, and the records a capture gives.
The real middleware and observer against a real `vllm serve` are in test_traffic.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from vllm_surgery.serving.capture import CURRENT, Capture, observe_generate


def capture(endpoint: str = "completions", body: dict | None = None, n: int = 1) -> Capture:
    body = body or {"model": "x", "prompt": "hi", "temperature": 0}
    return Capture(request_id="rid", endpoint=endpoint, adapter="x", body=body, created=1.0, n=n)


def sse(events: list[dict]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


COMPLETION_EVENTS = [
    {"id": "cmpl-rid", "choices": [{"index": 0, "text": "Hel", "finish_reason": None}]},
    {"id": "cmpl-rid", "choices": [{"index": 1, "text": "Wo", "finish_reason": None}]},
    {"id": "cmpl-rid", "choices": [{"index": 0, "text": "lo ✓", "finish_reason": None}]},
    {"id": "cmpl-rid", "choices": [{"index": 1, "text": "rld", "finish_reason": "length"}]},
    {"id": "cmpl-rid", "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]},
    {"id": "cmpl-rid", "choices": [], "usage": {"prompt_tokens": 3}},
]


@pytest.mark.parametrize("piece", [1, 7, 64, 100_000])
def test_streamed_text_is_reassembled_however_the_bytes_are_cut(piece: int) -> None:
    c = capture(n=2, body={"model": "x", "prompt": "hi", "n": 2, "stream": True})
    c.streaming = True
    raw = b": keep-alive\n\n" + sse(COMPLETION_EVENTS)
    for start in range(0, len(raw), piece):
        c.feed(raw[start : start + piece], more=True)
    c.feed(b"", more=False)
    assert c.done and c.error is None
    assert {i: "".join(t) for i, t in c.texts.items()} == {0: "Hello ✓", 1: "World"}
    assert c.finish == {0: "stop", 1: "length"}
    assert c.response_id == "cmpl-rid"


def test_chat_stream_and_error_event() -> None:
    c = capture("chat", {"model": "x", "messages": [{"role": "user", "content": "q"}]})
    c.streaming = True
    c.feed(
        sse(
            [
                {"id": "chatcmpl-rid", "choices": [{"index": 0, "delta": {"role": "assistant"}}]},
                {"id": "chatcmpl-rid", "choices": [{"index": 0, "delta": {"content": "A"}}]},
                {
                    "id": "chatcmpl-rid",
                    "choices": [{"index": 0, "delta": {"content": "B"}, "finish_reason": "stop"}],
                },
            ]
        ),
        more=False,
    )
    assert c.done and "".join(c.texts[0]) == "AB" and c.finish[0] == "stop"

    cut = capture(endpoint="chat")
    cut.streaming = True
    cut.feed(b'data: {"choices": [{"index": 0, "delta": {"content": "A"}}]}\n\n', more=True)
    cut.feed(b'data: {"error": {"message": "engine died", "code": 500}}\n\n', more=False)
    assert cut.error is not None and "engine died" in cut.error and not cut.done


def test_json_answers_and_bad_json() -> None:
    c = capture("chat", {"model": "x", "messages": []})
    body = {
        "id": "chatcmpl-rid",
        "choices": [{"index": 0, "message": {"content": "fine"}, "finish_reason": "stop"}],
    }
    raw = json.dumps(body).encode()
    c.feed(raw[:10], more=True)
    c.feed(raw[10:], more=False)
    assert c.done and c.texts == {0: ["fine"]} and c.response_id == "chatcmpl-rid"
    bad = capture()
    bad.feed(b"<html>", more=False)
    assert not bad.done and "not a completion object" in bad.error


def test_records_map_choices_to_their_prompts() -> None:
    """Two prompts, n=2: choice i belongs to prompt i // n (vLLM numbers them so)."""
    body = {"model": "x", "prompt": ["p0", "p1"], "n": 2, "max_tokens": 3, "echo": False}
    c = capture(body=body, n=2)
    c.feed(
        json.dumps(
            {
                "id": "cmpl-rid",
                "choices": [{"index": i, "text": f"t{i}", "finish_reason": "length"} for i in range(4)],
            }
        ).encode(),
        more=False,
    )
    c.prompt_tokens = {0: 2, 1: 3}
    c.completion_tokens = {0: 3, 1: 3, 2: 3, 3: 1}
    records = c.to_records("v1", "/store/x/v1")
    assert [(r.choice, r.prompt, r.completion, r.prompt_tokens, r.completion_tokens) for r in records] == [
        (0, "p0", "t0", 2, 3),
        (1, "p0", "t1", 2, 3),
        (2, "p1", "t2", 3, 3),
        (3, "p1", "t3", 3, 1),
    ]
    assert all(r.version == "v1" and r.response_id == "cmpl-rid" and r.calibratable for r in records)
    assert records[0].sampling == {"n": 2, "max_tokens": 3, "echo": False}


@pytest.mark.parametrize(
    ("endpoint", "body", "text", "calibratable"),
    [
        ("completions", {"prompt": "q"}, "a", True),
        ("completions", {"prompt": [1, 2, 3]}, "a", False),  # token ids
        ("completions", {"prompt": "q", "echo": True}, "q a", False),  # the text holds the prompt
        ("completions", {"prompt": "q"}, "  ", True),  # no answer: a correction of it is still usable
        ("chat", {"messages": [{"role": "user", "content": "q"}]}, "a", True),
        ("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}]}, "a", False),
    ],
)
def test_which_records_can_become_calibration(
    endpoint: str, body: dict, text: str, calibratable: bool
) -> None:
    c = capture(endpoint, {"model": "x", **body})
    c.texts = {0: [text]}
    (r,) = c.to_records("original", None)
    assert r.calibratable is calibratable


def test_observer_counts_tokens_and_records_the_lora_request() -> None:
    from vllm.lora.request import LoRARequest
    from vllm.outputs import CompletionOutput, RequestOutput
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    def out(index: int, tokens: list[int], prompt: list[int] | None) -> RequestOutput:
        return RequestOutput(
            "cmpl-rid-0", None, prompt, None, [CompletionOutput(index, "t", tokens, None, None)], False
        )

    async def engine(*args, **kwargs):
        yield out(0, [1, 2], [9, 9, 9])
        yield out(1, [3], None)
        yield out(0, [4], None)

    async def run(kind: RequestOutputKind, lora) -> Capture:
        c = capture(n=2)
        token = CURRENT.set(c)
        try:
            params = SamplingParams(n=2, output_kind=kind)
            gen = observe_generate(engine, "prompt", params, "cmpl-rid-0", lora_request=lora)
        finally:
            CURRENT.reset(token)
        async for _ in gen:
            pass
        return c

    lora = LoRARequest("x", 1, "/adapters/x")
    deltas = asyncio.run(run(RequestOutputKind.DELTA, lora))
    assert deltas.lora_path == "/adapters/x" and deltas.prompt_tokens == {0: 3}
    assert deltas.completion_tokens == {0: 3, 1: 1}
    final = asyncio.run(run(RequestOutputKind.FINAL_ONLY, lora))
    assert final.completion_tokens == {0: 1, 1: 1}  # each output holds all tokens so far: the last counts
    base = asyncio.run(run(RequestOutputKind.DELTA, None))
    assert base.base_model and base.lora_path is None and base.completion_tokens == {}

    async def outside() -> list:
        return [o async for o in observe_generate(engine, "p", SamplingParams(), "id")]

    assert len(asyncio.run(outside())) == 3  # no capture: the engine's generator, untouched
