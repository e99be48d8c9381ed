# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The one decoder builder every family wraps: parts from ``torchtune.modules``, a few knobs.

A family's builder (``llama2``, later ``qwen2``, ``gemma2`` ...) is a thin function that picks
the knobs: bias on the attention projections, an explicit ``head_dim``, the norm, the MLP
activation, tied output, the rotary module, and which projections get LoRA. Module names are
fixed here (``tok_embeddings``, ``layers.N.attn.q_proj`` ... ``output_proj``, ``mlp.w1/w2/w3``,
``sa_norm``, ``mlp_norm``, ``norm``, ``output``; Gemma's extra ``post_attn_norm`` and
``post_mlp_norm``) so every family's native state dict has the same keys; the family's
converter maps them to HF's / Meta's names. Knobs a family does not set keep the model (and
its init's random draws) exactly as without them.
"""

from functools import partial
from typing import Callable, Collection, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from torchtune.modules import (
    CausalSelfAttention,
    FeedForward,
    RMSNorm,
    RotaryPositionalEmbeddings,
    TransformerDecoder,
    TransformerDecoderLayer,
)
from torchtune.modules.embedding import ScaledEmbedding
from torchtune.modules.peft import LoRALinear, NF4Linear

# Projections that ``lora_modules`` may name.
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3", "output")
LORA_MODULES += ("qkv_proj", "w13")  # the fused projections (``fused_qkv`` / ``fused_gate_up``)


LORA_ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "output_proj")


def lora_module_names(
    lora_attn_modules: Collection[str],
    apply_lora_to_mlp: bool,
    apply_lora_to_output: bool,
    builder: str,
) -> set:
    """The ``lora_modules`` of :func:`decoder` a ``lora_<family>`` builder's arguments ask for.

    Raises:
        ValueError: on an unknown attention module, or when nothing would be adapted
            (naming ``builder``).
    """
    unknown = [m for m in lora_attn_modules if m not in LORA_ATTN_MODULES]
    if unknown:
        raise ValueError(
            f"Unknown lora_attn_modules {unknown}; expected a subset of {list(LORA_ATTN_MODULES)}"
        )
    modules = set(lora_attn_modules)
    if apply_lora_to_mlp:
        modules |= {"w1", "w2", "w3"}
    if apply_lora_to_output:
        modules.add("output")
    if not modules:
        raise ValueError(
            f"{builder} adapts nothing: give lora_attn_modules or set apply_lora_to_mlp / "
            "apply_lora_to_output"
        )
    return modules


def decoder(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: Optional[int],
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    head_dim: Optional[int] = None,
    attn_bias: bool = False,
    output_proj_bias: bool = False,
    mlp_bias: bool = False,
    attn_dropout: float = 0.0,
    norm_eps: float = 1e-5,
    norm: Optional[Callable[[int], nn.Module]] = None,
    mlp_activation: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    rope_base: float = 10_000.0,
    rope: Union[
        None, Callable[[int, int], nn.Module], Sequence[Callable[[int, int], nn.Module]]
    ] = None,
    tie_word_embeddings: bool = False,
    qk_norm: bool = False,
    sliding_window: Union[None, int, Sequence[Optional[int]]] = None,
    attn_scale: Optional[float] = None,
    attn_softcap: Optional[float] = None,
    output_softcap: Optional[float] = None,
    embed_scale: Optional[float] = None,
    padding_idx: Optional[int] = None,
    post_norms: bool = False,
    lora_modules: Collection[str] = (),
    lora_rank: int = 0,
    lora_alpha: float = 0.0,
    lora_dropout: float = 0.0,
    fused_qkv: bool = False,
    fused_gate_up: bool = False,
    use_dora: bool = False,
    quantize_base: bool = False,
    quantize_double: bool = True,
) -> TransformerDecoder:
    """A pre-norm decoder-only transformer with grouped-query attention and a gated MLP.

    Args:
        vocab_size: number of tokens.
        num_layers: decoder layers.
        num_heads: query heads.
        num_kv_heads: key/value heads (``num_heads`` for MHA, fewer for GQA, 1 for MQA; None
            means ``num_heads``).
        embed_dim: model dimension.
        intermediate_dim: hidden width of the gated MLP.
        max_seq_len: longest sequence (RoPE table and KV cache length).
        head_dim: per-head dimension; ``embed_dim // num_heads`` when None. It may differ
            from that (q/k/v project to ``heads * head_dim``, ``output_proj`` back).
        attn_bias: bias on q_proj, k_proj and v_proj (Qwen2; HF Llama's ``attention_bias``).
        output_proj_bias: bias on output_proj (HF Llama's ``attention_bias`` sets it too).
        mlp_bias: bias on the MLP's w1, w2 and w3 (HF Llama's ``mlp_bias``).
        attn_dropout: attention dropout (training only).
        norm_eps: epsilon of the default norm.
        norm: ``norm(dim) -> module`` for ``sa_norm``, ``mlp_norm`` and the final ``norm``;
            ``RMSNorm(dim, eps=norm_eps)`` when None.
        mlp_activation: the MLP gate's activation (SiLU: SwiGLU).
        rope_base: base of the default rotary embedding.
        rope: ``rope(head_dim, max_seq_len) -> module`` called once per layer, e.g. a scaled
            RoPE; ``RotaryPositionalEmbeddings(head_dim, max_seq_len, base=rope_base)`` when
            None. It must rotate HF's layout (halves of each head). A sequence of
            ``num_layers`` such callables gives each layer its own (Gemma 3: local and
            global bases).
        tie_word_embeddings: the output projection uses the embedding's Parameter (one
            parameter, used twice; its gradient is the sum of both uses).
        qk_norm: normalise each query and key head over its ``head_dim`` channels before
            RoPE, with ``norm(head_dim)`` (Qwen3's ``q_norm``/``k_norm``).
        sliding_window: keys a query sees (itself included) in every layer (an int), per
            layer (a sequence of ``num_layers`` ints or None), or all earlier ones (None).
        attn_scale: attention logit scale; ``head_dim ** -0.5`` when None (Gemma:
            ``query_pre_attn_scalar ** -0.5``).
        attn_softcap: tanh soft-cap on the attention logits (Gemma 2), or None.
        output_softcap: tanh soft-cap on the final logits (Gemma 2), or None.
        embed_scale: multiply the embeddings by this (Gemma: ``sqrt(embed_dim)``), rounded to
            the table's dtype (:class:`~torchtune.modules.embedding.ScaledEmbedding`).
        padding_idx: the embedding's ``padding_idx`` (no gradient through the lookup of that
            row), as transformers passes ``pad_token_id``; None: every row learns.
        post_norms: also normalise the attention and MLP outputs before each residual add
            (``post_attn_norm``, ``post_mlp_norm``; Gemma 2 / 3).
        lora_modules: projections that become :class:`LoRALinear`, any of
            ``q_proj, k_proj, v_proj, output_proj, w1, w2, w3, output``.
        lora_rank: adapter rank (when ``lora_modules`` is not empty).
        lora_alpha: adapter alpha (update scaled by ``alpha / rank``).
        lora_dropout: dropout on the adapters' input.
        fused_qkv: one ``attn.qkv_proj`` (rows q, k, v) instead of q_proj, k_proj and v_proj
            (Phi-3); ``lora_modules`` then names it ``qkv_proj``: one adapter over all three.
        fused_gate_up: one ``mlp.w13`` (rows w1, then w3) instead of w1 and w3 (Phi-3's
            ``gate_up_proj``); ``lora_modules`` then names it ``w13``.
        use_dora: the adapters learn a magnitude per output feature (DoRA).
        quantize_base: every linear layer of the decoder layers keeps its frozen weight in
            NF4 (:class:`~torchtune.modules.peft.NF4Linear`, or the LoRA layer's base);
            embeddings, norms and ``output`` stay in the model dtype (QLoRA).
        quantize_double: with ``quantize_base``, the NF4 block scales are quantized too.

    Returns:
        A :class:`TransformerDecoder` with PyTorch's default init; load a checkpoint, or call
        :func:`torchtune.modules.init_weights_` to train from scratch.

    Raises:
        ValueError: if the head counts do not divide evenly, ``head_dim`` is missing while
            ``embed_dim`` is not a multiple of ``num_heads``, ``lora_modules`` names an
            unknown projection or one the fusing knobs leave out, or ``sliding_window`` or
            ``rope`` is a sequence of the wrong length.
    """
    num_kv_heads = num_kv_heads or num_heads
    if num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})"
        )
    if head_dim is None:
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}) "
                "unless head_dim is given"
            )
        head_dim = embed_dim // num_heads
    unknown = sorted(set(lora_modules) - set(LORA_MODULES))
    if unknown:
        raise ValueError(f"Unknown lora_modules {unknown}; expected a subset of {LORA_MODULES}")
    absent = {"qkv_proj": not fused_qkv, "w13": not fused_gate_up}
    absent.update(dict.fromkeys(("q_proj", "k_proj", "v_proj"), fused_qkv))
    absent.update(dict.fromkeys(("w1", "w3"), fused_gate_up))
    absent = sorted(m for m in lora_modules if absent.get(m))
    if absent:
        raise ValueError(
            f"lora_modules {absent} are not in this model (fused_qkv={fused_qkv}, "
            f"fused_gate_up={fused_gate_up})"
        )
    windows = (
        [sliding_window] * num_layers
        if sliding_window is None or isinstance(sliding_window, int)
        else list(sliding_window)
    )
    if len(windows) != num_layers:
        raise ValueError(
            f"sliding_window has {len(windows)} entries for {num_layers} layers: {windows}"
        )
    norm = norm or partial(RMSNorm, eps=norm_eps)
    rope = rope or partial(RotaryPositionalEmbeddings, base=rope_base)
    ropes = list(rope) if isinstance(rope, Sequence) else [rope] * num_layers
    if len(ropes) != num_layers:
        raise ValueError(f"rope has {len(ropes)} entries for {num_layers} layers")

    def linear(name: str, in_dim: int, out_dim: int, bias: bool = False) -> nn.Module:
        quantize = quantize_base and name != "output"
        if name in lora_modules:
            return LoRALinear(
                in_dim,
                out_dim,
                lora_rank,
                lora_alpha,
                dropout=lora_dropout,
                use_bias=bias,
                use_dora=use_dora,
                quantize_base=quantize,
                quantize_double=quantize_double,
            )
        if quantize:
            return NF4Linear(in_dim, out_dim, use_bias=bias, double_quant=quantize_double)
        return nn.Linear(in_dim, out_dim, bias=bias)

    q_dim, kv_dim = num_heads * head_dim, num_kv_heads * head_dim
    layers = []
    for window, layer_rope in zip(windows, ropes):
        attn = CausalSelfAttention(
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            q_proj=None if fused_qkv else linear("q_proj", embed_dim, q_dim, attn_bias),
            k_proj=None if fused_qkv else linear("k_proj", embed_dim, kv_dim, attn_bias),
            v_proj=None if fused_qkv else linear("v_proj", embed_dim, kv_dim, attn_bias),
            output_proj=linear("output_proj", q_dim, embed_dim, output_proj_bias),
            # One RoPE per layer keeps layers independent (FSDP wraps them one by one);
            # its cache is a non-persistent buffer, never checkpointed.
            pos_embeddings=layer_rope(head_dim, max_seq_len),
            max_seq_len=max_seq_len,
            attn_dropout=attn_dropout,
            q_norm=norm(head_dim) if qk_norm else None,
            k_norm=norm(head_dim) if qk_norm else None,
            sliding_window=window,
            qkv_proj=(
                linear("qkv_proj", embed_dim, q_dim + 2 * kv_dim, attn_bias) if fused_qkv else None
            ),
            scale=attn_scale,
            softcap=attn_softcap,
        )
        # Created in this order (w1, w2, w3) so that unfused models draw their default init
        # as they always have.
        w1 = None if fused_gate_up else linear("w1", embed_dim, intermediate_dim, mlp_bias)
        w2 = linear("w2", intermediate_dim, embed_dim, mlp_bias)
        w3 = None if fused_gate_up else linear("w3", embed_dim, intermediate_dim, mlp_bias)
        w13 = linear("w13", embed_dim, 2 * intermediate_dim, mlp_bias) if fused_gate_up else None
        mlp = FeedForward(w1, w2, w3, activation=mlp_activation, gate_up_proj=w13)
        layers.append(
            TransformerDecoderLayer(
                attn=attn,
                mlp=mlp,
                sa_norm=norm(embed_dim),
                mlp_norm=norm(embed_dim),
                post_attn_norm=norm(embed_dim) if post_norms else None,
                post_mlp_norm=norm(embed_dim) if post_norms else None,
            )
        )
    if embed_scale is None:
        tok_embeddings = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx)
    else:
        tok_embeddings = ScaledEmbedding(vocab_size, embed_dim, embed_scale, padding_idx)
    output = linear("output", embed_dim, vocab_size)
    if tie_word_embeddings:
        # The same Parameter object in both modules: state_dict lists it under both keys,
        # parameters() once, and autograd sums the two uses' gradients into it.
        output.weight = tok_embeddings.weight
    return TransformerDecoder(
        tok_embeddings=tok_embeddings,
        layers=nn.ModuleList(layers),
        norm=norm(embed_dim),
        output=output,
        max_seq_len=max_seq_len,
        num_heads=num_heads,
        head_dim=head_dim,
        output_softcap=output_softcap,
    )
