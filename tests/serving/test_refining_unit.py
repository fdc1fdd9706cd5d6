"""Store keys, find/remember/recall, refine-request parsing, and the refine route's answer (a store
hit at once, else a queued job in a real SQLite file), without a server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_surgery.adapter import load_adapter
from vllm_surgery.config import SurgeryConfig
from vllm_surgery.serving.api.refinements import RefineError, parse_request
from vllm_surgery.storage.store import KEY_CONFIG_FIELDS, StoreError, VersionStore, key_of_record, version_key
from vllm_surgery.worker.job_spec import records_sha256

CALIB_SHA = "c" * 64


def key(config: SurgeryConfig, adapter_hash: str = "a" * 64, base: str = "/models/base") -> str:
    return version_key(adapter_hash, base, config.to_dict(), CALIB_SHA)


def test_version_key_is_deterministic_and_covers_every_result_field() -> None:
    k = key(SurgeryConfig())
    assert k == key(SurgeryConfig()) and len(k) == 64
    assert k != key(SurgeryConfig(), adapter_hash="b" * 64)
    assert k != key(SurgeryConfig(), base="/models/other")
    assert k != version_key("a" * 64, "/models/base", SurgeryConfig().to_dict(), "d" * 64)
    changed = {
        "policy": "abs_select",
        "policy_params": {"eta_s": 2.0},
        "constraint": "none",
        "modules": "all",
        "layers": (0, 1),
        "heldout_fraction": 0.5,
        "selection_fraction": 0.3,
        "correction_weight": 2.0,
        "min_improvement": 0.0,
        "min_loss_reduction": 0.0,
        "max_false_accept": 0.1,
        "gate_statistic": "t",
        "samples": 8,
        "max_length": 64,
        "seed": 1,
    }
    assert set(changed) == set(KEY_CONFIG_FIELDS)
    keys = {key(SurgeryConfig(**{f: v})) for f, v in changed.items()}
    assert len(keys) == len(changed) and k not in keys
    # Speed-only settings and force do not change the key.
    assert k == key(SurgeryConfig(device="cpu", max_batch_tokens=64, force=True, progress=False))
    # A tuple and the list surgery.json stores it as are the same key.
    cfg = SurgeryConfig(layers=(0, 1)).to_dict()
    assert version_key("a", "b", cfg, "c") == version_key("a", "b", json.loads(json.dumps(cfg)), "c")
    with pytest.raises(StoreError):
        version_key("a", "b", {"policy": "x"}, "c")


def test_records_sha256_matches_load_calibration(tiny_base: Path) -> None:
    from transformers import AutoTokenizer

    from vllm_surgery.calibration import load_calibration

    records = [{"prompt": "what is 1 + 2 ?", "completion": " 3"}, {"completion": " 5", "prompt": "2 + 3"}]
    tok = AutoTokenizer.from_pretrained(tiny_base)
    assert load_calibration(records, tok).sha256 == records_sha256(records)


def test_find_locates_a_version_written_by_refine(
    tmp_path: Path, tiny_base: Path, tiny_adapter: Path, tiny_calibration: Path
) -> None:
    import hashlib

    from vllm_surgery.refine import refine

    store = VersionStore(tmp_path / "store")
    config = SurgeryConfig(modules="all", device="cpu", force=True, progress=False)
    out = store.new_version_dir("math")
    result = refine(tiny_base, tiny_adapter, tiny_calibration, out, config)
    assert result.written
    k = version_key(
        load_adapter(tiny_adapter).content_hash(),
        str(tiny_base),
        config.to_dict(),
        hashlib.sha256(tiny_calibration.read_bytes()).hexdigest(),
    )
    (info,) = store.versions("math")
    assert info.key == k == key_of_record(info.record)
    assert store.find("math", k) == out
    assert store.find("math", "0" * 64) is None
    assert store.find("other", k) is None


def test_remember_and_recall(tmp_path: Path) -> None:
    store = VersionStore(tmp_path / "store")
    k = "e" * 64
    assert store.recall("math", k) is None
    path = store.remember("math", k, {"decision": "keep_original", "reason": "no win"})
    assert path.parent.name == ".outcomes"
    assert store.recall("math", k)["decision"] == "keep_original"
    assert store.versions("math") == []  # a remembered outcome is not a version
    assert store.find("math", k) is None
    path.write_text("{broken")
    assert store.recall("math", k) is None
    with pytest.raises(StoreError):
        store.remember("math", "../../x", {})


RECORDS = [{"prompt": "1 + 1", "completion": " 2"}, {"prompt": "2 + 2", "completion": " 4"}]


def test_parse_request_inline_records() -> None:
    req = parse_request({"records": RECORDS, "policy": "abs_select", "layers": [0, 1]}, None)
    assert req.swap is True and req.examples == 2
    assert req.calibration == {"source": "records", "records": RECORDS, "sha256": records_sha256(RECORDS)}
    assert req.config.policy == "abs_select" and req.config.layers == (0, 1) and not req.config.force
    assert req.fields == {"policy": "abs_select", "layers": [0, 1]}  # JSON values, as the job spec keeps them
    assert req.config.progress is False
    assert req.calibration_sha256 == records_sha256(RECORDS)
    assert parse_request({"records": RECORDS}, None).config.policy == "auto"  # a job's default


def test_parse_request_calibration_file(tmp_path: Path) -> None:
    (tmp_path / "math.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS))
    req = parse_request({"calibration": "math.jsonl", "swap": False}, tmp_path)
    path = (tmp_path / "math.jsonl").resolve()
    assert req.calibration == {
        "source": "file",
        "name": "math.jsonl",  # what the worker resolves under its own calibration directory
        "path": str(path),
        "sha256": req.calibration_sha256,
    }
    assert req.swap is False and req.examples is None
    with pytest.raises(RefineError) as e:
        parse_request({"calibration": "nope.jsonl"}, tmp_path)
    assert e.value.status == 404


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ([], "JSON object"),
        ({"records": RECORDS, "device": "cuda"}, "unknown field"),
        ({}, "exactly one of"),
        ({"records": RECORDS, "calibration": "a.jsonl"}, "exactly one of"),
        ({"records": []}, "non-empty list"),
        ({"records": [*RECORDS, {"prompt": "3 +"}]}, "record 2: missing 'completion'"),
        ({"records": RECORDS, "policy": "nope"}, "unknown policy"),
        ({"records": RECORDS, "heldout_fraction": 1.5}, "heldout_fraction"),
        ({"records": RECORDS, "heldout_fraction": "x"}, "invalid settings: heldout_fraction must be"),
        # wrong JSON types: each a 400 naming the field, never a crash later
        ({"records": RECORDS, "modules": 5}, "invalid settings: modules must be"),
        ({"records": RECORDS, "layers": [0]}, "invalid settings: layers must be"),
        ({"records": RECORDS, "layers": [0, 1, 2]}, "invalid settings: layers must be"),
        ({"records": RECORDS, "layers": {}}, "invalid settings: layers must be"),
        ({"records": RECORDS, "samples": 2.5}, "invalid settings: samples must be"),
        ({"records": RECORDS, "seed": "x"}, "invalid settings: seed must be"),
        ({"records": RECORDS, "seed": 2**70}, "invalid settings: seed must be"),
        ({"records": RECORDS, "force": True}, "'force' is not available here"),
        ({"records": RECORDS, "device": "cpu"}, "unknown field"),
        (
            {"records": RECORDS, "heldout_fraction": 0.0, "policy": "grad_direction"},
            "heldout_fraction must be > 0",
        ),
        ({"records": RECORDS, "swap": "yes"}, "'swap'"),
        ({"calibration": "../etc/passwd"}, "calibration file name"),
        ({"calibration": "/etc/passwd"}, "calibration file name"),
        ({"calibration": ".hidden"}, "calibration file name"),
        # bounds a job has beyond SurgeryConfig's own: refused when queued, not in the worker later
        (
            {"records": RECORDS, "samples": 1e15},
            "'samples' is 1e+15; a refinement job allows at most 1,000,000",
        ),
        ({"records": RECORDS, "samples": 10**15}, "a refinement job allows at most 1,000,000"),
        (
            {"records": RECORDS, "max_length": 1e12},
            "'max_length' is 1e+12; a refinement job allows",
        ),
        (
            {"records": RECORDS, "max_batch_tokens": 10**12},
            "'max_batch_tokens' is 1e+12; a refinement job allows at most 16,777,216",
        ),
        ({"records": RECORDS, "modules": ["../../etc"]}, "'modules' entry '../../etc' is not a module name"),
        ({"records": RECORDS, "modules": "q_proj,/etc/passwd"}, "'modules' entry '/etc/passwd'"),
        ({"records": RECORDS, "modules": ["q_proj"] * 1025}, "'modules' names 1025 modules"),
    ],
)
def test_parse_request_refusals(tmp_path: Path, body, needle: str) -> None:
    with pytest.raises(RefineError) as e:
        parse_request(body, tmp_path)
    assert e.value.status == 400
    assert needle in str(e.value)


def test_named_calibration_needs_a_directory() -> None:
    with pytest.raises(RefineError) as e:
        parse_request({"calibration": "math.jsonl"}, None)
    assert e.value.status == 400 and "VLLM_SURGERY_CALIBRATION_DIR" in str(e.value)


class FakeSwapper:
    """What RefineRoute uses of a HotSwapper, with no engine: an original, a store, settings."""

    def __init__(self, root: Path, original: Path) -> None:
        from vllm_surgery.settings import ServingSettings

        self.original = original
        self.store = VersionStore(root / "store")
        self.settings = ServingSettings(adapter_dirs=(), store=root / "store")
        self.swaps: list[tuple[str, str]] = []

    def original_of(self, name: str) -> Path:
        return self.original

    def served_path(self, name: str) -> str:
        return str(self.original)

    def version_of(self, name: str, path: str | None) -> str:
        return "original"

    async def swap(self, name: str, version: str, *, by: str = "admin") -> None:
        self.swaps.append((name, version))


def test_refine_requests_are_queued_once_and_store_hits_answer_at_once(
    tmp_path: Path, tiny_adapter: Path
) -> None:
    import asyncio

    from vllm_surgery.serving.api.refinements import RefineRoute
    from vllm_surgery.storage.database import SQLiteDatabase

    swapper = FakeSwapper(tmp_path, tiny_adapter)
    queue = RefineRoute(swapper, "/models/base", SQLiteDatabase(tmp_path / "jobs.sqlite3"))  # type: ignore[arg-type]
    body = {"records": RECORDS, "seed": 1}
    k = queue.key(tiny_adapter, parse_request(body, None))

    async def scenario() -> None:
        status, answer = await queue.refine("math", body)
        assert status == 202 and answer["queued"] and answer["state"] == "queued" and answer["key"] == k
        assert answer["location"] == f"/v1/surgery/jobs/{answer['job_id']}"
        job = queue.db.job(answer["job_id"])
        assert (job.adapter, job.trigger, job.spec["base_model"], job.spec["config"]) == (
            "math",
            "manual",
            "/models/base",
            {"policy": "auto", "seed": 1},
        )
        assert job.spec["calibration"]["records"] == RECORDS and job.spec["adapter_path"] == str(tiny_adapter)
        assert "records" not in answer["job"]["spec"]["calibration"]  # never shown back
        status, again = await queue.refine("math", body)  # the same request while queued: the same job
        assert status == 202 and again["job_id"] == answer["job_id"] and not again["queued"]
        # Once the store holds the outcome (a remembered keep_original here), it answers at once.
        swapper.store.remember("math", k, {"decision": "keep_original", "reason": "no win"})
        status, cached = await queue.refine("math", body)
        assert status == 200 and cached["cached"] and cached["decision"] == "keep_original"
        assert cached["version"] is None and cached["swapped"] is False and swapper.swaps == []

    asyncio.run(scenario())
    assert len(queue.db.jobs()) == 1
    queue.db.close()


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"samples": 1e15}, "'samples' is 1e+15; a refinement job allows at most 1,000,000: lower it"),
        ({"max_length": 1e12}, "'max_length' is 1e+12; a refinement job allows at most 1,048,576"),
        ({"modules": ["../../etc"]}, "'modules' entry '../../etc' is not a module name"),
        ({"heldout_fraction": 0.0, "policy": "grad_direction"}, "heldout_fraction must be > 0"),
        ({"force": True}, "'force' is not allowed"),
    ],
)
def test_the_worker_refuses_a_rows_settings_as_the_route_does(settings, needle: str) -> None:
    """A row written straight into the database meets the check the refine route applies."""
    from vllm_surgery.errors import ConfigError
    from vllm_surgery.worker.job_spec import spec_config

    with pytest.raises(ConfigError) as e:
        spec_config({"config": {"policy": "auto", **settings}}, progress=False)
    assert needle in str(e.value)
    if "force" not in settings:  # the route refuses force earlier, in the body's own check
        with pytest.raises(RefineError) as route:
            parse_request({"records": RECORDS, **settings}, None)
        assert route.value.status == 400 and needle in str(route.value)


def test_module_names_and_sizes_within_the_bounds_are_queued() -> None:
    req = parse_request(
        {"records": RECORDS, "samples": 1_000_000, "max_length": 4096, "modules": ["q_proj", "layers.0.mlp"]},
        None,
    )
    assert (req.config.samples, req.config.max_length) == (1_000_000, 4096)
    assert req.fields["modules"] == ["q_proj", "layers.0.mlp"]


def test_a_job_shown_without_the_admin_token_has_no_paths_and_no_worker_identity() -> None:
    from vllm_surgery.serving.api.jobs import describe_job
    from vllm_surgery.storage import Job

    job = Job(
        id=7,
        adapter="x",
        trigger="manual",
        state="failed",
        spec={
            "base_model": "/srv/models/base",
            "adapter_path": "/srv/adapters/x",
            "config": {"policy": "auto", "seed": 3},
            "calibration": {"source": "file", "name": "c.jsonl", "path": "/srv/cal/c.jsonl", "sha256": "ab"},
            "swap": True,
            "min_examples": None,
        },
        dedupe_key=None,
        created=1.0,
        started=2.0,
        finished=3.0,
        lease_owner="host-a:4242:abcdef",
        lease_expires=None,
        heartbeat=2.5,
        attempts=1,
        max_attempts=3,
        error="/srv/adapters/x/adapter_model.safetensors: bad header. The server at http://127.0.0.1:8000/v1 said so",
        result={"calibration": {"summary": "12 examples from /srv/cal/c.jsonl"}, "timings": {}},
        swap=None,
        swap_error=None,
    )
    full = describe_job(job)
    assert full["lease_owner"] == "host-a:4242:abcdef" and full["spec"]["adapter_path"] == "/srv/adapters/x"
    public = describe_job(job, full=False)
    assert "/srv" not in json.dumps(public) and "host-a" not in json.dumps(public)
    assert public["lease_owner"] is None and public["spec"]["base_model"] is None
    assert public["spec"]["adapter_path"] == "…/x"
    assert public["spec"]["calibration"] == {
        "source": "file",
        "name": "c.jsonl",
        "path": "…/c.jsonl",
        "sha256": "ab",
    }
    assert public["error"] == (
        "…/adapter_model.safetensors: bad header. The server at http://127.0.0.1:8000/v1 said so"
    )
    assert public["calibration"]["summary"] == "12 examples from …/c.jsonl"
    assert public["spec"]["config"] == {"policy": "auto", "seed": 3} and public["state"] == "failed"
