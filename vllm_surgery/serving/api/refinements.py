"""`POST /v1/surgery/adapters/{name}/refine`: answered from the store, or queued as a job.

Body (`RefineBody`, a JSON object)::

    {"records": [{"prompt": ..., "completion": ...}, ...]}   inline calibration (JSONL line objects)
    {"calibration": "math.jsonl"}                             a file in VLLM_SURGERY_CALIBRATION_DIR
    {"from_traffic": true}                                    the adapter's calibration set: its recorded
      traffic and feedback, its registered files and its own surgery_calibration.jsonl, as they are
      when the job runs (+ optional "include_unrated": bool, "since": "7d" or an ISO time)
    + optional SurgeryConfig fields (settings.refine_setting_fields(): all but force, device and
      progress), policy defaulting to auto; their values are checked by SurgeryConfig itself
    + "swap": true (default): swap the version in when the gate accepts it

Answers:

- 200: the store already holds this exact refinement (same key: original adapter content, base model,
  result-affecting settings, calibration data): an accepted version (swapped in at once if asked) or a
  remembered keep_original. Nothing is computed.
- 202: queued (or already queued: the same request while its job is queued or running returns that
  job). ``{"job_id", "state", "queued": bool, "location": "/v1/surgery/jobs/ID", "job": {...}}``. A
  `vllm-surgery worker` computes it (see `vllm_surgery.worker`); the job routes (`jobs`) show its
  progress and figures.
- 400 bad body, config or calibration source (the message names the field; settings are checked by
  the worker's own `job_config`, bounds included, so a queued job never fails on them later); 404
  unknown adapter or calibration file; 409 no usable calibration example in the traffic; 422 broken
  original; 429 the adapter already has ``job_max_queued`` queued or running jobs (the message names
  the limit); 503 the job database cannot be used.

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
import typing
from dataclasses import dataclass, fields
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field, SkipValidation, create_model, model_validator

from ...adapter import load_adapter
from ...calibration import check_record
from ...config import SurgeryConfig
from ...errors import AdapterError, CalibrationError, ConfigError, SurgeryError
from ...names import InvalidAdapterName, path_under
from ...settings import refine_setting_fields
from ...storage import Database, DatabaseError, JobQueueFull, version_key
from ...traffic import AdapterCalibration, CalibrationFromTraffic, parse_since
from ...worker import DEFAULT_JOB_POLICY, job_config, job_spec, records_sha256
from .. import metrics
from ..hotswap import HotSwapError, HotSwapper
from .http import (
    LARGE_BODY_BYTES,
    BodyError,
    RequestBody,
    RequestError,
    answer_4xx,
    bounded,
    error_response,
    json_object_body,
    openapi_body,
    validated,
)
from .jobs import JOBS_PATH, describe_job
from .state import REFINER_KEY, state_object

log = logging.getLogger(f"vllm.{__name__}")

router = APIRouter(prefix="/v1/surgery", tags=["vllm-surgery: jobs"])

CONFIG_FIELDS = frozenset(refine_setting_fields())
TRAFFIC_FIELDS = frozenset({"include_unrated", "since"})
SOURCE_FIELDS = ("records", "calibration", "from_traffic")
SOURCES_HELP = (
    "give calibration data as exactly one of 'records' (a list of JSONL line objects), "
    "'calibration' (a file name in the calibration directory) or 'from_traffic': true"
)


def _config_fields() -> dict[str, Any]:
    """The refine settings a body may carry, typed as SurgeryConfig declares them (for the schema; the
    values are checked by SurgeryConfig itself, whose messages name the field)."""
    hints = typing.get_type_hints(SurgeryConfig)
    out: dict[str, Any] = {}
    for f in fields(SurgeryConfig):
        if f.name in CONFIG_FIELDS:
            help_text = f.metadata.get("help", "")
            out[f.name] = (
                Annotated[hints[f.name] | None, SkipValidation],
                Field(None, description=help_text),
            )
    return out


class _RefineBodyChecks(RequestBody):
    """What a refine body must look like beyond its settings' values (messages name the field)."""

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, body: Any) -> Any:
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        allowed = set(cls.model_fields)
        unknown = sorted(set(body) - allowed - {"force"})
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")
        if "force" in body:
            raise ValueError(
                "'force' is not available here: a queued refinement is swapped in only when the gate "
                "accepts it; write a forced version with `vllm-surgery refine --force` and swap it in by hand"
            )
        if not isinstance(body.get("swap", True), bool):
            raise ValueError("'swap' must be true or false")
        return body

    def source_errors(self) -> str | None:
        """Why the calibration source is unusable (checked after the settings), or None."""
        given = self.model_fields_set
        if sum(k in given for k in SOURCE_FIELDS) != 1:
            return SOURCES_HELP
        if "from_traffic" in given:
            if self.from_traffic is not True:
                return "'from_traffic' must be true"
            if self.include_unrated is not None and not isinstance(self.include_unrated, bool):
                return "'include_unrated' must be true or false"
            if self.since is not None and not isinstance(self.since, str):
                return "'since' must be a string such as \"7d\" or an ISO 8601 time"
            return None
        if TRAFFIC_FIELDS & given:
            return f"{sorted(TRAFFIC_FIELDS & given)} only go with 'from_traffic'"
        if "records" in given and (not isinstance(self.records, list) or not self.records):
            return "'records' must be a non-empty list of objects"
        return None


