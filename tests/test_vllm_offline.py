"""A refined adapter loads in vLLM's offline API, generates, and vLLM serves exactly its weights.

One tiny random Llama (head_dim 64: the CPU attention backend supports head sizes 32, 64, 80, ...,
not the 16 of tiny.py's defaults), one random LoRA on all seven projections and its refined version
(written with force=True), one `vllm.LLM` for the whole module. vLLM's greedy tokens and the log-probs
of those tokens are compared with transformers+PEFT in float32, for both adapters; the refined
log-probs must also be far from the original adapter's, so the comparison cannot pass on stale weights.

Slow (engine start ~25 s on 2 CPU cores): run with `pytest -m slow tests/test_vllm_offline.py`.
Module level stays import-safe: vLLM is imported inside the fixture (its engine core is a spawned
process, and VLLM_CPU_KVCACHE_SPACE must be set before the engine is built).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vllm_surgery.testing import ALL_PROJ, build_lora_adapter, build_tiny_llama, write_calibration

pytestmark = pytest.mark.slow

PROMPTS = [
    "what is 12 + 30 ?",
    "the quick brown fox",
    "hello world , add numbers",
    "question : sum of 7 and 9 answer",
]
NEW_TOKENS = 8
# float32 on both sides: observed differences are ~1e-6; 1e-3 leaves room for other CPU kernels.
LOGPROB_TOL = 1e-3
# Below this top-1/top-2 logit gap a greedy choice may legitimately flip between implementations.
NEAR_TIE = 1e-4


# --------------------------------------------------------------------------------------------------
# Fixtures: model, adapters, engine (once per module)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from vllm_surgery.refine import refine

    root = tmp_path_factory.mktemp("vllm-offline")
    base = build_tiny_llama(root / "base", hidden=128, heads=2, kv_heads=2, layers=2, intermediate=256)
    orig = build_lora_adapter(base, root / "orig", r=8, alpha=16, target_modules=ALL_PROJ, seed=1)
    calib = write_calibration(root / "calib.jsonl", n=16)
    result = refine(
        base,
        orig,
        calib,
        root / "refined",
        policy="grad_direction",
        modules="all",
        device="cpu",
        force=True,
        progress=False,
    )
    return {"base": base, "orig": orig, "refined": root / "refined", "result": result}


@pytest.fixture(scope="module")
def prompt_ids(artifacts: dict) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(artifacts["base"])
    # The same token ids go to both implementations: no tokenizer or BOS difference can creep in.
    return [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def vllm_outputs(artifacts: dict, prompt_ids: list[list[int]]) -> dict[str, list[dict]]:
    """Greedy generations of both adapters from ONE engine: token ids and the chosen tokens' log-probs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; unset, vLLM reserves most of the RAM
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        llm = LLM(
            model=str(artifacts["base"]),
            dtype="float32",
            enable_lora=True,
            max_lora_rank=8,
            max_loras=2,
            max_model_len=128,
            max_num_seqs=len(PROMPTS),
            enforce_eager=True,
            seed=0,
        )
        try:
            params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=1)
            prompts = [{"prompt_token_ids": ids} for ids in prompt_ids]
            out: dict[str, list[dict]] = {}
            for int_id, name in enumerate(("orig", "refined"), start=1):
                request = LoRARequest(name, int_id, str(artifacts[name]))
                results = llm.generate(prompts, params, lora_request=request, use_tqdm=False)
                out[name] = [
                    {
                        "tokens": list(r.outputs[0].token_ids),
                        "logprobs": [
                            step[t].logprob
                            for step, t in zip(r.outputs[0].logprobs, r.outputs[0].token_ids, strict=True)
                        ],
                        "text": r.outputs[0].text,
                    }
                    for r in results
                ]
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
    return out


