"""Which database a setting names: a ``postgresql://`` (or ``postgres://``) URL is a Postgres server
(`PostgresDatabase`, for several replicas), anything else the path of a SQLite file (`SQLiteDatabase`);
which store one names: an object-storage URL (`ObjectVersionStore`), else a local directory.

The server, the worker and the CLI open their database through `open_database`, so the choice is made
in one place. psycopg is an optional dependency (the ``postgres`` extra): it is imported only when a
Postgres URL is opened, so SQLite users never need it.
"""

from __future__ import annotations

from pathlib import Path

from .database import Database, DatabaseError, SQLiteDatabase
from .store import VersionStore
from .urls import is_postgres_url, is_store_url, redact_url

INSTALL_POSTGRES = "pip install 'vllm-surgery[postgres]'"


def open_database(target: str | Path, create: bool = True) -> Database:
    """Open the database `target` names: a ``postgresql://`` / ``postgres://`` URL gives a
    `PostgresDatabase`, anything else is a SQLite file path (`SQLiteDatabase`). `create`: create a
    missing SQLite file, or the tables in an empty Postgres database (False: refuse, for readers).

    Raises DatabaseError naming the database (never a password) and the problem: it cannot be reached
    or opened, its schema is newer than this package, or psycopg is missing for a Postgres URL (the
    message names the extra to install)."""
    if is_postgres_url(target):
        url = str(target).strip()
        try:
            from .postgres import PostgresDatabase
        except ImportError as e:
            raise DatabaseError(
                f"{redact_url(url)}: a Postgres database needs psycopg 3, which is not installed ({e}); "
                f"install it with: {INSTALL_POSTGRES}"
            ) from e
        return PostgresDatabase(url, create=create)
    return SQLiteDatabase(Path(target), create=create)


def open_store(target: str | Path, cache_dir: Path, cache_max_bytes: int) -> VersionStore:
    """Open the refined-version store `target` names: an object-storage URL (``s3://bucket/prefix``)
    gives an `ObjectVersionStore` (fsspec and s3fs, the ``s3`` extra, imported only then) that keeps
    the versions it uses under `cache_dir`, at most `cache_max_bytes`; anything else is a local
    directory (`VersionStore`). Raises StoreError naming the URL and the problem (a missing package:
    the extra to install). Nothing is contacted here: the store is read on first use."""
    if is_store_url(target):
        from .objstore import ObjectVersionStore

        return ObjectVersionStore(str(target), cache_dir, cache_max_bytes)
    return VersionStore(Path(target))
