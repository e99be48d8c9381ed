# Copyright (c) torchtune contributors. BSD-3-Clause license.
from typing import Optional

import torch
from torch import nn


class RotaryPositionalEmbeddings(nn.Module):
    """Rotary positional embeddings (RoFormer, Su et al. 2021) in Meta's Llama layout.

    Each head vector is split into interleaved pairs ``(x[..., 0::2], x[..., 1::2])`` and pair
    ``i`` at position ``p`` is rotated by the angle ``p * base ** (-2i / dim)``. cos/sin are
    cached in fp32 for positions ``[0, max_seq_len)`` in a non-persistent buffer, so they never
    reach a checkpoint. When the module is built on the meta device, call :meth:`rope_init`
    (or :meth:`reset_parameters`) after ``to_empty`` to fill the cache.

    Args:
        dim: head dimension (must be even).
        max_seq_len: largest position + 1 that can be embedded.
        base: the rotary base (``rope_theta``).

    Raises:
        ValueError: if ``dim`` is odd.
    """

    def __init__(self, dim: int, max_seq_len: int = 4096, base: float = 10_000.0) -> None:
        super().__init__()
        if dim % 2 != 0:
            raise ValueError(f"RotaryPositionalEmbeddings needs an even dim, got dim={dim}")
        self.dim = dim
        self.max_seq_len = max_seq_len
        self.base = base
        self.register_buffer(
            "cache", torch.empty(max_seq_len, dim // 2, 2, dtype=torch.float32), persistent=False
        )
        self.rope_init()

    def rope_init(self, device: Optional[torch.device] = None) -> None:
        """(Re)compute the cos/sin cache in fp32.

        Args:
            device: where to put it; the cache's current device when None. Nothing happens
                while that is the meta device.
        """
        device = torch.device(device) if device is not None else self.cache.device
        if device.type == "meta":
            return
        half = torch.arange(0, self.dim, 2, device=device, dtype=torch.float32)
        theta = 1.0 / (self.base ** (half / self.dim))  # [h_d/2]
        positions = torch.arange(self.max_seq_len, device=device, dtype=torch.float32)
        angles = torch.outer(positions, theta)  # [max_seq_len, h_d/2]
        # Assigning a registered buffer name keeps it registered (and non-persistent).
        self.cache = torch.stack([angles.cos(), angles.sin()], dim=-1)

    def reset_parameters(self) -> None:
        self.rope_init()

    def _apply(self, fn, recurse=True):
        # Keep the cache fp32 through ``model.to(bf16)``, and refill it after
        # ``to_empty`` off the meta device, where its values are garbage.
        was_meta = self.cache.is_meta
        super()._apply(fn, recurse)
        if not self.cache.is_meta and (was_meta or self.cache.dtype != torch.float32):
            self.rope_init()
        return self

    def forward(self, x: torch.Tensor, *, input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            x: ``[b, s, n_h, h_d]`` queries or keys.
            input_pos: optional ``LongTensor[b, s]`` positions of the tokens; ``arange(s)`` if None.

        Returns:
            Tensor of the same shape and dtype as ``x``, rotated (computed in fp32).
        """
        b, s, n_h, h_d = x.shape
        if self.cache.is_meta:
            # Built on meta and loaded with load_state_dict(assign=True): the
            # non-persistent cache was never materialised.
            self.rope_init(x.device)
        if torch.compiler.is_compiling():
            # Inductor has no complex codegen; it fuses this real form into one kernel.
            return self._rotate_real(x, input_pos)
        # [pos, h_d/2] complex cos + i*sin: one vectorised complex multiply, forward and
        # backward, instead of strided pair arithmetic and a stack (~8x faster on CPU).
        freqs = torch.view_as_complex(self.cache)
        freqs = (
            freqs[:s].view(1, s, 1, h_d // 2)
            if input_pos is None
            else (freqs[input_pos].view(b, s, 1, h_d // 2))
        )
        x_c = torch.view_as_complex(x.float().reshape(b, s, n_h, h_d // 2, 2))
        return torch.view_as_real(x_c * freqs).flatten(3).type_as(x)

    def _rotate_real(self, x: torch.Tensor, input_pos: Optional[torch.Tensor]) -> torch.Tensor:
        b, s, n_h, h_d = x.shape
        if input_pos is None:
            rope = self.cache[:s].view(1, s, 1, h_d // 2, 2)
        else:
            rope = self.cache[input_pos].view(b, s, 1, h_d // 2, 2)
        x_pairs = x.float().reshape(b, s, n_h, h_d // 2, 2)  # [b, s, n_h, h_d/2, 2]
        x0, x1 = x_pairs[..., 0], x_pairs[..., 1]
        cos, sin = rope[..., 0], rope[..., 1]
        out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
        return out.flatten(3).type_as(x)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_seq_len={self.max_seq_len}, base={self.base}"
