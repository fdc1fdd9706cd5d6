"""Loaded at interpreter start by a test server whose PYTHONPATH names this directory (and by no other
process): kills the traffic writer thread the way nothing in the plugin expects.

When the plugin's database module is imported, its `SQLiteDatabase.insert` is wrapped: a batch holding
a record whose prompt contains `KILL` raises `WriterKilled`, a BaseException (as SystemExit or an
interpreter-level failure would be), which no handler of the writer catches. Before the supervisor
existed that ended recording for the server's life, silently. The module is patched lazily (an import
hook), so processes that never import the plugin's storage pay nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

TARGET = "vllm_surgery.storage.database"
KILL = "kill-the-traffic-writer"


class WriterKilled(BaseException):
    """Not an Exception: no `except Exception` in the writer catches it."""


def _patch(module) -> None:
    original = module.SQLiteDatabase.insert

    def insert(self, records, **kw):
        if any(KILL in str(r.prompt) for r in records):
            raise WriterKilled("the test killed the traffic writer thread")
        return original(self, records, **kw)

    module.SQLiteDatabase.insert = insert


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def patched_exec(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = patched_exec
        return spec


sys.meta_path.insert(0, _Finder())
