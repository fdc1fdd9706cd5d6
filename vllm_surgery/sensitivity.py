"""The sensitivity pass: dL/dsigma for every edited singular value over the whole calibration set.

L is the mean cross-entropy over ALL answer tokens of the calibration set (not a sum of per-batch
means), so the result does not depend on how examples are batched; where examples carry weights
(calibration.weighted: corrections weigh more), L is the weighted mean. Each batch contributes
sum(token losses) / total_answer_tokens; its sigma gradients are added to an accumulator on the device
only once its backward has finished, so a batch that runs out of memory midway is simply run again in
smaller batches (vllm_surgery.memory.run_in_batches) without counting twice. The accumulators are read
once at the end. Only sigma requires a gradient: no weight gradient is ever formed.

How many tokens a batch holds is chosen from the device's free memory and the model's shape
(vllm_surgery.memory), unless max_batch_tokens says; the answer logits are formed in chunks and,
where memory is short, the first decoder layers are recomputed in the backward
(vllm_surgery.activations).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from .activations import LeanActivations, RecomputedLayers
from .adapted_model import AdaptedModel
from .calibration import Example, collate
from .memory import (
    CPU_BATCH_TOKENS,
    BudgetPlan,
    DeviceMemory,
    ModelShape,
    TokenBudget,
    activation_bytes,
    device_memory,
    plan_evaluation,
    plan_pass,
    run_in_batches,
)
from .precision import autocast_for

log = logging.getLogger(__name__)


def plan_batches(
    model: torch.nn.Module,
    device: torch.device,
    max_batch_tokens: int | None,
    *,
    evaluation: bool = False,
    recompute: str = "auto",
    scale: float = 1.0,
    memory: DeviceMemory | None = None,
    lean: bool = False,
) -> BudgetPlan:
    """The token budget of a pass (or, with evaluation=True, of a held-out evaluation) on `device`.

    An explicit max_batch_tokens wins (with recompute "all" honoured); on the CPU the measured default;
    on CUDA (or with `memory`) the plan of vllm_surgery.memory from the memory usable at this moment.
    """
    memory = memory or device_memory(device)
    if max_batch_tokens or memory is None:
        k = ModelShape.of(model.config, 4).layers if recompute == "all" and not evaluation else 0
        source = "explicit" if max_batch_tokens else "cpu default"
        return BudgetPlan(max_batch_tokens or CPU_BATCH_TOKENS, k, source)
    shape = ModelShape.of(model.config, activation_bytes(model, device))
    if evaluation:
        return plan_evaluation(shape, memory.usable())
    return plan_pass(shape, memory.usable(), scale=scale, recompute=recompute, lean=lean)


@dataclass
class PassStats:
    examples: int
    answer_tokens: int
    tokens: int
    padded_tokens: int
    batches: int
    seconds: float
    batch_tokens: int = 0  # the budget planned at the start
    final_batch_tokens: int = 0  # after any back-off
    budget_source: str = ""
    recomputed_layers: int = 0
    lean_modules: int = 0  # norms and MLPs run under LeanActivations
    backoffs: list[str] = field(default_factory=list)
    peak_bytes: int | None = None  # CUDA: max allocated above the level at the start
    loss: float = float("nan")  # the (weighted) mean answer loss L that was differentiated

    @property
    def answer_tokens_per_s(self) -> float:
        return self.answer_tokens / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        return asdict(self) | {"answer_tokens_per_s": self.answer_tokens_per_s}


def compute_sensitivities(
    adapted: AdaptedModel,
    examples: Sequence[Example],
    *,
    max_batch_tokens: int | None = None,
    pad_id: int = 0,
    progress: bool = True,
    recompute: str = "auto",
    lean: str = "auto",
    memory: DeviceMemory | None = None,
) -> tuple[dict[str, torch.Tensor], PassStats]:
    """g[name][k] = dL/dsigma_k for every module whose sigma is free in `adapted` (float32, on CPU).

    recompute: "auto" (recompute decoder layers only where memory is short), "off" or "all".
    lean: LeanActivations "on", "off", or "auto" (on with CUDA: on the CPU the extra elementwise work
        costs more time than the memory it saves is worth).
    memory: the device's memory counters (default: CUDA's; none on the CPU, where the budget is fixed).
    Raises DeviceMemoryError when a single example does not fit in the device's memory.
    """
    if not examples:
        raise ValueError("the sensitivity pass needs at least one calibration example")
    device = adapted.device
    model = adapted.model
    total = sum(len(e.answer_ids) for e in examples)
    weighted_total = sum(e.weighted_tokens for e in examples)
    if not weighted_total > 0:
        raise ValueError("the calibration examples' weights must give a positive total")
    sigmas = adapted.sigma
    for sigma in sigmas.values():
        sigma.grad = None
    memory = memory or device_memory(device)
    if memory is not None:
        memory.start()  # the first batch's peak is the probe; the whole pass's is reported
    if lean not in ("auto", "on", "off"):
        raise ValueError(f"lean must be auto, on or off, got {lean!r}")
    lean_on = lean == "on" or (lean == "auto" and device.type == "cuda")
    plan = plan_batches(model, device, max_batch_tokens, recompute=recompute, memory=memory, lean=lean_on)
    budget = TokenBudget(plan)
    acc: dict[str, torch.Tensor] = {}
    bar = tqdm(total=total, desc="sensitivity", unit="tok", disable=not progress, leave=False)
    probe: dict[str, int] = {}
    loss_sum = [0.0]

    def step(idx: list[int]) -> None:
        batch = collate([examples[i] for i in idx], pad_id, device)
        with autocast_for(device):
            losses = adapted.backward_answer_loss(batch, weighted_total)
        weights = batch.weights
        loss_sum[0] += float(losses.double().sum() if weights is None else (losses.double() * weights.double()).sum())
        for name, s in sigmas.items():  # the batch finished: its gradients count
            if s.grad is not None:
                if name in acc:
                    acc[name].add_(s.grad)
                else:
                    acc[name] = s.grad
                s.grad = None
        probe.setdefault("padded", batch.input_ids.numel())
        bar.update(int(batch.targets.numel()))

    def discard() -> None:
        for s in sigmas.values():
            s.grad = None
        probe.clear()

    def replan() -> None:
        """After the first batch: plan again with what it really used per token."""
        nonlocal plan
        measured = memory.peak() / probe["padded"]
        estimate = plan.bytes_per_token or measured
        plan = plan_batches(
            model, device, None, recompute=recompute, scale=measured / estimate, memory=memory, lean=lean_on
        )
        log.info("sensitivity pass: measured %.2f MiB per token; %s", measured / 2**20, plan.describe())
        budget.tokens = min(budget.tokens, plan.tokens)
        recomputing.set(plan.recomputed_layers)

    auto = plan.source == "device memory"
    start = time.perf_counter()
    model.eval()
    log.info("sensitivity pass: %s", plan.describe())
    with (
        LeanActivations(model, lean_on) as leaner,
        RecomputedLayers(model, plan.recomputed_layers) as recomputing,
    ):
        batches, padded = run_in_batches(
            examples,
            budget,
            step,
            device=device,
            what="sensitivity pass",
            discard=discard,
            # the first batch is a probe: a quarter of the plan, so that it is measured safely
            first_tokens=max(1, plan.tokens // 4) if auto else None,
            after_first=replan if auto else None,
        )
    bar.close()
    grads = {
        name: (acc[name].detach().float().cpu() if name in acc else torch.zeros_like(s, device="cpu"))
        for name, s in sigmas.items()
    }
    peak = memory.peak() if memory is not None else None
    stats = PassStats(
        examples=len(examples),
        answer_tokens=total,
        tokens=sum(e.length for e in examples),
        padded_tokens=padded,
        batches=batches,
        seconds=time.perf_counter() - start,
        batch_tokens=plan.tokens,
        final_batch_tokens=budget.tokens,
        budget_source=plan.source,
        recomputed_layers=plan.recomputed_layers,
        lean_modules=leaner.modules,
        backoffs=list(budget.backoffs),
        peak_bytes=peak,
        loss=loss_sum[0] / weighted_total,
    )
    return grads, stats
