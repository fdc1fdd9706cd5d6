"""From recorded traffic to calibration data: the rules, and the JSONL export that `vllm-surgery refine`
reads. Used by the CLI (`vllm-surgery calibration export`), the refine route (``{"from_traffic": true}``)
and the background worker.

An adapter's calibration set is, per recorded choice and its LATEST feedback (the history is kept,
the latest wins):

- a correction: the correction is the answer (whatever the rating says: the user wrote what they
  wanted);
- rated ``good`` without a correction: the completion is the answer;
- rated ``bad`` without a correction: never used (we know the answer is wrong, not what is right);
- no feedback ("unrated"): used only when the operator opts in (``--include-unrated``, the refine body's
  ``include_unrated``, or the adapter's ``include_unrated`` setting). Why not by default: an adapter's
  own unreviewed output is a weak target; refining towards it mostly reinforces what the adapter
  already does, including its mistakes. It can still help when most answers are right and the
  held-out check guards the result;
- plus the lines of the static calibration files the operator registered for the adapter
  (``traffic_adapters: {"X": {"calibration_files": [...]}}``, names in ``calibration_dir``);
- plus the adapter's own calibration sample, ``surgery_calibration.jsonl`` next to its
  adapter_config.json (`calibration.ADAPTER_CALIBRATION_NAME`), when it has one: what a first
  refinement can use before any traffic exists.

Each line exported from traffic carries ``"feedback"``: ``"correction"``, ``"good"`` or ``"unrated"``, so
that refine() can weigh corrections (its ``correction_weight`` setting); static lines keep their own.

Only text can be written as calibration: completions requests with a string prompt and chat requests
whose messages all have string contents, without echo or suffix (token-id prompts, multimodal
messages and empty answers are counted as ``not_text`` and left out).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .calibration import ADAPTER_CALIBRATION_NAME, check_record, read_jsonl
from .errors import CalibrationError, SurgeryError

# Each exported line says where it came from (calibration.FEEDBACK_LABELS): refine() weighs
# corrections by its correction_weight setting.
_FEEDBACK_LABEL = {"corrected": "correction", "good": "good", "unrated": "unrated"}
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass
class CalibrationFromTraffic:
    """The calibration records of one adapter and where they came from."""

    adapter: str
    records: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            (
                "corrected",
                "good",
                "unrated",
                "static",
                "adapter_file",
                "bad_without_correction",
                "unrated_left_out",
                "not_text",
            ),
            0,
        )
    )

    def summary(self) -> str:
        c = self.counts
        return (
            f"{len(self.records)} examples for {self.adapter!r}: {c['corrected']} corrected, {c['good']} rated "
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


def traffic_examples(
    db: Any,
    adapter: str,
    since: float | None = None,
    include_unrated: bool = False,
    out: CalibrationFromTraffic | None = None,
) -> CalibrationFromTraffic:
    """Apply the rules (module docstring) to an adapter's records in `db` (a serving.database.Database)."""
    out = out or CalibrationFromTraffic(adapter)
    c = out.counts
    after = 0
    while batch := db.records(adapter, since=since, limit=1000, after_id=after):
        after = batch[-1].id
        for stored in batch:
            r = stored.record
            if stored.correction is not None:
                kind, answer = "corrected", stored.correction
            elif stored.rating == "good":
                kind, answer = "good", r.completion
            elif stored.rating == "bad":
                c["bad_without_correction"] += 1
                continue
            elif include_unrated:
                kind, answer = "unrated", r.completion
            else:
                if r.calibratable:
                    c["unrated_left_out"] += 1
                else:
                    c["not_text"] += 1
                continue
            if not r.calibratable or not answer.strip():
                c["not_text"] += 1
                continue
            c[kind] += 1
            out.records.append({**example_of(r.endpoint, r.prompt, answer), "feedback": _FEEDBACK_LABEL[kind]})
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
        out.records.extend(record for _, record in records)
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
) -> CalibrationFromTraffic:
    """An adapter's whole calibration set: traffic by the rules (none without a database), then its
    static files, then its own sample in `adapter_dir`. Raises CalibrationError (file, line)."""
    out = (
        traffic_examples(db, adapter, since=since, include_unrated=include_unrated)
        if db is not None
        else CalibrationFromTraffic(adapter)
    )
    static_examples(static_files, out)
    own = adapter_file(adapter_dir)
    return static_examples([own], out, "adapter_file") if own is not None else out


def registered_files(calibration_dir: Path | None, names: Sequence[str], adapter: str) -> list[Path]:
    """The static files registered for an adapter, as paths under the calibration directory. Raises
    CalibrationError for a name that is not a plain file name there."""
    from .serving.names import InvalidAdapterName, path_under

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


def write_jsonl(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write records as JSONL atomically (a sibling temporary file renamed into place, so no reader sees
    a half-written file). Raises SurgeryError naming the file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SurgeryError(f"{path}: cannot be written ({e.strerror or e})") from e
    return path
