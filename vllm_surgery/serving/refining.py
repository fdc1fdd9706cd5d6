"""`POST /v1/surgery/adapters/{name}/refine`: answered from the store, or queued as a job.

Body (JSON object)::

    {"records": [{"prompt": ..., "completion": ...}, ...]}   inline calibration (JSONL line objects)
    {"calibration": "math.jsonl"}                             a file in VLLM_SURGERY_CALIBRATION_DIR
    {"from_traffic": true}                                    the adapter's calibration set: its recorded
      traffic and feedback, its registered files and its own surgery_calibration.jsonl, as they are
      when the job runs (+ optional "include_unrated": bool, "since": "7d" or an ISO time)
    + optional SurgeryConfig fields (settings.refine_setting_fields(): all but force, device and
      progress), policy defaulting to auto
    + "swap": true (default): swap the version in when the gate accepts it

Answers:

- 200: the store already holds this exact refinement (same key: original adapter content, base model,
  result-affecting settings, calibration data): an accepted version (swapped in at once if asked) or a
  remembered keep_original. Nothing is computed.
- 202: queued (or already queued: the same request while its job is queued or running returns that
  job). ``{"job_id", "state", "queued": bool, "location": "/v1/surgery/jobs/ID", "job": {...}}``. A
  `vllm-surgery worker` computes it (see `worker`); the job routes show its progress and figures.
- 400 bad body, config or calibration source (the message names the field); 404 unknown adapter or
  calibration file; 409 no usable calibration example in the traffic; 422 broken original; 503 the
  job database cannot be used.

The server never computes a refinement itself: a second copy of the base model and a gradient pass
inside the API-server process would compete with vLLM for its memory and its event loop. There is no
409-when-busy either: requests queue, and one worker (or several) takes them in order, one job per
adapter at a time. ``force`` is refused: a job's version is swapped in only when the gate accepts it
(write a forced version with `vllm-surgery refine --force` and swap it by hand).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

from ..adapter import load_adapter
from ..calibration import check_record
from ..errors import AdapterError, CalibrationError, ConfigError, SurgeryError
from . import metrics
from .database import DatabaseError
from .hotswap import HotSwapError, HotSwapper
from .jobs import DEFAULT_JOB_POLICY, describe_job, job_spec, lookup, records_sha256
from .names import InvalidAdapterName, path_under
from .settings import refine_setting_fields
from .store import version_key

log = logging.getLogger(f"vllm.{__name__}")

CONFIG_FIELDS = frozenset(refine_setting_fields())
TRAFFIC_FIELDS = frozenset({"include_unrated", "since"})
BODY_FIELDS = (
    frozenset({"records", "calibration", "from_traffic", "swap", "force"}) | TRAFFIC_FIELDS | CONFIG_FIELDS
)
JOBS_PATH = "/v1/surgery/jobs"

# (adapter, adapter_dir, include_unrated or None, since or None) -> (CalibrationFromTraffic, source spec)
AdapterCalibration = Callable[[str, "Path | None", "bool | None", "float | None"], "tuple[Any, dict[str, Any]]"]


class RefineError(SurgeryError):
    """A refinement request that was refused or failed; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = int(status)


@dataclass(frozen=True)
class RefineRequest:
    config: Any  # SurgeryConfig
    fields: dict[str, Any]  # the request's config fields, as the job spec stores them
    calibration: dict[str, Any]  # the job spec's calibration source
    calibration_sha256: str
    examples: int | None  # known at request time (records, traffic), or None (a file)
    swap: bool


