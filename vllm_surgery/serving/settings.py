"""Operator settings for the serving plugin: where original adapters live and where refined ones go.

Read from the environment of the `vllm serve` process (every vLLM process inherits it), optionally
completed by a JSON file:

- ``VLLM_SURGERY_ADAPTER_DIRS``: root directories, separated by ``os.pathsep`` (':' on POSIX).
  Adapter ``X`` is the directory ``<root>/X``; the first root that has it wins.
- ``VLLM_SURGERY_STORE``: the refined-version store (default ``~/.cache/vllm-surgery/store``).
- ``VLLM_SURGERY_CALIBRATION_DIR``: the directory that ``POST /v1/surgery/adapters/{name}/refine``
  reads named calibration files from (``"calibration": "<file name>"``); unset: only inline records.
- ``VLLM_SURGERY_CONFIG``: optional path of a JSON object with the same settings as keys
  ``adapter_dirs`` (a list of paths, or one string split like the variable), ``store`` and
  ``calibration_dir``.

A variable that is set and non-empty wins over the file; the file wins over the defaults. Relative
paths in the file are taken relative to the file's directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

ENV_ADAPTER_DIRS = "VLLM_SURGERY_ADAPTER_DIRS"
ENV_STORE = "VLLM_SURGERY_STORE"
ENV_CONFIG = "VLLM_SURGERY_CONFIG"
ENV_CALIBRATION_DIR = "VLLM_SURGERY_CALIBRATION_DIR"
DEFAULT_STORE = Path("~/.cache/vllm-surgery/store")
_FILE_KEYS = frozenset({"adapter_dirs", "store", "calibration_dir"})


class SettingsError(ConfigError):
    """Serving settings that cannot be used; the message names the variable or file at fault."""


def _split_dirs(value: str) -> list[Path]:
    return [Path(p).expanduser() for p in value.split(os.pathsep) if p.strip()]


@dataclass(frozen=True)
class ServingSettings:
    """Resolved settings. Paths are expanded (``~``) but not required to exist: a missing root simply
    holds no adapters, so a server can start before the operator's storage is mounted."""

    adapter_dirs: tuple[Path, ...] = ()
    store: Path = field(default_factory=lambda: DEFAULT_STORE.expanduser())
    calibration_dir: Path | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServingSettings:
        env = os.environ if environ is None else environ
        file_values: dict[str, Any] = {}
        config_path = env.get(ENV_CONFIG, "").strip()
        if config_path:
            file_values = _read_file(Path(config_path).expanduser())

        dirs: list[Path] = []
        if env.get(ENV_ADAPTER_DIRS, "").strip():
            dirs = _split_dirs(env[ENV_ADAPTER_DIRS])
        elif "adapter_dirs" in file_values:
            dirs = _file_dirs(file_values["adapter_dirs"], config_path)

        if env.get(ENV_STORE, "").strip():
            store = Path(env[ENV_STORE]).expanduser()
        elif "store" in file_values:
            value = file_values["store"]
            if not isinstance(value, str) or not value.strip():
                raise SettingsError(f"{config_path}: 'store' must be a non-empty string path, got {value!r}")
            store = _relative_to_file(Path(value).expanduser(), config_path)
        else:
            store = DEFAULT_STORE.expanduser()

        calibration_dir: Path | None = None
        if env.get(ENV_CALIBRATION_DIR, "").strip():
            calibration_dir = Path(env[ENV_CALIBRATION_DIR]).expanduser()
        elif file_values.get("calibration_dir") is not None:
            value = file_values["calibration_dir"]
            if not isinstance(value, str) or not value.strip():
                raise SettingsError(
                    f"{config_path}: 'calibration_dir' must be a non-empty string path, got {value!r}"
                )
            calibration_dir = _relative_to_file(Path(value).expanduser(), config_path)
        return cls(adapter_dirs=tuple(dirs), store=store, calibration_dir=calibration_dir)


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
    if not isinstance(values, dict):
        raise SettingsError(f"{path}: must hold a JSON object with keys {sorted(_FILE_KEYS)}")
    unknown = sorted(set(values) - _FILE_KEYS)
    if unknown:
        raise SettingsError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(_FILE_KEYS)}")
    return values


def _relative_to_file(path: Path, config_path: str) -> Path:
    """Relative paths in the file mean relative to the file, not to wherever the server was started."""
    return path if path.is_absolute() else Path(config_path).expanduser().parent / path


def _file_dirs(value: Any, source: str) -> list[Path]:
    if isinstance(value, str):
        return [_relative_to_file(p, source) for p in _split_dirs(value)]
    if isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value):
        return [_relative_to_file(Path(v).expanduser(), source) for v in value]
    raise SettingsError(f"{source}: 'adapter_dirs' must be a list of paths or one string, got {value!r}")
