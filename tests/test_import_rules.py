"""The package's layers, as import rules read from the source (every import statement, also those inside
functions and `if TYPE_CHECKING:` blocks; docs/architecture.md draws the layers):

- the engine (the modules directly in vllm_surgery/, but for the ones in ABOVE_THE_ENGINE) imports none
  of storage, traffic, worker, serving, nor the modules above it;
- storage, traffic and worker never import vLLM, nor the serving plugin;
- only serving/vllm_compat.py imports vLLM (or the SageMaker package vLLM brings);
- other packages import a package through its front door (its __init__), not its modules;
- no two modules import each other, directly or through others (no cycles).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vllm_surgery"
LAYERS = ("storage", "traffic", "worker", "serving")
# Top-level modules that are not the engine: the command line, the deployment settings, the harness
# that starts a real server (tests, demo, benchmarks) and the real Postgres and S3 servers the tests and
# benchmarks start. The engine may not import them.
ABOVE_THE_ENGINE = ("cli", "settings", "server_process", "testing_servers")
COMPAT_MODULE = "vllm_surgery.serving.vllm_compat"
VLLM_PACKAGES = ("vllm", "model_hosting_container_standards")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def exported(package: str) -> set[str]:
    """The names a package's front door lists in its __all__ (literal lists only)."""
    if package not in MODULES or not is_package(package):
        return set()
    for node in ast.parse(MODULES[package].read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            try:
                return set(ast.literal_eval(node.value))
            except ValueError:
                return set()
    return set()


def imports(name: str) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import in module `name` (see `imports_in`)."""
    yield from imports_in(MODULES[name].read_text(), name, is_package(name))


def imports_in(source: str, name: str, package_init: bool = False) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import in `source`, the text of module `name`; `from X import
    Y` names X.Y when that is a module of the package that X's front door does not export, else X."""
    tree = ast.parse(source)
    package = name if package_init else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            front = exported(target)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub if sub in MODULES and alias.name not in front else target), node.lineno


def internal_edges() -> dict[str, set[str]]:
    return {
        name: {target for target, _ in imports(name) if target in MODULES and target != name}
        for name in MODULES
    }


def layer(name: str) -> str:
    """'engine', a layer of LAYERS, one of ABOVE_THE_ENGINE, or 'vllm_surgery' (the package's own __init__)."""
    parts = name.split(".")
    if len(parts) == 1:
        return "vllm_surgery"
    if parts[1] in LAYERS or parts[1] in ABOVE_THE_ENGINE:
        return parts[1]
    return "engine"


def is_vllm(target: str) -> bool:
    return target.split(".")[0] in VLLM_PACKAGES


def test_the_modules_are_found() -> None:
    assert "vllm_surgery.refine" in MODULES and COMPAT_MODULE in MODULES
    for name in LAYERS:
        assert f"vllm_surgery.{name}" in MODULES, f"{name}/ has no __init__ (its front door)"
    assert {layer(m) for m in MODULES} >= {"engine", *LAYERS, *ABOVE_THE_ENGINE}


def test_the_engine_imports_nothing_above_it() -> None:
    above = {f"vllm_surgery.{n}" for n in (*LAYERS, *ABOVE_THE_ENGINE)}
    bad = [
        f"{name}:{line} imports {target}"
        for name in MODULES
        if layer(name) == "engine"
        for target, line in imports(name)
        if target in above or any(target.startswith(f"{a}.") for a in above)
    ]
    assert not bad, "the engine imports the layers above it:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", ["storage", "traffic", "worker"])
def test_storage_traffic_and_worker_import_neither_vllm_nor_the_plugin(package: str) -> None:
    bad = [
        f"{name}:{line} imports {target}"
        for name in MODULES
        if layer(name) == package
        for target, line in imports(name)
        if is_vllm(target) or target == "vllm_surgery.serving" or target.startswith("vllm_surgery.serving.")
    ]
    assert not bad, "\n".join(bad)


def test_only_the_compatibility_module_imports_vllm() -> None:
    bad = [
        f"{name}:{line} imports {target}"
        for name in MODULES
        if name != COMPAT_MODULE
        for target, line in imports(name)
        if is_vllm(target)
    ]
    assert not bad, f"only {COMPAT_MODULE} may import vLLM:\n" + "\n".join(bad)


def test_packages_are_entered_through_their_front_door() -> None:
    """A module outside a package (or subpackage) imports it by the package, not by its modules."""
    packages = [m for m in MODULES if is_package(m) and m != "vllm_surgery"]
    bad = []
    for name in MODULES:
        for target, line in imports(name):
            for package in packages:
                inside = name == package or name.startswith(f"{package}.")
                if not inside and target.startswith(f"{package}.") and target in MODULES:
                    bad.append(f"{name}:{line} imports {target}, not its front door {package}")
    assert not bad, "\n".join(bad)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_no_import_cycles() -> None:
    cycle = find_cycle(internal_edges())
    assert cycle is None, "modules import each other: " + " -> ".join(cycle)


def test_the_rules_catch_what_they_forbid() -> None:
    """The checks themselves: imports are found wherever they are and resolve to the right module, and
    a cycle is found."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from ..serving import hotswap\n"
        "def f():\n    import vllm.envs\n    from . import job_queue\n    from ..worker import job_spec\n"
    )
    found = dict(imports_in(source, "vllm_surgery.storage.store"))
    assert found == {
        "typing": 1,
        "vllm_surgery.serving.hotswap": 3,
        "vllm.envs": 5,
        "vllm_surgery.storage.job_queue": 6,
        "vllm_surgery.worker": 7,  # the front door's function job_spec, not the module of that name
    }
    assert is_vllm("vllm.envs") and not is_vllm("vllm_surgery.serving")
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer("vllm_surgery.refine") == "engine" and layer("vllm_surgery.storage.store") == "storage"
    assert layer("vllm_surgery.cli") == "cli" and layer("vllm_surgery.serving.api.http") == "serving"
