"""From recorded traffic to calibration data: the rules, the "adapter" calibration source of a job, and
the JSONL export that `vllm-surgery refine` reads. Used by the CLI (`vllm-surgery calibration export`),
the refine route (``{"from_traffic": true}``), the automatic jobs and the worker.

An adapter's calibration set is its recorded choices that are usable under their latest trusted
feedback (feedback from clients the operator does not trust is stored but never used: docs/security.md)
(the rule is `vllm_surgery.storage.usable`, written once for these records and for the database's
counts: corrections, completions rated ``good``, and unrated completions only where the operator opts
in: ``--include-unrated``, the refine body's ``include_unrated``, or the adapter's ``include_unrated``
setting; ``bad`` without a correction is never used). Why not unrated by default: an adapter's own
unreviewed output is a weak target; refining towards it mostly reinforces what the adapter already
does, including its mistakes. It can still help when most answers are right and the held-out check
guards the result. Then:

- the lines of the static calibration files the operator registered for the adapter
  (``traffic_adapters: {"X": {"calibration_files": [...]}}``, names in ``calibration_dir``);
- the adapter's own calibration sample, ``surgery_calibration.jsonl`` next to its
  adapter_config.json (`calibration.ADAPTER_CALIBRATION_NAME`), when it has one: what a first
  refinement can use before any traffic exists.

Each line exported from traffic carries ``"feedback"``: ``"correction"``, ``"good"`` or ``"unrated"``, so
that refine() can weigh corrections (its ``correction_weight`` setting); static lines keep their own.

Only text can be written as calibration: completions requests with a string prompt and chat requests
whose messages all have string contents, without echo or suffix (token-id prompts, multimodal
messages and empty answers are counted as ``not_text`` and left out).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..calibration import ADAPTER_CALIBRATION_NAME, check_record, read_jsonl
from ..errors import CalibrationError, SurgeryError
from ..names import InvalidAdapterName, path_under
from ..settings import ServingSettings
from ..storage import LEFT_OUT_KINDS, USABLE_KINDS, Database, usable_answer
from .policy import TrafficPolicy

# Each exported line says where it came from (calibration.FEEDBACK_LABELS): refine() weighs
# corrections by its correction_weight setting.
_FEEDBACK_LABEL = {"corrected": "correction", "good": "good", "unrated": "unrated"}
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass
class CalibrationFromTraffic:
    """The calibration records of one adapter and where they came from.

    With `keep` (the worker, which refines on them), `records` holds them; without it (the export,
    the refine route, the automatic jobs: they only need how many there are and their hash), nothing is
    kept: `count` and `sha256` are computed as they stream past, so a set of any size costs one page
    of records in memory. `sha256` is the hash the job spec records for inline records
    (worker.job_spec.records_sha256 of the same list: a test keeps them equal)."""

    adapter: str
    records: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys((*USABLE_KINDS, "static", "adapter_file", *LEFT_OUT_KINDS), 0)
    )
    keep: bool = True
    hashed: bool = True  # compute `sha256` (the export, which needs no hash, saves an encoding per line)
    count: int = 0
    _digest: Any = field(default_factory=hashlib.sha256, repr=False)

    def add(self, record: dict[str, Any]) -> None:
        """One more example of the set (kept only with `keep`)."""
        if self.hashed:
            self._digest.update((", " if self.count else "[").encode())
            self._digest.update(json.dumps(record, sort_keys=True).encode())
        self.count += 1
        if self.keep:
            self.records.append(record)

    @property
    def sha256(self) -> str:
        """SHA-256 of ``json.dumps(records, sort_keys=True)``, computed without holding the records.
        Raises ValueError for a set built without `hashed`."""
        if not self.hashed:
            raise ValueError("this calibration set was built without its hash (hashed=False)")
        digest = self._digest.copy()
        digest.update(b"]" if self.count else b"[]")
        return digest.hexdigest()

    def summary(self) -> str:
        c = self.counts
        return (
            f"{self.count} examples for {self.adapter!r}: {c['corrected']} corrected, {c['good']} rated "
            f"good, {c['unrated']} unrated, {c['static']} from static files, {c['adapter_file']} from the "
            f"adapter's own {ADAPTER_CALIBRATION_NAME}; left out: "
            f"{c['bad_without_correction']} bad without correction, {c['unrated_left_out']} unrated, "
            f"{c['not_text']} not text"
        )


def parse_since(text: str, now: float | None = None) -> float:
    """Unix time from '7d' / '12h' / '30m' / '90s' / '2w' (that long ago) or an ISO 8601 date or time
    ('2026-11-20', '2026-11-20T08:00:00+00:00'; without an offset: local time). Raises
    CalibrationError saying which forms are accepted."""
    text = text.strip()
    m = _RELATIVE.fullmatch(text)
    if m:
        return (time.time() if now is None else now) - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise CalibrationError(
            f"--since {text!r}: expected a duration like 7d, 12h, 30m, 90s, 2w, or an ISO 8601 date/time "
            "like 2026-11-20 or 2026-11-20T08:00:00+00:00"
        ) from None


def example_of(endpoint: str, prompt: Any, answer: str) -> dict[str, Any]:
    """The calibration line for a prompt (completions) or messages (chat) and its answer."""
    if endpoint == "chat":
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
        return {"messages": [*messages, {"role": "assistant", "content": answer}]}
    return {"prompt": prompt, "completion": answer}


def iter_traffic_examples(
    db: Any, adapter: str, counts: dict[str, int], since: float | None = None, include_unrated: bool = False
) -> Iterator[dict[str, Any]]:
    """The calibration lines of an adapter's records in `db` (a storage.Database) by the rules (module
    docstring), in id order, streamed (`Database.calibration_rows`: a page of rows in memory, whatever
    the set's size); `counts` gets every record's kind."""
    for _, endpoint, prompt, completion, calibratable, rating, correction in db.calibration_rows(
        adapter, since
    ):
        kind, answer = usable_answer(bool(calibratable), completion, rating, correction, include_unrated)
        counts[kind] += 1
        if answer is not None:
            prompt = None if prompt is None else json.loads(prompt)
            yield {**example_of(endpoint, prompt, answer), "feedback": _FEEDBACK_LABEL[kind]}


def traffic_examples(
    db: Any,
    adapter: str,
    since: float | None = None,
    include_unrated: bool = False,
    out: CalibrationFromTraffic | None = None,
) -> CalibrationFromTraffic:
    """Apply the rules (module docstring) to an adapter's records in `db` (a storage.Database)."""
    out = out or CalibrationFromTraffic(adapter)
    for example in iter_traffic_examples(db, adapter, out.counts, since, include_unrated):
        out.add(example)
    return out


def static_examples(
    files: Sequence[str | os.PathLike], out: CalibrationFromTraffic, kind: str = "static"
) -> CalibrationFromTraffic:
    """Append the lines of registered static calibration files (counted under `kind`), each checked
    here, where its file and line are still known. Raises CalibrationError (file, line, field)."""
    for path in files:
        records, _ = read_jsonl(path)
        for where, record in records:
            check_record(record, where)
        for _, record in records:
            out.add(record)
        out.counts[kind] += len(records)
    return out


def adapter_file(adapter_dir: str | os.PathLike | None) -> Path | None:
    """The adapter's own calibration sample (ADAPTER_CALIBRATION_NAME in its directory), if it has one."""
    if adapter_dir is None:
        return None
    path = Path(adapter_dir) / ADAPTER_CALIBRATION_NAME
    return path if path.is_file() else None


def calibration_set(
    db: Any,
    adapter: str,
    *,
    since: float | None = None,
    include_unrated: bool = False,
    static_files: Sequence[str | os.PathLike] = (),
    adapter_dir: str | os.PathLike | None = None,
    keep: bool = True,
) -> CalibrationFromTraffic:
    """An adapter's whole calibration set: traffic by the rules (none without a database), then its
    static files, then its own sample in `adapter_dir`. `keep`: hold the records (else only their
    count and hash: CalibrationFromTraffic). Raises CalibrationError (file, line)."""
    out = CalibrationFromTraffic(adapter, keep=keep)
    if db is not None:
        traffic_examples(db, adapter, since=since, include_unrated=include_unrated, out=out)
    static_examples(static_files, out)
    own = adapter_file(adapter_dir)
    return static_examples([own], out, "adapter_file") if own is not None else out


def export_calibration(
    db: Any,
    adapter: str,
    path: str | os.PathLike,
    *,
    since: float | None = None,
    include_unrated: bool = False,
    static_files: Sequence[str | os.PathLike] = (),
) -> CalibrationFromTraffic:
    """Write an adapter's calibration set (as `calibration_set` builds it) to `path` as JSONL while
    reading it: memory stays one page of records whatever the set's size. Atomic (a sibling
    temporary file renamed into place, readable by its owner only: recorded prompts are private); no
    file is left when the set is empty. Returns the counts (records not kept). Raises SurgeryError
    naming the file (cannot be written, or nothing to export), CalibrationError (a static file's
    line), DatabaseError."""
    out = CalibrationFromTraffic(adapter, keep=False, hashed=False)

    def lines() -> Iterator[dict[str, Any]]:
        if db is not None:
            for example in iter_traffic_examples(db, adapter, out.counts, since, include_unrated):
                out.add(example)
                yield example
        static = CalibrationFromTraffic(adapter)  # the operator's files: checked whole before a line goes
        static_examples(static_files, static)
        out.counts["static"] += static.counts["static"]
        for record in static.records:
            out.add(record)
            yield record

    written = write_jsonl(lines(), path, keep_empty=False)
    if written is None:
        raise SurgeryError(f"{path}: nothing to export: {out.summary()}")
    return out


def registered_files(calibration_dir: Path | None, names: Sequence[str], adapter: str) -> list[Path]:
    """The static files registered for an adapter, as paths under the calibration directory. Raises
    CalibrationError for a name that is not a plain file name there."""
    if names and calibration_dir is None:
        raise CalibrationError(
            f"adapter {adapter!r} registers calibration files but calibration_dir is not set"
        )
    out = []
    for name in names:
        try:
            out.append(path_under(calibration_dir, name))
        except InvalidAdapterName as e:
            raise CalibrationError(f"adapter {adapter!r}: calibration file {name!r}: {e}") from None
    return out


def adapter_source(
    *,
    include_unrated: bool,
    since: float | None,
    files: Sequence[str | os.PathLike],
    adapter_dir: str | os.PathLike | None,
) -> dict[str, Any]:
    """A job's "adapter" calibration source: the adapter's calibration set, built when the job runs."""
    return {
        "source": "adapter",
        "include_unrated": bool(include_unrated),
        "since": since,
        "files": [str(f) for f in files],
        "adapter_dir": str(adapter_dir) if adapter_dir is not None else None,
    }


def build_adapter_calibration(
    db: Database | None, adapter: str, source: Mapping[str, Any], keep: bool = True
) -> CalibrationFromTraffic:
    """The calibration set an "adapter" source names. `db`: the database with the adapter's traffic, or
    None; `keep`: hold the records (the worker), or only count and hash them. Raises CalibrationError
    (file, line) or DatabaseError."""
    return calibration_set(
        db,
        adapter,
        since=source.get("since"),
        include_unrated=bool(source.get("include_unrated")),
        static_files=[Path(f) for f in source.get("files") or ()],
        adapter_dir=source.get("adapter_dir"),
        keep=keep,
    )


class AdapterCalibration:
    """What the refine route and the automatic jobs call to learn an adapter's calibration set now:
    ``calibration(adapter, adapter_dir, include_unrated or None, since or None)`` gives the set (its
    counts and hash, not its records: they are streamed past, so a large set costs no memory here) and
    the job spec's "adapter" source that rebuilds it when the job runs.

    `db`: the server's database (traffic and jobs), or None (no traffic). `recorder`: the traffic
    recorder when this server records traffic; what it has queued is written first, so that what was
    answered before the call counts. Blocking (reads the database and the files)."""

    FLUSH_WAIT_S = 5.0

    def __init__(self, settings: ServingSettings, db: Database | None, recorder: Any = None) -> None:
        self.settings = settings
        self.db = db
        self.recorder = recorder
        self.policy: TrafficPolicy = recorder.policy if recorder is not None else TrafficPolicy(settings)

    def __call__(
        self, adapter: str, adapter_dir: Path | None, include_unrated: bool | None, since: float | None
    ) -> tuple[CalibrationFromTraffic, dict[str, Any]]:
        adapter_policy = self.policy.for_adapter(adapter)
        if include_unrated is None:
            include_unrated = adapter_policy.include_unrated
        files = registered_files(self.settings.calibration_dir, adapter_policy.calibration_files, adapter)
        source = adapter_source(
            include_unrated=include_unrated, since=since, files=files, adapter_dir=adapter_dir
        )
        if self.recorder is not None:
            self.recorder.flush(self.FLUSH_WAIT_S)
        return build_adapter_calibration(self.db, adapter, source, keep=False), source


def write_jsonl(
    records: Iterable[dict[str, Any]], path: str | os.PathLike, keep_empty: bool = True
) -> Path | None:
    """Write records as JSONL atomically (a sibling temporary file renamed into place, so no reader sees
    a half-written file), readable by its owner only (recorded prompts are private). `records` may be
    an iterator: each line is written as it comes. Without `keep_empty`, no records means no file
    (None). Raises SurgeryError naming the file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    written = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
            f.flush()
            os.fsync(f.fileno())
        if not written and not keep_empty:
            tmp.unlink()
            return None
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SurgeryError(f"{path}: cannot be written ({e.strerror or e})") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
