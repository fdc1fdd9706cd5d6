"""Candidates whose step is chosen on held-aside data: grad_search and sigma_descent.

Why this exists: the sensitivity direction is informative, the paper's fixed step is not. On our
quality benchmark grad_direction's eta_s = 2.0 raised the held-out loss of most adapters by 26-387 %,
while the same direction at a smaller step helped. So the step is a searched quantity here, chosen on
a *selection* split (calibration.split_examples) that neither the sensitivity pass nor the gate sees:

- grad_search: grad_direction's multiplicative step at eta * 2^-j for j < rungs, from one sensitivity
  pass; the rung with the lowest selection loss is the candidate.
- sigma_descent: several steps on the singular values only (U and V fixed, so the result is still a
  PEFT LoRA adapter of the same rank): each a grad_direction step from a fresh sensitivity pass at the
  current sigma (the exact dL/dsigma over the whole fit split), its size chosen on the selection split
  (grad_search's ladder first, then the last size doubled, kept or halved), the magnitude constraint
  applied after every step, early-stopped on the selection loss. Singular-value fine-tuning (SVF,
  "Transformer-squared", Sun et al. 2025) trains the same few numbers by gradient; we keep the paper's
  normalised multiplicative step and magnitude constraint, and stop on data the gate never sees. (An
  Adam optimiser on log(sigma) at a fixed rate was tried first: on the quality benchmark's classify
  adapter its 8 steps gained a quarter of what one grad_direction step at the searched size gained.)

Because every choice made here uses the fit and selection splits only, the gate's test on the
held-out split needs no correction for how many rungs, steps or policies were tried.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .adapted_model import AdaptedModel
from .calibration import Example
from .errors import ConfigError, SurgeryError
from .evaluation import heldout_quality
from .policies import constrain, reweight
from .sensitivity import compute_sensitivities
from .spectral import Spectrum

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One policy's proposal and how it was chosen.

    sigmas: new singular values per edited module (float64, CPU).
    selection_loss: its answer loss on the selection split (None without one).
    chosen: what the search settled on, e.g. {"eta_s": 0.5, "eta_e": 0.05} or {"steps": 3}.
    trace: one row per rung or step, with its losses, for the report.
    """

    policy: str
    sigmas: dict[str, torch.Tensor]
    selection_loss: float | None = None
    chosen: dict[str, float] = field(default_factory=dict)
    trace: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"selection_loss": self.selection_loss, "chosen": dict(self.chosen), "trace": list(self.trace)}


def candidate_sigmas(
    spectra: Mapping[str, Spectrum],
    grads: Mapping[str, torch.Tensor],
    policy: str,
    params: Mapping[str, Any],
    constraint: str,
    seed: int,
) -> dict[str, torch.Tensor]:
    """New singular values for every edited module under one one-step policy and constraint (float64, CPU).

    Raises SurgeryError for a non-finite sensitivity and ConfigError when the policy's parameters
    overflow (e.g. a huge eta_e), so that no NaN or Inf singular value can reach a written adapter.
    """
    out = {}
    for name, spec in spectra.items():
        if not bool(torch.isfinite(grads[name]).all()):
            raise SurgeryError(
                f"the sensitivity of {name} is not finite (the calibration loss overflowed): check the "
                "base model and adapter, or run on another device"
            )
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        raw = reweight(spec.sigma, grads[name], policy, params, generator=gen)
        out[name] = constrain(spec.sigma, raw, constraint)
        if not bool(torch.isfinite(out[name]).all()):
            given = ", ".join(f"{k}={v:g}" for k, v in params.items())
            raise ConfigError(
                f"policy {policy} ({given}) gives non-finite singular values for {name}: "
                "use smaller factors or step sizes"
            )
    return out


