# Copyright (c) torchtune contributors. BSD-3-Clause license.
from typing import List, Optional, Union

import torch
from torch import nn

from torchtune.modules.attention import CausalSelfAttention, DocumentMask, SharedPrefixMask
from torchtune.modules.kv_cache import KVCache


class TransformerDecoderLayer(nn.Module):
    """Pre-norm decoder block: ``h = x + attn(sa_norm(x)); out = h + mlp(mlp_norm(h))``.

    With post-norms (Gemma 2 / 3's "sandwich" norms) each branch is normalised again before it
    joins the residual: ``h = x + post_attn_norm(attn(sa_norm(x)))`` and
    ``out = h + post_mlp_norm(mlp(mlp_norm(h)))``.

    Args:
        attn: the self-attention module (called with ``mask=`` and ``input_pos=``).
        mlp: the feed-forward module.
        sa_norm: norm before attention.
        mlp_norm: norm before the feed-forward.
        post_attn_norm: optional norm of the attention output, before the residual add.
        post_mlp_norm: optional norm of the feed-forward output, before the residual add.
    """

    def __init__(
        self,
        attn: CausalSelfAttention,
        mlp: nn.Module,
        sa_norm: nn.Module,
        mlp_norm: nn.Module,
        *,
        post_attn_norm: Optional[nn.Module] = None,
        post_mlp_norm: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.sa_norm = sa_norm
        self.attn = attn
        self.mlp_norm = mlp_norm
        self.mlp = mlp
        # None is a plain attribute, not a submodule: other families' state dicts keep their keys.
        self.post_attn_norm = post_attn_norm
        self.post_mlp_norm = post_mlp_norm

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: Optional[torch.Tensor] = None,
        input_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            x: ``[b, s, d]``.
            mask: see :class:`CausalSelfAttention`.
            input_pos: ``LongTensor[b, s]`` or None.

        Returns:
            ``[b, s, d]``.
        """
        attn_out = self.attn(self.sa_norm(x), mask=mask, input_pos=input_pos)
        if self.post_attn_norm is not None:
            attn_out = self.post_attn_norm(attn_out)
        h = x + attn_out
        mlp_out = self.mlp(self.mlp_norm(h))
        if self.post_mlp_norm is not None:
            mlp_out = self.post_mlp_norm(mlp_out)
        return h + mlp_out


class TransformerDecoder(nn.Module):
    """Decoder-only transformer: token embedding, a stack of layers, final norm, output head.

    Args:
        tok_embeddings: ``vocab -> d`` embedding.
        layers: the decoder layers, applied in order.
        norm: final norm.
        output: ``d -> vocab`` projection.
        max_seq_len: longest sequence (and KV cache length) the model accepts.
        num_heads: query heads per layer (for bookkeeping).
        head_dim: per-head dimension (used to size KV caches).
        output_softcap: if set, logits become ``cap * tanh(logits / cap)`` (Gemma 2's
            ``final_logit_softcapping``). ``LinearCrossEntropyLoss`` applies the same cap to the
            hidden states this model returns with ``return_hidden`` (the training recipes pass
            it this attribute).
    """

    def __init__(
        self,
        tok_embeddings: nn.Embedding,
        layers: Union[nn.ModuleList, List[nn.Module]],
        norm: nn.Module,
        output: nn.Module,
        max_seq_len: int,
        num_heads: int,
        head_dim: int,
        *,
        output_softcap: Optional[float] = None,
    ) -> None:
        super().__init__()
        if output_softcap is not None and not output_softcap > 0:
            raise ValueError(f"output_softcap must be positive or None, got {output_softcap}")
        self.tok_embeddings = tok_embeddings
        self.layers = layers if isinstance(layers, nn.ModuleList) else nn.ModuleList(layers)
        self.norm = norm
        self.output = output
        self.max_seq_len = max_seq_len
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.output_softcap = output_softcap

    def setup_caches(
        self, batch_size: int, dtype: torch.dtype, max_seq_len: Optional[int] = None
    ) -> None:
        """Give every attention layer a fresh, zeroed KV cache.

        Args:
            batch_size: largest batch that will be decoded.
            dtype: dtype of the cached keys/values (use the model's dtype).
            max_seq_len: cache slots per sequence; the model's ``max_seq_len`` when None.
                A shorter cache saves memory and per-token attention work.

        Raises:
            ValueError: if ``max_seq_len`` exceeds the model's.
        """
        cache_len = max_seq_len or self.max_seq_len
        if cache_len > self.max_seq_len:
            raise ValueError(
                f"Cache length {cache_len} exceeds the model's max_seq_len {self.max_seq_len}"
            )
        device = self.tok_embeddings.weight.device
        for layer in self.layers:
            layer.attn.kv_cache = KVCache(
                batch_size=batch_size,
                max_seq_len=cache_len,
                num_heads=layer.attn.num_kv_heads,
                head_dim=self.head_dim,
                dtype=dtype,
                device=device,
            )

    def caches_are_enabled(self) -> bool:
        return self.layers[0].attn.kv_cache is not None

    def reset_caches(self) -> None:
        """Zero the KV caches (start new sequences).

        Raises:
            RuntimeError: if caches were never set up.
        """
        if not self.caches_are_enabled():
            raise RuntimeError("Caches are not set up; call model.setup_caches(batch_size, dtype)")
        for layer in self.layers:
            layer.attn.kv_cache.reset()

    def teardown_caches(self) -> None:
        """Drop the KV caches and go back to cache-free (training / scoring) forwards."""
        for layer in self.layers:
            layer.attn.kv_cache = None

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        mask: Optional[Union[torch.Tensor, DocumentMask]] = None,
        input_pos: Optional[torch.Tensor] = None,
        output_mask: Optional[torch.Tensor] = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """
        Args:
            tokens: ``LongTensor[b, s]``.
            mask: packed samples pass a
                :class:`~torchtune.modules.attention.DocumentMask` (the document lengths over
                the ``b * s`` tokens, with ``input_pos``; what ``padded_collate`` gives packed
                rows): attention runs causally within each document, with no work on the
                blocks between them. The batch may then be flattened to one row of documents
                longer than ``max_seq_len``; each document may not. Preference pairs may pass
                a :class:`~torchtune.modules.attention.SharedPrefixMask` (a prompt once,
                then its answers, with ``input_pos``). Otherwise an optional
                ``BoolTensor[b, s, s]`` (True = may attend), e.g. a padding mask, used as
                given (it must include causality). With KV caches on it is
                ``[b, s, cache_len]`` over cache slots (e.g. left-padded generation: pass
                ``input_pos`` = column index for every row and hide the pad slots here); None
                there means causal over cache slots.
            input_pos: ``LongTensor[b, s]`` token positions; required with KV caches,
                ``arange(s)`` per row otherwise when None.
            output_mask: optional ``BoolTensor[b, s]``: run the final norm and the output
                projection only where True. Training on labelled positions only (prompt and
                padding tokens carry no label) skips most of the ``d x vocab`` matmul and the
                ``[b, s, vocab]`` logits; the logits that are computed are the same.
            return_hidden: return the final norm's output instead of logits, for a loss that
                applies ``self.output`` (and ``output_softcap``) itself chunk by chunk
                (``LinearCrossEntropyLoss``).

        Returns:
            Logits ``[b, s, vocab]`` in the model's dtype; with ``output_mask``, ``[n, vocab]``
            for its ``n`` True positions in row-major order (``logits_full[output_mask]``).
            With ``return_hidden``, the same with ``d`` in place of ``vocab``.

        Raises:
            ValueError: on a too-long sequence, a badly shaped mask/input_pos/output_mask, or
                missing ``input_pos`` with caches on.
        """
        b, s = tokens.shape
        caches_on = self.caches_are_enabled()
        max_len = self.layers[0].attn.kv_cache.max_seq_len if caches_on else self.max_seq_len
        if input_pos is not None and tuple(input_pos.shape) != (b, s):
            raise ValueError(f"input_pos must have shape {(b, s)}, got {tuple(input_pos.shape)}")
        if isinstance(mask, DocumentMask):
            # Documents laid end to end (e.g. a flattened batch): each must fit, not the row.
            # (Attention checks that the lengths cover the batch and that caches are off.)
            if max(mask.lengths) > self.max_seq_len:
                raise ValueError(
                    f"Document length {max(mask.lengths)} exceeds max_seq_len {self.max_seq_len}"
                )
            if input_pos is None:
                raise ValueError("A DocumentMask needs input_pos: positions restart per document")
        elif isinstance(mask, SharedPrefixMask):
            # Each position's own row is its group's prefix plus its branch.
            if mask.max_sequence_len > self.max_seq_len:
                raise ValueError(
                    f"Prefix + branch length {mask.max_sequence_len} exceeds max_seq_len "
                    f"{self.max_seq_len}"
                )
            if input_pos is None:
                raise ValueError(
                    "A SharedPrefixMask needs input_pos: each branch continues its prefix"
                )
        elif s > max_len:
            raise ValueError(f"Sequence length {s} exceeds max_seq_len {max_len}")
        if caches_on:
            if input_pos is None:
                raise ValueError("input_pos is required when KV caches are enabled")
            if mask is None:
                # Built once here rather than in every layer: query at p sees slots <= p.
                slots = torch.arange(max_len, device=tokens.device)
                mask = slots.view(1, 1, -1) <= input_pos.unsqueeze(-1)  # [b, s, cache_len]
        if isinstance(mask, torch.Tensor):
            kv_len = max_len if caches_on else s
            if tuple(mask.shape) != (b, s, kv_len) or mask.dtype != torch.bool:
                raise ValueError(
                    f"mask must be a bool tensor of shape {(b, s, kv_len)}, got "
                    f"{mask.dtype} {tuple(mask.shape)}"
                )
        if output_mask is not None and (
            tuple(output_mask.shape) != (b, s) or output_mask.dtype != torch.bool
        ):
            raise ValueError(
                f"output_mask must be a bool tensor of shape {(b, s)}, got "
                f"{output_mask.dtype} {tuple(output_mask.shape)}"
            )

        h = self.tok_embeddings(tokens)  # [b, s, d]
        if isinstance(mask, torch.Tensor):
            # SDPA turns a bool mask into this additive one; doing it once here rather than in
            # every layer saves the work and lets all layers keep one copy for backward.
            mask = torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill_(
                ~mask, float("-inf")
            )  # [b, s, kv_len]
        for layer in self.layers:
            h = layer(h, mask=mask, input_pos=input_pos)
        if output_mask is not None:
            h = h[output_mask]  # [n, d]; its backward scatters into zeros of [b, s, d] only
        h = self.norm(h)
        if return_hidden:
            return h
        logits = self.output(h)  # [b, s, vocab] or [n, vocab]
        if self.output_softcap is not None:
            # In the logits' dtype, in transformers' order: divide, tanh, multiply.
            logits = torch.tanh(logits / self.output_softcap) * self.output_softcap
        return logits
