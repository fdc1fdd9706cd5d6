"""The worker, the automatic jobs and the job metrics in one process, on a real database (each test on
both backends: a SQLite file, a real Postgres server, tests/conftest.py) and a real store: a job that runs out of memory (the error injected into refine, as a GPU would raise it) fails
with what to change and leaves nothing; a stopped worker gives its job back; the collector shows the
database's figures; first-load and new-data jobs are queued exactly when the rules say, and pending
swaps are applied by the server's own HotSwapper (vLLM's serving models faked as in
test_hotswap_unit.py). The real processes are tested by the slow test_worker.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import vllm_surgery
from vllm_surgery.calibration import ADAPTER_CALIBRATION_NAME
from vllm_surgery.serving.metrics import JobsCollector
from vllm_surgery.storage import DatabaseError, open_database
from vllm_surgery.storage.database import SQLiteDatabase, TrafficRecord
from vllm_surgery.storage.store import VersionStore
from vllm_surgery.testing import GAIN_SETTINGS, build_gain_case
from vllm_surgery.worker.job_spec import job_spec, records_sha256
from vllm_surgery.worker.process import RefinementWorker, WorkerOptions, WorkerStopped

# The package exports the function `refine` lazily: resolve that export before touching the submodule,
# or importing the submodule first would leave the package attribute `refine` pointing at the module.
assert callable(vllm_surgery.refine)
refine_module = sys.modules["vllm_surgery.refine"]
UNREACHABLE = "http://127.0.0.1:9"  # nothing listens on the discard port


@pytest.fixture(scope="module")
def gain(tmp_path_factory):
    return build_gain_case(tmp_path_factory.mktemp("gain"))


@pytest.fixture
def parts(tmp_path: Path, gain, database_target):
    """The job database, the store and a worker whose adapter root holds adapter "x" (the gain case's
    adapter), as the server's VLLM_SURGERY_ADAPTER_DIRS would."""
    db = open_database(database_target)
    store = VersionStore(tmp_path / "store")
    shutil.copytree(gain.adapter, tmp_path / "adapters" / "x")
    options = WorkerOptions(
        server=UNREACHABLE, device="cpu", lease_s=30, owner="w", adapter_dirs=(tmp_path / "adapters",)
    )
    worker = RefinementWorker(db, store, options)
    yield db, store, worker
    db.close()


def records_job(parts, gain, records: list, name: str = "x", **spec_fields) -> int:
    """A job for adapter `name` of the worker's adapter root (the `parts` fixture; its database's path
    says nothing of the root: on Postgres it is a URL)."""
    db, _, worker = parts
    source = {"source": "records", "records": records, "sha256": records_sha256(records)}
    adapter_path = worker.options.adapter_dirs[0] / name
    spec = job_spec(
        base_model=str(gain.base), adapter_path=adapter_path, config=GAIN_SETTINGS, calibration=source
    )
    spec.update(spec_fields)
    return db.enqueue_job(name, "manual", spec)[0].id


def store_entries(store: VersionStore, name: str) -> list[str]:
    base = store.root / name
    return sorted(p.name for p in base.iterdir() if p.name != ".writer.lock") if base.is_dir() else []


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        MemoryError("not even one calibration example fits in the device's memory"),  # refine's own
    ],
    ids=["cuda", "planner"],
)
def test_a_job_that_does_not_fit_fails_with_what_to_change(parts, gain, monkeypatch, error) -> None:
    db, store, worker = parts
    job_id = records_job(parts, gain, gain.records())

    def out_of_memory(*args, **kwargs):
        Path(args[3]).joinpath("partial").write_text("half")  # something was being written
        raise error

    monkeypatch.setattr(refine_module, "refine", out_of_memory)
    assert worker.run(once=True) == 1
    job = db.job(job_id)
    assert job.state == "failed" and job.attempts == 1
    assert job.error.startswith(f"out of memory on cpu ({type(error).__name__}: {error}")
    for remedy in (
        '{"max_batch_tokens": 2048}',
        "--gpu-memory-utilization",
        "--device cuda:1",
        "--device cpu",
        "The adapter keeps serving its current version",
    ):
        assert remedy in job.error, remedy
    assert store_entries(store, "x") == []  # the reserved version directory is gone, nothing served
    assert job.result["timings"]["calibration"] >= 0  # how far it got


