# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Published Gemma 2 sizes and their LoRA variants.

The numbers are those of the hub's ``google/gemma-2-2b`` and ``google/gemma-2-9b``
``config.json`` files as remembered (the hub is unreachable here, so unverified against the
files); the parameter counts they give, 2,614,341,888 and 9,241,705,984, are the model cards'
2.6B and 9.2B. Both: vocab 256000, head_dim 256, ``query_pre_attn_scalar`` 256, window 4096
on every other layer (layer 0 local), soft-caps 50 / 30, 8192 positions, tied.
"""

from typing import List

from torchtune.models.gemma2._component_builders import alternating_windows, gemma2, lora_gemma2
from torchtune.modules import TransformerDecoder


def gemma2_2b(max_seq_len: int = 8192) -> TransformerDecoder:
    """Gemma 2 2B: 26 layers, 8 heads / 4 KV heads of 256, dim 2304, width 9216."""
    return gemma2(
        vocab_size=256_000,
        num_layers=26,
        num_heads=8,
        num_kv_heads=4,
        embed_dim=2304,
        intermediate_dim=9216,
        head_dim=256,
        sliding_window=alternating_windows(26, 4096),
        max_seq_len=max_seq_len,
    )


def lora_gemma2_2b(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    max_seq_len: int = 8192,
    *,
    use_dora: bool = False,
    quantize_base: bool = False,
    quantize_double: bool = True,
) -> TransformerDecoder:
    """:func:`gemma2_2b` with LoRA adapters; see :func:`lora_gemma2` for the arguments."""
    return lora_gemma2(
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        vocab_size=256_000,
        num_layers=26,
        num_heads=8,
        num_kv_heads=4,
        embed_dim=2304,
        intermediate_dim=9216,
        head_dim=256,
        sliding_window=alternating_windows(26, 4096),
        max_seq_len=max_seq_len,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        quantize_double=quantize_double,
    )


def gemma2_9b(max_seq_len: int = 8192) -> TransformerDecoder:
    """Gemma 2 9B: 42 layers, 16 heads / 8 KV heads of 256, dim 3584, width 14336."""
    return gemma2(
        vocab_size=256_000,
        num_layers=42,
        num_heads=16,
        num_kv_heads=8,
        embed_dim=3584,
        intermediate_dim=14336,
        head_dim=256,
        sliding_window=alternating_windows(42, 4096),
        max_seq_len=max_seq_len,
    )


def lora_gemma2_9b(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    max_seq_len: int = 8192,
    *,
    use_dora: bool = False,
    quantize_base: bool = False,
    quantize_double: bool = True,
) -> TransformerDecoder:
    """:func:`gemma2_9b` with LoRA adapters; see :func:`lora_gemma2` for the arguments."""
    return lora_gemma2(
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        vocab_size=256_000,
        num_layers=42,
        num_heads=16,
        num_kv_heads=8,
        embed_dim=3584,
        intermediate_dim=14336,
        head_dim=256,
        sliding_window=alternating_windows(42, 4096),
        max_seq_len=max_seq_len,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        quantize_double=quantize_double,
    )
