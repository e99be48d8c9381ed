# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Published Llama2 sizes (Touvron et al. 2023) and their LoRA variants."""

from typing import List

from torchtune.models.llama2._component_builders import llama2, lora_llama2
from torchtune.modules import TransformerDecoder


def llama2_7b(max_seq_len: int = 4096) -> TransformerDecoder:
    """Llama2 7B: 32 layers, 32 heads, dim 4096, SwiGLU width 11008, vocab 32000."""
    return llama2(
        vocab_size=32_000,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        embed_dim=4096,
        max_seq_len=max_seq_len,
        norm_eps=1e-5,
    )


def llama2_13b(max_seq_len: int = 4096) -> TransformerDecoder:
    """Llama2 13B: 40 layers, 40 heads, dim 5120, SwiGLU width 13824, vocab 32000."""
    return llama2(
        vocab_size=32_000,
        num_layers=40,
        num_heads=40,
        num_kv_heads=40,
        embed_dim=5120,
        intermediate_dim=13824,
        max_seq_len=max_seq_len,
        norm_eps=1e-5,
    )


def llama2_70b(max_seq_len: int = 4096) -> TransformerDecoder:
    """Llama2 70B: 80 layers, 64 query heads, 8 KV heads (GQA), dim 8192, width 28672."""
    return llama2(
        vocab_size=32_000,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        embed_dim=8192,
        intermediate_dim=28672,
        max_seq_len=max_seq_len,
        norm_eps=1e-5,
    )


def lora_llama2_7b(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    max_seq_len: int = 4096,
    *,
    use_dora: bool = False,
    quantize_base: bool = False,
    quantize_double: bool = True,
) -> TransformerDecoder:
    """Llama2 7B with LoRA adapters; see :func:`lora_llama2` for the arguments."""
    return lora_llama2(
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        vocab_size=32_000,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        embed_dim=4096,
        max_seq_len=max_seq_len,
        norm_eps=1e-5,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        quantize_double=quantize_double,
    )


def lora_llama2_13b(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    max_seq_len: int = 4096,
    *,
    use_dora: bool = False,
    quantize_base: bool = False,
    quantize_double: bool = True,
) -> TransformerDecoder:
    """Llama2 13B with LoRA adapters; see :func:`lora_llama2` for the arguments."""
    return lora_llama2(
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        vocab_size=32_000,
        num_layers=40,
        num_heads=40,
        num_kv_heads=40,
        embed_dim=5120,
        intermediate_dim=13824,
        max_seq_len=max_seq_len,
        norm_eps=1e-5,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        quantize_double=quantize_double,
    )
