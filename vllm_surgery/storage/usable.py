"""Which recorded choices are usable calibration examples: the rule, written once for the records
(`usable_answer`, which `vllm_surgery.traffic.calibration_set` applies when it builds the examples) and
once in SQL for the counts the database gives (`TrafficStats.usable`, the automatic jobs' new-data
trigger). tests/serving/test_traffic_db.py checks on a mix of every case that the SQL counts equal the
export.

Only TRUSTED feedback counts (the ``trusted`` column: given by a reviewer, or by any API-key holder
where the operator chose ``feedback_trust = "api-key"``; see docs/security.md): feedback from other
clients is stored and shown, but a record whose only feedback is untrusted is, for calibration, a
record without feedback. Per recorded choice and its LATEST TRUSTED feedback:

- a correction: the correction is the answer (whatever the rating says);
- rated ``good`` without a correction: the completion is the answer;
- rated ``bad`` without a correction: never used;
- no feedback ("unrated"): the completion, only where unrated completions are included;

and the answer is usable only when the record is `calibratable` (text a calibration file can hold)
and the answer is not blank (only spaces, tabs and line breaks: `WHITESPACE`).
"""

from __future__ import annotations

WHITESPACE = " \t\n\r"

# Kinds of a record for the calibration set: usable ones, then why a record is left out.
USABLE_KINDS = ("corrected", "good", "unrated")
LEFT_OUT_KINDS = ("bad_without_correction", "unrated_left_out", "not_text")


def usable_answer(
    calibratable: bool, completion: str, rating: str | None, correction: str | None, include_unrated: bool
) -> tuple[str, str | None]:
    """(kind, answer) of one recorded choice under its latest feedback (module docstring): the answer
    for a kind of USABLE_KINDS, None for a kind of LEFT_OUT_KINDS."""
    if correction is not None:
        kind, answer = "corrected", correction
    elif rating == "good":
        kind, answer = "good", completion
    elif rating == "bad":
        return "bad_without_correction", None
    elif include_unrated:
        kind, answer = "unrated", completion
    else:
        return ("unrated_left_out" if calibratable else "not_text"), None
    if not calibratable or not answer.strip(WHITESPACE):
        return "not_text", None
    return kind, answer


def _not_blank(column: str) -> str:
    codes = ", ".join(str(ord(c)) for c in WHITESPACE)
    return f"TRIM({column}, char({codes})) != ''"


# SQL over `traffic t` and its latest trusted feedback row `f` (LEFT JOIN: NULLs without any).
LATEST_FEEDBACK = "f.id = (SELECT MAX(id) FROM feedback WHERE traffic_id = t.id AND trusted)"
# The latest feedback row `a` of any client (what the traffic routes show), trusted or not.
LATEST_ANY_FEEDBACK = "a.id = (SELECT MAX(id) FROM feedback WHERE traffic_id = t.id)"
# Usable by its feedback (corrected, or rated good).
USABLE_BY_FEEDBACK = (
    f"(t.calibratable AND CASE WHEN f.correction IS NOT NULL THEN {_not_blank('f.correction')} "
    f"WHEN f.rating = 'good' THEN {_not_blank('t.completion')} ELSE 0 END)"
)
# Usable where unrated completions are included (needs no join): no trusted feedback.
USABLE_UNRATED = (
    f"(t.calibratable AND {_not_blank('t.completion')} "
    "AND NOT EXISTS (SELECT 1 FROM feedback WHERE traffic_id = t.id AND trusted))"
)
