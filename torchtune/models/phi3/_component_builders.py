# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Phi-3 / Phi-4 (and LoRA) as knobs of the shared :func:`~torchtune.models._decoder.decoder`.

What makes it Phi-3: Llama's layer with q/k/v fused into one ``qkv_proj`` and the MLP's gate
and up into one ``w13`` (HF's ``gate_up_proj``), no biases, RoPE on the first
``rotary_dim`` channels of each head (Phi-4 mini: 96 of 128), optionally LongRoPE (Phi-3.5
mini, Phi-4 mini), a sliding window over every layer when ``sliding_window`` is set (Phi-3
mini 4k: 2047), and tied embeddings where the config says so (Phi-4 mini).

LoRA on a fused projection is one adapter, as PEFT puts it on ``qkv_proj``: one ``lora_a``
``[r, embed_dim]`` and one ``lora_b`` ``[(n_h + 2 n_kv) h_d, r]``, i.e. a rank-``r`` update of
q, k and v together (their updates share one ``r``-dimensional input subspace, where three
separate rank-``r`` adapters would have three). q, k or v alone cannot be adapted: an adapter
on part of a fused module is not expressible in PEFT's format. The same holds for ``w13``
(gate and up together).
"""

from functools import partial
from typing import Any, Dict, List, Optional

from torchtune.models._decoder import decoder
from torchtune.modules import TransformerDecoder
from torchtune.modules.position_embeddings import PartialRotaryPositionalEmbeddings

LORA_ATTN_MODULES = ("qkv_proj", "output_proj")


def _rope(base: float, rotary_dim: Optional[int], longrope: Optional[Dict[str, Any]]):
    """``rope(head_dim, max_seq_len)`` for the decoder: partial rotary, LongRoPE when set."""
    return partial(
        PartialRotaryPositionalEmbeddings, base=base, rotary_dim=rotary_dim, longrope=longrope
    )


def phi3(
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
    rotary_dim: Optional[int] = None,
    longrope: Optional[Dict[str, Any]] = None,
    tie_word_embeddings: bool = False,
    sliding_window: Optional[int] = None,
    padding_idx: Optional[int] = None,
) -> TransformerDecoder:
    """A Phi-3 / Phi-4 decoder.

    Args:
        vocab_size: number of tokens.
        num_layers: decoder layers.
        num_heads: query heads.
        num_kv_heads: key/value heads (GQA).
        embed_dim: model dimension.
        intermediate_dim: SwiGLU width (``w13`` projects to twice this).
        max_seq_len: longest sequence (RoPE tables and KV cache length).
        attn_dropout: attention dropout (training only).
        norm_eps: RMSNorm epsilon.
        rope_base: RoPE base (``rope_theta``).
        head_dim: per-head dimension; ``embed_dim // num_heads`` when None.
        rotary_dim: channels of each head that rotate (``head_dim * partial_rotary_factor``);
            all when None.
        longrope: LongRoPE's ``short_factor``, ``long_factor``,
            ``original_max_position_embeddings`` and ``attention_factor`` (see
            :class:`~torchtune.modules.position_embeddings.PartialRotaryPositionalEmbeddings`),
            or None for plain RoPE.
        tie_word_embeddings: output projection shares the embedding's Parameter.
        sliding_window: keys a query sees in every layer; None: full causal attention.
        padding_idx: embedding row without gradient (HF's ``pad_token_id``).

    Returns:
        A :class:`TransformerDecoder` with PyTorch's default init.

    Raises:
        ValueError: if the head counts do not divide evenly, or ``rotary_dim`` /
            ``longrope`` are inconsistent.
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
        rope=_rope(rope_base, rotary_dim, longrope),
        tie_word_embeddings=tie_word_embeddings,
        sliding_window=sliding_window,
        fused_qkv=True,
        fused_gate_up=True,
        padding_idx=padding_idx,
    )


def lora_phi3(
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
    rotary_dim: Optional[int] = None,
    longrope: Optional[Dict[str, Any]] = None,
    tie_word_embeddings: bool = False,
    sliding_window: Optional[int] = None,
    padding_idx: Optional[int] = None,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    quantize_double: bool = True,
) -> TransformerDecoder:
    """Phi-3 with :class:`LoRALinear` in place of the chosen projections.

    Args:
        lora_attn_modules: attention projections to adapt, any of ``"qkv_proj"`` (one
            adapter over q, k and v: PEFT's ``qkv_proj``) and ``"output_proj"``.
        apply_lora_to_mlp: also adapt ``w13`` (gate and up, PEFT's ``gate_up_proj``) and
            ``w2`` (``down_proj``).
        apply_lora_to_output: also adapt the final ``output`` projection.
        vocab_size, num_layers, num_heads, num_kv_heads, embed_dim, intermediate_dim,
            max_seq_len, attn_dropout, norm_eps, rope_base, head_dim, rotary_dim, longrope,
            tie_word_embeddings, sliding_window, padding_idx: as in :func:`phi3`.
        lora_rank: adapter rank (of the fused update, for ``qkv_proj`` and ``w13``).
        lora_alpha: adapter alpha (update scaled by ``alpha / rank``).
        lora_dropout: dropout on the adapters' input.
        use_dora: learn a magnitude per output feature (DoRA, see :class:`LoRALinear`).
        quantize_base: store the decoder layers' frozen linear weights in NF4 (QLoRA);
            embeddings, norms and the output projection stay in the model dtype.
        quantize_double: with ``quantize_base``, also quantize the NF4 block scales.

    Returns:
        A :class:`TransformerDecoder`.

    Raises:
        ValueError: on ``q_proj`` / ``k_proj`` / ``v_proj`` (fused here: use ``qkv_proj``),
            another unknown entry in ``lora_attn_modules``, or when nothing is adapted.
    """
    split = [m for m in lora_attn_modules if m in ("q_proj", "k_proj", "v_proj")]
    if split:
        raise ValueError(
            f"lora_attn_modules {split}: Phi-3 fuses q, k and v into one projection; adapt it "
            "with 'qkv_proj' (one rank-r adapter over all three, as PEFT's target 'qkv_proj')"
        )
    unknown = [m for m in lora_attn_modules if m not in LORA_ATTN_MODULES]
    if unknown:
        raise ValueError(
            f"Unknown lora_attn_modules {unknown}; expected a subset of {list(LORA_ATTN_MODULES)}"
        )
    modules = set(lora_attn_modules)
    if apply_lora_to_mlp:
        modules |= {"w13", "w2"}
    if apply_lora_to_output:
        modules.add("output")
    if not modules:
        raise ValueError(
            "lora_phi3 adapts nothing: give lora_attn_modules or set apply_lora_to_mlp / "
            "apply_lora_to_output"
        )
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
        rope=_rope(rope_base, rotary_dim, longrope),
        tie_word_embeddings=tie_word_embeddings,
        sliding_window=sliding_window,
        fused_qkv=True,
        fused_gate_up=True,
        padding_idx=padding_idx,
        lora_modules=modules,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        quantize_double=quantize_double,
    )
