# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Mistral (and LoRA) as knobs of the shared :func:`~torchtune.models._decoder.decoder`.

What makes it Mistral: Llama's layer with GQA, no biases, an explicit ``head_dim`` (Nemo:
128 in a 5120-wide model) and a sliding window over every layer when ``sliding_window`` is
set (7B v0.1: 4096; v0.2 / v0.3 and Nemo: none).
"""

from typing import List, Optional

from torchtune.models._decoder import decoder, lora_module_names
from torchtune.modules import TransformerDecoder


def mistral(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    attn_dropout: float = 0.0,
    norm_eps: float = 1e-5,
    rope_base: float = 10_000.0,
    head_dim: Optional[int] = None,
    tie_word_embeddings: bool = False,
    sliding_window: Optional[int] = None,
) -> TransformerDecoder:
    """A Mistral decoder.

    Args:
        vocab_size: number of tokens.
        num_layers: decoder layers.
        num_heads: query heads.
        num_kv_heads: key/value heads (GQA).
        embed_dim: model dimension.
        intermediate_dim: SwiGLU width.
        max_seq_len: longest sequence (RoPE table and KV cache length).
        attn_dropout: attention dropout (training only).
        norm_eps: RMSNorm epsilon.
        rope_base: RoPE base (``rope_theta``).
        head_dim: per-head dimension; ``embed_dim // num_heads`` when None.
        tie_word_embeddings: output projection shares the embedding's Parameter.
        sliding_window: keys a query sees in every layer; None: full causal attention.

    Returns:
        A :class:`TransformerDecoder` with PyTorch's default init.

    Raises:
        ValueError: if the head counts do not divide evenly.
    """
    return decoder(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        intermediate_dim=intermediate_dim,
        max_seq_len=max_seq_len,
        head_dim=head_dim,
        attn_dropout=attn_dropout,
        norm_eps=norm_eps,
        rope_base=rope_base,
        tie_word_embeddings=tie_word_embeddings,
        sliding_window=sliding_window,
    )


def lora_mistral(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    attn_dropout: float = 0.0,
    norm_eps: float = 1e-5,
    rope_base: float = 10_000.0,
    head_dim: Optional[int] = None,
    tie_word_embeddings: bool = False,
    sliding_window: Optional[int] = None,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    quantize_double: bool = True,
) -> TransformerDecoder:
    """Mistral with :class:`LoRALinear` in place of the chosen projections.

    Args:
        lora_attn_modules: attention projections to adapt, any of
            ``"q_proj", "k_proj", "v_proj", "output_proj"``.
        apply_lora_to_mlp: also adapt ``w1``, ``w2``, ``w3``.
        apply_lora_to_output: also adapt the final ``output`` projection.
        vocab_size, num_layers, num_heads, num_kv_heads, embed_dim, intermediate_dim,
            max_seq_len, attn_dropout, norm_eps, rope_base, head_dim, tie_word_embeddings,
            sliding_window: as in :func:`mistral`.
        lora_rank: adapter rank.
        lora_alpha: adapter alpha (update scaled by ``alpha / rank``).
        lora_dropout: dropout on the adapters' input.
        use_dora: learn a magnitude per output feature (DoRA, see :class:`LoRALinear`).
        quantize_base: store the decoder layers' frozen linear weights in NF4 (QLoRA);
            embeddings, norms and the output projection stay in the model dtype.
        quantize_double: with ``quantize_base``, also quantize the NF4 block scales.

    Returns:
        A :class:`TransformerDecoder`.

    Raises:
        ValueError: on an unknown entry in ``lora_attn_modules`` or when nothing is adapted.
    """
    return decoder(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        intermediate_dim=intermediate_dim,
        max_seq_len=max_seq_len,
        head_dim=head_dim,
        attn_dropout=attn_dropout,
        norm_eps=norm_eps,
        rope_base=rope_base,
        tie_word_embeddings=tie_word_embeddings,
        sliding_window=sliding_window,
        lora_modules=lora_module_names(
            lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, "lora_mistral"
        ),
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        quantize_double=quantize_double,
    )
