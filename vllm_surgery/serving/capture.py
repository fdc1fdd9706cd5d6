"""Capturing each completion and chat request of an adapter: what was asked, which adapter version
answered, and exactly what the client received.

Where, and why there (read from vLLM 0.32's source):

- The text "as the client received it" only exists in the HTTP response: stop strings, echo,
  chat templates, reasoning and tool parsers all act between the engine and the wire. So a pure-ASGI
  middleware (added by the endpoint plugin's attach_router, a documented plugin hook) reads the request
  body and tees the response: a JSON body, or a stream of server-sent events parsed line by line as it
  passes (only the text of each choice is kept; a stream is never buffered whole). It is independent
  of vLLM's handler classes, so it survives their refactors, and it sees streamed output.
- The version that answered is only known where the request is scheduled: the handlers call
  ``engine_client.generate(prompt, sampling_params, request_id, lora_request=...)``, and that
  LoRARequest is the one the engine runs (a hot-swap between the request's arrival and this call
  changes it; one after it does not). The plugin observes ``generate`` (see `vllm_compat`: the
  EngineClient protocol's signature is stable across releases) and, through a context variable that
  the middleware sets for the request, attaches the LoRARequest's path and the token counts of the
  RequestOutputs to the same capture. The path is turned into 'original' or a store version id off
  the request path, in the writer thread.
- Not chosen: vLLM's RequestLogger (no completions output, not per stream), stat-logger plugins (no
  text, not stable), engine-core hooks (internal ids only, inside the engine's busy loop).

Request ids. vLLM names a request ``cmpl-<X-Request-Id>`` / ``chatcmpl-<X-Request-Id>`` when the
client sends the header (else the body's ``request_id``, else a random id). A recorded request keeps
the client's X-Request-Id; without one, the body's request_id, else a generated id, which is put into
the request's headers (so vLLM uses it) and returned in the response's X-Request-Id header. Feedback
accepts either that id or the response's ``id``.

What is recorded: one record per returned choice (``n`` choices of ``k`` prompts give ``k*n``
records), only for an adapter that the engine ran (a LoRARequest was passed: requests to the base
model are not recorded) and that the plugin knows (under an adapter root or from --lora-modules:
checked in the writer). Only complete answers are recorded: an error status, a client disconnect or
a cut stream counts as ``incomplete`` in the metrics. Beam search (several internal generate calls
per choice) and request bodies above `MAX_REQUEST_BYTES` are not recorded; both are logged once.
VLLM_USE_RUST_FRONTEND bypasses every Python hook: the launcher refuses it while capture is on.

Wiring (`attach_capture` at the endpoint plugin's attach_router, `start_capture` at its init_state):
the middleware must be added before the app is built, the recorder needs the engine, so the
middleware holds a `CaptureSwitch` that passes everything through until init_state starts it.
"""

from __future__ import annotations

import atexit
import contextvars
import json
import logging
import time
import uuid
from argparse import Namespace
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from ..names import InvalidAdapterName, validate_adapter_name
from ..settings import ServingSettings
from ..storage import TrafficRecord, open_database
from ..traffic import TrafficPolicy, TrafficRecorder, record_traffic
from . import vllm_compat
from .auth import FeedbackTrust

log = logging.getLogger(f"vllm.{__name__}")

ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
MAX_REQUEST_BYTES = 4 * 1024 * 1024
MAX_RESPONSE_BYTES = 16 * 1024 * 1024  # non-streamed JSON answers; streams are parsed as they pass
MAX_REQUEST_ID_LENGTH = 256
REQUEST_ID_HEADER = b"x-request-id"
# Body fields that are the prompt or the model, not sampling settings.
_NOT_SAMPLING = frozenset({"model", "prompt", "messages"})

CURRENT: contextvars.ContextVar[Capture | None] = contextvars.ContextVar("vllm_surgery_capture", default=None)
_logged_once: set[str] = set()


def _once(key: str, message: str, *args: Any) -> None:
    if key not in _logged_once:
        _logged_once.add(key)
        log.info(message, *args)


