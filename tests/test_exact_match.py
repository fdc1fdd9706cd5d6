"""Exact-match scoring: greedy answers checked against a hand-rolled decoder, merged adapters, sign test."""

import dataclasses

import pytest
import torch

from vllm_surgery import AdapterError, load_adapter
from vllm_surgery.exact_match import exact_match, greedy_answers, merged_lora, score_adapters, sign_test

PROMPTS = [
    "what is one plus two ?",
    "hello",
    [{"role": "user", "content": "add numbers 3 4"}],
    "the quick brown fox jumps over the lazy dog . what is",
]


@pytest.fixture(scope="module")
def base(tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(
        tiny_base, dtype=torch.float32
    ).eval(), AutoTokenizer.from_pretrained(tiny_base)


def reference_answer(model, tok, prompt, max_new_tokens):
    """Greedy decoding one prompt at a time, no padding, no generate(): argmax of the last logits."""
    if isinstance(prompt, str):
        ids = tok(prompt)["input_ids"]
    else:
        ids = tok(
            tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == tok.eos_token_id:
                break
    return tok.decode(new, skip_special_tokens=True)


def test_greedy_answers_match_a_hand_rolled_decoder(base):
    model, tok = base
    want = [reference_answer(model, tok, p, 3) for p in PROMPTS]
    assert greedy_answers(model, tok, PROMPTS, max_new_tokens=3, batch_size=3, progress=False) == want
    assert len(set(want)) > 1  # the prompts really lead to different answers


def test_exact_match_compares_stripped_answers(base):
    model, tok = base
    got = greedy_answers(model, tok, PROMPTS, max_new_tokens=3, progress=False)
    answers = [f"  {got[0]} ", "certainly not this", got[2], got[3] + "x"]
    assert exact_match(model, tok, PROMPTS, answers, max_new_tokens=3, batch_size=2, progress=False) == [
        True,
        False,
        True,
        False,
    ]
    with pytest.raises(ValueError, match="4 prompts but 1 answers"):
        exact_match(model, tok, PROMPTS, ["a"], progress=False)


def test_merged_lora_equals_peft_and_restores_the_weights(base, tiny_base, tiny_adapter):
    from peft import PeftModel

    model, tok = base
    lora = load_adapter(tiny_adapter)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([tok("what is one plus two ?")["input_ids"]])
    with merged_lora(model, lora), torch.no_grad():
        merged_logits = model(ids).logits
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), tiny_adapter
    ).eval()
    with torch.no_grad():
        peft_logits = peft_model(ids).logits
        base_logits = model(ids).logits
    assert torch.allclose(merged_logits, peft_logits, atol=1e-4)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-2)  # the adapter does something


def test_merged_lora_factors_replace_a_module(base, tiny_adapter):
    model, _ = base
    lora = load_adapter(tiny_adapter)
    name = next(iter(lora.modules))
    weight = model.get_submodule(name).weight
    original = weight.detach().clone()
    zero = (torch.zeros_like(lora.lora_a(name)), lora.lora_b(name))
    with merged_lora(model, lora, {name: zero}):
        assert torch.equal(weight, original)  # B @ 0 adds nothing
    with merged_lora(model, lora):
        expected = original + lora.modules[name].scaling * lora.lora_b(name) @ lora.lora_a(name)
        assert torch.allclose(weight, expected, atol=1e-6)
    assert torch.equal(weight, original)


def test_merged_lora_refuses_a_module_the_model_lacks_and_restores(base, tiny_adapter):
    model, _ = base
    lora = load_adapter(tiny_adapter)
    first = next(iter(lora.modules.values()))
    bogus = dataclasses.replace(first, name="model.layers.7.mlp.down_proj")
    lora.modules = {**lora.modules, bogus.name: bogus}  # last: every real module is merged first
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match=r"model\.layers\.7\.mlp\.down_proj"), merged_lora(model, lora):
        pass
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with (
        pytest.raises(AdapterError, match="does not have"),
        merged_lora(model, load_adapter(tiny_adapter), {"x": zero_pair()}),
    ):
        pass


def zero_pair():
    return torch.zeros(1, 1), torch.zeros(1, 1)


def test_score_adapters_peft_agrees_with_merged(base, tiny_base, tiny_adapter):
    model, tok = base
    answers = greedy_answers(model, tok, PROMPTS, max_new_tokens=3, progress=False)  # the base model's
    with merged_lora(model, load_adapter(tiny_adapter)):
        merged = greedy_answers(model, tok, PROMPTS, max_new_tokens=3, progress=False)
    scores = score_adapters(tiny_base, {"a": tiny_adapter}, PROMPTS, merged, max_new_tokens=3, progress=False)
    assert scores["a"] == [True] * len(PROMPTS)
    assert scores["base"] == [a == m for a, m in zip(answers, merged, strict=True)]
    assert scores["base"] != scores["a"]  # the adapter changes some answer


def test_sign_test_by_hand():
    assert sign_test(0, 0) == 1.0
    assert sign_test(6, 2) == pytest.approx(2 * (1 + 8 + 28) / 256)
    assert sign_test(2, 6) == sign_test(6, 2)
    assert sign_test(10, 0) == pytest.approx(2 / 1024)
