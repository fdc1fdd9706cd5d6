"""What a refinement job asks for (its spec), shared by the server that queues it and the worker that
runs it, and how a job is shown on the job routes.

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
            database, its registered files, its own surgery_calibration.jsonl (traffic_calibration)
     "swap": true,                           swap the version in when the gate accepts it
     "min_examples": 32 | null}              automatic jobs: fewer usable examples when it runs -> failed

The server resolves everything that depends on its own settings (which files are registered, whether
unrated completions count, the original's path) when it queues the job, so a worker with other
settings computes exactly what was asked.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .job_queue import Job
from .store import VersionInfo

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


def adapter_source(
    *,
    include_unrated: bool,
    since: float | None,
    files: Sequence[str | Path],
    adapter_dir: str | Path | None,
) -> dict[str, Any]:
    """The "adapter" calibration source: the adapter's calibration set, built when the job runs."""
    return {
        "source": "adapter",
        "include_unrated": bool(include_unrated),
        "since": since,
        "files": [str(f) for f in files],
        "adapter_dir": str(adapter_dir) if adapter_dir is not None else None,
    }


def build_adapter_calibration(db: Any, adapter: str, source: Mapping[str, Any]) -> Any:
    """The calibration set an "adapter" source names (a traffic_calibration.CalibrationFromTraffic).
    `db`: the database with the adapter's traffic, or None. Raises CalibrationError (file, line) or
    DatabaseError."""
    from ..traffic_calibration import calibration_set

    return calibration_set(
        db,
        adapter,
        since=source.get("since"),
        include_unrated=bool(source.get("include_unrated")),
        static_files=[Path(f) for f in source.get("files") or ()],
        adapter_dir=source.get("adapter_dir"),
    )


def spec_config(spec: Mapping[str, Any], **extra: Any) -> Any:
    """The SurgeryConfig of a spec (plus `extra` fields such as device and progress). Raises ConfigError."""
    from ..config import SurgeryConfig

    fields = dict(spec.get("config") or {})
    if "force" in fields:
        raise ConfigError("a job never forces a version: 'force' is not allowed in its settings")
    if isinstance(fields.get("layers"), list):
        fields["layers"] = tuple(fields["layers"])
    return SurgeryConfig.from_mapping({**fields, **extra})


def _calibration_view(calibration: Mapping[str, Any]) -> dict[str, Any]:
    """The calibration source without the records themselves (they may hold user data)."""
    view = {k: v for k, v in calibration.items() if k != "records"}
    if "records" in calibration:
        view["examples"] = len(calibration["records"])
    return view


def describe_job(job: Job) -> dict[str, Any]:
    """A job as the routes show it: state, timings, figures; never the calibration records."""
    spec = job.spec
    result = job.result or {}
    return {
        "id": job.id,
        "adapter": job.adapter,
        "trigger": job.trigger,
        "state": job.state,
        "created": job.created,
        "started": job.started,
        "finished": job.finished,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "lease_owner": job.lease_owner,
        "lease_expires": job.lease_expires,
        "heartbeat": job.heartbeat,
        "error": job.error,
        "swap": job.swap,
        "swap_error": job.swap_error,
        "version": result.get("version"),
        "decision": result.get("decision"),
        "reason": result.get("reason"),
        "policy": result.get("policy"),
        "quality_before": result.get("quality_before"),
        "quality_after": result.get("quality_after"),
        "gate": result.get("gate"),
        "calibration": result.get("calibration"),
        "timings": result.get("timings") or {},
        "reused": result.get("reused"),
        "spec": {
            "base_model": spec.get("base_model"),
            "adapter_path": spec.get("adapter_path"),
            "config": spec.get("config"),
            "calibration": _calibration_view(spec.get("calibration") or {}),
            "swap": spec.get("swap"),
            "min_examples": spec.get("min_examples"),
        },
    }


def records_sha256(records: list[Any]) -> str:
    """The SHA-256 that load_calibration() records for inline records (kept equal by a unit test)."""
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()


def _quality(q: Any) -> dict[str, Any] | None:
    if q is None:
        return None
    return q if isinstance(q, dict) else q.to_dict()


def stored_answer(record: Mapping[str, Any], decision: str | None, version: str | None) -> dict[str, Any]:
    """A refinement's figures from its surgery.json (or a remembered outcome), shaped for answers."""
    return {
        "decision": decision,
        "reason": record.get("reason"),
        "policy": record.get("policy"),
        "quality_before": _quality(record.get("quality_before")),
        "quality_after": _quality(record.get("quality_after")),
        "version": version,
        "timings": record.get("timings") or {},
    }


def lookup(store: Any, name: str, key: str) -> dict[str, Any] | None:
    """The store's answer for refinement `key` of `name` (an accepted version, or a remembered or
    forced outcome, which a job would have kept as the original), or None: not computed yet."""
    matches = [v for v in store.versions(name) if v.key == key and v.servable]
    accepted = [v for v in matches if v.decision == "accept"]
    info: VersionInfo | None = (accepted or matches or [None])[-1]
    if info is not None:
        record = dict(info.record or {})
        if info.decision != "accept":  # forced: the gate did not accept it, so a job keeps the original
            return stored_answer(record, "keep_original", None)
        return stored_answer(record, "accept", info.version_id)
    remembered = store.recall(name, key)
    return stored_answer(remembered, "keep_original", None) if remembered is not None else None