RefineBody = create_model(
    "RefineBody",
    __base__=_RefineBodyChecks,
    __doc__="Refine an adapter: calibration data (exactly one source) and refine settings.",
    records=(
        Annotated[list[dict[str, Any]] | None, SkipValidation],
        Field(None, description="inline calibration examples: JSONL line objects"),
    ),
    calibration=(
        Annotated[str | None, SkipValidation],
        Field(None, description="a file name in the server's calibration directory"),
    ),
    from_traffic=(
        Annotated[bool | None, SkipValidation],
        Field(None, description="true: the adapter's calibration set (traffic, registered files, its own)"),
    ),
    include_unrated=(
        Annotated[bool | None, SkipValidation],
        Field(None, description="with from_traffic: also completions nobody rated"),
    ),
    since=(
        Annotated[str | None, SkipValidation],
        Field(None, description='with from_traffic: only traffic since "7d", "12h" or an ISO 8601 time'),
    ),
    swap=(bool, Field(True, description="swap the version in when the gate accepts it")),
    **_config_fields(),
)
# Fields the route lets through to the checks above ('force' is refused there, by name).
BODY_FIELDS = frozenset(RefineBody.model_fields) | {"force"}


class RefineError(RequestError, SurgeryError):
    """A refinement request that was refused or failed; `status` is the HTTP status to answer."""


@dataclass(frozen=True)
class RefineRequest:
    config: Any  # SurgeryConfig
    fields: dict[str, Any]  # the request's config fields, as the job spec stores them
    calibration: dict[str, Any]  # the job spec's calibration source
    calibration_sha256: str
    examples: int | None  # known at request time (records, traffic), or None (a file)
    swap: bool


# (include_unrated or None, since or None) -> (the calibration set, the job spec's "adapter" source)
FromTraffic = typing.Callable[[bool | None, float | None], tuple[CalibrationFromTraffic, dict[str, Any]]]


def parse_request(
    body: Any, calibration_dir: Path | None, from_traffic: FromTraffic | None = None
) -> RefineRequest:
    """Validate a refine body (a `RefineBody` or its JSON; blocking: may hash a calibration file or read
    the traffic database). `from_traffic(include_unrated, since)` gives the adapter's calibration set
    and its source spec. Raises RefineError (400/404; 409 when the traffic holds no usable example)."""
    if not isinstance(body, RefineBody):
        try:
            body = validated(RefineBody, body)
        except BodyError as e:
            raise RefineError(str(e), HTTPStatus.BAD_REQUEST) from None
    given = body.model_fields_set
    fields = {"policy": DEFAULT_JOB_POLICY, **{k: getattr(body, k) for k in sorted(given & CONFIG_FIELDS)}}
    try:  # the worker's own check of the job's settings (job_config), so that it cannot fail later
        config = job_config(fields, progress=False)
    except ConfigError as e:
        message = str(e) if str(e).startswith("invalid settings") else f"invalid settings: {e}"
        raise RefineError(message, HTTPStatus.BAD_REQUEST) from e

    problem = body.source_errors()
    if problem is not None:
        raise RefineError(problem, HTTPStatus.BAD_REQUEST)
    if "from_traffic" in given:
        return _traffic_request(body, config, fields, from_traffic)
    if "records" in given:
        records = body.records
        try:  # shapes now, naming the record; tokens when the job runs
            for i, record in enumerate(records):
                check_record(record, f"record {i}")
        except CalibrationError as e:
            raise RefineError(str(e), HTTPStatus.BAD_REQUEST) from e
        digest = records_sha256(records)
        source = {"source": "records", "records": records, "sha256": digest}
        return RefineRequest(config, fields, source, digest, len(records), body.swap)

    file_name = body.calibration
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
    source = {"source": "file", "name": file_name, "path": str(path), "sha256": digest}
    return RefineRequest(config, fields, source, digest, None, body.swap)


