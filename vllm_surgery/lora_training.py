"""Train a PEFT LoRA adapter on prompt/completion records, with answer-only loss, on the CPU or a GPU.

Why this exists: the demo and the quality benchmark need *real* trained adapters (not random ones) to
show what Spectral Surgery does to them, and nothing can be downloaded here. One small, plain torch
loop serves both, so that their adapters come from the same recipe. Examples are tokenised exactly as
calibration data is (:func:`vllm_surgery.calibration.tokenize_records`): the loss counts the answer
tokens (+ EOS) only, which is also the quantity refine() measures.

The adapter is written atomically (a complete sibling folder renamed into place) with a
``training.json`` describing how it was made; :func:`cached_lora_adapter` reuses such a folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .calibration import tokenize_records
from .errors import ConfigError

#: All seven projections of a Llama-style block: the paper's adapters adapt every one of them.
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRAINING_INFO = "training.json"

#: Draws the records of one training step: (rng, batch_size) -> records in the calibration format,
#: {"prompt", "completion"} or {"messages"}. The rng is seeded from the recipe, so a run is reproducible.
BatchSource = Callable[[random.Random, int], Sequence[Mapping[str, Any]]]


@dataclass(frozen=True)
class LoraRecipe:
    """How an adapter is trained: AdamW, linear warm-up over 5 % of the steps, cosine decay to 10 %.

    steps: optimizer steps (one batch each). lr: peak learning rate. max_length: tokens per example
    (longer prompts lose tokens on the left, answers are never cut).
    """

    steps: int
    lr: float = 1e-3
    batch_size: int = 8
    seed: int = 0
    rank: int = 16
    alpha: int = 32
    target_modules: tuple[str, ...] = ALL_PROJECTIONS
    max_length: int = 256

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.rank < 1:
            raise ConfigError(
                f"LoRA training needs steps, batch_size and rank >= 1, got {self.steps}, "
                f"{self.batch_size}, {self.rank}"
            )
        if not self.lr > 0:
            raise ConfigError(f"LoRA training needs a positive learning rate, got {self.lr}")
        if not self.target_modules:
            raise ConfigError("LoRA training needs at least one target module")


def lr_factor(step: int, steps: int) -> float:
    """Learning-rate multiplier at `step`: linear warm-up, then cosine decay to 10 % of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _batch_tensors(examples: Sequence[Any], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels that are -100 everywhere but the answer."""
    longest = max(e.length for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(examples):
        seq = e.prompt_ids + e.answer_ids
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        labels[row, len(e.prompt_ids) : len(seq)] = torch.tensor(e.answer_ids)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_lora_adapter(
    model_dir: str | os.PathLike,
    output: str | os.PathLike,
    recipe: LoraRecipe,
    batches: BatchSource,
    *,
    description: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a LoRA adapter on `model_dir` and save it atomically to the new folder `output`.

    description: what the caller wants on record (task, recipe version...), written first into
        training.json, followed by the recipe, the training time and the final loss.
    Returns what was written to training.json. Raises ConfigError when `output` already holds files
    (use cached_lora_adapter to reuse an adapter) and CalibrationError for records it cannot tokenise.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(output)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"{target}: already exists; LoRA training writes a new folder")
    torch.manual_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=recipe.rank,
        lora_alpha=recipe.alpha,
        lora_dropout=0.0,
        target_modules=list(recipe.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, recipe.steps))
    rng = random.Random(recipe.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    started = time.perf_counter()
    losses: list[float] = []
    bar = tqdm(range(recipe.steps), desc="training LoRA", unit="step", disable=not progress)
    for step in bar:
        records = batches(rng, recipe.batch_size)
        if not records:
            raise ConfigError(f"the batch source returned no records at step {step}")
        examples, _ = tokenize_records(
            [(f"training step {step} record {i}", r) for i, r in enumerate(records)],
            tokenizer,
            max_length=recipe.max_length,
        )
        loss = model(**_batch_tensors(examples, pad_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    bar.close()
    seconds = time.perf_counter() - started
    stride = max(1, recipe.steps // 20)
    info = {
        **(description or {}),
        "steps": recipe.steps,
        "lr": recipe.lr,
        "batch_size": recipe.batch_size,
        "seed": recipe.seed,
        "rank": recipe.rank,
        "alpha": recipe.alpha,
        "target_modules": list(recipe.target_modules),
        "seconds": round(seconds, 1),
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        # mean training loss over consecutive windows of `stride` steps: shows under-training or a plateau
        "loss_curve": {
            "stride": stride,
            "mean_loss": [
                round(sum(losses[i : i + stride]) / len(losses[i : i + stride]), 5)
                for i in range(0, len(losses), stride)
            ],
        },
    }
    _save_atomically(model, target, Path(model_dir), info)
    return info


def _save_atomically(model: Any, target: Path, model_dir: Path, info: Mapping[str, Any]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        cfg_path = tmp / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = str(model_dir)
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / TRAINING_INFO).write_text(json.dumps(info, indent=2) + "\n")
        # mkdtemp makes a 0700 folder and safetensors writes 0600 files: make the adapter readable like
        # any model folder (e.g. by a vLLM server running as another user).
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # an empty folder left for us: os.replace cannot put a folder over it
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same adapter meanwhile: use that one
            if not (target / "adapter_model.safetensors").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cached_lora_adapter(
    model_dir: str | os.PathLike,
    output: str | os.PathLike,
    recipe: LoraRecipe,
    batches: BatchSource,
    *,
    description: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], bool]:
    """The adapter in `output` if a complete one is there, else a freshly trained one: (info, cached).

    The caller owns the cache key: `output` must name everything that changes the result (task, recipe
    version, steps, seed...), because a complete folder is reused without looking inside.
    """
    target = Path(output)
    info_path = target / TRAINING_INFO
    if (target / "adapter_model.safetensors").is_file() and info_path.is_file():
        return json.loads(info_path.read_text()), True
    info = train_lora_adapter(model_dir, target, recipe, batches, description=description, progress=progress)
    return info, False


# --------------------------------------------------------------------------------------------------
# Continued training: the baseline a user would pick instead of surgery (quality benchmark only)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContinueRecipe:
    """How an existing adapter is trained further on calibration examples, with early stopping.

    The optimiser and schedule are train_lora_adapter's (AdamW, no weight decay, gradient norm clipped
    at 1, linear warm-up over 5 % of the steps then cosine decay to 10 %), planned over `epochs` passes
    through the fit examples in batches of `batch_size` (reshuffled every epoch, seeded). The selection
    loss is measured before the first step and every `eval_every` steps (default: twice an epoch) and
    after the last; training stops after `patience` measurements without a new best, and the best
    weights measured (possibly the original's, step 0) are returned.
    """

    lr: float = 1e-3
    batch_size: int = 8
    epochs: int = 3
    eval_every: int | None = None
    patience: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ConfigError(
                f"continued training needs epochs, batch_size and patience >= 1, got {self.epochs}, "
                f"{self.batch_size}, {self.patience}"
            )
        if not self.lr > 0:
            raise ConfigError(f"continued training needs a positive learning rate, got {self.lr}")
        if self.eval_every is not None and self.eval_every < 1:
            raise ConfigError(f"eval_every must be >= 1, got {self.eval_every}")

    def plan(self, n_fit: int) -> tuple[int, int]:
        """(optimizer steps planned, steps between selection measurements) for `n_fit` fit examples."""
        per_epoch = math.ceil(n_fit / self.batch_size)
        return self.epochs * per_epoch, self.eval_every or max(1, per_epoch // 2)


@dataclass
class ContinuedLora:
    """What continue_lora_training returns.

    factors: per adapter module name, the (lora_A, lora_B) of the best step, in the adapter's dtype; at
        step 0 they are the adapter's own tensors, unchanged.
    curve: (step, selection loss) for every measurement, step 0 first.
    """

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    lr: float
    best_step: int
    best_loss: float
    steps_run: int
    steps_planned: int
    curve: list[tuple[int, float]]
    seconds: float


def _answer_token_losses(
    model: Any, examples: Sequence[Any], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per answer token: (cross-entropy, weight of its example), for one right-padded batch."""
    batch = _batch_tensors(examples, pad_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    losses = torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), labels[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    weights = torch.tensor([float(getattr(e, "weight", 1.0)) for e in examples], dtype=losses.dtype)[rows]
    return losses, weights


def answer_loss(model: Any, examples: Sequence[Any], pad_id: int, batch_size: int = 16) -> float:
    """Unweighted mean answer-token loss over `examples` (the quantity refine()'s selection and held-out
    losses measure), in batches, without gradients."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            losses, _ = _answer_token_losses(model, examples[start : start + batch_size], pad_id)
            total += float(losses.double().sum())
            count += losses.numel()
    return total / max(count, 1)


def continue_lora_training(
    model: Any,
    tokenizer: Any,
    adapter: Any,
    fit: Sequence[Any],
    selection: Sequence[Any],
    recipe: ContinueRecipe = ContinueRecipe(),
    *,
    progress: bool = False,
) -> ContinuedLora:
    """Train every LoRA weight of `adapter` further on `fit`, early-stopped on `selection`.

    model: the loaded base model (transformers); it is copied, never modified. adapter: a LoraAdapter
        loaded from a PEFT folder (PEFT loads it from adapter.path: same rank, alpha and target modules).
    fit, selection: calibration Examples (vllm_surgery.calibration); a fit example's `weight` (1 unless
        set, e.g. calibration.weighted for corrections) weighs its answer tokens in the training loss,
        as in refine()'s fit loss; the selection loss is the unweighted mean answer-token loss.
    Raises ConfigError without fit or selection examples.
    """
    import copy

    from peft import PeftModel

    if not fit or not selection:
        raise ConfigError(
            f"continued training needs fit and selection examples, got {len(fit)} and {len(selection)}"
        )
    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    work = copy.deepcopy(model)
    peft_model = PeftModel.from_pretrained(work, str(adapter.path), is_trainable=True)
    peft_model.eval()  # no dropout in our adapters; eval mode keeps any other layer deterministic too
    layers = {name: peft_model.base_model.model.get_submodule(name) for name in adapter.modules}
    for name, layer in layers.items():  # PEFT must hold exactly the adapter's tensors
        if not (
            torch.equal(layer.lora_A["default"].weight.detach(), adapter.lora_a(name).float())
            and torch.equal(layer.lora_B["default"].weight.detach(), adapter.lora_b(name).float())
        ):
            raise ConfigError(f"PEFT loaded other weights for {name} than {adapter.path} holds")
    params = [p for p in peft_model.parameters() if p.requires_grad]

    def snapshot() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {
            name: (
                layer.lora_A["default"].weight.detach().to(adapter.lora_a(name).dtype).clone(),
                layer.lora_B["default"].weight.detach().to(adapter.lora_b(name).dtype).clone(),
            )
            for name, layer in layers.items()
        }

    total_steps, eval_every = recipe.plan(len(fit))
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps))
    rng = random.Random(recipe.seed)
    best_loss = answer_loss(peft_model, selection, pad_id)
    curve = [(0, best_loss)]
    best = {name: (adapter.lora_a(name), adapter.lora_b(name)) for name in adapter.modules}
    best_step, since_best, step = 0, 0, 0
    bar = tqdm(total=total_steps, desc="continued LoRA training", unit="step", disable=not progress)
    stop = False
    for _epoch in range(recipe.epochs):
        order = list(range(len(fit)))
        rng.shuffle(order)
        for start in range(0, len(order), recipe.batch_size):
            losses, weights = _answer_token_losses(
                peft_model, [fit[i] for i in order[start : start + recipe.batch_size]], pad_id
            )
            loss = (losses * weights).sum() / weights.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % eval_every == 0 or step == total_steps:
                current = answer_loss(peft_model, selection, pad_id)
                curve.append((step, current))
                if current < best_loss:
                    best_loss, best_step, best, since_best = current, step, snapshot(), 0
                else:
                    since_best += 1
                    stop = since_best >= recipe.patience
            if stop:
                break
        if stop:
            break
    bar.close()
    del peft_model, work
    return ContinuedLora(
        factors=best,
        lr=recipe.lr,
        best_step=best_step,
        best_loss=best_loss,
        steps_run=step,
        steps_planned=total_steps,
        curve=curve,
        seconds=time.perf_counter() - started,
    )


def continue_lora_training_lr_search(
    model: Any,
    tokenizer: Any,
    adapter: Any,
    fit: Sequence[Any],
    selection: Sequence[Any],
    recipe: ContinueRecipe,
    lrs: Sequence[float],
    *,
    progress: bool = False,
) -> tuple[ContinuedLora, list[ContinuedLora]]:
    """continue_lora_training at each peak learning rate of `lrs` (the rest of `recipe` unchanged), each
    from the adapter's own weights; the run with the lowest selection loss wins (the first on a tie).

    Why: restarted at the peak rate that trained it, an adapter is first knocked off its optimum
    (AdamW's first steps move every weight by about lr), so the rate is chosen like the step count, on
    the selection split. Returns (the winner, every run in the order of `lrs`).
    """
    if not lrs:
        raise ConfigError("the learning-rate search needs at least one learning rate")
    runs = [
        continue_lora_training(
            model, tokenizer, adapter, fit, selection, dataclasses.replace(recipe, lr=lr), progress=progress
        )
        for lr in lrs
    ]
    best = min(runs, key=lambda r: r.best_loss)
    return best, runs
