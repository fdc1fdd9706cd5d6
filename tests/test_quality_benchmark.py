"""The quality benchmark (benchmarks/quality.py): its --dry-run exercises every code path on a tiny random
model (adapter training, simulated feedback, forced refine() per policy, auto, the continued-training
baseline and its gate, scoring, the report and the plot), and its exact-match shortcut changes no verdict."""

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def benchmark_module(file: str, name: str | None = None):
    """benchmarks/FILE.py, imported as the module `name` (default FILE)."""
    spec = importlib.util.spec_from_file_location(name or file, ROOT / "benchmarks" / f"{file}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quality():
    return benchmark_module("quality", "quality_benchmark")


def test_cannot_match_is_sound(quality):
    assert not quality.cannot_match("", "332")
    assert not quality.cannot_match(" 33", "332")
    assert not quality.cannot_match("332 ", " 332")
    assert quality.cannot_match("34", "332")
    assert quality.cannot_match("332 x", "332")
    assert quality.cannot_match("3 3", "332")
    assert not quality.cannot_match("\ufffd", "332")  # a partly decoded character decides nothing


def test_fast_greedy_scoring_agrees_with_exact_match(quality, tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_surgery.exact_match import greedy_answers

    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    rng = random.Random(0)
    prompts = [
        f"{rng.randint(100, 999)}+{rng.randint(100, 999)}=" + " x" * rng.randint(0, 3) for _ in range(30)
    ]
    reference = greedy_answers(model, tok, prompts, max_new_tokens=6, batch_size=7, progress=False)
    full = quality.greedy_outputs(model, tok, prompts, None, max_new_tokens=6, batch_size=8)
    assert [text for text, _ in full] == reference
    # answers: the reference output for half of the prompts (right), something else for the others
    answers = [r if i % 2 == 0 else r + "z" for i, r in enumerate(reference)]
    fast = quality.greedy_outputs(model, tok, prompts, answers, max_new_tokens=6, batch_size=8)
    assert [ok for _, ok in fast] == [r.strip() == a.strip() for r, a in zip(reference, answers, strict=True)]
    assert [text for text, ok in fast if ok] == [r for r, a in zip(reference, answers, strict=True) if r == a]


def test_dry_run_measures_every_row(quality, tmp_path):
    assert quality.main(["--dry-run", "--out-dir", str(tmp_path)]) == 0
    raw = json.loads((tmp_path / "quality_results.json").read_text())
    (run,) = raw["runs"]
    assert set(run["policies"]) == set(quality.POLICIES)
    assert run["auto"]["decision"] in ("accept", "keep_original")
    assert run["baseline"]["steps_run"] >= 1 and run["baseline"]["curve"][0][0] == 0
    assert sum(run["feedback"]["sample"].values()) == 16
    md = (tmp_path / "quality_results.md").read_text()
    for row in (*quality.POLICIES, "auto", quality.BASELINE, quality.BASELINE_GATED):
        assert f"| {row}" in md or f"**{row}**" in md, row
    assert (tmp_path / "quality_results.png").stat().st_size > 0


def test_modules_left_out_of_the_fingerprint_are_never_imported_by_the_engine(quality):
    """A cached run is reused when the engine's source is unchanged; the modules left out of that digest
    must therefore be ones no engine module imports (else a change to them could change a result)."""
    import ast

    import vllm_surgery

    root = Path(vllm_surgery.__file__).resolve().parent
    left_out = {name.removesuffix(".py") for name in quality.NOT_ENGINE}
    assert {"cli", "settings", "server_process"} <= left_out
    for path in sorted(root.glob("*.py")):
        if path.name in quality.NOT_ENGINE:
            continue
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name.split(".")[1] for a in node.names if a.name.startswith("vllm_surgery.")}
        assert not imported & left_out, f"{path.name} imports {sorted(imported & left_out)}"


def test_level_sizes_give_one_level_its_own_calibration_sizes(quality, tmp_path):
    args = quality.parse_args(
        ["--levels", "under,plateau", "--level-sizes", "plateau=128", "--out-dir", str(tmp_path)]
    )
    assert args.sizes_by_level == {"under": [32, 128, 512], "plateau": [128]}
    assert args.size_list == [32, 128, 512]
    for bad in ("over=128", "plateau", "plateau=12x", "plateau=2"):
        with pytest.raises(SystemExit):
            quality.parse_args(["--levels", "under,plateau", "--level-sizes", bad])


def test_n512_against_n128_compares_the_adapters_measured_at_both_sizes(quality):
    def run(level, size, delta):
        return {"task": "addition", "level": level, "size": size, "auto": {"exact_match": {"delta": delta}}}

    runs = [run("under", 128, 0.05), run("under", 512, 0.06), run("plateau", 128, 0.0)]
    both, small, large = quality.size_against_size(runs, 128, 512)
    assert both == {("addition", "under")}
    assert (small, large) == (0.05, 0.06)  # not 0.025 for n = 128, as over every run
    assert quality.size_against_size(runs[:1], 128, 512)[0] == set()


def test_bad_ratings_experiment_splits_wrong_answers_into_corrections_and_bad_only(quality):
    bad_ratings = benchmark_module("bad_ratings")
    pool = quality.TASKS["addition"].draw(random.Random("t"), 400, "calibration")
    outputs = [(p.answer if i % 3 == 0 else "0", i % 3 == 0) for i, p in enumerate(pool)]
    kept, bad = bad_ratings.simulated_ratings(pool, outputs, 300, seed=1)
    assert len(kept) + len(bad) == 300
    good = [r for r in kept if r["feedback"] == "good"]
    corrected = [r for r in kept if r["feedback"] == "correction"]
    assert all(r["completion"] != "0" for r in good + corrected) and all(r["completion"] == "0" for r in bad)
    assert 0.35 < len(corrected) / (len(corrected) + len(bad)) < 0.65  # about half of the wrong answers
    assert bad_ratings.simulated_ratings(pool, outputs, 300, seed=1) == (kept, bad)  # seeded


def test_jobs_children_get_their_unit_and_share_everything_else(quality, tmp_path):
    argv = [
        "--tasks",
        "addition,sort",
        "--levels=under,plateau",
        "--set",
        "correction_weight=3",
        "--no-verify",
    ]
    argv += ["--jobs", "2", "--quick", "--out-dir", "x", "--threads=1", "--sizes", "32,512"]
    assert quality.without_unit_options(argv) == ["--set", "correction_weight=3", "--quick"]
    # what the parser says of each unit option (a value or a flag) is what the filter skips
    assert quality.without_unit_options(["--no-verify", "--quick"]) == ["--quick"]
    assert quality.without_unit_options(["--threads", "4", "--quick"]) == ["--quick"]
    args = quality.parse_args(
        [
            "--tasks",
            "addition,sort",
            "--level-sizes",
            "plateau=32",
            "--sizes",
            "32,512",
            "--out-dir",
            str(tmp_path),
        ]
    )
    units = [str(u) for u in quality.units_of(args)]
    # longest first: n = 512 before n = 32, the under-trained adapters before the plateau ones
    assert units == [
        "addition/under n=512",
        "sort/under n=512",
        "addition/under n=32",
        "sort/under n=32",
        "addition/plateau n=32",
        "sort/plateau n=32",
    ]
    for bad in (["--jobs", "0"], ["--jobs", "2", "--no-run-cache"], ["--jobs", "2", "--train-only"]):
        with pytest.raises(SystemExit):
            quality.parse_args(bad)


def test_jobs_measure_in_child_processes_and_the_parent_reads_their_run_cache(quality, tmp_path):
    out = tmp_path / "out"
    argv = ["--dry-run", "--jobs", "2", "--sizes", "12,16", "--policies", "grad_direction,abs_select"]
    assert quality.main([*argv, "--no-baseline", "--out-dir", str(out)]) == 0
    raw = json.loads((out / "quality_results.json").read_text())
    assert sorted(r["size"] for r in raw["runs"]) == [12, 16]
    # the parent measured nothing itself: every part came from the cache its two children wrote
    assert all(r["measured"] == [] for r in raw["runs"])
    assert raw["timings"]["children"] == 2
    assert raw["timings"]["refine"] > 0 and raw["timings"]["scoring"] > 0  # the children's compute
    # the derived abs_select row was checked against a real call once, in the smaller unit
    assert raw["verification"]["size"] == 12 and "abs_select" in raw["verification"]
    # ... and its seconds counted once (the report the parent took over, not again from the child's timings)
    check = sum(v["seconds"] for v in raw["verification"].values() if isinstance(v, dict))
    assert raw["timings"]["verification"] == pytest.approx(check)
    assert "by 2 child processes, 2 at a time" in (out / "quality_results.md").read_text()


def test_heldout_answers_counts_an_answer_right_exactly_when_greedy_decoding_reproduces_it(tiny_base):
    from transformers import AutoModelForCausalLM

    from vllm_surgery.calibration import Example

    module = benchmark_module("heldout_answers")
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    examples = []
    for i in range(6):
        prompt = torch.randint(3, model.config.vocab_size, (1, 5 + i), generator=gen)
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False
        )
        answer = out[0, prompt.shape[1] :].tolist()
        if i % 2:  # the last answer token replaced: greedy decoding does not produce this answer
            answer[-1] = (answer[-1] + 1) % model.config.vocab_size
        examples.append(Example(tuple(prompt[0].tolist()), tuple(answer), f"example {i}"))
    assert module.answers_right(model, examples) == [True, False, True, False, True, False]


def test_gate_statistics_loss_sums(tiny_base):
    """benchmarks/gate_statistics.py: its per-example answer-loss sums are what transformers' own loss
    gives (mean over the answer tokens, times their number). (Its signed ranks are the gate's:
    tests/test_gate.py.)"""
    from transformers import AutoModelForCausalLM

    from vllm_surgery.calibration import Example

    module = benchmark_module("gate_statistics")
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    examples = [
        Example(
            tuple(torch.randint(3, 100, (4 + i,), generator=gen).tolist()),
            tuple(torch.randint(3, 100, (1 + i,), generator=gen).tolist()),
            f"example {i}",
        )
        for i in range(4)
    ]
    sums, tokens = module.loss_sums(model, examples)
    assert tokens.tolist() == [1, 2, 3, 4]
    for e, s in zip(examples, sums.tolist(), strict=True):
        ids = torch.tensor([[*e.prompt_ids, *e.answer_ids]])
        labels = ids.clone()
        labels[0, : len(e.prompt_ids)] = -100
        with torch.no_grad():
            mean = float(model(ids, labels=labels).loss)
        assert s == pytest.approx(mean * len(e.answer_ids), rel=1e-4)
