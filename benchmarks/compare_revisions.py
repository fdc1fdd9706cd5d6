"""Is the sensitivity pass no slower than at an earlier commit? Both versions alternate in one process.

The earlier vllm_surgery/sensitivity.py is read from git (`git show REV:...`) and loaded next to the
current one, so both run on the same model, adapter, examples and machine state; each round runs
both (the order alternates between rounds) and the best time of each counts, which drops most of what
other processes on a shared machine add. It also prints how far the two results differ. The earlier
module runs against the current versions of the modules it imports, so REV must be recent enough
that their interfaces match (5cca805, the last commit before the planned budgets, works).

Run:  .venv/bin/python benchmarks/compare_revisions.py --rev 5cca805 --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import sensitivity_pass as bench

from vllm_surgery.adapted_model import AdaptedModel
from vllm_surgery.adapter import load_adapter
from vllm_surgery.calibration import load_calibration
from vllm_surgery.config import select_modules
from vllm_surgery.default_model import default_model_path
from vllm_surgery.refine import load_base_model
from vllm_surgery.sensitivity import compute_sensitivities
from vllm_surgery.spectral import lora_svd


def earlier_module(rev: str, tmp: Path):
    """vllm_surgery/sensitivity.py as of `rev`, importable as vllm_surgery._sensitivity_at_rev."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "-C", str(root), "show", f"{rev}:vllm_surgery/sensitivity.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = tmp / "sensitivity_at_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("vllm_surgery._sensitivity_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "vllm_surgery"
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rev", default="5cca805")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--budget", type=int, default=512, help="the earlier version's budget (CPU default)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="compare-revisions-"))
    earlier = earlier_module(args.rev, tmp)
    model, tok = load_base_model(default_model_path(progress=False), torch.device("cpu"))
    data = bench.humaneval_jsonl(tmp / "humaneval.jsonl")
    examples = load_calibration(data, tok, max_length=1024, samples=args.samples, seed=0).examples
    lora = load_adapter(bench.build_random_adapter(model, tmp / "adapter"))
    spectra = {n: lora_svd(lora.lora_a(n), lora.lora_b(n)) for n in select_modules(lora.modules, "residual")}
    pad = tok.pad_token_id
    runs = {
        args.rev: lambda a: earlier.compute_sensitivities(
            a, examples, max_batch_tokens=args.budget, pad_id=pad, progress=False
        ),
        "now": lambda a: compute_sensitivities(a, examples, pad_id=pad, progress=False),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    with AdaptedModel(model, lora, spectra) as adapted:
        then, _ = runs[args.rev](adapted)  # also the warm-up
        now, _ = runs["now"](adapted)
        rel = max(float((now[n] - then[n]).abs().max() / then[n].abs().max()) for n in then)
        print(f"max relative difference of the sensitivities, now vs {args.rev}: {rel:.2e}", flush=True)
        for r in range(args.rounds):
            for key in list(runs) if r % 2 == 0 else list(runs)[::-1]:
                t = time.perf_counter()
                runs[key](adapted)
                times[key].append(time.perf_counter() - t)
            print(
                f"round {r + 1}: "
                + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items())
                + f", load {bench.load_average()}",
                flush=True,
            )
    best = {k: min(v) for k, v in times.items()}
    print(
        f"best of {args.rounds}: {args.rev} {best[args.rev]:.2f} s, now {best['now']:.2f} s; "
        f"now / {args.rev} = {best['now'] / best[args.rev]:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
