"""The base model an adapter is applied to: its layer shapes from the configuration alone, whether an
adapter fits them, and whether the adapter was trained for it. All of it runs before any real work.

Why: an adapter whose tensors agree with its own rank can still disagree with the model it is applied
to (``lora_A`` with 96 input features for a 128-wide layer). vLLM serves such an adapter silently or
fails later on a request; refine() would fail deep inside a forward pass. Checking shapes against the
model's configuration costs no weights: the model is instantiated on PyTorch's ``meta`` device, so the
layer sizes are exactly those transformers would build (fused projections, per-layer sizes and all),
without loading or allocating anything. The API server and the refinement worker both use this.

Names: an adapter records ``base_model_name_or_path``, which is a hub id ("meta-llama/Llama-3.1-8B")
or whatever directory it was trained from ("/home/me/ckpt/Llama-3.1-8B"). The base given here is
usually a local directory. Two names denote the same model if both are existing paths that resolve to
the same directory, or if their last components are equal ignoring case, where the last component of
a hub cache snapshot (``.../models--ORG--NAME/snapshots/HASH``) is NAME. So a local copy named like the
hub repository matches, and ``/models/llama`` for an adapter of ``meta-llama/Llama-3.1-8B`` does not:
that needs ``allow_base_mismatch`` (``--allow-base-mismatch``), since a wrong base computes garbage
without any shape error when sizes coincide (two fine-tunes of one architecture). An adapter that
records no base name is not checked by name; shapes are always checked.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .errors import AdapterError

log = logging.getLogger(__name__)

_SNAPSHOT = re.compile(r"models--[^/]+--(?P<name>[^/]+)/snapshots/[^/]+$")


@dataclass(frozen=True)
class LayerShape:
    """One layer of the base model that a LoRA could adapt: its kind and (in_features, out_features).

    For an embedding, in_features is the vocabulary size and out_features the embedding width, the
    way PEFT shapes ``lora_embedding_A`` (r x vocab) and ``lora_embedding_B`` (width x r).
    `parameters` holds the layer's own parameter shapes (for ``modules_to_save`` copies).
    """

    kind: str  # "linear" | "embedding" | "conv1d" | other module class names
    in_features: int | None
    out_features: int | None
    parameters: tuple[tuple[str, tuple[int, ...]], ...] = field(default=(), compare=False)


def layer_shapes(model: torch.nn.Module) -> dict[str, LayerShape]:
    """Every leaf module of `model` by its PEFT-style name (as in ``model.layers.0.self_attn.q_proj``)."""
    shapes: dict[str, LayerShape] = {}
    for name, module in model.named_modules():
        if not name or any(True for _ in module.children()):
            continue
        params = tuple((n, tuple(p.shape)) for n, p in module.named_parameters(recurse=False))
        if isinstance(module, torch.nn.Linear):
            shapes[name] = LayerShape("linear", module.in_features, module.out_features, params)
        elif isinstance(module, torch.nn.Embedding):
            shapes[name] = LayerShape("embedding", module.num_embeddings, module.embedding_dim, params)
        elif type(module).__name__ == "Conv1D":  # transformers' GPT-2 style layer: weight is (in, out)
            weight = module.weight
            shapes[name] = LayerShape("conv1d", int(weight.shape[0]), int(weight.shape[1]), params)
        else:
            shapes[name] = LayerShape(type(module).__name__, None, None, params)
    return shapes


def _read_config(path: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path}: cannot read the base model's configuration ({e})") from e


@lru_cache(maxsize=8)
def _config_shapes(path: str) -> tuple[tuple[str, LayerShape], ...]:
    from transformers import AutoModelForCausalLM

    config = _read_config(path)
    check_not_quantized(config, path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return tuple(layer_shapes(model).items())


def base_layer_shapes(path: str | os.PathLike) -> dict[str, LayerShape]:
    """Layer shapes of the model whose transformers directory is `path`, from config.json alone.

    Cached per path (the configuration of a served model does not change under a running server).
    Raises AdapterError if the configuration cannot be read or names a quantized model.
    """
    return dict(_config_shapes(str(Path(path).expanduser().resolve())))


def check_not_quantized(config: Any, where: object) -> None:
    """Raise AdapterError if a model configuration declares quantization (bitsandbytes, GPTQ, AWQ, ...).

    A LoRA on a quantized layer adds to a dequantised weight that differs from the one the adapter's
    sensitivities would be measured on here, and this package applies adapters only to float layers.
    """
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = (
            quant.get("quant_method") if isinstance(quant, Mapping) else getattr(quant, "quant_method", None)
        )
        raise AdapterError(
            f"{where}: the base model is quantized (quantization_config, method {method or 'unknown'}); "
            "quantized base layers are not supported: use the unquantized (bf16/fp16/fp32) base model"
        )


def _shape_error(where: Path, name: str, key: str, what: str, shape: LayerShape) -> AdapterError:
    return AdapterError(
        f"{where}: module {name!r} (tensor {key!r}) {what}, but the base model's {shape.kind} layer maps "
        f"{shape.in_features} -> {shape.out_features}: the adapter was trained for another base model"
    )


def _layer(where: Path, shapes: Mapping[str, LayerShape], name: str, key: str) -> LayerShape:
    shape = shapes.get(name)
    if shape is None:
        raise AdapterError(
            f"{where}: module {name!r} (tensor {key!r}) does not exist in the base model; "
            "the adapter was trained for another model"
        )
    if shape.kind == "conv1d":
        raise AdapterError(
            f"{where}: module {name!r} is a Conv1D layer (GPT-2 style, fan_in_fan_out); only nn.Linear and "
            "nn.Embedding layers are supported"
        )
    return shape


def check_adapter_fits(adapter: Any, shapes: Mapping[str, LayerShape]) -> None:
    """Raise AdapterError naming the module, tensor and both shapes if `adapter` does not fit the model.

    `adapter` is a loaded `LoraAdapter`: every linear LoRA must sit on a linear layer, every embedding
    LoRA on an embedding, with the adapter's sizes, and every ``modules_to_save`` copy must have the
    layer's parameter shapes.
    """
    where = adapter.weights_path
    for name, mod in adapter.modules.items():
        shape = _layer(where, shapes, name, mod.a_key)
        if shape.kind != "linear":
            raise AdapterError(
                f"{where}: module {name!r} is a {shape.kind} in the base model; a linear LoRA "
                "(lora_A/lora_B) cannot adapt it"
            )
        if (shape.in_features, shape.out_features) != (mod.in_features, mod.out_features):
            what = (
                f"lora_A {tuple(adapter.tensors[mod.a_key].shape)} and lora_B "
                f"{tuple(adapter.tensors[mod.b_key].shape)} map {mod.in_features} -> {mod.out_features} features"
            )
            raise _shape_error(where, name, mod.a_key, what, shape)
    for name, mod in adapter.embeddings.items():
        shape = _layer(where, shapes, name, mod.a_key)
        if shape.kind != "embedding":
            raise AdapterError(
                f"{where}: module {name!r} is a {shape.kind} in the base model; an embedding LoRA "
                "(lora_embedding_A/B) cannot adapt it"
            )
        if (shape.in_features, shape.out_features) != (mod.in_features, mod.out_features):
            what = f"has vocabulary {mod.in_features} and width {mod.out_features}"
            raise _shape_error(where, name, mod.a_key, what, shape)
    for name, saved in adapter.saved_modules.items():
        shape = _layer(where, shapes, name, next(iter(saved.tensors.values())))
        if shape.kind not in ("linear", "embedding"):
            raise AdapterError(
                f"{where}: modules_to_save entry {name!r} is a {shape.kind} in the base model; only saved "
                "linear and embedding layers are supported"
            )
        params = dict(shape.parameters)
        for param, key in saved.tensors.items():
            got = tuple(adapter.tensors[key].shape)
            if param not in params or params[param] != got:
                raise AdapterError(
                    f"{where}: tensor {key!r} ({name}.{param}, shape {got}) does not match the base model's "
                    f"{name}.{param} ({params.get(param, 'absent')}): the adapter was trained for another base "
                    "model"
                )


def _model_name(name: str) -> str:
    text = name.rstrip("/\\")
    snapshot = _SNAPSHOT.search(text.replace("\\", "/"))
    if snapshot is not None:
        return snapshot["name"].lower()
    return re.split(r"[/\\]", text)[-1].lower()


def same_base_model(recorded: str, given: str) -> bool:
    """Whether `recorded` (the adapter's base_model_name_or_path) and `given` name the same model.

    The rule is in the module docstring: same resolved directory, or same last name component
    (case-insensitive; a hub cache snapshot path counts as its repository name).
    """
    try:
        a, b = Path(recorded).expanduser(), Path(given).expanduser()
        if a.exists() and b.exists() and a.resolve() == b.resolve():
            return True
    except OSError:
        pass
    return bool(_model_name(recorded)) and _model_name(recorded) == _model_name(given)


def check_base_name(adapter: Any, given: str | os.PathLike | None, allow_mismatch: bool = False) -> None:
    """Raise AdapterError if the adapter records a base model other than `given` (see same_base_model).

    With `allow_mismatch` a mismatch is only logged. Nothing is checked when either name is unknown.
    """
    recorded = adapter.base_model_name
    if not recorded or not given:
        return
    if same_base_model(str(recorded), str(given)):
        return
    message = (
        f"{adapter.path / 'adapter_config.json'}: base_model_name_or_path is {recorded!r}, but the base model "
        f"given is {str(given)!r}: the adapter was trained for another base model. If it is the same model "
        "under another name, pass allow_base_mismatch=True (CLI: --allow-base-mismatch)"
    )
    if not allow_mismatch:
        raise AdapterError(message)
    log.warning("%s (allowed by allow_base_mismatch)", message)


def check_base_model(
    adapter: Any,
    base_model: str | os.PathLike | None = None,
    model: torch.nn.Module | None = None,
    *,
    allow_base_mismatch: bool = False,
) -> None:
    """Everything about the base model that refine() checks before loading data or running a pass.

    The adapter's recorded base name against `base_model` (or the loaded `model`'s own name), the base
    model not quantized, and the adapter's shapes against its layers: from the loaded `model` if given,
    else from `base_model`'s configuration on the meta device. Raises AdapterError naming the problem.
    """
    name = (
        base_model
        if base_model is not None
        else getattr(getattr(model, "config", None), "_name_or_path", None)
    )
    check_base_name(adapter, name, allow_base_mismatch)
    if model is not None:
        check_not_quantized(model.config, type(model).__name__)
        shapes = layer_shapes(model)
    elif base_model is not None:
        shapes = base_layer_shapes(base_model)
    else:
        return
    check_adapter_fits(adapter, shapes)
