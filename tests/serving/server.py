"""Starting and stopping one real `vllm serve` (via `vllm-surgery-serve`) for slow serving tests,
plus the completion and teacher-forcing helpers that prove which adapter weights answered."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vllm_surgery.server_process import (
    REQUEST_TIMEOUT_S,
    ServerProcess,
    ServerStartError,
    stop_process,
)
from vllm_surgery.server_process import start_server as _start

NEW_TOKENS = 6
LOGPROB_TOL = 1e-3  # float32 on both sides; observed differences are ~1e-6
MIN_ADAPTER_GAP = 1e-2  # two different adapters' log-probs must differ by more than this somewhere
__all__ = ["REQUEST_TIMEOUT_S", "Server", "start_server", "stop"]


class Server(ServerProcess):
    """A test server: `root` is its work directory, `base` its model."""

    @property
    def root(self) -> Path:
        return self.workdir

    @property
    def base(self) -> Path:
        return self.model

    def get_text(self, path: str) -> str:
        return self.text(path)


def start_server(
    root: Path,
    base: Path,
    env_extra: dict[str, str],
    extra_args: list[str] = (),
    headers: dict[str, str] | None = None,
) -> Server:
    """Start `vllm-surgery-serve BASE` on a free port and wait until /health answers (fails the test
    with the log tail otherwise). The caller must `stop(server.proc)` or `server.stop()`."""
    try:
        return _start(base, root, env_extra, extra_args, headers=headers, cls=Server)
    except ServerStartError as e:
        pytest.fail(str(e))


stop = stop_process  # SIGTERM the server (vLLM stops engine and workers itself), then make sure its group is gone


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


def metric(server: Server, name: str, **labels: str) -> float:
    """A sample of the server's /metrics by name and labels (0.0 when absent: a counter not yet counted)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(server.text("/metrics")):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0