def test_a_stopped_worker_gives_its_job_back(parts, gain, monkeypatch) -> None:
    db, store, worker = parts
    job_id = records_job(parts, gain, gain.records())

    def stopped(*args, **kwargs):
        raise WorkerStopped("SIGTERM")  # what the signal handler raises in the main thread

    monkeypatch.setattr(refine_module, "refine", stopped)
    with pytest.raises(WorkerStopped):
        worker.run()
    job = db.job(job_id)
    assert (job.state, job.attempts, job.lease_owner) == ("queued", 0, None)
    assert store_entries(store, "x") == []


def test_a_finished_but_unswapped_job_stays_pending_and_a_rerun_reuses_the_version(
    parts, gain, database_target
) -> None:
    """SQLite: the server is unreachable: accepted, swap pending. Postgres (shared): the worker points
    the served pointer at the version itself (no server involved): accepted, swap done. The same job
    queued again (a worker killed after writing, say) finds the version in the store and computes
    nothing."""
    db, store, worker = parts
    shared = isinstance(database_target, str)  # a Postgres URL
    first = records_job(parts, gain, gain.records())
    assert worker.run(once=True) == 1
    job = db.job(first)
    assert (job.state, job.swap, job.result["decision"], job.result["reused"]) == (
        "accepted",
        "done" if shared else "pending",
        "accept",
        False,
    )
    if shared:
        assert job.swap_error is None
        pointer = db.served_pointer("x")
        assert (pointer.version, pointer.set_by, pointer.forced, pointer.revision) == (
            job.version,
            f"job {first}",
            False,
            1,
        )
        assert pointer.adapter_hash == store.version_info("x", job.version).adapter_hash
    else:
        assert "is unreachable" in job.swap_error
        assert db.served_pointer("x") is None  # one machine: the pointer table is not used
    assert [v.version_id for v in store.versions("x")] == [job.version]
    second = records_job(parts, gain, gain.records())
    assert worker.run(once=True) == 1
    again = db.job(second)
    assert (again.state, again.version, again.result["reused"]) == ("accepted", job.version, True)
    assert "load_model" not in again.result["timings"]  # nothing was loaded or computed
    assert len(store.versions("x")) == 1


def test_the_collector_shows_the_database_figures(database_target) -> None:
    db = open_database(database_target)
    a = db.enqueue_job("a", "manual", {}, now=time.time() - 30)[0]
    db.enqueue_job("b", "new_data", {}, now=time.time() - 20)
    db.claim_job("w", 60)
    result = {
        "version": "v1",
        "quality_before": {"loss": 2.5},
        "quality_after": {"loss": 2.0},
        "timings": {"sensitivity": 3.0, "evaluation": 0.2, "total": 4.0},
    }
    assert db.finish_job(a.id, "w", "accepted", result, "pending")
    registry = CollectorRegistry()
    registry.register(JobsCollector(db))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert value[("vllm_surgery_jobs", (("state", "accepted"),))] == 1
    assert value[("vllm_surgery_jobs", (("state", "queued"),))] == 1
    assert value[("vllm_surgery_jobs_finished_total", (("adapter", "a"), ("outcome", "accepted")))] == 1
    assert 19 < value[("vllm_surgery_job_queue_oldest_age_seconds", ())] < 120
    assert value[("vllm_surgery_job_swaps_pending", ())] == 1
    assert value[("vllm_surgery_job_heldout_loss", (("adapter", "a"), ("which", "before")))] == 2.5
    assert value[("vllm_surgery_job_heldout_loss", (("adapter", "a"), ("which", "after")))] == 2.0
    assert value[("vllm_surgery_job_stage_seconds_bucket", (("le", "2.5"), ("stage", "sensitivity")))] == 0
    assert value[("vllm_surgery_job_stage_seconds_bucket", (("le", "5.0"), ("stage", "sensitivity")))] == 1
    assert value[("vllm_surgery_job_stage_seconds_sum", (("stage", "total"),))] == 4.0
    assert value[("vllm_surgery_job_stage_seconds_count", (("stage", "write"),))] == 0
    db.close()  # a database that cannot be read: no job samples, but the scrape itself still works
    assert "vllm_surgery_jobs " not in generate_latest(registry).decode()


