"""Database and store URLs: which targets name a Postgres server or object storage, and how a URL is
shown without its password. Needs no driver (the factories and the backends use it)."""

from __future__ import annotations

import re
from pathlib import Path

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(target: str | Path) -> bool:
    """Whether `target` names a Postgres server (a URL), rather than a SQLite file."""
    return isinstance(target, str) and target.strip().lower().startswith(POSTGRES_SCHEMES)


def is_store_url(target: str | Path) -> bool:
    """Whether a store setting names object storage (``s3://bucket/prefix``, any ``scheme://`` that
    fsspec knows but ``file://``), rather than a local directory."""
    if not isinstance(target, str):
        return False
    scheme, sep, _ = target.strip().partition("://")
    return bool(sep) and scheme.isidentifier() and scheme.lower() != "file"


_USERINFO_PASSWORD = re.compile(r"^([a-z]+://[^:@/?#]*):[^@/?#]*@", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """`url` with any password (``user:password@``, ``?password=``) replaced by ``***``: what logs and
    error messages show."""
    return _QUERY_PASSWORD.sub(r"\1***", _USERINFO_PASSWORD.sub(r"\1:***@", url.strip()))
