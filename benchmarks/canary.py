"""The canary's decision rule, simulated: how often it promotes, calls better, rolls back or gives up,
and after how many ratings, for canaries of known quality.

Each simulated canary is rated by users at random times: every rating comes from the canary with
probability `share` (else from the current version) and is "good" with its version's true good rate (bad
or corrected otherwise). The rule (vllm_surgery.canary, defaults: margin 0.05, error rate 0.05, 30
ratings per version) is applied after every rating; the time limit is the LIMIT-th rating, where an
undecided canary expires (or, if already shown not worse by the margin, is promoted). Grid: true
difference (canary - current) {-0.15, -margin, 0, +margin, +0.15} x current good rate {0.5, 0.8} x share
{0.1, 0.5}, N canaries each.

What must hold (the rule's guarantees; exit 1 otherwise): where the canary is worse by the margin or
more, promote <= error rate; where it is not worse, rollback <= error rate; where it is not better,
better <= error rate; each with the Monte Carlo tolerance of the upper 99% binomial bound.

    .venv/bin/python benchmarks/canary.py             # 2,000 canaries per cell, limit 10,000 ratings (~5 min on 1 core)
    .venv/bin/python benchmarks/canary.py --quick     # 200 canaries per cell, limit 3,000 ratings; no results file
    .venv/bin/python benchmarks/canary.py --dry-run   # print the grid; simulate nothing
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from vllm_surgery.canary import DECISIONS, CanaryRule, simulate

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "canary_results.md"
BASES = (0.5, 0.8)
SHARES = (0.1, 0.5)


def differences(margin: float) -> tuple[float, ...]:
    return (-0.15, -margin, 0.0, margin, 0.15)


def binomial_upper(n: int, p: float, level: float = 0.99) -> int:
    """The smallest k with P(Bin(n, p) <= k) >= level (log space: n is in the thousands)."""
    total = 0.0
    for k in range(n + 1):
        log_pmf = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
        log_pmf += (k * math.log(p) if k else 0.0) + ((n - k) * math.log1p(-p) if n - k else 0.0)
        total += math.exp(log_pmf)
        if total >= level:
            return k
    return n


def run_cell(
    base: float, diff: float, share: float, rule: CanaryRule, runs: int, limit: int, seed: int
) -> dict:
    started = time.perf_counter()
    sim = simulate(base, base + diff, share, rule, runs=runs, max_ratings=limit, seed=seed)
    decided = (sim.decision == DECISIONS.index("promote")) | (sim.decision == DECISIONS.index("rollback"))
    return {
        "base": base,
        "diff": diff,
        "share": share,
        "runs": runs,
        "promote": sim.rate("promote"),
        "better": float(sim.better.mean()),
        "rollback": sim.rate("rollback"),
        "expired": sim.rate("expired"),
        "median_ratings": float(np.median(sim.ratings[decided])) if decided.any() else None,
        "median_canary_ratings": float(np.median(sim.canary_rated[decided])) if decided.any() else None,
        "at_limit": float(np.mean(decided & (sim.ratings == limit))),
        "seconds": time.perf_counter() - started,
    }


def checks(cell: dict, rule: CanaryRule) -> list[str]:
    """The guarantees this cell tests, each as 'name: count <= bound' and whether it holds."""
    bound = binomial_upper(cell["runs"], rule.error_rate)
    out = []
    eps = 1e-9
    if cell["diff"] <= -rule.margin + eps:
        out.append(("promote", cell["promote"]))
    if cell["diff"] >= -eps:
        out.append(("rollback", cell["rollback"]))
    if cell["diff"] <= eps:
        out.append(("better", cell["better"]))
    return [
        f"{name} {round(rate * cell['runs'])} <= {bound}"
        + ("" if round(rate * cell["runs"]) <= bound else " MISSED")
        for name, rate in out
    ]


def table(cells: list[dict], rule: CanaryRule) -> str:
    lines = [
        "| true diff | current good rate | share | promote | better | rollback | expired | median ratings to a decision (canary's) | guarantees checked |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in cells:
        median = (
            f"{c['median_ratings']:,.0f} ({c['median_canary_ratings']:,.0f})"
            if c["median_ratings"] is not None
            else "-"
        )
        lines.append(
            f"| {c['diff']:+.2f} | {c['base']:.1f} | {c['share']:.1f} | {c['promote']:.3f} | {c['better']:.3f} | "
            f"{c['rollback']:.3f} | {c['expired']:.3f} | {median} | {'; '.join(checks(c, rule)) or '-'} |"
        )
    return "\n".join(lines)


def plot(cells: list[dict], rule: CanaryRule, path: Path) -> Path:
    """Promote, better and rollback rates against the true difference, one panel per base rate and share."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(BASES), len(SHARES), sharex=True, sharey=True, squeeze=False)
    for i, base in enumerate(BASES):
        for j, share in enumerate(SHARES):
            ax = axes[i][j]
            sel = [c for c in cells if c["base"] == base and c["share"] == share]
            xs = [c["diff"] for c in sel]
            for key, style in (("promote", "o-"), ("better", "s--"), ("rollback", "v-"), ("expired", "x:")):
                ax.plot(xs, [c[key] for c in sel], style, label=key)
            ax.axhline(rule.error_rate, color="black", lw=0.8, ls="--")
            ax.axvline(-rule.margin, color="0.6", lw=0.8)
            ax.set_title(f"current good rate {base}, canary share {share}", fontsize=10)
            ax.set_xticks(xs, [f"{x:+.2f}" for x in xs])
            ax.set_ylim(-0.03, 1.03)
            if i == len(BASES) - 1:
                ax.set_xlabel("true difference of good rates (canary - current)")
            if j == 0:
                ax.set_ylabel("share of canaries")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(
        f"The canary's decision rule, {sel[0]['runs']:,} simulated canaries per point (dashed line: the error "
        f"rate {rule.error_rate:g}; grey: -margin)",
        fontsize=10,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path


def write_results(
    cells: list[dict], rule: CanaryRule, args: argparse.Namespace, seconds: float, path: Path
) -> None:
    png = path.with_suffix(".png")
    plot(cells, rule, png)
    text = f"""# The canary's decision rule, simulated (`benchmarks/canary.py`)

{time.strftime("%Y-%m-%d")}, {platform.processor() or platform.machine()}, Python {platform.python_version()},
numpy {np.__version__}; {seconds:.0f} s. Command: `.venv/bin/python benchmarks/canary.py --runs {args.runs}
--limit {args.limit} --seed {args.seed}`.

Rule: margin {rule.margin:g}, error rate {rule.error_rate:g}, {rule.min_ratings} rated answers per version
before any decision, settle_better {str(rule.settle_better).lower()}. {args.runs:,} canaries per row, each
looked at after every rating; the time limit is the {args.limit:,}th rating (both versions together), where
an undecided canary expires, or is promoted if it is shown not worse by the margin by then. Rates are
fractions of the canaries; medians are over those promoted or rolled back, in ratings of both versions
(the canary's own in brackets). "Guarantees checked": the number of canaries with an outcome the rule
bounds by its error rate, against the upper 99% binomial bound for that rate.

{table(cells, rule)}

![rates against the true difference]({png.name})
"""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=2000, help="N: simulated canaries per cell")
    ap.add_argument("--limit", type=int, default=10_000, help="ratings (both versions) at the time limit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", type=Path, default=RESULTS, help="the results file (a .png beside it)")
    ap.add_argument(
        "--quick", action="store_true", help="200 canaries per cell, limit 3,000; no results file"
    )
    ap.add_argument(
        "--dry-run", action="store_true", help="print the grid and what would run; simulate nothing"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.limit = 200, 3000
    rule = CanaryRule()
    grid = [(b, d, s) for b in BASES for s in SHARES for d in differences(rule.margin)]
    print(
        f"would simulate {len(grid)} cells x {args.runs} canaries, limit {args.limit} ratings "
        f"(margin {rule.margin:g}, error rate {rule.error_rate:g})"
    )
    if args.dry_run:
        return 0
    started = time.perf_counter()
    cells = []
    for k, (base, diff, share) in enumerate(grid):
        cell = run_cell(base, diff, share, rule, args.runs, args.limit, seed=args.seed * 1000 + k)
        cells.append(cell)
        print(
            f"base {base} diff {diff:+.2f} share {share}: promote {cell['promote']:.3f} better {cell['better']:.3f} "
            f"rollback {cell['rollback']:.3f} expired {cell['expired']:.3f} ({cell['seconds']:.1f} s)",
            flush=True,
        )
    seconds = time.perf_counter() - started
    print()
    print(table(cells, rule))
    if not args.quick or args.output != RESULTS:
        write_results(cells, rule, args, seconds, args.output)
        print(f"\nwrote {args.output} and {args.output.with_suffix('.png')}")
    missed = [c for c in cells if any(line.endswith("MISSED") for line in checks(c, rule))]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
