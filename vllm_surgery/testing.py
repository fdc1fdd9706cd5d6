"""Small, fully local models, tokenizers and adapters for tests, benchmarks and users' own CI.

Nothing comes from a hub: a byte-level BPE is trained on the spot and the weights are random, so a
whole refine -> serve cycle can be exercised in seconds on a CPU. Needs the `tokenizers` package
(installed with transformers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

WORDS = (
    "the quick brown fox jumps over the lazy dog . what is one plus two ? three . "
    "question answer user assistant hello world add numbers sum result is equal "
    "0 1 2 3 4 5 6 7 8 9 + - = ! , : ; ( ) a b c d e f g h i j k l m n o p q r s t u v w x y z"
)


def build_tokenizer(out_dir: Path):
    """Train a tiny byte-level BPE on the spot and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([WORDS] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    fast.save_pretrained(out_dir)
    return fast


# The chat templates of four model families, as their tokenizer_config.json ships them (Qwen3's without
# its tool-calling branches, Mistral's v0.3 template without its tool branches): what renders the
# conversation, and so decides which characters are the answer.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN3_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""
MISTRAL_TEMPLATE = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}"""
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# Per style: pre-tokenisation ("bytelevel" as GPT-2/Llama-3/Qwen, or SentencePiece-style "metaspace" with
# its prepend scheme, as Mistral and Gemma), special tokens, BOS/EOS/PAD/UNK, whether the tokenizer itself
# adds BOS, extra non-special tokens, and the chat template.
CHAT_STYLES: dict[str, dict] = {
    "llama3": {
        "pre": "bytelevel",
        "specials": [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "pad": "<|end_of_text|>",
        "unk": None,
        "add_bos": True,
        "added": [],
        "template": LLAMA3_TEMPLATE,
    },
    "qwen3": {
        "pre": "bytelevel",
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos": None,
        "eos": "<|im_end|>",
        "pad": "<|endoftext|>",
        "unk": None,
        "add_bos": False,
        "added": ["<think>", "</think>"],
        "template": QWEN3_TEMPLATE,
    },
    "mistral": {
        "pre": "metaspace:first",
        "specials": ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        "bos": "<s>",
        "eos": "</s>",
        "pad": "</s>",
        "unk": "<unk>",
        "add_bos": True,
        "added": [],
        "template": MISTRAL_TEMPLATE,
    },
    "gemma2": {
        "pre": "metaspace:never",
        "specials": ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        "bos": "<bos>",
        "eos": "<eos>",
        "pad": "<pad>",
        "unk": "<unk>",
        "add_bos": True,
        "added": [],
        "template": GEMMA2_TEMPLATE,
    },
}


def build_chat_tokenizer(style: str, out_dir: Path):
    """A small tokenizer trained on the spot in one family's style (CHAT_STYLES), with its chat template,
    saved (tokenizer.json + tokenizer_config.json) where AutoTokenizer loads it. No hub access."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = CHAT_STYLES[style]
    if spec["pre"] == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        scheme = spec["pre"].split(":")[1]
        tok = Tokenizer(models.BPE(unk_token=spec["unk"]))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme)
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme=scheme)
        alphabet = list("\n[]/<>|_'\"")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=spec["specials"], initial_alphabet=alphabet)
    tok.train_from_iterator([WORDS] * 20 + ["hello world\n"] * 20, trainer=trainer)
    if spec["add_bos"]:
        bos = spec["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        pad_token=spec["pad"],
        unk_token=spec["unk"],
    )
    fast.add_tokens(spec["added"])
    fast.chat_template = spec["template"]
    fast.save_pretrained(out_dir)
    return fast


# Per family: the transformers config class and what the tiny config sets beyond the common sizes. The
# twists each family brings are kept on, made visible at tiny sizes: Gemma-2's final logit softcapping
# (with a small cap, so it matters for logits of a random model) and tied embeddings, Cohere's
# logit_scale and tied embeddings, Granite's logits_scaling and multipliers, Phi-3's fused qkv_proj and
# gate_up_proj.
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {"tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": False}),
    "qwen3": ("Qwen3Config", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {"tie_word_embeddings": False}),
    "gemma2": (
        "Gemma2Config",
        {
            "tie_word_embeddings": True,
            "final_logit_softcapping": 0.5,
            "attn_logit_softcapping": 50.0,
            "sliding_window": 8,
        },
    ),
    "phi3": ("Phi3Config", {"tie_word_embeddings": False}),
    "cohere": ("CohereConfig", {"tie_word_embeddings": True, "logit_scale": 0.25}),
    "granite": (
        "GraniteConfig",
        {
            "tie_word_embeddings": False,
            "logits_scaling": 4.0,
            "embedding_multiplier": 2.0,
            "residual_multiplier": 0.5,
            "attention_multiplier": 0.25,
        },
    ),
}