class Search:
    """Builds candidates for one refinement: the model with the adapter applied, the splits, the settings.

    adapted: the model with the adapter's sigma as leaves (AdaptedModel).
    evaluate: examples -> mean answer loss of the model as it is now (the selection loss).
    """

    def __init__(
        self,
        adapted: AdaptedModel,
        spectra: Mapping[str, Spectrum],
        fit: Sequence[Example],
        selection: Sequence[Example],
        *,
        constraint: str,
        seed: int,
        pass_kwargs: Mapping[str, Any],
        evaluate: Callable[[Sequence[Example], str], float],
        progress: bool = False,
    ) -> None:
        self.adapted = adapted
        self.spectra = spectra
        self.fit = fit
        self.selection = selection
        self.constraint = constraint
        self.seed = seed
        self.pass_kwargs = dict(pass_kwargs)
        self.evaluate = evaluate
        self.progress = progress
        self.passes = 0  # sensitivity passes run by the searches (the first, shared one not counted)

    def selection_loss(self, sigmas: Mapping[str, torch.Tensor], desc: str) -> float | None:
        if not self.selection:
            return None
        with self.adapted.sigma_values(sigmas):
            return self.evaluate(self.selection, desc)

    def one_step(
        self, policy: str, params: Mapping[str, Any], grads: Mapping[str, torch.Tensor]
    ) -> Candidate:
        sigmas = candidate_sigmas(self.spectra, grads, policy, params, self.constraint, self.seed)
        return Candidate(policy, sigmas, self.selection_loss(sigmas, f"selection {policy}"))

    def grad_search(self, params: Mapping[str, Any], grads: Mapping[str, torch.Tensor]) -> Candidate:
        """grad_direction at eta_s * 2^-j (eta_e scaled alike), j < rungs; the lowest selection loss wins."""
        if not self.selection:
            raise ConfigError(
                "grad_search chooses its step on the selection split: selection_fraction must be > 0"
            )
        best: Candidate | None = None
        trace = []
        for j in range(int(params["rungs"])):
            step = {"eta_s": params["eta_s"] * 2.0**-j, "eta_e": params["eta_e"] * 2.0**-j}
            sigmas = candidate_sigmas(self.spectra, grads, "grad_direction", step, self.constraint, self.seed)
            loss = self.selection_loss(sigmas, f"selection grad_search eta_s={step['eta_s']:g}")
            trace.append({**step, "selection_loss": loss})
            if best is None or loss < best.selection_loss:
                best = Candidate("grad_search", sigmas, loss, step)
        assert best is not None
        best.trace = trace
        log.info(
            "grad_search: eta_s %g chosen on %d selection examples", best.chosen["eta_s"], len(self.selection)
        )
        return best

    def sigma_descent(
        self,
        params: Mapping[str, Any],
        grads: Mapping[str, torch.Tensor],
        fit_loss: float,
        original_selection_loss: float,
    ) -> Candidate:
        """Repeated grad_direction steps, each from a fresh sensitivity pass at the current sigma and with
        its step size chosen on the selection split, early-stopped on the selection loss.

        Step 1 is grad_search's ladder from `grads` (the first pass, at the adapter's own sigma). Step
        t > 1 tries the previous step size doubled, kept and halved (eta_e scaled alike) along the new
        direction. The best step (lowest
        selection loss, at least one step taken) is the candidate; the search stops after `patience`
        steps that do not beat the best selection loss so far (the original's included), or after
        `steps` steps.
        """
        if not self.selection:
            raise ConfigError("sigma_descent stops on the selection split: selection_fraction must be > 0")
        steps, patience = int(params["steps"]), int(params["patience"])
        ratio = params["eta_e"] / params["eta_s"] if params["eta_s"] > 0 else 0.0
        started = time.perf_counter()
        first = self.grad_search(params, grads)
        eta = first.chosen["eta_s"]
        current, loss = first.sigmas, first.selection_loss
        assert loss is not None
        trace = [
            {
                "step": 1,
                "fit_loss": fit_loss,
                "eta_s": eta,
                "selection_loss": loss,
                "seconds": time.perf_counter() - started,
            }
        ]
        best = Candidate("sigma_descent", dict(current), loss, {"steps": 1, "eta_s": eta})
        best_loss = min(loss, original_selection_loss)
        since_best = 0 if loss < original_selection_loss else 1
        for t in range(2, steps + 1):
            if since_best >= patience:
                break
            started = time.perf_counter()
            with self.adapted.sigma_values(current):
                grads, stats = compute_sensitivities(
                    self.adapted, self.fit, progress=self.progress, **self.pass_kwargs
                )
            self.passes += 1
            here = {n: Spectrum(spec.U, current[n].float(), spec.V) for n, spec in self.spectra.items()}
            tried = []
            for factor in (2.0, 1.0, 0.5):
                step = {"eta_s": eta * factor, "eta_e": eta * factor * ratio}
                sigmas = candidate_sigmas(here, grads, "grad_direction", step, "none", self.seed)
                sigmas = {n: constrain(self.spectra[n].sigma, s, self.constraint) for n, s in sigmas.items()}
                tried.append((self.selection_loss(sigmas, f"selection sigma_descent step {t}"), step, sigmas))
            loss, step, current = min(tried, key=lambda x: x[0])
            eta = step["eta_s"]
            trace.append(
                {
                    "step": t,
                    "fit_loss": stats.loss,
                    "eta_s": eta,
                    "selection_loss": loss,
                    "seconds": time.perf_counter() - started,
                }
            )
            log.info(
                "sigma_descent step %d: fit loss %.5f, eta_s %g, selection loss %.5f",
                t,
                stats.loss,
                eta,
                loss,
            )
            if loss < best.selection_loss:
                best = Candidate("sigma_descent", dict(current), loss, {"steps": t, "eta_s": eta})
            if loss < best_loss:
                best_loss, since_best = loss, 0
            else:
                since_best += 1
        best.trace = trace
        return best


def choose(candidates: Mapping[str, Candidate]) -> str:
    """The candidate with the lowest selection loss (the only one when there is one; ties: the first)."""
    names = list(candidates)
    if len(names) == 1:
        return names[0]
    losses = {n: candidates[n].selection_loss for n in names}
    if any(v is None or not math.isfinite(v) for v in losses.values()):
        raise SurgeryError("choosing among several candidates needs a finite selection loss for each")
    return min(names, key=lambda n: losses[n])


def selection_evaluator(adapted: AdaptedModel, pass_kwargs: Mapping[str, Any], progress: bool):
    """examples, desc -> the model's current mean answer loss on them (unweighted, as the gate measures)."""

    def evaluate(examples: Sequence[Example], desc: str) -> float:
        return heldout_quality(adapted, examples, progress=progress, desc=desc, **pass_kwargs).loss

    return evaluate
