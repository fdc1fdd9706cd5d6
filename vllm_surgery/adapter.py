"""PEFT LoRA adapters on disk: strict loading, a content hash, and atomic saving.

Only safetensors are ever read: a `.bin`/`.pt` adapter is a pickle, and unpickling an uploaded file
runs arbitrary code. Saving writes a complete sibling directory and renames it into place, so a
reader (vLLM, a resolver, another worker) sees either no adapter or a whole one.

Every part of an adapter is either applied exactly or refused by name, never skipped: what refine()
measures must be the function that is served.

- ``lora_A/lora_B.weight`` on linear layers: the spectrally edited parts (``modules``).
- ``lora_embedding_A/B`` on embedding layers (``embeddings``): applied as PEFT does,
  ``emb(x) + scaling * F.embedding(x, A^T) @ B^T`` (times the layer's ``embed_scale`` where it has
  one), as a fixed part: surgery never edits them.
- ``modules_to_save`` (``saved_modules``): full copies of a layer (lm_head, embed_tokens, ...) that
  replace the base layer's weight in the forward; the loaded base model itself is never modified. A copy
  replaces only the named layer, as PEFT's wrapper does: with tied embeddings, a saved lm_head leaves
  embed_tokens as it is, and the other way round.
- ``<layer>.base_layer.weight`` (``base_copies``): the copy of the base embedding/lm_head that PEFT
  writes when an embedding is a LoRA target (``save_embedding_layers``). PEFT loads it in place of the
  base weight, vLLM ignores it; the two agree only if it equals the base model's weight, which
  AdaptedModel checks before any work (refused otherwise).
- Refused by name: DoRA, LoRA biases, trainable tokens, ``target_parameters``, ``layer_replication``,
  Conv1D (``fan_in_fan_out``), Megatron layers, aLoRA, QALoRA, BD-LoRA and the other LoRA variants,
  base-rewriting initialisations, non-causal-LM task types, any config field we do not know with a
  non-default value, and any tensor that is none of the above.

What vLLM 0.32 does with these parts (vllm/lora/lora_model.py, peft_helper.py, utils.py,
layers/vocab_parallel_embedding.py), for the serving code to refuse at resolve time what vLLM would
serve differently from PEFT:

- Embedding LoRA: loaded for models whose vLLM class lists ``embed_tokens`` in ``embedding_modules``
  (Llama and its subclasses Mistral and Phi-3, Qwen3, Granite, Cohere among others) and computed as
  PEFT does, the scaling folded into B; the embedding A must have the model's vocabulary size. Models
  without it (Qwen2, Gemma, Gemma-2, Gemma-3 among others) refuse the adapter at load ("expected target
  modules ..."), so an embedding LoRA is served by vLLM only where it is served exactly.
- ``<layer>.base_layer.weight`` copies: silently skipped (``is_base_embedding_weights``); the base
  model's own weight is used.
- ``modules_to_save``: refused at load unless every entry is ``classifier`` or ``score`` (pooling
  models only): an adapter with a saved lm_head or embed_tokens cannot be served by vLLM 0.32 at all.
- Also refused by vLLM: DoRA, lora_bias, layer_replication, aLoRA, QALoRA, BD-LoRA, base-rewriting
  inits; trainable-token tensors fail its name parser.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .calibration import ADAPTER_CALIBRATION_NAME
from .errors import AdapterError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PROVENANCE_NAME = "surgery.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

_PEFT_PREFIX = "base_model.model."
# <module>.<part>: the tensor names PEFT writes for a LoRA adapter, after the "base_model.model." prefix.
_TENSOR_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_[AB]\.weight|lora_embedding_[AB]|base_layer\.weight)$"
)
# Fields that record where an adapter came from, not what it computes: left out of the content hash.
_PROVENANCE_FIELDS = frozenset({"base_model_name_or_path", "revision", "inference_mode", "peft_version"})
# Initialisations that also rewrite the base weights: such an adapter is not a delta on the base model.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")
# adapter_config.json fields whose value we know does not change the function served (metadata, training
# or initialisation settings, or settings handled below). Any other field with a non-default value is
# refused by name: a field added by a newer PEFT may change what the adapter computes.
_KNOWN_FIELDS = frozenset(
    {
        "task_type",
        "peft_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "r",
        "target_modules",
        "exclude_modules",
        "lora_alpha",
        "lora_dropout",
        "bias",
        "use_rslora",
        "modules_to_save",
        "init_lora_weights",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "megatron_core",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "runtime_config",
        "qalora_group_size",
        "ensure_weight_tying",
    }
)
# Fields that change the function in a way we do not reproduce: (what it is, the remedy).
_REFUSED_FIELDS = {
    "use_dora": ("DoRA", "convert to a plain LoRA or merge it into the base model"),
    "lora_bias": ("LoRA biases", "retrain without lora_bias"),
    "fan_in_fan_out": (
        "Conv1D base layers (GPT-2 style models)",
        "only models with nn.Linear layers are supported",
    ),
    "trainable_token_indices": (
        "trainable tokens",
        "merge them into the base model (PEFT merge_and_unload) and train the LoRA without them",
    ),
    "target_parameters": (
        "LoRA on parameters (e.g. MoE experts)",
        "only LoRA on linear and embedding layers is supported",
    ),
    "layer_replication": (
        "layer replication",
        "merge the adapter into the base model (PEFT merge_and_unload)",
    ),
    "megatron_config": ("Megatron parallel layers", "convert to a transformers LoRA"),
    "alora_invocation_tokens": ("Activated LoRA (aLoRA)", "use a plain LoRA"),
    "use_qalora": ("QALoRA", "use a plain LoRA"),
    "use_bdlora": ("block-diagonal LoRA", "use a plain LoRA"),
    "arrow_config": ("Arrow routing", "use a plain LoRA"),
    "kasa_config": ("KaSA", "use a plain LoRA"),
    "velora_config": ("VeLoRA", "use a plain LoRA"),
    "monteclora_config": ("MonteCLoRA", "use a plain LoRA"),
}


@dataclass(frozen=True)
class LoraModule:
    """One adapted layer: `dW = scaling * B @ A`, named as PEFT names modules in the base model.

    For an embedding LoRA (``lora_embedding_A``/``B``), in_features is the vocabulary size and
    out_features the embedding width, as for LayerShape.
    """

    name: str
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scaling: float
    in_features: int
    out_features: int


@dataclass(frozen=True)
class SavedModule:
    """A full copy of a base layer saved with the adapter (``modules_to_save``): parameter name -> tensor key."""

    name: str
    tensors: dict[str, str]


@dataclass
class LoraAdapter:
    """An adapter held in memory exactly as read: config, tensors (original dtypes) and file metadata.

    modules: linear LoRA layers (the ones surgery edits); embeddings: embedding LoRA layers (applied, never
    edited); saved_modules: ``modules_to_save`` copies; base_copies: module -> key of a saved copy of the
    base layer's weight that must equal the base model's (see the module docstring).
    """

    path: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    modules: dict[str, LoraModule]
    metadata: dict[str, str] | None = None
    embeddings: dict[str, LoraModule] = field(default_factory=dict)
    saved_modules: dict[str, SavedModule] = field(default_factory=dict)
    base_copies: dict[str, str] = field(default_factory=dict)
    _hash: str | None = field(default=None, repr=False)

    def lora_a(self, name: str) -> torch.Tensor:
        return self.tensors[self.modules[name].a_key]

    def lora_b(self, name: str) -> torch.Tensor:
        return self.tensors[self.modules[name].b_key]

    @property
    def base_model_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_NAME

    def content_hash(self) -> str:
        """SHA-256 of what determines the adapter's function: config (minus provenance) and tensors.

        Stable across re-saves, paths and tensor order, so it can key a cache of refined versions.
        """
        if self._hash is None:
            h = hashlib.sha256()
            cfg = {k: v for k, v in self.config.items() if k not in _PROVENANCE_FIELDS}
            h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
            for key in sorted(self.tensors):
                t = self.tensors[key].contiguous()
                h.update(f"\0{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._hash = h.hexdigest()
        return self._hash


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's own rule for rank_pattern / alpha_pattern keys (regex on the module name's suffix)."""
    from peft.utils.other import get_pattern_key

    if not patterns:
        return default
    key = get_pattern_key(list(patterns.keys()), module)
    return patterns.get(key, default)


