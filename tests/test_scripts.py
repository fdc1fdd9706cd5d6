"""The demos and the benchmarks still run against the package as it is laid out: each script's
`--help` works (it imports everything the script imports at the top), and every name it imports from
vllm_surgery, also inside functions, exists. (Their real runs take minutes to hours; the sensitivity
benchmark's `--dry-run` alone takes minutes on a CPU, so it is not run here.)"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*(ROOT / "examples").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")])


def package_imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(module, imported name or None, line) of every vllm_surgery import in the script."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vllm_surgery"):
            out += [(node.module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.startswith("vllm_surgery")]
    return out


def run_script(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run benchmarks/ or examples/ `script` (a path below the root) with this Python, from the root."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_what_the_script_imports_exists(script: Path) -> None:
    for module, name, line in package_imports(script):
        imported = importlib.import_module(module)
        if name is not None:
            assert hasattr(imported, name) or importlib.util.find_spec(f"{module}.{name}"), (
                f"{script.name}:{line}: {module} has no {name}"
            )


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_script_starts(script: Path) -> None:
    result = run_script(str(script.relative_to(ROOT)), "--help")
    assert result.returncode == 0 and "usage" in result.stdout, result.stderr[-3000:]


@pytest.mark.slow
def test_the_record_store_benchmark_runs_quick(tmp_path: Path) -> None:
    """benchmarks/record_store.py --quick (10k records, 10k finished jobs, SQLite and a private
    Postgres): it fills both stores, measures every figure and writes its table, all targets met."""
    out = tmp_path / "record_store.md"
    result = run_script("benchmarks/record_store.py", "--quick", "--output", str(out), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith(("| sqlite", "| postgres"))]
    assert len(rows) == 2 * 11, out.read_text()
    assert {r.split("|")[1].strip() for r in rows} == {"sqlite", "postgres"}
    # every measure is a number; the latency and memory targets are met even on a busy machine
    missed = [r for r in rows if r.rstrip(" |").endswith("MISSED") and "export rate" not in r]
    assert not missed, "\n".join(missed)


def test_the_replicas_benchmark_finds_its_servers() -> None:
    """`benchmarks/replicas.py --dry-run` finds Postgres and SeaweedFS (what its real run starts) and
    says what it would run; it starts nothing."""
    result = run_script("benchmarks/replicas.py", "--dry-run", "--quick")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Postgres binaries: ") and lines[1].startswith("SeaweedFS: "), result.stdout
    assert lines[2] == "would run 4 swaps idle and 4 under 2 clients", result.stdout


def test_the_canary_benchmark_says_what_it_would_simulate() -> None:
    """`benchmarks/canary.py --dry-run` names its grid (5 differences x 2 base rates x 2 shares) and
    simulates nothing."""
    result = run_script("benchmarks/canary.py", "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        "would simulate 20 cells x 2000 canaries, limit 10000 ratings (margin 0.05, error rate 0.05)"
    ]


@pytest.mark.slow
def test_the_canary_benchmark_runs_quick(tmp_path: Path) -> None:
    """benchmarks/canary.py --quick (200 simulated canaries per cell): every guarantee it checks holds,
    and it writes its table (20 rows) and plot."""
    out = tmp_path / "canary.md"
    result = run_script("benchmarks/canary.py", "--quick", "--output", str(out), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "<=" in line]
    assert len(rows) == 20 and not any("MISSED" in r for r in rows), out.read_text()
    assert out.with_suffix(".png").stat().st_size > 10_000
