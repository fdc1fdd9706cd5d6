"""`vllm-surgery-serve` refuses what the plugin cannot guard or keep right, before vLLM starts.

Fast: the environment rules and argument checks with vLLM's own parser. Slow (they run vLLM's CLI,
without an engine): the launcher with 2 API servers exits non-zero with the reason, and vLLM 0.32
itself refuses runtime LoRA updating with 2 API servers (the fact the launcher's message relies on)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_surgery.serving.launcher import (
    ENDPOINT_PLUGIN,
    LaunchRefused,
    check_arguments,
    prepare_environment,
)


def test_unset_plugin_list_gets_the_guard_and_keeps_vllms_defaults() -> None:
    env: dict[str, str] = {}
    prepare_environment(env)
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
    plugins = env["VLLM_PLUGINS"].split(",")
    assert ENDPOINT_PLUGIN in plugins and "vllm_surgery" in plugins
    assert "lora_filesystem_resolver" in plugins  # installed with vLLM, loaded by default
    assert "lora_hf_hub_resolver" not in plugins  # vLLM enables it only when named: downloads


def test_a_plugin_list_without_the_guard_is_refused_unless_opted_in() -> None:
    with pytest.raises(LaunchRefused, match=r"does not name vllm_surgery_api.*load or replace adapters"):
        prepare_environment({"VLLM_PLUGINS": "vllm_surgery"})
    env = {"VLLM_PLUGINS": "vllm_surgery", "VLLM_SURGERY_ALLOW_UNAUTHENTICATED_ADMIN": "1"}
    prepare_environment(env)
    assert env["VLLM_PLUGINS"] == "vllm_surgery"
    env = {"VLLM_PLUGINS": "vllm_surgery", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "0"}  # no runtime routes
    prepare_environment(env)
    assert env["VLLM_PLUGINS"] == "vllm_surgery"
    env = {"VLLM_PLUGINS": f"vllm_surgery, {ENDPOINT_PLUGIN}"}
    prepare_environment(env)


@pytest.mark.parametrize("value", ["1", "x"])
def test_rust_frontend_is_refused(value: str) -> None:
    with pytest.raises(LaunchRefused, match=r"VLLM_USE_RUST_FRONTEND is on: .* bypasses every Python hook"):
        prepare_environment({"VLLM_USE_RUST_FRONTEND": value})
    prepare_environment({"VLLM_USE_RUST_FRONTEND": "0"})


@pytest.mark.parametrize(
    ("args", "count"),
    [
        (["m", "--api-server-count", "2"], 2),
        (["m", "-asc", "3"], 3),
        (["m", "--data-parallel-size", "2"], 2),  # vLLM then defaults to one API server per rank
    ],
)
def test_more_than_one_api_server_is_refused(args: list[str], count: int) -> None:
    with pytest.raises(LaunchRefused) as e:
        check_arguments(args)
    message = str(e.value)
    assert f"got {count} API servers" in message
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in message and "sharing one store" in message


def test_one_api_server_and_unparsable_arguments_pass_to_vllm() -> None:
    check_arguments(["m", "--api-server-count", "1"])
    check_arguments(
        ["m", "--data-parallel-size", "2", "--data-parallel-external-lb", "--data-parallel-rank", "0"]
    )
    check_arguments(["m", "--no-such-option"])  # vLLM reports it itself


def run_cli(code: str, args: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_SURGERY_", "VLLM_PLUGINS"))}
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_launcher_with_two_api_servers_exits_with_the_reason(tiny_base: Path) -> None:
    done = run_cli(
        "import sys; from vllm_surgery.serving.launcher import main; main(sys.argv[1:])",
        [str(tiny_base), "--enable-lora", "--api-server-count", "2"],
        {},
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "vllm-surgery-serve: error: vllm-surgery needs exactly one API-server process" in done.stderr
    assert "got 2 API servers" in done.stderr


@pytest.mark.slow
def test_vllm_itself_refuses_runtime_lora_updating_with_two_api_servers(tiny_base: Path) -> None:
    """The upstream rule the launcher's message states (vllm/entrypoints/cli/serve.py, 0.32)."""
    code = (
        "import sys; from vllm_surgery.serving.launcher import install_version_shim; install_version_shim(); "
        "from vllm_surgery.serving.vllm_compat import run_serve_cli; run_serve_cli(sys.argv[1:])"
    )
    done = run_cli(
        code,
        [str(tiny_base), "--enable-lora", "--api-server-count", "2", "--max-model-len", "64"],
        {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    assert done.returncode != 0
    assert (
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING cannot be used with api_server_count > 1"
        in done.stderr + done.stdout
    )
