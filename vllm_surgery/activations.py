"""Less activation memory per token: answer logits in chunks, decoder layers recomputed in the backward.

Both leave the result unchanged (the tests check it against an uninterrupted, unchunked computation):

- The loss over a batch's answer tokens is a sum over positions, so its gradient with respect to the
  final hidden states can be built chunk by chunk: each chunk's vocabulary projection, float32 copy,
  log-softmax and gradient exist only while that chunk is processed (at most LOGITS_CHUNK_BYTES of
  float32 logits), and the decoder's backward then runs once from the assembled gradient. Nothing is
  computed twice. For Llama-3.1-8B's 128,256-token vocabulary that is 523 answer positions a chunk,
  where the whole batch's logits would take several GB.
- RecomputedLayers wraps the forward of the first k decoder layers in torch.utils.checkpoint
  (non-reentrant): such a layer keeps only its input and runs its forward again in the backward, adapter
  hooks included (they are ordinary forward hooks of the layer's linears, so they run again and the
  sigma leaves receive their gradient through the recomputed graph). It costs one more forward of
  those layers; vllm_surgery.memory decides when that pays.
- LeanActivations keeps less inside every layer, at the price of a few elementwise operations: each
  RMSNorm runs under torch.utils.checkpoint, so it keeps its (bf16) input instead of its float32
  upcast; each gated MLP computes act(gate) * up under checkpoint, so it keeps gate and up but not
  act(gate). The recomputation replays the same operations, so the gradient is the one autograd
  would give without it. A module is changed only if its class's forward, replayed that way on a
  probe input, gives bit-identical outputs.
- Batches are right-padded (calibration.collate) and the model is causal, so no real position ever
  attends to a padding position: the decoder runs with no attention mask at all, which gives the same
  values at every real position and lets SDPA use its causal kernels instead of a materialised mask.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .calibration import Batch
from .memory import logits_chunk_tokens

if TYPE_CHECKING:  # adapted_model imports this module
    from .adapted_model import AdaptedModel


def answer_hidden(adapted: AdaptedModel, batch: Batch) -> torch.Tensor:
    """Final hidden states at the positions whose next-token logits predict answer tokens."""
    decoder = adapted.model.get_decoder()
    # Right padding + causal attention: real positions never see padding, so no mask is needed.
    hidden = decoder(input_ids=batch.input_ids, use_cache=False)[0]
    return hidden[batch.rows, batch.cols]


def token_losses(adapted: AdaptedModel, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each target given the final hidden state that predicts it: the adapted model's
    float32 logits (its output embedding with any adapter part on it, and the model's own logit
    transforms: AdaptedModel.output_logits)."""
    return F.cross_entropy(adapted.output_logits(hidden), targets, reduction="none")


def _chunks(adapted: AdaptedModel, n: int) -> list[slice]:
    size = logits_chunk_tokens(adapted.model.get_output_embeddings().weight.shape[0])
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def answer_losses(adapted: AdaptedModel, batch: Batch) -> torch.Tensor:
    """Loss of every answer token of `batch` (evaluation), logits formed in chunks."""
    hidden = answer_hidden(adapted, batch)
    chunks = _chunks(adapted, len(hidden))
    return torch.cat([token_losses(adapted, hidden[c], batch.targets[c]) for c in chunks])


def _weighted_sum(losses: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return losses.sum() if weights is None else (losses * weights.to(losses.dtype)).sum()


def backward_answer_loss(adapted: AdaptedModel, batch: Batch, total: float) -> torch.Tensor:
    """Backpropagate sum(answer-token losses of `batch`, times the batch's token weights if any) / total;
    returns the (unweighted) losses, detached.

    The logits are formed and differentiated chunk by chunk against a detached copy of the hidden
    states; the decoder's backward then runs once from their gradient.
    """
    hidden = answer_hidden(adapted, batch)
    chunks = _chunks(adapted, len(hidden))
    weights = batch.weights
    if len(chunks) == 1:
        losses = token_losses(adapted, hidden, batch.targets)
        (_weighted_sum(losses, weights) / total).backward()
        return losses.detach()
    free = hidden.detach().requires_grad_(True)
    parts = []
    for c in chunks:
        losses = token_losses(adapted, free[c], batch.targets[c])
        (_weighted_sum(losses, None if weights is None else weights[c]) / total).backward()
        parts.append(losses.detach())
    hidden.backward(free.grad)
    return torch.cat(parts)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder's list of layers; ValueError for a model whose decoder has none under `.layers`."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__}: its decoder has no `layers` list, so its layers cannot be recomputed"
        )
    return layers


