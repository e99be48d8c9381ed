# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Builders for the tiny assets tests need: made locally, never downloaded."""

import json
import random
from pathlib import Path
from typing import List

import torch

_WORDS = (
    "the quick brown fox jumps over lazy dog add two numbers reverse this string "
    "what is sum of and give answer below instruction input response write list "
    "convert meters to centimeters kilograms grams hello world café naïve 東京 ünïcödé"
).split()


def sample_corpus(n_lines: int = 400, seed: int = 0) -> List[str]:
    """Deterministic pseudo-English lines with digits, punctuation and some unicode."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
        words.append(str(rng.randint(0, 999)))
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ":"]))
    return lines


def train_sentencepiece(
    model_prefix: Path,
    vocab_size: int = 400,
    seed: int = 0,
    normalization_rule_name: str = "nmt_nfkc",
) -> Path:
    """Train a Llama-style BPE SentencePiece model (unk=0, bos=1, eos=2, no pad).

    ``normalization_rule_name="identity"`` matches Llama2's real tokenizer (newlines and other
    unseen characters survive as byte-fallback pieces); the default NFKC rule maps "\\n" to " ".

    Returns the path of ``<model_prefix>.model``.
    """
    import sentencepiece as spm

    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample_corpus(seed=seed)),
        model_prefix=str(model_prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name=normalization_rule_name,
        num_threads=1,
        minloglevel=2,
    )
    return model_prefix.with_suffix(".model")


def tiny_hf_llama_config(
    vocab_size: int = 321,
    hidden_size: int = 64,
    num_layers: int = 3,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 88,
    max_position_embeddings: int = 256,
    **extra,
):
    """A small HF ``LlamaConfig`` with odd sizes that catch transposes (head_dim 16).

    ``extra`` overrides or adds ``LlamaConfig`` fields (``attention_bias``, ``head_dim``,
    ``tie_word_embeddings``, ...).
    """
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(extra)
    return LlamaConfig(**fields)


def tiny_hf_llama(seed: int = 0, **config_kwargs):
    """A randomly initialised HF ``LlamaForCausalLM`` in fp32, eval mode, eager attention."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = tiny_hf_llama_config(**config_kwargs)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    return randomise_norms_and_biases_(model)


def randomise_norms_and_biases_(model: torch.nn.Module) -> torch.nn.Module:
    """HF inits norms to ones and biases to zeros; draw them at random (from torch's global
    RNG) so that a swapped norm or a dropped bias cannot pass a parity test."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def write_alpaca_json(path: Path, n: int = 20, seed: int = 0) -> Path:
    """Write ``n`` Alpaca-format records (about half with an ``input``) to a JSON list file."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if i % 2:
            records.append(
                {
                    "instruction": "Add the two numbers.",
                    "input": f"{a} and {b}",
                    "output": f"{a + b}",
                }
            )
        else:
            word = rng.choice(_WORDS)
            records.append(
                {"instruction": f"Reverse the word {word}.", "input": "", "output": word[::-1]}
            )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1))
    return path


def sample_conversations(n: int = 20, seed: int = 0) -> List[List[dict]]:
    """``n`` OpenAI-style conversations: 1-3 user/assistant rounds, about a third with a system
    prompt, contents drawn from ``sample_corpus`` (unicode, digits, punctuation)."""
    rng = random.Random(seed)
    lines = sample_corpus(4 * n + 8, seed=seed)
    conversations = []
    for _ in range(n):
        messages = []
        if rng.random() < 1 / 3:
            messages.append({"role": "system", "content": rng.choice(lines)})
        for _ in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": rng.choice(lines)})
            messages.append({"role": "assistant", "content": rng.choice(lines)})
        conversations.append(messages)
    return conversations


def write_chat_jsonl(path: Path, n: int = 20, seed: int = 0, style: str = "openai") -> Path:
    """Write ``sample_conversations`` as JSON lines ``{"messages": [...]}`` (openai) or
    ``{"conversations": [{"from", "value"}]}`` (sharegpt)."""
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for messages in sample_conversations(n, seed):
            if style == "sharegpt":
                row = {
                    "conversations": [
                        {"from": names[m["role"]], "value": m["content"]} for m in messages
                    ]
                }
            else:
                row = {"messages": messages}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
