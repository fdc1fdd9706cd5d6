"""Held-out quality: the answer-token loss of an adapter, with what the gate (`gate.py`) needs per example."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .adapted_model import AdaptedModel
from .calibration import Example, collate
from .memory import TokenBudget, run_in_batches
from .sensitivity import autocast_for, plan_batches


@dataclass(frozen=True)
class Quality:
    """Token-weighted mean answer-token cross-entropy (nats) over a set of examples.

    example_loss_sums and example_tokens (per example, in the order of the examples) are what the gate's
    paired, token-weighted statistics need: loss == sum(example_loss_sums) / sum(example_tokens).
    """

    loss: float
    answer_tokens: int
    example_loss_sums: tuple[float, ...]
    example_tokens: tuple[int, ...]

    @property
    def per_example(self) -> tuple[float, ...]:
        """Mean answer-token loss of each example."""
        return tuple(s / t for s, t in zip(self.example_loss_sums, self.example_tokens, strict=True))

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("example_loss_sums")
        d.pop("example_tokens")
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
            losses = adapted.answer_losses(batch).double().cpu()
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
        example_loss_sums=tuple(sums.tolist()),
        example_tokens=tuple(int(c) for c in counts.tolist()),
    )
