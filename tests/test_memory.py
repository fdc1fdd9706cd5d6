"""The token-budget chooser's arithmetic, against figures worked out by hand in the comments."""

import pytest
from transformers import LlamaConfig

from vllm_surgery.memory import (
    EFFICIENT_CUDA_PASS_TOKENS,
    MAX_CUDA_EVAL_TOKENS,
    MAX_CUDA_PASS_TOKENS,
    SAFETY_RESERVE,
    ModelShape,
    logits_chunk_tokens,
    plan_evaluation,
    plan_pass,
    round_budget,
    usable_from,
)

GiB = 2**30

# Llama-3.1-8B: 32 layers, hidden 4096, intermediate 14336, 32 heads / 8 KV heads of 128, vocab 128256.
LLAMA_8B = ModelShape(32, 4096, 14336, 32, 8, 128, 128256, 2)
# Llama-3.2-1B: 16 layers, hidden 2048, intermediate 8192, 32 heads / 8 KV heads of 64.
LLAMA_1B = ModelShape(16, 2048, 8192, 32, 8, 64, 128256, 2)
# SmolLM2-135M in float32: 30 layers, hidden 576, intermediate 1536, 9 heads / 3 KV heads of 64.
SMOLLM2_FP32 = ModelShape(30, 576, 1536, 9, 3, 64, 49152, 4)


def test_shape_from_a_transformers_config():
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    )
    assert ModelShape.of(config, 2) == LLAMA_8B


def test_bytes_per_token_of_llama_8b():
    # norms 2*4*4096 = 32768; attention (2*32 + 2*8)*128*2 = 20480; MLP 3*14336*2 = 86016
    assert LLAMA_8B.kept_per_layer() == 139264  # 136 KiB (147 KiB measured with saved_tensors_hooks)
    # transient 4*14336*2 + 8*4096 = 147456; embedding + final norm 4096*(2+4) = 24576
    assert LLAMA_8B.pass_bytes_per_token(0) == 32 * 139264 + 147456 + 24576 == 4628480
    # 8 layers recomputed: 24 keep everything, 8 keep their input (4096*2), one is rebuilt at a time
    assert LLAMA_8B.pass_bytes_per_token(8) == 24 * 139264 + 8 * 8192 + 139264 + 147456 + 24576 == 3719168
    # evaluation: residual 2*4096*2 + MLP 3*14336*2 + attention 20480 + float32 norm 8*4096
    assert LLAMA_8B.eval_bytes_per_token == 16384 + 86016 + 20480 + 32768 == 155648
    # 256 MiB of float32 logits = 523 rows of 128256; each row costs 128256*(2+12) bytes
    assert logits_chunk_tokens(128256) == 268435456 // (4 * 128256) == 523
    assert LLAMA_8B.logits_bytes == 523 * 128256 * 14 == 939090432


def test_8b_on_an_80gb_card_takes_the_cap_without_recomputing():
    # 62 GiB usable: (62 GiB - 939090432) // 4628480 = 14180 tokens fit; the cap is 8192
    plan = plan_pass(LLAMA_8B, 62 * GiB)
    assert (plan.tokens, plan.recomputed_layers, plan.bytes_per_token) == (8192, 0, 4628480)
    assert MAX_CUDA_PASS_TOKENS == 8192


def test_8b_beside_vllm_recomputes_the_fewest_layers_that_keep_batches_efficient():
    # 8 GiB usable: room 8589934592 - 939090432 = 7650844160. Without recomputation 1653 tokens fit
    # (< 2048). 2048 tokens need <= 3735763 bytes a token: 4768000 - 131072 k <= 3735763 -> k >= 7.9.
    assert EFFICIENT_CUDA_PASS_TOKENS == 2048
    plan = plan_pass(LLAMA_8B, 8 * GiB)
    assert plan.recomputed_layers == 8
    assert plan.tokens == 2048  # 7650844160 // 3719168 = 2057 -> rounded down to a multiple of 256
    assert plan_pass(LLAMA_8B, 8 * GiB, recompute="off").tokens == 1536  # 1653 -> 1536
    assert plan_pass(LLAMA_8B, 8 * GiB, recompute="all").recomputed_layers == 32


