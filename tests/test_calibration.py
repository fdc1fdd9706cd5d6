import json

import pytest
from transformers import AutoTokenizer

from vllm_surgery.calibration import collate, load_calibration, split_heldout, token_budget_batches
from vllm_surgery.errors import CalibrationError


@pytest.fixture(scope="module")
def tok(tiny_base):
    return AutoTokenizer.from_pretrained(tiny_base)


def _write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_prompt_completion_appends_eos_and_masks_prompt(tok, tmp_path):
    f = _write(tmp_path / "c.jsonl", [{"prompt": "what is 1 + 2 ?", "completion": " 3"}, ""])
    cs = load_calibration(f, tok)
    (ex,) = cs.examples
    assert ex.answer_ids[-1] == tok.eos_token_id
    assert list(ex.answer_ids[:-1]) == tok(" 3", add_special_tokens=False)["input_ids"]
    assert ex.source == f"{f}:1" and cs.n_truncated == 0 and len(cs.sha256) == 64
    batch = collate(cs.examples, tok.pad_token_id)
    # the logits that predict answer token j sit one position before it
    assert batch.targets.tolist() == list(ex.answer_ids)
    assert batch.cols.tolist() == [len(ex.prompt_ids) - 1 + j for j in range(len(ex.answer_ids))]


def test_messages_use_chat_template_last_turn_is_answer(tok, tmp_path):
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    (ex,) = load_calibration(_write(tmp_path / "c.jsonl", [{"messages": msgs}]), tok).examples
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert full == "<s>user: hello</s>\n<s>assistant: world</s>\n"
    # the model sees the whole conversation tokenised once; the generation prompt ends in a space that
    # merges with "world" into one token, which straddles the boundary and so belongs to the answer
    assert list(ex.prompt_ids + ex.answer_ids) == tok(full, add_special_tokens=False)["input_ids"]
    assert tok.decode(ex.prompt_ids) == "<s>user: hello</s>\n<s>assistant:"
    assert tok.decode(ex.answer_ids) == " world</s>\n"
    assert ex.answer_ids.count(tok.eos_token_id) == 1  # from the template, not appended twice


def test_left_truncation_keeps_every_answer_token(tok, tmp_path):
    long_prompt = " ".join(["the quick brown fox"] * 40)
    f = _write(
        tmp_path / "c.jsonl",
        [{"prompt": long_prompt, "completion": " 1 2 3 4"}, {"prompt": "a", "completion": "b"}],
    )
    cs = load_calibration(f, tok, max_length=20)
    assert cs.n_truncated == 1
    ex = cs.examples[0]
    full_answer = tok(" 1 2 3 4", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert list(ex.answer_ids) == full_answer and ex.truncated and ex.length == 20
    full_prompt = tok(long_prompt)["input_ids"]
    assert list(ex.prompt_ids) == full_prompt[-(20 - len(full_answer)) :]  # the prompt's right end survives
    assert not cs.examples[1].truncated


def test_answer_longer_than_max_length_is_an_error_not_a_cut(tok, tmp_path):
    f = _write(tmp_path / "c.jsonl", [{"prompt": "a", "completion": " 1 2 3 4 5 6 7 8 9"}])
    with pytest.raises(CalibrationError, match=r"c.jsonl:1: the answer alone has \d+ tokens"):
        load_calibration(f, tok, max_length=5)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{oops", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ({"prompt": "x"}, "missing 'completion'"),
        ({"completion": "x"}, "missing 'prompt'"),
        ({"prompt": 3, "completion": "x"}, "'prompt' must be a string"),
        ({"prompt": "x", "completion": "  "}, "'completion' is empty"),
        ({"text": "x"}, "needs either 'prompt' and 'completion', or 'messages'"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user"}]}, r"messages\[0\] needs 'role' and 'content'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "last message must be the assistant"),
        ({"messages": [{"role": "assistant", "content": 5}]}, "must be a string"),
    ],
)
def test_bad_lines_name_the_line(tok, tmp_path, line, message):
    f = _write(tmp_path / "c.jsonl", [{"prompt": "fine", "completion": " ok"}, "", line])
    with pytest.raises(CalibrationError, match=message) as info:
        load_calibration(f, tok)
    assert f"{f}:3:" in str(info.value)


def test_empty_and_missing_files(tok, tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(CalibrationError, match="holds no examples"):
        load_calibration(tmp_path / "e.jsonl", tok)
    with pytest.raises(CalibrationError, match="cannot be read"):
        load_calibration(tmp_path / "missing.jsonl", tok)


def test_records_samples_and_split(tok):
    records = [{"prompt": f"what is {i} ?", "completion": f" {i}"} for i in range(40)]
    cs = load_calibration(records, tok, samples=10, seed=1)
    assert len(cs.examples) == 10 and cs.source == "<records>"
    assert cs.examples == load_calibration(records, tok, samples=10, seed=1).examples
    calib, held = split_heldout(cs.examples, 0.25, seed=0)
    assert (len(calib), len(held)) == (8, 2)
    assert set(calib).isdisjoint(held) and len(set(calib) | set(held)) == 10
    assert split_heldout(cs.examples, 0.0, 0) == (cs.examples, [])
    with pytest.raises(CalibrationError, match="at least 2 examples"):
        split_heldout(cs.examples[:1], 0.5, 0)


def test_token_budget_batches_sort_by_length_and_respect_budget(tok):
    records = [{"prompt": "a " * (i % 7 + 1), "completion": " b"} for i in range(30)]
    exs = load_calibration(records, tok).examples
    batches = token_budget_batches(exs, 40)
    assert sorted(i for b in batches for i in b) == list(range(30))
    for b in batches:
        lengths = [exs[i].length for i in b]
        assert lengths == sorted(lengths, reverse=True)
        assert len(b) == 1 or len(b) * max(lengths) <= 40
    padded = sum(len(b) * max(exs[i].length for i in b) for b in batches)
    assert padded - sum(e.length for e in exs) < 0.2 * padded  # little padding
