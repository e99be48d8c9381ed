# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Bytes per component of a fine-tuning step, derived from what each op keeps for backward.

The formulas walk a decoder layer the way its forward runs and count what autograd saves:

* a linear layer saves its input when its weight (or its LoRA adapter) is trained, nothing
  otherwise (a frozen weight is already a parameter); a LoRA adapter also saves ``lora_a``'s
  ``[n, r]`` output for ``lora_b``;
* ``RMSNorm`` keeps only its input (it recomputes the rest), when anything upstream or its
  scale needs a gradient; ``_SiluMul`` keeps its two inputs, ``[n, hidden]`` each;
* rotary embeddings keep their ``[n, h_d / 2]`` cos and sin per call whose input needs a gradient;
* SDPA keeps q, k, v, its output and the ``[n_h, n]`` fp32 log-sum-exp; the output projection
  keeps the re-laid-out ``[n, n_h * h_d]`` copy of that output when it is trained.

``tests/torchtune/training/test_memory_plan.py`` checks the sums against the tensors that
``torch.autograd.graph.saved_tensors_hooks`` sees on real tiny models. Activation
checkpointing keeps only each layer's input (full) or its matmul and attention outputs
(selective) and rebuilds one layer's activations at a time in backward.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from torchtune.modules import TransformerDecoder, TransformerDecoderLayer
from torchtune.modules.peft import LoRALinear

__all__ = [
    "LayerShape",
    "layer_shape",
    "layer_activation_bytes",
    "head_activation_bytes",
    "adamw_state_bytes",
    "nf4_bytes",
    "tensor_bytes_by_dtype",
]

_PROJ = ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3")


@dataclass(frozen=True)
class LayerShape:
    """What a decoder layer's activations depend on.

    ``trained[p]``: the base weight of projection ``p`` gets a gradient; ``rank[p]``: its LoRA
    rank (0: no adapter); ``norm_trained``: the norms' scales get gradients.
    """

    dim: int
    hidden_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    trained: Dict[str, bool]
    rank: Dict[str, int]
    norm_trained: bool


def _linear_facts(module: nn.Module) -> Tuple[bool, int]:
    if isinstance(module, LoRALinear):
        base = getattr(module, "weight", None)
        return bool(base is not None and base.requires_grad), module.rank
    return bool(module.weight.requires_grad), 0


def layer_shape(layer: TransformerDecoderLayer) -> LayerShape:
    """The :class:`LayerShape` of a Llama-style layer (works on a meta-device model).

    Raises:
        ValueError: for a layer without separate q/k/v projections and a SwiGLU MLP.
    """
    attn, mlp = layer.attn, layer.mlp
    mods = {"q_proj": attn.q_proj, "k_proj": attn.k_proj, "v_proj": attn.v_proj,
            "output_proj": attn.output_proj}  # fmt: skip
    for name in ("w1", "w2", "w3"):
        mods[name] = getattr(mlp, name, None)
    missing = [k for k, m in mods.items() if m is None]
    if missing:
        raise ValueError(f"tune plan models Llama-style layers; this one has no {missing}")
    trained, rank = {}, {}
    for name, m in mods.items():
        trained[name], rank[name] = _linear_facts(m)
    hidden = mlp.w1.out_dim if isinstance(mlp.w1, LoRALinear) else mlp.w1.out_features
    return LayerShape(
        dim=attn.embed_dim,
        hidden_dim=hidden,
        num_heads=attn.num_heads,
        num_kv_heads=attn.num_kv_heads,
        head_dim=attn.head_dim,
        trained=trained,
        rank=rank,
        norm_trained=any(p.requires_grad for p in layer.sa_norm.parameters()),
    )


