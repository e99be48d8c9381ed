# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Published dense Qwen3 sizes (the hub's config.json files) and their LoRA variants."""

from typing import List

from torchtune.models.qwen3._component_builders import lora_qwen3, qwen3
from torchtune.modules import TransformerDecoder


def qwen3_0_6b(max_seq_len: int = 40960) -> TransformerDecoder:
    """Qwen3 0.6B: 28 layers, 16 heads / 8 KV heads of 128, dim 1024, width 3072, tied."""
    return qwen3(
        vocab_size=151_936,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        embed_dim=1024,
        intermediate_dim=3072,
        head_dim=128,
        norm_eps=1e-6,
        rope_base=1_000_000.0,
        tie_word_embeddings=True,
        max_seq_len=max_seq_len,
    )


def lora_qwen3_0_6b(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    max_seq_len: int = 40960,
    *,
    use_dora: bool = False,
    quantize_base: bool = False,
    quantize_double: bool = True,
) -> TransformerDecoder:
    """:func:`qwen3_0_6b` with LoRA adapters; see :func:`lora_qwen3` for the arguments."""
    return lora_qwen3(
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        vocab_size=151_936,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        embed_dim=1024,
        intermediate_dim=3072,
        head_dim=128,
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


def qwen3_1_7b(max_seq_len: int = 40960) -> TransformerDecoder:
    """Qwen3 1.7B: 28 layers, 16 heads / 8 KV heads of 128, dim 2048, width 6144, tied."""
    return qwen3(
        vocab_size=151_936,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        embed_dim=2048,
        intermediate_dim=6144,
        head_dim=128,
        norm_eps=1e-6,
        rope_base=1_000_000.0,
        tie_word_embeddings=True,
        max_seq_len=max_seq_len,
    )


def lora_qwen3_1_7b(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    max_seq_len: int = 40960,
    *,
    use_dora: bool = False,
    quantize_base: bool = False,
    quantize_double: bool = True,
) -> TransformerDecoder:
    """:func:`qwen3_1_7b` with LoRA adapters; see :func:`lora_qwen3` for the arguments."""
    return lora_qwen3(
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        vocab_size=151_936,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        embed_dim=2048,
        intermediate_dim=6144,
        head_dim=128,
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


def qwen3_4b(max_seq_len: int = 40960) -> TransformerDecoder:
    """Qwen3 4B: 36 layers, 32 heads / 8 KV heads of 128, dim 2560, width 9728, tied."""
    return qwen3(
        vocab_size=151_936,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        embed_dim=2560,
        intermediate_dim=9728,
        head_dim=128,
        norm_eps=1e-6,
        rope_base=1_000_000.0,
        tie_word_embeddings=True,
        max_seq_len=max_seq_len,
    )


def lora_qwen3_4b(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    max_seq_len: int = 40960,
    *,
    use_dora: bool = False,
    quantize_base: bool = False,
    quantize_double: bool = True,
) -> TransformerDecoder:
    """:func:`qwen3_4b` with LoRA adapters; see :func:`lora_qwen3` for the arguments."""
    return lora_qwen3(
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        vocab_size=151_936,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        embed_dim=2560,
        intermediate_dim=9728,
        head_dim=128,
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


def qwen3_8b(max_seq_len: int = 40960) -> TransformerDecoder:
    """Qwen3 8B: 36 layers, 32 heads / 8 KV heads of 128, dim 4096, width 12288, untied."""
    return qwen3(
        vocab_size=151_936,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        embed_dim=4096,
        intermediate_dim=12288,
        head_dim=128,
        norm_eps=1e-6,
        rope_base=1_000_000.0,
        tie_word_embeddings=False,
        max_seq_len=max_seq_len,
    )


def lora_qwen3_8b(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    max_seq_len: int = 40960,
    *,
    use_dora: bool = False,
    quantize_base: bool = False,
    quantize_double: bool = True,
) -> TransformerDecoder:
    """:func:`qwen3_8b` with LoRA adapters; see :func:`lora_qwen3` for the arguments."""
    return lora_qwen3(
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        vocab_size=151_936,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        embed_dim=4096,
        intermediate_dim=12288,
        head_dim=128,
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
