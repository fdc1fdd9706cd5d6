"""Starting and stopping one real `vllm serve` (via `vllm-surgery-serve`) for slow serving tests, or two
replicas of one on a shared database and store (`replica_cluster`), plus the completion and
teacher-forcing helpers that prove which adapter weights answered."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from vllm_surgery.server_process import (
    REQUEST_TIMEOUT_S,
    ServerProcess,
    ServerStartError,
    stop_process,
)
from vllm_surgery.server_process import start_server as _start
from vllm_surgery.storage import is_store_url, open_database

NEW_TOKENS = 6
LOGPROB_TOL = 1e-3  # float32 on both sides; observed differences are ~1e-6
MIN_ADAPTER_GAP = 1e-2  # two different adapters' log-probs must differ by more than this somewhere
__all__ = ["REQUEST_TIMEOUT_S", "Server", "replica_cluster", "running", "start_server", "stop"]


class Server(ServerProcess):
    """A test server: `root` is its work directory, `base` its model."""

    @property
    def root(self) -> Path:
        return self.workdir

    @property
    def base(self) -> Path:
        return self.model

    def get_text(self, path: str) -> str:
        return self.text(path)


def start_server(
    root: Path,
    base: Path,
    env_extra: dict[str, str],
    extra_args: list[str] = (),
    headers: dict[str, str] | None = None,
) -> Server:
    """Start `vllm-surgery-serve BASE` on a free port and wait until /health answers (fails the test
    with the log tail otherwise). The caller must `stop(server.proc)` or `server.stop()`."""
    try:
        return _start(base, root, env_extra, extra_args, headers=headers, cls=Server)
    except ServerStartError as e:
        pytest.fail(str(e))


stop = stop_process  # SIGTERM the server (vLLM stops engine and workers itself), then make sure its group is gone


def stop_all(servers: list[Server]) -> None:
    """Stop every server; fails the test when one left processes behind (they are killed by then)."""
    left = {srv.label: stop(srv.proc) for srv in servers}
    left = {label: pids for label, pids in left.items() if pids}
    assert not left, f"processes left behind after SIGTERM (killed now): {left}"


@contextmanager
def running(root: Path, base: Path, env_extra: dict[str, str]) -> Iterator[Server]:
    """`start_server(root, base, env_extra)` for the body of the `with`, stopped afterwards (failing
    the test when it left processes behind)."""
    srv = start_server(root, base, env_extra)
    try:
        yield srv
    finally:
        stop_all([srv])


def start_replicas(
    base: Path, root: Path, env: dict[str, str], own: dict[str, dict[str, str]] | None = None
) -> list[Server]:
    """Replicas "a" and "b" of `base` started together in ROOT/a and ROOT/b with `env` (plus `own`'s
    settings for each name), each CPU engine on a core of its own (vLLM's "auto" binding puts every
    CPU engine's threads on core 0), both healthy; fails the test (stopping both) otherwise."""
    started = []
    for name, core in (("a", "0"), ("b", "1")):
        (root / name).mkdir()
        replica = {"VLLM_SURGERY_REPLICA_ID": f"replica-{name}", "VLLM_CPU_OMP_THREADS_BIND": core}
        started.append(
            _start(
                base,
                root / name,
                {**env, **replica, **(own or {}).get(name, {})},
                label=f"replica-{name}",
                wait=False,
                cls=Server,
            )
        )
    try:
        for srv in started:
            srv.wait_healthy()
    except Exception as e:
        for srv in started:
            stop(srv.proc)
        pytest.fail(str(e))
    return started


@contextmanager
def replica_cluster(
    base: Path, root: Path, adapters: Path, store: Path | str, database: str, env_extra: dict[str, str]
) -> Iterator[dict]:
    """Two replicas, "a" and "b", of `base` serving the adapters under `adapters` from one `store` with
    one (Postgres) `database` at `database`: the store is a directory both share, or an s3:// URL, and
    then each replica has a cache directory of its own, ROOT/NAME/cache, as on separate machines
    (`env_extra` carries the S3 server's AWS_* variables). Yields {"a", "b", "db" (a Database of the
    test's own), "env" (what both replicas got), "root", "base", "adapters"}; the replicas are stopped
    afterwards (failing the test when one left processes behind)."""
    env = {
        **env_extra,
        "VLLM_SURGERY_ADAPTER_DIRS": str(adapters),
        "VLLM_SURGERY_STORE": str(store),
        "VLLM_SURGERY_DATABASE": database,
        "VLLM_PLUGINS": "vllm_surgery,vllm_surgery_api",
        "VLLM_SURGERY_POINTER_POLL_S": "2",
    }
    own = None
    if is_store_url(str(store)):  # object storage: a cache of each replica's own
        own = {name: {"VLLM_SURGERY_CACHE_DIR": str(root / name / "cache")} for name in "ab"}
    started = start_replicas(base, root, env, own)
    db = open_database(database)
    try:
        yield {
            "a": started[0],
            "b": started[1],
            "db": db,
            "env": env,
            "root": root,
            "base": base,
            "adapters": adapters,
        }
    finally:
        db.close()
        stop_all(started)


def peft_reference(base: Path, adapters: dict[str, Path]):
    """transformers+PEFT `base` in float32 with each of `adapters` loaded under its key (the first
    active), in eval mode: what teacher forcing checks the server's answers against."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    (first, path), *rest = adapters.items()
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), path, adapter_name=first
    )
    for name, other in rest:
        model.load_adapter(other, adapter_name=name)
    return model.eval()


def tokenized(base: Path, prompts: list[str]) -> list[list[int]]:
    """The token ids of each prompt with `base`'s tokenizer (no special tokens)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    return [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]


def complete(server: Server, model: str, ids: list[int]) -> tuple[int, dict]:
    return server.post(
        "/v1/completions",
        {
            "model": model,
            "prompt": ids,
            "max_tokens": NEW_TOKENS,
            "temperature": 0.0,
            "logprobs": 1,
            "ignore_eos": True,
            "return_tokens_as_token_ids": True,
        },
    )


def generated(body: dict) -> tuple[list[int], list[float]]:
    lp = body["choices"][0]["logprobs"]
    tokens = [int(t.removeprefix("token_id:")) for t in lp["tokens"]]
    return tokens, lp["token_logprobs"]


def teacher_forced(model, adapter: str, ids: list[int], gen: list[int]) -> list[float]:
    model.set_adapter(adapter)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids + gen])).logits[0].double()
    logp = torch.log_softmax(logits[len(ids) - 1 : len(ids) - 1 + len(gen)], dim=-1)
    return logp.gather(1, torch.tensor(gen).unsqueeze(1)).squeeze(1).tolist()