@pytest.fixture(scope="module")
def peft_model(artifacts: dict):
    """The float32 base with both adapters loaded by PEFT; switch with set_adapter()."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(artifacts["base"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, artifacts["orig"], adapter_name="orig")
    model.load_adapter(artifacts["refined"], adapter_name="refined")
    return model.eval()


def peft_generate(model, adapter: str, ids: list[int]) -> list[int]:
    model.set_adapter(adapter)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


def peft_teacher_forced(
    model, adapter: str, ids: list[int], gen: list[int]
) -> tuple[list[float], list[float]]:
    """Raw log-probs of `gen` given `ids` (teacher forcing) and the top-1/top-2 logit gap at each step."""
    model.set_adapter(adapter)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids + gen])).logits[0].double()
    steps = logits[len(ids) - 1 : len(ids) - 1 + len(gen)]
    logp = torch.log_softmax(steps, dim=-1)
    top2 = steps.topk(2, dim=-1).values
    chosen = logp.gather(1, torch.tensor(gen).unsqueeze(1)).squeeze(1)
    return chosen.tolist(), (top2[:, 0] - top2[:, 1]).tolist()


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_refined_adapter_is_written_and_changed(artifacts: dict) -> None:
    from safetensors.torch import load_file

    result = artifacts["result"]
    # 16 examples, 4 held out: no p-value can pass the default max_false_accept, so force writes it.
    assert result.decision == "forced" and result.written
    refined = Path(artifacts["refined"])
    cfg_orig = json.loads((Path(artifacts["orig"]) / "adapter_config.json").read_text())
    cfg_new = json.loads((refined / "adapter_config.json").read_text())
    assert cfg_new == cfg_orig and cfg_new["r"] == 8 and set(cfg_new["target_modules"]) == set(ALL_PROJ)
    # The spectrum really moved (otherwise the "vLLM serves the refined weights" check proves nothing).
    rel = [
        max(abs(n - o) for n, o in zip(m.sigma_new, m.sigma, strict=True)) / max(m.sigma)
        for m in result.modules.values()
    ]
    assert len(rel) == 2 * len(ALL_PROJ) and max(rel) > 0.05
    a = load_file(Path(artifacts["orig"]) / "adapter_model.safetensors")
    b = load_file(refined / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert any(not torch.allclose(a[k], b[k]) for k in a)


def test_vllm_generates_with_both_adapters(vllm_outputs: dict) -> None:
    for name in ("orig", "refined"):
        for out in vllm_outputs[name]:
            assert len(out["tokens"]) == NEW_TOKENS
            assert len(out["logprobs"]) == NEW_TOKENS
            assert out["text"]
            assert all(math.isfinite(lp) and lp <= 0 for lp in out["logprobs"])


@pytest.mark.parametrize("adapter", ["orig", "refined"])
def test_greedy_tokens_match_peft(adapter: str, vllm_outputs: dict, peft_model, prompt_ids) -> None:
    for ids, out in zip(prompt_ids, vllm_outputs[adapter], strict=True):
        expected = peft_generate(peft_model, adapter, ids)
        if out["tokens"] == expected:
            continue
        # Only a genuine near-tie may flip a greedy choice: at the first difference, PEFT's own top-2
        # logits on vLLM's prefix must be within NEAR_TIE; everything after it differs legitimately.
        k = next(i for i, (x, y) in enumerate(zip(out["tokens"], expected, strict=True)) if x != y)
        _, gaps = peft_teacher_forced(peft_model, adapter, ids, out["tokens"])
        assert gaps[k] < NEAR_TIE, (
            f"{adapter}: vLLM {out['tokens']} vs PEFT {expected} differ at step {k}, top-2 gap {gaps[k]:.2e}"
        )


@pytest.mark.parametrize("adapter", ["orig", "refined"])
def test_logprobs_match_peft(adapter: str, vllm_outputs: dict, peft_model, prompt_ids) -> None:
    """Teacher-forced on vLLM's own tokens, so near-ties cannot derail the comparison."""
    worst = 0.0
    for ids, out in zip(prompt_ids, vllm_outputs[adapter], strict=True):
        ref, _ = peft_teacher_forced(peft_model, adapter, ids, out["tokens"])
        worst = max(worst, max(abs(x - y) for x, y in zip(out["logprobs"], ref, strict=True)))
    assert worst < LOGPROB_TOL, f"{adapter}: max |vLLM - PEFT| log-prob {worst:.2e}"


def test_vllm_serves_the_refined_weights(vllm_outputs: dict, peft_model, prompt_ids) -> None:
    """vLLM's refined log-probs are far from what the ORIGINAL weights give on the same tokens."""
    gap = 0.0
    for ids, out in zip(prompt_ids, vllm_outputs["refined"], strict=True):
        under_orig, _ = peft_teacher_forced(peft_model, "orig", ids, out["tokens"])
        gap = max(gap, max(abs(x - y) for x, y in zip(out["logprobs"], under_orig, strict=True)))
    assert gap > 10 * LOGPROB_TOL, f"refined and original adapters are indistinguishable ({gap:.2e})"
