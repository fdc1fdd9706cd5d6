"""Starting, talking to and stopping one real `vllm serve` process (through `vllm-surgery-serve`), for
the tests, the benchmarks and the demo: one implementation instead of a copy in each.

The server runs in its own session (process group), with its output in a log file; `start_server`
waits for /health and fails with the log's tail; `ServerProcess.stop` sends SIGTERM (vLLM stops its
engine and workers itself) and then makes sure nothing of the group is left; `ServerProcess.kill`
SIGKILLs the whole group at once (crash tests).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# ~25 s idle. A loaded 2-core machine has taken 110 s, and more than 240 s with several servers
# starting at once; waiting longer costs nothing when the server comes up (a process that exits is
# reported at once), so the bound is generous.
STARTUP_TIMEOUT_S = 600.0
REQUEST_TIMEOUT_S = 120.0
# Small, deterministic engine settings for tests and benchmarks on a CPU: float32 (outputs comparable
# with transformers), short context, no CUDA graphs, rank-8 LoRA, 2 adapters on the device at once.
SMALL_ENGINE_ARGS = (
    "--dtype",
    "float32",
    "--max-model-len",
    "256",
    "--enforce-eager",
    "--seed",
    "0",
    "--enable-lora",
    "--max-lora-rank",
    "8",
    "--max-loras",
    "2",
    "--max-num-seqs",
    "4",
)


class ServerStartError(RuntimeError):
    """The server exited during start-up or did not become healthy; the message holds its log's tail."""


def _inherited_settings() -> tuple[str, ...]:
    """Variables that configure the plugin or vLLM's auth: never inherited from the caller's
    environment, so a server gets exactly the settings its caller passes."""
    from .settings import ENV_CONFIG, ServingSettings

    names = {f.metadata["env"] for f in fields(ServingSettings)}
    return (ENV_CONFIG, "VLLM_PLUGINS", "VLLM_API_KEY", "VLLM_SURGERY_ADMIN_TOKEN", *sorted(names))


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    log_path: Path
    workdir: Path
    model: Path
    label: str = "server"
    headers: dict[str, str] = field(default_factory=dict)  # sent with every request (e.g. the API key)

    # ------------------------------------------------------------------ logs and HTTP
    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = REQUEST_TIMEOUT_S,
    ) -> tuple[int, dict]:
        """(status, JSON body) of one request; error statuses are returned, not raised."""
        status, _, raw = self.raw_request(method, path, body, headers, timeout)
        try:
            return status, json.loads(raw or b"{}")
        except ValueError:
            return status, {"raw": raw.decode(errors="replace")}

    def raw_request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = REQUEST_TIMEOUT_S,
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, response headers, raw body). `body` is JSON-encoded unless it is bytes."""
        all_headers = {"Content-Type": "application/json", **self.headers, **(headers or {})}
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=all_headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, dict(response.headers.items()), response.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers.items()), e.read() or b""

    def post(self, path: str, body: Any, headers: Mapping[str, str] | None = None) -> tuple[int, dict]:
        return self.request("POST", path, body, headers)

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> tuple[int, dict]:
        return self.request("GET", path, None, headers)

    def text(self, path: str) -> str:
        """The body of a GET as text (e.g. /metrics); raises urllib's HTTPError on an error status."""
        req = urllib.request.Request(self.url + path, headers=self.headers)
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as response:
            return response.read().decode()

    # ------------------------------------------------------------------ the process group
    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT_S) -> ServerProcess:
        """Return once /health answers 200. Raises ServerStartError (with the log's tail) if the
        server exits first or does not answer within `timeout` (the server is stopped then)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"{self.label} exited with {self.proc.returncode} during start-up:\n{self.log_tail()}"
                )
            with contextlib.suppress(OSError), urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                if r.status == 200:
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(f"{self.label} not healthy after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.25)

    def members(self) -> list[str]:
        return group_members(self.proc.pid)

    def stop(self, timeout: float = 30.0) -> list[str]:
        """SIGTERM, wait, then SIGKILL whatever of the group is left (see `stop_process`)."""
        return stop_process(self.proc, timeout)

    def kill(self) -> None:
        """SIGKILL every process of the group at once: a crash, nothing shuts down cleanly."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while group_members(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)

    def cpu_seconds(self, api_server_only: bool = False) -> float:
        """User + system CPU seconds of the group's live processes (API server, engine, workers), or of
        the API-server process alone (where the plugin's request-path code runs)."""
        return group_cpu_seconds(self.proc.pid, leader_only=api_server_only)


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> list[str]:
    """SIGTERM a server started in its own session, wait, then SIGKILL whatever of its group is left.
    Returns the processes that were still alive 10 s after the server exited (empty: a clean stop)."""
    pgid = proc.pid  # start_new_session=True: the server leads its own process group
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while (left := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    return left


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_stats(pgid: int) -> list[tuple[str, list[str]]]:
    """(pid and name, /proc/PID/stat fields after the name) of the group's processes."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name_end = text.rindex(")")
        rest = text[name_end + 2 :].split()
        if int(rest[2]) == pgid:
            out.append((f"{stat.parent.name} {text[: name_end + 1]}", rest))
    return out


def group_members(pgid: int) -> list[str]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    return [who for who, rest in _group_stats(pgid) if rest[0] != "Z"]


def group_cpu_seconds(pgid: int, leader_only: bool = False) -> float:
    """User + system CPU seconds of a process group's live processes (or of its leader alone): less
    sensitive than wall time to other load on a shared machine."""
    stats = _group_stats(pgid)
    if leader_only:
        stats = [(who, rest) for who, rest in stats if who.split()[0] == str(pgid)]
    ticks = sum(int(rest[11]) + int(rest[12]) for _, rest in stats)
    return ticks / os.sysconf("SC_CLK_TCK")


def start_server(
    model: str | Path,
    workdir: str | Path,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    *,
    engine_args: Sequence[str] = SMALL_ENGINE_ARGS,
    headers: Mapping[str, str] | None = None,
    label: str = "server",
    wait: bool = True,
    timeout: float = STARTUP_TIMEOUT_S,
    cls: type[ServerProcess] = ServerProcess,
) -> ServerProcess:
    """Start `vllm-surgery-serve MODEL` on a free loopback port with `engine_args` + `args`, its output
    in WORKDIR/LABEL.log, and (with `wait`) return once /health answers. The environment is the
    caller's without any plugin setting, plus VLLM_CPU_KVCACHE_SPACE=1, plus `env`. Raises
    ServerStartError (with the log's tail). The caller must `stop()` the server. `cls`: a subclass of
    ServerProcess to return (with helpers of its own)."""
    workdir = Path(workdir)
    port = free_port()
    full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    for key in _inherited_settings():
        full_env.pop(key, None)
    full_env.update(env or {})
    launcher = Path(sys.executable).parent / "vllm-surgery-serve"
    cmd = [str(launcher), str(model), "--host", "127.0.0.1", "--port", str(port), *engine_args, *args]
    log_path = workdir / f"{label}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = cls(
        url=f"http://127.0.0.1:{port}",
        proc=proc,
        log_path=log_path,
        workdir=workdir,
        model=Path(model),
        label=label,
        headers=dict(headers or {}),
    )
    return server.wait_healthy(timeout) if wait else server
