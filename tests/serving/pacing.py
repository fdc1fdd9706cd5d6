"""A vLLM logits processor that paces a request's decoding, for tests that need a response to be
still generating while something else happens (a hot-swap mid-stream).

A fixed token count cannot promise that: 240 tokens of the tiny test model took seconds on this
project's 2-core machines and finished before the swap call returned on a fast CI machine. A request
that asks for it (`"vllm_xargs": {"pace_ms": 20}`) makes every engine step sleep that long while it
is in the batch, so its stream lasts at least max_tokens x pace_ms on any machine. The logits are
returned unchanged: the answer and its log-probs are exactly what they would have been.

Loaded by the engine process: start the server with `--logits-processors pacing:PacedDecoding` and
this directory on PYTHONPATH (`SERVER_ARGS` and `server_env()` below).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

ARG = "pace_ms"
SERVER_ARGS = ["--logits-processors", "pacing:PacedDecoding"]


def server_env() -> dict[str, str]:
    """PYTHONPATH for a server that loads this module (the engine runs in its own process)."""
    here = str(Path(__file__).resolve().parent)
    return {"PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}


def paced(ms: float) -> dict[str, dict[str, float]]:
    """The request-body fields that pace a request at `ms` per engine step."""
    return {"vllm_xargs": {ARG: ms}}


class PacedDecoding(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.pace_s: dict[int, float] = {}  # batch index -> seconds per step

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        ms = (sampling_params.extra_args or {}).get(ARG)
        if ms is not None and not (isinstance(ms, (int, float)) and 0 < ms <= 1000):
            raise ValueError(f"{ARG} must be a number of milliseconds in (0, 1000], got {ms!r}")

    def is_argmax_invariant(self) -> bool:
        return False  # applied to greedy requests too (argmax-invariant processors are skipped there)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def state(params: SamplingParams, _prompt, _output) -> float | None:
            ms = (params.extra_args or {}).get(ARG)
            return None if ms is None else ms / 1000

        process_dict_updates(self.pace_s, batch_update, state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.pace_s:
            time.sleep(max(self.pace_s.values()))
        return logits
