"""Held-out quality: the answer-token loss of an adapter, and whether a candidate measurably beats it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .activations import answer_losses
from .adapted_model import AdaptedModel
from .calibration import Example, collate
from .memory import TokenBudget, run_in_batches
from .sensitivity import autocast_for, plan_batches


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


def evaluation_budget(adapted: AdaptedModel, max_batch_tokens: int | None = None) -> TokenBudget:
    """A token budget for held-out evaluations, to share between the evaluations of one run.

    No graph is kept, so on CUDA it is planned far larger than the sensitivity pass's; a back-off
    taken by one evaluation holds for the later ones.
    """
    return TokenBudget(plan_batches(adapted.model, adapted.device, max_batch_tokens, evaluation=True))


@torch.inference_mode()
def heldout_quality(
    adapted: AdaptedModel,
    examples: Sequence[Example],
    *,
    max_batch_tokens: int | None = None,
    pad_id: int = 0,
    progress: bool = False,
    desc: str = "held-out",
    budget: TokenBudget | None = None,
) -> Quality:
    """Token-weighted mean answer loss, the same quantity the sensitivity pass differentiates.

    budget: shared by the evaluations of one run (see evaluation_budget); made here when None.
    Raises DeviceMemoryError when a single example does not fit in the device's memory.
    """
    device = adapted.device
    budget = budget or evaluation_budget(adapted, max_batch_tokens)
    sums = torch.zeros(len(examples), dtype=torch.float64)
    counts = torch.zeros(len(examples), dtype=torch.float64)
    bar = tqdm(total=len(examples), desc=desc, unit="ex", disable=not progress, leave=False)

    def step(idx: list[int]) -> None:
        batch = collate([examples[i] for i in idx], pad_id, device)
        with autocast_for(device):
            losses = answer_losses(adapted.model, batch).double().cpu()
        owner = torch.tensor(idx, dtype=torch.long)[batch.example_index.cpu()]
        sums.index_add_(0, owner, losses)  # only once the whole batch succeeded
        counts.index_add_(0, owner, torch.ones_like(losses))
        bar.update(len(idx))

    run_in_batches(examples, budget, step, device=device, what=f"{desc} evaluation")
    bar.close()
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
