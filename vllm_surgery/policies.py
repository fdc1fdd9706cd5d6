"""How sensitivities become new singular values (policies), and how their magnitude is kept (constraints).

Policies follow the Spectral Surgery paper (arXiv 2603.03995, section 3 of our method note); every
parameter is settable because the paper shows no single setting wins on every task.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

from .errors import ConfigError

EPS = 1e-12

POLICY_DEFAULTS: dict[str, dict[str, float]] = {
    "grad_direction": {"eta_s": 2.0, "eta_e": 0.2},
    "abs_select": {"core_frac": 0.2, "noise_frac": 0.2, "amp": 1.25, "sup": 0.8, "mid": 1.0},
    "smooth_abs": {
        "core_frac": 0.2,
        "noise_frac": 0.2,
        "amp": 1.25,
        "sup": 0.8,
        "mid": 1.0,
        "tau_scale": 0.35,
    },
    "random_index": {"core_frac": 0.2, "noise_frac": 0.2, "amp": 1.25, "sup": 0.8, "mid": 1.0},
    # grad_direction's direction, its step chosen on the selection split among eta * 2^-j, j < rungs
    "grad_search": {"eta_s": 2.0, "eta_e": 0.2, "rungs": 7},
    # iterated grad_direction: a fresh sensitivity pass per step, each step's size searched on the
    # selection split (grad_search's ladder first), best step kept, stopped after `patience` steps
    # without a new best. 6 steps and patience 2 (was 4 and 1): on the quality benchmark's quick rows
    # the first stop often came one noisy selection reading too early (benchmarks/RESULTS.md, 4)
    "sigma_descent": {"eta_s": 2.0, "eta_e": 2.0, "rungs": 7, "steps": 6, "patience": 2},
}
POLICIES = tuple(POLICY_DEFAULTS)
#: Policies that choose among variants of themselves on the selection split (see search.py).
SEARCHED_POLICIES = ("grad_search", "sigma_descent")
#: One step from the sensitivities, no data needed beyond the sensitivity pass.
ONE_STEP_POLICIES = tuple(p for p in POLICIES if p not in SEARCHED_POLICIES)
# What `auto` tries. sigma_descent alone: its first step is grad_search's (the same ladder on the same
# pass), and it keeps a later step only where the selection split says it is better, so grad_search
# would add nothing but a second held-out evaluation. On the quality benchmark
# (benchmarks/quality_results.md) grad_direction's fixed step overshot on most adapters and
# abs_select / smooth_abs never won a run; random_index is the paper's control.
AUTO_POLICIES = ("sigma_descent",)
CONSTRAINTS = ("l1", "l2", "none")
#: Integer parameters and their largest allowed value (each step or rung costs a pass or an evaluation).
INTEGER_PARAMS = {"rungs": 20, "steps": 100, "patience": 100}


def policy_params(policy: str, overrides: Mapping[str, Any] | None = None) -> dict[str, float]:
    """The policy's defaults with `overrides` applied.

    Raises ConfigError for an unknown policy or parameter name, a value that is not a finite number
    (bools and strings included: NaN or infinite factors would write an all-NaN adapter), and values
    outside the ranges where the policy means something; the message names the parameter and its default.
    """
    if not isinstance(policy, str) or policy not in POLICY_DEFAULTS:
        raise ConfigError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)} or auto")
    defaults = POLICY_DEFAULTS[policy]
    params = dict(defaults)
    for key, value in (overrides or {}).items():
        if key not in params:
            raise ConfigError(f"policy {policy!r} has no parameter {key!r} (it has: {', '.join(params)})")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ConfigError(
                f"policy parameter {policy}.{key} must be a finite number; got {value!r} "
                f"(the default is {defaults[key]})"
            )
        params[key] = float(value)

    def refuse(keys: str, rule: str) -> None:
        given = ", ".join(f"{k}={params[k]}" for k in keys.split())
        raise ConfigError(f"{policy} needs {rule}; got {given}")

    for key, most in INTEGER_PARAMS.items():
        if key in params and (params[key] != int(params[key]) or not 1 <= params[key] <= most):
            refuse(key, f"{key} to be a whole number from 1 to {most}")
    if policy in ("grad_direction", "grad_search", "sigma_descent"):
        for key in ("eta_s", "eta_e"):
            if params[key] < 0:
                refuse(key, f"{key} >= 0 (a step size; the default is {defaults[key]})")
        return params
    for key in ("core_frac", "noise_frac"):
        if not 0.0 <= params[key] <= 1.0:
            refuse(key, f"{key} to lie in [0, 1] (a share of the rank)")
    for key in ("amp", "sup", "mid"):
        if params[key] < 0:
            refuse(key, f"{key} >= 0 (a factor on singular values)")
    if policy == "smooth_abs":
        if not params["sup"] < params["mid"] < params["amp"]:
            refuse("sup mid amp", "sup < mid < amp (the gate passes through mid at the median)")
        if params["tau_scale"] <= 0:
            refuse("tau_scale", "tau_scale > 0")
    return params


def normalized(g: torch.Tensor) -> torch.Tensor:
    """gh = g / mean(|g|): makes the step size independent of the module's gradient scale."""
    g = g.to(torch.float64)
    return g / (g.abs().mean() + EPS)