def layer_activation_bytes(
    s: LayerShape,
    n_tokens: int,
    itemsize: int,
    input_requires_grad: bool,
    checkpointing: Optional[str] = None,
    by_document: bool = True,
) -> Tuple[int, int]:
    """Bytes one decoder layer keeps for backward over ``n_tokens`` tokens.

    Args:
        s: the layer.
        n_tokens: tokens the layer runs on (``b * s``, or the flattened documents).
        itemsize: bytes per activation element (the model dtype).
        input_requires_grad: whether the layer's input needs a gradient (False for the first
            layer of a model whose embedding is frozen).
        checkpointing: None, ``"full"`` or ``"selective"``.
        by_document: the tokens run as documents of one flattened row (``input_pos`` given:
            rotary embeddings gather their angles, attention runs per document and its
            outputs are concatenated) rather than as padded rows (angles are a buffer slice,
            and the output projection reads SDPA's output in place).

    Returns:
        ``(kept, recompute)``: bytes kept from forward until this layer's backward, and the
        bytes a checkpointed layer rebuilds for its backward (0 without checkpointing).
    """
    e, n = itemsize, n_tokens
    d, hid = s.dim, s.hidden_dim
    q_dim, kv_dim = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim

    def wants(name: str) -> bool:
        return s.trained[name] or s.rank[name] > 0

    def lora(names) -> int:
        return sum(n * s.rank[p] * e for p in names if s.rank[p] > 0)

    saved, rg = 0, input_requires_grad
    if rg or s.norm_trained:  # sa_norm keeps its input
        saved += n * d * e
    normed_rg = rg or s.norm_trained
    if any(wants(p) for p in ("q_proj", "k_proj", "v_proj")):
        saved += n * d * e  # the normed input, one tensor shared by q, k, v
    saved += lora(("q_proj", "k_proj", "v_proj"))
    q_rg = normed_rg or wants("q_proj")
    k_rg = normed_rg or wants("k_proj")
    v_rg = normed_rg or wants("v_proj")
    if by_document:
        saved += (int(q_rg) + int(k_rg)) * n * s.head_dim * e  # gathered rotary cos and sin
    attn_rg = q_rg or k_rg or v_rg
    if attn_rg:  # SDPA: q, k, v, out, log-sum-exp (fp32)
        saved += n * (2 * q_dim + 2 * kv_dim) * e + n * s.num_heads * 4
    if wants("output_proj") and (by_document or not attn_rg):
        saved += n * q_dim * e  # the concatenated [n, n_h * h_d] attention output
    saved += lora(("output_proj",))
    h_rg = rg or attn_rg or wants("output_proj")
    if h_rg or s.norm_trained:  # mlp_norm keeps the residual stream
        saved += n * d * e
    if wants("w1") or wants("w3"):
        saved += n * d * e  # the normed residual, shared by w1 and w3
    saved += lora(("w1", "w3"))
    if h_rg or s.norm_trained or wants("w1") or wants("w3"):
        saved += 2 * n * hid * e  # silu(a) * b keeps a and b
    if wants("w2"):
        saved += n * hid * e
    saved += lora(("w2",))
    if checkpointing is None:
        return saved, 0
    # The layer input, and (measured, not derived: the rotary gather's output survives the
    # checkpoint's recompute bookkeeping) one [n, h_d] angle table per layer.
    layer_input = n * d * e + (n * s.head_dim * e if by_document else 0)
    if checkpointing == "full":
        return layer_input, saved
    if checkpointing == "selective":
        # Every matmul output (LoRA's two small ones too) and SDPA's out + log-sum-exp.
        mm = n * (q_dim + 2 * kv_dim + d + 2 * hid + d) * e
        mm += sum(n * (s.rank[p] + _out_dim(s, p)) * e for p in _PROJ if s.rank[p] > 0)
        sdpa = n * q_dim * e + n * s.num_heads * 4
        return layer_input + mm + sdpa, saved
    raise ValueError(f"checkpointing must be None, 'full' or 'selective'; got {checkpointing!r}")


