"""SurgeryConfig: every setting of a refinement, validated up front, and which modules it edits."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ConfigError
from .policies import AUTO_POLICIES, CONSTRAINTS, POLICIES, policy_params

SCOPES: dict[str, tuple[str, ...]] = {
    # The residual-stream writers: the paper's default and its best-behaved scope.
    "residual": ("o_proj", "down_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
_LAYER = re.compile(r"\.(\d+)\.")


@dataclass
class SurgeryConfig:
    """Settings of one refinement. Defaults are the paper's headline configuration plus our safety check.

    policy: grad_direction | abs_select | smooth_abs | random_index | auto (tries the first three).
    policy_params: overrides of a policy's parameters, e.g. {"eta_s": 1.0}; with auto, a mapping
        from policy name to overrides.
    modules: residual | attention | mlp | all, or a list of leaf names (o_proj) / full module names.
    layers: (start, end) half-open layer range, either end None for open.
    min_improvement: relative held-out loss reduction a candidate must reach to replace the original.
    min_z: and that reduction must be at least min_z standard errors of the paired per-example
        difference, so that noise on a small held-out set is not mistaken for a gain (0 disables).
    """

    policy: str = "grad_direction"
    policy_params: Mapping[str, Any] = field(default_factory=dict)
    constraint: str = "l1"
    modules: str | list[str] = "residual"
    layers: tuple[int | None, int | None] | None = None
    heldout_fraction: float = 0.25
    min_improvement: float = 0.005
    min_z: float = 2.0
    samples: int | None = None
    max_length: int = 1024
    max_batch_tokens: int | None = None
    device: str = "auto"
    seed: int = 0
    force: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.policy != "auto" and self.policy not in POLICIES:
            raise ConfigError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)} or auto")
        for name, params in self.candidate_params().items():
            policy_params(name, params)
        if self.constraint not in CONSTRAINTS:
            raise ConfigError(
                f"unknown constraint {self.constraint!r}; choose one of {', '.join(CONSTRAINTS)}"
            )
        if isinstance(self.modules, str) and "," in self.modules:
            self.modules = [m.strip() for m in self.modules.split(",") if m.strip()]
        if isinstance(self.modules, str) and self.modules not in (*SCOPES, "all"):
            self.modules = [self.modules]
        if isinstance(self.modules, list) and not self.modules:
            raise ConfigError("modules: the explicit list is empty")
        if isinstance(self.layers, str):
            self.layers = parse_layers(self.layers)
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError(f"heldout_fraction must lie in [0, 1), got {self.heldout_fraction}")
        if self.policy == "auto" and self.heldout_fraction == 0:
            raise ConfigError("policy auto picks a candidate on held-out data; heldout_fraction must be > 0")
        if self.min_improvement < 0:
            raise ConfigError(f"min_improvement must be >= 0, got {self.min_improvement}")
        if self.min_z < 0:
            raise ConfigError(f"min_z must be >= 0, got {self.min_z}")
        if self.samples is not None and self.samples < 1:
            raise ConfigError(f"samples must be positive, got {self.samples}")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2, got {self.max_length}")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise ConfigError(f"max_batch_tokens must be positive, got {self.max_batch_tokens}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")

    def candidate_params(self) -> dict[str, dict[str, Any]]:
        """Policy name -> parameter overrides for every policy this config will try."""
        if self.policy != "auto":
            return {self.policy: dict(self.policy_params)}
        unknown = set(self.policy_params) - set(AUTO_POLICIES)
        if unknown:
            raise ConfigError(
                f"with policy auto, policy_params maps policy names ({', '.join(AUTO_POLICIES)}) to "
                f"overrides; unknown: {', '.join(sorted(unknown))}"
            )
        return {p: dict(self.policy_params.get(p, {})) for p in AUTO_POLICIES}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["policy_params"] = dict(self.policy_params)
        return d


def parse_layers(text: str) -> tuple[int | None, int | None]:
    """'START:END' (half open, either side may be empty) or a single layer 'N'."""
    try:
        if ":" not in text:
            n = int(text)
            return n, n + 1
        start, end = text.split(":", 1)
        result = (int(start) if start.strip() else None, int(end) if end.strip() else None)
    except ValueError as e:
        raise ConfigError(f"layers must look like START:END, e.g. 4:12, got {text!r}") from e
    if result[0] is not None and result[1] is not None and result[0] >= result[1]:
        raise ConfigError(f"layers {text!r} is empty (START must be below END)")
    return result


def layer_index(module_name: str) -> int | None:
    m = _LAYER.search(module_name)
    return int(m.group(1)) if m else None


def select_modules(
    available: Iterable[str],
    modules: str | list[str],
    layers: tuple[int | None, int | None] | None = None,
) -> list[str]:
    """The adapter modules a scope and layer range select; an empty selection is an error, not a no-op."""
    available = sorted(available)
    if modules == "all":
        chosen = list(available)
    elif isinstance(modules, str):
        leaves = SCOPES[modules]
        chosen = [m for m in available if m.rsplit(".", 1)[-1] in leaves]
    else:
        chosen = []
        for wanted in modules:
            hits = [
                m
                for m in available
                if m == wanted or m.rsplit(".", 1)[-1] == wanted or m.endswith("." + wanted)
            ]
            if not hits:
                raise ConfigError(f"module {wanted!r} matches no module of the adapter")
            chosen.extend(h for h in hits if h not in chosen)
        chosen.sort()
    if layers is not None:
        lo, hi = layers
        chosen = [
            m
            for m in chosen
            if (i := layer_index(m)) is not None and (lo is None or i >= lo) and (hi is None or i < hi)
        ]
    if not chosen:
        leaves = sorted({m.rsplit(".", 1)[-1] for m in available})
        raise ConfigError(
            f"scope {modules!r} with layers {layers} selects no module of this adapter "
            f"(it adapts: {', '.join(leaves)}); pass modules explicitly"
        )
    return chosen
