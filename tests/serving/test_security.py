"""Against a real server: only the admin token changes what is served, every bad request is a
4xx with a message, and what the listing calls servable is what a swap accepts.

One `vllm serve` (via `vllm-surgery-serve`, --api-key, an admin token, --max-lora-rank 8, float32)
with adapter "x" in the operator root, two originals that load but cannot be served here ("wide":
lora_A with 96 input features for 128-wide layers; "huge": finite weights whose update overflows
float32), a valid adapter outside every root, and store versions of "x" that are good, NaN, truncated,
rank 16, too narrow, overflowing, and a symlink out of the store.

Slow (engine start 25-70 s on 2 cores): `pytest -m slow tests/serving/test_security.py`.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator

import pytest
from bad_adapters import copy_adapter, nan_in_first, narrow_first_lora_a, scaled, write_version
from server import Server, complete, start_server, stop

from vllm_surgery.testing import ALL_PROJ, build_lora_adapter, build_tiny_llama

pytestmark = pytest.mark.slow

API_KEY = "sec-api-key"
ADMIN_TOKEN = "sec-admin-token"
ADMIN = {"X-Surgery-Admin-Token": ADMIN_TOKEN}
IDS = [5, 6, 7, 8, 9]
# version id -> (what makes it unservable, a phrase its reason must contain); "v-good" is servable
BAD_VERSIONS = {
    "v-nan": "NaN",
    "v-truncated": "cannot be read as safetensors",
    "v-rank16": "exceeds this server's --max-lora-rank 8",
    "v-narrow": "trained for another base model",
    "v-huge": "overflows torch.float32",
    "v-linked": "outside",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("security")
    base = build_tiny_llama(root / "base", hidden=128, heads=2, kv_heads=2, layers=2, intermediate=256)
    adapters = root / "adapters"
    x = build_lora_adapter(base, adapters / "x", r=8, alpha=16, target_modules=ALL_PROJ, seed=1)
    copy_adapter(x, adapters / "wide", narrow_first_lora_a(96))
    copy_adapter(x, adapters / "huge", scaled(1e30))
    build_lora_adapter(base, root / "outside" / "evil", r=8, alpha=16, seed=3)
    r16 = build_lora_adapter(base, root / "r16", r=16, alpha=32, seed=4)

    store = root / "store"
    write_version(store, "x", "v-good", x, x, scaled(0.5))
    write_version(store, "x", "v-nan", x, x, nan_in_first())
    truncated = write_version(store, "x", "v-truncated", x, x)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    write_version(store, "x", "v-rank16", r16, x)
    write_version(store, "x", "v-narrow", x, x, narrow_first_lora_a(96))
    write_version(store, "x", "v-huge", x, x, scaled(1e30))
    elsewhere = write_version(root / "elsewhere", "x", "v-linked", x, x, scaled(0.5))  # valid, but outside
    os.symlink(elsewhere, store / "x" / "v-linked")

    env = {
        "VLLM_SURGERY_ADAPTER_DIRS": str(adapters),
        "VLLM_SURGERY_STORE": str(store),
        "VLLM_PLUGINS": "vllm_surgery,vllm_surgery_api",
        "VLLM_SURGERY_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    srv = start_server(
        root, base, env, ["--api-key", API_KEY], headers={"Authorization": f"Bearer {API_KEY}"}
    )
    try:
        yield srv
    finally:
        left = stop(srv.proc)
        assert not left, f"processes left behind after SIGTERM (killed now): {left}"


def swap(server: Server, version: str, name: str = "x") -> tuple[int, dict]:
    return server.post(f"/v1/surgery/adapters/{name}/swap", {"version": version}, headers=ADMIN)


def served_models(server: Server) -> set[str]:
    status, body = server.get("/v1/models")
    assert status == 200, body
    return {m["id"] for m in body["data"]}


def message(body: dict) -> str:
    return body["error"]["message"]


# --------------------------------------------------------------------------------------- servability
def test_listing_tells_the_truth(server: Server) -> None:
    status, body = server.get("/v1/surgery/adapters/x")
    assert status == 200, body
    versions = {v["id"]: v for v in body["versions"]}
    assert set(versions) == {"v-good", *BAD_VERSIONS}
    assert versions["v-good"]["servable"] is True and versions["v-good"]["reason"] is None
    for version, phrase in BAD_VERSIONS.items():
        assert versions[version]["servable"] is False, versions[version]
        assert phrase in versions[version]["reason"], (version, versions[version]["reason"])


def test_swap_refuses_exactly_what_the_listing_calls_unservable(server: Server) -> None:
    assert complete(server, "x", IDS)[0] == 200  # "x" resolved, serving its original
    listed = {v["id"]: v["reason"] for v in server.get("/v1/surgery/adapters/x")[1]["versions"]}
    for version in BAD_VERSIONS:
        status, body = swap(server, version)
        assert status == 422, (version, status, body)
        assert message(body) == listed[version]  # one check behind both
        status, body = complete(server, "x", IDS)  # the old version keeps serving, and answers
        assert status == 200, (version, body, server.log_tail())
    _, x = server.get("/v1/surgery/adapters/x")
    assert x["served_version"] == "original"
    assert not (server.root / "store" / "x" / "served.json").exists()
    status, body = swap(server, "v-good")
    assert status == 200 and body["changed"], body
    assert complete(server, "x", IDS)[0] == 200
    assert swap(server, "original")[0] == 200


@pytest.mark.parametrize(
    ("name", "phrase"), [("wide", "trained for another base model"), ("huge", "overflows")]
)
def test_originals_that_cannot_be_served_here_are_not_resolved(
    server: Server, name: str, phrase: str
) -> None:
    status, body = complete(server, name, IDS)
    assert status == 404, body
    lines = [line for line in server.log_path.read_text().splitlines() if f"adapter {name!r} at" in line]
    assert any("is not servable" in line and phrase in line for line in lines), lines
    assert complete(server, "x", IDS)[0] == 200  # and the next request to another adapter is fine


# --------------------------------------------------------------------------------------- runtime routes
def load(server: Server, headers: dict | None = None, **body) -> tuple[int, dict]:
    return server.post("/v1/load_lora_adapter", body, headers=headers)


def test_the_api_key_alone_cannot_load_replace_or_unload(server: Server) -> None:
    evil = str(server.root / "outside" / "evil")
    status, body = load(server, lora_name="evil", lora_path=evil)
    assert status == 403 and "admin token" in message(body), body
    status, body = load(server, lora_name="x", lora_path=evil, load_inplace=True)
    assert status == 403 and "admin token" in message(body), body
    assert complete(server, "x", IDS)[0] == 200  # "x" is loaded
    status, body = server.post("/v1/unload_lora_adapter", {"lora_name": "x"})
    assert status == 403 and "admin token" in message(body), body
    assert "evil" not in served_models(server) and "x" in served_models(server)


def test_even_the_admin_loads_only_validated_adapters_from_the_roots_or_store(server: Server) -> None:
    evil = str(server.root / "outside" / "evil")
    status, body = load(server, ADMIN, lora_name="evil", lora_path=evil)
    assert status == 403 and "neither an original adapter" in message(body), body
    status, body = load(server, ADMIN, lora_name="x", lora_path=evil, load_inplace=True)
    assert status == 400 and "load_inplace is refused" in message(body) and "/swap" in message(body), body
    store_x = server.root / "store" / "x"
    status, body = load(server, ADMIN, lora_name="x", lora_path=str(store_x / "v-good"))
    assert status == 409 and "managed by vllm-surgery" in message(body), body
    status, body = load(server, ADMIN, lora_name="x-huge", lora_path=str(store_x / "v-huge"))
    assert status == 422 and "overflows" in message(body), body
    status, body = load(server, ADMIN, lora_name="x-linked", lora_path=str(store_x / "v-linked"))
    assert status == 403, body  # resolves outside the store
    status, body = load(server, ADMIN, lora_name="rel", lora_path="store/x/v-good")
    assert status == 400 and "absolute" in message(body), body
    status, body = load(server, ADMIN, lora_name="x-good", lora_path=str(store_x / "v-good"), extra=1)
    assert status == 400 and "unknown field" in message(body), body
    assert not {"evil", "x-huge", "x-linked", "rel"} & served_models(server)
    # What the route is for: a store version under a new, never reused name.
    status, body = load(server, ADMIN, lora_name="x-good", lora_path=str(store_x / "v-good"))
    assert status == 200, (body, server.log_tail())
    assert complete(server, "x-good", IDS)[0] == 200
    assert server.post("/v1/unload_lora_adapter", {"lora_name": "x-good"})[0] == 403
    status, body = server.post("/v1/unload_lora_adapter", {"lora_name": "x-good"}, headers=ADMIN)
    assert status == 200, body
    assert "x-good" not in served_models(server)


def test_sagemaker_adapter_routes_are_switched_off(server: Server) -> None:
    bare = {"Authorization": ""}  # they lie outside /v1, where --api-key does not reach
    evil = str(server.root / "outside" / "evil")
    status, body = server.post("/adapters", {"name": "evil", "src": evil}, headers=bare)
    assert status == 403 and "switched off" in message(body), body
    status, body = server.request("DELETE", "/adapters/x", headers=bare)
    assert status == 403 and "switched off" in message(body), body
    assert "evil" not in served_models(server)


# --------------------------------------------------------------------------------------- bad requests
RECORDS = [{"prompt": "1 + 1 =", "completion": " 2"}, {"prompt": "2 + 2 =", "completion": " 4"}]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("modules", 5),
        ("layers", [0]),
        ("layers", [0, 1, 2]),
        ("layers", {}),
        ("samples", 2.5),
        ("seed", "x"),
        ("seed", 2**70),
    ],
)
def test_refine_body_of_the_wrong_type_is_a_400_naming_the_field(server: Server, field: str, value) -> None:
    status, body = server.post("/v1/surgery/adapters/x/refine", {"records": RECORDS, field: value}, ADMIN)
    assert status == 400, body
    assert field in message(body)


def post_raw(
    server: Server, path: str, data: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    all_headers = {"Content-Type": "application/json", **server.headers, **ADMIN, **(headers or {})}
    req = urllib.request.Request(server.url + path, data=data, headers=all_headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("route", ["swap", "refine"])
def test_deeply_nested_unknown_or_broken_bodies_are_400(server: Server, route: str) -> None:
    path = f"/v1/surgery/adapters/x/{route}"
    deep = b"[" * 20_000 + b"]" * 20_000  # 40 kB, under the size bound: Python's parser recurses
    status, body = post_raw(server, path, deep)
    assert status == 400 and "nested too deeply" in message(body), body
    nested = b'{"version": "original", "records": ' + b"[" * 200 + b"]" * 200 + b"}"
    status, body = post_raw(server, path, nested)
    assert status == 400 and "nested deeper than" in message(body), body
    status, body = post_raw(server, path, b"{not json")
    assert status == 400 and "not valid JSON" in message(body), body
    status, body = post_raw(server, path, b'{"version": "original", "colour": "red"}')
    assert status == 400 and "unknown field" in message(body) and "colour" in message(body), body


def test_a_200_mb_body_is_refused_before_it_is_read(server: Server) -> None:
    declared = 200 * 1024 * 1024
    host, port = server.url.removeprefix("http://").split(":")
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        head = (
            f"POST /v1/surgery/adapters/x/swap HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {API_KEY}\r\nX-Surgery-Admin-Token: {ADMIN_TOKEN}\r\n"
            f"Content-Length: {declared}\r\n\r\n"
        )
        s.sendall(head.encode() + b'{"version": "' + b"a" * 65536)  # then nothing more
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    seconds = time.monotonic() - start
    status_line, _, rest = reply.partition(b"\r\n")
    assert b" 413 " in status_line, reply[:500]
    assert b"exceeds the limit" in rest
    assert seconds < 10, seconds  # answered at once, not after waiting for 200 MB


def test_no_request_above_produced_a_traceback(server: Server) -> None:
    log = server.log_path.read_text()
    assert "Exception in ASGI application" not in log
    assert "Traceback" not in log, log[log.find("Traceback") - 2000 : log.find("Traceback") + 3000]
    assert server.proc.poll() is None
