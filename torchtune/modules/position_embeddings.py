# Copyright (c) torchtune contributors. BSD-3-Clause license.
import math
from typing import Any, Dict, Optional

import torch
from torch import nn

# rope_type -> the keys its scaling dict must hold (besides rope_type).
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def check_rope_scaling(scaling: Optional[Dict[str, Any]]) -> None:
    """Raise unless ``scaling`` is None or a ``{"rope_type": ..., <its keys>}`` we implement.

    Raises:
        ValueError: on an unknown ``rope_type`` or a missing key, naming it.
    """
    if scaling is None:
        return
    rope_type = scaling.get("rope_type")
    if rope_type not in ROPE_SCALING_KEYS:
        raise ValueError(
            f"rope scaling rope_type '{rope_type}' is not implemented; supported: "
            f"{sorted(ROPE_SCALING_KEYS)} (or no scaling)"
        )
    missing = [k for k in ROPE_SCALING_KEYS[rope_type] if scaling.get(k) is None]
    if missing:
        raise ValueError(f"rope scaling of rope_type '{rope_type}' lacks {missing}: {scaling}")


def rope_inv_freq(
    dim: int,
    base: float = 10_000.0,
    scaling: Optional[Dict[str, Any]] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """The rotary frequencies ``base ** (-2i / dim)``, optionally rescaled, in fp32.

    Args:
        dim: head dimension.
        base: the rotary base (``rope_theta``).
        scaling: None, or ``{"rope_type": "linear", "factor": f}`` (every frequency / f:
            positions interpolated), or ``{"rope_type": "llama3", "factor",
            "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}``
            (Llama 3.1: wavelengths longer than ``original / low_freq_factor`` are divided
            by ``factor``, shorter than ``original / high_freq_factor`` kept, and those in
            between blended linearly in ``original / wavelength``).

    Returns:
        ``[dim / 2]`` fp32 frequencies.

    Raises:
        ValueError: on a scaling we do not implement (see :func:`check_rope_scaling`).
    """
    check_rope_scaling(scaling)
    half = torch.arange(0, dim, 2, device=device, dtype=torch.float32)
    inv_freq = 1.0 / (base ** (half / dim))  # [h_d/2]
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        # Scaling the frequencies is scaling the positions: angle = (p / f) * inv_freq.
        return inv_freq / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen, high_freq_wavelen = original / low, original / high
    # Long wavelengths (low frequencies) see positions past the pretraining context: slow them.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)  # 0 at low_freq_wavelen, 1 at high
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, blended, scaled)


def rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The plain rotation, HF's ``x * cos + rotate_half(x) * sin`` written on the halves.

    Args:
        x: ``[..., h_d]``; its halves ``x1 = x[..., :h_d/2]``, ``x2 = x[..., h_d/2:]``.
        cos, sin: broadcastable to ``[..., h_d/2]``.

    Returns:
        ``cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)``, shape of ``x``.
    """
    x1, x2 = x.unflatten(-1, (2, x.shape[-1] // 2)).unbind(-2)  # each [..., h_d/2]
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-2).flatten(-2)


def _rotate_into_new(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float):
    if torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad):
        # Differentiating this (double backward, torch.func.grad): out= ops are not.
        return rotate_halves(x, cos, sin * sign)
    # Each half written in place into one output: no stack copy, no per-product temporaries.
    h = x.shape[-1] // 2
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x1, x2, o1, o2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin, value=sign)
    return out


class _RotateHalves(torch.autograd.Function):
    """:func:`rotate_halves` with a closed-form backward: a rotation's transpose is the
    rotation by the opposite angle, so the input gradient is ``grad`` rotated by ``-angle``
    and only cos/sin are kept. CPU forward + backward, fp32, 1 thread, ``[4, 512, 12, 64]`` /
    ``[1, 2048, 32, 128]``: 6.8 / 40 ms, against 10.3 / 66 ms for autograd through
    :func:`rotate_halves`, 13 / 110 ms for ``x * cos + rotate_half(x) * sin`` and 15 / 128 ms
    for a complex multiply on ``torch.complex(x1, x2)`` (its copies cost more than it saves).
    """

    @staticmethod
    def forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return _rotate_into_new(x, cos, sin, 1.0)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # separate, so torch.func transforms work
        _, cos, sin = inputs
        ctx.save_for_backward(cos, sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate_into_new(grad, cos, sin, -1.0), None, None


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
        scaling: None, or a frequency rescaling (``linear`` or Llama 3.1's ``llama3``; see
            :func:`rope_inv_freq`).

    Raises:
        ValueError: if ``dim`` is odd or ``scaling`` is not implemented.
    """

    def __init__(
        self,
        dim: int,
        max_seq_len: int = 4096,
        base: float = 10_000.0,
        scaling: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        if dim % 2 != 0:
            raise ValueError(f"RotaryPositionalEmbeddings needs an even dim, got dim={dim}")
        check_rope_scaling(scaling)
        self.dim = dim
        self.max_seq_len = max_seq_len
        self.base = base
        self.scaling = dict(scaling) if scaling is not None else None
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
        theta = rope_inv_freq(self.dim, self.base, self.scaling, device)  # [h_d/2]
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
        if torch.compiler.is_compiling():
            # Inductor fuses the plain form into one kernel, forward and backward alike.
            return rotate_halves(x.float(), cos, sin).type_as(x)
        return _RotateHalves.apply(x.float(), cos, sin).type_as(x)

    def extra_repr(self) -> str:
        scaling = f", scaling={self.scaling}" if self.scaling else ""
        return f"dim={self.dim}, max_seq_len={self.max_seq_len}, base={self.base}{scaling}"


def longrope_attention_factor(factor: float, original: int) -> float:
    """LongRoPE's default scale on cos/sin: ``sqrt(1 + ln(f) / ln(original))`` for the context
    extension ``f`` (``max_position_embeddings / original`` unless the config gives
    ``factor``; 1 when ``f <= 1``), as transformers derives it when the config gives no
    ``attention_factor``."""
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


class PartialRotaryPositionalEmbeddings(nn.Module):
    """RoPE on the first ``rotary_dim`` channels of each head, optionally with LongRoPE.

    Channels ``[0, rotary_dim)`` rotate as in :class:`RotaryPositionalEmbeddings` (halves of
    that slice, frequencies ``base ** (-2i / rotary_dim)``); the rest pass through (Phi-4
    mini's ``partial_rotary_factor`` 0.75). With ``longrope`` (Phi-3.5 / Phi-4 mini), each
    frequency is divided by its per-channel factor, and cos/sin are multiplied by
    ``attention_factor``. Which factor list applies depends on the forward's longest
    position, as in transformers: ``long_factor`` when ``max(input_pos) + 1`` exceeds
    ``original_max_position_embeddings``, ``short_factor`` otherwise, for all tokens of that
    forward. A KV cache filled below that length holds short-factor keys, so decoding that
    crosses it must re-encode the sequence, as transformers' ``generate`` does:
    :func:`~torchtune.utils.generate` does so at :attr:`switch_length`, and sets
    :attr:`seq_len_override` to the sequence's length (its parked pad slots are no positions).

    Args:
        dim: head dimension.
        max_seq_len: largest position + 1 that can be embedded.
        base: the rotary base (``rope_theta``).
        rotary_dim: channels rotated (even, at most ``dim``); ``dim`` when None.
        longrope: None, or ``{"short_factor": [rotary_dim / 2 floats], "long_factor": [...],
            "original_max_position_embeddings": int, "attention_factor": float}``.

    Raises:
        ValueError: on an odd or too large ``rotary_dim``, or a ``longrope`` dict with a
            missing key or factor lists of the wrong length.
    """

    _LONGROPE_KEYS = (
        "short_factor",
        "long_factor",
        "original_max_position_embeddings",
        "attention_factor",
    )

    def __init__(
        self,
        dim: int,
        max_seq_len: int = 4096,
        base: float = 10_000.0,
        rotary_dim: Optional[int] = None,
        longrope: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        rotary_dim = dim if rotary_dim is None else rotary_dim
        if rotary_dim % 2 != 0 or not 0 < rotary_dim <= dim:
            raise ValueError(f"rotary_dim must be even and in (0, dim={dim}], got {rotary_dim}")
        if longrope is not None:
            missing = [k for k in self._LONGROPE_KEYS if longrope.get(k) is None]
            if missing:
                raise ValueError(f"longrope lacks {missing}: {longrope}")
            for key in ("short_factor", "long_factor"):
                if len(longrope[key]) != rotary_dim // 2:
                    raise ValueError(
                        f"longrope {key} has {len(longrope[key])} entries, expected "
                        f"rotary_dim / 2 = {rotary_dim // 2}"
                    )
            longrope = {k: longrope[k] for k in self._LONGROPE_KEYS}
        self.dim = dim
        self.max_seq_len = max_seq_len
        self.base = base
        self.rotary_dim = rotary_dim
        self.longrope = longrope
        shape = (max_seq_len, 2, rotary_dim // 2)
        self.register_buffer("cache", torch.empty(shape), persistent=False)
        # The long table serves only positions past the original length: none fit below it.
        self._has_long = (
            longrope is not None and max_seq_len > longrope["original_max_position_embeddings"]
        )
        if self._has_long:
            self.register_buffer("long_cache", torch.empty(shape), persistent=False)
        # Set by a caller that knows the sequence's length better than max(input_pos) + 1.
        self.seq_len_override: Optional[int] = None
        self.rope_init()

    @property
    def switch_length(self) -> Optional[int]:
        """The longest sequence that takes the short factors (the long ones past it), or None
        when one table serves every position."""
        return int(self.longrope["original_max_position_embeddings"]) if self._has_long else None

    def _table(self, factors: Optional[list], device: torch.device) -> torch.Tensor:
        half = torch.arange(0, self.rotary_dim, 2, device=device, dtype=torch.float32)
        powers = self.base ** (half / self.rotary_dim)  # [rd/2]
        scale = 1.0
        if factors is not None:
            # 1 / (factor * base ** (2i / rd)), the product as transformers forms it.
            powers = torch.tensor(factors, dtype=torch.float32, device=device) * powers
            scale = float(self.longrope["attention_factor"])
        positions = torch.arange(self.max_seq_len, device=device, dtype=torch.float32)
        angles = torch.outer(positions, 1.0 / powers)  # [max_seq_len, rd/2]
        cos, sin = angles.cos(), angles.sin()
        if factors is not None:
            cos, sin = cos * scale, sin * scale
        return torch.stack([cos, sin], dim=1)  # [max_seq_len, 2, rd/2]

    def rope_init(self, device: Optional[torch.device] = None) -> None:
        """(Re)compute the fp32 cos/sin tables (nothing happens on the meta device)."""
        device = torch.device(device) if device is not None else self.cache.device
        if device.type == "meta":
            return
        if self.longrope is None:
            self.cache = self._table(None, device)
        else:
            self.cache = self._table(self.longrope["short_factor"], device)
        if self._has_long:
            self.long_cache = self._table(self.longrope["long_factor"], device)

    def reset_parameters(self) -> None:
        self.rope_init()

    def _apply(self, fn, recurse=True):
        # As RotaryPositionalEmbeddings: fp32 through .to(bf16), refilled after to_empty.
        was_meta = self.cache.is_meta
        super()._apply(fn, recurse)
        if not self.cache.is_meta and (was_meta or self.cache.dtype != torch.float32):
            self.rope_init()
        return self

    def forward(self, x: torch.Tensor, *, input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            x: ``[b, s, n_h, h_d]`` queries or keys.
            input_pos: optional ``LongTensor[b, s]`` positions; ``arange(s)`` if None.

        Returns:
            Tensor of the shape and dtype of ``x``; the rotated channels computed in fp32.
        """
        b, s, n_h, h_d = x.shape
        if self.cache.is_meta:
            self.rope_init(x.device)
        table = self.cache
        if self._has_long:
            longest = self.seq_len_override
            if longest is None:
                # A CPU-GPU sync when input_pos is given, as in transformers' longrope update.
                longest = s if input_pos is None else int(input_pos.max()) + 1
            if longest > self.longrope["original_max_position_embeddings"]:
                table = self.long_cache
        rope = table[:s] if input_pos is None else table[input_pos]
        half = self.rotary_dim // 2
        cos, sin = rope.view(-1, s, 1, 2, half).unbind(-2)  # each [b or 1, s, 1, rd/2]
        rot = x[..., : self.rotary_dim].float()
        if torch.compiler.is_compiling():
            rot = rotate_halves(rot, cos, sin)
        else:
            rot = _RotateHalves.apply(rot, cos, sin)
        if self.rotary_dim == h_d:
            return rot.type_as(x)
        return torch.cat([rot.type_as(x), x[..., self.rotary_dim :]], dim=-1)

    def extra_repr(self) -> str:
        longrope = ", longrope" if self.longrope else ""
        return (
            f"dim={self.dim}, rotary_dim={self.rotary_dim}, max_seq_len={self.max_seq_len}, "
            f"base={self.base}{longrope}"
        )
