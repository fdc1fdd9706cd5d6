"""Adapter names come from requests: only bare names under a root may ever reach the filesystem."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vllm_surgery.names import MAX_NAME_LENGTH, InvalidAdapterName, path_under, validate_adapter_name


@pytest.mark.parametrize("name", ["math", "math-v2", "llama_3.1-lora", "A", "x" * MAX_NAME_LENGTH, "a.b"])
def test_valid_names_pass_unchanged(name: str) -> None:
    assert validate_adapter_name(name) == name


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("x" * (MAX_NAME_LENGTH + 1), "characters long"),
        ("/etc/passwd", "absolute"),
        ("/abs", "absolute"),
        ("\\windows", "absolute"),
        ("../etc", "separator"),
        ("a/b", "separator"),
        ("a\\b", "separator"),
        ("..", "'..'"),
        ("a..b", "'..'"),
        (".hidden", "starts with '.'"),
        (".", "starts with '.'"),
        ("name with space", "outside"),
        ("naïve", "outside"),
        ("a\x00b", "outside"),
        ("a:b", "outside"),
        ("~root", "outside"),
    ],
)
def test_invalid_names_are_refused_with_a_reason(name: str, why: str) -> None:
    with pytest.raises(InvalidAdapterName, match=why):
        validate_adapter_name(name)


def test_invalid_name_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        validate_adapter_name("../x")


def test_non_string_is_refused() -> None:
    with pytest.raises(InvalidAdapterName, match="string"):
        validate_adapter_name(None)  # type: ignore[arg-type]


def test_path_under_joins_inside_the_root(tmp_path: Path) -> None:
    assert path_under(tmp_path, "math") == tmp_path.resolve() / "math"
    # The target need not exist (the store creates directories later).
    assert not (tmp_path / "math").exists()


def test_path_under_validates_the_name(tmp_path: Path) -> None:
    with pytest.raises(InvalidAdapterName):
        path_under(tmp_path, "../outside")


def test_path_under_refuses_a_symlink_leaving_the_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "escape")
    with pytest.raises(InvalidAdapterName, match="outside its root"):
        path_under(root, "escape")


def test_path_under_accepts_a_symlinked_root(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "link")
    assert path_under(tmp_path / "link", "math") == real.resolve() / "math"
