"""From recorded traffic to calibration data: the rules, the export CLI and `traffic stats`."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from vllm_surgery.calibration import read_jsonl
from vllm_surgery.cli import main
from vllm_surgery.errors import CalibrationError
from vllm_surgery.storage import open_database
from vllm_surgery.storage.database import TrafficRecord
from vllm_surgery.traffic.calibration_set import calibration_set, parse_since, traffic_examples, write_jsonl

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2 + 2 ?"}]


def rec(request_id: str, completion: str, **kw) -> TrafficRecord:
    values = {
        "request_id": request_id,
        "choice": 0,
        "adapter": "math",
        "version": "original",
        "endpoint": "completions",
        "prompt": f"question {request_id}",
        "completion": completion,
        "sampling": {},
        "created": 1000.0,
        "calibratable": True,
    }
    values.update(kw)
    return TrafficRecord(**values)


@pytest.fixture
def db_path(database_target) -> Path | str:
    """One record for every rule (comments: latest feedback, expected outcome), on each backend (a
    SQLite path, a Postgres URL: tests/conftest.py)."""
    path = database_target
    db = open_database(path)
    ids = db.insert(
        [
            rec("good", "answer g", created=1000.0),  # good -> completion
            rec("bad", "answer b", created=1001.0),  # bad, no correction -> never
            rec("fixed", "wrong", created=1002.0),  # bad + correction -> correction
            rec("fixonly", "wrong too", created=1003.0),  # correction alone -> correction
            rec("unrated", "answer u", created=1004.0),  # nothing -> only with include_unrated
            rec("flip", "answer f", created=1005.0),  # good then bad -> latest (bad) wins: never
            rec("chat", "4", endpoint="chat", prompt=CHAT, created=1006.0),  # good chat -> messages
            rec(
                "ids", "x", prompt=[5, 6, 7], calibratable=False, created=1007.0
            ),  # good, token ids: not text
            rec("other", "o", adapter="other", created=1008.0),  # another adapter
        ]
    )
    by = dict(
        zip(["good", "bad", "fixed", "fixonly", "unrated", "flip", "chat", "ids", "other"], ids, strict=True)
    )
    db.add_feedback(by["good"], "good", None)
    db.add_feedback(by["bad"], "bad", None)
    db.add_feedback(by["fixed"], "bad", "right")
    db.add_feedback(by["fixonly"], None, "right too")
    db.add_feedback(by["flip"], "good", None)
    db.add_feedback(by["flip"], "bad", None)
    db.add_feedback(by["chat"], "good", None)
    db.add_feedback(by["ids"], "good", None)
    db.add_feedback(by["other"], "good", None)
    db.close()
    return path


EXPECTED = [
    {"prompt": "question good", "completion": "answer g", "feedback": "good"},
    {"prompt": "question fixed", "completion": "right", "feedback": "correction"},
    {"prompt": "question fixonly", "completion": "right too", "feedback": "correction"},
    {"messages": [*CHAT, {"role": "assistant", "content": "4"}], "feedback": "good"},
]


def test_the_rules(db_path: Path) -> None:
    db = open_database(db_path, create=False)
    data = traffic_examples(db, "math")
    assert data.records == EXPECTED
    assert data.counts == {
        "corrected": 2,
        "good": 2,
        "unrated": 0,
        "static": 0,
        "adapter_file": 0,
        "bad_without_correction": 2,
        "unrated_left_out": 1,
        "not_text": 1,
    }
    with_unrated = traffic_examples(db, "math", include_unrated=True)
    assert with_unrated.records == [
        *EXPECTED[:3],
        {"prompt": "question unrated", "completion": "answer u", "feedback": "unrated"},
        EXPECTED[3],
    ]
    # The SQL statistics agree with the rules.
    (row,) = db.stats("math")
    assert (row.usable, row.unrated_usable) == (4, 1)
    assert traffic_examples(db, "math", since=1002.0).records == EXPECTED[1:]
    db.close()


def test_static_files_are_appended(db_path: Path, tmp_path: Path) -> None:
    static = tmp_path / "static.jsonl"
    static.write_text('{"prompt": "s1", "completion": "a1"}\n\n{"prompt": "s2", "completion": "a2"}\n')
    db = open_database(db_path, create=False)
    data = calibration_set(db, "math", static_files=[static])
    db.close()
    assert data.records == [
        *EXPECTED,
        {"prompt": "s1", "completion": "a1"},
        {"prompt": "s2", "completion": "a2"},
    ]
    assert data.counts["static"] == 2
    assert "6 examples for 'math'" in data.summary()


def test_the_adapters_own_calibration_file_comes_last(db_path: Path, tmp_path: Path) -> None:
    """surgery_calibration.jsonl next to adapter_config.json: an adapter's set includes it, alone
    (no database: before any traffic) or after the traffic and the registered files."""
    from vllm_surgery.calibration import ADAPTER_CALIBRATION_NAME

    adapter = tmp_path / "math"
    adapter.mkdir()
    (adapter / ADAPTER_CALIBRATION_NAME).write_text('{"prompt": "own", "completion": "yes"}\n')
    alone = calibration_set(None, "math", adapter_dir=adapter)
    assert alone.records == [{"prompt": "own", "completion": "yes"}] and alone.counts["adapter_file"] == 1
    db = open_database(db_path, create=False)
    data = calibration_set(db, "math", adapter_dir=adapter)
    db.close()
    assert data.records == [*EXPECTED, {"prompt": "own", "completion": "yes"}]
    assert "1 from the adapter's own surgery_calibration.jsonl" in data.summary()
    assert calibration_set(None, "math", adapter_dir=tmp_path).records == []  # no file: nothing
    (adapter / ADAPTER_CALIBRATION_NAME).write_text('{"prompt": "own"}\n')
    with pytest.raises(CalibrationError, match=r"math/surgery_calibration\.jsonl:1: missing 'completion'"):
        calibration_set(None, "math", adapter_dir=adapter)


def test_parse_since() -> None:
    assert parse_since("7d", now=1_000_000.0) == 1_000_000.0 - 7 * 86400
    assert parse_since("90s", now=100.0) == 10.0
    assert parse_since("1.5h", now=10_000.0) == 10_000.0 - 5400
    assert (
        parse_since("2026-11-20T08:00:00+00:00") == datetime(2026, 11, 20, 8, tzinfo=timezone.utc).timestamp()
    )
    assert parse_since("2026-11-20") == datetime(2026, 11, 20).timestamp()  # local time
    with pytest.raises(CalibrationError, match="expected a duration like 7d"):
        parse_since("last week")


def test_write_jsonl_is_atomic_and_readable(tmp_path: Path) -> None:
    out = write_jsonl(EXPECTED, tmp_path / "calib.jsonl")
    records, _ = read_jsonl(out)
    assert [r for _, r in records] == EXPECTED
    assert [p.name for p in tmp_path.iterdir()] == ["calib.jsonl"]  # no temporary file left
    with pytest.raises(Exception, match="cannot be written"):
        write_jsonl(EXPECTED, tmp_path / "missing-dir" / "x.jsonl")


def test_cli_export_and_stats(
    db_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    for key in ("VLLM_SURGERY_CONFIG", "VLLM_SURGERY_TRAFFIC_ADAPTERS", "VLLM_SURGERY_CALIBRATION_DIR"):
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "export.jsonl"
    assert main(["calibration", "export", "math", "--output", str(out), "--db", str(db_path)]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == EXPECTED
    assert "4 examples for 'math'" in capsys.readouterr().out
    assert (
        main(
            ["calibration", "export", "math", "--output", str(out), "--db", str(db_path), "--include-unrated"]
        )
        == 0
    )
    assert len(out.read_text().splitlines()) == 5

    # Static files registered in the settings are part of the export.
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "math.jsonl").write_text('{"prompt": "s", "completion": "t"}\n')
    monkeypatch.setenv("VLLM_SURGERY_CALIBRATION_DIR", str(calib))
    monkeypatch.setenv("VLLM_SURGERY_TRAFFIC_ADAPTERS", '{"math": {"calibration_files": ["math.jsonl"]}}')
    assert main(["calibration", "export", "math", "--output", str(out), "--db", str(db_path)]) == 0
    assert json.loads(out.read_text().splitlines()[-1]) == {"prompt": "s", "completion": "t"}
    capsys.readouterr()

    assert main(["traffic", "stats", "--db", str(db_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["adapter"], r["records"], r["usable"]) for r in rows} == {("math", 8, 4), ("other", 1, 1)}
    assert main(["traffic", "stats", "math", "--db", str(db_path)]) == 0
    text = capsys.readouterr().out
    assert "math" in text and "other" not in text


def test_cli_stats_shows_every_count_and_the_untrusted_records(
    database_target, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    """The text table has a column per count of TrafficStats, with --json's values; a record whose
    latest feedback came from an untrusted client is counted as untrusted."""
    monkeypatch.delenv("VLLM_SURGERY_CONFIG", raising=False)
    db = open_database(database_target)
    trusted, untrusted, _plain = db.insert([rec("t", "a"), rec("u", "b"), rec("p", "c")])
    db.add_feedback(trusted, "good", None)
    db.add_feedback(untrusted, "good", None, trusted=False)
    db.close()
    assert main(["traffic", "stats", "math", "--db", str(database_target), "--json"]) == 0
    (counts,) = json.loads(capsys.readouterr().out)
    assert (counts["records"], counts["untrusted"]) == (3, 1)
    assert main(["traffic", "stats", "math", "--db", str(database_target)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, row = lines[1].split(), lines[2].split()
    assert header == [
        "adapter",
        "version",
        "records",
        "rated",
        "good",
        "bad",
        "corrected",
        "usable",
        "+unrated",
        "untrusted",
        "bytes",
    ]
    names = {"+unrated": "unrated_usable"}
    assert row == [str(counts[names.get(h, h)]) for h in header]


def test_cli_errors_are_clear(db_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "x.jsonl"
    assert main(["calibration", "export", "nobody", "--output", str(out), "--db", str(db_path)]) == 2
    assert "nothing to export" in capsys.readouterr().err and not out.exists()
    assert main(["calibration", "export", "../etc", "--output", str(out), "--db", str(db_path)]) == 2
    assert "adapter name" in capsys.readouterr().err
    assert main(["traffic", "stats", "--db", str(tmp_path / "none.sqlite3")]) == 2
    assert "no database here" in capsys.readouterr().err
    assert (
        main(["calibration", "export", "math", "--output", str(out), "--db", str(db_path), "--since", "soon"])
        == 2
    )
    assert "--since 'soon'" in capsys.readouterr().err


def test_the_streamed_set_is_the_kept_set_with_the_same_hash(db_path) -> None:
    """Counted and hashed as they stream past (the refine route, the automatic jobs, the export), the
    examples are those `calibration_set` keeps, and the hash is the job spec's records_sha256."""
    from vllm_surgery.worker import records_sha256

    db = open_database(db_path)
    try:
        for include_unrated in (False, True):
            kept = calibration_set(db, "math", include_unrated=include_unrated)
            streamed = calibration_set(db, "math", include_unrated=include_unrated, keep=False)
            assert streamed.records == [] and streamed.count == len(kept.records) == kept.count > 0
            assert streamed.counts == kept.counts
            assert streamed.sha256 == kept.sha256 == records_sha256(kept.records)
        empty = calibration_set(db, "nobody", keep=False)
        assert empty.count == 0 and empty.sha256 == records_sha256([])
    finally:
        db.close()


