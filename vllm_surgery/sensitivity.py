"""The sensitivity pass: dL/dsigma for every edited singular value over the whole calibration set.

L is the mean cross-entropy over ALL answer tokens of the calibration set (not a sum of per-batch
means), so the result does not depend on how examples are batched. Each batch contributes
sum(token losses) / total_answer_tokens; gradients accumulate on the sigma leaves on the device
and are read once at the end. Only sigma requires a gradient: no weight gradient is ever formed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .adapted_model import AdaptedModel
from .calibration import Example, collate, token_budget_batches
from .precision import autocast_for


def default_batch_tokens(device: torch.device) -> int:
    """Token budget per batch: big enough to keep the matmuls efficient, small enough for memory."""
    # CPU: measured on SmolLM2-135M (benchmarks/RESULTS.md), 512 was fastest and used 0.3x the memory of
    # the straightforward pass; larger batches only add padding and activation memory on 2-16 cores.
    return 16384 if device.type == "cuda" else 512


@dataclass
class PassStats:
    examples: int
    answer_tokens: int
    tokens: int
    padded_tokens: int
    batches: int
    seconds: float

    @property
    def answer_tokens_per_s(self) -> float:
        return self.answer_tokens / self.seconds if self.seconds > 0 else float("nan")


def compute_sensitivities(
    adapted: AdaptedModel,
    examples: Sequence[Example],
    *,
    max_batch_tokens: int | None = None,
    pad_id: int = 0,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], PassStats]:
    """g[name][k] = dL/dsigma_k for every module whose sigma is free in `adapted` (float32, on CPU)."""
    if not examples:
        raise ValueError("the sensitivity pass needs at least one calibration example")
    device = adapted.device
    budget = max_batch_tokens or default_batch_tokens(device)
    total = sum(len(e.answer_ids) for e in examples)
    for sigma in adapted.sigma.values():
        sigma.grad = None
    batches = token_budget_batches(examples, budget)
    start = time.perf_counter()
    padded = 0
    bar = tqdm(total=total, desc="sensitivity", unit="tok", disable=not progress, leave=False)
    adapted.model.eval()
    for idx in batches:
        batch = collate([examples[i] for i in idx], pad_id, device)
        padded += batch.input_ids.numel()
        with autocast_for(device):
            losses = adapted.answer_losses(batch)
        (losses.sum() / total).backward()
        bar.update(int(batch.targets.numel()))
    bar.close()
    grads = {
        name: (s.grad.detach().float().cpu() if s.grad is not None else torch.zeros_like(s, device="cpu"))
        for name, s in adapted.sigma.items()
    }
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats = PassStats(
        examples=len(examples),
        answer_tokens=total,
        tokens=sum(e.length for e in examples),
        padded_tokens=padded,
        batches=len(batches),
        seconds=time.perf_counter() - start,
    )
    for sigma in adapted.sigma.values():
        sigma.grad = None
    return grads, stats
