"""vllm-surgery: training-free Spectral Surgery for LoRA adapters, where they are served.

The engine (the modules directly in this package) needs only torch, transformers, peft and
safetensors. Around it, by who runs them: `storage` (version store, database, job queue), `traffic`
(recording and calibration data from traffic), `worker` (the process that runs refinement jobs) and
`serving` (the vLLM plugin, the only part that imports vLLM); `settings` are the deployment's
settings, `cli` the `vllm-surgery` command. docs/architecture.md draws the layers and the import rules
that tests/test_import_rules.py enforces. Names below are imported lazily: vLLM imports
`vllm_surgery.serving.general_plugin` in every process it starts, and that must not pay for peft and
the whole engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AdapterError": "errors",
    "CalibrationError": "errors",
    "ConfigError": "errors",
    "SurgeryError": "errors",
    "LoraAdapter": "adapter",
    "load_adapter": "adapter",
    "save_adapter": "adapter",
    "SurgeryConfig": "config",
    "SurgeryResult": "refine",
    "refine": "refine",
    "Spectrum": "spectral",
    "lora_factors": "spectral",
    "lora_svd": "spectral",
}
__all__ = [
    "AdapterError",
    "CalibrationError",
    "ConfigError",
    "LoraAdapter",
    "Spectrum",
    "SurgeryConfig",
    "SurgeryError",
    "SurgeryResult",
    "load_adapter",
    "lora_factors",
    "lora_svd",
    "refine",
    "save_adapter",
]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:
    from .adapter import LoraAdapter, load_adapter, save_adapter
    from .config import SurgeryConfig
    from .errors import AdapterError, CalibrationError, ConfigError, SurgeryError
    from .refine import SurgeryResult, refine
    from .spectral import Spectrum, lora_factors, lora_svd


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vllm_surgery' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
