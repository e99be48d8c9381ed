# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Published Mistral sizes (the hub's config.json files) and their LoRA variants."""

from typing import List

from torchtune.models.mistral._component_builders import lora_mistral, mistral
from torchtune.modules import TransformerDecoder


def mistral_7b(max_seq_len: int = 32768) -> TransformerDecoder:
    """Mistral 7B v0.1: 32 layers, 32 heads / 8 KV heads, dim 4096, width 14336, window 4096."""
    return mistral(
        vocab_size=32_000,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        embed_dim=4096,
        intermediate_dim=14336,
        norm_eps=1e-5,
        rope_base=10_000.0,
        sliding_window=4096,
        max_seq_len=max_seq_len,
    )


def lora_mistral_7b(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    max_seq_len: int = 32768,
    *,
    use_dora: bool = False,
    quantize_base: bool = False,
    quantize_double: bool = True,
) -> TransformerDecoder:
    """:func:`mistral_7b` with LoRA adapters; see :func:`lora_mistral` for the arguments."""
    return lora_mistral(
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        vocab_size=32_000,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        embed_dim=4096,
        intermediate_dim=14336,
        norm_eps=1e-5,
        rope_base=10_000.0,
        sliding_window=4096,
        max_seq_len=max_seq_len,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        quantize_double=quantize_double,
    )
