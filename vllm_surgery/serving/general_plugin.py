"""The `vllm.general_plugins` entry point: registers SurgeryResolver with vLLM.

vLLM calls general plugins in every process it starts (API server, engine core, workers), possibly
more than once, so register() only checks the vLLM pieces the resolver uses (`vllm_compat`), reads
the settings and fills a registry dict. The resolver is used only by the API server, but registering
it elsewhere costs nothing. Settings are read here, at startup, so a broken VLLM_SURGERY_CONFIG stops
the server with a clear error instead of making every request 404.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(f"vllm.{__name__}")

RESOLVER_NAME = "vllm_surgery"
ENDPOINT_PLUGIN = "vllm_surgery_api"


def register() -> None:
    from . import vllm_compat

    if vllm_compat.registered_resolver(RESOLVER_NAME) is not None:
        return
    vllm_compat.check_resolver_api()  # raises VllmCompatError naming the vLLM version and the piece
    if vllm_compat.rust_frontend_requested():
        log.error(
            "vllm-surgery: %s is on: vLLM's Rust HTTP frontend bypasses every Python hook, so adapters "
            "are neither resolved nor guarded by vllm-surgery; unset it (vllm-surgery-serve refuses it)",
            vllm_compat.RUST_FRONTEND_ENV,
        )
    plugins = os.environ.get("VLLM_PLUGINS")
    named = plugins is not None and ENDPOINT_PLUGIN in [p.strip() for p in plugins.split(",")]
    if os.environ.get(vllm_compat.RUNTIME_LORA_ENV, "0") not in ("", "0") and not named:
        log.warning(
            "vllm-surgery: %s is on but the endpoint plugin %s is not enabled (VLLM_PLUGINS): vLLM's "
            "runtime adapter routes accept the API key alone; enable the plugin to guard them",
            vllm_compat.RUNTIME_LORA_ENV,
            ENDPOINT_PLUGIN,
        )
    from ..settings import ServingSettings
    from .resolver import SurgeryResolver

    vllm_compat.register_resolver(RESOLVER_NAME, SurgeryResolver(ServingSettings.from_env()))
