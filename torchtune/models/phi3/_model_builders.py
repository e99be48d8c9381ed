# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Published Phi-3 / Phi-4 sizes and their LoRA variants.

The numbers are those of the hub's ``config.json`` files as recalled here, not re-read (the
hub is unreachable from this machine): Phi-3 mini 4k (``microsoft/Phi-3-mini-4k-instruct``),
Phi-3.5 mini (``microsoft/Phi-3.5-mini-instruct``), Phi-4 mini
(``microsoft/Phi-4-mini-instruct``) and Phi-4 (``microsoft/phi-4``). Their parameter counts
(3.82B, 3.82B, 3.84B, 14.66B) match the model cards. Unverified: the sliding windows
(2047 for Phi-3 mini 4k, 262144 for Phi-3.5 / Phi-4 mini) and ``pad_token_id`` values. The
LongRoPE factor lists (48 + 48 numbers per model) are not reproduced: the Phi-3.5 / Phi-4
mini presets take them from the checkpoint's ``config.json`` (``rope_scaling``), and
``torchtune.models.from_hf_config(<checkpoint dir>)`` reads everything from there instead.
"""

from typing import List, Sequence

from torchtune.models.phi3._component_builders import lora_phi3, phi3
from torchtune.modules import TransformerDecoder
from torchtune.modules.position_embeddings import longrope_attention_factor


def _phi3_mini_4k() -> dict:
    return dict(
        vocab_size=32_064,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        embed_dim=3072,
        intermediate_dim=8192,
        norm_eps=1e-5,
        rope_base=10_000.0,
        sliding_window=2047,
        padding_idx=32_000,
    )


def _longrope(short_factor: Sequence[float], long_factor: Sequence[float]) -> dict:
    # 131072 positions over the original 4096: attention factor sqrt(1 + ln 32 / ln 4096).
    return dict(
        short_factor=list(short_factor),
        long_factor=list(long_factor),
        original_max_position_embeddings=4096,
        attention_factor=longrope_attention_factor(131_072 / 4096, 4096),
    )


def _phi3_5_mini(short_factor: Sequence[float], long_factor: Sequence[float]) -> dict:
    return dict(
        vocab_size=32_064,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        embed_dim=3072,
        intermediate_dim=8192,
        norm_eps=1e-5,
        rope_base=10_000.0,
        longrope=_longrope(short_factor, long_factor),
        sliding_window=262_144,
        padding_idx=32_000,
    )


def _phi4_mini(short_factor: Sequence[float], long_factor: Sequence[float]) -> dict:
    return dict(
        vocab_size=200_064,
        num_layers=32,
        num_heads=24,
        num_kv_heads=8,
        embed_dim=3072,
        intermediate_dim=8192,
        norm_eps=1e-5,
        rope_base=10_000.0,
        rotary_dim=96,  # partial_rotary_factor 0.75 of head_dim 128
        longrope=_longrope(short_factor, long_factor),
        tie_word_embeddings=True,
        sliding_window=262_144,
        padding_idx=199_999,
    )


def _phi4() -> dict:
    return dict(
        vocab_size=100_352,
        num_layers=40,
        num_heads=40,
        num_kv_heads=10,
        embed_dim=5120,
        intermediate_dim=17920,
        norm_eps=1e-5,
        rope_base=250_000.0,
        padding_idx=100_349,
    )


def phi3_mini_4k(max_seq_len: int = 4096) -> TransformerDecoder:
    """Phi-3 mini 4k: 32 layers, 32 heads (MHA), dim 3072, width 8192, window 2047, untied."""
    return phi3(**_phi3_mini_4k(), max_seq_len=max_seq_len)


def phi3_5_mini(
    *, short_factor: Sequence[float], long_factor: Sequence[float], max_seq_len: int = 131_072
) -> TransformerDecoder:
    """Phi-3.5 mini: Phi-3 mini's sizes with LongRoPE to 131072 positions (window 262144).

    Args:
        short_factor, long_factor: the 48 + 48 numbers of the checkpoint's ``rope_scaling``.
        max_seq_len: longest sequence.
    """
    return phi3(**_phi3_5_mini(short_factor, long_factor), max_seq_len=max_seq_len)


def phi4_mini(
    *, short_factor: Sequence[float], long_factor: Sequence[float], max_seq_len: int = 131_072
) -> TransformerDecoder:
    """Phi-4 mini: 32 layers, 24 heads / 8 KV heads, dim 3072, width 8192, RoPE on 96 of 128
    channels with LongRoPE, vocab 200064, tied.

    Args:
        short_factor, long_factor: the 48 + 48 numbers of the checkpoint's ``rope_scaling``.
        max_seq_len: longest sequence.
    """
    return phi3(**_phi4_mini(short_factor, long_factor), max_seq_len=max_seq_len)


def phi4(max_seq_len: int = 16_384) -> TransformerDecoder:
    """Phi-4 (14B): 40 layers, 40 heads / 10 KV heads, dim 5120, width 17920, base 250000."""
    return phi3(**_phi4(), max_seq_len=max_seq_len)


def lora_phi3_mini_4k(
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
    """:func:`phi3_mini_4k` with LoRA; see :func:`lora_phi3` for the arguments."""
    return lora_phi3(
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        **_phi3_mini_4k(),
        max_seq_len=max_seq_len,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        quantize_double=quantize_double,
    )


def lora_phi3_5_mini(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    *,
    short_factor: Sequence[float],
    long_factor: Sequence[float],
    max_seq_len: int = 131_072,
    use_dora: bool = False,
    quantize_base: bool = False,
    quantize_double: bool = True,
) -> TransformerDecoder:
    """:func:`phi3_5_mini` with LoRA; see :func:`lora_phi3` for the arguments."""
    return lora_phi3(
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        **_phi3_5_mini(short_factor, long_factor),
        max_seq_len=max_seq_len,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        quantize_double=quantize_double,
    )


def lora_phi4_mini(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    *,
    short_factor: Sequence[float],
    long_factor: Sequence[float],
    max_seq_len: int = 131_072,
    use_dora: bool = False,
    quantize_base: bool = False,
    quantize_double: bool = True,
) -> TransformerDecoder:
    """:func:`phi4_mini` with LoRA; see :func:`lora_phi3` for the arguments."""
    return lora_phi3(
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        **_phi4_mini(short_factor, long_factor),
        max_seq_len=max_seq_len,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        quantize_double=quantize_double,
    )


def lora_phi4(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    max_seq_len: int = 16_384,
    *,
    use_dora: bool = False,
    quantize_base: bool = False,
    quantize_double: bool = True,
) -> TransformerDecoder:
    """:func:`phi4` with LoRA; see :func:`lora_phi3` for the arguments."""
    return lora_phi3(
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        **_phi4(),
        max_seq_len=max_seq_len,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        quantize_double=quantize_double,
    )
