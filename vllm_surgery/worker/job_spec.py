"""What a refinement job asks for (its spec), shared by the server that queues it and the worker that
runs it.

A spec is JSON (stored in the job row)::

    {"spec_version": 1,
     "base_model": "/models/base",          the server's --model: the worker loads it, the store key uses it
     "adapter_path": "/srv/adapters/x",     the original as the server found it (root or --lora-modules)
     "config": {"policy": "auto", ...},     SurgeryConfig fields (settings.refine_setting_fields()); never force
     "calibration": one of
        {"source": "records", "records": [...], "sha256": ...}     inline lines of a refine request
        {"source": "file", "name": "x.jsonl", "path": "/srv/calibration/x.jsonl", "sha256": ...}
        {"source": "adapter", "include_unrated": false, "since": null, "files": [...], "adapter_dir": ...}
            the adapter's calibration set, built when the job runs: its traffic and feedback in the
            database, its registered files, its own surgery_calibration.jsonl (see
            vllm_surgery.traffic.calibration_set)
     "swap": true,                           swap the version in when the gate accepts it
     "min_examples": 32 | null}              automatic jobs: fewer usable examples when it runs -> failed

The server resolves everything that depends on its own settings (which files are registered, whether
unrated completions count, the original's path) when it queues the job, so a worker computes exactly
what was asked. The paths in a spec are never trusted, though: the worker resolves the adapter and the
calibration files from their names under its own roots (the same settings as the server's) and fails
a job whose paths disagree (see `vllm_surgery.worker.process`), since anyone who can write the
database could otherwise make the worker read any file and write the result into the store.

Settings are checked by `job_config`, both when the server queues a job (a 4xx naming the field) and
when the worker runs it (a row written by hand gets the same answer), with bounds beyond SurgeryConfig's
own (`JOB_LIMITS`, module names): a job runs unattended, and a request for 1e15 samples should be
refused at once, not fail (or exhaust memory) in the worker an hour later.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError

SPEC_VERSION = 1
CALIBRATION_SOURCES = ("records", "file", "adapter")
DEFAULT_JOB_POLICY = "auto"
# Upper bounds of a job's numeric settings: far above any real use (the paper's calibration sets hold
# 32-256 examples; today's context windows are at most ~1M tokens), far below what exhausts a machine.
JOB_LIMITS = {"samples": 1_000_000, "max_length": 1_048_576, "max_batch_tokens": 16_777_216}
MAX_JOB_MODULES = 1024
# A module name (or a suffix of one) as PyTorch prints it: dotted identifiers, never a path.
_MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
MAX_MODULE_NAME_LENGTH = 256


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


def check_job_settings(fields: Mapping[str, Any]) -> None:
    """Refuse job settings beyond what a job may ask (module docstring): `force`, numbers above
    `JOB_LIMITS`, module names that are not dotted identifiers (a path such as "../../etc"). Raises
    ConfigError naming the field, the limit and the remedy; SurgeryConfig checks the rest."""
    if "force" in fields:
        raise ConfigError("a job never forces a version: 'force' is not allowed in its settings")
    for name, limit in JOB_LIMITS.items():
        value = fields.get(name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and (not math.isfinite(value) or value > limit):
            raise ConfigError(f"'{name}' is {value:g}; a refinement job allows at most {limit:,}: lower it")
    modules = fields.get("modules")
    if modules is None:
        return
    names = modules.split(",") if isinstance(modules, str) else modules
    if not isinstance(names, (list, tuple)):
        return  # not a module list at all: SurgeryConfig names the field and the expected type
    if len(names) > MAX_JOB_MODULES:
        raise ConfigError(
            f"'modules' names {len(names)} modules; a refinement job allows at most {MAX_JOB_MODULES}: "
            "use a preset (residual, attention, mlp, all) or fewer names"
        )
    for module in names:
        if isinstance(module, str) and not (
            len(module) <= MAX_MODULE_NAME_LENGTH and _MODULE_NAME.fullmatch(module.strip())
        ):
            raise ConfigError(
                f"'modules' entry {module[:300]!r} is not a module name: a job allows dotted names of "
                f"letters, digits and '_' (at most {MAX_MODULE_NAME_LENGTH} characters, e.g. "
                "'q_proj' or 'layers.0.mlp.down_proj'), or a preset (residual, attention, mlp, all)"
            )


def job_config(fields: Mapping[str, Any], **extra: Any) -> Any:
    """The SurgeryConfig of a job's settings (plus `extra` fields such as device and progress), checked
    as a job needs: `check_job_settings`, SurgeryConfig's own checks, and a held-out share (the gate
    measures every job on held-out data). The one check of the refine route and of the worker.
    Raises ConfigError naming the field."""
    from ..config import SurgeryConfig

    fields = dict(fields)
    check_job_settings(fields)
    if isinstance(fields.get("layers"), list):
        fields["layers"] = tuple(fields["layers"])
    try:
        config = SurgeryConfig.from_mapping({**fields, **extra})
    except ConfigError:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise ConfigError(f"invalid settings: {e}") from e
    if config.heldout_fraction == 0:
        raise ConfigError(
            "heldout_fraction must be > 0: a queued refinement is measured on held-out data by the gate"
        )
    return config


def spec_config(spec: Mapping[str, Any], **extra: Any) -> Any:
    """The SurgeryConfig of a spec (plus `extra` fields such as device and progress), checked by
    `job_config`. Raises ConfigError naming the field."""
    fields = spec.get("config") or {}
    if not isinstance(fields, Mapping):
        raise ConfigError(f"the job's settings must be a JSON object, got {type(fields).__name__}")
    return job_config(fields, **extra)


def records_sha256(records: list[Any]) -> str:
    """The SHA-256 that load_calibration() records for inline records (kept equal by a unit test)."""
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()
