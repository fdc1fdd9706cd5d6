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


@pytest.fixture(scope="session")
def postgres_server():
    """A real Postgres server for the session (vllm_surgery/testing_servers.py), started on first use."""
    from vllm_surgery.testing_servers import PostgresServer

    server = PostgresServer().start()
    print(
        f"\nPostgres {server.bin.parent.name} started in {server.start_seconds:.2f} s on port {server.port}"
    )
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """The URL of a fresh, empty database on the session's Postgres server."""
    return postgres_server.new_database()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (SeaweedFS, vllm_surgery/testing_servers.py) for the session, started on first use."""
    from vllm_surgery.testing_servers import S3Server

    server = S3Server().start()
    print(f"\nSeaweedFS S3 started in {server.start_seconds:.2f} s on {server.endpoint}")
    yield server
    server.stop()


@pytest.fixture
def s3_url(s3_server, monkeypatch) -> str:
    """An s3:// store URL in a fresh bucket of the session's S3 server; the client finds the server and
    its credentials the standard way (AWS_* variables, set for the test)."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return f"s3://{s3_server.new_bucket()}/store"


@pytest.fixture(params=["sqlite", "postgres"])
def database_target(request, tmp_path):
    """What `open_database` opens, once per backend: a SQLite file path, or a fresh Postgres database's
    URL (the same contract is tested on both)."""
    if request.param == "sqlite":
        return tmp_path / "test.sqlite3"
    return request.getfixturevalue("postgres_url")