def module_scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _is_default(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (list, dict, str)) and not value)


def _check_fields(config: Mapping[str, Any], cfg_path: Path) -> None:
    """Refuse, by field name, every setting that changes the adapter's function in a way we do not apply."""
    for name, (what, remedy) in _REFUSED_FIELDS.items():
        if not _is_default(config.get(name)):
            raise AdapterError(f"{cfg_path}: unsupported: {what} ({name}={config[name]!r}); {remedy}")
    unknown = sorted(
        k
        for k, v in config.items()
        if k not in _KNOWN_FIELDS and k not in _REFUSED_FIELDS and not _is_default(v)
    )
    if unknown:
        raise AdapterError(
            f"{cfg_path}: unknown field(s) {', '.join(f'{k}={config[k]!r}' for k in unknown)}: vllm-surgery does "
            "not know whether they change what the adapter computes, so it refuses it; remove them if they are "
            "metadata only"
        )
    if config.get("task_type") is not None and str(config["task_type"]).upper() != "CAUSAL_LM":
        raise AdapterError(
            f"{cfg_path}: task_type is {config['task_type']!r}; only causal language model adapters "
            "(CAUSAL_LM) are supported"
        )
    if not _is_default(config.get("loftq_config")):
        raise AdapterError(
            f"{cfg_path}: loftq_config is set: LoftQ rewrites the base weights (not supported)"
        )
    saved = config.get("modules_to_save")
    if saved is not None and (not isinstance(saved, list) or not all(isinstance(m, str) for m in saved)):
        raise AdapterError(f"{cfg_path}: 'modules_to_save' must be a list of module names, got {saved!r}")


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterError(f"{cfg_path}: missing; a PEFT LoRA adapter directory needs {CONFIG_NAME}")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise AdapterError(f"{cfg_path}: must hold a JSON object")
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise AdapterError(f"{cfg_path}: missing field 'peft_type'")
    if str(peft_type).upper() != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type is {peft_type!r}; only LORA adapters are supported")
    for name in ("r", "lora_alpha", "target_modules"):
        if config.get(name) is None:
            raise AdapterError(f"{cfg_path}: missing field {name!r}")
    if not isinstance(config["r"], int) or config["r"] <= 0:
        raise AdapterError(f"{cfg_path}: 'r' must be a positive integer, got {config['r']!r}")
    if not isinstance(config["lora_alpha"], (int, float)) or config["lora_alpha"] <= 0:
        raise AdapterError(
            f"{cfg_path}: 'lora_alpha' must be a positive number, got {config['lora_alpha']!r}"
        )
    if config.get("bias", "none") != "none":
        raise AdapterError(
            f"{cfg_path}: adapters with trained biases (bias={config['bias']!r}) are not supported"
        )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise AdapterError(
            f"{cfg_path}: init_lora_weights={init!r} rewrites the base weights; such an adapter is not a "
            "plain LoRA delta (convert it to a standard LoRA first)"
        )
    for name in ("rank_pattern", "alpha_pattern"):
        if config.get(name) is not None and not isinstance(config[name], dict):
            raise AdapterError(f"{cfg_path}: {name!r} must be an object, got {type(config[name]).__name__}")
    _check_fields(config, cfg_path)
    return config


