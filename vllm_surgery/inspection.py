"""What a user looks at before refining: the spectrum of every module of an adapter."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

from .adapter import LoraAdapter, load_adapter
from .spectral import lora_svd


@dataclass(frozen=True)
class ModuleSpectrum:
    """Singular values of B @ A (the update is `scaling` times that), and how concentrated they are."""

    name: str
    rank: int
    scaling: float
    sigma: list[float]
    energy_top1: float
    energy_top_quarter: float
    effective_rank: float

    def to_dict(self) -> dict:
        return asdict(self)


def effective_rank(sigma: list[float]) -> float:
    """exp(entropy of sigma / sum(sigma)) (Roy & Vetterli): r for a flat spectrum, 1 for a single direction."""
    total = sum(sigma)
    if total <= 0:
        return 0.0
    p = [s / total for s in sigma if s > 0]
    return math.exp(-sum(x * math.log(x) for x in p))


def inspect_adapter(adapter: str | os.PathLike | LoraAdapter) -> list[ModuleSpectrum]:
    lora = adapter if isinstance(adapter, LoraAdapter) else load_adapter(adapter)
    out = []
    for name, mod in sorted(lora.modules.items()):
        sigma = lora_svd(lora.lora_a(name), lora.lora_b(name)).sigma.tolist()
        energy = [s * s for s in sigma]
        total = sum(energy) or 1.0
        quarter = max(1, round(len(sigma) / 4))
        out.append(
            ModuleSpectrum(
                name=name,
                rank=mod.rank,
                scaling=mod.scaling,
                sigma=sigma,
                energy_top1=energy[0] / total,
                energy_top_quarter=sum(energy[:quarter]) / total,
                effective_rank=effective_rank(sigma),
            )
        )
    return out
