"""The vLLM plugin: only what runs inside vLLM's API server (and the launcher that starts it).

- `general_plugin.register`: the ``vllm.general_plugins`` entry point (registers `resolver`).
- `endpoint_plugin.SurgeryEndpointPlugin`: the ``vllm.endpoint_plugins`` entry point; its start-up wires
  everything below and the HTTP routes (`api`, one module per resource).
- `resolver` (which version a name serves), `hotswap` (changing it without a restart), `validation`
  (what this server can serve), `auth` (the admin token), `capture` (recording traffic),
  `automatic_jobs` (jobs without a person, pending swaps), `metrics`.
- `launcher.main`: the ``vllm-surgery-serve`` console script.
- `vllm_compat`: every access to vLLM, the only module of the project that imports it.

Storage, traffic and the worker live in `vllm_surgery.storage`, `vllm_surgery.traffic` and
`vllm_surgery.worker` and never import vLLM. Names below are imported lazily: vLLM calls the general
plugin in every process it starts, and importing this package must not pull in the routes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "HotSwapError": "hotswap",
    "HotSwapper": "hotswap",
    "SurgeryEndpointPlugin": "endpoint_plugin",
    "SurgeryResolver": "resolver",
    "register": "general_plugin",
}
__all__ = ["HotSwapError", "HotSwapper", "SurgeryEndpointPlugin", "SurgeryResolver", "register"]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:
    from .endpoint_plugin import SurgeryEndpointPlugin
    from .general_plugin import register
    from .hotswap import HotSwapError, HotSwapper
    from .resolver import SurgeryResolver


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
