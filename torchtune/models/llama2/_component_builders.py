# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Llama2 (and its LoRA variant) as knobs of the shared :func:`~torchtune.models._decoder.decoder`.

What makes it Llama: RMSNorm, SwiGLU (SiLU gate) with Llama's width rule, RoPE, no biases and
an untied output unless the config says otherwise (HF's ``attention_bias``, ``mlp_bias``,
``head_dim``, ``tie_word_embeddings``, ``rope_scaling``). These builders cover every HF
``model_type: llama`` checkpoint: Llama 2, Llama 3 / 3.1 / 3.2 / 3.3 (GQA, ``rope_theta``
500000, the ``llama3`` RoPE scaling, tied embeddings at 1B / 3B), SmolLM / SmolLM2, TinyLlama.
"""

from functools import partial
from typing import Any, Dict, List, Optional

from torchtune.models._decoder import decoder, lora_module_names
from torchtune.modules import RotaryPositionalEmbeddings, TransformerDecoder


def scale_hidden_dim_for_mlp(dim: int, multiple_of: int = 256) -> int:
    """Llama's SwiGLU width: ``int(2 * 4 * dim / 3)`` rounded up to ``multiple_of``."""
    hidden_dim = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


def llama2(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    max_seq_len: int,
    intermediate_dim: Optional[int] = None,
    attn_dropout: float = 0.0,
    norm_eps: float = 1e-5,
    rope_base: float = 10_000.0,
    head_dim: Optional[int] = None,
    attn_bias: bool = False,
    mlp_bias: bool = False,
    rope_scaling: Optional[Dict[str, Any]] = None,
    tie_word_embeddings: bool = False,
) -> TransformerDecoder:
    """A Llama2 decoder.

    Args:
        vocab_size: number of tokens.
        num_layers: decoder layers.
        num_heads: query heads.
        num_kv_heads: key/value heads (``num_heads`` for MHA, fewer for GQA, 1 for MQA;
            None means ``num_heads``).
        embed_dim: model dimension.
        max_seq_len: longest sequence (RoPE table and KV cache length).
        intermediate_dim: SwiGLU width; Llama's rule from ``embed_dim`` when None.
        attn_dropout: attention dropout (training only).
        norm_eps: RMSNorm epsilon.
        rope_base: RoPE base (``rope_theta``).
        head_dim: per-head dimension; ``embed_dim // num_heads`` when None.
        attn_bias: biases on q/k/v and output_proj (HF's ``attention_bias``).
        mlp_bias: biases on w1, w2, w3 (HF's ``mlp_bias``).
        rope_scaling: None, or ``{"rope_type": "linear", "factor"}`` or ``{"rope_type":
            "llama3", "factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings"}`` (see
            :func:`torchtune.modules.position_embeddings.rope_inv_freq`).
        tie_word_embeddings: output projection shares the embedding's Parameter.

    Returns:
        A :class:`TransformerDecoder` with PyTorch's default init; load a checkpoint, or call
        :func:`torchtune.modules.init_weights_` to train from scratch.

    Raises:
        ValueError: if the head counts do not divide evenly or ``rope_scaling`` is not
            implemented.
    """
    return decoder(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        intermediate_dim=intermediate_dim or scale_hidden_dim_for_mlp(embed_dim),
        max_seq_len=max_seq_len,
        head_dim=head_dim,
        attn_bias=attn_bias,
        output_proj_bias=attn_bias,
        mlp_bias=mlp_bias,
        attn_dropout=attn_dropout,
        norm_eps=norm_eps,
        rope=partial(RotaryPositionalEmbeddings, base=rope_base, scaling=rope_scaling),
        tie_word_embeddings=tie_word_embeddings,
    )


def lora_llama2(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    max_seq_len: int,
    intermediate_dim: Optional[int] = None,
    attn_dropout: float = 0.0,
    norm_eps: float = 1e-5,
    rope_base: float = 10_000.0,
    head_dim: Optional[int] = None,
    attn_bias: bool = False,
    mlp_bias: bool = False,
    rope_scaling: Optional[Dict[str, Any]] = None,
    tie_word_embeddings: bool = False,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    quantize_double: bool = True,
) -> TransformerDecoder:
    """Llama2 with :class:`LoRALinear` in place of the chosen projections.

    The state dict is the base model's plus ``<proj>.lora_a.weight``/``<proj>.lora_b.weight``
    for each adapted projection.

    Args:
        lora_attn_modules: attention projections to adapt, any of
            ``"q_proj", "k_proj", "v_proj", "output_proj"``.
        apply_lora_to_mlp: also adapt ``w1``, ``w2``, ``w3``.
        apply_lora_to_output: also adapt the final ``output`` projection.
        vocab_size, num_layers, num_heads, num_kv_heads, embed_dim, max_seq_len,
            intermediate_dim, attn_dropout, norm_eps, rope_base, head_dim, attn_bias,
            mlp_bias, rope_scaling, tie_word_embeddings: as in :func:`llama2`.
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
    modules = lora_module_names(
        lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, "lora_llama2"
    )
    return decoder(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        intermediate_dim=intermediate_dim or scale_hidden_dim_for_mlp(embed_dim),
        max_seq_len=max_seq_len,
        head_dim=head_dim,
        attn_bias=attn_bias,
        output_proj_bias=attn_bias,
        mlp_bias=mlp_bias,
        attn_dropout=attn_dropout,
        norm_eps=norm_eps,
        rope=partial(RotaryPositionalEmbeddings, base=rope_base, scaling=rope_scaling),
        tie_word_embeddings=tie_word_embeddings,
        lora_modules=modules,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        quantize_double=quantize_double,
    )
