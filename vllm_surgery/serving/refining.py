"""Refinement inside the API server: `POST /v1/surgery/adapters/{name}/refine`.

Body (JSON object)::

    {"records": [{"prompt": ..., "completion": ...}, ...]}   inline calibration (JSONL line objects)
    {"calibration": "math.jsonl"}                             a file in VLLM_SURGERY_CALIBRATION_DIR
    {"from_traffic": true}                                    the adapter's recorded traffic and feedback
      (+ optional "include_unrated": bool, "since": "7d" or an ISO time; see traffic_calibration)
    + optional SurgeryConfig fields: policy, policy_params, constraint, modules, layers,
      heldout_fraction, min_improvement, max_false_accept, samples, max_length, max_batch_tokens, seed, force
    + "swap": true (default): hot-swap a written version (accept, or forced) in at once

Design:

- Store first. The request's key (`store.version_key`) is computed from the original adapter's
  content hash, the server's --model string, the result-affecting config fields and the calibration
  SHA-256; a version (or a remembered keep_original) with that key answers at once ("cached"),
  without the refinement lock, even while another refinement runs. A remembered keep_original does
  not answer a forced request; a forced version answers a non-forced request as keep_original.
- One refinement at a time per server: a request that needs computing while another one runs gets
  409 at once (no queueing: a synchronous request may take minutes, and a queue would hold HTTP
  connections and hide the load; clients retry). It runs in a worker thread, so the event loop keeps
  serving completions meanwhile.
- The base model is the server's --model directory, loaded once (lazily, on the first refinement)
  with transformers on the refinement device ("auto": CUDA if present) and reused; refine() leaves it
  unmodified. That copy stays in the API-server process's memory for the life of the server.
- Output goes to `store.new_version_dir(name)`; when nothing is written (keep_original) or anything
  fails, that directory is removed, so only complete versions remain. A failure never touches the
  served version: 400 (bad body, config or calibration; the message names the record or line),
  404 (unknown adapter or calibration file), 409 (busy), 422 (broken original), 500 (anything else).
- Adapters given with --lora-modules are originals too (refinable and swappable); adapters loaded at
  run time through vLLM's /v1/load_lora_adapter are not: 404.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import Any

from ..adapter import load_adapter
from ..errors import AdapterError, CalibrationError, ConfigError, SurgeryError
from . import metrics
from .hotswap import HotSwapError, HotSwapper
from .names import InvalidAdapterName, path_under
from .store import KEY_CONFIG_FIELDS, VersionInfo, version_key

log = logging.getLogger(f"vllm.{__name__}")

CONFIG_FIELDS = frozenset({*KEY_CONFIG_FIELDS, "max_batch_tokens", "force"})
TRAFFIC_FIELDS = frozenset({"include_unrated", "since"})
BODY_FIELDS = frozenset({"records", "calibration", "from_traffic", "swap"}) | TRAFFIC_FIELDS | CONFIG_FIELDS


class RefineError(SurgeryError):
    """A refinement request that was refused or failed; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = int(status)


@dataclass(frozen=True)
class RefineRequest:
    config: Any  # SurgeryConfig
    calibration: list[dict[str, Any]] | Path
    calibration_sha256: str
    swap: bool


def records_sha256(records: list[Any]) -> str:
    """The SHA-256 that load_calibration() records for inline records (kept equal by a unit test)."""
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()


