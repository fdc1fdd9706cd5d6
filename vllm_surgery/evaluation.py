"""Held-out quality: the answer-token loss of an adapter, and whether a candidate measurably beats it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .adapted_model import AdaptedModel
from .calibration import Example, collate, token_budget_batches
from .sensitivity import autocast_for, default_batch_tokens


@dataclass(frozen=True)
class Quality:
    """Mean answer-token cross-entropy (nats) and its per-example values, for paired comparisons."""

    loss: float
    answer_tokens: int
    per_example: tuple[float, ...]

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("per_example")
        d["perplexity"] = self.perplexity
        return d


@torch.inference_mode()
def heldout_quality(
    adapted: AdaptedModel,
    examples: Sequence[Example],
    *,
    max_batch_tokens: int | None = None,
    pad_id: int = 0,
    progress: bool = False,
    desc: str = "held-out",
) -> Quality:
    """Token-weighted mean answer loss, the same quantity the sensitivity pass differentiates."""
    device = adapted.device
    budget = max_batch_tokens or default_batch_tokens(device)
    sums = torch.zeros(len(examples), dtype=torch.float64)
    counts = torch.zeros(len(examples), dtype=torch.float64)
    for idx in tqdm(token_budget_batches(examples, budget), desc=desc, disable=not progress, leave=False):
        batch = collate([examples[i] for i in idx], pad_id, device)
        with autocast_for(device):
            losses = adapted.answer_losses(batch).double().cpu()
        owner = torch.tensor(idx, dtype=torch.long)[batch.example_index.cpu()]
        sums.index_add_(0, owner, losses)
        counts.index_add_(0, owner, torch.ones_like(losses))
    total = float(counts.sum())
    return Quality(
        loss=float(sums.sum()) / total,
        answer_tokens=int(total),
        per_example=tuple((sums / counts).tolist()),
    )


def paired_improvement(before: Quality, after: Quality) -> tuple[float, float]:
    """(relative loss improvement, its standard error from the per-example paired differences)."""
    diff = torch.tensor(before.per_example, dtype=torch.float64) - torch.tensor(
        after.per_example, dtype=torch.float64
    )
    n = diff.numel()
    se = float(diff.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("inf")
    rel = (before.loss - after.loss) / before.loss if before.loss > 0 else 0.0
    return rel, se / before.loss if before.loss > 0 else float("inf")
