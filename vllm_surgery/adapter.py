"""PEFT LoRA adapters on disk: strict loading, a content hash, and atomic saving.

Only safetensors are ever read: a `.bin`/`.pt` adapter is a pickle, and unpickling an uploaded file
runs arbitrary code. Saving writes a complete sibling directory and renames it into place, so a
reader (vLLM, a resolver, another worker) sees either no adapter or a whole one.
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

from .errors import AdapterError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PROVENANCE_NAME = "surgery.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")
_PEFT_PREFIX = "base_model.model."
# Fields that record where an adapter came from, not what it computes: left out of the content hash.
_PROVENANCE_FIELDS = frozenset({"base_model_name_or_path", "revision", "inference_mode", "peft_version"})
# Initialisations that also rewrite the base weights: such an adapter is not a delta on the base model.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer: `dW = scaling * B @ A`, named as PEFT names modules in the base model."""

    name: str
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scaling: float
    in_features: int
    out_features: int


@dataclass
class LoraAdapter:
    """An adapter held in memory exactly as read: config, tensors (original dtypes) and file metadata."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    modules: dict[str, LoraModule]
    metadata: dict[str, str] | None = None
    _hash: str | None = field(default=None, repr=False)

    def lora_a(self, name: str) -> torch.Tensor:
        return self.tensors[self.modules[name].a_key]

    def lora_b(self, name: str) -> torch.Tensor:
        return self.tensors[self.modules[name].b_key]

    @property
    def base_model_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")

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


def _module_name(key: str) -> tuple[str, str] | None:
    m = _LORA_KEY.match(key)
    if m is None:
        return None
    module = m["module"]
    if module.startswith(_PEFT_PREFIX):
        module = module[len(_PEFT_PREFIX) :]
    return module, m["side"]


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's own rule for rank_pattern / alpha_pattern keys (regex on the module name's suffix)."""
    from peft.utils.other import get_pattern_key

    if not patterns:
        return default
    key = get_pattern_key(list(patterns.keys()), module)
    return patterns.get(key, default)


def module_scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


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
    if config.get("use_dora"):
        raise AdapterError(f"{cfg_path}: DoRA adapters (use_dora=true) are not supported")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise AdapterError(f"{cfg_path}: adapters with trained biases (bias/lora_bias) are not supported")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise AdapterError(
            f"{cfg_path}: init_lora_weights={init!r} rewrites the base weights; such an adapter is not a "
            "plain LoRA delta (convert it to a standard LoRA first)"
        )
    for name in ("rank_pattern", "alpha_pattern"):
        if config.get(name) is not None and not isinstance(config[name], dict):
            raise AdapterError(f"{cfg_path}: {name!r} must be an object, got {type(config[name]).__name__}")
    return config


def load_adapter(path: str | os.PathLike) -> LoraAdapter:
    """Read and validate a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)."""
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
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(weights, framework="pt") as f:
            metadata = f.metadata()
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[key] = f.get_tensor(key)
    except AdapterError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise AdapterError(f"{weights}: cannot be read as safetensors ({e})") from e
    if not tensors:
        raise AdapterError(f"{weights}: holds no tensors")

    for key, t in tensors.items():
        if key.endswith("lora_magnitude_vector") or ".lora_magnitude_vector." in key:
            raise AdapterError(f"{weights}: tensor {key!r} is a DoRA magnitude; DoRA is not supported")
        if key.endswith(".bias") and ".lora_" in key:
            raise AdapterError(f"{weights}: tensor {key!r} is a LoRA bias; lora_bias is not supported")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AdapterError(f"{weights}: tensor {key!r} contains NaN or Inf values")

    sides: dict[str, dict[str, str]] = {}
    for key in tensors:
        parsed = _module_name(key)
        if parsed is not None:
            sides.setdefault(parsed[0], {})[parsed[1]] = key

    use_rslora = bool(config.get("use_rslora", False))
    modules: dict[str, LoraModule] = {}
    for name, pair in sorted(sides.items()):
        if "A" not in pair or "B" not in pair:
            have, miss = ("A", "B") if "A" in pair else ("B", "A")
            raise AdapterError(
                f"{weights}: tensor {pair[have]!r} has no matching lora_{miss} for module {name!r}"
            )
        a, b = tensors[pair["A"]], tensors[pair["B"]]
        for key, t in ((pair["A"], a), (pair["B"], b)):
            if t.ndim != 2:
                raise AdapterError(
                    f"{weights}: tensor {key!r} has shape {tuple(t.shape)}; only linear (2-D) LoRA "
                    "layers are supported"
                )
            if not t.is_floating_point():
                raise AdapterError(f"{weights}: tensor {key!r} has non-float dtype {t.dtype}")
        rank = _pattern_value(config.get("rank_pattern") or {}, name, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
        if a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterError(
                f"{weights}: module {name!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                f"inconsistent with rank r={rank} from {CONFIG_NAME}"
            )
        modules[name] = LoraModule(
            name=name,
            a_key=pair["A"],
            b_key=pair["B"],
            rank=int(rank),
            alpha=float(alpha),
            scaling=module_scaling(int(rank), float(alpha), use_rslora),
            in_features=int(a.shape[1]),
            out_features=int(b.shape[0]),
        )
    if not modules:
        raise AdapterError(f"{weights}: no lora_A/lora_B tensor pairs found")
    return LoraAdapter(path=path, config=config, tensors=tensors, modules=modules, metadata=metadata)


def _fsync_dir(path: Path) -> None:
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

    adapter_config.json and every other file of the source directory (pickles excepted) are copied
    byte for byte, so PEFT and vLLM accept the result unchanged; tensors not in `replacements` are
    written from the very bytes that were read. Provenance goes to a separate surgery.json.
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

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        for src in adapter.path.iterdir():
            if (
                src.is_file()
                and src.name not in (WEIGHTS_NAME, PROVENANCE_NAME)
                and src.suffix not in PICKLE_SUFFIXES
            ):
                shutil.copyfile(src, tmp / src.name)
        tensors = {
            k: (replacements[k].to(dtype=v.dtype, device="cpu").contiguous() if k in replacements else v)
            for k, v in adapter.tensors.items()
        }
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
        _fsync_dir(tmp)
        if out_dir.exists():  # an empty directory left for us: rename() cannot replace it portably
            out_dir.rmdir()
        os.rename(tmp, out_dir)
        _fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
