# Copyright (c) torchtune contributors. BSD-3-Clause license.
from typing import Optional

import torch
from torch import nn


class RotaryPositionalEmbeddings(nn.Module):
    """Rotary positional embeddings (RoFormer, Su et al. 2021) in Hugging Face's layout.

    Each head vector is split into halves ``x1 = x[..., :dim/2]``, ``x2 = x[..., dim/2:]``;
    the pair ``(x1[i], x2[i])`` at position ``p`` is rotated by the angle
    ``p * base ** (-2i / dim)`` (HF's ``rotate_half``). With this layout an HF checkpoint of
    any family loads by renaming keys alone; Meta's checkpoints (interleaved pairs) get their
    q/k rows permuted once, in the Meta converter.

    cos/sin are cached in fp32 for positions ``[0, max_seq_len)`` in a non-persistent buffer,
    so they never reach a checkpoint. When the module is built on the meta device, call
    :meth:`rope_init` (or :meth:`reset_parameters`) after ``to_empty`` to fill the cache.

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
            "cache", torch.empty(max_seq_len, 2, dim // 2, dtype=torch.float32), persistent=False
        )
        self.rope_init()

    def rope_init(self, device: Optional[torch.device] = None) -> None:
        """(Re)compute the cos/sin cache in fp32: ``cache[p, 0] = cos``, ``cache[p, 1] = sin``.

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
        self.cache = torch.stack([angles.cos(), angles.sin()], dim=1)  # [max_seq_len, 2, h_d/2]

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
        rope = self.cache[:s] if input_pos is None else self.cache[input_pos]
        cos, sin = rope.view(-1, s, 1, 2, h_d // 2).unbind(-2)  # each [b or 1, s, 1, h_d/2]
        # Arithmetic on the two halves, measured on CPU forward+backward against a complex
        # multiply on torch.complex(x1, x2) (1.6-2.2x slower) and x * cos + rotate_half(x) *
        # sin with width-h_d tables (1.3-1.8x slower). It is real, so torch.compile fuses it.
        x1, x2 = x.float().unflatten(-1, (2, h_d // 2)).unbind(-2)  # each [b, s, n_h, h_d/2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-2)
        return out.flatten(-2).type_as(x)  # [b, s, n_h, 2, h_d/2] -> [b, s, n_h, h_d]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_seq_len={self.max_seq_len}, base={self.base}"