def _out_dim(s: LayerShape, proj: str) -> int:
    return {"q_proj": s.num_heads * s.head_dim, "k_proj": s.num_kv_heads * s.head_dim,
            "v_proj": s.num_kv_heads * s.head_dim, "output_proj": s.dim, "w1": s.hidden_dim,
            "w3": s.hidden_dim, "w2": s.dim}[proj]  # fmt: skip


def head_activation_bytes(
    model: TransformerDecoder,
    n_tokens: int,
    n_scored: int,
    itemsize: int,
    num_chunks: Optional[int],
) -> Dict[str, int]:
    """What the embedding, final norm and the loss keep, and the loss's transient buffer.

    With ``LinearCrossEntropyLoss`` (``num_chunks`` set) the loss keeps the hidden states'
    gradient ``[m, d]`` and the trained output weights' gradients, and holds one chunk's fp32
    logits ``[m / num_chunks, vocab]`` at a time; otherwise the full ``[m, vocab]`` logits
    in the model dtype and fp32 are live at once.

    Returns:
        ``{"kept": bytes kept until backward, "logits": the transient logits buffer}``.
    """
    d = model.tok_embeddings.embedding_dim
    vocab = model.tok_embeddings.num_embeddings
    m, e = n_scored, itemsize
    kept = m * d * e + n_tokens  # the final norm's input, the output_mask (bool)
    if model.tok_embeddings.weight.requires_grad:
        kept += n_tokens * 8  # embedding backward keeps the token ids
    out_grads = sum(
        p.numel() * p.element_size() for p in model.output.parameters() if p.requires_grad
    )
    if num_chunks:
        kept += m * d * e + out_grads  # grad of the hidden states and of the output weights
        chunk = -(-m // num_chunks)
        logits = chunk * vocab * 4 + (chunk * vocab * e if e != 4 else 0)
        # fp32 accumulators of the output weights' gradients while chunks run
        logits += sum(p.numel() * 4 for p in model.output.parameters() if p.requires_grad)
    else:
        kept += m * vocab * e
        logits = 2 * m * vocab * 4
    return {"kept": kept, "logits": logits}


def adamw_state_bytes(
    trainable: Dict[str, torch.Tensor], fused: bool, foreach: bool
) -> Dict[str, int]:
    """AdamW's ``exp_avg`` and ``exp_avg_sq`` (each the parameter's dtype and size) plus the
    step's temporaries: the single-tensor loop builds ``sqrt(exp_avg_sq) / c + eps`` for one
    parameter at a time (two temporaries of the largest one), ``foreach`` for all at once.
    The fused CPU kernel is given the loop's two (measured on ``small`` full fine-tuning:
    its peak RSS came out as with them, not derived from the kernel).

    Returns:
        ``{"state": bytes, "transient": bytes}``.
    """
    sizes = [p.numel() * p.element_size() for p in trainable.values()]
    state = 2 * sum(sizes) + 4 * len(sizes)  # + the fp32 step counters
    if foreach and not fused:
        transient = sum(sizes)
    else:
        transient = 2 * max(sizes, default=0)
    return {"state": state, "transient": transient}


def nf4_bytes(out_dim: int, in_dim: int, double_quant: bool = True) -> int:
    """Bytes of an ``[out_dim, in_dim]`` weight in NF4 as bitsandbytes stores it: 4-bit codes
    (two a byte), one absmax per block of 64 (fp32; with double quantization an 8-bit code,
    plus one fp32 scale per 256 blocks, an fp32 offset and the 256-entry fp32 code map)."""
    n = out_dim * in_dim
    blocks = -(-n // 64)
    if not double_quant:
        return (n + 1) // 2 + 4 * blocks
    return (n + 1) // 2 + blocks + 4 * -(-blocks // 256) + 4 + 4 * 256


def tensor_bytes_by_dtype(module: nn.Module) -> Dict[str, int]:
    """Bytes of parameters and buffers by dtype name (NF4 codes are the uint8 buffers)."""
    out: Dict[str, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        key = str(t.dtype).replace("torch.", "")
        out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return out