def parse_request(
    body: Any, calibration_dir: Path | None, from_traffic: Callable[[bool | None, float | None], Any] | None = None
) -> RefineRequest:
    """Validate a refine body (blocking: may hash a calibration file or read the traffic database).
    `from_traffic(include_unrated, since)` builds the adapter's calibration set from its traffic.
    Raises RefineError (400/404; 409 when the traffic holds no usable example)."""
    from ..config import SurgeryConfig

    if not isinstance(body, dict):
        raise RefineError("body must be a JSON object", HTTPStatus.BAD_REQUEST)
    unknown = sorted(set(body) - BODY_FIELDS)
    if unknown:
        raise RefineError(
            f"unknown field(s) {unknown}; allowed: {sorted(BODY_FIELDS)}", HTTPStatus.BAD_REQUEST
        )
    swap = body.get("swap", True)
    if not isinstance(swap, bool):
        raise RefineError("'swap' must be true or false", HTTPStatus.BAD_REQUEST)
    fields = {k: v for k, v in body.items() if k in CONFIG_FIELDS}
    if isinstance(fields.get("layers"), list):
        fields["layers"] = tuple(fields["layers"])
    try:
        config = SurgeryConfig(**fields, progress=False)
    except (ConfigError, TypeError, ValueError, OverflowError) as e:
        raise RefineError(f"invalid settings: {e}", HTTPStatus.BAD_REQUEST) from e

    if sum(k in body for k in ("records", "calibration", "from_traffic")) != 1:
        raise RefineError(
            "give calibration data as exactly one of 'records' (a list of JSONL line objects), "
            "'calibration' (a file name in the calibration directory) or 'from_traffic': true",
            HTTPStatus.BAD_REQUEST,
        )
    if "from_traffic" in body:
        return _traffic_request(body, config, swap, from_traffic)
    if TRAFFIC_FIELDS & set(body):
        raise RefineError(f"{sorted(TRAFFIC_FIELDS & set(body))} only go with 'from_traffic'", 400)
    if "records" in body:
        records = body["records"]
        if not isinstance(records, list) or not records:
            raise RefineError("'records' must be a non-empty list of objects", HTTPStatus.BAD_REQUEST)
        return RefineRequest(config, records, records_sha256(records), swap)

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
    return RefineRequest(config, path, digest, swap)


