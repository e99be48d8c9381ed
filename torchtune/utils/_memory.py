# Copyright (c) torchtune contributors. BSD-3-Clause license.
import ctypes
import platform
import resource
import sys
from typing import Dict, Union

import torch

_GIB = 1024**3


def get_memory_stats(device: Union[str, torch.device]) -> Dict[str, float]:
    """Peak memory of this process so far, in GiB.

    On CUDA, ``peak_memory_gib`` is the peak of tensor memory (``max_memory_allocated``) and
    ``peak_memory_reserved_gib`` what the caching allocator held; on other devices it is the
    process's peak resident set size, which includes Python and library overhead.

    Args:
        device: the training device.

    Returns:
        ``{"peak_memory_gib": float, ...}``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return {
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / _GIB,
            "peak_memory_reserved_gib": torch.cuda.max_memory_reserved(device) / _GIB,
        }
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    rss_bytes = max_rss if sys.platform == "darwin" else max_rss * 1024
    return {"peak_memory_gib": rss_bytes / _GIB}


def reset_peak_memory_stats(device: Union[str, torch.device]) -> None:
    """Restart CUDA peak tracking (a no-op elsewhere: peak RSS cannot be reset)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def retain_freed_cpu_memory() -> bool:
    """Keep memory that tensors free inside this process for reuse instead of returning it.

    glibc's malloc serves each allocation over its mmap threshold (128 KiB to 32 MiB) with a
    fresh ``mmap`` and gives it back on free, and trims the top of its heap; a training step
    that frees and reallocates its activations and gradients then first-touches them again
    every step, one page fault per 4 KiB page (about 15 us each on a virtual machine, which
    cost up to a fifth of a CPU step here). This turns both off for the whole process
    (``M_MMAP_MAX=0``, ``M_TRIM_THRESHOLD=-1``): freed blocks stay in the heap and the next
    step reuses them. The peak RSS stays the same; RSS no longer falls after it.

    Only glibc on Linux has these knobs; elsewhere (musl, macOS, Windows) nothing changes.
    Intended for CPU training processes; CUDA runs leave the host allocator alone.

    Returns:
        True if the setting was applied.
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    # mallopt returns 1 on success.
    return libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
