"""Independent references computed by PEFT's own LoRA layers and the model's own full forward.

Nothing here uses vllm_surgery's hooks, logits path or spectral code: the answer losses come from
`PeftModel(...)(input_ids).logits` over the whole vocabulary, and the singular-value gradients from the
gradient PEFT's autograd gives lora_B, by the chain rule (below).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM

from vllm_surgery.calibration import Example


def peft_model(base: Path, adapter: Path) -> PeftModel:
    """The base model in float32 with the adapter loaded by PEFT, frozen, in eval mode."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def answer_token_losses(model: torch.nn.Module, examples: Iterable[Example]) -> list[torch.Tensor]:
    """Per example, the cross-entropy of each answer token from the model's full forward (one at a time)."""
    out = []
    for e in examples:
        ids = torch.tensor([list(e.prompt_ids + e.answer_ids)])
        logits = model(input_ids=ids).logits[0].float()
        start = len(e.prompt_ids)
        pred = logits[start - 1 : start - 1 + len(e.answer_ids)]
        out.append(F.cross_entropy(pred, torch.tensor(e.answer_ids), reduction="none"))
    return out


def mean_answer_loss(base: Path, adapter: Path, examples: Sequence[Example]) -> float:
    """Token-weighted mean answer loss of `adapter` on `examples`, as PEFT computes it."""
    with torch.no_grad():
        losses = answer_token_losses(peft_model(base, adapter), examples)
    return float(torch.cat(losses).double().mean())


def peft_sensitivities(
    base: Path, adapter: Path, names: Sequence[str], examples: Sequence[Example]
) -> dict[str, torch.Tensor]:
    """dL/dsigma_k for every singular value of each named module, L the mean answer loss of `examples`.

    PEFT computes y = W x + s B A x. With G = dL/dW_eff, autograd gives G_B = dL/dB = s G A^T. Writing
    B A = U diag(sigma) V^T (a dense float64 SVD here), the served update is s U diag(sigma) V^T, so
    dL/dsigma_k = s u_k^T G v_k. Each v_k lies in the row space of A, v_k = A^T c_k with
    c_k = (A A^T)^-1 A v_k, hence dL/dsigma_k = u_k^T G_B c_k.
    """
    model = peft_model(base, adapter)
    layers = {n: model.base_model.model.get_submodule(n) for n in names}
    for layer in layers.values():
        layer.lora_B["default"].weight.requires_grad_(True)
    total = sum(len(e.answer_ids) for e in examples)
    for losses in answer_token_losses(model, examples):
        (losses.sum() / total).backward()
    grads = {}
    for name, layer in layers.items():
        a = layer.lora_A["default"].weight.detach().double()
        b = layer.lora_B["default"].weight.detach().double()
        g_b = layer.lora_B["default"].weight.grad.double()
        r = a.shape[0]
        u, _, vh = torch.linalg.svd(b @ a, full_matrices=False)
        u, v = u[:, :r], vh[:r].T
        c = torch.linalg.solve(a @ a.T, a @ v)  # column k: c_k with A^T c_k = v_k
        grads[name] = ((u.T @ g_b) * c.T).sum(dim=1).float()
    return grads
