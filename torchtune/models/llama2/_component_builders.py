# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Wire torchtune.modules into Llama2 (and its LoRA variant) from explicit hyperparameters."""

from typing import List, Optional

from torch import nn

from torchtune.modules import (
    CausalSelfAttention,
    FeedForward,
    RMSNorm,
    RotaryPositionalEmbeddings,
    TransformerDecoder,
    TransformerDecoderLayer,
)
from torchtune.modules.peft import LoRALinear

LORA_ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "output_proj")


def scale_hidden_dim_for_mlp(dim: int, multiple_of: int = 256) -> int:
    """Llama's SwiGLU width: ``int(2 * 4 * dim / 3)`` rounded up to ``multiple_of``."""
    hidden_dim = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


def _check_dims(embed_dim: int, num_heads: int, num_kv_heads: Optional[int]) -> int:
    num_kv_heads = num_kv_heads or num_heads
    if embed_dim % num_heads != 0:
        raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
    if num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})"
        )
    return num_kv_heads


def _linear(in_dim: int, out_dim: int, lora: bool, rank: int, alpha: float, dropout: float):
    if lora:
        return LoRALinear(in_dim, out_dim, rank=rank, alpha=alpha, dropout=dropout)
    return nn.Linear(in_dim, out_dim, bias=False)


def _build(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: Optional[int],
    embed_dim: int,
    max_seq_len: int,
    intermediate_dim: Optional[int],
    attn_dropout: float,
    norm_eps: float,
    rope_base: float,
    lora_modules: frozenset = frozenset(),
    lora_rank: int = 0,
    lora_alpha: float = 0.0,
    lora_dropout: float = 0.0,
) -> TransformerDecoder:
    num_kv_heads = _check_dims(embed_dim, num_heads, num_kv_heads)
    head_dim = embed_dim // num_heads
    hidden_dim = intermediate_dim or scale_hidden_dim_for_mlp(embed_dim)

    def linear(name: str, in_dim: int, out_dim: int) -> nn.Module:
        return _linear(in_dim, out_dim, name in lora_modules, lora_rank, lora_alpha, lora_dropout)

    layers = []
    for _ in range(num_layers):
        # One RoPE per layer keeps layers independent (FSDP wraps them one by one);
        # its cache is a non-persistent buffer, never checkpointed.
        rope = RotaryPositionalEmbeddings(head_dim, max_seq_len=max_seq_len, base=rope_base)
        attn = CausalSelfAttention(
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            q_proj=linear("q_proj", embed_dim, num_heads * head_dim),
            k_proj=linear("k_proj", embed_dim, num_kv_heads * head_dim),
            v_proj=linear("v_proj", embed_dim, num_kv_heads * head_dim),
            output_proj=linear("output_proj", num_heads * head_dim, embed_dim),
            pos_embeddings=rope,
            max_seq_len=max_seq_len,
            attn_dropout=attn_dropout,
        )
        mlp = FeedForward(
            gate_proj=linear("mlp", embed_dim, hidden_dim),
            down_proj=linear("mlp", hidden_dim, embed_dim),
            up_proj=linear("mlp", embed_dim, hidden_dim),
        )
        layers.append(
            TransformerDecoderLayer(
                attn=attn,
                mlp=mlp,
                sa_norm=RMSNorm(embed_dim, eps=norm_eps),
                mlp_norm=RMSNorm(embed_dim, eps=norm_eps),
            )
        )
    return TransformerDecoder(
        tok_embeddings=nn.Embedding(vocab_size, embed_dim),
        layers=nn.ModuleList(layers),
        norm=RMSNorm(embed_dim, eps=norm_eps),
        output=linear("output", embed_dim, vocab_size),
        max_seq_len=max_seq_len,
        num_heads=num_heads,
        head_dim=head_dim,
    )


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
) -> TransformerDecoder:
    """A Llama2 decoder.

    Args:
        vocab_size: number of tokens.
        num_layers: decoder layers.
        num_heads: query heads.
        num_kv_heads: key/value heads (``num_heads`` for MHA, fewer for GQA, 1 for MQA;
            None means ``num_heads``).
        embed_dim: model dimension; ``head_dim = embed_dim // num_heads``.
        max_seq_len: longest sequence (RoPE table and KV cache length).
        intermediate_dim: SwiGLU width; Llama's rule from ``embed_dim`` when None.
        attn_dropout: attention dropout (training only).
        norm_eps: RMSNorm epsilon.
        rope_base: RoPE base (``rope_theta``).

    Returns:
        A :class:`TransformerDecoder` with PyTorch's default init; load a checkpoint, or call
        :func:`torchtune.modules.init_weights_` to train from scratch.

    Raises:
        ValueError: if the head counts do not divide evenly.
    """
    return _build(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        max_seq_len=max_seq_len,
        intermediate_dim=intermediate_dim,
        attn_dropout=attn_dropout,
        norm_eps=norm_eps,
        rope_base=rope_base,
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
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
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
            intermediate_dim, attn_dropout, norm_eps, rope_base: as in :func:`llama2`.
        lora_rank: adapter rank.
        lora_alpha: adapter alpha (update scaled by ``alpha / rank``).
        lora_dropout: dropout on the adapters' input.

    Returns:
        A :class:`TransformerDecoder`.

    Raises:
        ValueError: on an unknown entry in ``lora_attn_modules`` or when nothing is adapted.
    """
    unknown = [m for m in lora_attn_modules if m not in LORA_ATTN_MODULES]
    if unknown:
        raise ValueError(
            f"Unknown lora_attn_modules {unknown}; expected a subset of {list(LORA_ATTN_MODULES)}"
        )
    modules = set(lora_attn_modules)
    if apply_lora_to_mlp:
        modules.add("mlp")
    if apply_lora_to_output:
        modules.add("output")
    if not modules:
        raise ValueError(
            "lora_llama2 adapts nothing: give lora_attn_modules or set apply_lora_to_mlp / "
            "apply_lora_to_output"
        )
    return _build(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        max_seq_len=max_seq_len,
        intermediate_dim=intermediate_dim,
        attn_dropout=attn_dropout,
        norm_eps=norm_eps,
        rope_base=rope_base,
        lora_modules=frozenset(modules),
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
    )
