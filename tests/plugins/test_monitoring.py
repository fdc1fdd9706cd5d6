"""The Prometheus rules and the Grafana dashboard under plugins/ stay valid and in step with the code.

- Rules: `promtool check rules` and `promtool test rules` (the real Prometheus tool) when promtool is on
  PATH (Debian/Ubuntu: `apt-get install -y prometheus`). Without it these tests fall back to checking the
  YAML structure only and say so with a warning; set VLLM_SURGERY_REQUIRE_PROMTOOL=1 (CI) to make a
  missing promtool a failure instead.
- Every metric name used by the rules and by the dashboard's PromQL is a series that
  `vllm_surgery.serving.metrics` or `vllm_surgery.traffic.metrics` defines (read from the
  prometheus_client objects themselves), a
  recording rule of the rules file, or a `vllm:` metric defined in the installed vLLM's source; label
  values used in matchers (outcome, result, by, which) are ones the code can emit.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "plugins" / "prometheus" / "vllm_surgery_rules.yml"
RULES_TEST = ROOT / "plugins" / "prometheus" / "vllm_surgery_rules_test.yml"
DASHBOARD = ROOT / "plugins" / "grafana" / "vllm_surgery_dashboard.json"
PROMTOOL = shutil.which("promtool")
REQUIRE_PROMTOOL = os.environ.get("VLLM_SURGERY_REQUIRE_PROMTOOL", "") not in ("", "0")
INSTALL_HINT = "install it with: apt-get update && apt-get install -y prometheus"
SEVERITIES = {"critical", "warning", "info"}

# Exposed sample-name suffixes per prometheus_client metric type.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created", ""),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
    "untyped": ("",),
}


# ----------------------------------------------------------------------------- helpers
def metrics_modules() -> list:
    """The modules that define the project's metrics."""
    from vllm_surgery.serving import metrics as serving_metrics
    from vllm_surgery.traffic import metrics as traffic_metrics

    return [serving_metrics, traffic_metrics]


def plugin_families() -> dict[str, str]:
    """name -> type of every metric object defined in the metrics modules, and of every family their
    custom collectors describe (the job figures read from the database at scrape time)."""
    from prometheus_client.metrics import MetricWrapperBase

    out = {}
    for metrics in metrics_modules():
        for value in vars(metrics).values():
            if isinstance(value, MetricWrapperBase):
                families = value.describe()
            elif (
                isinstance(value, type) and value.__module__ == metrics.__name__ and hasattr(value, "collect")
            ):
                families = value(None).describe()
            else:
                continue
            for family in families:
                out[family.name] = family.type
    assert out, "the metrics modules define no metrics"
    return out


def plugin_series() -> set[str]:
    return {name + suffix for name, kind in plugin_families().items() for suffix in SUFFIXES[kind]}


def vllm_series() -> set[str] | None:
    """Every `vllm:` sample name the installed vLLM can expose, read from its metrics source files
    (without importing vLLM); None when vLLM is not installed."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    names: set[str] = set()
    for location in spec.submodule_search_locations:
        for path in (Path(location) / "v1" / "metrics").glob("*.py"):
            names.update(re.findall(r"[\"'](vllm:[a-z0-9_:]+)[\"']", path.read_text(errors="replace")))
    assert names, "no vllm: metric names found in the installed vLLM"
    return {n + s for n in names for s in ("", "_total", "_bucket", "_sum", "_count", "_created", "_info")}


def load_rules() -> dict:
    return yaml.safe_load(RULES.read_text())


def all_rules() -> list[dict]:
    return [rule for group in load_rules()["groups"] for rule in group["rules"]]


def recorded_names() -> set[str]:
    return {r["record"] for r in all_rules() if "record" in r}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    out = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expr) of every PromQL expression: panel targets and query template variables."""
    out = []
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target.get('refId')}", target["expr"]))
    for var in dashboard().get("templating", {}).get("list", []):
        query = var.get("query")
        if var.get("type") == "query":
            text = query.get("query") if isinstance(query, dict) else query
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", text.strip())
            out.append((f"variable {var['name']}", m.group(1) if m else text))
    return out


