"""The base model's layer shapes, read from its configuration alone, and whether an adapter fits them.

Why: an adapter whose tensors agree with its own rank can still disagree with the model it is applied
to (``lora_A`` with 96 input features for a 128-wide layer). vLLM serves such an adapter silently or
fails later on a request; refine() would fail deep inside a forward pass. Checking shapes against the
model's configuration costs no weights: the model is instantiated on PyTorch's ``meta`` device, so the
layer sizes are exactly those transformers would build (fused projections, per-layer sizes and all),
without loading or allocating anything. The API server and the refinement worker both use this.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .errors import AdapterError


@dataclass(frozen=True)
class LayerShape:
    """One layer of the base model that a LoRA could adapt: its kind and (in_features, out_features).

    For an embedding, in_features is the vocabulary size and out_features the embedding width, the
    way PEFT shapes ``lora_embedding_A`` (r x vocab) and ``lora_embedding_B`` (width x r).
    """

    kind: str  # "linear" | "embedding" | "conv1d" | other module class names
    in_features: int | None
    out_features: int | None


def layer_shapes(model: torch.nn.Module) -> dict[str, LayerShape]:
    """Every leaf module of `model` by its PEFT-style name (as in ``model.layers.0.self_attn.q_proj``)."""
    shapes: dict[str, LayerShape] = {}
    for name, module in model.named_modules():
        if not name or any(True for _ in module.children()):
            continue
        if isinstance(module, torch.nn.Linear):
            shapes[name] = LayerShape("linear", module.in_features, module.out_features)
        elif isinstance(module, torch.nn.Embedding):
            shapes[name] = LayerShape("embedding", module.num_embeddings, module.embedding_dim)
        elif type(module).__name__ == "Conv1D":  # transformers' GPT-2 style layer: weight is (in, out)
            weight = module.weight
            shapes[name] = LayerShape("conv1d", int(weight.shape[0]), int(weight.shape[1]))
        else:
            shapes[name] = LayerShape(type(module).__name__, None, None)
    return shapes


@lru_cache(maxsize=8)
def _config_shapes(path: str) -> tuple[tuple[str, LayerShape], ...]:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path}: cannot read the base model's configuration ({e})") from e
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return tuple(layer_shapes(model).items())


def base_layer_shapes(path: str | os.PathLike) -> dict[str, LayerShape]:
    """Layer shapes of the model whose transformers directory is `path`, from config.json alone.

    Cached per path (the configuration of a served model does not change under a running server).
    Raises AdapterError if the configuration cannot be read.
    """
    return dict(_config_shapes(str(Path(path).expanduser().resolve())))


def check_adapter_fits(adapter: Any, shapes: Mapping[str, LayerShape]) -> None:
    """Raise AdapterError naming the module, tensor and both shapes if `adapter` does not fit the model.

    `adapter` is a loaded `LoraAdapter`; every adapted module must exist in the base model, be a layer
    kind LoRA applies to, and have the adapter's input and output sizes.
    """
    where = adapter.path / "adapter_model.safetensors"
    for name, mod in adapter.modules.items():
        shape = shapes.get(name)
        if shape is None:
            raise AdapterError(
                f"{where}: module {name!r} (tensor {mod.a_key!r}) does not exist in the base model; "
                "the adapter was trained for another model"
            )
        if shape.in_features is None:
            raise AdapterError(
                f"{where}: module {name!r} is a {shape.kind} in the base model, which LoRA cannot adapt here"
            )
        if (shape.in_features, shape.out_features) != (mod.in_features, mod.out_features):
            raise AdapterError(
                f"{where}: module {name!r}: lora_A {tuple(adapter.tensors[mod.a_key].shape)} and lora_B "
                f"{tuple(adapter.tensors[mod.b_key].shape)} map {mod.in_features} -> {mod.out_features} "
                f"features, but the base model's {shape.kind} layer maps {shape.in_features} -> "
                f"{shape.out_features}: the adapter was trained for another base model"
            )
