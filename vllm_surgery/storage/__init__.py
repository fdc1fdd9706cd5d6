"""Storage: what a deployment keeps between processes, with no vLLM in it.

- `store`: the refined-version store, one directory tree (`VersionStore`, `version_key`; what
  interrupted writes left, `Orphan`, is deleted by `collect_garbage`);
  `objstore`: the same on object storage (`ObjectVersionStore`, ``s3://``), with a checked local cache.
- `database`: recorded traffic and feedback (`Database`, `SQLiteDatabase`, `TrafficRecord`).
- `job_queue`: the refinement job queue in the same database (`Job`, `JobQueue`, job states).
- `factory`: `open_database`, which opens a SQLite file or, for a ``postgresql://`` URL, a Postgres
  database (`vllm_surgery.storage.postgres`, imported only then: psycopg is an optional extra), and
  `open_store`, which opens a local store or, for an ``s3://`` URL, an object store (fsspec/s3fs);
  `urls`: which targets are Postgres URLs, and how they are shown without a password.
- `pointer`: the served pointer in a shared database (which version every replica serves), its
  history and the replicas' reports; `listen`: LISTEN for its changes on Postgres (imported only then).
- `canary`: the canary state per adapter (a refined version on a share of live traffic), its
  decisions and its live figures.
- `counters`: the counters and batched deletes that keep stats, metrics and retention fast at any
  size (schema version 6); `COUNTED`: the counts of `TrafficStats`, in order.
- `usable`: which recorded answers are usable calibration examples (`usable_answer`, and in SQL).

The server (inside vLLM), the worker and the command line all use these; backends for several
replicas (a server database, object storage) implement the same classes' methods. This module is
the package's front door: other packages import from here, not from the modules.
"""

from __future__ import annotations

from .canary import STATES as CANARY_STATES
from .canary import Canary, CanaryConflict, check_share
from .counters import COUNTED, JOB_STAGE_BUCKETS, StageHistogram
from .database import (
    RATINGS,
    SCHEMA_VERSION,
    Database,
    DatabaseError,
    DatabaseUnavailable,
    Retention,
    SQLiteDatabase,
    StoredRecord,
    TrafficRecord,
    TrafficStats,
    UnknownRequest,
    record_bytes,
)
from .factory import open_database, open_store
from .job_queue import (
    ACTIVE_STATES,
    FINISHED_STATES,
    JOB_STATES,
    JOB_TRIGGERS,
    SWAP_STATES,
    Job,
    JobFigures,
    JobQueue,
    JobQueueFull,
)
from .pointer import (
    POINTER_CHANNEL,
    REPLICA_STATES,
    PointerChange,
    PointerConflict,
    ReplicaStatus,
    ServedPointer,
)
from .store import (
    KEY_CONFIG_FIELDS,
    Orphan,
    StoreError,
    StoreUnavailable,
    VersionInfo,
    VersionStore,
    key_of_record,
    stored_answer,
    version_key,
)
from .urls import is_postgres_url, is_store_url, redact_url
from .usable import LEFT_OUT_KINDS, USABLE_KINDS, usable_answer

__all__ = [
    "ACTIVE_STATES",
    "CANARY_STATES",
    "COUNTED",
    "FINISHED_STATES",
    "JOB_STAGE_BUCKETS",
    "JOB_STATES",
    "JOB_TRIGGERS",
    "KEY_CONFIG_FIELDS",
    "LEFT_OUT_KINDS",
    "POINTER_CHANNEL",
    "RATINGS",
    "REPLICA_STATES",
    "SCHEMA_VERSION",
    "SWAP_STATES",
    "USABLE_KINDS",
    "Canary",
    "CanaryConflict",
    "Database",
    "DatabaseError",
    "DatabaseUnavailable",
    "Job",
    "JobFigures",
    "JobQueue",
    "JobQueueFull",
    "Orphan",
    "PointerChange",
    "PointerConflict",
    "ReplicaStatus",
    "Retention",
    "SQLiteDatabase",
    "ServedPointer",
    "StageHistogram",
    "StoreError",
    "StoreUnavailable",
    "StoredRecord",
    "TrafficRecord",
    "TrafficStats",
    "UnknownRequest",
    "VersionInfo",
    "VersionStore",
    "check_share",
    "is_postgres_url",
    "is_store_url",
    "key_of_record",
    "open_database",
    "open_store",
    "record_bytes",
    "redact_url",
    "stored_answer",
    "usable_answer",
    "version_key",
]
