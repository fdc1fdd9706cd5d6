"""Adapter parts beyond linear LoRA: applied exactly as PEFT applies them, or refused by name.

Applied (embedding LoRA, LoRA on lm_head, modules_to_save copies, on tied and untied embeddings): our
answer losses equal those of PEFT's own forward to float32 precision, the part measurably matters (the
same adapter without it computes something else), and the loaded base model is left as it was.
Refused: the exact error, naming the file, field or tensor and the remedy.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from peft_reference import answer_token_losses, mean_answer_loss, peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_surgery import refine
from vllm_surgery.adapted_model import AdaptedModel
from vllm_surgery.adapter import load_adapter
from vllm_surgery.base_model import LayerShape, base_layer_shapes, check_adapter_fits
from vllm_surgery.calibration import collate, load_calibration, split_heldout
from vllm_surgery.errors import AdapterError
from vllm_surgery.spectral import lora_svd
from vllm_surgery.testing import build_lora_adapter, build_tiny_model

PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory):
    """A tiny Llama whose lm_head is its embedding (as SmolLM2's)."""
    return build_tiny_model("llama", tmp_path_factory.mktemp("tied") / "base", tie_word_embeddings=True)


@pytest.fixture(scope="module")
def gemma_base(tmp_path_factory):
    """A tiny Gemma-2: tied, and its embedding layer scales its output (embed_scale), which PEFT applies
    to the embedding LoRA too."""
    return build_tiny_model("gemma2", tmp_path_factory.mktemp("gemma") / "base")


@pytest.fixture(scope="module")
def examples(tiny_base, tiny_calibration):
    return load_calibration(tiny_calibration, AutoTokenizer.from_pretrained(tiny_base)).examples[:6]


def _our_losses(base, adapter, examples, pad_id):
    """Per-example answer losses through AdaptedModel, every linear LoRA on the spectral path."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spectra = {n: lora_svd(adapter.lora_a(n), adapter.lora_b(n)) for n in adapter.modules}
    with torch.no_grad(), AdaptedModel(model, adapter, spectra) as adapted:
        losses = [adapted.answer_losses(collate([e], pad_id)) for e in examples]
    # the base model object is left exactly as it was: same weights, no hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules())
    return losses


VARIANTS = {
    "embedding_lora": {"target_modules": ["o_proj", "down_proj", "embed_tokens"]},
    "lm_head_lora": {"target_modules": ["o_proj", "down_proj", "lm_head"]},
    "saved_lm_head": {"target_modules": ["o_proj", "down_proj"], "modules_to_save": ["lm_head"]},
    "saved_embed_tokens": {"target_modules": ["o_proj", "down_proj"], "modules_to_save": ["embed_tokens"]},
}


def _without_part(adapter, variant):
    """The same adapter with the variant's extra part dropped (what ignoring it would compute)."""
    if variant == "embedding_lora":
        return dataclasses.replace(adapter, embeddings={}, base_copies={})
    if variant == "lm_head_lora":
        modules = {n: m for n, m in adapter.modules.items() if n != "lm_head"}
        return dataclasses.replace(adapter, modules=modules, base_copies={})
    return dataclasses.replace(adapter, saved_modules={})


@pytest.mark.parametrize("model", ["llama", "llama_tied", "gemma2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_applied_parts_equal_peft(variant, model, tiny_base, tied_base, gemma_base, examples, tmp_path):
    base = {"llama": tiny_base, "llama_tied": tied_base, "gemma2": gemma_base}[model]
    adapter_dir = build_lora_adapter(base, tmp_path / "adapter", **VARIANTS[variant])
    adapter = load_adapter(adapter_dir)
    pad = AutoTokenizer.from_pretrained(base).pad_token_id
    with torch.no_grad():
        ref = answer_token_losses(peft_model(base, adapter_dir), examples)
    ours = _our_losses(base, adapter, examples, pad)
    for o, r in zip(ours, ref, strict=True):
        assert torch.allclose(o, r, rtol=1e-5, atol=1e-5), (o, r)
    ignored = _our_losses(base, _without_part(adapter, variant), examples, pad)
    gap = max(float((i - r).abs().max()) for i, r in zip(ignored, ref, strict=True))
    assert gap > 1e-2  # the part matters: leaving it out would be measurably wrong


def test_parts_are_recognised_as_what_they_are(tiny_base, tmp_path):
    emb = load_adapter(build_lora_adapter(tiny_base, tmp_path / "e", **VARIANTS["embedding_lora"]))
    assert list(emb.embeddings) == ["model.embed_tokens"] and "model.embed_tokens" not in emb.modules
    m = emb.embeddings["model.embed_tokens"]
    assert (m.rank, m.scaling, m.in_features, m.out_features) == (8, 2.0, 300, 64)
    assert emb.base_copies == {"model.embed_tokens": f"{PREFIX}model.embed_tokens.base_layer.weight"}
    saved = load_adapter(build_lora_adapter(tiny_base, tmp_path / "s", **VARIANTS["saved_lm_head"]))
    assert saved.saved_modules["lm_head"].tensors == {"weight": f"{PREFIX}lm_head.weight"}
    assert sorted(saved.modules) == [
        f"model.layers.{i}.{m}" for i in (0, 1) for m in ("mlp.down_proj", "self_attn.o_proj")
    ]


def test_refine_keeps_fixed_parts_and_peft_measures_what_was_reported(tied_base, tiny_calibration, tmp_path):
    """A tied model, an embedding LoRA and a saved lm_head: refined, written, and re-measured by PEFT."""
    adapter_dir = build_lora_adapter(
        tied_base,
        tmp_path / "adapter",
        target_modules=["o_proj", "down_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
    )
    out = tmp_path / "refined"
    result = refine(
        tied_base, adapter_dir, tiny_calibration, out, force=True, min_improvement=0.9, progress=False
    )
    assert result.decision == "forced"
    assert sorted(result.modules) == sorted(load_adapter(adapter_dir).modules)  # embedding: never edited
    original, written = (
        load_file(adapter_dir / "adapter_model.safetensors"),
        load_file(out / "adapter_model.safetensors"),
    )
    for key in original:
        if "embed_tokens" in key or "lm_head" in key:
            assert torch.equal(original[key], written[key]), key
    tok = AutoTokenizer.from_pretrained(tied_base)
    _, heldout = split_heldout(load_calibration(tiny_calibration, tok).examples, 0.25, seed=0)
    assert mean_answer_loss(tied_base, adapter_dir, heldout) == pytest.approx(
        result.quality_before.loss, rel=1e-5
    )
    assert mean_answer_loss(tied_base, out, heldout) == pytest.approx(result.quality_after.loss, rel=1e-5)


def test_a_base_layer_copy_that_differs_from_the_base_model_is_refused(tiny_base, tiny_calibration, tmp_path):
    adapter_dir = build_lora_adapter(tiny_base, tmp_path / "adapter", **VARIANTS["embedding_lora"])
    key = f"{PREFIX}model.embed_tokens.base_layer.weight"
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    tensors[key] = tensors[key] + 0.01  # e.g. trained with resized or retrained embeddings
    save_file(tensors, adapter_dir / "adapter_model.safetensors")
    with pytest.raises(AdapterError) as info:
        refine(tiny_base, adapter_dir, tiny_calibration, tmp_path / "out", force=True, progress=False)
    assert str(info.value) == (
        f"{adapter_dir}/adapter_model.safetensors: tensor {key!r} is a copy of the base layer 'model.embed_tokens' "
        "saved with the adapter, and it differs from the base model's weight: PEFT would load the copy, vLLM uses "
        "the base model's own, so the two would serve different functions. Use the base model the adapter was "
        "trained on, or re-save the adapter without it (save_embedding_layers=False)"
    )
    assert not (tmp_path / "out").exists()


def _config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def test_peft_built_variants_we_do_not_apply_are_refused_by_name(tiny_base, tmp_path):
    cases = {
        "trainable_token_indices": (
            {"trainable_token_indices": [3, 5]},
            "unsupported: trainable tokens (trainable_token_indices=[3, 5]); merge them into the base model "
            "(PEFT merge_and_unload) and train the LoRA without them",
        ),
        "target_parameters": (
            {"target_parameters": ["mlp.gate_proj.weight"]},
            "unsupported: LoRA on parameters (e.g. MoE experts) (target_parameters=['mlp.gate_proj.weight']); "
            "only LoRA on linear and embedding layers is supported",
        ),
        "layer_replication": (
            {"layer_replication": [[0, 2], [1, 2]]},
            "unsupported: layer replication (layer_replication=[[0, 2], [1, 2]]); merge the adapter into the "
            "base model (PEFT merge_and_unload)",
        ),
        "use_dora": (
            {"use_dora": True},
            "unsupported: DoRA (use_dora=True); convert to a plain LoRA or merge it into the base model",
        ),
    }
    for name, (kwargs, message) in cases.items():
        path = build_lora_adapter(tiny_base, tmp_path / name, target_modules=["o_proj"], **kwargs)
        with pytest.raises(AdapterError) as info:
            load_adapter(path)
        assert str(info.value) == f"{path}/adapter_config.json: {message}", name


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"fan_in_fan_out": True},
            "unsupported: Conv1D base layers (GPT-2 style models) (fan_in_fan_out=True); only models with "
            "nn.Linear layers are supported",
        ),
        (
            {"megatron_config": {"tensor_model_parallel_size": 2}},
            "unsupported: Megatron parallel layers (megatron_config={'tensor_model_parallel_size': 2}); convert "
            "to a transformers LoRA",
        ),
        (
            {"some_future_field": 3},
            "unknown field(s) some_future_field=3: vllm-surgery does not know whether they change what the "
            "adapter computes, so it refuses it; remove them if they are metadata only",
        ),
        (
            {"task_type": "SEQ_CLS"},
            "task_type is 'SEQ_CLS'; only causal language model adapters (CAUSAL_LM) are supported",
        ),
        ({"some_future_field": None, "other": False}, None),  # default-valued unknown fields are harmless
    ],
)
def test_config_fields_we_do_not_apply_are_refused(adapter_copy, changes, message):
    _config(adapter_copy, **changes)
    if message is None:
        load_adapter(adapter_copy)
        return
    with pytest.raises(AdapterError) as info:
        load_adapter(adapter_copy)
    assert str(info.value) == f"{adapter_copy}/adapter_config.json: {message}"


