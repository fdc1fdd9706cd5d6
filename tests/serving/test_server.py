"""End to end over HTTP: one real `vllm serve` started with `vllm-surgery-serve`, resolving adapters
through SurgeryResolver.

One tiny random Llama (head_dim 64, which vLLM's CPU attention supports), adapters "math" and "code"
in an operator root, a corrupt "broken" one, a valid adapter outside the root (the target a path
traversal would reach) and a symlink escaping the root. "math" is served as the original; "code" gets
a refined version (refine(force=True)) written into the store and marked served while the server runs,
and is requested only afterwards, because vLLM caches a name's resolution for the server's lifetime.
Which weights answered is proven by log-probs: vLLM's must equal transformers+PEFT float32 teacher
forcing on the same tokens for the expected adapter, and differ clearly from the other one.

Slow (engine start 25-70 s on 2 cores): `pytest -m slow tests/serving/test_server.py`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from server import Server, assert_served_by, complete, refine_forced, start_server, stop

from vllm_surgery.testing import ALL_PROJ, build_lora_adapter, build_tiny_llama

pytestmark = pytest.mark.slow

PROMPTS = ["what is 12 + 30 ?", "the quick brown fox"]
LEFTOVER_ID = "20200101T000000000000Z-deadbeef"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("serve")
    base = build_tiny_llama(root / "base", hidden=128, heads=2, kv_heads=2, layers=2, intermediate=256)
    adapters = root / "adapters"
    build_lora_adapter(base, adapters / "math", r=8, alpha=16, target_modules=ALL_PROJ, seed=1)
    build_lora_adapter(base, adapters / "code", r=8, alpha=16, target_modules=ALL_PROJ, seed=2)
    shutil.copytree(adapters / "math", adapters / "broken")
    weights = adapters / "broken" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated: header promises more than is there
    # Valid adapters a traversal or a symlink would reach: the resolver must never serve them.
    shutil.copytree(adapters / "math", root / "outside")
    os.symlink(root / "outside", adapters / "escape")

    # What a refinement killed with SIGKILL leaves in the store: the reserved (empty) version directory,
    # save_adapter's hidden temporary directory and a torn served.json temp file. Start-up removes them.
    code_store = root / "store" / "code"
    (code_store / LEFTOVER_ID).mkdir(parents=True)
    (code_store / f".{LEFTOVER_ID}.tmp-0123456789ab").mkdir()
    (code_store / f".{LEFTOVER_ID}.tmp-0123456789ab" / "adapter_model.safetensors").write_bytes(b"partial")
    (code_store / ".served.json.tmp-abcdef012345").write_text('{"vers')
    # A corrupt served.json: "math" falls back to its original, and the server log must say so.
    (root / "store" / "math").mkdir(parents=True)
    (root / "store" / "math" / "served.json").write_text("{not json")

    # VLLM_PLUGINS stays unset (start_server removes it): vllm-surgery-serve then enables what vLLM
    # loads by default plus the endpoint plugin. No admin token: mutations are refused.
    env = {"VLLM_SURGERY_ADAPTER_DIRS": str(adapters), "VLLM_SURGERY_STORE": str(root / "store")}
    srv = start_server(root, base, env)
    try:
        yield srv
    finally:
        left = stop(srv.proc)
        assert not left, f"processes left behind after SIGTERM (killed now): {left}"


@pytest.fixture(scope="module")
def prompt_ids(server: Server) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server.base)
    return [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def refined_code(server: Server) -> Path:
    """A refined version of "code" written into the store and marked served while the server runs."""
    from vllm_surgery.storage.store import VersionStore

    store = VersionStore(server.root / "store")
    out = refine_forced(server.base, server.root, "code", store.new_version_dir("code"))
    store.set_served("code", out.name)
    return out


@pytest.fixture(scope="module")
def peft_model(server: Server, refined_code: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(server.base, dtype=torch.float32)
    adapters = server.root / "adapters"
    model = PeftModel.from_pretrained(base, adapters / "math", adapter_name="math")
    model.load_adapter(adapters / "code", adapter_name="code")
    model.load_adapter(refined_code, adapter_name="code_refined")
    return model.eval()


def test_unloaded_adapter_is_resolved_and_served_as_original(server, prompt_ids, peft_model) -> None:
    # "math" was never loaded: only the resolver can make this request succeed. It has no refined
    # version, so the original answers (checked against "code", a clearly different adapter).
    assert_served_by(server, "math", prompt_ids, peft_model, expected="math", other="code")
    assert "adapter 'math': serving the original" in server.log_path.read_text()


def test_refined_version_is_served_when_marked(server, prompt_ids, peft_model, refined_code) -> None:
    assert_served_by(server, "code", prompt_ids, peft_model, expected="code_refined", other="code")
    assert f"adapter 'code': serving refined version {refined_code.resolve()}" in server.log_path.read_text()


@pytest.mark.parametrize("name", ["../outside", "../etc", ".hidden", "/abs", "escape", "a/../math", "nope"])
def test_unsafe_or_unknown_names_are_refused(server, prompt_ids, name: str) -> None:
    status, body = complete(server, name, prompt_ids[0])
    assert 400 <= status < 500, (status, body)
    assert "error" in body


def test_broken_adapter_is_refused_and_server_keeps_serving(server, prompt_ids) -> None:
    status, body = complete(server, "broken", prompt_ids[0])
    assert 400 <= status < 500, (status, body)
    assert "adapter 'broken' at" in server.log_path.read_text()
    status, body = complete(server, "math", prompt_ids[0])
    assert status == 200, body
    assert server.proc.poll() is None


def test_leftovers_of_a_killed_refinement_are_removed_at_start(server) -> None:
    code_store = server.root / "store" / "code"
    assert not (code_store / LEFTOVER_ID).exists()
    assert not (code_store / f".{LEFTOVER_ID}.tmp-0123456789ab").exists()
    assert not (code_store / ".served.json.tmp-abcdef012345").exists()
    assert server.log_path.read_text().count("left by an interrupted write") == 3
    status, body = server.get("/v1/surgery/adapters/code")
    assert status == 200, body
    assert LEFTOVER_ID not in {v["id"] for v in body["versions"]}
    for version in body["versions"]:
        assert (code_store / version["id"] / "surgery.json").is_file()


def test_store_warnings_reach_the_server_log(server, prompt_ids) -> None:
    assert complete(server, "math", prompt_ids[0])[0] == 200
    served = server.root / "store" / "math" / "served.json"
    lines = [line for line in server.log_path.read_text().splitlines() if f"{served}: unreadable" in line]
    assert lines and "serving the original adapter" in lines[0], server.log_tail()
    assert "WARNING" in lines[0]  # vLLM's format: the plugin logs under the "vllm." logger tree


def test_without_an_admin_token_nothing_that_changes_weights_is_allowed(server) -> None:
    assert "no admin token (VLLM_SURGERY_ADMIN_TOKEN)" in server.log_path.read_text()
    for path, body in [
        ("/v1/surgery/adapters/math/swap", {"version": "original"}),
        ("/v1/surgery/adapters/math/rollback", {}),
        ("/v1/surgery/adapters/math/refine", {"records": [{"prompt": "1 +", "completion": " 1"}]}),
        ("/v1/load_lora_adapter", {"lora_name": "o", "lora_path": str(server.root / "outside")}),
        ("/v1/unload_lora_adapter", {"lora_name": "math"}),
    ]:
        status, answer = server.post(path, body)
        assert status == 403, (path, answer)
        assert "VLLM_SURGERY_ADMIN_TOKEN" in answer["error"]["message"], (path, answer)
    assert server.get("/v1/surgery/adapters/math")[0] == 200  # reading needs no token
