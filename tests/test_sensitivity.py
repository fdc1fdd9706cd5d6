"""The sensitivity pass against an independent autograd computation through PEFT's own LoRA layers."""

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_surgery.adapted_model import AdaptedModel
from vllm_surgery.adapter import load_adapter
from vllm_surgery.calibration import load_calibration
from vllm_surgery.config import select_modules
from vllm_surgery.sensitivity import compute_sensitivities
from vllm_surgery.spectral import lora_svd


@pytest.fixture(scope="module")
def setup(tiny_base, tiny_adapter, tiny_calibration):
    tok = AutoTokenizer.from_pretrained(tiny_base)
    examples = load_calibration(tiny_calibration, tok).examples[:8]
    adapter = load_adapter(tiny_adapter)
    edited = select_modules(adapter.modules, "all")[::2]  # a mix of attention and MLP modules
    spectra = {n: lora_svd(adapter.lora_a(n), adapter.lora_b(n)) for n in edited}
    return tok, examples, adapter, spectra


def reference_gradients(base_dir, adapter_dir, spectra, examples):
    """sigma as a real leaf inside PEFT's LoRA layers (B = U diag(sigma), A = V^T), one example at a time,
    full-vocabulary logits, L = mean over all answer tokens of the set."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    sigmas = {}
    for name, spec in spectra.items():
        layer = model.base_model.model.get_submodule(name)
        sigma = spec.sigma.clone().requires_grad_(True)
        sigmas[name] = sigma
        lin_a, lin_b = layer.lora_A["default"], layer.lora_B["default"]
        del lin_a.weight, lin_b.weight
        lin_a.weight = spec.V.T.contiguous()
        lin_b.weight = spec.U * sigma
    total = sum(len(e.answer_ids) for e in examples)
    for e in examples:
        ids = torch.tensor([list(e.prompt_ids + e.answer_ids)])
        logits = model(input_ids=ids).logits[0]
        start = len(e.prompt_ids)
        pred = logits[start - 1 : start - 1 + len(e.answer_ids)]
        loss = F.cross_entropy(pred, torch.tensor(e.answer_ids), reduction="sum") / total
        # lin_b.weight is a non-leaf computed once; rebuild the graph each example
        loss.backward(retain_graph=True)
    return {n: s.grad.clone() for n, s in sigmas.items()}


def ours(model, adapter, spectra, examples, budget, pad_id):
    with AdaptedModel(model, adapter, spectra) as adapted:
        grads, stats = compute_sensitivities(
            adapted, examples, max_batch_tokens=budget, pad_id=pad_id, progress=False
        )
    return grads, stats


def test_matches_independent_autograd_and_batching(tiny_base, tiny_adapter, setup):
    tok, examples, adapter, spectra = setup
    ref = reference_gradients(tiny_base, tiny_adapter, spectra, examples)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    longest = max(e.length for e in examples)
    g1, s1 = ours(model, adapter, spectra, examples, 1, tok.pad_token_id)
    g8, s8 = ours(model, adapter, spectra, examples, 8 * longest, tok.pad_token_id)
    assert s1.batches == 8 and s8.batches == 1
    assert s8.padded_tokens > s8.tokens  # the batch of 8 really was padded
    for name in spectra:
        scale = ref[name].abs().max()
        assert scale > 0
        assert torch.allclose(g1[name], ref[name], rtol=1e-4, atol=1e-4 * scale), name
        assert torch.allclose(g8[name], ref[name], rtol=1e-4, atol=1e-4 * scale), name
    # nothing else of the model got a gradient, and the model is left as it was
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


def test_deterministic(tiny_base, setup):
    tok, examples, adapter, spectra = setup
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    a, _ = ours(model, adapter, spectra, examples, 256, tok.pad_token_id)
    b, _ = ours(model, adapter, spectra, examples, 256, tok.pad_token_id)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_gradient_sign_matches_finite_difference(tiny_base, setup):
    """Moving sigma_k against g lowers the loss: the quantity the policies rely on."""
    from vllm_surgery.evaluation import heldout_quality

    tok, examples, adapter, spectra = setup
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    with AdaptedModel(model, adapter, spectra) as adapted:
        grads, _ = compute_sensitivities(adapted, examples, pad_id=tok.pad_token_id, progress=False)
        name = max(grads, key=lambda n: grads[n].abs().max())
        k = int(grads[name].abs().argmax())
        base = heldout_quality(adapted, examples, pad_id=tok.pad_token_id).loss
        eps = 1e-3
        moved = adapted.sigma[name].detach().clone()
        moved[k] += eps
        with adapted.sigma_values({name: moved}):
            up = heldout_quality(adapted, examples, pad_id=tok.pad_token_id).loss
        assert (up - base) / eps == pytest.approx(float(grads[name][k]), rel=2e-2)
        # sigma_values restored the original values
        assert torch.equal(adapted.sigma[name].detach(), spectra[name].sigma)
