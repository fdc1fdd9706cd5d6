import shutil
from pathlib import Path

import pytest

from vllm_surgery.testing import build_lora_adapter, build_tiny_llama, write_calibration


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def tiny_adapter(tiny_base, tmp_path_factory) -> Path:
    return build_lora_adapter(tiny_base, tmp_path_factory.mktemp("tiny") / "adapter")


@pytest.fixture(scope="session")
def tiny_calibration(tmp_path_factory) -> Path:
    return write_calibration(tmp_path_factory.mktemp("tiny") / "calibration.jsonl", n=16)


@pytest.fixture
def adapter_copy(tiny_adapter, tmp_path) -> Path:
    """A private copy of the tiny adapter that a test may corrupt."""
    dst = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, dst)
    return dst