@dataclass(eq=False)
class Capture:
    """One captured request: filled by the middleware (request, response) and by the generate observer
    (adapter path, token counts); turned into TrafficRecords in the writer thread."""

    request_id: str
    endpoint: str  # "completions" | "chat"
    adapter: str
    body: dict[str, Any]
    created: float
    n: int = 1
    generated_id: bool = False  # the id is ours (no X-Request-Id, no body request_id): never redacted
    # from engine_client.generate
    lora_path: str | None = None
    base_model: bool = False
    generate_calls: int = 0
    prompt_tokens: dict[int, int] = field(default_factory=dict)  # prompt index -> tokens
    completion_tokens: dict[int, int] = field(default_factory=dict)  # choice index -> tokens
    # from the response
    status: int | None = None
    streaming: bool = False
    response_id: str | None = None
    texts: dict[int, list[str]] = field(default_factory=dict)  # choice index -> text pieces
    finish: dict[int, str | None] = field(default_factory=dict)
    done: bool = False  # the whole answer was seen
    finished: bool = False  # the last body message was handled (queued or counted)
    error: str | None = None
    _pending: bytearray = field(default_factory=bytearray)

    # ------------------------------------------------------------------ the engine side
    def observe(self, prompt_index: int, output: Any, deltas: bool) -> None:
        """Count the tokens of one RequestOutput of prompt `prompt_index`."""
        if prompt_index not in self.prompt_tokens and output.prompt_token_ids is not None:
            self.prompt_tokens[prompt_index] = len(output.prompt_token_ids)
        for o in output.outputs:
            i = prompt_index * self.n + o.index
            count = len(o.token_ids)
            self.completion_tokens[i] = self.completion_tokens.get(i, 0) + count if deltas else count

    # ------------------------------------------------------------------ the response side
    def feed(self, chunk: bytes, more: bool) -> None:
        """One piece of the response body (called for every body message, in order)."""
        if self.error is not None:
            return
        if self.streaming:
            self._pending += chunk
            while (end := self._pending.find(b"\n")) >= 0:
                line = bytes(self._pending[:end]).rstrip(b"\r")
                del self._pending[: end + 1]
                self._event_line(line)
        else:
            if len(self._pending) + len(chunk) > MAX_RESPONSE_BYTES:
                self.error = f"response above {MAX_RESPONSE_BYTES} bytes"
                self._pending.clear()
                return
            self._pending += chunk
            if not more:
                try:
                    self._choices(json.loads(bytes(self._pending)), delta=False)
                    self.done = True
                except (ValueError, TypeError, AttributeError) as e:
                    self.error = f"response is not a completion object ({e})"
                self._pending.clear()

    def _event_line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return  # blank separators, comments (keep-alives), other fields
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            event = json.loads(payload)
            if "error" in event:
                self.error = f"error event in the stream: {str(event['error'])[:200]}"
                return
            self._choices(event, delta=True)
        except (ValueError, TypeError, AttributeError) as e:
            self.error = f"unreadable stream event ({e})"

    def _choices(self, obj: dict[str, Any], delta: bool) -> None:
        if self.response_id is None and isinstance(obj.get("id"), str):
            self.response_id = obj["id"]
        for choice in obj.get("choices") or ():
            i = int(choice.get("index", 0))
            if self.endpoint == "completions":
                text = choice.get("text")
            else:
                text = (choice.get("delta" if delta else "message") or {}).get("content")
            pieces = self.texts.setdefault(i, [])
            if isinstance(text, str) and text:
                pieces.append(text)
            if choice.get("finish_reason") is not None or i not in self.finish:
                self.finish[i] = choice.get("finish_reason")

    # ------------------------------------------------------------------ records (writer thread)
    def prompts(self) -> list[Any]:
        """The prompt of each prompt index: completions' string / token ids, or the chat messages."""
        if self.endpoint == "chat":
            return [self.body.get("messages")]
        prompt = self.body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(prompt) if isinstance(prompt, list) else [prompt]

    def to_records(self, version: str, served_path: str | None) -> list[TrafficRecord]:
        prompts = self.prompts()
        sampling = {k: v for k, v in self.body.items() if k not in _NOT_SAMPLING}
        out = []
        for i in sorted(self.texts):
            k = i // max(1, self.n)
            prompt = prompts[k] if k < len(prompts) else None
            completion = "".join(self.texts[i])
            out.append(
                TrafficRecord(
                    request_id=self.request_id,
                    response_id=self.response_id,
                    choice=i,
                    adapter=self.adapter,
                    version=version,
                    served_path=served_path,
                    endpoint=self.endpoint,
                    prompt=prompt,
                    completion=completion,
                    finish_reason=self.finish.get(i),
                    sampling=sampling,
                    prompt_tokens=self.prompt_tokens.get(k),
                    completion_tokens=self.completion_tokens.get(i),
                    calibratable=_calibratable(self.endpoint, prompt, completion, sampling),
                    created=self.created,
                )
            )
        return out


