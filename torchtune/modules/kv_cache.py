# Copyright (c) torchtune contributors. BSD-3-Clause license.
import torch
from torch import nn


class KVCache(nn.Module):
    """Key/value cache of one attention layer for incremental decoding.

    Buffers are non-persistent so they never reach a checkpoint.

    Args:
        batch_size: largest batch the cache will serve.
        max_seq_len: number of cache slots (positions) per sequence.
        num_heads: number of key/value heads.
        head_dim: per-head dimension.
        dtype: dtype of the cached keys/values.
        device: where to allocate the cache.
    """

    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device = None,
    ) -> None:
        super().__init__()
        shape = (batch_size, num_heads, max_seq_len, head_dim)
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        for name in ("k_cache", "v_cache"):
            cache = torch.zeros(shape, dtype=dtype, device=device)
            self.register_buffer(name, cache, persistent=False)

    def reset(self) -> None:
        """Zero the cache (start new sequences)."""
        self.k_cache.zero_()
        self.v_cache.zero_()

    def update(self, input_pos: torch.Tensor, k_val: torch.Tensor, v_val: torch.Tensor) -> tuple:
        """Write ``k_val``/``v_val`` at positions ``input_pos`` and return the whole cache.

        Args:
            input_pos: ``LongTensor[b, s]`` slots to write (one row per sequence).
            k_val: ``[b, n_kv, s, h_d]`` new keys.
            v_val: ``[b, n_kv, s, h_d]`` new values.

        Returns:
            ``(k, v)``, each ``[b, n_kv, max_seq_len, h_d]`` (the first ``b`` cache rows).

        Raises:
            ValueError: if the batch is larger than the cache or shapes disagree.
        """
        b, _, s, _ = k_val.shape
        if b > self.batch_size:
            raise ValueError(f"KVCache holds batch_size={self.batch_size}, got a batch of {b}")
        if input_pos.shape != (b, s):
            raise ValueError(f"input_pos must have shape {(b, s)}, got {tuple(input_pos.shape)}")
        k_out, v_out = self.k_cache[:b], self.v_cache[:b]
        rows = torch.arange(b, device=input_pos.device).unsqueeze(1)  # [b, 1]
        # Advanced indices on dims 0 and 2 put [b, s] first: values go in as [b, s, n_kv, h_d].
        k_out[rows, :, input_pos] = k_val.transpose(1, 2).to(k_out.dtype)
        v_out[rows, :, input_pos] = v_val.transpose(1, 2).to(v_out.dtype)
        return k_out, v_out
