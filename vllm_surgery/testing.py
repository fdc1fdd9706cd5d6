"""Small, fully local models, tokenizers and adapters for tests, benchmarks and users' own CI.

Nothing comes from a hub: a byte-level BPE is trained on the spot and the weights are random, so a
whole refine -> serve cycle can be exercised in seconds on a CPU. Needs the `tokenizers` package
(installed with transformers).
"""

from __future__ import annotations

import json
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


def build_tiny_llama(
    out_dir: Path,
    *,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A random Llama with its own tokenizer: enough for exact gradient and I/O tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out_dir)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_lora_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    r: int = 8,
    alpha: int = 16,
    target_modules: list[str] | None = None,
    seed: int = 1,
    scale: float = 0.3,
    **lora_kwargs,
) -> Path:
    """A PEFT LoRA adapter with random, non-zero A and B (as if it had been trained)."""
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
            if "lora_" in name:
                p.normal_(0.0, scale / (p.shape[1] ** 0.5))
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
