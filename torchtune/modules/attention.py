# Copyright (c) torchtune contributors. BSD-3-Clause license.
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from torchtune.modules.kv_cache import KVCache

# SDPA can share k/v heads itself since torch 2.5; its flash kernel does so without copies.
_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


@dataclass(frozen=True)
class DocumentMask:
    """Packed rows as a sequence of documents, each attending causally within itself only.

    The block-causal attention of packed samples, kept as document lengths: attention runs
    one document at a time (SDPA's ``is_causal``) and skips the blocks between documents and
    above the diagonal that a dense ``[b, s, s]`` mask would compute and discard. Packed
    batches carry one from the dataset on (``padded_collate`` builds it from each row's
    ``seq_lens``), so no dense mask is ever built for them.

    Attributes:
        lengths: lengths of consecutive documents over the ``b * s`` tokens of a batch taken
            row after row; no document crosses a row boundary.

    Raises:
        ValueError: if a length is not a positive int.
    """

    lengths: Tuple[int, ...]

    def __post_init__(self) -> None:
        bad = [n for n in self.lengths if not isinstance(n, int) or isinstance(n, bool) or n < 1]
        if bad:
            raise ValueError(f"DocumentMask lengths must be positive ints; got {bad[:5]}")
        object.__setattr__(self, "lengths", tuple(self.lengths))

    def document_ids(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """``LongTensor[sum(lengths)]``: the index of the document each token is in."""
        counts = torch.tensor(self.lengths, dtype=torch.long, device=device)
        return torch.repeat_interleave(torch.arange(len(self.lengths), device=device), counts)


@dataclass(frozen=True)
class SharedPrefixMask:
    """Groups of sequences that begin with the same tokens, the shared prefix stored once.

    A preference pair's chosen and rejected rows start with the same prompt: laid out as
    ``[prefix, branch_1, branch_2, ...]``, each branch attends to the prefix and causally to
    itself, never to another branch, so every position computes what it would in its own row
    (``prefix + branch``) while the prefix goes through the model once. Groups follow each
    other over the ``b * s`` tokens of a batch (a flattened batch is one row), and attention
    runs one SDPA call per prefix and per branch.

    Attributes:
        groups: per group ``(prefix_len, branch_len, ...)``; the prefix may be empty, each
            branch has at least one token.

    Raises:
        ValueError: if a group has no branch, a negative prefix or an empty branch.
    """

    groups: Tuple[Tuple[int, ...], ...]

    def __post_init__(self) -> None:
        groups = tuple(tuple(g) for g in self.groups)
        for g in groups:
            ints = all(isinstance(n, int) and not isinstance(n, bool) for n in g)
            if len(g) < 2 or not ints or g[0] < 0 or min(g[1:]) < 1:
                raise ValueError(
                    "SharedPrefixMask groups must be (prefix_len >= 0, branch_len >= 1, ...) "
                    f"ints; got {g}"
                )
        object.__setattr__(self, "groups", groups)

    @property
    def num_tokens(self) -> int:
        return sum(sum(g) for g in self.groups)

    @property
    def max_sequence_len(self) -> int:
        """The longest ``prefix + branch``: what each position's row would be."""
        return max(g[0] + max(g[1:]) for g in self.groups)


# Below this mean document length, one batched causal SDPA over padded rows costs less than
# cutting the padding off and looping over the rows as documents.
_MIN_MEAN_DOCUMENT_LEN = 32


def worth_attending_by_document(n_tokens: int, n_documents: int) -> bool:
    """Whether unmasked rows, cut to their scored prefixes, are long enough on average for
    the per-document loop to beat batched causal SDPA over the padded rows."""
    return n_tokens >= _MIN_MEAN_DOCUMENT_LEN * n_documents


def sliding_window_band(
    q_idx: torch.Tensor, kv_len: int, window: int, device: Optional[torch.device] = None
) -> torch.Tensor:
    """Which keys lie inside a query's window: ``kv_idx > q_idx - window``.

    A query at index ``p`` sees the ``window`` keys ``(p - window, p]`` (itself included), as
    transformers' ``sliding_window_overlay``; combined with causality this is a band.

    Args:
        q_idx: ``LongTensor[..., s]`` index (sequence position or cache slot) of each query.
        kv_len: number of keys (sequence length or cache slots).
        window: the window size.
        device: device of the result.

    Returns:
        ``BoolTensor[..., s, kv_len]``, True = inside the window (causality not included).
    """
    kv_idx = torch.arange(kv_len, device=device)
    return kv_idx > (q_idx.unsqueeze(-1) - window)


def softcapped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    is_causal: bool,
    dropout_p: float,
    scale: Optional[float],
    softcap: float,
) -> torch.Tensor:
    """Attention with tanh soft-capped logits, ``cap * tanh(q.k * scale / cap)`` (Gemma 2).

    SDPA's fused kernels cannot cap the logits between the product and the softmax, so this is
    the exact path, written as transformers' eager attention: scores in the inputs' dtype,
    softmax in fp32, then back. It holds the ``[b, n_h, s, kv_len]`` scores (and autograd
    their tanh) for backward, like eager attention does.

    Args:
        q: ``[b, n_h, s, h_d]``; k, v: ``[b, n_h, kv_len, h_d]`` (kv heads already repeated).
        attn_mask: None, or bool (True = may attend) / additive float, broadcastable to
            ``[b, n_h, s, kv_len]``.
        is_causal: causal over ``s == kv_len`` (SDPA's ``is_causal``); ``attn_mask`` is None.
        dropout_p: dropout on the attention weights.
        scale: logit scale; ``h_d ** -0.5`` when None.
        softcap: the cap.

    Returns:
        ``[b, n_h, s, h_d]``; a query row that may attend nothing yields zeros (as SDPA).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # [b, n_h, s, kv_len]
    scores = torch.tanh(scores / softcap) * softcap
    empty = None
    if is_causal:  # every row sees at least its own key
        s, kv_len = scores.shape[-2:]
        causal = torch.ones(s, kv_len, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    elif attn_mask is not None:
        allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf")
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
        empty = ~allowed.any(dim=-1, keepdim=True)  # rows whose softmax would be NaN
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if empty is not None:
        probs = probs.masked_fill(empty, 0.0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


def _attend(q, k, v, attn_mask, is_causal, dropout_p, scale, softcap, **sdpa_kwargs):
    """SDPA, or :func:`softcapped_attention` when the logits are capped; ``[b, n, s, h_d]``."""
    if softcap is not None:
        return softcapped_attention(q, k, v, attn_mask, is_causal, dropout_p, scale, softcap)
    if scale is not None:
        sdpa_kwargs["scale"] = scale
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **sdpa_kwargs
    )


# Run eagerly inside compiled layers: dynamo would guard on (and recompile for) every new
# tuple of document lengths; this way a compiled layer breaks its graph here instead.
@torch.compiler.disable
def _attention_by_document(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: DocumentMask,
    dropout_p: float,
    window: Optional[int] = None,
    scale: Optional[float] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Causal SDPA within each document of the flattened batch.

    Args:
        q: ``[b, s, n_h, h_d]``; k, v: ``[b, s, n_kv, h_d]``, after positional embeddings.
        mask: document lengths summing to ``b * s``.
        dropout_p: attention dropout.
        window: sliding window within each document (None: plain causal). Documents no
            longer than the window stay on the mask-free causal kernel.
        scale: logit scale; SDPA's ``h_d ** -0.5`` when None.
        softcap: tanh cap on the logits (:func:`softcapped_attention`), or None.

    Returns:
        ``[b, s, n_h * h_d]``.

    Raises:
        ValueError: if the lengths do not sum to ``b * s``.
    """
    b, s, n_h, h_d = q.shape
    if sum(mask.lengths) != b * s:
        raise ValueError(
            f"DocumentMask lengths sum to {sum(mask.lengths)}, expected b * s = {b * s}"
        )
    sdpa_kwargs = {}
    banded = window is not None and max(mask.lengths) > window
    if k.shape[2] != n_h:
        # Banded documents pass an explicit mask, whose kernels may not share kv heads.
        if _SDPA_HAS_GQA and not banded and softcap is None:
            sdpa_kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(n_h // k.shape[2], dim=2)  # [b, s, n_h, h_d], as repeat_kv
            v = v.repeat_interleave(n_h // v.shape[2], dim=2)
    # split's backward is a single cat per input (slicing would add a zero-filled copy of
    # the whole input per document).
    pieces = zip(*(t.flatten(0, 1).split(mask.lengths) for t in (q, k, v)))  # each [l, n, h_d]
    outs = []
    for qkv in pieces:
        n = qkv[0].shape[0]
        band = None
        if window is not None and n > window:
            idx = torch.arange(n, device=q.device)
            band = sliding_window_band(idx, n, window, q.device) & (
                idx.view(1, -1) <= idx.view(-1, 1)
            )
        out = _attend(
            *(t.transpose(0, 1).unsqueeze(0) for t in qkv),
            band,
            band is None,
            dropout_p,
            scale,
            softcap,
            **sdpa_kwargs,
        )  # [1, n_h, l, h_d]
        outs.append(out.squeeze(0).transpose(0, 1))
    return torch.cat(outs).view(b, s, n_h * h_d)


@torch.compiler.disable
def _attention_shared_prefix(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: SharedPrefixMask,
    dropout_p: float,
    scale: Optional[float] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Attention of :class:`SharedPrefixMask` groups: the prefix causally within itself, each
    branch over ``[prefix, branch]`` (all of the prefix, causal within the branch).

    Args:
        q: ``[b, s, n_h, h_d]``; k, v: ``[b, s, n_kv, h_d]``, after positional embeddings.
        mask: the groups, covering the ``b * s`` tokens.
        dropout_p: attention dropout.
        scale: logit scale; SDPA's ``h_d ** -0.5`` when None.
        softcap: tanh cap on the logits, or None.

    Returns:
        ``[b, s, n_h * h_d]``.

    Raises:
        ValueError: if the groups do not cover ``b * s`` tokens.
    """
    b, s, n_h, h_d = q.shape
    if mask.num_tokens != b * s:
        raise ValueError(
            f"SharedPrefixMask groups cover {mask.num_tokens} tokens, expected b * s = {b * s}"
        )
    if k.shape[2] != n_h:  # branches pass explicit masks, whose kernels may not share kv heads
        k = k.repeat_interleave(n_h // k.shape[2], dim=2)  # [b, s, n_h, h_d], as repeat_kv
        v = v.repeat_interleave(n_h // v.shape[2], dim=2)
    segments = [n for g in mask.groups for n in g if n > 0]
    # [1, n_h, l, h_d] per segment; split's backward is one cat per input.
    pieces = [
        [t.transpose(0, 1).unsqueeze(0) for t in ts]
        for ts in zip(*(t.flatten(0, 1).split(segments) for t in (q, k, v)))
    ]
    outs, i = [], 0
    for group in mask.groups:
        prefix = None
        if group[0] > 0:
            prefix = pieces[i]
            i += 1
            outs.append(_attend(*prefix, None, True, dropout_p, scale, softcap))
        for n in group[1:]:
            qb, kb, vb = pieces[i]
            i += 1
            if prefix is None:
                outs.append(_attend(qb, kb, vb, None, True, dropout_p, scale, softcap))
                continue
            p = group[0]
            # [n, p + n]: all of the prefix, then causal within the branch
            allowed = torch.ones(n, p + n, dtype=torch.bool, device=q.device)
            allowed[:, p:] = allowed[:, p:].tril()
            kk, vv = torch.cat([prefix[1], kb], dim=2), torch.cat([prefix[2], vb], dim=2)
            outs.append(_attend(qb, kk, vv, allowed, False, dropout_p, scale, softcap))
    out = torch.cat([o.squeeze(0).transpose(0, 1) for o in outs])  # [b * s, n_h, h_d]
    return out.reshape(b, s, n_h * h_d)


class CausalSelfAttention(nn.Module):
    """Causal self-attention with multi-head, grouped-query and multi-query variants.

    ``num_kv_heads == num_heads`` is multi-head attention, ``num_kv_heads == 1`` multi-query,
    anything dividing ``num_heads`` in between grouped-query (GQA, Ainslie et al. 2023). Each
    key/value head serves ``num_heads // num_kv_heads`` consecutive query heads. The kernel is
    ``F.scaled_dot_product_attention``.

    Masking:
      * no cache, ``mask=None``: plain causal attention (SDPA's ``is_causal``, no mask built).
      * no cache, a :class:`DocumentMask` (packed samples): causal attention within each
        document, one SDPA call per document.
      * no cache, a :class:`SharedPrefixMask` (preference pairs with their prompt once): each
        branch attends to its group's prefix and causally to itself. No sliding window.
      * ``mask`` ``BoolTensor[b, s, s]`` (True = may attend): used as given, e.g. a padding
        mask. It must include causality itself.
      * with a KV cache and ``mask=None``: the query at position ``p`` attends cache slots
        ``<= p`` (built from ``input_pos``).
      * with a KV cache, ``mask`` ``BoolTensor[b, s, cache_len]``: used as given over cache
        slots, e.g. for left-padded batched generation (causal and padding in one mask).
        ``input_pos`` is then both the RoPE position and the cache slot written; since RoPE
        only sees relative positions, rows may be shifted by their padding.
    Instead of a bool mask, an additive float mask of the same shape (0 = may attend,
    ``-inf`` = may not; what SDPA turns a bool mask into) is accepted too: the decoder passes
    one, converted once for all its layers.
    A query row that may attend nothing yields zeros (SDPA's convention), not NaN.

    With ``sliding_window`` set, every path above also limits a query at index ``p``
    (sequence index, or cache slot with a KV cache) to keys at ``(p - window, p]``, as
    transformers does (Mistral, Qwen2's upper layers); in the ``DocumentMask`` path the window
    lies within each document. Sequences no longer than the window keep the mask-free path.

    Args:
        embed_dim: model dimension.
        num_heads: number of query heads.
        num_kv_heads: number of key/value heads; must divide ``num_heads``.
        head_dim: per-head dimension.
        q_proj: ``embed_dim -> num_heads * head_dim``.
        k_proj: ``embed_dim -> num_kv_heads * head_dim``.
        v_proj: ``embed_dim -> num_kv_heads * head_dim``.
        output_proj: ``num_heads * head_dim -> embed_dim``.
        pos_embeddings: applied to queries and keys as ``pos_embeddings(x, input_pos=...)``.
        kv_cache: optional :class:`KVCache`; usually set by ``TransformerDecoder.setup_caches``.
        max_seq_len: largest sequence length (bookkeeping; the cache sets its own length).
        attn_dropout: dropout on attention weights, in training only.
        q_norm: optional norm over each query head's ``head_dim`` channels, applied before
            the positional embedding (Qwen3's per-head RMSNorm).
        k_norm: the same for keys.
        sliding_window: how many keys (itself included) a query sees; None means all
            earlier ones.
        qkv_proj: instead of ``q_proj``, ``k_proj`` and ``v_proj`` (then None), one fused
            ``embed_dim -> (num_heads + 2 * num_kv_heads) * head_dim`` projection whose
            output rows are q, then k, then v (Phi-3's ``qkv_proj``): one GEMM, and a LoRA
            adapter on it is PEFT's adapter on the fused module.

        scale: the logit scale; ``head_dim ** -0.5`` when None (Gemma's
            ``query_pre_attn_scalar ** -0.5``).
        softcap: if set, logits become ``softcap * tanh(logits / softcap)`` before the mask
            and softmax (Gemma 2's ``attn_logit_softcapping``). No fused SDPA kernel can do
            that: every path then takes the exact, eager :func:`softcapped_attention`, which
            holds each layer's ``[b, n_h, s, kv_len]`` scores (per document when packed).

    Raises:
        ValueError: on inconsistent head counts, dropout outside ``[0, 1]``, a window
            below 1, a cap that is not positive, or ``qkv_proj`` given together with
            ``q_proj`` / ``k_proj`` / ``v_proj``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        q_proj: Optional[nn.Module],
        k_proj: Optional[nn.Module],
        v_proj: Optional[nn.Module],
        output_proj: nn.Module,
        pos_embeddings: nn.Module,
        kv_cache: Optional[KVCache] = None,
        max_seq_len: int = 4096,
        attn_dropout: float = 0.0,
        q_norm: Optional[nn.Module] = None,
        k_norm: Optional[nn.Module] = None,
        sliding_window: Optional[int] = None,
        *,
        qkv_proj: Optional[nn.Module] = None,
        scale: Optional[float] = None,
        softcap: Optional[float] = None,
    ) -> None:
        super().__init__()
        if qkv_proj is not None and any(p is not None for p in (q_proj, k_proj, v_proj)):
            raise ValueError("Give either qkv_proj or q_proj, k_proj and v_proj, not both")
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})"
            )
        if not 0.0 <= attn_dropout <= 1.0:
            raise ValueError(f"attn_dropout must be in [0, 1], got {attn_dropout}")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window}")
        if softcap is not None and not softcap > 0:
            raise ValueError(f"softcap must be positive or None, got {softcap}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.attn_dropout = attn_dropout
        self.q_proj = q_proj
        self.k_proj = k_proj
        self.v_proj = v_proj
        self.output_proj = output_proj
        self.pos_embeddings = pos_embeddings
        self.kv_cache = kv_cache
        self.q_norm = q_norm
        self.k_norm = k_norm
        self.sliding_window = sliding_window
        self.qkv_proj = qkv_proj  # a submodule only when set: unfused models keep their keys
        self.scale = scale
        self.softcap = softcap

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: Optional[Union[torch.Tensor, DocumentMask]] = None,
        input_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            x: ``[b, s, embed_dim]``.
            mask: optional ``BoolTensor[b, s, s]`` (or ``[b, s, cache_len]`` with a KV cache),
                True = may attend, its additive float form, or a ``DocumentMask``. See the
                class docstring.
            input_pos: ``LongTensor[b, s]`` positions of the tokens; required with a KV cache,
                ``arange(s)`` otherwise when None.

        Returns:
            ``[b, s, embed_dim]``.

        Raises:
            ValueError: if a KV cache is set and ``input_pos`` is None, or a ``DocumentMask``
                comes with a KV cache or does not cover ``b * s`` tokens.
        """
        b, s, _ = x.shape
        if self.qkv_proj is not None:
            kv_dim = self.num_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([self.num_heads * self.head_dim, kv_dim, kv_dim], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, s, self.num_heads, self.head_dim)
        k = k.view(b, s, self.num_kv_heads, self.head_dim)
        v = v.view(b, s, self.num_kv_heads, self.head_dim)

        if self.q_norm is not None:
            q = self.q_norm(q)  # per head, over h_d
        if self.k_norm is not None:
            k = self.k_norm(k)
        q = self.pos_embeddings(q, input_pos=input_pos)
        k = self.pos_embeddings(k, input_pos=input_pos)

        if isinstance(mask, SharedPrefixMask):
            if self.kv_cache is not None or self.sliding_window is not None:
                raise ValueError(
                    "a SharedPrefixMask is for cache-free forwards without a sliding window"
                )
            dropout_p = self.attn_dropout if self.training else 0.0
            out = _attention_shared_prefix(q, k, v, mask, dropout_p, self.scale, self.softcap)
            return self.output_proj(out)
        if isinstance(mask, DocumentMask):
            if self.kv_cache is not None:
                raise ValueError("a DocumentMask is for cache-free forwards; got a KV cache")
            dropout_p = self.attn_dropout if self.training else 0.0
            # Only Gemma's knobs as keywords: other models call it exactly as before.
            gemma = {"scale": self.scale, "softcap": self.softcap}
            gemma = {name: value for name, value in gemma.items() if value is not None}
            out = _attention_by_document(q, k, v, mask, dropout_p, self.sliding_window, **gemma)
            return self.output_proj(out)

        # [b, n, s, h_d]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

        is_causal = False
        if self.kv_cache is not None:
            if input_pos is None:
                raise ValueError("input_pos is required when the KV cache is enabled")
            k, v = self.kv_cache.update(input_pos, k, v)  # [b, n_kv, cache_len, h_d]
            if mask is None:
                slots = torch.arange(k.shape[2], device=input_pos.device)
                mask = slots.view(1, 1, -1) <= input_pos.unsqueeze(-1)  # [b, s, cache_len]
        elif mask is None:
            is_causal = True
        window = self.sliding_window
        if window is not None and k.shape[2] > window:
            # Band the mask per layer (the decoder shares one mask across layers whose
            # windows may differ). Queries index cache slots with a cache, rows without.
            if self.kv_cache is not None:
                q_idx = input_pos  # [b, s]
            else:
                q_idx = torch.arange(s, device=x.device).unsqueeze(0)  # [1, s]
            # [b or 1, s, kv_len]: broadcast over the batch when the rows agree
            band = sliding_window_band(q_idx, k.shape[2], window, x.device)
            if mask is None:
                mask = band & torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
                is_causal = False
            elif mask.dtype == torch.bool:
                mask = mask & band
            else:
                mask = mask.masked_fill(~band, float("-inf"))

        sdpa_kwargs = {}
        capped = self.softcap is not None
        if self.num_kv_heads != self.num_heads and is_causal and _SDPA_HAS_GQA and not capped:
            # Mask-free causal path (flash on GPU): let SDPA broadcast kv heads. Kernels for
            # explicit masks may not support GQA, so those paths expand k/v below.
            sdpa_kwargs["enable_gqa"] = True
        elif self.num_kv_heads != self.num_heads:
            q_per_kv = self.num_heads // self.num_kv_heads
            # [b, n_kv, kv_len, h_d] -> [b, n_h, kv_len, h_d]: kv head j serves q heads
            # j * q_per_kv ... (j + 1) * q_per_kv - 1, as HF's repeat_kv.
            k = k.repeat_interleave(q_per_kv, dim=1)
            v = v.repeat_interleave(q_per_kv, dim=1)

        if mask is not None:
            mask = mask.unsqueeze(1)  # [b, 1, s, kv_len], broadcast over heads

        dropout_p = self.attn_dropout if self.training else 0.0
        out = _attend(q, k, v, mask, is_causal, dropout_p, self.scale, self.softcap, **sdpa_kwargs)
        out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)  # [b, s, n_h*h_d]
        return self.output_proj(out)