def _traffic_request(
    body: Any, config: Any, fields: dict[str, Any], from_traffic: FromTraffic | None
) -> RefineRequest:
    if from_traffic is None:
        raise RefineError("this server cannot read recorded traffic", HTTPStatus.BAD_REQUEST)
    try:
        since = None if body.since is None else parse_since(body.since)
        data, source = from_traffic(body.include_unrated, since)
    except CalibrationError as e:
        raise RefineError(str(e), HTTPStatus.BAD_REQUEST) from e
    except SurgeryError as e:
        raise RefineError(str(e), HTTPStatus.CONFLICT) from e
    if not data.count:
        raise RefineError(
            f"no usable calibration examples in the traffic: {data.summary()}", HTTPStatus.CONFLICT
        )
    log.info("refine from traffic: %s", data.summary())
    return RefineRequest(config, fields, source, data.sha256, data.count, body.swap)


class RefineRoute:
    """Answers the refine requests of one API server from the store, or queues them as jobs (module
    docstring). `db`: the job database, or None when it could not be opened (then only store hits are
    answered; everything else is 503). `calibration`: the adapters' calibration sets (traffic and
    files), or None when this server has none to offer."""

    def __init__(
        self,
        swapper: HotSwapper,
        base_model: str,
        db: Database | None,
        calibration: AdapterCalibration | None = None,
    ) -> None:
        self.swapper = swapper
        self.store = swapper.store
        self.base_model = str(base_model)
        self.db = db
        self.calibration = calibration
        self.calibration_dir = swapper.settings.calibration_dir
        self.max_attempts = swapper.settings.job_max_attempts
        self.max_queued = swapper.settings.job_max_queued

    def key(self, original: Path, request: RefineRequest) -> str:
        """The store key of `request` for the original at `original`. Raises RefineError (422) for a
        broken original."""
        try:
            adapter_hash = load_adapter(original).content_hash()
        except AdapterError as e:
            raise RefineError(f"original adapter is broken: {e}", HTTPStatus.UNPROCESSABLE_ENTITY) from e
        return version_key(
            adapter_hash, self.base_model, request.config.to_dict(), request.calibration_sha256
        )

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
                name,
                "manual",
                spec,
                f"manual:{name}:{key}",
                max_attempts=self.max_attempts,
                max_queued=self.max_queued,
            )
        except JobQueueFull as e:
            raise RefineError(str(e), HTTPStatus.TOO_MANY_REQUESTS) from e
        except DatabaseError as e:
            raise RefineError(
                f"the job database is not available: {e}", HTTPStatus.SERVICE_UNAVAILABLE
            ) from e

    async def refine(self, name: str, body: Any) -> tuple[int, dict[str, Any]]:
        """(status, answer) for one refine request; raises RefineError (or HotSwapError for bad or
        unknown names)."""
        original = await asyncio.to_thread(self.swapper.original_of, name)  # 400 / 404 before anything else
        try:
            traffic = None
            if self.calibration is not None:
                calibration = self.calibration

                def traffic(include_unrated: bool | None, since: float | None) -> tuple[Any, dict[str, Any]]:
                    return calibration(name, original, include_unrated, since)

            request = await asyncio.to_thread(parse_request, body, self.calibration_dir, traffic)
            key = await asyncio.to_thread(self.key, original, request)
            answer = await asyncio.to_thread(self.store.lookup, name, key)
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
            log.warning("refine %r refused: %s", name, bounded(str(e)))
            raise
        except (CalibrationError, ConfigError, OverflowError, RecursionError) as e:
            metrics.record_refinement(name, "error")
            raise RefineError(str(e), HTTPStatus.BAD_REQUEST) from e

        if answer is None:
            metrics.record_refinement(name, "queued")
            log.info(
                "refine %r: job %d %s (%s examples)",
                name,
                job.id,
                "queued" if queued else "already queued",
                request.examples if request.examples is not None else "a file of",
            )
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
        served_version = await asyncio.to_thread(
            self.swapper.version_of, name, self.swapper.served_path(name)
        )
        return HTTPStatus.OK, {
            "adapter": name,
            **answer,
            "cached": True,
            "key": key,
            "swapped": swapped,
            "swap_error": swap_error,
            "served_version": served_version,
        }


@router.post("/adapters/{name}/refine", openapi_extra=openapi_body(RefineBody))
@answer_4xx
async def refine(name: str, raw_request: Request) -> Any:
    route: RefineRoute = state_object(raw_request, REFINER_KEY, "refine")
    body = await json_object_body(
        raw_request, LARGE_BODY_BYTES, allowed=BODY_FIELDS, example='{"records": [...]}'
    )
    try:
        status, answer = await route.refine(name, body)
    except RefineError as e:
        if e.status != HTTPStatus.TOO_MANY_REQUESTS:
            raise
        return error_response(str(e), e.status, "TooManyRequests")
    headers = {"Location": answer["location"]} if "location" in answer else None
    return JSONResponse(answer, status_code=int(status), headers=headers)
