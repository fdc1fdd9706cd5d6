"""Answer tokens are the tokens the model sees: the whole text is tokenised once and split by offsets.

Tokenizers in four families' styles are built here (no hub): byte-level BPE with the Llama-3 and Qwen3
chat templates, SentencePiece-style Metaspace BPE with the Mistral and Gemma-2 chat templates. Expected
texts and token pieces are written out by hand.
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, CanineTokenizer

from vllm_surgery.calibration import tokenize_records
from vllm_surgery.errors import CalibrationError
from vllm_surgery.testing import build_chat_tokenizer

MESSAGES = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
RENDERED = {
    "llama3": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nworld<|eot_id|>"
    ),
    "qwen3": "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nworld<|im_end|>\n",
    "mistral": "<s>[INST] hello[/INST] world</s>",
    "gemma2": "<bos><start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\nworld<end_of_turn>\n",
}
# The answer: everything the template writes after the generation prompt (Qwen3's empty think block
# and the newline after an end-of-turn token included).
ANSWER_TEXT = {
    "llama3": "world<|eot_id|>",
    "qwen3": "<think>\n\n</think>\n\nworld<|im_end|>\n",
    "mistral": " world</s>",
    "gemma2": "world<end_of_turn>\n",
}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    out = {}
    for style in RENDERED:
        build_chat_tokenizer(style, root / style)
        out[style] = AutoTokenizer.from_pretrained(root / style)  # as refine() loads it
    return out


def _one(tok, record, max_length=256):
    (example,), _ = tokenize_records([("line 1", record)], tok, max_length)
    return example


@pytest.mark.parametrize("style", list(RENDERED))
def test_conversation_answer_is_the_rendered_text_after_the_generation_prompt(tokenizers, style):
    tok = tokenizers[style]
    ex = _one(tok, {"messages": MESSAGES})
    full = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert full == RENDERED[style]
    seen = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    assert list(ex.prompt_ids + ex.answer_ids) == seen["input_ids"]  # exactly the tokens the model sees
    start = seen["offset_mapping"][len(ex.prompt_ids)][0]
    assert full[start:] == ANSWER_TEXT[style]
    assert (
        ex.answer_ids.count(
            tok.eos_token_id if style != "gemma2" else tok.convert_tokens_to_ids("<end_of_turn>")
        )
        == 1
    )


@pytest.mark.parametrize("style", list(RENDERED))
def test_prompt_and_completion_are_tokenised_as_one_text(tokenizers, style):
    tok = tokenizers[style]
    ex = _one(tok, {"prompt": "what is 1 + 2 ?", "completion": " 3"})
    assert list(ex.prompt_ids + ex.answer_ids) == tok("what is 1 + 2 ? 3")["input_ids"] + [tok.eos_token_id]
    pieces = tok.convert_ids_to_tokens(list(ex.answer_ids))
    assert (
        pieces
        == {
            "llama3": ["Ġ3", "<|eot_id|>"],
            "qwen3": ["Ġ3", "<|im_end|>"],
            "mistral": ["▁3", "</s>"],
            "gemma2": ["▁3", "<eos>"],
        }[style]
    )
    first = tok.convert_ids_to_tokens(ex.prompt_ids[0])
    assert first == {"llama3": "<|begin_of_text|>", "qwen3": "w", "mistral": "<s>", "gemma2": "<bos>"}[style]


def test_sentencepiece_adds_no_prefix_piece_inside_the_text(tokenizers):
    """Tokenised alone, "3" gets SentencePiece's leading '▁'; after "[/INST]" in the whole text it does not."""
    tok = tokenizers["mistral"]
    ex = _one(tok, {"prompt": "[INST] what is 1 + 2 ?[/INST]", "completion": "3"})
    assert tok.convert_ids_to_tokens(list(ex.answer_ids)) == ["3", "</s>"]
    assert tok.convert_ids_to_tokens(tok("3", add_special_tokens=False)["input_ids"]) == ["▁3"]  # the old way


@pytest.mark.parametrize(("style", "joined"), [("llama3", "Ġ3"), ("mistral", "▁3")])
def test_a_token_across_the_boundary_belongs_to_the_answer(tokenizers, style, joined):
    """The prompt ends in a space that merges with the answer's "3": that token is scored as answer."""
    tok = tokenizers[style]
    ex = _one(tok, {"prompt": "what is 1 + 2 = ", "completion": "3"})
    assert tok.convert_ids_to_tokens(list(ex.answer_ids)) == [joined, tok.eos_token]
    assert tok.convert_ids_to_tokens(ex.prompt_ids[-1]) in ("Ġ=", "▁=")
    ex = _one(tok, {"prompt": "hello wor", "completion": "ld"})  # a merge across the boundary
    assert tok.convert_ids_to_tokens(list(ex.answer_ids)) == [joined.replace("3", "world"), tok.eos_token]
    assert tok.convert_ids_to_tokens(list(ex.prompt_ids))[-1] in ("hello", "▁hello")


def test_left_truncation_still_keeps_the_whole_answer(tokenizers):
    tok = tokenizers["llama3"]
    ex = _one(tok, {"prompt": "the quick brown fox " * 10, "completion": " 3"}, max_length=6)
    assert tok.convert_ids_to_tokens(list(ex.answer_ids)) == ["Ġ3", "<|eot_id|>"]
    assert (
        ex.truncated and ex.length == 6 and tok.convert_ids_to_tokens(ex.prompt_ids[0]) == "<|begin_of_text|>"
    )


def test_a_tokenizer_without_offsets_is_refused():
    with pytest.raises(CalibrationError) as info:
        _one(CanineTokenizer(), {"prompt": "a", "completion": "b"})
    assert str(info.value) == (
        "line 1: the tokenizer (CanineTokenizer) cannot report character offsets, which are needed to find "
        "the answer tokens; use a fast tokenizer (one with tokenizer.json)"
    )