# ----------------------------------------------------------------------------- automatic jobs
@pytest.fixture
def auto(tmp_path: Path, gain, database_target):
    """AutomaticJobs over a real HotSwapper (vLLM's serving models faked), with "x" (traffic only)
    and "own" (carrying its calibration file) under the adapter root."""
    import vllm  # noqa: F401  (a broken vLLM must fail these tests, not skip them)
    from test_hotswap_unit import FakeModels

    from vllm_surgery.serving.automatic_jobs import AutomaticJobs
    from vllm_surgery.serving.hotswap import HotSwapper
    from vllm_surgery.settings import ServingSettings
    from vllm_surgery.traffic import AdapterCalibration

    root = tmp_path / "adapters"
    for name in ("x", "own"):
        shutil.copytree(gain.adapter, root / name)
    shutil.copy(gain.calibration, root / "own" / ADAPTER_CALIBRATION_NAME)
    settings = ServingSettings(
        adapter_dirs=(root,),
        store=tmp_path / "store",
        auto_refine=True,
        refine_min_examples=24,
        refine_new_examples=10,
        refine_min_interval_s=100.0,
        refine_settings={"heldout_fraction": 0.5},
    )
    db = open_database(database_target)
    swapper = HotSwapper(FakeModels(), settings)
    refiner = AutomaticJobs(swapper, db, str(gain.base), AdapterCalibration(settings, db))
    yield refiner
    db.close()


def record(i: int, created: float) -> TrafficRecord:
    return TrafficRecord(
        request_id=f"r{i}",
        choice=0,
        adapter="x",
        version="original",
        endpoint="completions",
        prompt=f"what is {i} + 1 ?",
        completion=f" {i + 1}",
        sampling={},
        created=created,
        calibratable=True,
    )


def test_first_load_needs_enough_data_and_is_asked_once(auto, gain) -> None:
    db, root = auto.db, auto.settings.adapter_dirs[0]
    digest = auto.swapper.validator.validate(root / "own")
    job = auto.first_load("own", root / "own", digest)
    assert job is not None and (job.trigger, job.adapter, job.state) == ("first_load", "own", "queued")
    assert job.spec["calibration"] == {
        "source": "adapter",
        "include_unrated": False,
        "since": None,
        "files": [],
        "adapter_dir": str(root / "own"),
    }
    assert job.spec["config"] == {"policy": "auto", "heldout_fraction": 0.5}
    assert job.spec["min_examples"] == 24 and job.spec["adapter_path"] == str(root / "own")
    assert auto.first_load("own", root / "own", digest).id == job.id  # once per content
    assert auto.first_load("x", root / "x", digest) is None  # no data at all
    assert len(db.jobs()) == 1


def test_new_data_queues_a_job_after_n_new_usable_examples_and_the_interval(auto) -> None:
    db = auto.db
    now = time.time()
    ids = db.insert([record(i, now - 1000 + i) for i in range(40)])
    for i in ids[:20]:
        db.add_feedback(i, "good", None, created=now - 900)
    assert auto.check_new_data(now) == []  # 20 usable: below refine_min_examples (24)
    for i in ids[20:30]:
        db.add_feedback(i, None, "fixed", created=now - 800)
    (job,) = auto.check_new_data(now)
    assert (job.adapter, job.trigger) == ("x", "new_data")
    assert auto.check_new_data(now) == []  # its job is queued
    db.claim_job("w", 60)
    db.finish_job(job.id, "w", "kept_original", {"decision": "keep_original"})
    for i in ids[30:40]:
        db.add_feedback(i, "good", None, created=time.time() + 1)
    later = time.time() + 2
    assert auto.check_new_data(later) == []  # 10 new, but the last job is younger than the interval
    (again,) = auto.check_new_data(job.created + 101)
    assert again.id != job.id and again.dedupe_key == f"new_data:x:after:{job.id}"


def test_one_adapters_failing_check_does_not_stop_the_others(auto, caplog) -> None:
    db = auto.db
    now = time.time()
    ids = db.insert(
        [record(i, now - 1000 + i) for i in range(30)]
        + [dataclasses.replace(record(100 + i, now - 1000 + i), adapter="own") for i in range(30)]
    )
    for i in ids:
        db.add_feedback(i, "good", None, created=now - 900)
    given = auto.calibration

    def calibration(name, *args):
        if name == "own":
            raise OSError("own: surgery_calibration.jsonl: Input/output error")
        return given(name, *args)

    auto.calibration = calibration
    with caplog.at_level(logging.ERROR):
        (job,) = auto.check_new_data(now)
    assert job.adapter == "x"
    (failed,) = [r for r in caplog.records if "new-data check of 'own' failed" in r.getMessage()]
    assert "Input/output error" in failed.exc_text


