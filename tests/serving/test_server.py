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

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tiny import ALL_PROJ, build_lora_adapter, build_tiny_llama, write_calibration

pytestmark = pytest.mark.slow

PROMPTS = ["what is 12 + 30 ?", "the quick brown fox"]
NEW_TOKENS = 6
LOGPROB_TOL = 1e-3  # float32 on both sides; observed differences are ~1e-6
MIN_ADAPTER_GAP = 1e-2  # refined vs original log-probs must differ by more than this somewhere
STARTUP_TIMEOUT_S = 180.0  # ~25 s idle; a loaded 2-core machine has taken 70 s
REQUEST_TIMEOUT_S = 60.0


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: Path
    root: Path
    base: Path

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_members(pgid: int) -> list[str]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(f"{stat.parent.name} {text[: text.rindex(')') + 1]}")
    return out


def stop(proc: subprocess.Popen) -> list[str]:
    """SIGTERM the server (vLLM stops engine and workers itself), then make sure its group is gone."""
    pgid = proc.pid  # start_new_session=True: the server leads its own process group
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while (left := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        os.killpg(pgid, signal.SIGKILL)
    return left


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

    port = free_port()
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_SURGERY_ADAPTER_DIRS": str(adapters),
        "VLLM_SURGERY_STORE": str(root / "store"),
    }
    env.pop("VLLM_SURGERY_CONFIG", None)
    env.pop("VLLM_PLUGINS", None)
    launcher = Path(sys.executable).parent / "vllm-surgery-serve"
    cmd = [
        str(launcher), str(base),
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "256", "--enforce-eager", "--seed", "0",
        "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2", "--max-num-seqs", "4",
    ]  # fmt: skip
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    srv = Server(url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path, root=root, base=base)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode} during startup:\n{srv.log_tail()}")
            try:
                with urllib.request.urlopen(srv.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S:.0f} s:\n{srv.log_tail()}")
            time.sleep(0.25)
        yield srv
    finally:
        left = stop(proc)
        assert not left, f"processes left behind after SIGTERM (killed now): {left}"


@pytest.fixture(scope="module")
def prompt_ids(server: Server) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server.base)
    return [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def refined_code(server: Server) -> Path:
    """A refined version of "code" written into the store and marked served while the server runs."""
    from vllm_surgery.refine import refine
    from vllm_surgery.serving.store import VersionStore

    store = VersionStore(server.root / "store")
    out = store.new_version_dir("code")
    calib = write_calibration(server.root / "calib.jsonl", n=16)
    result = refine(
        server.base, server.root / "adapters" / "code", calib, out,
        policy="grad_direction", modules="all", device="cpu", force=True, progress=False,
    )  # fmt: skip
    assert result.written
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


def complete(server: Server, model: str, ids: list[int]) -> tuple[int, dict]:
    return server.post(
        "/v1/completions",
        {
            "model": model,
            "prompt": ids,
            "max_tokens": NEW_TOKENS,
            "temperature": 0.0,
            "logprobs": 1,
            "ignore_eos": True,
            "return_tokens_as_token_ids": True,
        },
    )


def generated(body: dict) -> tuple[list[int], list[float]]:
    lp = body["choices"][0]["logprobs"]
    tokens = [int(t.removeprefix("token_id:")) for t in lp["tokens"]]
    return tokens, lp["token_logprobs"]


def teacher_forced(model, adapter: str, ids: list[int], gen: list[int]) -> list[float]:
    model.set_adapter(adapter)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids + gen])).logits[0].double()
    logp = torch.log_softmax(logits[len(ids) - 1 : len(ids) - 1 + len(gen)], dim=-1)
    return logp.gather(1, torch.tensor(gen).unsqueeze(1)).squeeze(1).tolist()


def assert_served_by(server: Server, name: str, prompt_ids, peft_model, expected: str, other: str) -> None:
    gap = 0.0
    for ids in prompt_ids:
        status, body = complete(server, name, ids)
        assert status == 200, f"{name}: {status} {body}\n{server.log_tail()}"
        gen, vllm_lp = generated(body)
        assert len(gen) == NEW_TOKENS
        want = teacher_forced(peft_model, expected, ids, gen)
        assert max(abs(a - b) for a, b in zip(vllm_lp, want, strict=True)) < LOGPROB_TOL, (vllm_lp, want)
        alt = teacher_forced(peft_model, other, ids, gen)
        gap = max(gap, max(abs(a - b) for a, b in zip(vllm_lp, alt, strict=True)))
    assert gap > MIN_ADAPTER_GAP, f"{name}: {expected!r} and {other!r} are indistinguishable here ({gap})"


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