def metric_names(expr: str) -> set[str]:
    """Metric names (all start with 'vllm') referenced by a PromQL expression; string literals and
    Grafana variables are removed first so that label values are not mistaken for metrics."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    bare = re.sub(r"\$\{?\w+\}?", "", bare)
    return set(re.findall(r"(?<![\w:])(vllm[a-zA-Z0-9_:]*)", bare))


def label_matchers(expr: str) -> list[tuple[str, str, str]]:
    return re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', expr)


def allowed_label_values() -> dict[str, set[str]]:
    from vllm_surgery.serving import metrics
    from vllm_surgery.traffic import metrics as traffic_metrics

    return {
        "outcome": set(metrics.SWAP_OUTCOMES)
        | set(metrics.REFINE_OUTCOMES)
        | set(traffic_metrics.TRAFFIC_OUTCOMES)
        | set(metrics.JOB_OUTCOMES),
        "state": set(metrics.JOB_STATES),
        "rating": set(traffic_metrics.FEEDBACK_RATINGS),
        "result": set(metrics.STORE_RESULTS),
        "by": set(metrics.STORE_LOOKUPS_BY),
        "which": {"before", "after"},
        "stage": set(metrics.JOB_STAGES),
    }


def all_exprs() -> list[tuple[str, str]]:
    rules = [(f"rule {r.get('record') or r.get('alert')}", r["expr"]) for r in all_rules()]
    return rules + dashboard_exprs()


def no_promtool(what: str) -> None:
    message = f"promtool not found: {what} checked by YAML structure only, not by Prometheus; {INSTALL_HINT}"
    if REQUIRE_PROMTOOL:
        pytest.fail(message + " (VLLM_SURGERY_REQUIRE_PROMTOOL is set)")
    warnings.warn(message, stacklevel=2)


def run_promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, check=False)


# ----------------------------------------------------------------------------- rules
def test_rules_yaml_structure() -> None:
    data = load_rules()
    assert isinstance(data, dict) and set(data) == {"groups"}, data.keys()
    names = set()
    for group in data["groups"]:
        assert group["name"] and group["name"] not in names, group.get("name")
        names.add(group["name"])
        assert group["rules"], group["name"]
        for rule in group["rules"]:
            assert ("record" in rule) != ("alert" in rule), rule
            assert isinstance(rule["expr"], str) and rule["expr"].strip(), rule
            if "record" in rule:
                assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+|[a-z_]+:[a-z0-9_]+", rule["record"]), rule
                assert set(rule) <= {"record", "expr", "labels"}, rule
            else:
                assert re.fullmatch(r"VllmSurgery[A-Za-z]+", rule["alert"]), rule["alert"]
                assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule
                assert rule["labels"]["severity"] in SEVERITIES, rule
                assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule
            assert rule["expr"].count("(") == rule["expr"].count(")"), rule["expr"]
    alerts = {r["alert"] for r in all_rules() if "alert" in r}
    assert {
        "VllmSurgeryHotSwapFailed",
        "VllmSurgeryWorseRefinedVersionServed",
        "VllmSurgeryTrafficRecordsLost",
        "VllmSurgeryJobFailingRepeatedly",
        "VllmSurgeryJobQueueNotDraining",
    } <= alerts


@pytest.mark.skipif(PROMTOOL is None, reason=f"promtool not on PATH ({INSTALL_HINT})")
def test_rules_pass_promtool_check() -> None:
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


@pytest.mark.skipif(PROMTOOL is None, reason=f"promtool not on PATH ({INSTALL_HINT})")
def test_rules_pass_promtool_unit_tests() -> None:
    """Synthetic series make each important alert fire (and the others stay quiet): the PromQL is
    checked for meaning, not just syntax."""
    result = run_promtool("test", "rules", str(RULES_TEST))
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_promtool_present_or_fallback_reported() -> None:
    """Not a silent skip: without promtool this says what was not checked (and fails in CI mode)."""
    if PROMTOOL is None:
        no_promtool("rules, rule unit tests and dashboard PromQL")
        test_rules_yaml_structure()
        tests = yaml.safe_load(RULES_TEST.read_text())
        alerts = {r["alert"] for r in all_rules() if "alert" in r}
        for case in tests["tests"]:
            for t in case.get("alert_rule_test", []):
                assert t["alertname"] in alerts, t
    else:
        assert run_promtool("--version").returncode == 0


def test_rules_reference_only_defined_metrics() -> None:
    known = plugin_series() | recorded_names()
    vllm = vllm_series()
    for where, expr in ((f"rule {r.get('record') or r.get('alert')}", r["expr"]) for r in all_rules()):
        names = metric_names(expr)
        assert names, f"{where}: no metric referenced in {expr!r}"
        for name in names:
            if name.startswith("vllm:") and vllm is not None:
                assert name in vllm, f"{where}: {name} is not a metric of the installed vLLM"
            elif not name.startswith("vllm:"):
                assert name in known, f"{where}: {name} is not defined in the metrics modules"


# ----------------------------------------------------------------------------- dashboard
def test_dashboard_loads_with_datasource_input() -> None:
    dash = dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    assert dash["uid"] and dash["title"]
    (ds_input,) = [i for i in dash["__inputs"] if i["name"] == "DS_PROMETHEUS"]
    assert ds_input["type"] == "datasource" and ds_input["pluginId"] == "prometheus"
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_panel_has_a_datasource_and_targets() -> None:
    panels = [p for p in dashboard_panels() if p["type"] != "row"]
    assert len(panels) >= 8
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]
            assert target.get("datasource", panel["datasource"])["uid"] == "${DS_PROMETHEUS}", panel["title"]


def test_dashboard_has_the_planned_panels() -> None:
    exprs = " ".join(e for _, e in dashboard_exprs())
    for name in (
        "vllm_surgery_served_version_info",
        "vllm_surgery_hotswaps_total",
        "vllm_surgery_swap_latency_seconds_bucket",
        "vllm_surgery_refinements_total",
        "vllm_surgery_job_stage_seconds_bucket",
        "vllm_surgery_jobs",
        "vllm_surgery_jobs_finished_total",
        "vllm_surgery_job_queue_oldest_age_seconds",
        "vllm_surgery_heldout_loss",
        "vllm_surgery_store_lookups_total",
        "vllm_surgery_traffic_records_total",
        "vllm_surgery_calibration_examples",
        "vllm:request_success_total",
        "vllm:e2e_request_latency_seconds_bucket",
    ):
        assert name in exprs, name
    (table,) = [p for p in dashboard_panels() if "vllm_surgery_served_version_info" in json.dumps(p)]
    assert table["type"] == "table"


def test_dashboard_references_only_defined_metrics() -> None:
    known = plugin_series()
    vllm = vllm_series()
    if vllm is None:
        warnings.warn("vLLM is not installed: vllm: names in the dashboard were not checked", stacklevel=1)
    for where, expr in dashboard_exprs():
        names = metric_names(expr)
        assert names, f"{where}: no metric referenced in {expr!r}"
        for name in names:
            if name.startswith("vllm:"):
                assert vllm is None or name in vllm, f"{where}: {name} is not a metric of the installed vLLM"
            else:
                assert name in known, f"{where}: {name} is not defined in the metrics modules"


def test_every_plugin_metric_is_on_the_dashboard() -> None:
    """The other direction of drift: a metric added to a metrics module gets a panel."""
    exprs = " ".join(e for _, e in dashboard_exprs())
    missing = [name for name in plugin_families() if name not in exprs]
    assert not missing, f"metrics without a dashboard panel: {missing}"


def test_label_values_in_matchers_are_ones_the_code_emits() -> None:
    allowed = allowed_label_values()
    for where, expr in all_exprs():
        for label, op, value in label_matchers(expr):
            if label not in allowed or not allowed[label] or "$" in value:
                continue
            alternatives = value.split("|") if op in ("=~", "!~") else [value]
            for v in alternatives:
                assert v in allowed[label], f"{where}: {label}{op}{value!r}: {v!r} is never emitted"


@pytest.mark.skipif(PROMTOOL is None, reason=f"promtool not on PATH ({INSTALL_HINT})")
def test_dashboard_promql_parses_with_promtool(tmp_path: Path) -> None:
    """Each dashboard expression, with Grafana's variables filled in, as a recording rule for promtool."""
    rules = []
    for i, (_, expr) in enumerate(dashboard_exprs()):
        promql = expr.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$instance", ".*")
        rules.append({"record": f"dashboard:expr:{i}", "expr": promql})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_metric_name_scanner() -> None:
    expr = 'sum(rate(vllm_surgery_hotswaps_total{job=~"vllm_x", outcome!~"swapped"}[$__rate_interval]))'
    expr += " + on() vllm:num_requests_running"
    assert metric_names(expr) == {"vllm_surgery_hotswaps_total", "vllm:num_requests_running"}
    assert metric_names("vllm:e2e_request_latency_seconds_bucket > vllm_surgery:x:y") == {
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm_surgery:x:y",
    }