def _recomputing(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


class RecomputedLayers:
    """While active, the first `count` decoder layers recompute their forward in the backward.

    Each layer's own forward is wrapped on the instance and restored by set(0) or on leaving the
    block; the model is otherwise untouched. set() may change the count between batches.
    """

    def __init__(self, model: torch.nn.Module, count: int = 0) -> None:
        self.model = model
        self._saved: list[tuple[torch.nn.Module, object]] = []
        self.set(count)

    @property
    def count(self) -> int:
        return len(self._saved)

    def set(self, count: int) -> None:
        if count == self.count:
            return
        self._restore()
        if count <= 0:
            return
        for layer in list(decoder_layers(self.model))[:count]:
            self._saved.append((layer, layer.__dict__.get("forward")))
            layer.forward = functools.partial(_recomputing, layer.forward)

    def _restore(self) -> None:
        for layer, own in reversed(self._saved):
            if own is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = own
        self._saved.clear()

    def __enter__(self) -> RecomputedLayers:
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()


def _gated(act: torch.nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return act(gate) * up


def _lean_mlp_forward(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    if torch.is_grad_enabled():
        product = checkpoint(_gated, mlp.act_fn, gate, up, use_reentrant=False)
    else:
        product = _gated(mlp.act_fn, gate, up)
    return mlp.down_proj(product)


def _is_gated_mlp(module: torch.nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))


def _is_rms_norm(module: torch.nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm")


class LeanActivations:
    """While active, RMSNorms and gated MLPs of the decoder layers keep less for the backward.

    Only modules whose class passes a probe (the lean forward gives bit-identical outputs to the
    original on a random input) are changed; everything is restored on leaving the block.
    """

    def __init__(self, model: torch.nn.Module, enabled: bool = True) -> None:
        self._saved: list[tuple[torch.nn.Module, object]] = []
        self.modules = 0  # how many were made lean
        if not enabled:
            return
        verdict: dict[type, bool] = {}
        for layer in decoder_layers(model):
            for module in layer.modules():
                if _is_rms_norm(module):  # replays its own forward: the same by construction
                    lean, probe = functools.partial(_recomputing, module.forward), False
                elif _is_gated_mlp(module):  # rewritten: checked on a probe input once per class
                    lean, probe = functools.partial(_lean_mlp_forward, module), True
                else:
                    continue
                if probe and type(module) not in verdict:
                    verdict[type(module)] = _same_outputs(module, lean)
                if not probe or verdict[type(module)]:
                    self._saved.append((module, module.__dict__.get("forward")))
                    module.forward = lean
        self.modules = len(self._saved)

    def __enter__(self) -> LeanActivations:
        return self

    def __exit__(self, *exc: object) -> None:
        for module, own in reversed(self._saved):
            if own is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = own
        self._saved.clear()


@torch.no_grad()
def _same_outputs(module: torch.nn.Module, lean) -> bool:
    """Does `lean` compute exactly what module.forward does, on a random probe input?"""
    weight = module.gate_proj.weight
    width = module.gate_proj.in_features
    probe = torch.randn(1, 2, width, generator=torch.Generator().manual_seed(0)).to(
        weight.device, weight.dtype
    )
    try:
        return torch.equal(module(probe), lean(probe))
    except Exception:  # a forward with another signature: left as it is
        return False
