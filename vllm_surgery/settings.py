"""Deployment settings, shared by the server plugin, the worker and the command line, declared once:
each field of `ServingSettings` names its environment variable, its kind and its help text, and the
parsing of variables and of the JSON file, the file's allowed keys and the settings table in the docs
(`settings_table`, in docs/settings.md) are all derived from it.

Read from the environment of the `vllm serve` process (every vLLM process inherits it), optionally
completed by a JSON file named by ``VLLM_SURGERY_CONFIG`` whose keys are the field names. A variable
that is set and non-empty wins over the file; the file wins over the defaults. Relative paths in the
file are taken relative to the file's directory. Unknown keys and values of the wrong kind are errors
that name the variable or file: a typo must not silently serve unrefined adapters.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

ENV_CONFIG = "VLLM_SURGERY_CONFIG"
DEFAULT_STORE = Path("~/.cache/vllm-surgery/store")
DEFAULT_CACHE = Path("~/.cache/vllm-surgery/versions")


class SettingsError(ConfigError):
    """Serving settings that cannot be used; the message names the variable or file at fault."""


@dataclass(frozen=True)
class Kind:
    """How one setting is read: from a variable's text, or from a JSON value in the file."""

    name: str  # shown in the settings table
    from_text: Callable[[str, str], Any]  # (text, source) -> value
    from_json: Callable[[Any, str, Path], Any]  # (value, source, file's directory) -> value


def _split_dirs(value: str) -> list[Path]:
    return [Path(p).expanduser() for p in value.split(os.pathsep) if p.strip()]


def _relative(path: Path, base: Path) -> Path:
    """Relative paths in the file mean relative to the file, not to wherever the server was started."""
    return path if path.is_absolute() else base / path


def _json_path(value: Any, source: str, base: Path) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise SettingsError(f"{source} must be a non-empty string path, got {value!r}")
    return _relative(Path(value).expanduser(), base)


