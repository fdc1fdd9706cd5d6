"""Starting and stopping one real `vllm serve` (via `vllm-surgery-serve`) for slow serving tests,
plus the completion and teacher-forcing helpers that prove which adapter weights answered."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

NEW_TOKENS = 6
LOGPROB_TOL = 1e-3  # float32 on both sides; observed differences are ~1e-6
MIN_ADAPTER_GAP = 1e-2  # two different adapters' log-probs must differ by more than this somewhere
STARTUP_TIMEOUT_S = 180.0  # ~25 s idle; a loaded 2-core machine has taken 70 s
REQUEST_TIMEOUT_S = 60.0


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: Path
    root: Path
    base: Path
    headers: dict[str, str] = field(default_factory=dict)  # sent with every request (e.g. the API key)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def request(
        self, method: str, path: str, body: dict | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict]:
        all_headers = {"Content-Type": "application/json", **self.headers, **(headers or {})}
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=all_headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as response:
                return response.status, _json_or_raw(response.read())
        except urllib.error.HTTPError as e:
            return e.code, _json_or_raw(e.read() or b"{}")

    def post(self, path: str, body: dict, headers: dict[str, str] | None = None) -> tuple[int, dict]:
        return self.request("POST", path, body, headers)

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
        return self.request("GET", path, None, headers)

    def get_text(self, path: str) -> str:
        req = urllib.request.Request(self.url + path, headers=self.headers)
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as response:
            return response.read().decode()


def _json_or_raw(raw: bytes) -> dict:
    """A JSON answer, or {"raw": text} for the plain-text ones (vLLM's load/unload answer text)."""
    try:
        return json.loads(raw)
    except ValueError:
        return {"raw": raw.decode(errors="replace")}


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


def start_server(
    root: Path,
    base: Path,
    env_extra: dict[str, str],
    extra_args: list[str] = (),
    headers: dict[str, str] | None = None,
) -> Server:
    """Start `vllm-surgery-serve BASE` on a free port and wait until /health answers (fails the test
    with the log tail otherwise). The caller must `stop(server.proc)`."""
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    for key in ("VLLM_SURGERY_CONFIG", "VLLM_PLUGINS", "VLLM_API_KEY", "VLLM_SURGERY_ADMIN_TOKEN"):
        env.pop(key, None)
    env.update(env_extra)
    launcher = Path(sys.executable).parent / "vllm-surgery-serve"
    cmd = [
        str(launcher), str(base),
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "256", "--enforce-eager", "--seed", "0",
        "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2", "--max-num-seqs", "4",
        *extra_args,
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
    srv = Server(
        url=f"http://127.0.0.1:{port}",
        proc=proc,
        log_path=log_path,
        root=root,
        base=base,
        headers=headers or {},
    )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode} during startup:\n{srv.log_tail()}")
        try:
            with urllib.request.urlopen(srv.url + "/health", timeout=2) as r:
                if r.status == 200:
                    return srv
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop(proc)
            pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S:.0f} s:\n{srv.log_tail()}")
        time.sleep(0.25)


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
    """Every prompt's vLLM log-probs equal `expected`'s (teacher forcing) and differ from `other`'s."""
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
