"""refine(): one Spectral Surgery run, from a PEFT adapter and calibration data to a decision.

The sequence is load -> thin SVD -> sensitivity pass -> candidate singular values -> held-out check
-> (only if a candidate measurably wins, or with force) atomic write of a standard PEFT adapter.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .adapted_model import AdaptedModel
from .adapter import LoraAdapter, load_adapter, save_adapter
from .base_model import check_base_model
from .calibration import load_calibration, split_examples, weighted
from .config import SurgeryConfig, select_modules
from .errors import AdapterError, ConfigError
from .evaluation import Quality, evaluation_budget, heldout_quality
from .gate import GateResult, decide, relative_gain
from .policies import SEARCHED_POLICIES, policy_params
from .precision import compute_dtype
from .search import Candidate, Search, candidate_sigmas, choose, selection_evaluator
from .sensitivity import compute_sensitivities
from .spectral import lora_factors, lora_svd

__all__ = ["METHOD", "ModuleResult", "SurgeryResult", "candidate_sigmas", "refine"]

log = logging.getLogger(__name__)

METHOD = "spectral-surgery"


@dataclass
class ModuleResult:
    rank: int
    scaling: float
    sigma: list[float]
    sigma_new: list[float]
    sensitivity: list[float]


@dataclass
class SurgeryResult:
    """What refine() decided and why, with everything needed to audit it.

    decision: "accept" (a candidate passed the gate and was written), "keep_original" (nothing written),
    or "forced" (written on request although it did not pass).
    quality_*: held-out mean answer-token loss (lower is better); None without a held-out split.
    candidates: per candidate policy, its selection loss and what its search chose, its held-out loss,
        relative improvement and the improvement's standard error; `tested` marks the one candidate the
        gate tested (the lowest selection loss), with its p-value (see gate.py); the others were measured
        on the held-out split for the report only, so their p_value and p_values are None.
    gate: the test's figures for the chosen candidate (test, statistic, candidates, held-out examples, sign flips,
        gain, SE, p-value, thresholds); empty without a held-out split.
    selection: the selection split's size, the original's loss on it, the chosen policy, and per
        candidate its selection loss, what its search chose and every rung or step tried (`trace`).
    candidate_sigmas: per candidate policy, its new singular values per edited module (float64, CPU),
        the chosen one's and the others'; not in to_dict(). What refine(policy=P, force=True) with the
        same settings would write for a P that auto tried (the quality benchmark scores them all).
    """

    decision: str
    reason: str
    policy: str | None
    constraint: str
    quality_before: Quality | None
    quality_after: Quality | None
    candidates: dict[str, dict[str, float]]
    modules: dict[str, ModuleResult]
    output_path: Path | None
    adapter_hash: str
    calibration: dict[str, Any]
    base_model: str
    config: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)
    candidate_sigmas: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def written(self) -> bool:
        return self.output_path is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": METHOD,
            "decision": self.decision,
            "reason": self.reason,
            "policy": self.policy,
            "constraint": self.constraint,
            "quality_before": self.quality_before.to_dict() if self.quality_before else None,
            "quality_after": self.quality_after.to_dict() if self.quality_after else None,
            "candidates": self.candidates,
            "gate": self.gate,
            "selection": self.selection,
            "output_path": str(self.output_path) if self.output_path else None,
            "adapter_hash": self.adapter_hash,
            "base_model": self.base_model,
            "calibration": self.calibration,
            "config": self.config,
            "timings": self.timings,
            "stats": self.stats,
            "versions": package_versions(),
            "modules": {k: vars(v) for k, v in self.modules.items()},
        }


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("vllm-surgery", "torch", "transformers", "peft", "safetensors"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for, but torch sees no CUDA device")
    return device


def load_base_model(
    path: str | os.PathLike, device: torch.device, progress: bool = True
) -> tuple[torch.nn.Module, Any]:
    """Base model in float32 on CPU (exact) or bf16 on CUDA (fp16 without bf16), safetensors only, plus its
    tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()

    dtype = compute_dtype(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    return model.to(device).eval(), tokenizer


def refine(
    base_model: str | os.PathLike | None,
    adapter: str | os.PathLike | LoraAdapter,
    calibration: str | os.PathLike | Sequence[Mapping[str, Any]],
    output: str | os.PathLike | None = None,
    config: SurgeryConfig | None = None,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    allow_base_mismatch: bool = False,
    **overrides: Any,
) -> SurgeryResult:
    """Refine `adapter` by Spectral Surgery and write it to `output` if it measurably helps.

    base_model: a transformers model directory; or pass an already loaded `model` and `tokenizer`
        (left unmodified: the adapter is applied through hooks that are removed afterwards).
    calibration: a JSONL file or a list of records ({"prompt", "completion"} or {"messages"}).
    allow_base_mismatch: accept an adapter whose recorded base_model_name_or_path names another model
        (vllm_surgery.base_model states the rule); shapes are checked regardless.
    overrides: SurgeryConfig fields, e.g. refine(..., policy="auto", samples=128).
    Raises AdapterError, CalibrationError or ConfigError naming the problem, before any work where it can.
    """
    if config is None:
        config = SurgeryConfig.from_mapping(overrides)
    elif overrides:
        raise ConfigError("pass either a SurgeryConfig or keyword settings, not both")
    else:
        config = dataclasses.replace(config)  # validates again: fields may have been set after construction
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if output is not None:
        out = Path(output)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise AdapterError(f"{out}: already exists; choose a new output directory")
    lora = adapter if isinstance(adapter, LoraAdapter) else load_adapter(adapter)
    edited = select_modules(lora.modules, config.modules, config.layers)
    # e1: base name, quantization and shapes, before loading weights or data
    check_base_model(lora, base_model, model, allow_base_mismatch=allow_base_mismatch)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    if model is None:
        if base_model is None:
            raise ConfigError("give base_model (a directory) or a loaded model and tokenizer")
        model, tokenizer = load_base_model(base_model, device, config.progress)
    elif tokenizer is None:
        raise ConfigError("a loaded model needs its tokenizer too")
    else:
        device = next(model.parameters()).device
    base_name = str(base_model) if base_model is not None else str(getattr(model.config, "_name_or_path", ""))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    timings["load"] = time.perf_counter() - t0

    t = time.perf_counter()
    calib_set = load_calibration(
        calibration, tokenizer, max_length=config.max_length, samples=config.samples, seed=config.seed
    )
    candidate_params = config.candidate_params()
    # A selection split only where something is chosen on it: a searched policy, or several candidates.
    needs_selection = len(candidate_params) > 1 or any(p in SEARCHED_POLICIES for p in candidate_params)
    fit, selection, heldout = split_examples(
        calib_set.examples,
        config.heldout_fraction,
        config.selection_fraction if needs_selection else 0.0,
        config.seed,
    )
    fit = weighted(fit, config.correction_weight)
    if calib_set.n_truncated:
        log.warning(
            "%d calibration examples were longer than max_length=%d; their prompts were cut on the left",
            calib_set.n_truncated,
            config.max_length,
        )
    spectra = {name: lora_svd(lora.lora_a(name), lora.lora_b(name)) for name in edited}
    timings["prepare"] = time.perf_counter() - t

    pass_kwargs = {"max_batch_tokens": config.max_batch_tokens, "pad_id": pad_id}
    eval_kwargs = dict(pass_kwargs)
    with AdaptedModel(model, lora, spectra) as adapted:
        t = time.perf_counter()
        grads, stats = compute_sensitivities(adapted, fit, progress=config.progress, **pass_kwargs)
        timings["sensitivity"] = time.perf_counter() - t

        t = time.perf_counter()
        if heldout or selection:
            eval_kwargs["budget"] = evaluation_budget(
                adapted, config.max_batch_tokens
            )  # one for all versions
        search = Search(
            adapted,
            spectra,
            fit,
            selection,
            constraint=config.constraint,
            seed=config.seed,
            pass_kwargs=pass_kwargs,
            evaluate=selection_evaluator(adapted, eval_kwargs, config.progress),
            progress=config.progress,
        )
        original_selection = search.selection_loss({}, "selection original")
        proposals: dict[str, Candidate] = {}
        for policy, params in candidate_params.items():
            params = policy_params(policy, params)
            if policy == "grad_search":
                proposals[policy] = search.grad_search(params, grads)
            elif policy == "sigma_descent":
                proposals[policy] = search.sigma_descent(params, grads, stats.loss, original_selection)
            else:
                proposals[policy] = search.one_step(policy, params, grads)
        chosen = choose(proposals)
        timings["search"] = time.perf_counter() - t

        t = time.perf_counter()
        before: Quality | None = None
        scores: dict[str, Quality] = {}
        if heldout:
            before = heldout_quality(
                adapted, heldout, progress=config.progress, desc="held-out original", **eval_kwargs
            )
            for policy, proposal in proposals.items():  # all measured, for the report; one is tested
                with adapted.sigma_values(proposal.sigmas):
                    scores[policy] = heldout_quality(
                        adapted, heldout, progress=config.progress, desc=f"held-out {policy}", **eval_kwargs
                    )
        timings["evaluation"] = time.perf_counter() - t

    gate: GateResult | None = None
    if before is None:
        best = chosen
        wins, reason = False, "no held-out split (heldout_fraction=0): quality was not measured"
    else:
        gate = decide(
            before,
            {chosen: scores[chosen]},
            min_improvement=config.min_improvement,
            min_loss_reduction=config.min_loss_reduction,
            max_false_accept=config.max_false_accept,
            statistic=config.gate_statistic,
            seed=config.seed,
            selected_from=len(proposals),
            selection_examples=len(selection),
        )
        best, wins, reason = gate.chosen, gate.accepted, gate.reason
    after = scores.get(best)
    decision = "accept" if wins else ("forced" if config.force else "keep_original")
    candidates = {policy: proposal.sigmas for policy, proposal in proposals.items()}
    rows: dict[str, dict[str, Any]] = {}
    for policy, proposal in proposals.items():
        row: dict[str, Any] = {"selection_loss": proposal.selection_loss, "chosen": proposal.chosen}
        if gate is not None and policy in gate.candidates:
            row.update(gate.candidates[policy].to_dict(), tested=True)
        elif before is not None:
            gain, se = relative_gain(
                torch.tensor(before.example_loss_sums), torch.tensor(scores[policy].example_loss_sums)
            )
            row.update(
                loss=scores[policy].loss,
                relative_improvement=gain,
                relative_improvement_se=se,
                p_value=None,
                p_values=None,
                z=gain / se if se > 0 else None,
                tested=False,
            )
        rows[policy] = row

    modules = {
        name: ModuleResult(
            rank=lora.modules[name].rank,
            scaling=lora.modules[name].scaling,
            sigma=spectra[name].sigma.tolist(),
            sigma_new=candidates[best][name].float().tolist(),
            sensitivity=grads[name].tolist(),
        )
        for name in edited
    }
    result = SurgeryResult(
        decision=decision,
        reason=reason,
        policy=best,
        constraint=config.constraint,
        quality_before=before,
        quality_after=after,
        candidates=rows if before is not None else {},
        modules=modules,
        output_path=None,
        adapter_hash=lora.content_hash(),
        calibration={
            "source": calib_set.source,
            "sha256": calib_set.sha256,
            "examples": len(fit),
            "selection_examples": len(selection),
            "heldout_examples": len(heldout),
            "corrections": sum(e.feedback == "correction" for e in fit),
            "correction_weight": config.correction_weight,
            "truncated": calib_set.n_truncated,
            "answer_tokens": stats.answer_tokens,
        },
        base_model=base_name,
        config=config.to_dict(),
        timings=timings,
        stats={
            "answer_tokens_per_s": stats.answer_tokens_per_s,
            "batches": stats.batches,
            "padding_fraction": 1 - stats.tokens / max(stats.padded_tokens, 1),
            "device": str(device),
            "batch_tokens": stats.batch_tokens,
            "budget_source": stats.budget_source,
            "recomputed_layers": stats.recomputed_layers,
            "evaluation_batch_tokens": eval_kwargs["budget"].plan.tokens if "budget" in eval_kwargs else None,
            # out-of-memory back-offs of the pass and of the evaluations (the results do not change)
            "backoffs": stats.backoffs + (eval_kwargs["budget"].backoffs if "budget" in eval_kwargs else []),
            "sensitivity_passes": 1 + search.passes,
        },
        gate=gate.to_dict() if gate else {},
        candidate_sigmas=candidates,
        selection={
            "examples": len(selection),
            "original_loss": original_selection,
            "chosen": chosen,
            "candidates": {p: c.summary() for p, c in proposals.items()},
        },
    )
    if output is not None and decision != "keep_original":
        t = time.perf_counter()
        replacements = {}
        for name in edited:
            mod = lora.modules[name]
            a, b = lora_factors(spectra[name], candidates[best][name], lora.lora_a(name).dtype)
            replacements[mod.a_key], replacements[mod.b_key] = a, b
        provenance = result.to_dict()
        provenance["output_path"] = None  # the directory itself; absolute paths move with it badly
        provenance["source_adapter"] = str(lora.path)
        result.output_path = save_adapter(lora, output, replacements, provenance)
        timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    log.info("refine %s: %s", lora.path, reason)
    return result
