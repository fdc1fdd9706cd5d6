"""Redaction before anything is stored: the built-in hook (e-mail addresses and long digit runs), none,
or an operator's own `package.module:function`."""

from __future__ import annotations

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


def _redact_prompt(prompt: Any) -> Any:
    if isinstance(prompt, str):
        return redact_text(prompt)
    if isinstance(prompt, list):  # chat messages (token id prompts hold no text)
        out = []
        for m in prompt:
            if isinstance(m, dict) and isinstance(m.get("content"), str):
                m = {**m, "content": redact_text(m["content"])}
            elif isinstance(m, dict) and isinstance(m.get("content"), list):
                parts = [
                    {**p, "text": redact_text(p["text"])}
                    if isinstance(p, dict) and isinstance(p.get("text"), str)
                    else p
                    for p in m["content"]
                ]
                m = {**m, "content": parts}
            out.append(m)
        return out
    return prompt


def builtin_redaction(record: dict[str, Any]) -> dict[str, Any]:
    """The built-in redaction hook: e-mail addresses and runs of 7+ digits in the prompt (or the
    messages) and the completion become [EMAIL] / [NUMBER]."""
    return {
        **record,
        "prompt": _redact_prompt(record.get("prompt")),
        "completion": redact_text(record["completion"]),
    }


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


def apply_redaction(hook: Redaction | None, record: TrafficRecord) -> TrafficRecord | None:
    """`record` as the hook rewrote it, or None if the hook dropped it. A hook that raises or returns
    something other than a record dict raises ValueError (the caller drops the record: storing it
    unredacted is never the fallback)."""
    if hook is None:
        return record
    if hook is builtin_redaction:  # the same result without copying the record into a dict and back
        return replace(
            record, prompt=_redact_prompt(record.prompt), completion=redact_text(record.completion)
        )
    out = hook(asdict(record))
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
    return replace(record, **{k: v for k, v in out.items() if k in _RECORD_FIELDS})
