# Copyright (c) torchtune contributors. BSD-3-Clause license.
import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, 2019) with a learned per-channel scale.

    The statistic is computed in fp32 and the normalised input is cast back to the input dtype
    before scaling, as Llama does, so bf16 training keeps a stable norm.

    Args:
        dim: size of the last dimension of the input.
        eps: added to the mean square before the reciprocal square root.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: input of shape ``[..., dim]``.

        Returns:
            Tensor of the same shape and dtype as ``x``.
        """
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.scale

    def extra_repr(self) -> str:
        return f"{self.scale.shape[0]}, eps={self.eps}"
