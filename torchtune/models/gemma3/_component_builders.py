# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Gemma 3's text decoder (and LoRA) as knobs of the shared
:func:`~torchtune.models._decoder.decoder`.

What makes it Gemma 3 (text): Gemma 2's layer (zero-centred fp32 RMSNorm, scaled embeddings,
GeGLU, sandwich norms, ``query_pre_attn_scalar``, tied embeddings) plus a per-head
RMSNorm on queries and keys before RoPE, and a different rotary embedding on local
(sliding-window) and global layers: base ``rope_local_base`` (1e4) on the local ones,
``rope_base`` (1e6) with an optional linear ``rope_scaling`` on the global ones. Five local
layers to each global one; no soft-capping of the attention logits.
"""

from functools import partial
from typing import Any, Collection, Dict, List, Optional, Sequence, Union

from torchtune.models._decoder import decoder, lora_module_names
from torchtune.models.gemma2._component_builders import gelu_tanh
from torchtune.modules import RotaryPositionalEmbeddings, TransformerDecoder
from torchtune.modules.rms_norm import GemmaRMSNorm

Windows = Union[None, int, Sequence[Optional[int]]]


def _gemma3(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    head_dim: int = 256,
    attn_dropout: float = 0.0,
    norm_eps: float = 1e-6,
    rope_base: float = 1_000_000.0,
    rope_scaling: Optional[Dict[str, Any]] = None,
    rope_local_base: float = 10_000.0,
    rope_local_scaling: Optional[Dict[str, Any]] = None,
    query_pre_attn_scalar: float = 256.0,
    final_softcap: Optional[float] = None,
    sliding_window: Windows = None,
    attn_bias: bool = False,
    tie_word_embeddings: bool = True,
    padding_idx: Optional[int] = 0,
    lora_modules: Collection[str] = (),
    lora_rank: int = 0,
    lora_alpha: float = 0.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    quantize_double: bool = True,
) -> TransformerDecoder:
    windows = (
        [sliding_window] * num_layers
        if sliding_window is None or isinstance(sliding_window, int)
        else list(sliding_window)
    )
    local = partial(RotaryPositionalEmbeddings, base=rope_local_base, scaling=rope_local_scaling)
    global_ = partial(RotaryPositionalEmbeddings, base=rope_base, scaling=rope_scaling)
    return decoder(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        intermediate_dim=intermediate_dim,
        max_seq_len=max_seq_len,
        head_dim=head_dim,
        attn_bias=attn_bias,
        output_proj_bias=attn_bias,
        attn_dropout=attn_dropout,
        norm=partial(GemmaRMSNorm, eps=norm_eps),
        mlp_activation=gelu_tanh,
        # A layer's window makes it local: transformers keys both on its layer type.
        rope=[global_ if w is None else local for w in windows],
        tie_word_embeddings=tie_word_embeddings,
        qk_norm=True,
        sliding_window=windows,
        attn_scale=float(query_pre_attn_scalar) ** -0.5,
        output_softcap=final_softcap,
        embed_scale=embed_dim**0.5,
        padding_idx=padding_idx,
        post_norms=True,
        lora_modules=lora_modules,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        quantize_double=quantize_double,
    )


def gemma3(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    head_dim: int = 256,
    attn_dropout: float = 0.0,
    norm_eps: float = 1e-6,
    rope_base: float = 1_000_000.0,
    rope_scaling: Optional[Dict[str, Any]] = None,
    rope_local_base: float = 10_000.0,
    rope_local_scaling: Optional[Dict[str, Any]] = None,
    query_pre_attn_scalar: float = 256.0,
    final_softcap: Optional[float] = None,
    sliding_window: Windows = None,
    attn_bias: bool = False,
    tie_word_embeddings: bool = True,
    padding_idx: Optional[int] = 0,
) -> TransformerDecoder:
    """A Gemma 3 text decoder (``Gemma3ForCausalLM``; the language model of the larger,
    multimodal sizes).

    Args:
        vocab_size: number of tokens.
        num_layers: decoder layers.
        num_heads: query heads.
        num_kv_heads: key/value heads (GQA).
        embed_dim: model dimension (the embeddings are scaled by its square root).
        intermediate_dim: GeGLU width.
        max_seq_len: longest sequence (RoPE table and KV cache length).
        head_dim: per-head dimension.
        attn_dropout: attention dropout (training only).
        norm_eps: RMSNorm epsilon (also of the q/k norms).
        rope_base: RoPE base of the global layers (``rope_theta``).
        rope_scaling: their frequency rescaling (``{"rope_type": "linear", "factor": 8.0}``
            in 4B and up), or None.
        rope_local_base: RoPE base of the local layers (``rope_local_base_freq``).
        rope_local_scaling: their rescaling, or None (as released).
        query_pre_attn_scalar: attention logits are scaled by its ``** -0.5``.
        final_softcap: tanh cap on the output logits (``final_logit_softcapping``, None as
            released).
        sliding_window: keys a query sees, per layer (a list of ``num_layers`` ints or None,
            e.g. ``alternating_windows(n, 512, period=6)``) or in every layer (an int);
            windowed layers are the local ones.
        attn_bias: biases on q/k/v and output_proj (HF's ``attention_bias``).
        tie_word_embeddings: output projection shares the embedding's Parameter.
        padding_idx: the embedding row that gets no gradient through the lookup
            (``pad_token_id``); None: none.

    Returns:
        A :class:`TransformerDecoder` with PyTorch's default init (norm scales 0: unit gain).

    Raises:
        ValueError: if the head counts do not divide evenly, the window list is the wrong
            length or a rope scaling is not implemented.
    """
    return _gemma3(**locals())


def lora_gemma3(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    *,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    quantize_double: bool = True,
    **gemma3_kwargs,
) -> TransformerDecoder:
    """Gemma 3 with :class:`LoRALinear` in place of the chosen projections.

    Args:
        lora_attn_modules: attention projections to adapt, any of
            ``"q_proj", "k_proj", "v_proj", "output_proj"``.
        apply_lora_to_mlp: also adapt ``w1``, ``w2``, ``w3``.
        apply_lora_to_output: also adapt the final ``output`` projection.
        lora_rank: adapter rank.
        lora_alpha: adapter alpha (update scaled by ``alpha / rank``).
        lora_dropout: dropout on the adapters' input.
        use_dora: learn a magnitude per output feature (DoRA, see :class:`LoRALinear`).
        quantize_base: store the decoder layers' frozen linear weights in NF4 (QLoRA);
            embeddings, norms and the output projection stay in the model dtype.
        quantize_double: with ``quantize_base``, also quantize the NF4 block scales.
        **gemma3_kwargs: the keyword arguments of :func:`gemma3`.

    Returns:
        A :class:`TransformerDecoder`.

    Raises:
        ValueError: on an unknown entry in ``lora_attn_modules`` or when nothing is adapted.
    """
    modules = lora_module_names(
        lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, "lora_gemma3"
    )
    return _gemma3(
        **gemma3_kwargs,
        lora_modules=modules,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        quantize_double=quantize_double,
    )
