"""Experiment: would a gate that also counted held-out *answers* have refused the adapters auto wrote
that were worse on the test set, and what would such a rule have refused besides?

The gate (vllm_surgery.gate) tests the held-out answer loss. For every run of
benchmarks/quality_results.json this script rebuilds the run's held-out split and auto's sigma_descent
candidate (its singular values, from quality.py's run cache: the same engine must have measured them),
and counts the held-out answers the original and the candidate get right: an answer is right when the
argmax of every answer token, fed the right prefix, is that token (what greedy decoding of the prompt
reproduces). It prints and writes, per run, the answers fixed and broken on the held-out split next to
the candidate's change on the 300 test problems. RESULTS.md 4 quotes it.

Run:  python benchmarks/heldout_answers.py [--tasks addition,sort,classify] [--out FILE]
      (about 10 minutes on this CPU in one process; needs the table's run cache)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import quality as q  # noqa: E402  (benchmarks/quality.py: tasks, adapters, run cache)

from vllm_surgery import SurgeryConfig, load_adapter  # noqa: E402
from vllm_surgery.calibration import Example, load_calibration, split_examples  # noqa: E402
from vllm_surgery.exact_match import merged_lora  # noqa: E402


@torch.no_grad()
def answer_logits(model: torch.nn.Module, e: Example) -> torch.Tensor:
    """The logits that predict each answer token of `e`, fed the prompt and the right answer prefix."""
    ids = torch.tensor([[*e.prompt_ids, *e.answer_ids]])
    start = len(e.prompt_ids) - 1
    return model(ids).logits[0, start : start + len(e.answer_ids)]


def answers_right(model: torch.nn.Module, examples: Sequence[Example]) -> list[bool]:
    """Per example: is the argmax of every answer token (teacher-forced) that token?"""
    return [answer_logits(model, e).argmax(-1).tolist() == list(e.answer_ids) for e in examples]


def each_run(
    raw: dict[str, Any], tasks: Sequence[str], model_dir: Path, tokenizer: Any
) -> Iterator[tuple[dict[str, Any], Any, Any, list[Example]]]:
    """For every run of the quality table `raw` (its JSON) on `tasks`: (the run's row: task, level, n,
    seed, auto's decision and p-value, the candidate's test change; the original adapter; auto's
    sigma_descent candidate as an adapter; the run's held-out examples), rebuilt from the run cache
    of this engine. Exits naming the adapter when the cache lacks it."""
    cache = model_dir.parent.parent
    run_cache = q.RunCache(cache / "quality" / "runs" / q.code_fingerprint())
    config = SurgeryConfig(policy="auto")
    work = Path(tempfile.mkdtemp(prefix="vllm-surgery-heldout-"))
    test_size, pool_size = raw["args"]["test"], raw["args"]["pool"]
    for name in tasks:
        task = q.TASKS[name]
        pool = task.draw(random.Random(f"{task.name}-calibration"), pool_size, "calibration")
        for adapter in q.train_adapters(
            model_dir, cache, [task], ["under", "plateau"], raw["args"]["train_seed"]
        ):
            lora = load_adapter(adapter.path)
            base_key = q.adapter_key(adapter, lora, test_size, pool_size)
            outputs = run_cache.get(f"{base_key}-feedback")
            auto_parts = {}
            for r in raw["runs"]:
                if (r["task"], r["level"]) == (task.name, adapter.level):
                    auto_parts[(r["size"], r["seed"])] = (
                        r,
                        run_cache.get(f"{base_key}-n{r['size']}-seed{r['seed']}-auto"),
                    )
            if outputs is None or any(a is None for _, a in auto_parts.values()):
                raise SystemExit(
                    f"{task.name}/{adapter.level}: not in the run cache of this engine; run quality.py first"
                )
            records, _ = q.feedback_records(pool, [(t, bool(ok)) for t, ok in outputs])
            for (size, seed), (run, auto) in sorted(auto_parts.items()):
                calib = load_calibration(
                    records, tokenizer, max_length=config.max_length, samples=size, seed=seed
                )
                _, _, held = split_examples(
                    calib.examples, config.heldout_fraction, config.selection_fraction, seed
                )
                sigmas = q.as_sigmas(auto["candidate_sigmas"]["sigma_descent"])
                candidate = q.adapter_from_sigmas(
                    lora, sigmas, work / f"{task.name}-{adapter.level}-{size}-{seed}"
                )
                row = {
                    "task": task.name,
                    "level": adapter.level,
                    "n": size,
                    "seed": seed,
                    "heldout": len(held),
                    "auto": run["auto"]["decision"],
                    "gate_p": auto["gate"].get("p_value"),
                    "test_change_pp": round(
                        100 * run["policies"]["sigma_descent"]["exact_match"]["delta"], 1
                    ),
                }
                yield row, lora, candidate, held


def setup(argv: Sequence[str] | None, description: str) -> tuple[argparse.Namespace, Any, Iterator]:
    """The command line these experiments share (--tasks, --results, --out, --threads): (its arguments,
    the default model, each_run over the tasks asked for)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tasks", default="addition,sort,classify", help="comma-separated tasks (default all)")
    p.add_argument(
        "--results", type=Path, default=HERE / "quality_results.json", help="the quality table's JSON"
    )
    p.add_argument("--out", type=Path, default=None, help="write the rows here as JSON")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    raw = json.loads(args.results.read_text())
    model_dir = q.default_model_path(None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return args, model, each_run(raw, args.tasks.split(","), model_dir, tokenizer)


def main(argv: Sequence[str] | None = None) -> int:
    args, model, runs = setup(argv, __doc__.split("\n\n")[0])
    rows = []
    for row, lora, candidate, held in runs:
        with merged_lora(model, lora):
            before = answers_right(model, held)
        with merged_lora(model, candidate):
            after = answers_right(model, held)
        row = {
            **{k: v for k, v in row.items() if k != "gate_p"},
            "right_before": sum(before),
            "fixed": sum(a and not b for b, a in zip(before, after, strict=True)),
            "broken": sum(b and not a for b, a in zip(before, after, strict=True)),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    written = [r for r in rows if r["auto"] == "accept"]
    print(
        f"\nauto wrote {len(written)} of {len(rows)}; worse on the test set: "
        + ", ".join(
            f"{r['task']}/{r['level']} n={r['n']} seed {r['seed']} (held-out answers {r['fixed']} fixed, "
            f"{r['broken']} broken)"
            for r in written
            if r["test_change_pp"] < 0
        )
        + "; a rule 'refuse when held-out answers broken > fixed' would refuse: "
        + ", ".join(
            f"{r['task']}/{r['level']} n={r['n']} seed {r['seed']} ({r['test_change_pp']:+.1f} pp on the test set)"
            for r in written
            if r["broken"] > r["fixed"]
        )
    )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
