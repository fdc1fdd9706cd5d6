"""The spectral path, the logits and the loss stay float32 under 16-bit autocast.

CPU autocast to bfloat16 stands in for CUDA autocast here (the same torch.autocast machinery): each test
also shows that plain 16-bit arithmetic would have failed it, so it measures what it claims.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_surgery.adapted_model import AdaptedModel, spectral_delta
from vllm_surgery.adapter import load_adapter
from vllm_surgery.calibration import collate, load_calibration
from vllm_surgery.precision import _Float32Linear, autocast_for, compute_dtype, float32_linear
from vllm_surgery.spectral import lora_svd

BF16 = {"device_type": "cpu", "dtype": torch.bfloat16}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_spectral_path_is_float32_under_bf16_autocast():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, generator=gen).to(torch.bfloat16)
    vt, u = torch.randn(8, 64, generator=gen), torch.randn(48, 8, generator=gen)
    sigma = torch.rand(8, generator=gen) + 0.5
    exact = ((x.double() @ vt.double().T) * sigma.double()) @ u.double().T * 2.0
    with torch.autocast(**BF16):
        out = spectral_delta(vt, sigma, u, 2.0)(x)
        plain = F.linear(F.linear(x, vt) * sigma, u) * 2.0  # what autocast alone computes
        nudged = spectral_delta(vt, sigma * (1 + 1e-4), u, 2.0)(x)
    assert out.dtype == torch.float32
    assert _rel(out, exact) < 1e-6
    assert _rel(plain, exact) > 1e-3  # bf16 would have failed the line above
    assert not torch.equal(nudged, out)  # a 0.01% change of sigma is not rounded away


def test_float32_linear_keeps_a_float32_result_from_bf16_operands():
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(16, 64, generator=gen).bfloat16(), torch.randn(300, 64, generator=gen).bfloat16()
    with torch.autocast(**BF16):
        out = float32_linear(x, w)
        plain = F.linear(x, w)
    exact = x.double() @ w.double().T
    assert out.dtype == torch.float32 and _rel(out, exact) < 1e-6
    assert plain.dtype == torch.bfloat16 and _rel(plain, exact) > 1e-3


def test_the_cuda_float32_matmul_has_a_16_bit_input_gradient():
    """The CUDA path (torch.mm with out_dtype) checked for shapes and dtypes on the meta device."""
    x = torch.empty(5, 64, dtype=torch.bfloat16, device="meta", requires_grad=True)
    w = torch.empty(300, 64, dtype=torch.bfloat16, device="meta")
    out = _Float32Linear.apply(x, w, None)
    assert out.dtype == torch.float32 and out.shape == (5, 300)
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.shape == (5, 64)


def test_cpu_runs_float32_without_autocast():
    cpu = torch.device("cpu")
    assert compute_dtype(cpu) == torch.float32
    assert isinstance(autocast_for(cpu), contextlib.nullcontext)


def test_answer_losses_are_float32_from_unrounded_logits(tiny_base, tiny_adapter, tiny_calibration):
    """A bf16 model under bf16 autocast: the loss equals float64 cross-entropy of the exact head product."""
    tok = AutoTokenizer.from_pretrained(tiny_base)
    examples = load_calibration(tiny_calibration, tok).examples[:4]
    batch = collate(examples, tok.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).eval()
    adapter = load_adapter(tiny_adapter)
    spectra = {n: lora_svd(adapter.lora_a(n), adapter.lora_b(n)) for n in list(adapter.modules)[:4]}
    with torch.no_grad(), AdaptedModel(model, adapter, spectra) as adapted, torch.autocast(**BF16):
        losses = adapted.answer_losses(batch)  # the first call also passes the bf16 logit self-check
        hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[0]
    picked = hidden[batch.rows, batch.cols].double()
    logits = picked @ model.lm_head.weight.double().T
    exact = F.cross_entropy(logits, batch.targets, reduction="none")
    rounded = F.cross_entropy(logits.bfloat16().double(), batch.targets, reduction="none")
    assert losses.dtype == torch.float32
    assert float((losses.double() - exact).abs().max()) < 2e-5
    assert float((rounded - exact).abs().max()) > 2e-4  # bf16 logits would have failed the line above


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_logit_self_check_passes_in_each_precision(tiny_base, tiny_adapter, tiny_calibration, dtype):
    tok = AutoTokenizer.from_pretrained(tiny_base)
    batch = collate(load_calibration(tiny_calibration, tok).examples[:2], tok.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=dtype).eval()
    context = torch.autocast(**BF16) if dtype == torch.bfloat16 else contextlib.nullcontext()
    with AdaptedModel(model, load_adapter(tiny_adapter), {}) as adapted, context:
        diff = adapted.check_logits(batch)
    assert diff < (1e-5 if dtype == torch.float32 else 2e-2)
