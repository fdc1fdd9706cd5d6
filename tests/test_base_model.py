"""Layer shapes come from the configuration alone (meta device) and refuse adapters for other models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_surgery.adapter import load_adapter
from vllm_surgery.base_model import LayerShape, base_layer_shapes, check_adapter_fits
from vllm_surgery.errors import AdapterError


def test_shapes_of_the_tiny_llama_are_its_configured_sizes(tiny_base):
    # build_tiny_llama: hidden 64, 4 heads (head_dim 16), 2 KV heads, intermediate 128, 2 layers
    shapes = base_layer_shapes(tiny_base)
    vocab = json.loads((tiny_base / "config.json").read_text())["vocab_size"]
    assert shapes["model.layers.0.self_attn.q_proj"] == LayerShape("linear", 64, 64)
    assert shapes["model.layers.1.self_attn.k_proj"] == LayerShape("linear", 64, 32)
    assert shapes["model.layers.1.self_attn.v_proj"] == LayerShape("linear", 64, 32)
    assert shapes["model.layers.0.mlp.gate_proj"] == LayerShape("linear", 64, 128)
    assert shapes["model.layers.0.mlp.down_proj"] == LayerShape("linear", 128, 64)
    assert shapes["model.embed_tokens"] == LayerShape("embedding", vocab, 64)
    assert shapes["lm_head"] == LayerShape("linear", 64, vocab)
    assert "model.layers.2.mlp.down_proj" not in shapes


def test_a_fitting_adapter_passes(tiny_base, tiny_adapter):
    check_adapter_fits(load_adapter(tiny_adapter), base_layer_shapes(tiny_base))


def test_an_adapter_with_narrower_inputs_is_refused_by_name(tiny_base, adapter_copy):
    weights = adapter_copy / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0], 96)  # down_proj takes 128 features, not 96
    save_file(tensors, weights)
    with pytest.raises(AdapterError, match=r"model\.layers\.0\.mlp\.down_proj.*96 -> 64.*128 -> 64"):
        check_adapter_fits(load_adapter(adapter_copy), base_layer_shapes(tiny_base))


def test_a_module_missing_from_the_model_is_refused(tiny_base, tiny_adapter):
    shapes = base_layer_shapes(tiny_base)
    del shapes["model.layers.1.self_attn.o_proj"]
    with pytest.raises(AdapterError, match=r"model\.layers\.1\.self_attn\.o_proj.*does not exist"):
        check_adapter_fits(load_adapter(tiny_adapter), shapes)


def test_an_unreadable_configuration_is_an_adapter_error(tmp_path):
    with pytest.raises(AdapterError, match="configuration"):
        base_layer_shapes(tmp_path)
