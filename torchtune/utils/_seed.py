# Copyright (c) torchtune contributors. BSD-3-Clause license.
import os
import random
from typing import Optional

import torch

_MAX_SEED = 2**32 - 1


def set_seed(seed: Optional[int] = None) -> int:
    """Seed Python's, NumPy's (when installed) and torch's (CPU and all CUDA) generators.

    Args:
        seed: a value in ``[0, 2**32 - 1]``; None draws one from the OS so the run can still
            be reproduced from the returned value.

    Returns:
        The seed used.

    Raises:
        ValueError: if ``seed`` is out of range.
    """
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    if not 0 <= int(seed) <= _MAX_SEED:
        raise ValueError(f"seed must be in [0, {_MAX_SEED}], got {seed}")
    seed = int(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    torch.manual_seed(seed)  # also seeds every CUDA device
    return seed
