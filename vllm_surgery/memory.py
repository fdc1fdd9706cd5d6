"""How many tokens go into one batch: chosen from the device's free memory and the model's shape.

The sensitivity pass keeps, for every token of a batch, what autograd saves to differentiate with
respect to the activations (no weight gradient is ever formed). Per token and decoder layer, for the
Llama family (hidden h, intermediate m, heads H and KV heads K of size d, activation bytes a: 2 under
bf16 autocast, 4 in float32):

  norms      2 x 4h     both RMSNorms upcast to float32 and keep that copy for their backward
  attention  (2H + 2K) d a   SDPA keeps q, k, v and its output (the logsumexp is per head: ignored)
  MLP        3 m a      gate, up and silu(gate) for the SwiGLU backward
  (a linear layer keeps nothing per token: its weight needs no gradient, so its input is not saved;
  the adapter hooks keep r numbers per edited module and token, ignored)

At Llama-3.1-8B widths in bf16 this counts 136 KiB per token and layer; 147 KiB were measured with
saved_tensors_hooks (benchmarks/RESULTS.md), the rest being small tensors the count leaves out. On top
of what the layers keep, the layer being computed needs working memory that is not kept: the MLP's
intermediates and their gradients, 4 m a + 8h ("transient"). A layer that is recomputed in the
backward (vllm_surgery.activations.RecomputedLayers) keeps only its input (h a) and needs its full
set again, once, while its backward runs. The vocabulary projection is computed in chunks of at most
LOGITS_CHUNK_BYTES of float32 logits (vllm_surgery.activations), a fixed cost rather than a
per-token one.

A held-out evaluation keeps nothing: per token it needs one layer's working set (residual stream,
the attention tensors, the MLP's intermediates, the float32 norm copy), so its budget is far larger.

The estimate is a lower bound of what really happens (allocator rounding, kernels' workspaces, small
saved tensors); on CUDA the first batch of a pass is measured (peak allocated memory over its padded
tokens, fixed costs included, so it errs high) and the budget is re-planned with
max(measured, estimated) before any further batch. The budget fills SAFETY_FRACTION of the memory that
is free (CUDA's free memory plus what this process's caching allocator holds unused, within any
per-process fraction) less SAFETY_RESERVE for fragmentation and workspaces; it is capped where larger
batches stopped paying on an H100 (MAX_CUDA_PASS_TOKENS). Where the cap does not fit down to
EFFICIENT_CUDA_PASS_TOKENS, below which per-batch overhead made the pass slower, the first decoder
layers are recomputed in the backward, as few as give that many tokens, before the budget goes lower.
If a batch still runs out of memory, run_in_batches halves the budget for the rest of the run (the
result does not depend on the batching) and says so; a single example that does not fit is an error
naming the remedies. On the CPU nothing is sized: 512 tokens was measured fastest there.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .calibration import Example, token_budget_batches
from .errors import DeviceMemoryError

log = logging.getLogger(__name__)

# CPU: measured on SmolLM2-135M (benchmarks/RESULTS.md): 512 was fastest and used 0.3x the memory of the
# straightforward pass; larger batches only add padding and activation memory on 2-16 cores.
CPU_BATCH_TOKENS = 512
# H100, Llama-3.1-8B shape: 8192 tokens 4.88 s, 4096 4.99 s, 2048 6.31 s for the same pass
# (benchmarks/RESULTS.md, the anchor): more than 8192 buys nothing, below 2048 overhead dominates.
MAX_CUDA_PASS_TOKENS = 8192
EFFICIENT_CUDA_PASS_TOKENS = 2048
# An evaluation keeps no activations; past this, batches only add padding.
MAX_CUDA_EVAL_TOKENS = 32768
SAFETY_FRACTION = 0.85
SAFETY_RESERVE = 512 << 20
LOGITS_CHUNK_BYTES = 256 << 20  # float32 logits computed at once (the loss is taken chunk by chunk)
ROUND_TO = 256  # budgets are multiples of this where they are at least this large


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know of a decoder-only transformer."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    act_bytes: int  # bytes of one activation element: 2 (bf16/fp16) or 4 (float32)

    @classmethod
    def of(cls, config: Any, act_bytes: int) -> ModelShape:
        """From a transformers config (its text_config for multimodal models)."""
        config = getattr(config, "text_config", None) or config
        hidden = int(config.hidden_size)
        heads = int(getattr(config, "num_attention_heads", 1) or 1)
        return cls(
            layers=int(config.num_hidden_layers),
            hidden=hidden,
            intermediate=int(getattr(config, "intermediate_size", None) or 4 * hidden),
            heads=heads,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
            vocab=int(config.vocab_size),
            act_bytes=act_bytes,
        )

    def kept_per_layer(self, lean: bool = False) -> int:
        """Bytes per token that autograd keeps in one decoder layer (see the module docstring).

        lean: with LeanActivations, the norms keep their input (h a) instead of a float32 copy, and
        the MLP keeps gate and up but not act(gate).
        """
        a = self.act_bytes
        norms = 2 * (a if lean else 4) * self.hidden
        attention = (2 * self.heads + 2 * self.kv_heads) * self.head_dim * a
        mlp = (2 if lean else 3) * self.intermediate * a
        return norms + attention + mlp

    @property
    def transient(self) -> int:
        """Working memory per token of the one layer being computed, not kept."""
        return 4 * self.intermediate * self.act_bytes + 8 * self.hidden

    def pass_bytes_per_token(self, recomputed_layers: int = 0, lean: bool = False) -> int:
        """Peak bytes per token of a sensitivity-pass batch with the first `recomputed_layers` recomputed."""
        k = min(max(recomputed_layers, 0), self.layers)
        layer = self.kept_per_layer(lean)
        kept = (self.layers - k) * layer + k * self.hidden * self.act_bytes
        if k:
            kept += layer  # the recomputed layer whose backward is running
        # + the embedding output and the final norm's float32 copy, kept for the whole batch
        return kept + self.transient + self.hidden * (self.act_bytes + 4)

    @property
    def eval_bytes_per_token(self) -> int:
        """Peak bytes per token of an evaluation batch (no graph kept)."""
        a = self.act_bytes
        attention = (2 * self.heads + 2 * self.kv_heads) * self.head_dim * a
        return 2 * self.hidden * a + 3 * self.intermediate * a + attention + 8 * self.hidden

    @property
    def logits_bytes(self) -> int:
        """Fixed bytes of one chunk of answer logits: lm_head output, float32 copy, log-softmax, gradient."""
        return logits_chunk_tokens(self.vocab) * self.vocab * (self.act_bytes + 12)


def logits_chunk_tokens(vocab: int) -> int:
    """Answer positions whose float32 logits are formed at once (at least one)."""
    return max(1, LOGITS_CHUNK_BYTES // (4 * max(vocab, 1)))


class DeviceMemory:
    """The memory counters the planner reads: a CUDA device's (CudaMemory), or a test's stand-in."""

    def usable(self) -> int:
        """Bytes a batch may use now."""
        raise NotImplementedError

    def start(self) -> None:
        """Begin measuring: peak() counts from here."""
        raise NotImplementedError

    def peak(self) -> int:
        """Most bytes allocated at once since start(), above the level at start()."""
        raise NotImplementedError


class CudaMemory(DeviceMemory):
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0

    def usable(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        return usable_from(
            free=free,
            total=total,
            reserved=torch.cuda.memory_reserved(self.device),
            allocated=torch.cuda.memory_allocated(self.device),
            fraction=get_fraction(self.device) if get_fraction is not None else 1.0,
        )

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self.base


def device_memory(device: torch.device) -> DeviceMemory | None:
    """The counters of `device`; None on the CPU, where batches are not sized by memory."""
    return CudaMemory(device) if device.type == "cuda" else None


def usable_from(*, free: int, total: int, reserved: int, allocated: int, fraction: float = 1.0) -> int:
    """SAFETY_FRACTION of what this process can still allocate, less SAFETY_RESERVE.

    That is what its caching allocator holds unused (reserved - allocated) plus what it may still
    reserve: the device's free memory, within `fraction` of the device (set_per_process_memory_fraction).
    """
    growth = min(free, max(0, int(fraction * total) - reserved))
    return max(0, int(SAFETY_FRACTION * (growth + reserved - allocated)) - SAFETY_RESERVE)


def round_budget(tokens: float) -> int:
    """Whole tokens, rounded down to a multiple of ROUND_TO where at least that large; at least 1."""
    tokens = int(tokens)
    return max(1, tokens - tokens % ROUND_TO if tokens >= ROUND_TO else tokens)


@dataclass(frozen=True)
class BudgetPlan:
    """A token budget and how it was arrived at (reported in PassStats and refine's stats)."""

    tokens: int
    recomputed_layers: int
    source: str  # "explicit", "cpu default", "device memory"
    usable_bytes: int | None = None
    bytes_per_token: int | None = None  # the planning figure per padded token

    def describe(self) -> str:
        text = f"{self.tokens} tokens per batch ({self.source}"
        if self.usable_bytes is not None and self.bytes_per_token:
            text += (
                f": {self.usable_bytes / 2**30:.1f} GiB usable / "
                f"{self.bytes_per_token / 2**20:.2f} MiB per token"
            )
        text += ")"
        if self.recomputed_layers:
            text += f", {self.recomputed_layers} decoder layers recomputed in the backward"
        return text


def plan_pass(
    shape: ModelShape,
    usable: int,
    *,
    scale: float = 1.0,
    recompute: str = "auto",
    lean: bool = False,
    max_tokens: int = MAX_CUDA_PASS_TOKENS,
    efficient_tokens: int = EFFICIENT_CUDA_PASS_TOKENS,
) -> BudgetPlan:
    """The budget for a sensitivity pass given `usable` bytes.

    scale: measured / estimated bytes per token (>= 1 makes the plan more careful; < 1 is ignored).
    recompute: "auto" recomputes the fewest first layers that let `efficient_tokens` fit when the cap
        does not fit without; "off" never; "all" every layer.
    lean: the layers run under LeanActivations.
    """
    if recompute not in ("auto", "off", "all"):
        raise ValueError(f"recompute must be auto, off or all, got {recompute!r}")
    scale = max(scale, 1.0)
    room = max(0, usable - shape.logits_bytes)

    def fit(k: int) -> tuple[int, int]:
        per_token = math.ceil(shape.pass_bytes_per_token(k, lean) * scale)
        return room // per_token, per_token

    if recompute == "all":
        choices = [shape.layers]
    elif recompute == "off":
        choices = [0]
    else:
        choices = range(shape.layers + 1)
    k = choices[-1]
    for k in choices:
        if fit(k)[0] >= min(max_tokens, efficient_tokens):
            break
    tokens, per_token = fit(k)
    return BudgetPlan(round_budget(min(tokens, max_tokens)), k, "device memory", usable, per_token)


def plan_evaluation(shape: ModelShape, usable: int, max_tokens: int = MAX_CUDA_EVAL_TOKENS) -> BudgetPlan:
    """The budget for a held-out evaluation (no graph kept) given `usable` bytes."""
    per_token = shape.eval_bytes_per_token
    tokens = max(0, usable - shape.logits_bytes) // per_token
    return BudgetPlan(round_budget(min(tokens, max_tokens)), 0, "device memory", usable, per_token)


def activation_bytes(model: torch.nn.Module, device: torch.device) -> int:
    """Bytes of one activation element in the passes: bf16 under CUDA autocast, else the model's dtype."""
    if device.type == "cuda":
        return 2
    return next(model.parameters()).element_size()


@dataclass
class TokenBudget:
    """The budget in force and every back-off taken, shared by the batches of a run."""

    plan: BudgetPlan
    tokens: int = 0
    backoffs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tokens = self.tokens or self.plan.tokens

    def back_off(self, batch: Sequence[Example], error: str, what: str) -> None:
        """Halve the budget after `batch` ran out of memory; DeviceMemoryError if it was one example."""
        if len(batch) <= 1:
            length = batch[0].length if batch else 0
            raise DeviceMemoryError(
                f"{what}: one example of {length} tokens ({batch[0].source if batch else '?'}) does not fit "
                f"in device memory ({error}). Use a shorter --max-length, another device, or leave the "
                "GPU more room (vLLM: a lower --gpu-memory-utilization)"
            )
        padded = len(batch) * max(e.length for e in batch)
        old = self.tokens
        self.tokens = max(1, min(self.tokens, padded) // 2)
        note = f"{what}: a batch of {padded} tokens ran out of memory; budget {old} -> {self.tokens} tokens"
        self.backoffs.append(note)
        log.warning("%s for the rest of the run (the result does not change)", note)


def release_cached(device: torch.device) -> None:
    """Free what a failed batch left behind, so that the retry starts from the same memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_in_batches(
    examples: Sequence[Example],
    budget: TokenBudget,
    step: Callable[[list[int]], None],
    *,
    device: torch.device,
    what: str,
    discard: Callable[[], None] = lambda: None,
    first_tokens: int | None = None,
    after_first: Callable[[], None] | None = None,
) -> tuple[int, int]:
    """Call step(indices) on token-budget batches of all examples, halving the budget on out-of-memory.

    A batch that runs out of memory is undone by `discard` (it may have accumulated gradients) and
    its examples are batched again with the remaining ones under the halved budget. `first_tokens`
    caps the first batch (a probe), after which `after_first` may change budget.tokens. Returns
    (batches run, padded tokens run).
    Raises DeviceMemoryError when a one-example batch does not fit.
    """
    remaining = list(range(len(examples)))
    done_batches = padded = 0
    probing = bool(first_tokens)
    while remaining:
        cap = min(first_tokens or budget.tokens, budget.tokens) if probing else budget.tokens
        batches = token_budget_batches([examples[i] for i in remaining], cap)
        if probing:
            batches = batches[:1]
        failed: str | None = None
        finished: set[int] = set()
        for b in batches:
            idx = [remaining[j] for j in b]
            try:
                step(idx)
            except torch.OutOfMemoryError as e:
                failed = str(e).split("\n", 1)[0]
            if failed is not None:  # outside the handler: its traceback no longer pins the batch's tensors
                discard()
                release_cached(device)
                budget.back_off([examples[i] for i in idx], failed, what)
                break
            finished.update(idx)
            done_batches += 1
            padded += len(idx) * max(examples[i].length for i in idx)
        if probing and failed is None:
            probing = False
            if after_first is not None:
                after_first()
        remaining = [i for i in remaining if i not in finished]
    return done_batches, padded