def test_weight_tying_across_adapted_embeddings_is_refused(tiny_base, tmp_path):
    path = build_lora_adapter(tiny_base, tmp_path / "a", **VARIANTS["embedding_lora"])
    _config(path, ensure_weight_tying=True)
    with pytest.raises(AdapterError) as info:
        load_adapter(path)
    assert str(info.value) == (
        f"{path}/adapter_config.json: ensure_weight_tying=true with an adapted or saved embedding layer ties "
        "adapter parts across layers, which is not supported"
    )


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (
            "base_model.model.model.norm.weight",
            "is not a part of a LoRA adapter that vllm-surgery applies (lora_A/lora_B, lora_embedding_A/B, "
            "modules_to_save copies); refusing the adapter rather than ignoring it",
        ),
        (
            "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
            "holds trainable tokens, which are not supported; merge them into the base model (PEFT "
            "merge_and_unload) and train the LoRA without them",
        ),
        (
            "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight",
            "is a copy of base layer 'model.layers.0.self_attn.q_proj', which the adapter does not adapt",
        ),
    ],
)
def test_tensors_we_do_not_apply_are_refused(adapter_copy, key, message):
    # the tiny adapter adapts q_proj, but saves no base-layer copy for it: a stray copy is not understood
    weights = adapter_copy / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors[key] = torch.zeros(2, 64)
    if "q_proj" in key:  # make q_proj a module the adapter does not adapt
        for k in [k for k in tensors if ".self_attn.q_proj.lora_" in k and ".layers.0." in k]:
            del tensors[k]
    save_file(tensors, weights)
    with pytest.raises(AdapterError) as info:
        load_adapter(adapter_copy)
    assert str(info.value) == f"{weights}: tensor {key!r} {message}"


