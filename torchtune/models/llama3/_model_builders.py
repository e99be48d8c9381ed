# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Published Llama 3.1 / 3.2 and SmolLM2 sizes (HF ``model_type: llama``) and LoRA variants.

They are the Llama family's builders (:func:`~torchtune.models.llama2.llama2`) with the
numbers of each model's ``config.json``. ``max_seq_len`` defaults to 8192, not the 131072
the Llama configs allow: every layer holds a fp32 cos/sin table of that length (131072 x
head_dim x 4 bytes, 64 MiB a layer at head_dim 128). The frequencies, scaling included, do
not depend on it, so a longer ``max_seq_len`` only extends the table.
"""

from typing import Any, Dict, List

from torchtune.models.llama2._component_builders import llama2, lora_llama2
from torchtune.modules import TransformerDecoder

# Llama 3.1 / 3.2's scaling, pretrained at 8192 positions; the factor differs by size.
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

LLAMA3_1_8B: Dict[str, Any] = dict(
    vocab_size=128_256,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    embed_dim=4096,
    intermediate_dim=14_336,
    norm_eps=1e-5,
    rope_base=500_000.0,
    rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
)
LLAMA3_2_1B: Dict[str, Any] = dict(
    vocab_size=128_256,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    embed_dim=2048,
    intermediate_dim=8192,
    head_dim=64,
    norm_eps=1e-5,
    rope_base=500_000.0,
    rope_scaling={**_LLAMA3_ROPE, "factor": 32.0},
    tie_word_embeddings=True,
)
LLAMA3_2_3B: Dict[str, Any] = dict(
    vocab_size=128_256,
    num_layers=28,
    num_heads=24,
    num_kv_heads=8,
    embed_dim=3072,
    intermediate_dim=8192,
    head_dim=128,
    norm_eps=1e-5,
    rope_base=500_000.0,
    rope_scaling={**_LLAMA3_ROPE, "factor": 32.0},
    tie_word_embeddings=True,
)
SMOLLM2_135M: Dict[str, Any] = dict(
    vocab_size=49_152,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    embed_dim=576,
    intermediate_dim=1536,
    norm_eps=1e-5,
    rope_base=100_000.0,
    tie_word_embeddings=True,
)
SMOLLM2_1_7B: Dict[str, Any] = dict(
    vocab_size=49_152,
    num_layers=24,
    num_heads=32,
    num_kv_heads=32,
    embed_dim=2048,
    intermediate_dim=8192,
    norm_eps=1e-5,
    rope_base=130_000.0,
    tie_word_embeddings=True,
)


def llama3_1_8b(max_seq_len: int = 8192) -> TransformerDecoder:
    """Llama 3.1 8B: 32 layers, 32 query / 8 KV heads, dim 4096, width 14336, llama3 RoPE x8."""
    return llama2(**LLAMA3_1_8B, max_seq_len=max_seq_len)


def llama3_2_1b(max_seq_len: int = 8192) -> TransformerDecoder:
    """Llama 3.2 1B: 16 layers, 32 / 8 heads of 64, dim 2048, width 8192, x32, tied."""
    return llama2(**LLAMA3_2_1B, max_seq_len=max_seq_len)


def llama3_2_3b(max_seq_len: int = 8192) -> TransformerDecoder:
    """Llama 3.2 3B: 28 layers, 24 / 8 heads of 128, dim 3072, width 8192, x32, tied."""
    return llama2(**LLAMA3_2_3B, max_seq_len=max_seq_len)


def smollm2_135m(max_seq_len: int = 8192) -> TransformerDecoder:
    """SmolLM2 135M: 30 layers, 9 / 3 heads of 64, dim 576, width 1536, theta 1e5, tied."""
    return llama2(**SMOLLM2_135M, max_seq_len=max_seq_len)


def smollm2_1_7b(max_seq_len: int = 8192) -> TransformerDecoder:
    """SmolLM2 1.7B: 24 layers, 32 heads of 64 (MHA), dim 2048, width 8192, theta 1.3e5, tied."""
    return llama2(**SMOLLM2_1_7B, max_seq_len=max_seq_len)


def lora_llama3_1_8b(
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
    """:func:`llama3_1_8b` with LoRA adapters; see :func:`lora_llama2` for the arguments."""
    return lora_llama2(
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        **LLAMA3_1_8B,
        max_seq_len=max_seq_len,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        quantize_double=quantize_double,
    )


def lora_llama3_2_1b(
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
    """:func:`llama3_2_1b` with LoRA adapters; see :func:`lora_llama2` for the arguments."""
    return lora_llama2(
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        **LLAMA3_2_1B,
        max_seq_len=max_seq_len,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        quantize_double=quantize_double,
    )


def lora_llama3_2_3b(
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
    """:func:`llama3_2_3b` with LoRA adapters; see :func:`lora_llama2` for the arguments."""
    return lora_llama2(
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        **LLAMA3_2_3B,
        max_seq_len=max_seq_len,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        quantize_double=quantize_double,
    )


def lora_smollm2_135m(
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
    """:func:`smollm2_135m` with LoRA adapters; see :func:`lora_llama2` for the arguments."""
    return lora_llama2(
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        **SMOLLM2_135M,
        max_seq_len=max_seq_len,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        quantize_double=quantize_double,
    )


def lora_smollm2_1_7b(
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
    """:func:`smollm2_1_7b` with LoRA adapters; see :func:`lora_llama2` for the arguments."""
    return lora_llama2(
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        **SMOLLM2_1_7B,
        max_seq_len=max_seq_len,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        quantize_double=quantize_double,
    )