def _read_tensors(weights: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(weights, framework="pt") as f:
            metadata = f.metadata()
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[key] = f.get_tensor(key)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise AdapterError(f"{weights}: cannot be read as safetensors ({e})") from e
    if not tensors:
        raise AdapterError(f"{weights}: holds no tensors")
    return tensors, metadata


def _unknown_tensor(weights: Path, key: str) -> AdapterError:
    """The error for a tensor that is no part we apply, naming the feature where we recognise it."""
    if key.endswith("lora_magnitude_vector") or ".lora_magnitude_vector." in key:
        return AdapterError(f"{weights}: tensor {key!r} is a DoRA magnitude; DoRA is not supported")
    if ".lora_" in key and key.endswith(".bias"):
        return AdapterError(f"{weights}: tensor {key!r} is a LoRA bias; lora_bias is not supported")
    if "trainable_tokens_" in key or ".token_adapter." in key:
        return AdapterError(
            f"{weights}: tensor {key!r} holds trainable tokens, which are not supported; merge them into the "
            "base model (PEFT merge_and_unload) and train the LoRA without them"
        )
    return AdapterError(
        f"{weights}: tensor {key!r} is not a part of a LoRA adapter that vllm-surgery applies (lora_A/lora_B, "
        "lora_embedding_A/B, modules_to_save copies); refusing the adapter rather than ignoring it"
    )


def _saved_module(key: str, names: list[str]) -> tuple[str, str] | None:
    """(module, parameter) if `key` is a parameter of a module listed in modules_to_save."""
    module, _, param = key.rpartition(".")
    if not module or param not in ("weight", "bias"):
        return None
    for wanted in names:
        if module == wanted or module.endswith("." + wanted):
            return module, param
    return None


def _lora_pair(
    weights: Path,
    config: Mapping[str, Any],
    name: str,
    pair: Mapping[str, str],
    tensors: Mapping[str, torch.Tensor],
) -> LoraModule:
    """Validate one A/B pair (linear or embedding) against r / rank_pattern and build its LoraModule."""
    if "A" not in pair or "B" not in pair:
        have, miss = ("A", "B") if "A" in pair else ("B", "A")
        part = "lora_embedding_" if "lora_embedding_" in pair[have] else "lora_"
        raise AdapterError(
            f"{weights}: tensor {pair[have]!r} has no matching {part}{miss} for module {name!r}"
        )
    a, b = tensors[pair["A"]], tensors[pair["B"]]
    for key, t in ((pair["A"], a), (pair["B"], b)):
        if t.ndim != 2:
            raise AdapterError(
                f"{weights}: tensor {key!r} has shape {tuple(t.shape)}; only linear (2-D) LoRA layers are supported"
            )
        if not t.is_floating_point():
            raise AdapterError(f"{weights}: tensor {key!r} has non-float dtype {t.dtype}")
    rank = _pattern_value(config.get("rank_pattern") or {}, name, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
    if a.shape[0] != rank or b.shape[1] != rank:
        raise AdapterError(
            f"{weights}: module {name!r} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
            f"inconsistent with rank r={rank} from {CONFIG_NAME}"
        )
    return LoraModule(
        name=name,
        a_key=pair["A"],
        b_key=pair["B"],
        rank=int(rank),
        alpha=float(alpha),
        scaling=module_scaling(int(rank), float(alpha), bool(config.get("use_rslora", False))),
        in_features=int(a.shape[1]),
        out_features=int(b.shape[0]),
    )


def load_adapter(path: str | os.PathLike) -> LoraAdapter:
    """Read and validate a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).

    Raises AdapterError naming the file, field or tensor for anything missing, malformed, non-finite or
    not applied exactly (see the module docstring for what is applied and what is refused).
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: not a directory")
    config = _read_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise AdapterError(
                f"{path}: only pickle weights found ({', '.join(pickles)}); refusing to unpickle them. "
                f"Convert the adapter to {WEIGHTS_NAME} (PEFT: save_pretrained(safe_serialization=True))"
            )
        raise AdapterError(f"{weights}: missing")
    tensors, metadata = _read_tensors(weights)
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AdapterError(f"{weights}: tensor {key!r} contains NaN or Inf values")

    linear: dict[str, dict[str, str]] = {}
    embedding: dict[str, dict[str, str]] = {}
    copies: dict[str, str] = {}
    saved: dict[str, dict[str, str]] = {}
    to_save = list(config.get("modules_to_save") or [])
    for key in tensors:
        name = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
        m = _TENSOR_KEY.match(name)
        if m is not None and m["part"] == "base_layer.weight":
            copies[m["module"]] = key
        elif m is not None:
            side = m["part"].split(".")[0][-1]
            (embedding if "embedding" in m["part"] else linear).setdefault(m["module"], {})[side] = key
        elif (hit := _saved_module(name, to_save)) is not None:
            saved.setdefault(hit[0], {})[hit[1]] = key
        else:
            raise _unknown_tensor(weights, key)

    modules = {n: _lora_pair(weights, config, n, pair, tensors) for n, pair in sorted(linear.items())}
    embeddings = {n: _lora_pair(weights, config, n, pair, tensors) for n, pair in sorted(embedding.items())}
    for name, key in copies.items():
        if name not in modules and name not in embeddings:
            raise AdapterError(
                f"{weights}: tensor {key!r} is a copy of base layer {name!r}, which the adapter does not adapt"
            )
    for name in saved:
        if name in modules or name in embeddings:
            raise AdapterError(f"{weights}: module {name!r} is both in modules_to_save and a LoRA target")
    if not modules:
        raise AdapterError(f"{weights}: no lora_A/lora_B tensor pairs found")
    if config.get("ensure_weight_tying") and (embeddings or saved):
        raise AdapterError(
            f"{path / CONFIG_NAME}: ensure_weight_tying=true with an adapted or saved embedding layer ties "
            "adapter parts across layers, which is not supported"
        )
    return LoraAdapter(
        path=path,
        config=config,
        tensors=tensors,
        modules=modules,
        metadata=metadata,
        embeddings=embeddings,
        saved_modules={n: SavedModule(n, dict(p)) for n, p in sorted(saved.items())},
        base_copies=copies,
    )


def _check_finite(tensors: Mapping[str, torch.Tensor], where: Path) -> None:
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AdapterError(
                f"{where}: tensor {key!r} would be written with NaN or Inf values; nothing was written"
            )


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that a rename into it survives a crash. Raises OSError."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_adapter(
    adapter: LoraAdapter,
    out_dir: str | os.PathLike,
    replacements: Mapping[str, torch.Tensor] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write `adapter` with some tensors replaced, atomically, to a new directory `out_dir`.

    adapter_config.json and every other file of the source directory (pickles and the adapter's own
    calibration sample, calibration.ADAPTER_CALIBRATION_NAME, excepted) are copied
    byte for byte, so PEFT and vLLM accept the result unchanged; tensors not in `replacements` are
    written from the very bytes that were read. Provenance goes to a separate surgery.json.

    Raises AdapterError, with nothing written, if `out_dir` exists and is not empty, a replacement names
    no tensor or has another shape, or any tensor to be written is not finite.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise AdapterError(
            f"{out_dir}: already exists; refined versions are never written over an existing one"
        )
    replacements = dict(replacements or {})
    for key, t in replacements.items():
        old = adapter.tensors.get(key)
        if old is None:
            raise AdapterError(f"cannot replace {key!r}: no such tensor in {adapter.path}")
        if tuple(t.shape) != tuple(old.shape):
            raise AdapterError(
                f"replacement for {key!r} has shape {tuple(t.shape)}, expected {tuple(old.shape)}"
            )

    # Cast first (a float32 value can overflow a bfloat16/float16 adapter), then check every tensor is
    # finite: a NaN adapter must never become visible, whatever produced it.
    tensors = {
        k: (replacements[k].to(dtype=v.dtype, device="cpu").contiguous() if k in replacements else v)
        for k, v in adapter.tensors.items()
    }
    _check_finite(tensors, out_dir / WEIGHTS_NAME)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        for src in adapter.path.iterdir():
            if (
                src.is_file()
                and src.name not in (WEIGHTS_NAME, PROVENANCE_NAME, ADAPTER_CALIBRATION_NAME)
                and src.suffix not in PICKLE_SUFFIXES
            ):
                shutil.copyfile(src, tmp / src.name)
        save_file(tensors, tmp / WEIGHTS_NAME, metadata=adapter.metadata or {"format": "pt"})
        if provenance is not None:
            (tmp / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2, default=str) + "\n")
        # Readable like any other model file (safetensors writes 0600): a server may run as another user.
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o644 & ~umask)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o755 & ~umask)
        fsync_dir(tmp)
        if out_dir.exists():  # an empty directory left for us: rename() cannot replace it portably
            out_dir.rmdir()
        os.rename(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