def test_a_failing_step_of_the_periodic_check_does_not_skip_the_next(auto, caplog) -> None:
    ran = []

    def broken(now=None):
        ran.append("new data")
        raise RuntimeError("the new-data check broke")

    async def swaps():
        ran.append("swaps")
        raise DatabaseError("the swap sweep lost the database")

    auto.check_new_data = broken
    auto.swap_pending = swaps
    auto.prune_history = lambda now=None: ran.append("prune")
    auto.forget_replicas = lambda now=None: ran.append("forget")
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="new-data check broke"):
        asyncio.run(auto.check())
    assert ran == ["new data", "swaps", "prune", "forget"]
    assert any("pending swaps failed too: the swap sweep lost" in r.getMessage() for r in caplog.records)


def test_pending_swaps_are_applied_or_recorded_as_refused(auto, gain) -> None:
    db, store, root = auto.db, auto.swapper.store, auto.settings.adapter_dirs[0]
    out = store.new_version_dir("x")
    result = refine_module.refine(
        gain.base, root / "x", gain.calibration, out, **GAIN_SETTINGS, progress=False
    )
    assert result.decision == "accept"
    good = db.enqueue_job("x", "manual", {})[0]
    db.claim_job("w", 60)
    db.finish_job(good.id, "w", "accepted", {"version": out.name}, "pending")
    stale = db.enqueue_job("own", "manual", {})[0]  # its version is not in the store: refused
    db.claim_job("w", 60)
    db.finish_job(stale.id, "w", "accepted", {"version": "20990101T000000000000Z-00000000"}, "pending")
    done = asyncio.run(auto.swap_pending())
    assert sorted(done) == sorted([(good.id, "done"), (stale.id, "failed")])
    assert db.job(good.id).swap == "done" and db.job(good.id).result["timings"]["swap"] >= 0
    assert auto.swapper.served_path("x").endswith(out.name)
    assert json.loads((store.root / "x" / "served.json").read_text())["version"] == out.name
    assert db.job(stale.id).swap == "failed" and "has no complete version" in db.job(stale.id).swap_error
    assert asyncio.run(auto.swap_pending()) == []  # nothing pending any more


# ----------------------------------------------------------------------------- rows are not trusted
def _lying_rows(tmp_path: Path, gain) -> dict[str, tuple[str, dict]]:
    """adapter -> (row's adapter name, spec fields) of rows an attacker with database access writes:
    each names something outside the worker's roots, or paths that disagree with the names."""
    outside = tmp_path / "outside"
    shutil.copytree(gain.adapter, outside / "x")
    shutil.copytree(gain.adapter, outside / "ghost")
    (outside / "cal.jsonl").write_text(gain.calibration.read_text())
    (tmp_path / "calibration").mkdir()
    (tmp_path / "calibration" / "cal.jsonl").write_text(gain.calibration.read_text())
    in_root = str(tmp_path / "adapters" / "x")
    adapter_source = {"source": "adapter", "include_unrated": False, "since": None}
    return {
        "the row's adapter_path": ("x", {"adapter_path": str(outside / "x")}),
        "is not in any adapter root": ("ghost", {"adapter_path": str(outside / "ghost")}),
        "contains '..'": ("..x", {"adapter_path": str(outside / "x")}),
        "the row's calibration path": (
            "x",
            {
                "adapter_path": in_root,
                "calibration": {"source": "file", "name": "cal.jsonl", "path": str(outside / "cal.jsonl")},
            },
        ),
        "is not a file name in the calibration directory": (
            "x",
            {
                "adapter_path": in_root,
                "calibration": {"source": "file", "name": "../../etc/passwd", "path": "/etc/passwd"},
            },
        ),
        "the row's adapter_dir": (
            "x",
            {
                "adapter_path": in_root,
                "calibration": {**adapter_source, "files": [], "adapter_dir": str(outside / "x")},
            },
        ),
        "calibration path": (
            "x",
            {
                "adapter_path": in_root,
                "calibration": {**adapter_source, "files": [str(outside / "cal.jsonl")], "adapter_dir": None},
            },
        ),
    }