def parse_request(
    body: Any,
    calibration_dir: Path | None,
    from_traffic: Callable[[bool | None, float | None], tuple[Any, dict[str, Any]]] | None = None,
) -> RefineRequest:
    """Validate a refine body (blocking: may hash a calibration file or read the traffic database).
    `from_traffic(include_unrated, since)` gives the adapter's calibration set and its source spec.
    Raises RefineError (400/404; 409 when the traffic holds no usable example)."""
    from ..config import SurgeryConfig

    if not isinstance(body, dict):
        raise RefineError("body must be a JSON object", HTTPStatus.BAD_REQUEST)
    unknown = sorted(set(body) - BODY_FIELDS)
    if unknown:
        raise RefineError(
            f"unknown field(s) {unknown}; allowed: {sorted(BODY_FIELDS - {'force'})}", HTTPStatus.BAD_REQUEST
        )
    if "force" in body:
        raise RefineError(
            "'force' is not available here: a queued refinement is swapped in only when the gate accepts "
            "it; write a forced version with `vllm-surgery refine --force` and swap it in by hand",
            HTTPStatus.BAD_REQUEST,
        )
    swap = body.get("swap", True)
    if not isinstance(swap, bool):
        raise RefineError("'swap' must be true or false", HTTPStatus.BAD_REQUEST)
    fields = {"policy": DEFAULT_JOB_POLICY, **{k: v for k, v in body.items() if k in CONFIG_FIELDS}}
    if isinstance(fields.get("layers"), list):
        fields["layers"] = tuple(fields["layers"])
    try:
        config = SurgeryConfig(**fields, progress=False)
    except (ConfigError, TypeError, ValueError, OverflowError) as e:
        raise RefineError(f"invalid settings: {e}", HTTPStatus.BAD_REQUEST) from e
    if config.heldout_fraction == 0:
        raise RefineError(
            "heldout_fraction must be > 0: a queued refinement is measured on held-out data by the gate",
            HTTPStatus.BAD_REQUEST,
        )
    if isinstance(fields.get("layers"), tuple):
        fields["layers"] = list(fields["layers"])

    if sum(k in body for k in ("records", "calibration", "from_traffic")) != 1:
        raise RefineError(
            "give calibration data as exactly one of 'records' (a list of JSONL line objects), "
            "'calibration' (a file name in the calibration directory) or 'from_traffic': true",
            HTTPStatus.BAD_REQUEST,
        )
    if "from_traffic" in body:
        return _traffic_request(body, config, fields, swap, from_traffic)
    if TRAFFIC_FIELDS & set(body):
        raise RefineError(f"{sorted(TRAFFIC_FIELDS & set(body))} only go with 'from_traffic'", 400)
    if "records" in body:
        records = body["records"]
        if not isinstance(records, list) or not records:
            raise RefineError("'records' must be a non-empty list of objects", HTTPStatus.BAD_REQUEST)
        try:  # shapes now, naming the record; tokens when the job runs
            for i, record in enumerate(records):
                check_record(record, f"record {i}")
        except CalibrationError as e:
            raise RefineError(str(e), HTTPStatus.BAD_REQUEST) from e
        digest = records_sha256(records)
        source = {"source": "records", "records": records, "sha256": digest}
        return RefineRequest(config, fields, source, digest, len(records), swap)

    file_name = body["calibration"]
    if calibration_dir is None:
        raise RefineError(
            "this server has no calibration directory (VLLM_SURGERY_CALIBRATION_DIR); send 'records'",
            HTTPStatus.BAD_REQUEST,
        )
    try:
        path = path_under(calibration_dir, file_name)  # validates like an adapter name: no paths
    except InvalidAdapterName as e:
        raise RefineError(f"calibration file name: {str(e).replace('adapter name', 'name')}", 400) from e
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except (FileNotFoundError, IsADirectoryError) as e:
        raise RefineError(f"calibration file {file_name!r} not found", HTTPStatus.NOT_FOUND) from e
    except OSError as e:
        raise RefineError(f"calibration file {file_name!r} cannot be read ({e.strerror})", 400) from e
    source = {"source": "file", "path": str(path), "sha256": digest}
    return RefineRequest(config, fields, source, digest, None, swap)


def _traffic_request(
    body: dict[str, Any],
    config: Any,
    fields: dict[str, Any],
    swap: bool,
    from_traffic: Callable[[bool | None, float | None], tuple[Any, dict[str, Any]]] | None,
) -> RefineRequest:
    from ..traffic_calibration import parse_since

    if body["from_traffic"] is not True:
        raise RefineError("'from_traffic' must be true", HTTPStatus.BAD_REQUEST)
    include_unrated = body.get("include_unrated")
    if include_unrated is not None and not isinstance(include_unrated, bool):
        raise RefineError("'include_unrated' must be true or false", HTTPStatus.BAD_REQUEST)
    since = body.get("since")
    if since is not None and not isinstance(since, str):
        raise RefineError("'since' must be a string such as \"7d\" or an ISO 8601 time", HTTPStatus.BAD_REQUEST)
    if from_traffic is None:
        raise RefineError("this server cannot read recorded traffic", HTTPStatus.BAD_REQUEST)
    try:
        data, source = from_traffic(include_unrated, None if since is None else parse_since(since))
    except CalibrationError as e:
        raise RefineError(str(e), HTTPStatus.BAD_REQUEST) from e
    except SurgeryError as e:
        raise RefineError(str(e), HTTPStatus.CONFLICT) from e
    if not data.records:
        raise RefineError(f"no usable calibration examples in the traffic: {data.summary()}", HTTPStatus.CONFLICT)
    log.info("refine from traffic: %s", data.summary())
    return RefineRequest(config, fields, source, records_sha256(data.records), len(data.records), swap)


