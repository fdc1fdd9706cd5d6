"""Would "bad" ratings without a correction help as a negative signal? An experiment, not a feature.

Today a record rated bad with no correction never enters calibration data (vllm_surgery.traffic): it
says the answer is wrong, not what is right. The refinement-quality issue asked to try it as a negative
signal and to keep it only if the quality benchmark shows it helps. This script measures that on the
quality benchmark's under-trained adapters, tasks, pools and test problems (benchmarks/quality.py):

- Simulated users rate every answer of the original adapter: a right one is rated good; a wrong one is
  corrected (the true answer) with probability 1/2, else only rated bad (seeded per problem and seed).
- The same n records refine() would draw (random.Random(seed).sample of the 512-problem pool) are
  split into those the server keeps today (good and corrected) and the bad-only ones.
- Arm `drop` (today): refine(policy="auto") on the kept records.
- Arm `unlikelihood`: the same call, with the bad answers added to the fit split only (the sensitivity
  passes), each answer token adding weight * -log(1 - p(token)) to the loss they differentiate
  (unlikelihood training, Welleck et al. 2019). The selection and held-out splits, and so the gate, are
  the same as in `drop`. The term is patched in here (vllm_surgery.activations and the fit split that
  refine() builds): the engine has no such option, and gets one only if this shows a gain.
- Every written adapter is scored on the 300 test problems (exact match, paired with the original).

Run:  python benchmarks/bad_ratings.py                      (3 tasks x 3 seeds x 2 arms at n = 128;
                                                            about 20 minutes on this 2-core CPU)
      python benchmarks/bad_ratings.py --tasks classify --seeds 1 --weight 0.1

It needs the quality benchmark's adapters and simulated answers in the cache (run benchmarks/quality.py
--quick first). Results: RESULTS.md 4.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import quality as Q  # noqa: E402  (benchmarks/quality.py: tasks, adapters, scoring)

from vllm_surgery import load_adapter, refine  # noqa: E402
from vllm_surgery.calibration import load_calibration  # noqa: E402
from vllm_surgery.default_model import default_model_path  # noqa: E402

ARMS = ("drop", "unlikelihood")


@contextmanager
def unlikelihood_on_negative_weights(extra_fit: list):
    """Inside: examples with a negative weight w add |w| * -log(1 - p(token)) per answer token to the
    differentiated loss, and `extra_fit` joins every fit split refine() builds."""
    activations = importlib.import_module("vllm_surgery.activations")
    refine_module = importlib.import_module("vllm_surgery.refine")
    weighted_sum, weighted = activations._weighted_sum, refine_module.weighted

    def patched_sum(losses: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        if weights is None:
            return losses.sum()
        w = weights.to(losses.dtype)
        unlikely = -torch.log(-torch.expm1(-losses.clamp_min(1e-6)))
        return torch.where(w < 0, -w * unlikely, w * losses).sum()

    activations._weighted_sum = patched_sum
    refine_module.weighted = lambda fit, cw: weighted(fit, cw) + list(extra_fit)
    try:
        yield
    finally:
        activations._weighted_sum, refine_module.weighted = weighted_sum, weighted


def simulated_ratings(pool, outputs, n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(records a server keeps today: good and corrected, bad-only records) among the n refine() draws."""
    kept, bad = [], []
    for i in sorted(random.Random(seed).sample(range(len(pool)), n)):
        problem, (text, right) = pool[i], outputs[i]
        if right:
            kept.append({"prompt": problem.prompt, "completion": text, "feedback": "good"})
        elif random.Random(f"bad-{seed}-{i}").random() < 0.5:
            kept.append({"prompt": problem.prompt, "completion": problem.answer, "feedback": "correction"})
        else:
            bad.append({"prompt": problem.prompt, "completion": text})
    return kept, bad


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="classify,addition,sort")
    p.add_argument("--n", type=int, default=128, help="rated records per run, as refine()'s samples")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--weight", type=float, default=1.0, help="weight of the unlikelihood term per token")
    p.add_argument("--cache-dir", type=Path, default=None)
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = default_model_path(args.cache_dir)
    cache = model_dir.parent.parent
    runs = cache / "quality" / "runs" / Q.code_fingerprint()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    work = Path(tempfile.mkdtemp(prefix="vllm-surgery-bad-ratings-"))
    totals = {arm: [] for arm in ARMS}
    try:
        for name in args.tasks.split(","):
            task = Q.TASKS[name]
            adapter = cache / "quality" / f"{Q.RECIPE}-{name}-lora-r16-{task.levels['under']}steps-seed0"
            answers = sorted(runs.glob(f"{Q.RECIPE}-{name}-under-*-test300-pool512-feedback.json"))
            if not adapter.is_dir() or not answers:
                raise SystemExit(
                    f"{name}: no cached adapter or simulated answers: run quality.py --quick first"
                )
            lora = load_adapter(adapter)
            test = task.draw(random.Random(f"{name}-test"), 300, "test")
            pool = task.draw(random.Random(f"{name}-calibration"), 512, "calibration")
            outputs = [(text, bool(ok)) for text, ok in json.loads(answers[0].read_text())]
            scorer = Q.Scorer(model, tok, test, 64)
            original = scorer(lora)
            for seed in range(args.seeds):
                kept, bad = simulated_ratings(pool, outputs, args.n, seed)
                negatives = [
                    dataclasses.replace(e, weight=-args.weight) for e in load_calibration(bad, tok).examples
                ]
                for arm in ARMS:
                    started = time.perf_counter()
                    with unlikelihood_on_negative_weights(negatives if arm == "unlikelihood" else []):
                        result = refine(
                            None, lora, kept, work / f"{name}-{seed}-{arm}", model=model, tokenizer=tok,
                            policy="auto", seed=seed, progress=False,
                        )  # fmt: skip
                    seconds = time.perf_counter() - started
                    change, detail = 0.0, "kept"
                    if result.output_path:
                        pr = Q.paired(original, scorer(load_adapter(result.output_path)))
                        change, detail = pr["delta"], f"{pr['fixed']} fixed / {pr['broken']} broken"
                    totals[arm].append(change)
                    gate = result.candidates["sigma_descent"]
                    print(
                        f"{name} seed {seed} {arm}: {len(kept)} kept + {len(bad)} bad-only; {result.decision}, "
                        f"held-out gain {100 * gate['relative_improvement']:+.2f}% (p = {gate.get('p_value'):.2g}), "
                        f"test {100 * change:+.1f} pp ({detail}); {seconds:.0f} s",
                        flush=True,
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for arm, changes in totals.items():
        print(f"{arm}: mean change {100 * sum(changes) / len(changes):+.2f} pp over {len(changes)} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
