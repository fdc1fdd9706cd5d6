"""vllm-surgery: training-free Spectral Surgery for LoRA adapters, where they are served.

The core (this package without `vllm_surgery.serving`) needs only torch, transformers, peft and
safetensors; vLLM is imported only by the serving integration.
"""

from .adapter import LoraAdapter, load_adapter, save_adapter
from .config import SurgeryConfig
from .errors import AdapterError, CalibrationError, ConfigError, SurgeryError
from .refine import SurgeryResult, refine
from .spectral import Spectrum, lora_factors, lora_svd

__version__ = "0.1.0"

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