def test_a_row_naming_paths_outside_the_roots_fails_and_writes_nothing(tmp_path: Path, gain) -> None:
    """Finding 7: rows written by SQL. Before, the worker refined whatever adapter_path named and wrote
    the result into the store."""
    db = SQLiteDatabase(tmp_path / "jobs.sqlite3")
    store = VersionStore(tmp_path / "store")
    shutil.copytree(gain.adapter, tmp_path / "adapters" / "x")
    options = WorkerOptions(
        server=UNREACHABLE,
        device="cpu",
        lease_s=30,
        owner="w",
        adapter_dirs=(tmp_path / "adapters",),
        calibration_dir=tmp_path / "calibration",
    )
    worker = RefinementWorker(db, store, options)
    rows = _lying_rows(tmp_path, gain)
    records = gain.records()
    ids = {}
    for problem, (name, fields) in rows.items():
        source = {"source": "records", "records": records, "sha256": records_sha256(records)}
        spec = job_spec(base_model=str(gain.base), adapter_path="", config=GAIN_SETTINGS, calibration=source)
        spec.update(fields)
        with db.transaction() as c:  # as an attacker would: straight into the table
            ids[problem] = c.execute(
                "INSERT INTO jobs (adapter, trigger, state, spec, created, max_attempts) "
                "VALUES (?, 'manual', 'queued', ?, ?, 3) RETURNING id",
                (name, json.dumps(spec), time.time()),
            ).fetchone()[0]
    try:
        assert worker.run(drain=True) == len(rows)
        for problem, job_id in ids.items():
            job = db.job(job_id)
            assert (job.state, job.version) == ("failed", None), (problem, job)
            assert problem in job.error and "refused" in job.error, (problem, job.error)
        assert (
            not (tmp_path / "store").exists()
            or [p for p in (tmp_path / "store").rglob("*") if p.name != ".writer.lock"] == []
        )
    finally:
        db.close()


def test_a_cancelled_running_job_writes_nothing_and_the_worker_goes_on(parts, gain, monkeypatch) -> None:
    """The cancel arrives while refine() runs; the last check (under the writer lock, before the
    version is visible) stops it, and the next job runs."""
    db, store, worker = parts
    first = records_job(parts, gain, gain.records())
    second = records_job(parts, gain, gain.records())
    real_refine = refine_module.refine

    def cancelled_meanwhile(*args, **kwargs):
        if db.job(first).state == "running":
            assert db.cancel_job(first)[1] == "cancelling"
        return real_refine(*args, **kwargs)

    monkeypatch.setattr(refine_module, "refine", cancelled_meanwhile)
    assert worker.run(once=True) == 1
    job = db.job(first)
    assert (job.state, job.version, job.lease_owner) == ("cancelled", None, None)
    assert "wrote nothing" in job.error
    assert store.versions("x") == [] and store_entries(store, "x") == []
    assert worker.run(once=True) == 1  # the worker goes on: the next job runs and is accepted
    assert db.job(second).state == "accepted" and [v.version_id for v in store.versions("x")] == [
        db.job(second).version
    ]


