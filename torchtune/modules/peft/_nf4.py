# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Frozen linear weights in 4-bit NormalFloat (NF4), as QLoRA stores its base model.

QLoRA (Dettmers et al. 2023): each block of 64 consecutive weights (row-major) is divided by
its absolute maximum and every value replaced by the nearest of the 16 NF4 code values (two
codes a byte). With double quantization the fp32 block scales are themselves quantized: their
mean is subtracted and the rest stored as 8-bit codes in blocks of 256, each block with an
fp32 scale, which takes the scales' cost from 0.5 to about 0.127 bits a weight.

bitsandbytes does the arithmetic, through the torch ops it registers
(``torch.ops.bitsandbytes.*``, with CPU and CUDA kernels); it is imported only when a
quantized layer is built. What is stored here is exactly what
``bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4",
compress_statistics=double_quant)`` returns, so ``dequantize_4bit`` of that is our weight.
"""

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_SIZE = 64  # weights per NF4 block (QLoRA's choice)
SCALE_BLOCK_SIZE = 256  # block scales per 8-bit block under double quantization
BNB_PIN = "bitsandbytes==0.50.2"


def _bnb_ops():
    """``torch.ops.bitsandbytes``, registered on importing bitsandbytes."""
    try:
        import bitsandbytes  # noqa: F401  (registers the ops)
        import bitsandbytes.functional as bnb_f
    except ImportError as e:  # an optional dependency: only quantize_base needs it
        raise ImportError(
            f"quantize_base=True stores weights in NF4 with bitsandbytes: pip install {BNB_PIN}"
        ) from e
    return torch.ops.bitsandbytes, bnb_f


def nf4_buffer_specs(
    out_dim: int, in_dim: int, double_quant: bool
) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """Name -> ``(shape, dtype)`` of what an ``[out_dim, in_dim]`` NF4 weight stores.

    ``packed``: two 4-bit codes a byte; ``absmax``: one scale a block of 64 (fp32, or uint8
    codes under double quantization); with double quantization also ``absmax_scale`` (fp32,
    one a block of 256 scales), ``absmax_offset`` (fp32, their mean) and ``absmax_code`` (the
    256 values of bitsandbytes' signed dynamic 8-bit map).
    """
    n = out_dim * in_dim
    n_blocks = -(-n // BLOCK_SIZE)
    specs = {"packed": (((n + 1) // 2, 1), torch.uint8)}
    if not double_quant:
        specs["absmax"] = ((n_blocks,), torch.float32)
        return specs
    specs["absmax"] = ((n_blocks,), torch.uint8)
    specs["absmax_scale"] = ((-(-n_blocks // SCALE_BLOCK_SIZE),), torch.float32)
    specs["absmax_offset"] = ((), torch.float32)
    specs["absmax_code"] = ((256,), torch.float32)
    return specs


def quantize_nf4(weight: torch.Tensor, double_quant: bool = True) -> Dict[str, torch.Tensor]:
    """NF4 codes and scales of ``weight``, in blocks of 64 (see :func:`nf4_buffer_specs`).

    Args:
        weight: ``[out_dim, in_dim]``, fp32, bf16 or fp16 (quantized as given).
        double_quant: quantize the block scales too (QLoRA's double quantization).

    Returns:
        ``{name: tensor}`` on ``weight``'s device.
    """
    ops, bnb_f = _bnb_ops()
    packed, absmax = ops.quantize_4bit(weight.contiguous(), BLOCK_SIZE, "nf4", torch.uint8)
    if not double_quant:
        return {"packed": packed, "absmax": absmax}
    code = bnb_f.create_dynamic_map(signed=True).to(weight.device)
    offset = absmax.mean()
    q_absmax, absmax_scale = ops.quantize_blockwise(absmax - offset, code, SCALE_BLOCK_SIZE)
    return {
        "packed": packed,
        "absmax": q_absmax,
        "absmax_scale": absmax_scale,
        "absmax_offset": offset,
        "absmax_code": code,
    }


def dequantize_nf4(
    q: Dict[str, torch.Tensor], shape: Tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """The weight that :func:`quantize_nf4` stored.

    Args:
        q: its tensors.
        shape: ``(out_dim, in_dim)``.
        dtype: of the result.

    Returns:
        ``[out_dim, in_dim]`` in ``dtype``.
    """
    ops, _ = _bnb_ops()
    absmax = q["absmax"]
    if "absmax_scale" in q:
        absmax = _dequantize_scales(absmax, q["absmax_scale"], q["absmax_code"])
        absmax += q["absmax_offset"]
    return ops.dequantize_4bit(q["packed"], absmax, BLOCK_SIZE, "nf4", list(shape), dtype)


def _dequantize_scales(codes: torch.Tensor, scales: torch.Tensor, code: torch.Tensor):
    """``code[codes] * scales[block]`` over blocks of 256, in fp32: the same products as
    bitsandbytes' ``dequantize_blockwise`` (one fp32 multiply each), written as a gather and
    one broadcast multiply because its CPU kernel took 17x as long here (12.6 ms against 0.7
    for the 262k scales of an 8192 x 2048 weight, 2 threads), a fifth of a dequantization.

    Args:
        codes: ``uint8[n]``; scales: ``[ceil(n / 256)]`` fp32; code: the 256 code values.

    Returns:
        ``[n]`` fp32.
    """
    out = code[codes.long()]  # [n], a fresh tensor: scaled in place
    full = out.numel() - out.numel() % SCALE_BLOCK_SIZE
    out[:full].view(-1, SCALE_BLOCK_SIZE).mul_(scales[: full // SCALE_BLOCK_SIZE, None])
    if full < out.numel():  # the last, partial block
        out[full:].mul_(scales[-1])
    return out


class NF4Weight(nn.Module):
    """An ``[out_dim, in_dim]`` weight stored in NF4; it owns no state-dict keys.

    The layer that holds it reads and writes its ``weight`` key (full precision) through
    :meth:`quantize_` and :meth:`dequantize`. Codes and scales are non-persistent buffers, so
    they move with ``.to(device)`` and ``to_empty``; the fp32 scales are kept as raw bytes
    (uint8 views) because ``model.to(torch.bfloat16)`` casts every floating-point buffer and
    would round them. ``dtype`` (the model's dtype, which dequantized weights come out in)
    is read from a zero-size floating-point buffer that such casts do convert.

    Args:
        out_dim: output features.
        in_dim: input features.
        double_quant: quantize the block scales too.
    """

    def __init__(self, out_dim: int, in_dim: int, double_quant: bool = True) -> None:
        super().__init__()
        self.out_dim, self.in_dim, self.double_quant = out_dim, in_dim, double_quant
        self._specs = nf4_buffer_specs(out_dim, in_dim, double_quant)
        for name, (shape, dtype) in self._specs.items():
            nbytes = dtype.itemsize * max(1, torch.Size(shape).numel())
            shape = shape if dtype == torch.uint8 else (nbytes,)
            self.register_buffer(name, torch.zeros(shape, dtype=torch.uint8), persistent=False)
        self.register_buffer("dtype_probe", torch.empty(0), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.dtype_probe.dtype

    def _tensors(self) -> Dict[str, torch.Tensor]:
        out = {}
        for name, (shape, dtype) in self._specs.items():
            buf = getattr(self, name)
            out[name] = buf if dtype == torch.uint8 else buf.view(dtype).view(shape)
        return out

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor) -> None:
        """Store ``weight`` (cast to :attr:`dtype` first, as a plain layer's ``copy_``
        would), quantized on this module's device.

        Raises:
            ValueError: if ``weight`` is not ``[out_dim, in_dim]``.
        """
        if tuple(weight.shape) != (self.out_dim, self.in_dim):
            raise ValueError(
                f"NF4 weight of shape {(self.out_dim, self.in_dim)} got {tuple(weight.shape)}"
            )
        device = self.packed.device
        q = quantize_nf4(weight.to(device=device, dtype=self.dtype), self.double_quant)
        for name, (_, dtype) in self._specs.items():
            buf = getattr(self, name)
            src = q[name] if dtype == torch.uint8 else q[name].reshape(-1).view(torch.uint8)
            buf.copy_(src.reshape(buf.shape))

    def dequantize(self, dtype: torch.dtype = None) -> torch.Tensor:
        """The stored weight, ``[out_dim, in_dim]`` in ``dtype`` (default :attr:`dtype`)."""
        return dequantize_nf4(self._tensors(), (self.out_dim, self.in_dim), dtype or self.dtype)

    def extra_repr(self) -> str:
        return (
            f"out_dim={self.out_dim}, in_dim={self.in_dim}, block_size={BLOCK_SIZE}, "
            f"double_quant={self.double_quant}"
        )


class _LinearNF4(torch.autograd.Function):
    """``x @ W^T`` with ``W`` dequantized in forward and again in backward: autograd keeps
    the 4-bit codes, never the full-precision weight (which gets no gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, nf4: NF4Weight) -> torch.Tensor:
        ctx.nf4 = nf4
        return F.linear(x, nf4.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out @ ctx.nf4.dequantize(grad_out.dtype), None


def linear_nf4(x: torch.Tensor, nf4: NF4Weight) -> torch.Tensor:
    """``x @ W^T`` for an NF4-stored ``W``.

    Args:
        x: ``[..., in_dim]``.
        nf4: the weight.

    Returns:
        ``[..., out_dim]`` in ``x``'s dtype.
    """
    return _LinearNF4.apply(x, nf4)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (QLoRA's base layers that get no
    adapter). Its state dict is ``nn.Linear``'s: ``weight`` (dequantized, in the model dtype)
    and ``bias``; loading a full-precision ``weight`` quantizes it.

    Args:
        in_dim: input features.
        out_dim: output features.
        use_bias: whether it has a bias (kept in the model dtype).
        double_quant: quantize the block scales too.
    """

    def __init__(
        self, in_dim: int, out_dim: int, use_bias: bool = False, double_quant: bool = True
    ) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.weight_nf4 = NF4Weight(out_dim, in_dim, double_quant)
        # ``weight`` exists (as None, like an unset parameter) for code that walks attribute
        # paths of state-dict keys, e.g. torch.distributed.checkpoint's.
        self.register_parameter("weight", None)
        self.bias = nn.Parameter(torch.zeros(out_dim), requires_grad=False) if use_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``[..., in_dim]``.

        Returns:
            ``[..., out_dim]``.
        """
        out = linear_nf4(x, self.weight_nf4)
        return out if self.bias is None else out + self.bias

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        save_nf4_weight(self.weight_nf4, destination, prefix)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        load_nf4_weight(self.weight_nf4, state_dict, prefix, super()._load_from_state_dict, args)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, bias={self.bias is not None}"


def save_nf4_weight(nf4: NF4Weight, destination: Dict, prefix: str) -> None:
    """Put the dequantized weight under ``prefix + "weight"`` (``state_dict()``'s side)."""
    destination[prefix + "weight"] = nf4.dequantize()


def load_nf4_weight(nf4: NF4Weight, state_dict, prefix, parent_load, args) -> None:
    """``_load_from_state_dict`` of a layer with an NF4 ``weight``: quantize
    ``state_dict[prefix + "weight"]`` into ``nf4``, let ``parent_load`` (``nn.Module``'s)
    load the rest, and report ``weight`` as missing / never as unexpected."""
    local_metadata, strict, missing_keys, unexpected_keys, error_msgs = args
    key = prefix + "weight"
    if key in state_dict:
        try:
            nf4.quantize_(state_dict[key])
        except ValueError as e:
            error_msgs.append(f"{key}: {e}")
    else:
        missing_keys.append(key)
    parent_load(
        state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    )
    if key in unexpected_keys:
        unexpected_keys.remove(key)