def test_when_even_recomputing_everything_is_short_the_budget_shrinks():
    # 1.5 GiB: room 1610612736 - 939090432 = 671522304; all 32 layers recomputed cost 32*8192 + 139264
    # + 147456 + 24576 = 573440 a token -> 1171 tokens -> 1024
    plan = plan_pass(LLAMA_8B, 3 * GiB // 2)
    assert (plan.tokens, plan.recomputed_layers) == (1024, 32)
    # nothing fits: still one example per batch (the pass then backs off or names the remedy)
    assert plan_pass(LLAMA_8B, 100 << 20).tokens == 1


def test_a_measured_cost_above_the_estimate_shrinks_the_plan_and_one_below_is_ignored():
    # 1.5x the estimate: 4628480 * 1.5 = 6942720 a token; 62 GiB still fits 9453 -> cap 8192
    assert plan_pass(LLAMA_8B, 62 * GiB, scale=1.5).tokens == 8192
    # 30 GiB: (32212254720 - 939090432) // 6942720 = 4504 -> 4352 with a 1.5x measurement
    assert plan_pass(LLAMA_8B, 30 * GiB, scale=1.5).tokens == 4352
    assert plan_pass(LLAMA_8B, 30 * GiB, scale=0.5).tokens == 6656  # unscaled: 6756 -> 6656


def test_1b_on_a_24gb_card():
    # 16 layers * (2*4*2048 + (64+16)*64*2 + 3*8192*2 = 75776) + 4*8192*2 + 8*2048 + 2048*6 = 1306624
    assert LLAMA_1B.pass_bytes_per_token(0) == 1306624
    # a 24 GB card less 2.5 GB of weights and the margins leaves about 17 GiB
    assert plan_pass(LLAMA_1B, 17 * GiB).tokens == 8192  # 13252 fit
    assert plan_evaluation(LLAMA_1B, 17 * GiB).tokens == MAX_CUDA_EVAL_TOKENS == 32768


def test_evaluation_budget():
    # 4 GiB: (4294967296 - 939090432) // 155648 = 21560 -> 21504
    assert plan_evaluation(LLAMA_8B, 4 * GiB).tokens == 21504
    # SmolLM2 in float32: 2*576*4 + 3*1536*4 + (18+6)*64*4 + 8*576 = 4608 + 18432 + 6144 + 4608
    assert SMOLLM2_FP32.eval_bytes_per_token == 33792


def test_usable_memory():
    # an idle 80 GB card holding 16 GiB of weights: 0.85 * 62 GiB - 512 MiB
    usable = usable_from(free=62 * GiB, total=80 * GiB, reserved=16 * GiB, allocated=16 * GiB)
    assert usable == int(0.85 * 62 * GiB) - SAFETY_RESERVE
    assert round(usable / GiB, 3) == 52.2  # 52.7 - 0.5
    # memory cached by our own allocator counts: 4 GiB reserved but unused
    assert usable_from(free=58 * GiB, total=80 * GiB, reserved=20 * GiB, allocated=16 * GiB) == usable
    # a simulated 24 GB card (fraction 0.3 of 80 GiB) with 3 GiB reserved: 24 - 3 GiB left to reserve
    small = usable_from(free=77 * GiB, total=80 * GiB, reserved=3 * GiB, allocated=3 * GiB, fraction=0.3)
    assert small == int(0.85 * (int(0.3 * 80 * GiB) - 3 * GiB)) - SAFETY_RESERVE
    # nothing free
    assert usable_from(free=0, total=80 * GiB, reserved=GiB, allocated=GiB) == 0


@pytest.mark.parametrize(("tokens", "expected"), [(0, 1), (1, 1), (255, 255), (256, 256), (8191, 7936)])
def test_round_budget(tokens, expected):
    assert round_budget(tokens) == expected


def test_lean_activations_keep_a_third_less_and_spare_the_recomputation():
    # norms keep their bf16 input: 2*4096*2 = 16384; attention 20480; MLP gate and up: 2*14336*2 = 57344
    assert LLAMA_8B.kept_per_layer(lean=True) == 16384 + 20480 + 57344 == 94208  # vs 139264
    assert LLAMA_8B.pass_bytes_per_token(0, lean=True) == 32 * 94208 + 147456 + 24576 == 3186688
    # 8 GiB: 7650844160 // 3186688 = 2400 tokens fit without recomputing any layer -> 2304
    plan = plan_pass(LLAMA_8B, 8 * GiB, lean=True)
    assert (plan.tokens, plan.recomputed_layers) == (2304, 0)
    # in float32 the norms' upcast is their input: only the MLP's act(gate) is saved
    assert SMOLLM2_FP32.kept_per_layer() - SMOLLM2_FP32.kept_per_layer(lean=True) == 1536 * 4
