"""The documentation says what the code does: every metric, alert, setting and command-line option the
README, docs/ and plugins/README.md name exists in the code, the lists that claim to be complete are
complete, and links between them resolve."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "plugins" / "README.md"]
RULES = ROOT / "plugins" / "prometheus" / "vllm_surgery_rules.yml"
# Variables that are not serving settings: the config file's name, the demo's and the tests' cache, CI.
OTHER_VARIABLES = {"VLLM_SURGERY_CONFIG", "VLLM_SURGERY_CACHE", "VLLM_SURGERY_REQUIRE_PROMTOOL"}
# Options of other programs named in the docs (Prometheus).
OTHER_OPTIONS = {"--web.enable-lifecycle"}


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def all_docs() -> str:
    return "\n".join(text(p) for p in DOCS)


def table_rows(markdown: str, header: str) -> list[list[str]]:
    """The rows of the markdown table whose header line starts with `header`, as stripped cells."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.strip().startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def unquote(cell: str) -> str:
    return cell.strip("`")


# ----------------------------------------------------------------------------- the command line
def subcommands(parser: argparse.ArgumentParser, prefix: str) -> dict[str, argparse.ArgumentParser]:
    """'vllm-surgery refine' -> its parser, for every leaf command."""
    nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not nested:
        return {prefix: parser}
    out = {}
    for action in nested:
        for name, sub in action.choices.items():
            out.update(subcommands(sub, f"{prefix} {name}"))
    return out


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}


def cli_commands() -> dict[str, set[str]]:
    from vllm_surgery.cli import build_parser

    return {
        command: options(parser) for command, parser in subcommands(build_parser(), "vllm-surgery").items()
    }


def synopsis() -> dict[str, set[str]]:
    """Command -> options, from the first code block of docs/cli.md (continuation lines joined)."""
    block = re.search(r"```bash\n(.*?)```", text(ROOT / "docs" / "cli.md"), re.S).group(1)
    out: dict[str, set[str]] = {}
    for line in block.replace("\\\n", " ").splitlines():
        if line.startswith("vllm-surgery "):
            words = line.split()
            command = " ".join(w for w in words[:3] if re.fullmatch(r"[a-z][a-z-]*", w))
            out[command] = set(re.findall(r"--[a-z][a-z0-9-]*", line))
    return out


def test_the_cli_synopsis_is_the_parser() -> None:
    documented, actual = synopsis(), cli_commands()
    assert set(documented) == set(actual), "commands differ"
    for command, flags in actual.items():
        assert documented[command] == flags, (
            f"{command}: missing {sorted(flags - documented[command])}, unknown {sorted(documented[command] - flags)}"
        )


def test_every_documented_option_exists() -> None:
    from vllm_surgery.serving import vllm_compat

    known = set().union(*cli_commands().values()) | options(vllm_compat.serve_arg_parser()) | OTHER_OPTIONS
    for path in DOCS:
        for flag in set(re.findall(r"(?<![\w-])--[a-z][a-z0-9.-]*[a-z0-9]", text(path))):
            assert flag in known or flag == "--help", (
                f"{path.relative_to(ROOT)}: {flag} is no option of ours or of vllm serve"
            )


# ----------------------------------------------------------------------------- settings
def test_every_documented_variable_is_a_setting() -> None:
    from vllm_surgery.settings import ServingSettings

    settings = {f.metadata["env"] for f in fields(ServingSettings)}
    code = "\n".join(text(p) for p in (ROOT / "vllm_surgery").rglob("*.py"))
    for where, body in [*((str(p.relative_to(ROOT)), text(p)) for p in DOCS), ("vllm_surgery/", code)]:
        for name in set(re.findall(r"VLLM_SURGERY_[A-Z_]*[A-Z]", body)):
            assert name in settings | OTHER_VARIABLES, f"{where}: {name} is not a setting"
    assert settings <= set(re.findall(r"VLLM_SURGERY_[A-Z_]*[A-Z]", text(ROOT / "docs" / "settings.md")))


# ----------------------------------------------------------------------------- metrics
PROBE = "__docs_check__"