def _select_counts(r: int, params: Mapping[str, float]) -> tuple[int, int]:
    k_core = min(max(round(params["core_frac"] * r), 1), r)
    k_noise = min(round(params["noise_frac"] * r), r - k_core)
    return k_core, k_noise


def _gate_by_rank(order: torch.Tensor, r: int, params: Mapping[str, float]) -> torch.Tensor:
    """`order` lists component indices from most to least important; returns per-component factors."""
    k_core, k_noise = _select_counts(r, params)
    gate = torch.full((r,), params["mid"], dtype=torch.float64)
    gate[order[:k_core]] = params["amp"]
    if k_noise:
        gate[order[r - k_noise :]] = params["sup"]
    return gate


def reweight(
    sigma: torch.Tensor,
    g: torch.Tensor,
    policy: str,
    params: Mapping[str, float] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """New singular values (before the magnitude constraint), float64, for one module.

    Only the one-step policies (ONE_STEP_POLICIES); the searched ones are built by search.py from
    these (grad_search: grad_direction at several step sizes). Raises ConfigError for another policy.
    """
    params = policy_params(policy, params)
    if policy not in ONE_STEP_POLICIES:
        raise ConfigError(f"policy {policy} is searched on held-aside data (search.py), not one reweighting")
    sigma = sigma.detach().to(torch.float64).cpu()
    gh = normalized(g.detach().cpu())
    r = sigma.numel()
    if policy == "grad_direction":
        step = params["eta_s"] * gh.clamp_min(0) + params["eta_e"] * gh.clamp_max(0)
        return sigma * torch.exp(-step)
    mag = gh.abs()
    if policy == "abs_select":
        order = torch.argsort(-mag, stable=True)
        return sigma * _gate_by_rank(order, r, params)
    if policy == "random_index":
        order = torch.randperm(r, generator=generator)
        return sigma * _gate_by_rank(order, r, params)
    # smooth_abs: a sigmoid from sup to amp whose width spans the noise/core quantiles.
    lo = torch.quantile(mag, params["noise_frac"])
    hi = torch.quantile(mag, 1.0 - params["core_frac"])
    tau = params["tau_scale"] * (hi - lo)
    if float(tau) <= EPS:
        return sigma * params["mid"]
    centre = torch.quantile(mag, 0.5)
    p = (params["mid"] - params["sup"]) / (params["amp"] - params["sup"])
    mu = centre - tau * math.log(p / (1.0 - p))
    gate = params["sup"] + (params["amp"] - params["sup"]) * torch.sigmoid((mag - mu) / tau)
    return sigma * gate


def constrain(sigma: torch.Tensor, sigma_new: torch.Tensor, constraint: str) -> torch.Tensor:
    """Clamp to >= 0, then rescale so the l1 (nuclear) or l2 (Frobenius) norm of the update is kept."""
    if constraint not in CONSTRAINTS:
        raise ConfigError(f"unknown constraint {constraint!r}; choose one of {', '.join(CONSTRAINTS)}")
    sigma = sigma.detach().to(torch.float64).cpu()
    out = sigma_new.detach().to(torch.float64).cpu().clamp_min(0)
    if constraint == "none":
        return out
    norm = (lambda x: x.sum()) if constraint == "l1" else torch.linalg.vector_norm
    denom = norm(out)
    if float(denom) <= EPS:
        return out
    return out * (norm(sigma) / denom)
