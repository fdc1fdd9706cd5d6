"""Calibration data: JSONL prompt/answer pairs, tokenised into answer-masked examples, and batching.

Two line formats, as in the training data people already have:
  {"prompt": "...", "completion": "..."}         the completion is the answer; EOS is appended
  {"messages": [{"role": ..., "content": ...}]}  rendered with the tokenizer's chat template;
                                                 the last (assistant) turn is the answer: everything
                                                 the template writes after the generation prompt
                                                 (end-of-turn tokens, Qwen3's empty think block)

The whole text (prompt + completion, or the rendered conversation) is tokenised once and split at the
answer's first character (see split_tokens), so the answer tokens are those the model sees.

A line may also carry ``"feedback"``: where the example came from in the users' feedback
(``FEEDBACK_LABELS``). refine() weighs ``"correction"`` lines by its ``correction_weight`` setting in the
loss it differentiates (a correction marks exactly where the adapter was wrong); the selection and
held-out losses stay unweighted, so the gate still measures plain answer loss.

An adapter directory may carry its own calibration sample (e.g. a slice of its training set) as
`ADAPTER_CALIBRATION_NAME` next to adapter_config.json, in this same JSONL format: the serving plugin
uses it for an adapter's first refinement, before any traffic exists. Neither PEFT, vLLM nor
load_adapter read it; save_adapter does not copy it into refined versions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CalibrationError

ADAPTER_CALIBRATION_NAME = "surgery_calibration.jsonl"
#: Values of a record's optional "feedback" field: a user's correction, an answer rated good, an
#: unrated answer, a line of a static calibration file, a line of the adapter's own calibration file.
FEEDBACK_LABELS = ("correction", "good", "unrated", "static", "adapter_file")


@dataclass(frozen=True)
class Example:
    """One tokenised example; `source` names where it came from (file:line) for error messages."""

    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    source: str
    truncated: bool = False
    feedback: str | None = None  # the record's "feedback" label, if any (FEEDBACK_LABELS)
    weight: float = 1.0  # weight of its answer tokens in the loss refine() differentiates

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.answer_ids)

    @property
    def weighted_tokens(self) -> float:
        return self.weight * len(self.answer_ids)


@dataclass(frozen=True)
class CalibrationSet:
    examples: list[Example]
    sha256: str
    n_truncated: int
    source: str

    @property
    def answer_tokens(self) -> int:
        return sum(len(e.answer_ids) for e in self.examples)


def _check_text(value: Any, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise CalibrationError(f"{where}: {field!r} must be a string, got {type(value).__name__}")
    return value


def check_record(record: Any, where: str) -> str:
    """Check one parsed line's shape without a tokenizer; returns its format ("messages" or
    "completion"). Raises CalibrationError naming `where` (file:line or record N) and the field."""
    if not isinstance(record, dict):
        raise CalibrationError(f"{where}: each line must be a JSON object, got {type(record).__name__}")
    if "feedback" in record and record["feedback"] not in FEEDBACK_LABELS:
        raise CalibrationError(
            f"{where}: 'feedback' must be one of {', '.join(FEEDBACK_LABELS)}; got {record['feedback']!r}"
        )
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise CalibrationError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise CalibrationError(f"{where}: messages[{i}] needs 'role' and 'content'")
            _check_text(m["content"], f"messages[{i}].content", where)
        if messages[-1]["role"] != "assistant":
            raise CalibrationError(
                f"{where}: the last message must be the assistant's answer, got role {messages[-1]['role']!r}"
            )
        if not messages[-1]["content"].strip():
            raise CalibrationError(f"{where}: the assistant's answer is empty")
        return "messages"
    if "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if key not in record:
                raise CalibrationError(f"{where}: missing {key!r}")
        _check_text(record["prompt"], "prompt", where)
        if not _check_text(record["completion"], "completion", where).strip():
            raise CalibrationError(f"{where}: 'completion' is empty")
        return "completion"
    raise CalibrationError(f"{where}: needs either 'prompt' and 'completion', or 'messages'")


def _render(record: Any, tokenizer: Any, where: str) -> tuple[str, int, bool]:
    """(whole text, character offset where the answer starts, whether the tokenizer adds its special
    tokens) for one parsed line. With messages the chat template renders the whole conversation."""
    if check_record(record, where) == "messages":
        messages = record["messages"]
        if getattr(tokenizer, "chat_template", None) is None:
            raise CalibrationError(
                f"{where}: 'messages' needs a tokenizer with a chat template; this one has none"
            )
        try:
            prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as e:
            raise CalibrationError(f"{where}: the chat template failed on these messages ({e})") from e
        if not full.startswith(prompt):
            raise CalibrationError(
                f"{where}: the chat template does not render the conversation as prompt + answer"
            )
        return full, len(prompt), False  # the template writes the special tokens itself
    prompt, completion = record["prompt"], record["completion"]
    return prompt + completion, len(prompt), True


def split_tokens(
    tokenizer: Any, text: str, boundary: int, add_special_tokens: bool, where: str
) -> tuple[list[int], list[int]]:
    """Tokenise `text` once and split the tokens where the answer (text[boundary:]) begins.

    The answer tokens are then exactly those the model sees for the whole text; tokenising prompt and
    answer separately differs per tokenizer family (a SentencePiece prefix piece before the answer,
    merges across the boundary). A token that straddles the boundary (part prompt, part answer text)
    belongs to the answer, so every answer character is scored; so do special tokens the tokenizer
    appends after it. Raises CalibrationError for a tokenizer without offsets (not a "fast" one).
    """
    try:
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except NotImplementedError:
        enc = {}
    if "offset_mapping" not in enc:  # Python ("slow") tokenizers ignore the request or refuse it
        raise CalibrationError(
            f"{where}: the tokenizer ({type(tokenizer).__name__}) cannot report character offsets, which are "
            "needed to find the answer tokens; use a fast tokenizer (one with tokenizer.json)"
        )
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    start = next((i for i, (_, end) in enumerate(offsets) if end > boundary), len(ids))
    return ids[:start], ids[start:]


def tokenize_records(
    records: Iterable[tuple[str, Any]], tokenizer: Any, max_length: int
) -> tuple[list[Example], int]:
    """Tokenise (source, record) pairs; over-long prompts lose tokens on the left, never answer tokens."""
    if max_length < 2:
        raise CalibrationError(f"max_length must be at least 2, got {max_length}")
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id
    examples: list[Example] = []
    n_truncated = 0
    for where, record in records:
        text, boundary, plain = _render(record, tokenizer, where)
        prompt_ids, answer_ids = split_tokens(tokenizer, text, boundary, plain, where)
        if not answer_ids:
            raise CalibrationError(f"{where}: the answer tokenises to nothing")
        if plain and eos is not None and answer_ids[-1] != eos:
            answer_ids = [*answer_ids, eos]
        if not prompt_ids:
            raise CalibrationError(
                f"{where}: the prompt tokenises to nothing (and the tokenizer adds no BOS)"
            )
        truncated = False
        if len(prompt_ids) + len(answer_ids) > max_length:
            keep_bos = bool(prompt_ids) and bos is not None and prompt_ids[0] == bos
            room = max_length - len(answer_ids) - int(keep_bos)
            if room < 1:
                raise CalibrationError(
                    f"{where}: the answer alone has {len(answer_ids)} tokens, which does not fit max_length="
                    f"{max_length} with any prompt; raise max_length (answers are never cut)"
                )
            prompt_ids = ([bos] if keep_bos else []) + list(prompt_ids[-room:])
            truncated = True
            n_truncated += 1
        examples.append(
            Example(tuple(prompt_ids), tuple(answer_ids), where, truncated, feedback=record.get("feedback"))
        )
    return examples, n_truncated


def read_jsonl(path: str | os.PathLike) -> tuple[list[tuple[str, Any]], str]:
    """(source, record) pairs of a JSONL file and the file's SHA-256; blank lines are skipped."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CalibrationError(f"{path}: cannot be read ({e.strerror})") from e
    records = []
    for i, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            records.append((where, json.loads(line)))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CalibrationError(f"{where}: not valid JSON ({e})") from e
    if not records:
        raise CalibrationError(f"{path}: holds no examples")
    return records, hashlib.sha256(raw).hexdigest()


