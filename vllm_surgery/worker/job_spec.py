"""What a refinement job asks for (its spec), shared by the server that queues it and the worker that
runs it.

A spec is JSON (stored in the job row)::

    {"spec_version": 1,
     "base_model": "/models/base",          the server's --model: the worker loads it, the store key uses it
     "adapter_path": "/srv/adapters/x",     the original as the server found it (root or --lora-modules)
     "config": {"policy": "auto", ...},     SurgeryConfig fields (settings.refine_setting_fields()); never force
     "calibration": one of
        {"source": "records", "records": [...], "sha256": ...}     inline lines of a refine request
        {"source": "file", "path": "/srv/calibration/x.jsonl", "sha256": ...}
        {"source": "adapter", "include_unrated": false, "since": null, "files": [...], "adapter_dir": ...}
            the adapter's calibration set, built when the job runs: its traffic and feedback in the
            database, its registered files, its own surgery_calibration.jsonl (see
            vllm_surgery.traffic.calibration_set)
     "swap": true,                           swap the version in when the gate accepts it
     "min_examples": 32 | null}              automatic jobs: fewer usable examples when it runs -> failed

The server resolves everything that depends on its own settings (which files are registered, whether
unrated completions count, the original's path) when it queues the job, so a worker with other
settings computes exactly what was asked.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError

SPEC_VERSION = 1
CALIBRATION_SOURCES = ("records", "file", "adapter")
DEFAULT_JOB_POLICY = "auto"


def job_spec(
    *,
    base_model: str,
    adapter_path: str | Path,
    config: Mapping[str, Any],
    calibration: Mapping[str, Any],
    swap: bool = True,
    min_examples: int | None = None,
) -> dict[str, Any]:
    """A job spec (module docstring). `config`: SurgeryConfig fields as JSON values."""
    if calibration.get("source") not in CALIBRATION_SOURCES:
        raise ValueError(f"calibration source must be one of {CALIBRATION_SOURCES}: {calibration!r}")
    return {
        "spec_version": SPEC_VERSION,
        "base_model": str(base_model),
        "adapter_path": str(adapter_path),
        "config": {"policy": DEFAULT_JOB_POLICY, **dict(config)},
        "calibration": dict(calibration),
        "swap": bool(swap),
        "min_examples": min_examples,
    }


def spec_config(spec: Mapping[str, Any], **extra: Any) -> Any:
    """The SurgeryConfig of a spec (plus `extra` fields such as device and progress). Raises ConfigError."""
    from ..config import SurgeryConfig

    fields = dict(spec.get("config") or {})
    if "force" in fields:
        raise ConfigError("a job never forces a version: 'force' is not allowed in its settings")
    if isinstance(fields.get("layers"), list):
        fields["layers"] = tuple(fields["layers"])
    return SurgeryConfig.from_mapping({**fields, **extra})


def records_sha256(records: list[Any]) -> str:
    """The SHA-256 that load_calibration() records for inline records (kept equal by a unit test)."""
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()