def test_the_worker_command_fails_clearly_when_the_server_does_not_answer(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_SURGERY_")}
    env.update(VLLM_SURGERY_STORE=str(tmp_path / "store"), VLLM_SURGERY_DATABASE=str(tmp_path / "db.sqlite3"))
    done = subprocess.run(
        [sys.executable, "-m", "vllm_surgery.cli", "worker", "--server", UNREACHABLE, "--device", "cpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert f"the server at {UNREACHABLE} is unreachable" in done.stderr
    assert "Connection refused" in done.stderr and "start the server first, or fix --server" in done.stderr
    assert "stopped after" not in done.stderr


def test_the_worker_needs_a_server_only_with_a_sqlite_database(tmp_path: Path, postgres_url: str) -> None:
    """SQLite: no --server is a settings error (exit 2, saying why). Postgres (shared): none is needed,
    the worker starts and (--drain, nothing queued) stops at once."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_SURGERY_")}
    command = [sys.executable, "-m", "vllm_surgery.cli", "worker", "--device", "cpu", "--drain"]
    lite = {
        **env,
        "VLLM_SURGERY_STORE": str(tmp_path / "store"),
        "VLLM_SURGERY_DATABASE": str(tmp_path / "db.sqlite3"),
    }
    done = subprocess.run(command, env=lite, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--server is needed with the SQLite database" in done.stderr
    shared = {**lite, "VLLM_SURGERY_DATABASE": postgres_url}
    done = subprocess.run(command, env=shared, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "server none (accepted versions: the shared served pointer)" in done.stderr
    assert "stopped after 0 job(s)" in done.stderr


def test_a_worker_given_the_servers_model_refuses_a_row_naming_another(parts, gain, tmp_path: Path) -> None:
    db, store, _ = parts
    records = gain.records()
    elsewhere = records_job(parts, gain, records, base_model=str(tmp_path / "attackers-model"))
    served = records_job(parts, gain, records)
    options = WorkerOptions(
        server=UNREACHABLE,
        device="cpu",
        lease_s=30,
        owner="w",
        adapter_dirs=(tmp_path / "adapters",),
        base_models=(str(gain.base),),
    )
    worker = RefinementWorker(db, store, options)
    assert worker.run(drain=True) == 2
    refused = db.job(elsewhere)
    assert refused.state == "failed" and refused.version is None
    assert (
        f"the row's base_model {str(tmp_path / 'attackers-model')!r} is not one of this worker's --model"
        in (refused.error)
    )
    assert db.job(served).state == "accepted"  # the server's own base model runs
    assert [v.version_id for v in store.versions("x")] == [db.job(served).version]


def test_automatic_jobs_are_not_queued_with_settings_a_job_cannot_run(auto, gain, caplog) -> None:
    """VLLM_SURGERY_REFINE_SETTINGS meets the check the refine route and the worker apply: a job that
    could only fail in the worker is not queued, and the log names the setting and the limit."""
    from dataclasses import replace

    from test_hotswap_unit import FakeModels

    from vllm_surgery.serving.automatic_jobs import AutomaticJobs
    from vllm_surgery.serving.hotswap import HotSwapper
    from vllm_surgery.traffic import AdapterCalibration

    settings = replace(auto.settings, refine_settings={"heldout_fraction": 0.5, "samples": 10**15})
    refiner = AutomaticJobs(
        HotSwapper(FakeModels(), settings), auto.db, str(gain.base), AdapterCalibration(settings, auto.db)
    )
    root = settings.adapter_dirs[0]
    digest = refiner.swapper.validator.validate(root / "own")
    with caplog.at_level("ERROR"):
        assert refiner.first_load("own", root / "own", digest) is None
    assert auto.db.jobs() == []
    assert "VLLM_SURGERY_REFINE_SETTINGS cannot be run by a job" in caplog.text
    assert "'samples' is 1e+15; a refinement job allows at most 1,000,000" in caplog.text


def test_a_lora_modules_adapter_is_found_where_the_worker_was_told(parts, gain, tmp_path: Path) -> None:
    """The server's --lora-modules adapters live in no root: the worker is given them the same way."""
    db, store, _ = parts
    shutil.copytree(gain.adapter, tmp_path / "static" / "lm")
    records = gain.records()
    source = {"source": "records", "records": records, "sha256": records_sha256(records)}

    def queue(adapter_path: Path) -> int:
        spec = job_spec(
            base_model=str(gain.base), adapter_path=adapter_path, config=GAIN_SETTINGS, calibration=source
        )
        return db.enqueue_job("lm", "manual", spec)[0].id

    moved = queue(tmp_path / "adapters" / "x")  # the row says another directory
    served = queue(tmp_path / "static" / "lm")
    options = WorkerOptions(
        server=UNREACHABLE,
        device="cpu",
        lease_s=30,
        owner="w",
        adapter_dirs=(tmp_path / "adapters",),
        lora_modules=(("lm", tmp_path / "static" / "lm"),),
    )
    assert RefinementWorker(db, store, options).run(drain=True) == 2
    assert db.job(moved).state == "failed" and "the row's adapter_path" in db.job(moved).error
    assert db.job(served).state == "accepted"
    assert [v.version_id for v in store.versions("lm")] == [db.job(served).version]


def test_with_a_canary_share_the_worker_leaves_the_pointer_to_a_servers_canary(
    tmp_path: Path, gain, postgres_url: str
) -> None:
    """Postgres, VLLM_SURGERY_CANARY_SHARE > 0: the accepted version is not pointed at; its swap stays
    pending for a server's sweep, which starts its canary (docs/canary.md)."""
    db = open_database(postgres_url)
    try:
        store = VersionStore(tmp_path / "store")
        shutil.copytree(gain.adapter, tmp_path / "adapters" / "x")
        options = WorkerOptions(
            server=None, device="cpu", owner="w", adapter_dirs=(tmp_path / "adapters",), canary_share=0.2
        )
        worker = RefinementWorker(db, store, options)
        job_id = records_job((db, store, worker), gain, gain.records())
        assert worker.run(once=True) == 1
        job = db.job(job_id)
        assert (job.state, job.swap, job.swap_error) == ("accepted", "pending", None)
        assert db.served_pointer("x") is None and [j.id for j in db.pending_swaps()] == [job_id]
    finally:
        db.close()