def load_calibration(
    data: str | os.PathLike | Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    max_length: int = 1024,
    samples: int | None = None,
    seed: int = 0,
) -> CalibrationSet:
    """Read calibration data from a JSONL file or a list of records; `samples` draws a seeded subset."""
    if isinstance(data, (str, os.PathLike)):
        records, digest = read_jsonl(data)
        source = str(data)
    else:
        records = [(f"record {i}", r) for i, r in enumerate(data)]
        if not records:
            raise CalibrationError("calibration data holds no examples")
        digest = hashlib.sha256(json.dumps([r for _, r in records], sort_keys=True).encode()).hexdigest()
        source = "<records>"
    if samples is not None:
        if samples < 1:
            raise CalibrationError(f"samples must be positive, got {samples}")
        if samples < len(records):
            picked = sorted(random.Random(seed).sample(range(len(records)), samples))
            records = [records[i] for i in picked]
    examples, n_truncated = tokenize_records(records, tokenizer, max_length)
    return CalibrationSet(examples=examples, sha256=digest, n_truncated=n_truncated, source=source)


def heldout_count(n: int, fraction: float) -> int:
    """How many of `n` examples split_heldout holds out (at least 1 and at most n - 1 when fraction > 0).
    Raises CalibrationError for a fraction outside [0, 1), or fewer than 2 examples to split."""
    if not 0.0 <= fraction < 1.0:
        raise CalibrationError(f"held-out fraction must lie in [0, 1), got {fraction}")
    n_held = round(fraction * n)
    if fraction > 0:
        if n < 2:
            raise CalibrationError(f"a held-out check needs at least 2 examples, got {n}")
        n_held = min(max(n_held, 1), n - 1)
    return n_held


