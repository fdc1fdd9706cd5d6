"""A real, throw-away Postgres server for the tests (no mocks): initdb into a temporary directory,
`pg_ctl start` on a free port of 127.0.0.1 with its socket in that directory, one fresh database per
test (`PostgresServer.new_database`), stopped and removed at the end of the session.

Debian's postgresql package puts the server binaries in /usr/lib/postgresql/<major>/bin, off the
PATH. initdb refuses to run as root, so as root every server command runs as the `postgres` user
(which owns the directory); as any other user, as that user. When no initdb is found the fixture
fails with what to install: CI installs it (.ci/run), a skip would hide the backend from the tests.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
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

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
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


def run_sql(db, statement: str, params: tuple = ()) -> list:
    """Run one statement in a transaction of `db` (either backend) and return its rows (none for a
    statement that returns none). Written with SQLite's ``?`` placeholders; Postgres gets ``%s``."""
    from vllm_surgery.storage import SQLiteDatabase

    if not isinstance(db, SQLiteDatabase):
        statement = statement.replace("?", "%s")
    with db.transaction() as c:
        cursor = c.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def table_columns(db, table: str) -> set[str]:
    """The column names of `table` in `db` (either backend)."""
    from vllm_surgery.storage import SQLiteDatabase

    if isinstance(db, SQLiteDatabase):
        return {row[1] for row in run_sql(db, f"PRAGMA table_info({table})")}
    rows = run_sql(db, "SELECT column_name FROM information_schema.columns WHERE table_name = ?", (table,))
    return {row[0] for row in rows}
