"""Redaction before anything is stored: the built-in hook (e-mail addresses and long digit runs), none,
or an operator's own `package.module:function`.

The built-in hook covers every string a record stores, at any depth: the prompt (or every field of
every message), the completion, and the sampling settings with whatever extra fields the client
sent (`user`, `stop`, `metadata`, keys included). Identifiers (the client's X-Request-Id and the
response id that contains it) cannot simply be rewritten: feedback finds a record by them, and two
ids redacted to the same text would be confused. An identifier that the redaction would change is
stored as a pseudonym instead (`pseudonym`: a keyed hash, the key kept in the database), and the
feedback route looks an id up both as given and as its pseudonym. All of it runs in the writer
thread (or, for a correction, in a worker thread of the feedback route), never on the event loop.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, fields, replace
from typing import Any

from ..settings import SettingsError
from ..storage import TrafficRecord

# The local part may only start where no local-part character precedes it (the lookbehind): without it,
# a long run of letters with no "@" is scanned again from every one of its positions, quadratic time
# (48,000 letters took 4.9 s, holding the GIL). With it, each run is scanned once: linear in the text.
EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# 7 or more digits, possibly grouped by single spaces, dashes or dots: phone, card, account and ID
# numbers. Shorter numbers (amounts, years, arithmetic) are kept.
DIGIT_RUN = re.compile(r"(?<!\d)\d(?:[ .-]?\d){6,}(?!\d)")
EMAIL_MARK, NUMBER_MARK = "[EMAIL]", "[NUMBER]"

Redaction = Callable[[dict[str, Any]], "dict[str, Any] | None"]


def redact_text(text: str) -> str:
    """E-mail addresses and long digit runs replaced by [EMAIL] and [NUMBER]."""
    return DIGIT_RUN.sub(NUMBER_MARK, EMAIL.sub(EMAIL_MARK, text))


def redact_value(value: Any) -> Any:
    """`value` with `redact_text` applied to every string in it, at any depth (dict keys too): the
    same object where nothing changes, so a clean record is not copied."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        items = [(redact_value(k), redact_value(v)) for k, v in value.items()]
        unchanged = all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(items, value.items(), strict=True))
        return value if unchanged else dict(items)
    if isinstance(value, (list, tuple)):
        out = [redact_value(v) for v in value]
        return value if all(a is b for a, b in zip(out, value, strict=True)) else type(value)(out)
    return value


# The fields the built-in hook rewrites: every field a client's text reaches, but the identifiers
# (pseudonymised instead, see the module docstring). adapter, version, endpoint, served_path and
# finish_reason are the server's own words.
_TEXT_FIELDS = ("prompt", "completion", "sampling")
_ID_FIELDS = ("request_id", "response_id")


def builtin_redaction(record: dict[str, Any]) -> dict[str, Any]:
    """The built-in redaction hook: e-mail addresses and runs of 7+ digits in every string of the
    prompt (or the messages), the completion and the sampling settings (every extra field the client
    sent) become [EMAIL] / [NUMBER]; identifiers holding them are pseudonymised by the caller."""
    return {**record, **{k: redact_value(record.get(k)) for k in _TEXT_FIELDS}}


def pseudonym(secret: bytes, identifier: str) -> str:
    """A stable stand-in for an identifier that holds personal data: the same for the same id and
    database, never the id itself, and not reversible without the database's secret."""
    return "pseudonym-" + hmac.new(secret, identifier.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def load_redaction(spec: str) -> Redaction | None:
    """'builtin', 'none' (None: nothing is changed) or 'package.module:function' (or
    'package.module.function'). Raises SettingsError naming VLLM_SURGERY_TRAFFIC_REDACT."""
    spec = spec.strip()
    if spec == "builtin":
        return builtin_redaction
    if spec == "none":
        return None
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    where = f"VLLM_SURGERY_TRAFFIC_REDACT={spec!r}"
    if not module_name or not attr:
        raise SettingsError(f"{where}: expected 'builtin', 'none' or 'package.module:function'")
    try:
        hook = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise SettingsError(f"{where}: cannot be imported ({type(e).__name__}: {e})") from e
    if not callable(hook):
        raise SettingsError(f"{where}: {attr!r} is not callable")
    return hook


_RECORD_FIELDS = frozenset(f.name for f in fields(TrafficRecord))


def apply_redaction(
    hook: Redaction | None, record: TrafficRecord, secret: bytes | None = None
) -> TrafficRecord | None:
    """`record` as the hook rewrote it, or None if the hook dropped it. With `secret` (the database's),
    an identifier the hook changed (or, for the built-in hook, one it would change) is stored as its
    `pseudonym`; without, identifiers are kept as they are (ids the server generated: no client data
    in them, and a generated hex id often holds 7 digits in a row). Raises ValueError for a hook that raises or returns something other than a record
    dict (the caller drops the record: storing it unredacted is never the fallback)."""
    if hook is None:
        return record
    if hook is builtin_redaction:  # the same result without copying the record into a dict and back
        changes = {k: redact_value(getattr(record, k)) for k in _TEXT_FIELDS}
        ids = {k: (v, redact_text(v)) for k in _ID_FIELDS if isinstance(v := getattr(record, k), str)}
    else:
        try:
            out = hook(asdict(record))
        except Exception as e:
            raise ValueError(f"the redaction hook raised {type(e).__name__}: {e}") from e
        if out is None:
            return None
        if (
            not isinstance(out, Mapping)
            or set(out) - _RECORD_FIELDS
            or not isinstance(out.get("completion"), str)
        ):
            raise ValueError(
                f"redaction hook returned {type(out).__name__}, not a record dict with a string completion"
            )
        changes = {k: v for k, v in out.items() if k in _RECORD_FIELDS and k not in _ID_FIELDS}
        ids = {k: (v, out.get(k, v)) for k in _ID_FIELDS if isinstance(v := getattr(record, k), str)}
    for name, (given, redacted) in ids.items():
        if redacted != given and secret is not None:
            changes[name] = pseudonym(secret, given)
    return replace(record, **changes)
