"""Every supported model family, tiny and random, through the whole refine path and the gradient check.

For each family (FAMILIES in vllm_surgery.testing: Qwen2, Qwen3, Mistral, Gemma-2 with softcapping and
tied embeddings, Phi-3 with fused qkv_proj/gate_up_proj, Cohere with logit_scale, Granite with
logits_scaling; Llama is covered by the other tests): refine() writes an adapter whose held-out loss,
as PEFT computes it on the written files, is the quality_after refine reported, and our sensitivities
equal an independent autograd through PEFT's own LoRA layers.
"""

from __future__ import annotations

import pytest
import torch
from peft_reference import mean_answer_loss, peft_sensitivities
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_surgery import adapted_model as adapted_module
from vllm_surgery import refine
from vllm_surgery.adapted_model import AdaptedModel
from vllm_surgery.adapter import load_adapter
from vllm_surgery.calibration import collate, load_calibration, split_heldout
from vllm_surgery.config import select_modules
from vllm_surgery.errors import SurgeryError
from vllm_surgery.sensitivity import compute_sensitivities
from vllm_surgery.spectral import lora_svd
from vllm_surgery.testing import build_lora_adapter, build_tiny_model, write_calibration

FAMILIES = ["qwen2", "qwen3", "mistral", "gemma2", "phi3", "cohere", "granite"]
EXPECTED_CLASS = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "cohere": "CohereForCausalLM",
    "granite": "GraniteForCausalLM",
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    base = build_tiny_model(request.param, root / "base")
    adapter = build_lora_adapter(base, root / "adapter", target_modules="all-linear")
    calibration = write_calibration(root / "calibration.jsonl", n=12)
    return request.param, base, adapter, calibration


def test_the_family_is_what_it_claims(family):
    name, base, adapter, _ = family
    model = AutoModelForCausalLM.from_pretrained(base)
    assert type(model).__name__ == EXPECTED_CLASS[name]
    leaves = {m.rsplit(".", 1)[-1] for m in load_adapter(adapter).modules}
    if name == "phi3":
        assert leaves == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}  # fused projections
    else:
        assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_refine_writes_what_it_measured(family, tmp_path):
    """quality_before/after are the held-out losses PEFT computes on the original and the written adapter."""
    _, base, adapter, calibration = family
    out = tmp_path / "refined"
    result = refine(base, adapter, calibration, out, force=True, min_improvement=0.9, progress=False)
    assert result.decision == "forced" and result.output_path == out
    assert set(result.modules) == {
        m for m in load_adapter(adapter).modules if m.endswith(("o_proj", "down_proj"))
    }
    tok = AutoTokenizer.from_pretrained(base)
    _, heldout = split_heldout(load_calibration(calibration, tok).examples, 0.25, seed=0)
    assert result.calibration["heldout_examples"] == len(heldout) == 3
    assert mean_answer_loss(base, adapter, heldout) == pytest.approx(result.quality_before.loss, rel=1e-5)
    assert mean_answer_loss(base, out, heldout) == pytest.approx(result.quality_after.loss, rel=1e-5)
    assert result.quality_after.loss != pytest.approx(result.quality_before.loss, rel=1e-6)  # it did edit


def test_sensitivities_equal_autograd_through_peft(family):
    name, base, adapter_dir, calibration = family
    tok = AutoTokenizer.from_pretrained(base)
    examples = load_calibration(calibration, tok).examples[:6]
    adapter = load_adapter(adapter_dir)
    edited = select_modules(adapter.modules, "all")  # attention and MLP, fused or not
    spectra = {n: lora_svd(adapter.lora_a(n), adapter.lora_b(n)) for n in edited}
    ref = peft_sensitivities(base, adapter_dir, edited, examples)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with AdaptedModel(model, adapter, spectra) as adapted:
        ours, _ = compute_sensitivities(
            adapted, examples, max_batch_tokens=64, pad_id=tok.pad_token_id, progress=False
        )
    for n in edited:
        scale = ref[n].abs().max()
        assert scale > 0, n
        assert torch.allclose(ours[n], ref[n], rtol=1e-3, atol=1e-4 * scale), (name, n, ours[n], ref[n])


@pytest.mark.parametrize("name", ["gemma2", "cohere", "granite"])
def test_the_logit_self_check_catches_a_transform_left_out(name, tmp_path, monkeypatch):
    """Without its logit transform (softcapping, logit_scale, logits_scaling) the first batch fails loudly."""
    base = build_tiny_model(name, tmp_path / "base")
    adapter_dir = build_lora_adapter(base, tmp_path / "adapter", target_modules="all-linear")
    tok = AutoTokenizer.from_pretrained(base)
    examples = load_calibration(write_calibration(tmp_path / "c.jsonl", n=2), tok).examples
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    adapter = load_adapter(adapter_dir)
    batch = collate(examples, tok.pad_token_id)
    with AdaptedModel(model, adapter, {}) as adapted:
        assert adapted.check_logits(batch) < 1e-4  # the real transform: agrees with the model's forward
        monkeypatch.setattr(adapted_module, "finish_logits", lambda model, logits: logits)
        with pytest.raises(
            SurgeryError, match=rf"^{EXPECTED_CLASS[name]}: the answer-position logits"
        ) as info:
            adapted.answer_losses(batch)  # the first call runs the check
        assert "differ from the model's own forward by up to" in str(info.value)
