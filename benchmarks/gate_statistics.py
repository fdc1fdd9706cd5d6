"""Experiment: would another statistic in the gate's sign-flip test have accepted more of the candidates
that were better on the test set, and refused the one that was worse?

The experiment that chose the gate's default statistic (`gate_statistic`, vllm_surgery.gate): the gate
tests T = sum x_i / sqrt(sum x_i^2) over the held-out examples by flipping the signs of whole examples,
x_i a score of d_i, the original's minus the candidate's answer-loss sum on example i. It was run on the
table measured with x_i = d_i (the statistic ``t``, the gate's only one then).
For every run of benchmarks/quality_results.json this script rebuilds the run's held-out split and auto's
sigma_descent candidate (heldout_answers.each_run: the run cache of the same engine), measures each
held-out example's loss sum under the original and the candidate (teacher-forced, the merged model), and
computes the p-value of the same sign-flip test (the gate's own `max_t_p_values`, the run's seed) on:

- ``t``: d_i itself (its p-value is printed beside the run's gate's, a check where the run used t);
- ``signed_rank``: sign(d_i) * rank(|d_i|), the Wilcoxon signed-rank statistic (the same symmetric
  null, so the same false-accept guarantee; a few large differences weigh no more than their rank;
  the gate's own `signed_ranks`, now its default);
- ``per_token``: d_i / answer tokens of example i (every example weighs the same, however long).

A statistic's decision applies the gate's other conditions unchanged (relative gain >= min_improvement,
loss reduction >= min_loss_reduction, both token-weighted). It prints, per run and per statistic, the
p-value and decision next to the candidate's change on the 300 test problems, then per statistic: auto's
mean change (a refusal counts 0) per level and n, and the runs written and worse.

Run:  python benchmarks/gate_statistics.py [--tasks addition,sort,classify] [--out FILE]
      (about 10 minutes on this CPU in one process; needs the table's run cache)
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import heldout_answers as ha  # noqa: E402  (rebuilds each run's held-out split and candidate)

from vllm_surgery import SurgeryConfig  # noqa: E402
from vllm_surgery.calibration import Example  # noqa: E402
from vllm_surgery.exact_match import merged_lora  # noqa: E402
from vllm_surgery.gate import max_t_p_values, relative_gain, signed_ranks  # noqa: E402

STATISTICS = ("t", "signed_rank", "per_token")


@torch.no_grad()
def loss_sums(model: torch.nn.Module, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: (sum of the answer tokens' cross-entropy, fed the right prefix; answer tokens)."""
    sums, tokens = [], []
    for e in examples:
        answer = torch.tensor(e.answer_ids)
        logits = ha.answer_logits(model, e).double()
        sums.append(float(-torch.log_softmax(logits, -1).gather(1, answer[:, None]).sum()))
        tokens.append(len(answer))
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(tokens, dtype=torch.float64)


def main(argv: Sequence[str] | None = None) -> int:
    args, model, runs = ha.setup(argv, __doc__.split("\n\n")[0])
    config = SurgeryConfig(policy="auto")
    rows = []
    for row, lora, candidate, held in runs:
        with merged_lora(model, lora):
            before, tokens = loss_sums(model, held)
        with merged_lora(model, candidate):
            after, _ = loss_sums(model, held)
        d = before - after
        gain, _ = relative_gain(before, after)
        reduction = float(d.sum() / tokens.sum())
        floors = gain > 0 and gain >= config.min_improvement and reduction >= config.min_loss_reduction
        variants = {"t": d, "signed_rank": signed_ranks(d[:, None])[:, 0], "per_token": d / tokens}
        for name in STATISTICS:
            pv, _, _ = max_t_p_values(variants[name][:, None], row["seed"], config.max_false_accept)
            row[f"p_{name}"] = round(float(pv[0]), 4)
            row[f"accept_{name}"] = bool(floors and float(pv[0]) <= config.max_false_accept)
        row["gain"] = round(gain, 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    for name in STATISTICS:
        by: dict[tuple[str, int], list[tuple[float, bool]]] = defaultdict(list)
        worse = []
        for r in rows:
            change = r["test_change_pp"] if r[f"accept_{name}"] else 0.0
            by[(r["level"], r["n"])].append((change, r[f"accept_{name}"]))
            if r[f"accept_{name}"] and r["test_change_pp"] < 0:
                worse.append(
                    f"{r['task']}/{r['level']} n={r['n']} seed {r['seed']} ({r['test_change_pp']:+.1f})"
                )
        cells = ", ".join(
            f"{level} n={n}: {sum(c for c, _ in v) / len(v):+.1f} pp ({sum(w for _, w in v)} written)"
            for (level, n), v in sorted(by.items())
        )
        written = sum(r[f"accept_{name}"] for r in rows)
        print(
            f"{name}: {written} of {len(rows)} written; {cells}; written and worse: {', '.join(worse) or 'none'}"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
