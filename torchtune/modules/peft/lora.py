# Copyright (c) torchtune contributors. BSD-3-Clause license.
import math
from typing import List

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    """A linear layer with a low-rank adapter (LoRA, Hu et al. 2021).

    ``y = x W^T (+ b) + (alpha / rank) * lora_b(lora_a(dropout(x)))``. ``weight`` (and ``bias``)
    hold the frozen base layer under the same names as ``nn.Linear``, so a base checkpoint loads
    unchanged; ``lora_a`` starts kaiming-uniform and ``lora_b`` at zero, so a fresh adapter
    leaves the base output untouched.

    Args:
        in_dim: input features.
        out_dim: output features.
        rank: adapter rank ``r``.
        alpha: scaling numerator; the update is scaled by ``alpha / rank``.
        dropout: dropout on the adapter's input.
        use_bias: whether the base layer has a bias.

    Raises:
        ValueError: if ``rank`` is not positive or ``dropout`` is outside ``[0, 1]``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_bias: bool = False,
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got rank={rank}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1], got {dropout}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        self.bias = nn.Parameter(torch.empty(out_dim)) if use_bias else None
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.lora_a = nn.Linear(in_dim, rank, bias=False)
        self.lora_b = nn.Linear(rank, out_dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Base layer as nn.Linear initialises itself; A as PEFT does; B zero.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_dim) if self.in_dim > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def adapter_params(self) -> List[str]:
        """Names (relative to this module) of the trainable adapter parameters."""
        return ["lora_a.weight", "lora_b.weight"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``[..., in_dim]``.

        Returns:
            ``[..., out_dim]``.
        """
        out = F.linear(x, self.weight, self.bias)  # autograd keeps no reference to it
        # In place, with the scaling folded in: no two extra [..., out_dim] temporaries.
        return out.add_(self.lora_b(self.lora_a(self.dropout(x))), alpha=self.scaling)

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, out_dim={self.out_dim}, rank={self.rank}, "
            f"alpha={self.alpha}, bias={self.bias is not None}"
        )
