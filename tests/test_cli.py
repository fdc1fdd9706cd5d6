"""The installed `vllm-surgery` command, run as users run it."""

import json
import subprocess
import sys
from pathlib import Path

# The console script pip installed next to this interpreter: the command users type.
SCRIPT = Path(sys.executable).parent / "vllm-surgery"
CLI = [str(SCRIPT)]


def run(*args):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300)


def refine_args(base, adapter, calibration, output) -> list:
    return [
        "refine",
        "--base-model",
        base,
        "--adapter",
        adapter,
        "--calibration",
        calibration,
        "--output",
        output,
    ]


def test_console_script_is_installed():
    assert SCRIPT.is_file(), "pip install -e . should provide the vllm-surgery command"
    p = run("--help")
    assert p.returncode == 0 and "refine" in p.stdout and "inspect" in p.stdout


def test_refine_force_writes_adapter_report_and_prints_decision(
    tiny_base, tiny_adapter, tiny_calibration, tmp_path
):
    out, report = tmp_path / "refined", tmp_path / "report.json"
    p = run(
        *refine_args(tiny_base, tiny_adapter, tiny_calibration, out),
        "--policy",
        "auto",
        "--policy-param",
        "sigma_descent.eta_s=1.5",
        "--modules",
        "all",
        "--layers",
        "0:1",
        "--samples",
        "12",
        "--force",
        "--quiet",
        "--report",
        report,
    )
    assert p.returncode == 0, p.stderr
    # 12 examples, 3 held out: the smallest p-value (1/8) cannot pass max_false_accept 0.025; forced.
    assert "decision: forced" in p.stdout and "held-out answer loss" in p.stdout
    assert "gate: one-sided paired sign-flip test" in p.stdout
    assert (
        "1 candidate(s), 3 held-out examples, 8 all sign flips; accept if gain >= 0.50%, loss reduction >= 0.001 nats/token and p <= 0.025"
        in p.stdout
    )
    data = json.loads(report.read_text())
    assert data["decision"] == "forced" and data["output_path"] == str(out)
    assert data["gate"]["smallest_p_value"] == 1 / 8 and data["gate"]["candidates"] == 1
    row = data["candidates"]["sigma_descent"]
    assert f"sigma_descent   {row['loss']:.4f}" in p.stdout and "p = " in p.stdout
    assert f"selection loss {row['selection_loss']:.4f}" in p.stdout
    assert data["selection"]["examples"] == 2 and data["selection"]["chosen"] == "sigma_descent"
    assert len(data["modules"]) == 7 and all(".layers.0." in m for m in data["modules"])
    assert data["config"]["policy_params"] == {"sigma_descent": {"eta_s": 1.5}}
    assert data["selection"]["candidates"]["sigma_descent"]["trace"][0]["eta_s"] <= 1.5
    for mod in data["modules"].values():
        assert {"sigma", "sigma_new", "sensitivity"} <= set(mod)
    assert (out / "adapter_model.safetensors").is_file() and (out / "surgery.json").is_file()


def test_keep_original_exit_code(tiny_base, tiny_adapter, tiny_calibration, tmp_path):
    p = run(
        *refine_args(tiny_base, tiny_adapter, tiny_calibration, tmp_path / "o"),
        "--min-improvement",
        "0.99",
        "--quiet",
    )
    assert p.returncode == 3, p.stderr
    assert "nothing written (original kept)" in p.stdout and not (tmp_path / "o").exists()


def test_bad_input_exit_code_and_message(tiny_base, tiny_calibration, tmp_path):
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["o_proj"]}'
    )
    (tmp_path / "ad" / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    p = run(
        "refine",
        "--base-model",
        tiny_base,
        "--adapter",
        tmp_path / "ad",
        "--calibration",
        tiny_calibration,
        "--output",
        tmp_path / "o",
    )
    assert p.returncode == 2
    assert "refusing to unpickle" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()
    p = run(
        "refine",
        "--base-model",
        tiny_base,
        "--adapter",
        tmp_path / "ad",
        "--calibration",
        tiny_calibration,
        "--output",
        tmp_path / "o",
        "--policy-param",
        "eta_s",
    )
    assert p.returncode == 2 and "NAME=VALUE" in p.stderr


def test_settings_that_produce_garbage_exit_2_and_write_nothing(
    tiny_base, tiny_adapter, tiny_calibration, tmp_path
):
    # one of each kind of refusal; the whole table of bad values is tests/test_config.py
    cases = [
        (
            ["--policy-param", "eta_s=nan"],
            "policy parameter grad_direction.eta_s must be a finite number; got nan",
        ),
        (["--policy-param", "eta_s=two"], "--policy-param 'eta_s=two': VALUE must be a number"),
        (["--max-false-accept", "0"], "max_false_accept must be a probability in (0, 1]; got 0.0"),
    ]
    for extra, message in cases:
        p = run(
            *refine_args(tiny_base, tiny_adapter, tiny_calibration, tmp_path / "o"),
            "--force",
            "--quiet",
            *extra,
        )
        assert p.returncode == 2, (extra, p.stdout, p.stderr)
        assert f"vllm-surgery: error: {message}" in p.stderr, (extra, p.stderr)
        assert "Traceback" not in p.stderr and not (tmp_path / "o").exists()


def test_inspect_table_and_json(tiny_adapter):
    p = run("inspect", tiny_adapter)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["module", "r", "scale"] and len(lines) == 1 + 14
    p = run("inspect", tiny_adapter, "--json")
    data = json.loads(p.stdout)
    assert len(data) == 14
    for m in data:
        assert m["rank"] == 8 and len(m["sigma"]) == 8
        assert 0 < m["energy_top1"] <= m["energy_top_quarter"] <= 1
        assert 1 <= m["effective_rank"] <= 8


def test_store_gc_lists_then_deletes_what_interrupted_writes_left(tmp_path):
    import os
    import time

    store = tmp_path / "store"
    old = store / "math" / "20260101T000000000000Z-0badf00d"  # reserved, never filled, two days ago
    old.mkdir(parents=True)
    temp = store / "math" / ".20260101T000000000001Z-0badf00e.tmp-0123456789ab"  # a killed atomic write
    temp.mkdir()
    (temp / "adapter_model.safetensors").write_bytes(b"partial")
    for p in (temp / "adapter_model.safetensors", temp, old):
        os.utime(p, (time.time() - 2 * 86400,) * 2)
    fresh = store / "code" / "20260102T000000000000Z-0badf00f"  # within the grace period
    fresh.mkdir(parents=True)

    done = run("store", "gc", "--store", store, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert f"store: {store}; left by interrupted writes, 24 h or more ago:" in done.stdout
    assert f"would delete math/{old.name}: 0 file(s), 0 bytes, the newest 48.0 h old" in done.stdout
    assert f"would delete math/{temp.name}: 1 file(s), 7 bytes, the newest 48.0 h old" in done.stdout
    assert done.stdout.rstrip().endswith("would delete 2, 7 bytes")
    assert old.is_dir() and temp.is_dir()

    done = run("store", "gc", "--store", store, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["store"], report["grace_hours"], report["dry_run"]) == (str(store), 24.0, False)
    assert sorted((o["name"], o["entry"], o["files"], o["bytes"]) for o in report["orphans"]) == [
        ("math", temp.name, 1, 7),
        ("math", old.name, 0, 0),
    ]
    assert not old.exists() and not temp.exists() and fresh.is_dir()
    done = run("store", "gc", "--store", store)
    assert done.returncode == 0 and done.stdout.rstrip().endswith("nothing to delete"), done