def assert_served_by(server: Server, name: str, prompt_ids, peft_model, expected: str, other: str) -> None:
    """Every prompt's vLLM log-probs equal `expected`'s (teacher forcing) and differ from `other`'s."""
    gap = 0.0
    for ids in prompt_ids:
        status, body = complete(server, name, ids)
        assert status == 200, f"{name}: {status} {body}\n{server.log_tail()}"
        gen, vllm_lp = generated(body)
        assert len(gen) == NEW_TOKENS
        want = teacher_forced(peft_model, expected, ids, gen)
        assert max(abs(a - b) for a, b in zip(vllm_lp, want, strict=True)) < LOGPROB_TOL, (vllm_lp, want)
        alt = teacher_forced(peft_model, other, ids, gen)
        gap = max(gap, max(abs(a - b) for a, b in zip(vllm_lp, alt, strict=True)))
    assert gap > MIN_ADAPTER_GAP, f"{name}: {expected!r} and {other!r} are indistinguishable here ({gap})"


def metric(server: Server, name: str, **labels: str) -> float:
    """A sample of the server's /metrics by name and labels (0.0 when absent: a counter not yet counted)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(server.text("/metrics")):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def refine_forced(base: Path, root: Path, name: str, out: Path) -> Path:
    """Write a refined version of `root`/adapters/`name` into `out` (a new store version directory):
    grad_direction forced on 16 calibration examples (`root`/calib.jsonl), every module, on the CPU. The
    serving tests need a servable version whose weights differ from the original's, not a good one."""
    from vllm_surgery.refine import refine
    from vllm_surgery.testing import write_calibration

    calib = write_calibration(root / "calib.jsonl", n=16)
    result = refine(
        base,
        root / "adapters" / name,
        calib,
        out,
        policy="grad_direction",
        modules="all",
        device="cpu",
        force=True,
        progress=False,
    )
    assert result.written
    return out
