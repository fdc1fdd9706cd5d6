"""The acceptance gate: does a candidate measurably beat the original adapter on held-out data?

Why a module of its own: the gate is the promise the project makes ("nothing is written unless it
measurably beats the original"), so its statistics must hold on their own terms, and be testable
without a model.

The figure. For held-out example i let b_i be the original adapter's answer-token loss *sum* and
a_ic candidate c's; the reported loss is the token-weighted mean sum(b) / tokens. The relative gain of
candidate c is therefore the ratio

    G_c = sum_i (b_i - a_ic) / sum_i b_i.

Its standard error (reported, for reading the figure) is the ratio estimator's delta-method SE:
sqrt(n / (n - 1) * sum_i (d_ic - G_c b_i)^2) / sum_i b_i with d_ic = b_i - a_ic, which weighs every
example by its answer tokens exactly as the gain does.

The test. One-sided and corrected for choosing among k candidates on the same held-out set: a paired
sign-flip test with the maximum statistic over candidates (Westfall & Young's single-step max-T).
Candidate c's statistic is T_c = sum_i x_ic / sqrt(sum_i x_ic^2) on per-example scores x_ic of the
loss-sum differences d_ic, chosen by the `statistic` setting:
- "t": x_ic = d_ic, the differences themselves (T_c is a monotone function of the paired t statistic).
  It tests the mean, but a few large differences can outweigh many small ones the other way: the
  quality benchmark's one adapter written and then worse on the test set had removed much loss from a
  few answers that were right already and added a little to most others.
- "signed_rank": x_ic = sign(d_ic) * rank of |d_ic| among candidate c's nonzero differences (ties
  share their average rank; zeros score 0): Wilcoxon's signed ranks. A gain must be carried by many
  examples; but alone it would accept the mirror image, a candidate that slightly sharpens most answers
  and badly breaks a few, whose mean loss is no better.
- "both" (the default): the candidate must pass both tests; its p-value is the larger of the two. The
  loss must fall on average and on most examples.
Each keeps the sign-flip null exactly (ranks depend on |d| only, so flipping an example's sign flips its
score), and "both" rejects only where each of the two does, so it is at least as strict. The null
hypothesis the test controls is symmetry: each example's vector of differences (d_i1, ..., d_ik) is as
likely as its negation (what a candidate no different from the original gives). Flipping the signs of
whole examples (all candidates together, which keeps the candidates' dependence) gives the null
distribution of max_c T_c, and the candidate's p-value is the fraction of sign vectors whose maximum reaches T_c. All 2^n sign vectors
are enumerated when n <= EXACT_MAX_EXAMPLES (an exact test); otherwise RANDOM_FLIPS seeded random ones
are drawn and p = (1 + hits) / (1 + draws), which is a valid p-value for any number of draws; a p-value
within BORDERLINE_SE Monte Carlo standard errors of the threshold draws more, up to MAX_RANDOM_FLIPS.

Candidates chosen on other data. refine() chooses among its policies, step sizes and iterations on a
selection split that the gate never sees (search.py), and sends only the winner here: a test of one
candidate needs no correction, however many variants the selection tried, because under the null
hypothesis the held-out differences of a candidate chosen without them are still symmetric.
`selected_from` and `selection_examples` only say so in the reason.

Decision. A candidate is accepted when its gain is positive, at least `min_improvement` (the practical
floor, relative), its loss reduction at least `min_loss_reduction` nats per answer token (the absolute
floor: a +30% gain on a loss of 1e-4 changes no answer, and the quality benchmark saw such a candidate
accepted on 8 held-out examples and break more test problems than it fixed) and its corrected p-value
is at most `max_false_accept`; among accepted candidates the lowest
held-out loss wins. Because max-T controls the family-wise error rate, the probability that the
original is replaced by a candidate that is no better is at most `max_false_accept`, however many
candidates were tried. tests/test_gate.py measures that rate by simulation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field

import torch

from .evaluation import Quality

EXACT_MAX_EXAMPLES = 16  # 2^16 = 65,536 sign vectors: enumerated in milliseconds
RANDOM_FLIPS = 20_000  # p-value resolution 5e-5; Monte Carlo SE 0.0011 at p = 0.025
# Near the threshold, more random flips (in rounds of RANDOM_FLIPS, up to this many) so that chance in
# the Monte Carlo draw does not decide a borderline case: 200,000 flips give a SE of 0.00035 at 0.025.
MAX_RANDOM_FLIPS = 200_000
BORDERLINE_SE = 3.0  # "near": within this many Monte Carlo standard errors of max_false_accept
_CHUNK_ELEMENTS = 1 << 22  # signs per matrix product (32 MiB of float64), at most 4,096 sign vectors
_BITS = 62  # random sign bits taken from one int64 draw
#: What the sign-flip test can run on (the `gate_statistic` setting), with how reports name it.
STATISTICS = {
    "both": "per-example loss differences and their Wilcoxon signed ranks, both passed",
    "signed_rank": "Wilcoxon signed ranks of the per-example loss differences",
    "t": "per-example loss differences (paired t)",
}
TEST_NAME = "one-sided paired sign-flip test, max statistic over candidates (Westfall-Young max-T)"


@dataclass(frozen=True)
class CandidateGain:
    """One candidate against the original on the held-out set.

    relative_improvement: token-weighted relative loss reduction (positive: the candidate is better).
    relative_improvement_se: its delta-method standard error.
    p_value: one-sided p-value of "no better than the original", corrected for the number of candidates
        (with the statistic "both", the larger of the two).
    p_values: the p-value of each statistic the test ran on, by STATISTICS key.
    """

    loss: float
    relative_improvement: float
    relative_improvement_se: float
    p_value: float
    p_values: dict[str, float] = field(default_factory=dict)

    @property
    def z(self) -> float:
        """Gain in standard errors (for reading only; the decision uses p_value)."""
        se = self.relative_improvement_se
        return (
            self.relative_improvement / se if se > 0 else math.copysign(math.inf, self.relative_improvement)
        )

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "z": self.z}


@dataclass(frozen=True)
class GateResult:
    """The gate's decision with every figure needed to audit it.

    chosen: the accepted candidate, or when none is accepted the one with the lowest held-out loss.
    original_loss: the original adapter's held-out loss, for the reason's wording.
    """

    chosen: str
    original_loss: float
    accepted: bool
    candidates: dict[str, CandidateGain]
    heldout_examples: int
    sign_flips: int
    exact: bool
    min_improvement: float
    max_false_accept: float
    min_loss_reduction: float = 0.0
    selected_from: int = 1
    selection_examples: int = 0
    statistic: str = "both"

    @property
    def reason(self) -> str:
        """One sentence with the figures behind the decision."""
        row = self.candidates[self.chosen]
        verb = "lowers" if row.loss < self.original_loss else "does not lower"
        text = (
            f"{self.chosen} {verb} held-out answer loss: {self.original_loss:.4f} -> {row.loss:.4f} "
            f"({100 * row.relative_improvement:+.2f}% ± {100 * row.relative_improvement_se:.2f}% SE, "
            f"p = {row.p_value:.4g}{self._each_p(row)}{self._tested()}; "
            f"needed >= {100 * self.min_improvement:.2f}%"
            + (
                f", a loss reduction >= {self.min_loss_reduction:g} nats/token"
                if self.min_loss_reduction > 0
                else ""
            )
            + f" and p <= {self.max_false_accept:g})"
        )
        if self.accepted:
            return text
        text = "no candidate measurably beats the original: " + text
        if self.smallest_p_value > self.max_false_accept:
            text += (
                f"; with {self.heldout_examples} held-out examples no p-value can fall below "
                f"{self.smallest_p_value:.4g}: hold out more examples or raise max_false_accept"
            )
        return text

    @staticmethod
    def _each_p(row: CandidateGain) -> str:
        if len(row.p_values) < 2:
            return ""
        return " (the larger of " + " and ".join(f"{k} {v:.4g}" for k, v in row.p_values.items()) + ")"

    def _tested(self) -> str:
        k = len(self.candidates)
        text = f" corrected for {k} candidates" if k > 1 else ""
        if self.selected_from > 1:
            text += f", chosen among {self.selected_from} on {self.selection_examples} other examples"
        return text

    @property
    def smallest_p_value(self) -> float:
        """The smallest p-value this held-out set can produce: above max_false_accept, nothing can pass."""
        return 2.0**-self.heldout_examples if self.exact else 1.0 / (self.sign_flips + 1)

    def to_dict(self) -> dict:
        chosen = self.candidates[self.chosen]
        return {
            "test": TEST_NAME,
            "statistic": self.statistic,
            "chosen": self.chosen,
            "accepted": self.accepted,
            "candidates": len(self.candidates),
            "selected_from": self.selected_from,
            "selection_examples": self.selection_examples,
            "heldout_examples": self.heldout_examples,
            "sign_flips": self.sign_flips,
            "exact": self.exact,
            "relative_improvement": chosen.relative_improvement,
            "relative_improvement_se": chosen.relative_improvement_se,
            "p_value": chosen.p_value,
            "smallest_p_value": self.smallest_p_value,
            "min_improvement": self.min_improvement,
            "min_loss_reduction": self.min_loss_reduction,
            "max_false_accept": self.max_false_accept,
        }


def min_heldout_examples(max_false_accept: float) -> int:
    """The fewest held-out examples whose smallest possible p-value (2^-n, exact test) is at most
    `max_false_accept`: with fewer, no candidate can ever be accepted."""
    return max(0, math.ceil(-math.log2(max_false_accept) - 1e-12))


def relative_gain(before_sums: torch.Tensor, after_sums: torch.Tensor) -> tuple[float, float]:
    """(token-weighted relative loss reduction, its delta-method SE) from per-example loss sums.

    Raises ValueError when the two do not cover the same number of examples.
    """
    b, a = before_sums.to(torch.float64), after_sums.to(torch.float64)
    if b.shape != a.shape or b.dim() != 1:
        raise ValueError(
            f"per-example loss sums must be two vectors of one length, got {b.shape} and {a.shape}"
        )
    total, n = float(b.sum()), b.numel()
    if total <= 0:
        return 0.0, math.inf
    d = b - a
    gain = float(d.sum()) / total
    if n < 2:
        return gain, math.inf
    residual = d - gain * b
    return gain, math.sqrt(n / (n - 1) * float(residual.square().sum())) / total


def signed_ranks(differences: torch.Tensor) -> torch.Tensor:
    """Wilcoxon's signed ranks, per column of an (examples x candidates) matrix: sign(d) times the rank of
    |d| among the column's nonzero entries (1 for the smallest; tied entries share their average rank;
    zeros score 0). They depend on |d| only, so flipping an example's sign flips its score: the sign-flip
    test stays exact on them. Raises ValueError for anything but a 2-D matrix."""
    d = differences.to(torch.float64)
    if d.dim() != 2:
        raise ValueError(f"differences must be an (examples x candidates) matrix, got shape {tuple(d.shape)}")
    out = torch.zeros_like(d)
    for c in range(d.shape[1]):
        column = d[:, c]
        nonzero = (column != 0).nonzero().flatten()
        if nonzero.numel() == 0:
            continue
        values, order = column[nonzero].abs().sort(stable=True)
        _, counts = torch.unique_consecutive(values, return_counts=True)
        ends = counts.cumsum(0).to(torch.float64)  # 1-based rank of each tie group's last member
        average = (ends - (counts.to(torch.float64) - 1) / 2).repeat_interleave(counts)
        ranks = torch.empty_like(average)
        ranks[order] = average
        out[nonzero, c] = ranks * column[nonzero].sign()
    return out


def _sign_vectors(n: int, generator: torch.Generator, count: int = RANDOM_FLIPS) -> Iterator[torch.Tensor]:
    """Chunks of +-1 sign vectors (rows): all 2^n of them when n is small, else `count` random ones."""
    chunk = max(1, min(4096, _CHUNK_ELEMENTS // n))
    if n <= EXACT_MAX_EXAMPLES:
        bits = torch.arange(n)
        total = 2**n
        for start in range(0, total, chunk):
            idx = torch.arange(start, min(start + chunk, total))
            yield 1.0 - 2.0 * ((idx[:, None] >> bits) & 1).to(torch.float64)  # row 0: the identity
        return
    # 62 independent fair bits per random integer: several times faster than one draw per sign.
    bits = torch.arange(_BITS)
    words = -(-n // _BITS)
    for start in range(0, count, chunk):
        rows = min(chunk, count - start)
        draws = torch.randint(0, 2**_BITS, (rows, words, 1), generator=generator)
        signs = ((draws >> bits) & 1).reshape(rows, words * _BITS)[:, :n]
        yield 1.0 - 2.0 * signs.to(torch.float64)


def max_t_p_values(
    differences: torch.Tensor, seed: int = 0, threshold_p: float | None = None
) -> tuple[torch.Tensor, int, bool]:
    """Selection-corrected one-sided p-values of k candidates from an (n examples x k) difference matrix.

    differences[i, c] = original's minus candidate c's loss sum on example i (positive: c is better), or
    any per-example score whose sign flips with it under the null (`signed_ranks` of them: decide()).
    threshold_p: the level the p-values will be compared with; with random flips, a p-value near it
    draws more flips (up to MAX_RANDOM_FLIPS).
    Returns (p-values, number of sign vectors used, whether all 2^n were enumerated).
    """
    d = differences.to(torch.float64)
    if d.dim() != 2 or d.shape[0] < 1 or d.shape[1] < 1:
        raise ValueError(f"differences must be an (examples x candidates) matrix, got shape {tuple(d.shape)}")
    n = d.shape[0]
    norm = d.square().sum(0).sqrt()
    scaled = torch.where(norm > 0, d / torch.where(norm > 0, norm, 1.0), 0.0)
    observed = scaled.sum(0)
    # Reaching the observed value within rounding counts as reaching it (conservative).
    threshold = observed - 1e-9 * observed.abs().clamp_min(1.0)
    hits = torch.zeros_like(observed)
    flips = 0
    generator = torch.Generator().manual_seed(seed)
    exact = n <= EXACT_MAX_EXAMPLES

    def draw(count: int) -> None:
        nonlocal hits, flips
        for signs in _sign_vectors(n, generator, count):
            flipped_max = (signs @ scaled).max(dim=1).values
            hits += (flipped_max[:, None] >= threshold[None, :]).sum(0)
            flips += signs.shape[0]

    draw(RANDOM_FLIPS)
    if exact:
        return hits / flips, flips, True
    while threshold_p is not None and flips < MAX_RANDOM_FLIPS:
        p = (hits + 1) / (flips + 1)
        se = math.sqrt(threshold_p * (1 - threshold_p) / flips)
        if not bool(((p - threshold_p).abs() < BORDERLINE_SE * se).any()):
            break
        draw(min(RANDOM_FLIPS, MAX_RANDOM_FLIPS - flips))
    return (hits + 1) / (flips + 1), flips, False


def decide(
    before: Quality,
    candidates: Mapping[str, Quality],
    *,
    min_improvement: float,
    max_false_accept: float,
    min_loss_reduction: float = 0.0,
    seed: int = 0,
    selected_from: int = 1,
    selection_examples: int = 0,
    statistic: str = "both",
) -> GateResult:
    """Run the gate on the original's and every candidate's held-out quality.

    statistic: what the sign-flip test sums per example, a key of STATISTICS (module docstring).
    selected_from / selection_examples: how many candidates the one(s) given here were chosen from, and
    on how many selection examples (for the reason; the choice did not see these held-out examples).
    Raises ValueError when there is no candidate, the qualities were not measured on the same examples or
    the statistic is unknown.
    """
    if statistic not in STATISTICS:
        raise ValueError(f"unknown gate statistic {statistic!r}: choose one of {', '.join(STATISTICS)}")
    if not candidates:
        raise ValueError("the gate needs at least one candidate")
    b = torch.tensor(before.example_loss_sums, dtype=torch.float64)
    for name, q in candidates.items():
        if q.example_tokens != before.example_tokens:
            raise ValueError(f"candidate {name!r} was measured on other held-out examples than the original")
    names = list(candidates)
    after = torch.stack(
        [torch.tensor(candidates[c].example_loss_sums, dtype=torch.float64) for c in names], 1
    )
    d = b[:, None] - after
    scores = {"t": lambda: d, "signed_rank": lambda: signed_ranks(d)}
    tests = {
        name: max_t_p_values(score(), seed, max_false_accept)
        for name, score in scores.items()
        if statistic in (name, "both")
    }
    p = torch.stack([t[0] for t in tests.values()]).max(0).values
    flips = min(t[1] for t in tests.values())  # what bounds the smallest p-value that can pass
    exact = all(t[2] for t in tests.values())
    rows = {}
    for j, c in enumerate(names):
        gain, se = relative_gain(b, after[:, j])
        each = {name: float(t[0][j]) for name, t in tests.items()}
        rows[c] = CandidateGain(candidates[c].loss, gain, se, float(p[j]), each)
    passing = [
        c
        for c in names
        if rows[c].relative_improvement > 0
        and rows[c].relative_improvement >= min_improvement
        and before.loss - rows[c].loss >= min_loss_reduction
        and rows[c].p_value <= max_false_accept
    ]
    accepted = bool(passing)
    chosen = min(passing or names, key=lambda c: rows[c].loss)
    return GateResult(
        chosen=chosen,
        original_loss=before.loss,
        accepted=accepted,
        candidates=rows,
        heldout_examples=len(before.example_tokens),
        sign_flips=flips,
        exact=exact,
        min_improvement=min_improvement,
        max_false_accept=max_false_accept,
        min_loss_reduction=min_loss_reduction,
        selected_from=selected_from,
        selection_examples=selection_examples,
        statistic=statistic,
    )
