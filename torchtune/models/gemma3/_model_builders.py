# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Published Gemma 3 text sizes and their LoRA variants.

The numbers are those of the hub's ``google/gemma-3-1b-pt`` ``config.json`` and of the
``text_config`` of ``google/gemma-3-4b-pt`` / ``-4b-it`` as remembered (the hub is unreachable
here). The 4B file gives only hidden_size 2560, intermediate_size 10240, 34 layers, window 1024
and linear rope scaling by 8; the rest are transformers' ``Gemma3TextConfig`` defaults, checked
against the installed source: vocab 262208, 8 heads / 4 KV heads of 256,
``query_pre_attn_scalar`` 256, RoPE 1e6 / 1e4, 131072 positions, one layer in six global. 1B: 262144 tokens, window 512, 32768 positions, no rope
scaling. 4B: 262208 tokens, window 1024, 131072 positions, linear rope scaling by 8 on the
global layers. Both: head_dim 256, ``query_pre_attn_scalar`` 256, five local layers to each
global one, RoPE bases 1e4 (local) / 1e6 (global), tied. The 4B preset is the language
model alone (the hub's 4B checkpoint is the multimodal ``Gemma3ForConditionalGeneration``).
"""

from typing import List

from torchtune.models.gemma2._component_builders import alternating_windows
from torchtune.models.gemma3._component_builders import gemma3, lora_gemma3
from torchtune.modules import TransformerDecoder

_LINEAR_8 = {"rope_type": "linear", "factor": 8.0}


def gemma3_1b(max_seq_len: int = 32768) -> TransformerDecoder:
    """Gemma 3 1B: 26 layers, 4 heads / 1 KV head of 256, dim 1152, width 6912."""
    return gemma3(
        vocab_size=262_144,
        num_layers=26,
        num_heads=4,
        num_kv_heads=1,
        embed_dim=1152,
        intermediate_dim=6912,
        head_dim=256,
        sliding_window=alternating_windows(26, 512, period=6),
        max_seq_len=max_seq_len,
    )


def lora_gemma3_1b(
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
    """:func:`gemma3_1b` with LoRA adapters; see :func:`lora_gemma3` for the arguments."""
    return lora_gemma3(
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        vocab_size=262_144,
        num_layers=26,
        num_heads=4,
        num_kv_heads=1,
        embed_dim=1152,
        intermediate_dim=6912,
        head_dim=256,
        sliding_window=alternating_windows(26, 512, period=6),
        max_seq_len=max_seq_len,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        quantize_double=quantize_double,
    )


def gemma3_4b(max_seq_len: int = 131072) -> TransformerDecoder:
    """Gemma 3 4B's language model: 34 layers, 8 heads / 4 KV heads of 256, dim 2560, width
    10240. Pass a shorter ``max_seq_len`` to train: every layer holds its own RoPE table."""
    return gemma3(
        vocab_size=262_208,
        num_layers=34,
        num_heads=8,
        num_kv_heads=4,
        embed_dim=2560,
        intermediate_dim=10240,
        head_dim=256,
        rope_scaling=_LINEAR_8,
        sliding_window=alternating_windows(34, 1024, period=6),
        max_seq_len=max_seq_len,
    )


def lora_gemma3_4b(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    max_seq_len: int = 131072,
    *,
    use_dora: bool = False,
    quantize_base: bool = False,
    quantize_double: bool = True,
) -> TransformerDecoder:
    """:func:`gemma3_4b` with LoRA adapters; see :func:`lora_gemma3` for the arguments."""
    return lora_gemma3(
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        vocab_size=262_208,
        num_layers=34,
        num_heads=8,
        num_kv_heads=4,
        embed_dim=2560,
        intermediate_dim=10240,
        head_dim=256,
        rope_scaling=_LINEAR_8,
        sliding_window=alternating_windows(34, 1024, period=6),
        max_seq_len=max_seq_len,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        quantize_double=quantize_double,
    )
