"""Operator settings: environment variables, an optional JSON file, and which one wins."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vllm_surgery.errors import ConfigError
from vllm_surgery.settings import DEFAULT_STORE, ServingSettings, SettingsError


def test_defaults_without_any_setting() -> None:
    s = ServingSettings.from_env({})
    assert s.adapter_dirs == ()
    assert s.store == DEFAULT_STORE.expanduser()
    assert "~" not in str(s.store)


def test_environment_variables(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    env = {
        "VLLM_SURGERY_ADAPTER_DIRS": f"{a}{os.pathsep}{os.pathsep}{b}",  # empty entries are ignored
        "VLLM_SURGERY_STORE": str(tmp_path / "store"),
    }
    s = ServingSettings.from_env(env)
    assert s.adapter_dirs == (a, b)
    assert s.store == tmp_path / "store"


def test_file_values_and_relative_paths(tmp_path: Path) -> None:
    cfg = tmp_path / "conf" / "serving.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"adapter_dirs": ["adapters", str(tmp_path / "abs")], "store": "store"}))
    s = ServingSettings.from_env({"VLLM_SURGERY_CONFIG": str(cfg)})
    # Relative to the file, not to the server's working directory.
    assert s.adapter_dirs == (cfg.parent / "adapters", tmp_path / "abs")
    assert s.store == cfg.parent / "store"


def test_the_database_is_a_path_or_a_postgres_url(tmp_path: Path) -> None:
    """A postgresql:// URL stays the text it was (a Path would fold its "//" into "/"); anything else
    is a path, relative to the file in the file."""
    url = "postgresql://surgery@db.internal:5432/traffic"
    assert ServingSettings.from_env({"VLLM_SURGERY_DATABASE": f" {url} "}).database_path == url
    legacy = "postgres://surgery@db.internal/traffic"
    assert ServingSettings.from_env({"VLLM_SURGERY_DATABASE": legacy}).database_path == legacy
    assert ServingSettings.from_env({"VLLM_SURGERY_DATABASE": str(tmp_path / "t.db")}).database_path == (
        tmp_path / "t.db"
    )
    cfg = tmp_path / "serving.json"
    cfg.write_text(json.dumps({"database": url}))
    assert ServingSettings.from_env({"VLLM_SURGERY_CONFIG": str(cfg)}).database_path == url
    cfg.write_text(json.dumps({"database": "t.sqlite3"}))
    assert ServingSettings.from_env({"VLLM_SURGERY_CONFIG": str(cfg)}).database_path == tmp_path / "t.sqlite3"


def test_the_store_is_a_path_or_an_object_storage_url(tmp_path: Path) -> None:
    """An s3:// store stays text; the database and snapshots then default beside the default store
    and under the cache directory (there is no local store directory to put them next to)."""
    env = {"VLLM_SURGERY_STORE": " s3://bucket/prefix ", "VLLM_SURGERY_CACHE_DIR": str(tmp_path / "cache")}
    s = ServingSettings.from_env(env)
    assert (s.store, s.cache_dir, s.cache_max_bytes) == ("s3://bucket/prefix", tmp_path / "cache", 20 << 30)
    assert s.snapshot_root == tmp_path / "cache" / ".snapshots"
    assert s.database_path == Path("~/.cache/vllm-surgery/store.sqlite3").expanduser()
    cfg = tmp_path / "serving.json"
    cfg.write_text(json.dumps({"store": "s3://bucket/other", "cache_max_bytes": 1 << 20}))
    s = ServingSettings.from_env({"VLLM_SURGERY_CONFIG": str(cfg)})
    assert (s.store, s.cache_max_bytes) == ("s3://bucket/other", 1 << 20)
    with pytest.raises(SettingsError, match="VLLM_SURGERY_CACHE_MAX_BYTES must be an integer in"):
        ServingSettings.from_env({"VLLM_SURGERY_CACHE_MAX_BYTES": "1000"})


def test_file_adapter_dirs_as_one_string(tmp_path: Path) -> None:
    cfg = tmp_path / "serving.json"
    cfg.write_text(json.dumps({"adapter_dirs": f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}"}))
    s = ServingSettings.from_env({"VLLM_SURGERY_CONFIG": str(cfg)})
    assert s.adapter_dirs == (tmp_path / "a", tmp_path / "b")
    assert s.store == DEFAULT_STORE.expanduser()


def test_environment_wins_over_file(tmp_path: Path) -> None:
    cfg = tmp_path / "serving.json"
    cfg.write_text(json.dumps({"adapter_dirs": ["from-file"], "store": "file-store"}))
    env = {
        "VLLM_SURGERY_CONFIG": str(cfg),
        "VLLM_SURGERY_ADAPTER_DIRS": str(tmp_path / "env"),
        "VLLM_SURGERY_STORE": str(tmp_path / "env-store"),
    }
    s = ServingSettings.from_env(env)
    assert s.adapter_dirs == (tmp_path / "env",)
    assert s.store == tmp_path / "env-store"
    # An empty variable counts as unset, so the file applies.
    s = ServingSettings.from_env({**env, "VLLM_SURGERY_ADAPTER_DIRS": "", "VLLM_SURGERY_STORE": " "})
    assert s.adapter_dirs == (tmp_path / "from-file",)
    assert s.store == tmp_path / "file-store"


def test_reads_os_environ_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_SURGERY_ADAPTER_DIRS", str(tmp_path))
    monkeypatch.delenv("VLLM_SURGERY_CONFIG", raising=False)
    assert ServingSettings.from_env().adapter_dirs == (tmp_path,)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"adapter_dir": ["x"]}', "unknown key"),
        ('{"adapter_dirs": 3}', "'adapter_dirs' must be"),
        ('{"adapter_dirs": ["ok", ""]}', "'adapter_dirs' must be"),
        ('{"store": 5}', "'store' must be"),
        ('{"store": ""}', "'store' must be"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_bad_file_is_a_clear_error(tmp_path: Path, content: str | bytes, message: str) -> None:
    cfg = tmp_path / "serving.json"
    if isinstance(content, bytes):
        cfg.write_bytes(content)
    else:
        cfg.write_text(content)
    with pytest.raises(SettingsError, match=message) as info:
        ServingSettings.from_env({"VLLM_SURGERY_CONFIG": str(cfg)})
    assert str(cfg) in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"VLLM_SURGERY_CONFIG=.*cannot be read"):
        ServingSettings.from_env({"VLLM_SURGERY_CONFIG": str(tmp_path / "missing.json")})


def test_calibration_dir_from_env_and_file(tmp_path: Path) -> None:
    from vllm_surgery.settings import ServingSettings as S

    assert S.from_env({}).calibration_dir is None
    assert S.from_env({"VLLM_SURGERY_CALIBRATION_DIR": str(tmp_path / "c")}).calibration_dir == tmp_path / "c"
    cfg = tmp_path / "surgery.json"
    cfg.write_text(json.dumps({"calibration_dir": "calib"}))
    assert S.from_env({"VLLM_SURGERY_CONFIG": str(cfg)}).calibration_dir == tmp_path / "calib"
    cfg.write_text(json.dumps({"calibration_dir": 3}))
    with pytest.raises(SettingsError, match="'calibration_dir' must be"):
        S.from_env({"VLLM_SURGERY_CONFIG": str(cfg)})


def test_number_and_bool_kinds_refuse_bad_text_by_variable_name() -> None:
    from vllm_surgery.settings import BOOL, number

    rate = number(0, 1)
    assert rate.from_text("0.25", "RATE") == 0.25
    for bad in ("nan", "inf", "1.5", "-0.1", "x"):
        with pytest.raises(SettingsError, match=r"RATE must be a number in \[0, 1\]"):
            rate.from_text(bad, "RATE")
    count = number(1, integer=True)
    assert count.from_json(3, "file: 'n'", Path(".")) == 3
    for bad in (True, 2.5, 0, "3"):
        with pytest.raises(SettingsError, match=r"file: 'n' must be an integer in \[1, inf\]"):
            count.from_json(bad, "file: 'n'", Path("."))
    assert BOOL.from_text(" Yes ", "FLAG") is True
    assert BOOL.from_text("off", "FLAG") is False
    with pytest.raises(SettingsError, match="FLAG must be one of"):
        BOOL.from_text("maybe", "FLAG")


def test_the_docs_show_the_settings_table_of_the_code() -> None:
    from vllm_surgery.settings import settings_table

    docs = (Path(__file__).resolve().parents[2] / "docs" / "settings.md").read_text()
    assert settings_table() in docs, "regenerate it: python -m vllm_surgery.settings"


def test_settings_table_lists_every_variable_once() -> None:
    from vllm_surgery.settings import settings_table

    table = settings_table()
    for env in ("VLLM_SURGERY_ADAPTER_DIRS", "VLLM_SURGERY_STORE", "VLLM_SURGERY_CALIBRATION_DIR"):
        assert table.count(f"`{env}`") == 1
