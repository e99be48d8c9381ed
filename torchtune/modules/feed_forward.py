# Copyright (c) torchtune contributors. BSD-3-Clause license.
import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    """SwiGLU feed-forward: ``w2(silu(w1(x)) * w3(x))``.

    Args:
        gate_proj: ``dim -> hidden`` projection passed through SiLU (stored as ``w1``).
        down_proj: ``hidden -> dim`` projection (stored as ``w2``).
        up_proj: ``dim -> hidden`` projection that gates (stored as ``w3``).
    """

    def __init__(self, gate_proj: nn.Module, down_proj: nn.Module, up_proj: nn.Module) -> None:
        super().__init__()
        self.w1 = gate_proj
        self.w2 = down_proj
        self.w3 = up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``[..., dim]``.

        Returns:
            ``[..., dim]``.
        """
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
