# Copyright (c) torchtune contributors. BSD-3-Clause license.
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
