"""Exact match: greedy answers of a transformers model (with or without a LoRA adapter) vs the truth.

Why this exists: held-out loss is what refine() decides on, but what a user sees is whether answers
are right. The demo and the quality benchmark score adapters the same way here: batched greedy
generation with transformers (float32 on the CPU it is exact and, for short answers, several times
faster than vLLM's CPU build with LoRA), answers compared after stripping surrounding whitespace.

Prompts are rendered exactly as calibration data is: a string prompt is tokenised with the
tokenizer's special tokens (like {"prompt": ...}); a list of messages goes through the chat template
with the generation prompt (like {"messages": ...} without its final assistant turn).

Two ways to apply an adapter: :func:`score_adapters` loads PEFT adapters from disk onto one model
(what a user's PEFT code does); :func:`merged_lora` adds `scaling * B @ A` into the base weights in
place and restores them afterwards, which costs nothing per generated token and lets one loaded model
score many variants of an adapter (the benchmark scores dozens).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .adapter import LoraAdapter
from .errors import AdapterError

#: A prompt: plain text (tokenised with special tokens) or chat messages without the answer turn.
Prompt = str | Sequence[Mapping[str, str]]


def prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of one prompt, rendered as the calibration loader renders the same record."""
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def greedy_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 50,
    desc: str = "exact match",
    progress: bool = True,
) -> list[str]:
    """Greedy continuations of every prompt (left-padded batches), decoded without special tokens.

    Raises ValueError if the tokenizer has neither a pad nor an EOS token to pad with.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad or EOS token; batched generation needs one to pad with")
    device = next(model.parameters()).device
    answers: list[str] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=not progress):
        rows = [prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
        longest = max(len(r) for r in rows)
        ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):  # left padding: every row's last prompt token is at the end
            ids[i, longest - len(r) :] = torch.tensor(r)
            mask[i, longest - len(r) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad_id,
        )
        answers.extend(tokenizer.batch_decode(out[:, longest:], skip_special_tokens=True))
    return answers


def exact_match(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    answers: Sequence[str],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 50,
    desc: str = "exact match",
    progress: bool = True,
) -> list[bool]:
    """Per prompt: does the greedy answer equal the true one (both stripped of surrounding whitespace)?

    Raises ValueError if prompts and answers differ in number.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    got = greedy_answers(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        desc=desc,
        progress=progress,
    )
    return [g.strip() == a.strip() for g, a in zip(got, answers, strict=True)]


def sign_test(fixed: int, broken: int) -> float:
    """Two-sided exact sign test (McNemar) on the problems whose correctness changed between two models.

    Small p: the change is unlikely to be noise. Only the changed problems count, as in any paired test.
    """
    n = fixed + broken
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(fixed, broken) + 1)) / 2**n
    return min(1.0, 2 * tail)


def score_adapters(
    model_dir: str | os.PathLike,
    adapters: Mapping[str, str | os.PathLike],
    prompts: Sequence[Prompt],
    answers: Sequence[str],
    *,
    with_base: bool = True,
    max_new_tokens: int = 8,
    batch_size: int = 50,
    progress: bool = True,
) -> dict[str, list[bool]]:
    """Per-problem correctness of the base model (optional) and of every PEFT adapter, on one model.

    `adapters` maps a PEFT adapter name (an identifier: no dots) to its folder; the result is keyed by
    those names, plus "base" for the model without any adapter. Raises ValueError without adapters.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not adapters:
        raise ValueError("score_adapters needs at least one adapter")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    names = list(adapters)
    model = PeftModel.from_pretrained(base, Path(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(Path(adapters[name]), adapter_name=name)
    model.eval()
    kw = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "progress": progress}
    results: dict[str, list[bool]] = {}
    if with_base:
        with model.disable_adapter():
            results["base"] = exact_match(model, tokenizer, prompts, answers, desc="exact match: base", **kw)
    for name in names:
        model.set_adapter(name)
        results[name] = exact_match(model, tokenizer, prompts, answers, desc=f"exact match: {name}", **kw)
    return results


@contextmanager
def merged_lora(
    model: torch.nn.Module,
    adapter: LoraAdapter,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Iterator[torch.nn.Module]:
    """Add `scaling * B @ A` of every adapter module to `model`'s weights; restore them on exit.

    factors: {module name: (lora_A, lora_B)} used instead of the adapter's own for those modules,
        e.g. the factors refine() would write for a candidate (vllm_surgery.lora_factors).
    The restored weights are bit-identical copies of the originals. Raises AdapterError for a module
    the model lacks or whose shape differs, and for fan_in_fan_out adapters (GPT-2-style Conv1D).
    """
    if adapter.config.get("fan_in_fan_out"):
        raise AdapterError(f"{adapter.path}: fan_in_fan_out adapters (Conv1D layers) are not supported")
    unknown = set(factors or {}) - set(adapter.modules)
    if unknown:
        raise AdapterError(
            f"factors given for modules the adapter does not have: {', '.join(sorted(unknown))}"
        )
    saved: dict[str, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, mod in adapter.modules.items():
                try:
                    weight = model.get_submodule(name).weight
                except AttributeError as e:
                    raise AdapterError(f"adapter module {name!r} does not exist in the base model") from e
                if tuple(weight.shape) != (mod.out_features, mod.in_features):
                    raise AdapterError(
                        f"adapter module {name!r} maps {mod.in_features} -> {mod.out_features} features "
                        f"but the base model's weight is {tuple(weight.shape)}"
                    )
                a, b = (factors or {}).get(name, (adapter.lora_a(name), adapter.lora_b(name)))
                saved[name] = weight.detach().clone()
                weights[name] = weight
                delta = b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)
                weight.add_((mod.scaling * delta).to(weight.dtype))
        yield model
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                weights[name].copy_(original)
