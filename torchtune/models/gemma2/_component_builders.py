# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Gemma 2 (and LoRA) as knobs of the shared :func:`~torchtune.models._decoder.decoder`.

What makes it Gemma 2: RMSNorm with a zero-centred ``(1 + scale)`` gain in fp32
(:class:`~torchtune.modules.rms_norm.GemmaRMSNorm`), embeddings times ``sqrt(embed_dim)``
(rounded to the model's dtype), GeGLU with tanh-approximated GELU, a second norm after both
attention and the MLP ("sandwich" norms), attention logits scaled by
``query_pre_attn_scalar ** -0.5`` and soft-capped (``attn_softcap * tanh(x / attn_softcap)``),
final logits soft-capped likewise, sliding-window (local) layers alternating with global ones
(layer 0 local), and tied embeddings.

The capped attention cannot run on SDPA's fused kernels: every layer takes the exact eager
path (:func:`~torchtune.modules.attention.softcapped_attention`, as transformers' Gemma 2
does), which holds a ``[b, n_h, s, s]`` score tensor per layer (per document when packed).
``attn_softcap=None`` puts it back on SDPA, at the cost of no longer being Gemma 2.
"""

from functools import partial
from typing import Collection, List, Optional, Sequence, Union

import torch.nn.functional as F

from torchtune.models._decoder import decoder, lora_module_names
from torchtune.modules import TransformerDecoder
from torchtune.modules.rms_norm import GemmaRMSNorm

Windows = Union[None, int, Sequence[Optional[int]]]

# transformers' "gelu_pytorch_tanh".
gelu_tanh = partial(F.gelu, approximate="tanh")


def alternating_windows(num_layers: int, window: int, period: int = 2) -> List[Optional[int]]:
    """Per-layer windows of Gemma's pattern: every ``period``-th layer (the last of each group)
    is global (None), the others local (``window``); Gemma 2 has period 2, Gemma 3 period 6."""
    return [None if (i + 1) % period == 0 else window for i in range(num_layers)]


def _gemma2(
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
    rope_base: float = 10_000.0,
    query_pre_attn_scalar: float = 256.0,
    attn_softcap: Optional[float] = 50.0,
    final_softcap: Optional[float] = 30.0,
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
        rope_base=rope_base,
        tie_word_embeddings=tie_word_embeddings,
        sliding_window=sliding_window,
        attn_scale=float(query_pre_attn_scalar) ** -0.5,
        attn_softcap=attn_softcap,
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


def gemma2(
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
    rope_base: float = 10_000.0,
    query_pre_attn_scalar: float = 256.0,
    attn_softcap: Optional[float] = 50.0,
    final_softcap: Optional[float] = 30.0,
    sliding_window: Windows = None,
    attn_bias: bool = False,
    tie_word_embeddings: bool = True,
    padding_idx: Optional[int] = 0,
) -> TransformerDecoder:
    """A Gemma 2 decoder.

    Args:
        vocab_size: number of tokens.
        num_layers: decoder layers.
        num_heads: query heads.
        num_kv_heads: key/value heads (GQA).
        embed_dim: model dimension (the embeddings are scaled by its square root).
        intermediate_dim: GeGLU width.
        max_seq_len: longest sequence (RoPE table and KV cache length).
        head_dim: per-head dimension (256 in 2B / 9B, 128 in 27B).
        attn_dropout: attention dropout (training only).
        norm_eps: RMSNorm epsilon.
        rope_base: RoPE base (``rope_theta``).
        query_pre_attn_scalar: attention logits are scaled by its ``** -0.5``.
        attn_softcap: tanh cap on the attention logits (``attn_logit_softcapping``); None:
            none (then SDPA's fused kernels run).
        final_softcap: tanh cap on the output logits (``final_logit_softcapping``); None: none.
        sliding_window: keys a query sees, per layer (a list of ``num_layers`` ints or None,
            e.g. :func:`alternating_windows`) or in every layer (an int); None: all global.
        attn_bias: biases on q/k/v and output_proj (HF's ``attention_bias``).
        tie_word_embeddings: output projection shares the embedding's Parameter.
        padding_idx: the embedding row that gets no gradient through the lookup
            (``pad_token_id``, as transformers builds it); None: none.

    Returns:
        A :class:`TransformerDecoder` with PyTorch's default init (norm scales 0: unit gain).

    Raises:
        ValueError: if the head counts do not divide evenly or the window list is the wrong
            length.
    """
    return _gemma2(**locals())


def lora_gemma2(
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
    **gemma2_kwargs,
) -> TransformerDecoder:
    """Gemma 2 with :class:`LoRALinear` in place of the chosen projections.

    Args:
        lora_attn_modules: attention projections to adapt, any of
            ``"q_proj", "k_proj", "v_proj", "output_proj"``.
        apply_lora_to_mlp: also adapt ``w1``, ``w2``, ``w3``.
        apply_lora_to_output: also adapt the final ``output`` projection (on a tied model,
            the adapter sits on the shared table's output use only).
        lora_rank: adapter rank.
        lora_alpha: adapter alpha (update scaled by ``alpha / rank``).
        lora_dropout: dropout on the adapters' input.
        use_dora: learn a magnitude per output feature (DoRA, see :class:`LoRALinear`).
        quantize_base: store the decoder layers' frozen linear weights in NF4 (QLoRA);
            embeddings, norms and the output projection stay in the model dtype.
        quantize_double: with ``quantize_base``, also quantize the NF4 block scales.
        **gemma2_kwargs: the keyword arguments of :func:`gemma2`.

    Returns:
        A :class:`TransformerDecoder`.

    Raises:
        ValueError: on an unknown entry in ``lora_attn_modules`` or when nothing is adapted.
    """
    modules = lora_module_names(
        lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, "lora_gemma2"
    )
    return _gemma2(
        **gemma2_kwargs,
        lora_modules=modules,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        quantize_double=quantize_double,
    )