def takes_labels(metric: object, names: set[str]) -> bool:
    """Whether a prometheus_client metric takes exactly these label names (its labels() refuses any
    other set); the probe child is removed again."""
    try:
        if not names:
            metric.labels()  # a metric without labels refuses labels() altogether
            return False
        metric.labels(**dict.fromkeys(names, PROBE))
    except ValueError:
        return not names
    metric.remove(*[PROBE] * len(names))
    return True


def code_series() -> dict[str, tuple[str, object]]:
    """Exposed series name -> (type, the metric object, or for the job families their label names)."""
    from prometheus_client.metrics import MetricWrapperBase

    from vllm_surgery.serving import metrics
    from vllm_surgery.storage import JobFigures, StageHistogram
    from vllm_surgery.traffic import metrics as traffic_metrics

    suffix = {"counter": "_total", "info": "_info"}
    out: dict[str, tuple[str, object]] = {}
    for module in (metrics, traffic_metrics):
        for value in vars(module).values():
            if isinstance(value, MetricWrapperBase):
                (family,) = value.describe()
                out[family.name + suffix.get(family.type, "")] = (family.type, value)
    # The job families, collected from figures that fill every label.
    figures = JobFigures(
        by_state={"queued": 1},
        finished={("x", "failed"): 1},
        oldest_queued_age_s=1.0,
        swaps_pending=0,
        latest_quality={"x": (1.0, 0.5)},
        stages={"total": StageHistogram((1,) * 15, 1, 1.0)},
    )
    queue = type("Queue", (), {"job_figures": lambda self: figures})()
    for family in metrics.JobsCollector(queue).collect():
        names = {k for sample in family.samples for k in sample.labels if k != "le"}
        out[family.name + suffix.get(family.type, "")] = (family.type, names)
    return out


def test_the_metrics_table_is_the_code() -> None:
    rows = table_rows(text(ROOT / "docs" / "metrics.md"), "| series |")
    documented = {unquote(r[0]): (r[1], {x.strip() for x in r[2].split(",") if x.strip()}) for r in rows}
    actual = code_series()
    assert set(documented) == set(actual), (
        f"undocumented: {sorted(set(actual) - set(documented))}, "
        f"not in the code: {sorted(set(documented) - set(actual))}"
    )
    for name, (kind, metric) in actual.items():
        doc_kind, doc_labels = documented[name]
        assert doc_kind == kind, name
        if isinstance(metric, set):
            assert doc_labels == metric, (name, doc_labels, metric)
        else:
            own = doc_labels - {"version"} if kind == "info" else doc_labels  # an info's own key
            assert takes_labels(metric, own), (name, doc_labels)


def test_every_named_metric_exists() -> None:
    series = set(code_series())
    exposed = series | {s[: -len("_total")] for s in series if s.endswith("_total")}
    exposed |= {s + suffix for s in series for suffix in ("_bucket", "_sum", "_count")}
    recorded = {
        r["record"] for g in yaml.safe_load(text(RULES))["groups"] for r in g["rules"] if "record" in r
    }
    for path in DOCS:
        for name in set(re.findall(r"vllm_surgery[:_][a-z0-9_:]*[a-z0-9]", text(path))):
            if name.startswith("vllm_surgery:"):
                assert name in recorded or name.endswith(":") or any(r.startswith(name) for r in recorded), (
                    name
                )
            elif name.startswith(("vllm_surgery_api", "vllm_surgery_rules", "vllm_surgery_dashboard")):
                continue  # the endpoint plugin's name, the rules and dashboard files
            else:
                assert name in exposed, f"{path.relative_to(ROOT)}: {name} is not a series of the code"


# ----------------------------------------------------------------------------- alerts
def test_the_alert_table_is_the_rules_file() -> None:
    alerts = {
        r["alert"]: r["labels"]["severity"]
        for g in yaml.safe_load(text(RULES))["groups"]
        for r in g["rules"]
        if "alert" in r
    }
    rows = table_rows(text(ROOT / "plugins" / "README.md"), "| alert |")
    documented = {unquote(r[0]): r[1] for r in rows}
    assert documented == alerts
    for path in DOCS:
        for name in set(re.findall(r"VllmSurgery[A-Za-z]+", text(path))):
            assert name in alerts, f"{path.relative_to(ROOT)}: {name} is not an alert of the rules file"


