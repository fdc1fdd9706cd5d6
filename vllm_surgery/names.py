"""Adapter names as they arrive in requests (`"model": ...`): validated before any filesystem access.

A request's model name is untrusted input that the resolver turns into a path under an operator's
root directory. Only plain, single-component names are accepted, and a joined path is checked again
after resolving symlinks, so no name (or symlink inside a root) can reach outside the roots.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

MAX_NAME_LENGTH = 128
_ALLOWED = re.compile(r"[A-Za-z0-9._-]+")


class InvalidAdapterName(ValueError):
    """A requested adapter name that could address something other than one directory under a root."""


def validate_adapter_name(name: str) -> str:
    """Return `name` unchanged if it is a safe adapter name, else raise InvalidAdapterName saying why.

    Safe: 1-128 characters from [A-Za-z0-9._-], not starting with '.' (hidden directories, '.', '..'),
    no '..' anywhere, no path separator, not absolute.
    """
    if not isinstance(name, str):
        raise InvalidAdapterName(f"adapter name must be a string, got {type(name).__name__}")
    if not name:
        raise InvalidAdapterName("adapter name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidAdapterName(
            f"adapter name is {len(name)} characters long; at most {MAX_NAME_LENGTH} are allowed"
        )
    if os.path.isabs(name) or name.startswith(("/", "\\")):
        raise InvalidAdapterName(f"adapter name {name!r} is an absolute path; give a bare name")
    if "/" in name or "\\" in name or (os.altsep and os.altsep in name):
        raise InvalidAdapterName(f"adapter name {name!r} contains a path separator; give a bare name")
    if ".." in name:
        raise InvalidAdapterName(f"adapter name {name!r} contains '..'")
    if name.startswith("."):
        raise InvalidAdapterName(f"adapter name {name!r} starts with '.'; hidden directories are not served")
    if not _ALLOWED.fullmatch(name):
        bad = sorted({c for c in name if not _ALLOWED.fullmatch(c)})
        raise InvalidAdapterName(
            f"adapter name {name!r} contains characters outside [A-Za-z0-9._-]: {''.join(bad)!r}"
        )
    return name


def path_under(root: str | os.PathLike, name: str) -> Path:
    """`root/name` for a validated `name`, resolved, and guaranteed to lie inside the resolved root.

    The second check catches what name validation cannot see: a symlink inside the root that points
    elsewhere. The path need not exist.
    """
    validate_adapter_name(name)
    base = Path(root).expanduser().resolve()
    path = (base / name).resolve()
    if path == base or not path.is_relative_to(base):
        raise InvalidAdapterName(f"adapter {name!r} resolves to {path}, outside its root {base}")
    return path
