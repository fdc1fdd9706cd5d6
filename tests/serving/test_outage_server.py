"""A real `vllm serve` recording traffic (VLLM_SURGERY_TRAFFIC=1) into a private Postgres server that
is killed with SIGKILL (the postmaster and its children) while client threads keep sending, and
started again on the same data directory and port a few seconds later. Every request is answered
200 throughout; afterwards every request is either a stored record or counted as dropped
(stored + dropped == sent, nothing failed), the server's log names the outage and its end, the
writer is up and new requests are recorded. The storage and worker side: test_outage.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from server import Server, metric, start_server

from vllm_surgery.storage import open_database
from vllm_surgery.testing import build_lora_adapter, build_tiny_llama
from vllm_surgery.testing_servers import PostgresServer

pytestmark = pytest.mark.slow

QUEUE = 8  # a small writer queue: the outage fills it, and the rest must be counted as dropped


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Server, PostgresServer, str]]:
    base = build_tiny_llama(tmp_path / "base", hidden=128, heads=2, kv_heads=2, layers=2, intermediate=256)
    build_lora_adapter(base, tmp_path / "adapters" / "x", r=8, alpha=16, seed=1)
    pg = PostgresServer().start()
    url = pg.new_database()
    env = {
        "VLLM_SURGERY_ADAPTER_DIRS": str(tmp_path / "adapters"),
        "VLLM_SURGERY_STORE": str(tmp_path / "store"),
        "VLLM_SURGERY_DATABASE": url,
        "VLLM_PLUGINS": "vllm_surgery,vllm_surgery_api",
        "VLLM_SURGERY_ADMIN_TOKEN": "outage-admin",
        "VLLM_SURGERY_TRAFFIC": "1",
        "VLLM_SURGERY_TRAFFIC_QUEUE_SIZE": str(QUEUE),
    }
    srv = start_server(tmp_path, base, env)
    try:
        yield srv, pg, url
    finally:
        srv.stop()
        pg.stop()


def test_serving_goes_on_and_every_record_is_stored_or_counted_across_a_postgres_kill(served) -> None:
    srv, pg, url = served
    answers: list[tuple[float, int | str, str]] = []  # (time, status or error, request id)
    stop = threading.Event()

    def client(k: int) -> None:
        i = 0
        while not stop.is_set():
            rid = f"c{k}-{i}"
            i += 1
            try:
                status, _ = srv.request(
                    "POST",
                    "/v1/completions",
                    {"model": "x", "prompt": [1, 2, 3, 4 + k], "max_tokens": 4, "temperature": 0},
                    headers={"X-Request-Id": rid},
                    timeout=60,
                )
            except OSError as e:  # no answer at all (refused, reset, timed out): a failure too
                status = f"{type(e).__name__}: {e}"
            answers.append((time.monotonic(), status, rid))

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(3)  # traffic before
        killed_at = time.monotonic()
        pg.kill()
        time.sleep(5)  # traffic while Postgres is gone
        pg.start_again()
        back_at = time.monotonic()
        time.sleep(5)  # traffic after
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not any(t.is_alive() for t in threads)
    during = [a for a in answers if killed_at <= a[0] < back_at]
    assert len(during) >= 8, f"only {len(during)} requests during the outage: too few to tell"
    assert [a for a in answers if a[1] != 200] == []  # every request answered, before, during, after
    sent = len(answers)

    db = open_database(url, create=False)
    try:
        deadline = time.monotonic() + 60
        while True:
            stored = [r.record.request_id for r in db.records("x")]
            dropped = metric(srv, "vllm_surgery_traffic_records_total", adapter="x", outcome="dropped")
            if len(stored) + dropped >= sent or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert len(stored) == len(set(stored))  # none twice
        assert set(stored) <= {a[2] for a in answers}
        assert len(stored) + dropped == sent, (len(stored), dropped, sent)  # exact accounting
        assert metric(srv, "vllm_surgery_traffic_records_total", adapter="x", outcome="logged") == len(stored)
        assert metric(srv, "vllm_surgery_traffic_records_total", adapter="x", outcome="failed") == 0
        assert metric(srv, "vllm_surgery_traffic_writer_up") == 1
        assert metric(srv, "vllm_surgery_traffic_writer_restarts_total") == 0
        log = srv.log_path.read_text(errors="replace")
        assert "traffic: database outage: " in log, srv.log_tail()
        assert "traffic: database outage over after " in log, srv.log_tail()
        print(
            f"\nsent {sent} ({len(during)} during the outage of {back_at - killed_at:.1f} s): "
            f"stored {len(stored)}, dropped {dropped:.0f}"
        )
        # recording goes on: a new request is stored
        status, _ = srv.request(
            "POST",
            "/v1/completions",
            {"model": "x", "prompt": [5, 6, 7], "max_tokens": 4},
            headers={"X-Request-Id": "after-outage"},
        )
        assert status == 200
        deadline = time.monotonic() + 30
        while db.find("after-outage") is None:
            assert time.monotonic() < deadline, "a request after the outage was not recorded"
            time.sleep(0.2)
    finally:
        db.close()
