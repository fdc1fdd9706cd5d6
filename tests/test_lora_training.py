"""LoRA training on a tiny random Llama: it learns, it writes a valid adapter, the cache is reused."""

import json

import pytest
import torch

from vllm_surgery import ConfigError, load_adapter
from vllm_surgery.lora_training import ALL_PROJECTIONS, LoraRecipe, cached_lora_adapter, train_lora_adapter

RECORDS = [
    {"prompt": "what is one plus two ?", "completion": " three ."},
    {"prompt": "hello world", "completion": " the quick brown fox"},
    {"messages": [{"role": "user", "content": "add numbers"}, {"role": "assistant", "content": "sum 7"}]},
]


def batches(rng, n):
    return [RECORDS[rng.randrange(len(RECORDS))] for _ in range(n)]


def never_called(rng, n):
    raise AssertionError("a cached adapter must not be retrained")


def answer_loss(base_dir, adapter_dir=None) -> float:
    """Mean answer-token loss over RECORDS, computed with plain transformers (+ PEFT), not the trainer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    total, count = 0.0, 0
    for r in RECORDS:
        if "messages" in r:
            prompt = tok.apply_chat_template(r["messages"][:1], tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(r["messages"], tokenize=False)
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            a_ids = tok(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        else:
            p_ids = tok(r["prompt"])["input_ids"]
            a_ids = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p_ids + a_ids])
        labels = torch.tensor([[-100] * len(p_ids) + a_ids])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss
        total += float(loss) * len(a_ids)
        count += len(a_ids)
    return total / count


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "adapter"
    recipe = LoraRecipe(steps=40, lr=1e-2, batch_size=4, seed=3)
    info = train_lora_adapter(tiny_base, out, recipe, batches, description={"task": "toy"}, progress=False)
    return out, info, recipe


def test_training_lowers_the_answer_loss(tiny_base, trained):
    out, info, _ = trained
    before, after = answer_loss(tiny_base), answer_loss(tiny_base, out)
    # The random tiny model starts at ln(vocab) ~ 5.7 nats, and its small random lm_head caps how far any
    # adapter can sharpen the logits: a drop of more than half a nat is learning, not noise.
    assert after < before - 0.5, (before, after)
    curve = info["loss_curve"]["mean_loss"]
    assert curve[-1] < curve[0] - 0.5, curve


def test_writes_a_peft_adapter_with_the_recipe(tiny_base, trained):
    out, info, _recipe = trained
    adapter = load_adapter(out)
    assert len(adapter.modules) == 2 * len(ALL_PROJECTIONS)  # two layers, all seven projections
    assert {m.rank for m in adapter.modules.values()} == {16}
    assert {m.scaling for m in adapter.modules.values()} == {2.0}  # alpha 32 / r 16
    written = json.loads((out / "training.json").read_text())
    assert written == json.loads(json.dumps(info))
    assert next(iter(written)) == "task" and written["steps"] == 40 and written["seed"] == 3
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_base)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_same_recipe_same_adapter_and_cache_reuse(tiny_base, trained, tmp_path):
    out, info, recipe = trained
    _again, cached = cached_lora_adapter(
        tiny_base, tmp_path / "again", recipe, batches, description={"task": "toy"}, progress=False
    )
    assert not cached
    a, b = load_adapter(out), load_adapter(tmp_path / "again")
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    reused, cached = cached_lora_adapter(tiny_base, out, recipe, never_called, progress=False)
    assert cached and reused == json.loads(json.dumps(info))


def test_bad_input_is_refused(tiny_base, trained):
    with pytest.raises(ConfigError, match="steps"):
        LoraRecipe(steps=0)
    with pytest.raises(ConfigError, match="learning rate"):
        LoraRecipe(steps=1, lr=0)
    out, _, recipe = trained
    with pytest.raises(ConfigError, match="already exists"):
        train_lora_adapter(tiny_base, out, recipe, batches, progress=False)


# ---- continued training (the quality benchmark's baseline) ----


@pytest.fixture(scope="module")
def loaded(tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    return model, tok


def toy_examples(tok, n, seed=0, answer=None):
    import random

    from vllm_surgery.calibration import tokenize_records

    rng = random.Random(seed)
    records = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        completion = answer or f" {a + b}"
        records.append((f"toy {i}", {"prompt": f"what is {a} + {b} ?", "completion": completion}))
    return tokenize_records(records, tok, max_length=64)[0]


def test_continued_training_improves_the_selection_loss_and_returns_the_best_step(loaded, tiny_adapter):
    from vllm_surgery.exact_match import merged_lora
    from vllm_surgery.lora_training import ContinueRecipe, answer_loss, continue_lora_training

    model, tok = loaded
    adapter = load_adapter(tiny_adapter)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit, selection = toy_examples(tok, 24), toy_examples(tok, 8, seed=1)
    recipe = ContinueRecipe(lr=1e-2, batch_size=4, epochs=3, patience=3, seed=0)
    out = continue_lora_training(model, tok, adapter, fit, selection, recipe)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # base left unmodified
    assert out.steps_planned == 18 and out.curve[0][0] == 0 and 0 < out.steps_run <= 18
    assert out.best_loss == min(loss for _, loss in out.curve) < out.curve[0][1]
    assert out.best_step > 0 and set(out.factors) == set(adapter.modules)
    # the returned factors are the weights that scored best_loss: merged into the base model, same loss
    with merged_lora(model, adapter, out.factors):
        assert answer_loss(model, selection, tok.pad_token_id) == pytest.approx(out.best_loss, rel=1e-4)
    # same recipe, same result
    again = continue_lora_training(model, tok, adapter, fit, selection, recipe)
    assert again.curve == out.curve
    assert all(torch.equal(again.factors[n][0], out.factors[n][0]) for n in out.factors)


def test_continued_training_keeps_the_original_when_training_only_hurts(loaded, trained):
    from vllm_surgery.calibration import tokenize_records
    from vllm_surgery.lora_training import ContinueRecipe, continue_lora_training

    model, tok = loaded
    adapter = load_adapter(trained[0])  # trained on RECORDS: it already fits them
    selection = tokenize_records([(f"r{i}", r) for i, r in enumerate(RECORDS[:2])], tok, max_length=64)[0]
    # the same prompts with other answers: every step away from the adapter makes the selection loss worse
    contradicting = [{"prompt": r["prompt"], "completion": " zzz zzz zzz"} for r in RECORDS[:2]] * 2
    fit = tokenize_records([(f"c{i}", r) for i, r in enumerate(contradicting)], tok, max_length=64)[0]
    out = continue_lora_training(model, tok, adapter, fit, selection, ContinueRecipe(lr=1e-2, batch_size=1))
    assert out.best_step == 0 and out.steps_run < out.steps_planned, out.curve  # stopped early
    assert all(
        torch.equal(a, adapter.lora_a(n)) and torch.equal(b, adapter.lora_b(n))
        for n, (a, b) in out.factors.items()
    )
    with pytest.raises(ConfigError, match="fit and selection"):
        continue_lora_training(model, tok, adapter, fit, [], ContinueRecipe())
    with pytest.raises(ConfigError, match="learning rate"):
        ContinueRecipe(lr=0)


def test_learning_rate_search_keeps_the_run_with_the_lowest_selection_loss(loaded, tiny_adapter):
    from vllm_surgery.lora_training import ContinueRecipe, continue_lora_training_lr_search

    model, tok = loaded
    adapter = load_adapter(tiny_adapter)
    fit, selection = toy_examples(tok, 12), toy_examples(tok, 4, seed=1)
    recipe = ContinueRecipe(batch_size=4, epochs=2, patience=2)
    best, runs = continue_lora_training_lr_search(model, tok, adapter, fit, selection, recipe, [1e-7, 1e-2])
    assert [r.lr for r in runs] == [1e-7, 1e-2]
    assert best is runs[1] and best.best_loss < runs[0].best_loss  # a rate too small to learn loses
    with pytest.raises(ConfigError, match="at least one"):
        continue_lora_training_lr_search(model, tok, adapter, fit, selection, recipe, [])