def split_heldout(
    examples: Sequence[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """A seeded random split into (calibration, held-out); both are non-empty when fraction > 0."""
    n = len(examples)
    n_held = heldout_count(n, fraction)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = sorted(order[:n_held])
    calib = sorted(order[n_held:])
    return [examples[i] for i in calib], [examples[i] for i in held]


def split_examples(
    examples: Sequence[Example], heldout_fraction: float, selection_fraction: float, seed: int
) -> tuple[list[Example], list[Example], list[Example]]:
    """(fit, selection, held-out): refine()'s three disjoint, seeded splits.

    held-out: the gate's confirmation data, exactly split_heldout's (so a seed holds out the same
    examples whatever else changes). selection: `selection_fraction` of all examples (at least one when
    the fraction is > 0), drawn from the rest with another seed, to choose step sizes and stop
    iterations; fit: the rest, for the sensitivity passes. Nothing that chooses a candidate sees the
    held-out examples, so the gate's test stays valid however many variants the selection tried.
    Raises CalibrationError for fractions outside [0, 1) or too few examples to leave one to fit.
    """
    if not 0.0 <= selection_fraction < 1.0:
        raise CalibrationError(f"selection fraction must lie in [0, 1), got {selection_fraction}")
    rest, heldout = split_heldout(examples, heldout_fraction, seed)
    if selection_fraction == 0:
        return rest, [], heldout
    n_sel = max(1, round(selection_fraction * len(examples)))
    if n_sel >= len(rest):
        raise CalibrationError(
            f"{len(examples)} calibration examples are too few: {len(heldout)} held out and {n_sel} for "
            "selection leave none for the sensitivity pass; add examples or lower the fractions"
        )
    order = list(range(len(rest)))
    random.Random(f"selection-{seed}").shuffle(order)
    chosen = set(order[:n_sel])
    fit = [e for i, e in enumerate(rest) if i not in chosen]
    return fit, [e for i, e in enumerate(rest) if i in chosen], heldout


def weighted(examples: Sequence[Example], correction_weight: float) -> list[Example]:
    """The examples with `correction_weight` on those labelled "correction" (the others weigh 1)."""
    return [
        dataclasses.replace(e, weight=correction_weight if e.feedback == "correction" else 1.0)
        for e in examples
    ]


def token_budget_batches(examples: Sequence[Example], max_tokens: int) -> list[list[int]]:
    """Indices grouped longest-first so that batch size x longest length <= max_tokens (little padding)."""
    order = sorted(range(len(examples)), key=lambda i: (-examples[i].length, i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = examples[current[0]].length if current else examples[i].length
        if current and (len(current) + 1) * longest > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


@dataclass
class Batch:
    """Right-padded inputs; `positions` are the (row, col) whose next-token logits predict answer tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    example_index: torch.Tensor  # for each target, which example of the batch it belongs to
    weights: torch.Tensor | None = None  # per target, its example's weight; None when every weight is 1


def collate(examples: Sequence[Example], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    longest = max(e.length for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    rows, cols, targets, owner = [], [], [], []
    for b, e in enumerate(examples):
        seq = e.prompt_ids + e.answer_ids
        ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[b, : len(seq)] = 1
        start = len(e.prompt_ids)
        for j, tok in enumerate(e.answer_ids):
            rows.append(b)
            cols.append(start + j - 1)  # logits at position p predict token p + 1
            targets.append(tok)
            owner.append(b)
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    weights = None
    if any(e.weight != 1.0 for e in examples):
        per_example = torch.tensor([e.weight for e in examples], dtype=torch.float32)
        weights = per_example[torch.tensor(owner, dtype=torch.long)].to(device)
    return Batch(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        rows=as_long(rows),
        cols=as_long(cols),
        targets=as_long(targets),
        example_index=as_long(owner),
        weights=weights,
    )