def test_quantized_base_models_are_refused_before_loading(
    tiny_base, tiny_adapter, tiny_calibration, tmp_path
):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(cfg))
    expected = (
        f"{base}: the base model is quantized (quantization_config, method bitsandbytes); quantized base "
        "layers are not supported: use the unquantized (bf16/fp16/fp32) base model"
    )
    with pytest.raises(AdapterError) as info:
        base_layer_shapes(base)
    assert str(info.value) == expected
    with pytest.raises(AdapterError, match="the base model is quantized"):
        refine(
            base, tiny_adapter, tiny_calibration, tmp_path / "out", allow_base_mismatch=True, progress=False
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("variant", "layer", "shape", "message"),
    [
        (
            "embedding_lora",
            "model.layers.0.self_attn.o_proj",
            LayerShape("conv1d", 64, 64),
            "module 'model.layers.0.self_attn.o_proj' is a Conv1D layer (GPT-2 style, fan_in_fan_out); only "
            "nn.Linear and nn.Embedding layers are supported",
        ),
        (
            "embedding_lora",
            "model.embed_tokens",
            LayerShape("linear", 300, 64),
            "module 'model.embed_tokens' is a linear in the base model; an embedding LoRA (lora_embedding_A/B) "
            "cannot adapt it",
        ),
        (
            "saved_lm_head",
            "lm_head",
            LayerShape("linear", 64, 200, (("weight", (200, 64)),)),
            "tensor 'base_model.model.lm_head.weight' (lm_head.weight, shape (300, 64)) does not match the base "
            "model's lm_head.weight ((200, 64)): the adapter was trained for another base model",
        ),
    ],
)
def test_layer_kinds_that_do_not_fit_are_refused(tiny_base, tmp_path, variant, layer, shape, message):
    adapter = load_adapter(build_lora_adapter(tiny_base, tmp_path / "a", **VARIANTS[variant]))
    shapes = dict(base_layer_shapes(tiny_base), **{layer: shape})
    with pytest.raises(AdapterError) as info:
        check_adapter_fits(adapter, shapes)
    assert str(info.value) == f"{adapter.weights_path}: {message}"