def test_the_export_streams_in_bounded_memory(tmp_path: Path) -> None:
    """The export's peak Python memory does not grow with the set: 4k records of 3 KB, then 12k (36 MB
    of answers, all usable), cost the same peak (a page of rows), far below the set's size; the file
    holds every record in id order."""
    import tracemalloc

    from vllm_surgery.traffic import export_calibration

    db = open_database(tmp_path / "big.sqlite3")
    answer = "a" * 3000
    out = tmp_path / "math.jsonl"
    peaks = []
    try:
        for start in range(0, 12_000, 2000):
            db.insert([rec(f"r{start + i}", f"{start + i} {answer}") for i in range(2000)])
            if start + 2000 in (4000, 12_000):
                tracemalloc.start()
                try:
                    data = export_calibration(db, "math", out, include_unrated=True)
                    peaks.append(tracemalloc.get_traced_memory()[1])
                finally:
                    tracemalloc.stop()
        for record_id in range(1, 12_001, 40):  # some rated good, the others unrated (included)
            db.add_feedback(record_id, "good", None)
        data = export_calibration(db, "math", out, include_unrated=True)
    finally:
        db.close()
    lines = out.read_text().splitlines()
    assert data.count == len(lines) == 12_000 and (data.counts["good"], data.counts["unrated"]) == (
        300,
        11_700,
    )
    first_last = [json.loads(x)["completion"].split()[0] for x in (lines[0], lines[1], lines[-1])]
    assert first_last == ["0", "1", "11999"]
    small, large = peaks
    assert large < small * 1.25 + 1024**2 and large < 18 * 1024**2, [p / 1024**2 for p in peaks]
