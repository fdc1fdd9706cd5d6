"""The Kubernetes example (examples/kubernetes) is a deployment our code accepts: every variable it sets
is a setting (and parses), every option it passes exists, secrets come from the Secret, replicas are
probed on /health, and the worker needs no server address. Structure only: no cluster runs here."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from vllm_surgery.cli import build_parser
from vllm_surgery.serving import vllm_compat
from vllm_surgery.settings import ServingSettings
from vllm_surgery.storage import is_postgres_url

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "kubernetes"
# What grants access: never a literal in a Deployment.
SECRET_VARIABLES = {
    "VLLM_API_KEY",
    "VLLM_SURGERY_DATABASE",
    "VLLM_SURGERY_ADMIN_TOKEN",
    "VLLM_SURGERY_REVIEWER_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
}
# Variables read by something other than our settings (vLLM, botocore).
OTHER_VARIABLES = {"VLLM_API_KEY", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def documents() -> dict[tuple[str, str], dict]:
    out = {}
    for path in sorted(EXAMPLE.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            out[(doc["kind"], doc["metadata"].get("name", path.name))] = doc
    return out


def container(kind_name: tuple[str, str]) -> dict:
    spec = documents()[kind_name]["spec"]["template"]["spec"]
    (only,) = spec["containers"]
    return only


def env(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c["env"]}


def flags(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if a.startswith("--")}


SERVER = ("Deployment", "vllm-surgery-server")
WORKER = ("Deployment", "vllm-surgery-worker")


def test_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((EXAMPLE / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in EXAMPLE.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("which", [SERVER, WORKER])
def test_variables_are_settings_or_known_and_secrets_come_from_the_secret(which) -> None:
    settings = {f.metadata["env"] for f in fields(ServingSettings)}
    secret = documents()[("Secret", "vllm-surgery")]["stringData"]
    variables = env(container(which))
    for name, entry in variables.items():
        assert name in settings | OTHER_VARIABLES, f"{name} is not a setting"
        if name in SECRET_VARIABLES:
            assert "value" not in entry, f"{name} is written into the Deployment"
            ref = entry["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "vllm-surgery" and ref["key"] in secret, name
    # the shared backends: a Postgres URL and an s3:// store, as the settings read them
    assert is_postgres_url(secret[variables["VLLM_SURGERY_DATABASE"]["valueFrom"]["secretKeyRef"]["key"]])
    plain = {n: e["value"] for n, e in variables.items() if "value" in e}
    plain["VLLM_SURGERY_DATABASE"] = secret["database-url"]
    parsed = ServingSettings.from_env(plain)
    assert parsed.store == "s3://vllm-surgery/versions"
    assert is_postgres_url(str(parsed.database))


def test_replicas_are_several_single_process_servers_probed_on_health() -> None:
    deployment = documents()[SERVER]
    assert deployment["spec"]["replicas"] >= 2
    c = container(SERVER)
    assert c["command"] == ["vllm-surgery-serve"]
    scripts = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^vllm-surgery-serve = "', scripts, re.M)
    known = {o for a in vllm_compat.serve_arg_parser()._actions for o in a.option_strings}
    assert flags(c["args"]) <= known, flags(c["args"]) - known
    assert "--api-server-count" not in flags(c["args"])  # one process per replica (vLLM 0.32)
    assert "--enable-lora" in flags(c["args"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health", probe
    assert env(c)["VLLM_SURGERY_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    service = documents()[("Service", "vllm-surgery")]
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]


def test_the_worker_is_our_worker_command_without_a_server_address() -> None:
    c = container(WORKER)
    assert c["command"] == ["vllm-surgery", "worker"]
    parser = build_parser()
    args = parser.parse_args(["worker", *c["args"]])  # every option exists and parses
    assert args.device == "cuda"
    assert "--server" not in flags(c["args"])  # the served pointer is in the shared database


def test_the_image_installs_the_replica_extras_on_the_supported_vllm() -> None:
    dockerfile = (EXAMPLE / "Dockerfile").read_text()
    base = re.search(r"^FROM vllm/vllm-openai:v(\d+)\.(\d+)\.\d+", dockerfile, re.M)
    assert base, "the image starts from vLLM's OpenAI image"
    pin = re.search(r'"vllm>=(\d+)\.(\d+),<(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    low, high = (int(pin[1]), int(pin[2])), (int(pin[3]), int(pin[4]))
    assert low <= (int(base[1]), int(base[2])) < high
    assert "[postgres,s3]" in dockerfile
