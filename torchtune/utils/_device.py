# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Pick the device and the training dtype, refusing combinations the hardware cannot run."""

import contextlib
from typing import Iterator, Optional, Union

import torch

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def get_device(device: Optional[str] = None) -> torch.device:
    """The ``torch.device`` to train on.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``; None picks CUDA when present,
            else CPU. A bare ``"cuda"`` means the current CUDA device.

    Returns:
        The device.

    Raises:
        ValueError: if the device is unknown or not available on this machine.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"Unknown device '{device}': expected cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device} but CUDA is not available on this machine (torch "
                f"{torch.__version__}, built {'without' if torch.version.cuda is None else 'with'} "
                "CUDA); set device=cpu, or run on a machine with an NVIDIA GPU and a CUDA build "
                "of torch"
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device} but only {torch.cuda.device_count()} CUDA device(s) exist; "
                "set device=cuda (each rank picks its own) or a lower index"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(
                f"device={device} but MPS is not available on this machine; set device=cpu"
            )
    elif dev.type != "cpu":
        raise ValueError(f"Unsupported device '{device}': expected cpu, cuda, cuda:N or mps")
    return dev


def get_dtype(dtype: Optional[str], device: Union[str, torch.device, None] = None) -> torch.dtype:
    """The parameter dtype to train in.

    fp16 is refused: training in it needs loss scaling, which the recipes do not do; bf16 has
    fp32's range and needs none.

    Args:
        dtype: ``"fp32"``/``"float32"``, ``"bf16"``/``"bfloat16"``; None means fp32.
        device: where training runs; bf16 is checked against it.

    Returns:
        ``torch.float32`` or ``torch.bfloat16``.

    Raises:
        ValueError: on an unknown dtype, fp16, or bf16 on a device without bf16 support.
    """
    if dtype is None:
        return torch.float32
    if dtype in ("fp16", "float16", "half"):
        raise ValueError(
            f"dtype='{dtype}' is not supported: fp16 training needs loss scaling; use bf16 or fp32"
        )
    if dtype not in _DTYPES:
        raise ValueError(f"Unknown dtype '{dtype}': expected one of {sorted(_DTYPES)}")
    torch_dtype = _DTYPES[dtype]
    if torch_dtype == torch.bfloat16:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
            name = torch.cuda.get_device_name(dev)
            raise ValueError(
                f"dtype='{dtype}' but the GPU '{name}' does not support bf16 (needs compute "
                "capability 8.0+, e.g. A100/H100); use dtype=fp32"
            )
        if dev.type == "mps" and not torch.backends.mps.is_macos_or_newer(14, 0):
            raise ValueError(f"dtype='{dtype}' needs macOS 14+ on MPS; use dtype=fp32")
    return torch_dtype


@contextlib.contextmanager
def set_default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create floating-point tensors (e.g. a model's parameters) in ``dtype`` inside the block."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
