"""The `vllm.general_plugins` entry point: registers SurgeryResolver with vLLM.

vLLM calls general plugins in every process it starts (API server, engine core, workers), possibly
more than once, so register() only reads the settings and fills a registry dict. The resolver is used
only by the API server, but registering it elsewhere costs nothing. Settings are read here, at
startup, so a broken VLLM_SURGERY_CONFIG stops the server with a clear error instead of making every
request 404.
"""

from __future__ import annotations

RESOLVER_NAME = "vllm_surgery"


def register() -> None:
    from vllm.lora.resolver import LoRAResolverRegistry

    if RESOLVER_NAME in LoRAResolverRegistry.get_supported_resolvers():
        return
    from .resolver import SurgeryResolver
    from .settings import ServingSettings

    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, SurgeryResolver(ServingSettings.from_env()))