class RefineQueue:
    """Answers refine requests for one API server from the store, or queues them (module docstring)."""

    def __init__(self, swapper: HotSwapper, base_model: str) -> None:
        self.swapper = swapper
        self.store = swapper.store
        self.base_model = str(base_model)
        self.db: Any = None  # the job database (Database), set by the plugin; None: jobs unavailable
        self.max_attempts = swapper.settings.job_max_attempts
        # (adapter, adapter_dir, include_unrated, since) -> (data, source); set by the plugin (traffic_api)
        self.traffic: AdapterCalibration | None = None

    def _key(self, original: Path, request: RefineRequest) -> str:
        try:
            adapter_hash = load_adapter(original).content_hash()
        except AdapterError as e:
            raise RefineError(f"original adapter is broken: {e}", HTTPStatus.UNPROCESSABLE_ENTITY) from e
        return version_key(adapter_hash, self.base_model, request.config.to_dict(), request.calibration_sha256)

    def _enqueue(self, name: str, original: Path, request: RefineRequest, key: str) -> tuple[Any, bool]:
        spec = job_spec(
            base_model=self.base_model,
            adapter_path=original,
            config=request.fields,
            calibration=request.calibration,
            swap=request.swap,
        )
        try:
            return self.db.enqueue_job(
                name, "manual", spec, f"manual:{name}:{key}", max_attempts=self.max_attempts
            )
        except DatabaseError as e:
            raise RefineError(f"the job database is not available: {e}", HTTPStatus.SERVICE_UNAVAILABLE) from e

    async def refine(self, name: str, body: Any) -> tuple[int, dict[str, Any]]:
        """(status, answer) for one refine request; raises RefineError (or HotSwapError for bad or
        unknown names)."""
        original = await asyncio.to_thread(self.swapper._original, name)  # 400 / 404 before anything else
        try:
            traffic = None
            if self.traffic is not None:
                source = self.traffic

                def traffic(include_unrated: bool | None, since: float | None) -> tuple[Any, dict[str, Any]]:
                    return source(name, original, include_unrated, since)

            settings = self.swapper.settings
            request = await asyncio.to_thread(parse_request, body, settings.calibration_dir, traffic)
            key = await asyncio.to_thread(self._key, original, request)
            answer = await asyncio.to_thread(lookup, self.store, name, key)
            metrics.record_store_lookup(answer is not None, by="refine")
            if answer is None:
                if self.db is None:
                    raise RefineError(
                        "refinement jobs are not available on this server: its job database could not "
                        "be opened (see the server log)",
                        HTTPStatus.SERVICE_UNAVAILABLE,
                    )
                job, queued = await asyncio.to_thread(self._enqueue, name, original, request, key)
        except RefineError as e:
            metrics.record_refinement(name, "error")
            log.warning("refine %r refused: %s", name, e)
            raise
        except (CalibrationError, ConfigError, OverflowError, RecursionError) as e:
            metrics.record_refinement(name, "error")
            raise RefineError(str(e), HTTPStatus.BAD_REQUEST) from e

        if answer is None:
            metrics.record_refinement(name, "queued")
            log.info(
                "refine %r: job %d %s (%s examples)", name, job.id, "queued" if queued else "already queued",
                request.examples if request.examples is not None else "a file of",
            )  # fmt: skip
            return HTTPStatus.ACCEPTED, {
                "adapter": name,
                "job_id": job.id,
                "state": job.state,
                "queued": queued,
                "key": key,
                "examples": request.examples,
                "location": f"{JOBS_PATH}/{job.id}",
                "job": describe_job(job),
            }
        metrics.record_refinement(name, "cached")
        swapped, swap_error = False, None
        if answer["version"] is not None and request.swap:
            try:
                await self.swapper.swap(name, answer["version"])
                swapped = True
            except HotSwapError as e:
                swap_error = str(e)
        served_version = await asyncio.to_thread(self.swapper.version_of, name, self.swapper.served_path(name))
        return HTTPStatus.OK, {
            "adapter": name,
            **answer,
            "cached": True,
            "key": key,
            "swapped": swapped,
            "swap_error": swap_error,
            "served_version": served_version,
        }
