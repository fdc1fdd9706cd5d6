"""Adapters that `load_adapter` may accept but a server must not serve, and store versions built from
them, written the way refine() writes versions (a directory with surgery.json), without running refine."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vllm_surgery.adapter import PROVENANCE_NAME, WEIGHTS_NAME, load_adapter

Transform = Callable[[str, torch.Tensor], torch.Tensor]


def rewrite_tensors(adapter_dir: Path, transform: Transform) -> Path:
    """Replace every tensor of the adapter at `adapter_dir` by transform(key, tensor), in place."""
    weights = adapter_dir / WEIGHTS_NAME
    tensors = load_file(weights)
    save_file(
        {k: transform(k, v).contiguous() for k, v in tensors.items()}, weights, metadata={"format": "pt"}
    )
    return adapter_dir


def scaled(factor: float) -> Transform:
    """Every tensor times `factor` (finite, but far beyond what a trained adapter holds for 1e30)."""
    return lambda key, t: t * factor


def narrow_first_lora_a(features: int) -> Transform:
    """The first lora_A keeps its rank but gets `features` input features: consistent with its own rank,
    wrong for the base model (as an adapter trained for a narrower model)."""
    done: list[str] = []

    def transform(key: str, t: torch.Tensor) -> torch.Tensor:
        if key.endswith("lora_A.weight") and not done:
            done.append(key)
            return t[:, :features].clone()
        return t

    return transform


def nan_in_first(key_suffix: str = "lora_B.weight") -> Transform:
    done: list[str] = []

    def transform(key: str, t: torch.Tensor) -> torch.Tensor:
        if key.endswith(key_suffix) and not done:
            done.append(key)
            t = t.clone()
            t.view(-1)[0] = float("nan")
        return t

    return transform


def copy_adapter(source: Path, target: Path, transform: Transform | None = None) -> Path:
    shutil.copytree(source, target)
    return rewrite_tensors(target, transform) if transform is not None else target


def write_version(
    store_root: Path,
    name: str,
    version_id: str,
    source: Path,
    original: Path,
    transform: Transform | None = None,
    decision: str = "accept",
) -> Path:
    """A complete store version `version_id` of adapter `name`: a copy of `source` (transformed),
    recorded as refined from `original`'s current content."""
    out = copy_adapter(source, store_root / name / version_id, transform)
    record = {"decision": decision, "adapter_hash": load_adapter(original).content_hash()}
    (out / PROVENANCE_NAME).write_text(json.dumps(record))
    return out