def build_tiny_model(
    family: str,
    out_dir: Path,
    *,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    dtype: torch.dtype = torch.float32,
    **config_overrides,
) -> Path:
    """A random causal LM of `family` (see FAMILIES) with its own tokenizer, saved as safetensors."""
    import transformers
    from transformers import AutoModelForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    class_name, extra = FAMILIES[family]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out_dir)
    settings = {
        "vocab_size": len(tok),
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "max_position_embeddings": 512,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        **extra,
        **config_overrides,
    }
    if family == "gemma2":
        settings["query_pre_attn_scalar"] = settings["head_dim"]
    config = getattr(transformers, class_name)(**settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_tiny_llama(out_dir: Path, **kwargs) -> Path:
    """A random Llama with its own tokenizer: enough for exact gradient and I/O tests."""
    return build_tiny_model("llama", out_dir, **kwargs)


ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_lora_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    r: int = 8,
    alpha: int = 16,
    target_modules: list[str] | str | None = None,
    seed: int = 1,
    scale: float = 0.3,
    **lora_kwargs,
) -> Path:
    """A PEFT LoRA adapter with random, non-zero A and B (as if it had been trained).

    `target_modules` defaults to the seven Llama projections ("all-linear" suits every family);
    `lora_kwargs` go to LoraConfig (e.g. modules_to_save=["lm_head"], whose copies are perturbed too, so
    that an adapter applied without them computes something else).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=target_modules or ALL_PROJ,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        **lora_kwargs,
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name and p.ndim == 2:
                p.normal_(0.0, scale / (p.shape[1] ** 0.5))
            elif "modules_to_save" in name:
                p.add_(torch.randn_like(p) * p.std())
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def write_calibration(path: Path, n: int = 12, seed: int = 0) -> Path:
    """Prompt/completion pairs of varied lengths, in the JSONL format refine() reads."""
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            filler = " ".join(rng.choice(WORDS.split()) for _ in range(rng.randint(0, 12)))
            f.write(json.dumps({"prompt": f"{filler} what is {a} + {b} ?", "completion": f" {a + b}"}) + "\n")
    return Path(path)


# Sizes of a tiny Llama that vLLM's CPU build serves (its attention needs head_dim 64 or more).
SERVABLE_TINY_LLAMA = {"hidden": 128, "heads": 2, "kv_heads": 2, "layers": 2, "intermediate": 256}
# refine() settings under which the gain case below is accepted: half held out (24 of 48 examples,
# enough for the gate's test to see the tiny adapter's ~0.5-1% gain), and a floor below that gain.
GAIN_SETTINGS = {"policy": "auto", "heldout_fraction": 0.5, "min_improvement": 0.001}
GAIN_EXAMPLES = 48


@dataclass(frozen=True)
class GainCase:
    """A base model, an adapter and calibration data on which refine(**GAIN_SETTINGS) accepts a measured
    gain (a real one: the gate's test, not force). Built by `build_gain_case`."""

    base: Path
    adapter: Path
    calibration: Path
    settings: dict

    def records(self) -> list[dict]:
        """The calibration lines as records (what a refine request's "records" or traffic would carry)."""
        return [json.loads(line) for line in self.calibration.read_text().splitlines() if line.strip()]


def build_gain_case(root: Path, *, base: Path | None = None, adapter_seed: int = 1) -> GainCase:
    """The servable tiny Llama (or `base`, built with SERVABLE_TINY_LLAMA), a rank-8 adapter on all
    seven projections and GAIN_EXAMPLES arithmetic examples (write_calibration, seed 0). Measured: the
    gate accepts grad_direction under auto at p <= 0.001 for adapter seeds 1-3 (see tests/test_refine.py)."""
    root = Path(root)
    base = base or build_tiny_llama(root / "base", **SERVABLE_TINY_LLAMA)
    adapter = build_lora_adapter(
        base, root / f"adapter-{adapter_seed}", r=8, alpha=16, target_modules=ALL_PROJ, seed=adapter_seed
    )
    calibration = write_calibration(root / "gain-calibration.jsonl", n=GAIN_EXAMPLES)
    return GainCase(base, adapter, calibration, dict(GAIN_SETTINGS))