def _calibratable(endpoint: str, prompt: Any, completion: str, sampling: dict[str, Any]) -> bool:
    """Whether the request can be written as a calibration line: text prompts (not token ids), string
    message contents, a completion that is only the answer (no echo). An empty completion qualifies:
    a user's correction of it is the most useful example there is; an empty answer itself is never
    used (traffic.calibration_set checks the answer it picks)."""
    if sampling.get("echo"):
        return False
    if endpoint == "completions":
        return isinstance(prompt, str) and not sampling.get("suffix")
    return (
        isinstance(prompt, list)
        and bool(prompt)
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt
        )
    )


# ----------------------------------------------------------------------------- the engine side
def observe_generate(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The observer installed on engine_client.generate (see vllm_compat.observe_generate): outside a
    captured request it returns the engine's generator untouched."""
    generator = original(*args, **kwargs)
    capture = CURRENT.get()
    if capture is None:
        return generator
    lora_request = kwargs.get("lora_request")
    if lora_request is None:
        capture.base_model = True  # the base model answered: not recorded
        return generator
    capture.lora_path = vllm_compat.lora_path(lora_request)
    prompt_index = capture.generate_calls
    capture.generate_calls += 1
    sampling_params = args[1] if len(args) > 1 else kwargs.get("sampling_params")
    return _counted(generator, capture, prompt_index, vllm_compat.outputs_are_deltas(sampling_params))


async def _counted(
    generator: Any, capture: Capture, prompt_index: int, deltas: bool
) -> AsyncGenerator[Any, None]:
    try:
        async for output in generator:
            capture.observe(prompt_index, output, deltas)
            yield output
    finally:
        await generator.aclose()  # a client disconnect must still abort the engine request


# ----------------------------------------------------------------------------- the middleware
class CaptureSwitch:
    """Holds the recorder once the plugin's init_state has built it; until then, and when it is None,
    the middleware passes every request through untouched."""

    def __init__(self) -> None:
        self.recorder: TrafficRecorder | None = None
        self.add_response_header = True

    def start(self, recorder: TrafficRecorder, add_response_header: bool) -> None:
        """Record from now on; `add_response_header`: return X-Request-Id where vLLM does not."""
        self.add_response_header = add_response_header
        self.recorder = recorder

    def stop(self) -> TrafficRecorder | None:
        """Stop recording; returns the recorder that was running (None if none was)."""
        recorder, self.recorder = self.recorder, None
        return recorder


def _endpoint(scope: dict[str, Any]) -> str | None:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        return ENDPOINTS.get(path[len(root) :]) or ENDPOINTS.get(path)
    return ENDPOINTS.get(path)


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def begin(recorder: TrafficRecorder, endpoint: str, raw: bytes, scope: dict[str, Any]) -> Capture | None:
    """A Capture for this request if it is to be recorded (policy and sampling), else None. Cheap:
    runs on the event loop for every completion request while capture is on."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return None  # vLLM answers the bad body itself
    if not isinstance(body, dict):
        return None
    model = body.get("model")
    try:
        validate_adapter_name(model)
    except InvalidAdapterName:
        return None
    if not recorder.policy.sample(model):
        return None
    if body.get("use_beam_search"):
        _once("beam", "traffic: beam-search requests are not recorded (adapter %r and others)", model)
        return None
    request_id = _header(scope, REQUEST_ID_HEADER)
    generated = False
    if request_id is None:
        given = body.get("request_id")
        generated = not (isinstance(given, str) and given)
        request_id = uuid.uuid4().hex if generated else given
        headers = scope.get("headers")
        entry = (REQUEST_ID_HEADER, request_id.encode("latin-1", "replace"))
        if isinstance(headers, list):
            headers.append(entry)  # in place: outer middleware (vLLM's X-Request-Id) sees it too
        else:
            scope["headers"] = [*(headers or ()), entry]
    if len(request_id) > MAX_REQUEST_ID_LENGTH:
        _once(
            "long-id",
            "traffic: requests with an X-Request-Id above %d characters are not recorded",
            MAX_REQUEST_ID_LENGTH,
        )
        return None
    n = body.get("n")
    return Capture(
        request_id=request_id,
        endpoint=endpoint,
        adapter=model,
        body=body,
        created=time.time(),
        n=n if isinstance(n, int) and n > 0 else 1,
        generated_id=generated,
    )


class TrafficCaptureMiddleware:
    """Pure-ASGI middleware: see the module docstring. Passes through everything that is not a POST to
    /v1/completions or /v1/chat/completions while a recorder is set."""

    def __init__(self, app: Any, switch: CaptureSwitch) -> None:
        self.app = app
        self.switch = switch

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        recorder = self.switch.recorder
        endpoint = _endpoint(scope) if scope["type"] == "http" and scope.get("method") == "POST" else None
        if recorder is None or endpoint is None:
            return await self.app(scope, receive, send)

        # Read the body (bounded), then replay it to the app; later receive() calls (the app's
        # disconnect watch) go to the server's receive.
        messages: list[dict[str, Any]] = []
        size, complete = 0, False
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                complete = True
                break
            if size > MAX_REQUEST_BYTES:
                break

        async def replay() -> dict[str, Any]:
            return messages.pop(0) if messages else await receive()

        capture = None
        if complete and size <= MAX_REQUEST_BYTES:
            capture = begin(recorder, endpoint, b"".join(m.get("body", b"") for m in messages), scope)
        elif size > MAX_REQUEST_BYTES:
            _once("big", "traffic: request bodies above %d bytes are not recorded", MAX_REQUEST_BYTES)
        if capture is None:
            return await self.app(scope, replay, send)

        header = (REQUEST_ID_HEADER, capture.request_id.encode("latin-1", "replace"))
        add_header = self.switch.add_response_header

        async def tee(message: dict[str, Any]) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                capture.status = message.get("status")
                headers = list(message.get("headers") or ())
                content_type = next((v for k, v in headers if k.lower() == b"content-type"), b"")
                capture.streaming = content_type.startswith(b"text/event-stream")
                if add_header and not any(k.lower() == REQUEST_ID_HEADER for k, _ in headers):
                    message = {**message, "headers": [*headers, header]}
            elif kind == "http.response.body" and capture.status == 200 and not capture.base_model:
                more = message.get("more_body", False)
                capture.feed(message.get("body", b""), more)
                if not more:
                    finish(recorder, capture)  # queued before the last byte is sent: feedback can follow
            await send(message)

        token = CURRENT.set(capture)
        try:
            await self.app(scope, replay, tee)
        finally:
            CURRENT.reset(token)
            if not capture.finished and not capture.base_model and capture.lora_path is not None:
                record_traffic(capture.adapter, "incomplete")  # error status, disconnect, cut stream


def finish(recorder: TrafficRecorder, capture: Capture) -> None:
    """The response is complete: queue the capture (or count it incomplete)."""
    capture.finished = True
    if capture.base_model or capture.lora_path is None:
        return  # the base model answered, or the engine never ran: nothing to record
    if not capture.done or capture.error is not None:
        record_traffic(capture.adapter, "incomplete")
        if capture.error:
            log.debug("traffic: request %s not recorded: %s", capture.request_id, capture.error)
        return
    recorder.submit(capture)


# ----------------------------------------------------------------------------- wiring
def attach_capture(app: Any, settings: ServingSettings) -> CaptureSwitch | None:
    """At attach_router: add the capture middleware when the settings record anything (else nothing
    is added, so serving pays nothing) and make the server's shutdown write what is queued."""
    if not TrafficPolicy(settings).enabled:
        return None
    if vllm_compat.rust_frontend_requested():
        log.warning(
            "traffic: VLLM_USE_RUST_FRONTEND is set: no Python hook sees requests; nothing is recorded"
        )
        return None
    switch = CaptureSwitch()
    vllm_compat.add_asgi_middleware(app, TrafficCaptureMiddleware, switch=switch)

    def close() -> None:
        recorder = switch.stop()
        if recorder is not None:
            recorder.close()
            log.info(
                "traffic: writer closed; queued records written (peak queue depth %d)",
                recorder.writer.peak_depth,
            )

    vllm_compat.on_shutdown(app, close)
    atexit.register(close)  # vLLM may cancel the HTTP server without running the lifespan's end
    return switch


def start_capture(
    switch: CaptureSwitch | None,
    engine_client: Any,
    state: Any,
    args: Namespace,
    settings: ServingSettings,
    version_of: Callable[[str, str], str | None],
) -> TrafficRecorder | None:
    """At init_state: open the database (migrations), start the writer, observe the engine's generate.
    `version_of(adapter, path)` names the version a served path is ('original', a store version id, or
    None: not an adapter of the plugin). Raises DatabaseError or SettingsError (the server must not
    start half-configured)."""
    if switch is None:
        return None
    db = open_database(settings.database_path)
    recorder = TrafficRecorder(settings, db, version_of).start()
    recorder.feedback_trust = FeedbackTrust(settings)  # whose feedback counts (api.feedback)
    recorder.feedback_trust.log_startup(settings.auto_refine)
    clients = vllm_compat.serving_engine_clients(state) or [engine_client]
    for client in clients:
        vllm_compat.observe_generate(client, observe_generate)
    switch.start(recorder, add_response_header=not vllm_compat.request_id_headers_enabled(args))
    log.info(
        "traffic: recording to %s (schema %d; queue %d; redaction %s)",
        db.path,
        db.schema_version(),
        settings.traffic_queue_size,
        settings.traffic_redact,
    )
    return recorder
