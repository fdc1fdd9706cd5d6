"""Layer shapes come from the configuration alone (meta device) and refuse adapters for other models."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_surgery import refine
from vllm_surgery.adapter import load_adapter
from vllm_surgery.base_model import LayerShape, base_layer_shapes, check_adapter_fits, same_base_model
from vllm_surgery.cli import main
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


@pytest.mark.parametrize(
    ("recorded", "given", "same"),
    [
        ("meta-llama/Llama-3.1-8B", "/models/Llama-3.1-8B", True),  # hub id vs a local copy of that name
        ("meta-llama/Llama-3.1-8B", "/models/llama-3.1-8b/", True),  # case and trailing slash
        (
            "/home/me/.cache/huggingface/hub/models--meta-llama--Llama-3.1-8B/snapshots/0e9e39f",
            "/m/Llama-3.1-8B",
            True,
        ),
        ("meta-llama/Llama-3.1-8B", "/models/llama", False),
        ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct", False),
        ("Qwen/Qwen3-8B", "Qwen/Qwen2.5-7B", False),
    ],
)
def test_base_names_match_by_resolved_path_or_last_component(recorded, given, same):
    assert same_base_model(recorded, given) is same


def test_paths_that_resolve_to_one_directory_match(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "base")
    assert same_base_model(str(tmp_path / "alias"), str(tmp_path / "base"))


@pytest.fixture
def renamed_base(tiny_base, tmp_path):
    """The adapter's own base model, under another directory name."""
    return Path(shutil.copytree(tiny_base, tmp_path / "renamed"))


def test_refine_refuses_an_adapter_recorded_for_another_base(
    renamed_base, tiny_adapter, tiny_calibration, tmp_path
):
    recorded = load_adapter(tiny_adapter).base_model_name
    with pytest.raises(AdapterError) as info:
        refine(renamed_base, tiny_adapter, tiny_calibration, tmp_path / "out", force=True, progress=False)
    assert str(info.value) == (
        f"{tiny_adapter}/adapter_config.json: base_model_name_or_path is {recorded!r}, but the base model given "
        f"is {str(renamed_base)!r}: the adapter was trained for another base model. If it is the same model "
        "under another name, pass allow_base_mismatch=True (CLI: --allow-base-mismatch)"
    )
    assert not (tmp_path / "out").exists()
    result = refine(
        renamed_base, tiny_adapter, tiny_calibration, None, allow_base_mismatch=True, progress=False
    )
    assert result.modules and result.base_model == str(renamed_base)


def test_the_cli_flag_allows_a_base_mismatch(renamed_base, tiny_adapter, tiny_calibration, tmp_path, capsys):
    args = [
        "refine",
        "--base-model",
        str(renamed_base),
        "--adapter",
        str(tiny_adapter),
        "--calibration",
        str(tiny_calibration),
        "--quiet",
        "--force",
    ]
    assert main([*args, "--output", str(tmp_path / "a")]) == 2
    assert "--allow-base-mismatch" in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "b"), "--allow-base-mismatch"]) == 0
    assert load_adapter(tmp_path / "b").modules.keys() == load_adapter(tiny_adapter).modules.keys()


def test_shapes_are_checked_before_the_model_is_loaded(
    tiny_base, adapter_copy, tiny_calibration, tmp_path, monkeypatch
):
    """A misfit adapter is refused from the configuration alone: refine never reaches load_base_model."""
    refine_module = importlib.import_module("vllm_surgery.refine")  # the module, not the function

    weights = adapter_copy / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"
    tensors[key] = torch.zeros(48, tensors[key].shape[1])
    save_file(tensors, weights)

    def never(*args, **kwargs):
        raise AssertionError("the base model was loaded before the shape check")

    monkeypatch.setattr(refine_module, "load_base_model", never)
    with pytest.raises(AdapterError, match=r"model\.layers\.1\.self_attn\.o_proj.*64 -> 48.*64 -> 64"):
        refine(tiny_base, adapter_copy, tiny_calibration, tmp_path / "out", progress=False)