# ----------------------------------------------------------------------------- the pages themselves
def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(path: Path) -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", text(path)):
        if re.match(r"[a-z]+://", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.exists(), f"{path.relative_to(ROOT)}: link to missing {target}"
        if anchor and linked.suffix == ".md":
            anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", text(linked), re.M)}
            assert anchor in anchors, (
                f"{path.relative_to(ROOT)}: no heading #{anchor} in {file_part or path.name}"
            )


def test_the_readme_is_a_front_page() -> None:
    readme = text(ROOT / "README.md")
    assert len(readme.splitlines()) <= 200
    assert "## Does it help?" in readme
    for command in ("make demo", "make test"):
        assert command in readme
    makefile = text(ROOT / "Makefile")
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


def repository_text_files() -> list[Path]:
    """The repository's source and text files (hidden directories but .ci, caches and outputs skipped)."""
    suffixes = {".py", ".md", ".yml", ".yaml", ".sh", ".toml", ".json"}
    out = []
    for directory, subdirs, files in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if (not d.startswith(".") or d == ".ci") and d not in SKIPPED_DIRS]
        out += [Path(directory) / f for f in files if Path(f).suffix in suffixes or f in ("Makefile", "run")]
    return out


SKIPPED_DIRS = {"__pycache__", "demo-output", "build", "dist", "vllm_surgery.egg-info"}


def test_no_references_outside_the_repository_or_to_issue_numbers() -> None:
    pattern = re.compile(r"\bissues?\s*#?\d|/work/|shared/notes|\.\./shared", re.I)
    bad = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in repository_text_files()
        if path != Path(__file__).resolve()  # the pattern above
        for number, line in enumerate(text(path).splitlines(), 1)
        if pattern.search(line)
    ]
    assert not bad, "\n".join(bad)


TABLE = "quality_results.json"


def test_the_readmes_quality_claims_are_the_quality_table() -> None:
    """'Does it help?' quotes benchmarks/quality_results.json (every policy, auto and the baseline on the
    54 runs): rerunning the table without updating the README (or the other way round) fails here."""
    import json

    runs = json.loads(text(ROOT / "benchmarks" / TABLE))["runs"]
    assert len({(r["task"], r["level"], r["size"], r["seed"]) for r in runs}) == len(runs) == 54
    section = text(ROOT / "README.md").split("## Does it help?", 1)[1].split("\n## ", 1)[0]
    section = " ".join(section.split())

    def mean(values: list[float]) -> float:
        return 100 * sum(values) / len(values)

    def under(size: int) -> list[dict]:
        return [r for r in runs if r["level"] == "under" and r["size"] == size]

    claims = []
    for size, form in (
        (512, "{m:+.1f} points on average with 512 rated answers per adapter ({w} of {k} written"),
        (128, "{m:+.1f} with 128 ({w} of {k} written"),
        (32, "{m:+.1f} with 32 ({w} of {k} written"),
    ):
        sel = under(size)
        m = mean([r["auto"]["exact_match"]["delta"] for r in sel])
        claims.append(form.format(m=m, w=sum(r["auto"]["written"] for r in sel), k=len(sel)))
    written = [r for r in runs if r["auto"]["written"]]
    worse = [r for r in written if r["auto"]["exact_match"]["delta"] < 0]
    claims.append(
        f"In {len(runs)} runs it wrote {len(written)} adapters, {len(worse)} of them worse on the test set"
        if worse
        else f"In {len(runs)} runs it never wrote an adapter that was worse on the test set"
    )
    forced = [r["policies"]["grad_direction"]["exact_match"]["delta"] for r in runs]
    claims.append(
        f"lost {-mean(forced):.1f} points on average over the {len(runs)} runs and up to {-100 * min(forced):.0f}"
    )
    gated = {n: mean([r["baseline"]["exact_match_gated"]["delta"] for r in under(n)]) for n in (512, 128)}
    gated_worse = sum(
        r["baseline"]["accepted"] and r["baseline"]["exact_match_gated"]["delta"] < 0 for r in runs
    )
    claims.append(
        f"({gated[512]:+.1f} points at 512, {gated[128]:+.1f} at 128; through the gate it wrote {gated_worse} "
        "adapters that were worse on the test set)"
    )
    for claim in claims:
        assert claim in section, (
            f"README 'Does it help?' should say {claim!r} (benchmarks/quality_results.json)"
        )
