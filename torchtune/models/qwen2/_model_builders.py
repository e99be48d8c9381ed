# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Published Qwen2.5 sizes (the hub's config.json files) and their LoRA variants."""

from typing import List

from torchtune.models.qwen2._component_builders import lora_qwen2, qwen2
from torchtune.modules import TransformerDecoder


def qwen2_5_0_5b(max_seq_len: int = 32768) -> TransformerDecoder:
    """Qwen2.5 0.5B: 24 layers, 14 heads / 2 KV heads, dim 896, width 4864, tied."""
    return qwen2(
        vocab_size=151_936,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        embed_dim=896,
        intermediate_dim=4864,
        norm_eps=1e-6,
        rope_base=1_000_000.0,
        tie_word_embeddings=True,
        max_seq_len=max_seq_len,
    )


def lora_qwen2_5_0_5b(
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
    """:func:`qwen2_5_0_5b` with LoRA adapters; see :func:`lora_qwen2` for the arguments."""
    return lora_qwen2(
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        vocab_size=151_936,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        embed_dim=896,
        intermediate_dim=4864,
        norm_eps=1e-6,
        rope_base=1_000_000.0,
        tie_word_embeddings=True,
        max_seq_len=max_seq_len,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        quantize_double=quantize_double,
    )


def qwen2_5_1_5b(max_seq_len: int = 32768) -> TransformerDecoder:
    """Qwen2.5 1.5B: 28 layers, 12 heads / 2 KV heads, dim 1536, width 8960, tied."""
    return qwen2(
        vocab_size=151_936,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        embed_dim=1536,
        intermediate_dim=8960,
        norm_eps=1e-6,
        rope_base=1_000_000.0,
        tie_word_embeddings=True,
        max_seq_len=max_seq_len,
    )


def lora_qwen2_5_1_5b(
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
    """:func:`qwen2_5_1_5b` with LoRA adapters; see :func:`lora_qwen2` for the arguments."""
    return lora_qwen2(
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        vocab_size=151_936,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        embed_dim=1536,
        intermediate_dim=8960,
        norm_eps=1e-6,
        rope_base=1_000_000.0,
        tie_word_embeddings=True,
        max_seq_len=max_seq_len,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        quantize_double=quantize_double,
    )


def qwen2_5_3b(max_seq_len: int = 32768) -> TransformerDecoder:
    """Qwen2.5 3B: 36 layers, 16 heads / 2 KV heads, dim 2048, width 11008, tied."""
    return qwen2(
        vocab_size=151_936,
        num_layers=36,
        num_heads=16,
        num_kv_heads=2,
        embed_dim=2048,
        intermediate_dim=11008,
        norm_eps=1e-6,
        rope_base=1_000_000.0,
        tie_word_embeddings=True,
        max_seq_len=max_seq_len,
    )


def lora_qwen2_5_3b(
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
    """:func:`qwen2_5_3b` with LoRA adapters; see :func:`lora_qwen2` for the arguments."""
    return lora_qwen2(
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        vocab_size=151_936,
        num_layers=36,
        num_heads=16,
        num_kv_heads=2,
        embed_dim=2048,
        intermediate_dim=11008,
        norm_eps=1e-6,
        rope_base=1_000_000.0,
        tie_word_embeddings=True,
        max_seq_len=max_seq_len,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        quantize_double=quantize_double,
    )


def qwen2_5_7b(max_seq_len: int = 32768) -> TransformerDecoder:
    """Qwen2.5 7B: 28 layers, 28 heads / 4 KV heads, dim 3584, width 18944, untied."""
    return qwen2(
        vocab_size=152_064,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        embed_dim=3584,
        intermediate_dim=18944,
        norm_eps=1e-6,
        rope_base=1_000_000.0,
        tie_word_embeddings=False,
        max_seq_len=max_seq_len,
    )


def lora_qwen2_5_7b(
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
    """:func:`qwen2_5_7b` with LoRA adapters; see :func:`lora_qwen2` for the arguments."""
    return lora_qwen2(
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        vocab_size=152_064,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        embed_dim=3584,
        intermediate_dim=18944,
        norm_eps=1e-6,
        rope_base=1_000_000.0,
        tie_word_embeddings=False,
        max_seq_len=max_seq_len,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        quantize_double=quantize_double,
    )