def _json_dirs(value: Any, source: str, base: Path) -> tuple[Path, ...]:
    if isinstance(value, str):
        return tuple(_relative(p, base) for p in _split_dirs(value))
    if isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value):
        return tuple(_relative(Path(v).expanduser(), base) for v in value)
    raise SettingsError(f"{source} must be a list of paths or one string, got {value!r}")


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _text_bool(text: str, source: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise SettingsError(f"{source} must be one of {', '.join(_TRUE + _FALSE)}, got {text!r}")


def _json_bool(value: Any, source: str, base: Path) -> bool:
    if not isinstance(value, bool):
        raise SettingsError(f"{source} must be true or false, got {value!r}")
    return value


def _text_str(text: str, source: str) -> str:
    return text.strip()


def _json_str(value: Any, source: str, base: Path) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SettingsError(f"{source} must be a non-empty string, got {value!r}")
    return value.strip()


PATH = Kind("path", lambda text, source: Path(text.strip()).expanduser(), _json_path)
DIRS = Kind(
    f"paths separated by '{os.pathsep}' (file: a list)", lambda t, s: tuple(_split_dirs(t)), _json_dirs
)
_POSTGRES_SCHEMES = ("postgresql://", "postgres://")  # as storage.factory reads them


def _text_database(text: str, source: str) -> Path | str:
    text = text.strip()
    return text if text.lower().startswith(_POSTGRES_SCHEMES) else Path(text).expanduser()


def _json_database(value: Any, source: str, base: Path) -> Path | str:
    if isinstance(value, str) and value.strip().lower().startswith(_POSTGRES_SCHEMES):
        return value.strip()  # a URL, kept as text (a Path would fold its "//")
    return _json_path(value, source, base)


DATABASE = Kind("path, or postgresql:// URL", _text_database, _json_database)


def _is_url(text: str) -> bool:  # as storage.urls.is_store_url reads a store setting
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.isidentifier() and scheme.lower() != "file"


def _text_store(text: str, source: str) -> Path | str:
    text = text.strip()
    return text if _is_url(text) else Path(text).expanduser()


def _json_store(value: Any, source: str, base: Path) -> Path | str:
    if isinstance(value, str) and _is_url(value.strip()):
        return value.strip()  # a URL, kept as text (a Path would fold its "//")
    return _json_path(value, source, base)


STORE = Kind("path, or s3:// URL", _text_store, _json_store)
BOOL = Kind("boolean", _text_bool, _json_bool)
STRING = Kind("string", _text_str, _json_str)


def choice(*values: str) -> Kind:
    """One of `values` (a closed set of words)."""
    what = "one of " + ", ".join(repr(v) for v in values)

    def check(value: Any, source: str) -> str:
        word = value.strip().lower() if isinstance(value, str) else value
        if word not in values:
            raise SettingsError(f"{source} must be {what}, got {value!r}")
        return word

    return Kind(what, check, lambda value, source, base: check(value, source))


def number(lo: float, hi: float = math.inf, integer: bool = False) -> Kind:
    """A finite number in [lo, hi] (an integer if `integer`)."""
    what = f"{'an integer' if integer else 'a number'} in [{lo:g}, {hi:g}]"

    def check(value: Any, source: str) -> float | int:
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or not math.isfinite(value) or not lo <= value <= hi:
            raise SettingsError(f"{source} must be {what}, got {value!r}")
        return value

    def from_text(text: str, source: str) -> float | int:
        try:
            value: Any = int(text) if integer else float(text)
        except ValueError:
            raise SettingsError(f"{source} must be {what}, got {text!r}") from None
        return check(value, source)

    return Kind(what, from_text, lambda value, source, base: check(value, source))


@dataclass(frozen=True)
class AdapterTraffic:
    """One entry of `traffic_adapters`: the traffic settings of one adapter. None means "the global
    value" (traffic_sample_rate, traffic_max_records, traffic_max_age_days)."""

    name: str
    capture: bool = True  # listing an adapter switches its capture on, unless this is false
    sample_rate: float | None = None
    max_records: int | None = None
    max_age_days: float | None = None
    max_bytes: int | None = None  # retention by the bytes of stored text (records and their feedback)
    include_unrated: bool = False  # calibration sets of this adapter include unrated completions
    calibration_files: tuple[str, ...] = ()  # static calibration files (names in calibration_dir)


_ADAPTER_TRAFFIC_CHECKS: dict[str, Callable[[Any], bool]] = {
    "capture": lambda v: isinstance(v, bool),
    "sample_rate": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1,
    "max_records": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "max_age_days": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf,
    "max_bytes": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "include_unrated": lambda v: isinstance(v, bool),
    "calibration_files": lambda v: isinstance(v, list) and all(isinstance(f, str) and f.strip() for f in v),
}
_ADAPTER_TRAFFIC_HELP = {
    "capture": "true or false",
    "sample_rate": "a number in [0, 1]",
    "max_records": "an integer >= 1",
    "max_age_days": "a number >= 0 (0: no age limit)",
    "max_bytes": "an integer >= 1 (bytes)",
    "include_unrated": "true or false",
    "calibration_files": "a list of file names in calibration_dir",
}


def _json_adapter_traffic(value: Any, source: str, base: Path) -> tuple[AdapterTraffic, ...]:
    """{"name": {"sample_rate": 0.5, ...}, ...}: names and keys are checked, errors name them."""
    from .names import InvalidAdapterName, validate_adapter_name

    if not isinstance(value, dict):
        raise SettingsError(f"{source} must be a JSON object mapping adapter names to objects, got {value!r}")
    out = []
    for name, entry in sorted(value.items()):
        try:
            validate_adapter_name(name)
        except InvalidAdapterName as e:
            raise SettingsError(f"{source}: {e}") from None
        if not isinstance(entry, dict):
            raise SettingsError(
                f"{source}: {name!r} must be an object with keys {sorted(_ADAPTER_TRAFFIC_CHECKS)}"
            )
        unknown = sorted(set(entry) - set(_ADAPTER_TRAFFIC_CHECKS))
        if unknown:
            raise SettingsError(
                f"{source}: {name!r}: unknown key(s) {unknown}; allowed: {sorted(_ADAPTER_TRAFFIC_CHECKS)}"
            )
        for key, v in entry.items():
            if not _ADAPTER_TRAFFIC_CHECKS[key](v):
                raise SettingsError(
                    f"{source}: {name!r}: {key!r} must be {_ADAPTER_TRAFFIC_HELP[key]}, got {v!r}"
                )
        values = dict(entry)
        if "calibration_files" in values:
            values["calibration_files"] = tuple(f.strip() for f in values["calibration_files"])
        out.append(AdapterTraffic(name=name, **values))
    return tuple(out)


def _text_adapter_traffic(text: str, source: str) -> tuple[AdapterTraffic, ...]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise SettingsError(f"{source} must be a JSON object ({e}), got {text!r}") from None
    return _json_adapter_traffic(value, source, Path("."))


ADAPTER_TRAFFIC = Kind(
    "JSON object: adapter -> {" + ", ".join(_ADAPTER_TRAFFIC_CHECKS) + "}",
    _text_adapter_traffic,
    _json_adapter_traffic,
)


# SurgeryConfig fields an operator may not set for automatic refinements (force: a job's result is
# swapped in only when the gate accepts it; device and progress belong to the worker).
NOT_REFINE_SETTINGS = frozenset({"force", "device", "progress"})


def refine_setting_fields() -> tuple[str, ...]:
    """The SurgeryConfig fields an operator may set for a refinement: every field but NOT_REFINE_SETTINGS,
    derived from SurgeryConfig itself (imported here, not at module import: it pulls in torch)."""
    from .config import SurgeryConfig

    return tuple(f.name for f in fields(SurgeryConfig) if f.name not in NOT_REFINE_SETTINGS)


def _json_refine_settings(value: Any, source: str, base: Path) -> dict[str, Any]:
    """SurgeryConfig fields for automatic jobs, validated by SurgeryConfig itself (errors name the field)."""
    from .config import SurgeryConfig

    if not isinstance(value, dict):
        raise SettingsError(f"{source} must be a JSON object of refine settings, got {value!r}")
    allowed = refine_setting_fields()
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise SettingsError(f"{source}: unknown or not allowed key(s) {unknown}; allowed: {list(allowed)}")
    fields_ = dict(value)
    if isinstance(fields_.get("layers"), list):
        fields_["layers"] = tuple(fields_["layers"])
    try:
        SurgeryConfig(**fields_)
    except (ConfigError, TypeError, ValueError, OverflowError) as e:
        raise SettingsError(f"{source}: {e}") from None
    return dict(value)


def _text_refine_settings(text: str, source: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise SettingsError(f"{source} must be a JSON object ({e}), got {text!r}") from None
    return _json_refine_settings(value, source, Path("."))


REFINE_SETTINGS = Kind(
    "JSON object of refine settings (SurgeryConfig fields)", _text_refine_settings, _json_refine_settings
)


def setting(env: str, kind: Kind, help: str, **kwargs: Any) -> Any:
    """A ServingSettings field read from variable `env` (or the file key of the field's name)."""
    return field(metadata={"env": env, "kind": kind, "help": help}, **kwargs)


@dataclass(frozen=True)
class ServingSettings:
    """Resolved settings. Paths are expanded (``~``) but not required to exist: a missing root simply
    holds no adapters, so a server can start before the operator's storage is mounted."""

    adapter_dirs: tuple[Path, ...] = setting(
        "VLLM_SURGERY_ADAPTER_DIRS",
        DIRS,
        "Root directories of the original adapters: adapter X is <root>/X, the first root that has it wins.",
        default=(),
    )
    store: Path | str = setting(
        "VLLM_SURGERY_STORE",
        STORE,
        "The refined-version store: a directory (default ~/.cache/vllm-surgery/store), or object storage "
        "shared by several servers and workers, `s3://bucket/prefix` (needs `pip install "
        "'vllm-surgery[s3]'`; credentials and endpoint the standard way: AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for S3-compatible servers).",
        default_factory=lambda: DEFAULT_STORE.expanduser(),
    )
    cache_dir: Path = setting(
        "VLLM_SURGERY_CACHE_DIR",
        PATH,
        "With an s3:// store: where this machine keeps the versions it serves or writes (each checked "
        "against its manifest's SHA-256 before use), one subdirectory per store URL.",
        default_factory=lambda: DEFAULT_CACHE.expanduser(),
    )
    cache_max_bytes: int = setting(
        "VLLM_SURGERY_CACHE_MAX_BYTES",
        number(1 << 20, integer=True),
        "With an s3:// store: bytes of versions the cache keeps; beyond it the least recently used are "
        "deleted, never one this server serves (those are kept even above the bound).",
        default=20 * (1 << 30),
    )
    store_gc_grace_hours: float = setting(
        "VLLM_SURGERY_STORE_GC_GRACE_HOURS",
        # at least twice storage.objstore.UPLOAD_LIMIT_S (6 h; a test keeps them so)
        number(12, 87600),
        "`vllm-surgery store gc` deletes what interrupted writes left in the store (with an s3:// store: "
        "version directories without manifest.json, uploads that died before their commit point) once "
        "its newest file is this many hours old. An upload in progress is never deleted: an upload that "
        "takes longer than 6 hours is not committed, and the minimum, 12, is twice that.",
        default=24.0,
    )
    calibration_dir: Path | None = setting(
        "VLLM_SURGERY_CALIBRATION_DIR",
        PATH,
        'Directory of named calibration files that POST .../refine may name ({"calibration": FILE}).',
        default=None,
    )
    admin_token: str = setting(
        "VLLM_SURGERY_ADMIN_TOKEN",
        STRING,
        "Token that every route changing what is served needs (swap, rollback, refine, vLLM's "
        "load/unload adapter routes): `X-Surgery-Admin-Token` header, or the bearer token. Unset: those "
        "routes answer 403, unless VLLM_SURGERY_ALLOW_UNAUTHENTICATED_ADMIN is on.",
        default="",
        repr=False,  # never printed with the settings
    )
    allow_unauthenticated_admin: bool = setting(
        "VLLM_SURGERY_ALLOW_UNAUTHENTICATED_ADMIN",
        BOOL,
        "Without an admin token, let anyone who passes vLLM's --api-key guard (or anyone, without one) "
        "change what is served. For a trusted local development server only.",
        default=False,
    )
    database: Path | str | None = setting(
        "VLLM_SURGERY_DATABASE",
        DATABASE,
        "Database of recorded traffic, feedback and refinement jobs: a SQLite file (default: <store>.sqlite3 "
        "next to the store), or a Postgres database shared by several servers and workers, "
        "`postgresql://user@host:5432/dbname` (needs `pip install 'vllm-surgery[postgres]'`; give the "
        "password in PGPASSWORD or ~/.pgpass rather than in the URL).",
        default=None,
    )
    traffic: bool = setting(
        "VLLM_SURGERY_TRAFFIC",
        BOOL,
        "Record the completions and chat traffic of every adapter known to the plugin (off by default).",
        default=False,
    )
    traffic_sample_rate: float = setting(
        "VLLM_SURGERY_TRAFFIC_SAMPLE_RATE",
        number(0, 1),
        "Share of an adapter's requests that are recorded (per request, at random).",
        default=1.0,
    )
    traffic_adapters: tuple[AdapterTraffic, ...] = setting(
        "VLLM_SURGERY_TRAFFIC_ADAPTERS",
        ADAPTER_TRAFFIC,
        "Per-adapter traffic settings; listing an adapter records it even when traffic is off "
        '(e.g. {"x": {"sample_rate": 0.5, "max_records": 5000, "calibration_files": ["x.jsonl"]}}).',
        default=(),
    )
    traffic_max_records: int = setting(
        "VLLM_SURGERY_TRAFFIC_MAX_RECORDS",
        number(1, integer=True),
        "Retention: records kept per adapter (the oldest go first).",
        default=100_000,
    )
    traffic_max_age_days: float = setting(
        "VLLM_SURGERY_TRAFFIC_MAX_AGE_DAYS",
        number(0),
        "Retention: days a record is kept (0: no age limit).",
        default=90.0,
    )
    traffic_redact: str = setting(
        "VLLM_SURGERY_TRAFFIC_REDACT",
        STRING,
        "Redaction before storing: 'builtin' (e-mail addresses and runs of 7+ digits), 'none', or "
        "'package.module:function' taking and returning a record dict (None drops the record).",
        default="builtin",
    )
    traffic_queue_size: int = setting(
        "VLLM_SURGERY_TRAFFIC_QUEUE_SIZE",
        number(1, 10_000_000, integer=True),
        "Records waiting to be written; beyond it records are dropped and counted (metric and log).",
        default=10_000,
    )

    traffic_max_bytes: int = setting(
        "VLLM_SURGERY_TRAFFIC_MAX_BYTES",
        number(1, integer=True),
        "Retention: bytes of stored text (prompts, completions, settings and their feedback) kept per "
        "adapter; the oldest records go first. Per adapter: max_bytes in VLLM_SURGERY_TRAFFIC_ADAPTERS.",
        default=1024**3,
    )
    traffic_max_record_bytes: int = setting(
        "VLLM_SURGERY_TRAFFIC_MAX_RECORD_BYTES",
        number(1, integer=True),
        "A recorded answer whose stored text (prompt, completion, settings) is larger is not stored "
        '(counted as outcome="oversized" and logged); the client is served as usual.',
        default=2 * 1024**2,
    )
    feedback_max_correction_bytes: int = setting(
        "VLLM_SURGERY_FEEDBACK_MAX_CORRECTION_BYTES",
        number(1, 64 * 1024, integer=True),
        "Largest correction (UTF-8 bytes) POST /v1/surgery/feedback accepts; larger ones answer 413.",
        default=32 * 1024,
    )
    feedback_max_per_record: int = setting(
        "VLLM_SURGERY_FEEDBACK_MAX_PER_RECORD",
        number(1, 1000, integer=True),
        "Feedback rows kept per recorded answer: the newest ones, and always the latest one that counts "
        "for calibration; older ones are deleted as new feedback arrives.",
        default=8,
    )
    feedback_corrections_per_hour: int = setting(
        "VLLM_SURGERY_FEEDBACK_CORRECTIONS_PER_HOUR",
        number(1, integer=True),
        "Corrections one client (API key and address) may send per hour; beyond it 429. Reviewers "
        "(reviewer or admin token) are not limited.",
        default=1000,
    )
    feedback_trust: str = setting(
        "VLLM_SURGERY_FEEDBACK_TRUST",
        choice("reviewer", "api-key"),
        "Whose feedback is calibration data (counts toward the calibration set and automatic jobs): "
        "'reviewer' (only feedback sent with the reviewer or the admin token) or 'api-key' (anyone with "
        "the inference API key). Other feedback is stored and counted, marked untrusted, never used.",
        default="reviewer",
    )
    reviewer_token: str = setting(
        "VLLM_SURGERY_REVIEWER_TOKEN",
        STRING,
        "Token of the people whose feedback counts as calibration data (feedback_trust 'reviewer'): "
        "`X-Surgery-Reviewer-Token` header on POST /v1/surgery/feedback. The admin token also counts.",
        default="",
        repr=False,  # never printed with the settings
    )

    auto_refine: bool = setting(
        "VLLM_SURGERY_AUTO_REFINE",
        BOOL,
        "Queue refinement jobs without a person: when an adapter is first resolved and has enough "
        "calibration data but no refined version, and when it gains refine_new_examples new usable "
        "examples. A `vllm-surgery worker` runs them; accepted versions are swapped in (off by default).",
        default=False,
    )
    refine_min_examples: int = setting(
        "VLLM_SURGERY_REFINE_MIN_EXAMPLES",
        number(2, integer=True),
        "Usable calibration examples (traffic, registered files and the adapter's own "
        "surgery_calibration.jsonl) an adapter needs before an automatic job is queued and run.",
        default=32,
    )
    refine_new_examples: int = setting(
        "VLLM_SURGERY_REFINE_NEW_EXAMPLES",
        number(1, integer=True),
        "New usable examples since an adapter's last job (rated good, corrected, or unrated where "
        "included) that queue a new automatic job.",
        default=64,
    )
    refine_min_interval_s: float = setting(
        "VLLM_SURGERY_REFINE_MIN_INTERVAL_S",
        number(0),
        "Seconds that must pass after an adapter's last job before new data queues another one.",
        default=3600.0,
    )
    refine_check_interval_s: float = setting(
        "VLLM_SURGERY_REFINE_CHECK_INTERVAL_S",
        number(0.1, 86400),
        "How often the server looks for new calibration data and for accepted versions whose swap is "
        "pending (e.g. accepted while the server was down).",
        default=30.0,
    )
    refine_settings: dict = setting(
        "VLLM_SURGERY_REFINE_SETTINGS",
        REFINE_SETTINGS,
        'Refine settings of automatic jobs (e.g. {"samples": 128, "max_batch_tokens": 4096}); policy '
        "defaults to auto. force is not allowed: only versions the gate accepts are swapped in.",
        default_factory=dict,
    )
    snapshot_dir: Path | None = setting(
        "VLLM_SURGERY_SNAPSHOT_DIR",
        PATH,
        "Where the server keeps the private, validated copies of adapters that vLLM loads (one directory "
        "per server process, 0700; default <store>/.snapshots, or <cache dir>/.snapshots with an s3:// store). vLLM never reads an operator's or the "
        "store's files directly: an adapter overwritten in place while served cannot reach the engine.",
        default=None,
    )
    snapshot_grace_s: float = setting(
        "VLLM_SURGERY_SNAPSHOT_GRACE_S",
        number(0),
        "Seconds a snapshot no adapter name serves any more is kept before it is deleted (requests "
        "still running on it may need vLLM to read it again); one that a name serves is never deleted.",
        default=900.0,
    )
    replica_id: str = setting(
        "VLLM_SURGERY_REPLICA_ID",
        STRING,
        "This server's name among the replicas that share a Postgres database (the `replicas` list of "
        "GET /v1/surgery/adapters/NAME, the replicas table). Default: <hostname>:<port>, which stays the "
        "same across restarts (a random id would leave a dead row behind at every restart) and says "
        "where to look; set it where several replicas share a host name and port (e.g. pods behind NAT).",
        default="",
    )
    pointer_poll_s: float = setting(
        "VLLM_SURGERY_POINTER_POLL_S",
        number(0.1, 3600),
        "With a shared (Postgres) database: how often a replica reads every served pointer again, "
        "whatever notifications arrived (a backstop: a notification sent while its connection was down "
        "is lost). Changes normally arrive by LISTEN/NOTIFY within tens of milliseconds.",
        default=3.0,
    )
    replica_forget_days: float = setting(
        "VLLM_SURGERY_REPLICA_FORGET_DAYS",
        number(0.05, 3650),
        "With a shared (Postgres) database: a replica that has not reported for this many days is "
        "forgotten: its rows are deleted from the replicas table (the `replicas` list of GET "
        "/v1/surgery/adapters/NAME), e.g. one scaled down or renamed. A running replica reports at least "
        "every VLLM_SURGERY_POINTER_POLL_S (at most an hour) plus 30 s, so even the minimum, 0.05 (72 "
        "minutes), never forgets one that is alive; one that comes back is listed again at its next report.",
        default=1.0,
    )
    canary_share: float = setting(
        "VLLM_SURGERY_CANARY_SHARE",
        number(0, 0.99),
        "Share of an adapter's traffic a version accepted by a refinement job serves first, as a canary "
        "beside the current version, until live feedback promotes or rolls it back (docs/canary.md). 0: "
        "accepted versions are swapped in directly. Set it alike on servers and workers.",
        default=0.0,
    )
    canary_min_ratings: int = setting(
        "VLLM_SURGERY_CANARY_MIN_RATINGS",
        number(1, 1_000_000, integer=True),
        "Rated answers each version needs during a canary before the rule may decide.",
        default=30,
    )
    canary_margin: float = setting(
        "VLLM_SURGERY_CANARY_MARGIN",
        number(0, 0.5),
        "How much lower the canary's good rate (rated good among rated answers) may be and still count "
        "as not worse: it is promoted when shown not worse by more than this.",
        default=0.05,
    )
    canary_error_rate: float = setting(
        "VLLM_SURGERY_CANARY_ERROR_RATE",
        number(0.0001, 0.5),
        "The canary rule's error rate: the most probability of promoting a canary worse by the margin, or "
        "of rolling back one that is not worse (docs/canary.md).",
        default=0.05,
    )
    canary_max_hours: float = setting(
        "VLLM_SURGERY_CANARY_MAX_HOURS",
        number(0.0001),
        "A canary with no decision after this many hours expires: the current version stays served.",
        default=168.0,
    )
    job_max_attempts: int = setting(
        "VLLM_SURGERY_JOB_MAX_ATTEMPTS",
        number(1, 100, integer=True),
        "Workers a job may outlive (killed or crashed while running it) before it is failed with that reason.",
        default=3,
    )
    job_max_queued: int = setting(
        "VLLM_SURGERY_JOB_MAX_QUEUED",
        number(1, 10000, integer=True),
        "Refinement jobs one adapter may have queued or running at once; a refine request beyond it is "
        "refused with 429 naming the limit (a bound on the queue: each job holds its calibration records).",
        default=16,
    )
    job_history_days: float = setting(
        "VLLM_SURGERY_JOB_HISTORY_DAYS",
        number(0),
        "Finished refinement jobs are deleted this many days after they ended (0: no age limit); an "
        "adapter's newest job, its newest accepted one, pending swaps and first_load jobs are always kept. "
        "The job metrics are kept apart and never go down.",
        default=30.0,
    )
    job_history_per_adapter: int = setting(
        "VLLM_SURGERY_JOB_HISTORY_PER_ADAPTER",
        number(1, integer=True),
        "Finished refinement jobs kept per adapter, the newest (older ones are deleted, with the same "
        "exceptions as VLLM_SURGERY_JOB_HISTORY_DAYS).",
        default=10_000,
    )

    @property
    def database_path(self) -> Path | str:
        """The traffic database: `database` (a path, or a postgresql:// URL for `open_database`), or
        <store>.sqlite3 beside the store directory (with an s3:// store: beside the default store)."""
        if self.database is not None:
            return self.database
        store = self.store if isinstance(self.store, Path) else DEFAULT_STORE.expanduser()
        return store.parent / f"{store.name}.sqlite3"

    def canary_rule(self) -> Any:
        """The canary decision rule (`vllm_surgery.canary.CanaryRule`) of the canary
        settings. Raises SettingsError when the rule refuses them."""
        from .canary import CanaryRule

        try:
            return CanaryRule(
                margin=self.canary_margin,
                error_rate=self.canary_error_rate,
                min_ratings=self.canary_min_ratings,
                max_duration_s=self.canary_max_hours * 3600.0,
            )
        except ConfigError as e:
            raise SettingsError(
                f"the canary settings (VLLM_SURGERY_CANARY_MARGIN, _ERROR_RATE, _MIN_RATINGS, _MAX_HOURS): {e}"
            ) from None

    @property
    def snapshot_root(self) -> Path:
        """Where snapshots live: `snapshot_dir`, or <store>/.snapshots (hidden: never a store adapter);
        with an s3:// store, <cache_dir>/.snapshots."""
        if self.snapshot_dir is not None:
            return self.snapshot_dir
        return (self.store if isinstance(self.store, Path) else self.cache_dir) / ".snapshots"

    @property
    def records_traffic(self) -> bool:
        """Whether any traffic can be recorded: on globally with a rate above 0, or for some adapter."""
        rate = self.traffic_sample_rate
        return (self.traffic and rate > 0) or any(
            a.capture and (a.sample_rate if a.sample_rate is not None else rate) > 0
            for a in self.traffic_adapters
        )

    def adapter_traffic(self, name: str) -> AdapterTraffic | None:
        """The `traffic_adapters` entry of `name`, if there is one."""
        return next((a for a in self.traffic_adapters if a.name == name), None)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServingSettings:
        """Settings from `environ` (default os.environ) and the file it names. Raises SettingsError."""
        env = os.environ if environ is None else environ
        file_values: dict[str, Any] = {}
        config_path = env.get(ENV_CONFIG, "").strip()
        base = Path(".")
        if config_path:
            path = Path(config_path).expanduser()
            file_values, base = _read_file(path), path.parent
        values: dict[str, Any] = {}
        for f in fields(cls):
            meta = f.metadata
            text = env.get(meta["env"], "")
            if text.strip():
                values[f.name] = meta["kind"].from_text(text, meta["env"])
            elif f.name in file_values:
                values[f.name] = meta["kind"].from_json(
                    file_values[f.name], f"{config_path}: {f.name!r}", base
                )
        return cls(**values)


def env_of(name: str) -> str:
    """The environment variable of the setting (field) `name`."""
    for f in fields(ServingSettings):
        if f.name == name:
            return f.metadata["env"]
    raise KeyError(name)


def file_keys() -> frozenset[str]:
    return frozenset(f.name for f in fields(ServingSettings))


def settings_table() -> str:
    """A markdown table of every setting (variable, file key, kind, default, help), for the docs."""
    rows = ["| variable | file key | kind | default | meaning |", "|---|---|---|---|---|"]
    for f in fields(ServingSettings):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        shown = "" if default in ((), None) else str(default).replace(str(Path.home()), "~")
        meta = f.metadata
        rows.append(f"| `{meta['env']}` | `{f.name}` | {meta['kind'].name} | {shown} | {meta['help']} |")
    return "\n".join(rows)


def _read_file(path: Path) -> dict[str, Any]:
    """The config file, strictly: an unreadable file or unknown key is an error, not silently ignored,
    because a typo there would otherwise serve unrefined adapters without anyone noticing."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SettingsError(f"{ENV_CONFIG}={path}: cannot be read ({e.strerror or e})") from e
    try:
        values = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SettingsError(f"{path}: not valid JSON ({e})") from e
    keys = sorted(file_keys())
    if not isinstance(values, dict):
        raise SettingsError(f"{path}: must hold a JSON object with keys {keys}")
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise SettingsError(f"{path}: unknown key(s) {unknown}; allowed: {keys}")
    return values


if __name__ == "__main__":  # `python -m vllm_surgery.settings` prints the table for docs/settings.md
    print(settings_table())