def _traffic_request(
    body: dict[str, Any], config: Any, swap: bool, from_traffic: Callable[[bool | None, float | None], Any] | None
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
        data = from_traffic(include_unrated, None if since is None else parse_since(since))
    except CalibrationError as e:
        raise RefineError(str(e), HTTPStatus.BAD_REQUEST) from e
    except SurgeryError as e:
        raise RefineError(str(e), HTTPStatus.CONFLICT) from e
    if not data.records:
        raise RefineError(f"no usable calibration examples in the traffic: {data.summary()}", HTTPStatus.CONFLICT)
    log.info("refine from traffic: %s", data.summary())
    return RefineRequest(config, data.records, records_sha256(data.records), swap)


def _quality(q: Any) -> dict[str, Any] | None:
    if q is None:
        return None
    return q if isinstance(q, dict) else q.to_dict()


class Refiner:
    """Runs refinements for one API server; see the module docstring."""

    def __init__(self, swapper: HotSwapper, base_model: str) -> None:
        self.swapper = swapper
        self.store = swapper.store
        self.base_model = str(base_model)
        self.lock = asyncio.Lock()
        self._model: tuple[Any, Any] | None = None
        # (adapter, include_unrated, since) -> CalibrationFromTraffic; set by the plugin (traffic_api)
        self.traffic: Callable[..., Any] | None = None

    # ------------------------------------------------------------------ blocking helpers (threads)
    def _model_and_tokenizer(self) -> tuple[Any, Any]:
        if self._model is None:
            from ..refine import load_base_model, resolve_device

            t = time.perf_counter()
            self._model = load_base_model(self.base_model, resolve_device("auto"), progress=False)
            log.info("refine: loaded base model %s in %.1f s", self.base_model, time.perf_counter() - t)
        return self._model

    def _key(self, original: Path, request: RefineRequest) -> str:
        try:
            adapter_hash = load_adapter(original).content_hash()
        except AdapterError as e:
            raise RefineError(f"original adapter is broken: {e}", HTTPStatus.UNPROCESSABLE_ENTITY) from e
        return version_key(
            adapter_hash, self.base_model, request.config.to_dict(), request.calibration_sha256
        )

    def _lookup(self, name: str, key: str, force: bool) -> dict[str, Any] | None:
        """A stored answer for `key`, shaped like a computed one, or None (a miss)."""
        matches = [v for v in self.store.versions(name) if v.key == key and v.servable]
        accepted = [v for v in matches if v.decision == "accept"]
        info: VersionInfo | None = (accepted or matches or [None])[-1]
        if info is not None:
            record = dict(info.record or {})
            if info.decision == "forced" and not force:
                # The same non-forced request would have written nothing: answer keep_original.
                return self._answer(record, "keep_original", None)
            return self._answer(record, info.decision, info.version_id)
        remembered = self.store.recall(name, key)
        if remembered is not None and not force:
            return self._answer(remembered, "keep_original", None)
        return None

    @staticmethod
    def _answer(record: Mapping[str, Any], decision: str | None, version: str | None) -> dict[str, Any]:
        return {
            "decision": decision,
            "reason": record.get("reason"),
            "policy": record.get("policy"),
            "quality_before": _quality(record.get("quality_before")),
            "quality_after": _quality(record.get("quality_after")),
            "version": version,
            "timings": record.get("timings") or {},
        }

    def _compute(self, name: str, original: Path, request: RefineRequest, key: str) -> dict[str, Any]:
        from ..refine import refine

        # The writer lock tells start-up cleaning of a server sharing this store that the reserved
        # directory below is being filled, not left behind by a killed process.
        with self.store.writer_lock(name):
            out_dir = self.store.new_version_dir(name)
            try:
                model, tokenizer = self._model_and_tokenizer()
                result = refine(
                    self.base_model, original, request.calibration, out_dir, request.config,
                    model=model, tokenizer=tokenizer,
                )  # fmt: skip
            except BaseException:
                shutil.rmtree(out_dir, ignore_errors=True)
                raise
        record = result.to_dict()
        if not result.written:
            shutil.rmtree(out_dir, ignore_errors=True)
            if result.decision == "keep_original":
                try:
                    self.store.remember(name, key, record)
                except (OSError, ValueError) as e:
                    log.error("refine %r: could not remember the keep_original outcome: %s", name, e)
            return self._answer(record, result.decision, None)
        return self._answer(record, result.decision, out_dir.name)

    # ------------------------------------------------------------------ the request
    async def refine(self, name: str, body: Any) -> dict[str, Any]:
        """Answer one refine request; raises RefineError (or HotSwapError for bad/unknown names)."""
        original = await asyncio.to_thread(self.swapper._original, name)  # 400 / 404 before anything else
        known = name
        try:
            traffic = partial(self.traffic, name) if self.traffic is not None else None
            request = await asyncio.to_thread(parse_request, body, self.swapper.settings.calibration_dir, traffic)
            key = await asyncio.to_thread(self._key, original, request)
            answer = await asyncio.to_thread(self._lookup, name, key, request.config.force)
            metrics.record_store_lookup(answer is not None, by="refine")
            cached = answer is not None
            if answer is None:
                if self.lock.locked():
                    raise RefineError(
                        "another refinement is running on this server; retry when it is done",
                        HTTPStatus.CONFLICT,
                    )
                async with self.lock:
                    answer = await asyncio.to_thread(self._compute, name, original, request, key)
        except RefineError as e:
            metrics.record_refinement(known, "error")
            log.warning("refine %r refused: %s", name, e)
            raise
        except (CalibrationError, ConfigError, OverflowError, RecursionError) as e:
            metrics.record_refinement(known, "error")
            log.warning("refine %r failed: %s", name, e)
            raise RefineError(str(e), HTTPStatus.BAD_REQUEST) from e
        except AdapterError as e:
            metrics.record_refinement(known, "error")
            raise RefineError(str(e), HTTPStatus.UNPROCESSABLE_ENTITY) from e
        except Exception as e:
            metrics.record_refinement(known, "error")
            log.exception("refine %r failed", name)
            raise RefineError(f"refinement failed: {type(e).__name__}: {e}", 500) from e

        if cached:
            metrics.record_refinement(name, "cached")
        else:
            metrics.record_refinement(name, answer["decision"], answer["timings"])
        swapped, swap_error = False, None
        if answer["version"] is not None and request.swap:
            try:
                await self.swapper.swap(name, answer["version"])
                swapped = True
            except HotSwapError as e:
                swap_error = str(e)
        served_version = await asyncio.to_thread(self.swapper.version_of, name, self.swapper.served_path(name))
        return {
            "adapter": name,
            **answer,
            "cached": cached,
            "key": key,
            "swapped": swapped,
            "swap_error": swap_error,
            "served_version": served_version,
        }
