# Copyright (c) torchtune contributors. BSD-3-Clause license.
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class _SiluMul(torch.autograd.Function):
    """``silu(a) * b`` that keeps only ``a`` and ``b`` for backward.

    Autograd would also keep ``silu(a)``, a third ``[b, s, hidden]`` tensor per layer; here
    backward recomputes it (one elementwise pass) and calls the same ``silu_backward`` kernel
    autograd uses, so the gradients are bit-identical.
    """

    @staticmethod
    def forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.silu(a).mul_(b)  # in place: one [..., hidden] allocation, not two

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # separate, so torch.func transforms work
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        grad_a = torch.ops.aten.silu_backward(grad * b, a) if ctx.needs_input_grad[0] else None
        grad_b = grad * F.silu(a) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


class FeedForward(nn.Module):
    """Gated feed-forward: ``w2(activation(w1(x)) * w3(x))``, SwiGLU by default.

    Args:
        gate_proj: ``dim -> hidden`` projection passed through the activation (stored as ``w1``).
        down_proj: ``hidden -> dim`` projection (stored as ``w2``).
        up_proj: ``dim -> hidden`` projection that gates (stored as ``w3``).
        activation: elementwise function on the gate; ``F.silu`` (SwiGLU) runs the fused
            ``_SiluMul`` that keeps one tensor less for backward, any other (e.g. Gemma's
            ``partial(F.gelu, approximate="tanh")``) runs through plain autograd.
    """

    def __init__(
        self,
        gate_proj: nn.Module,
        down_proj: nn.Module,
        up_proj: nn.Module,
        activation: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    ) -> None:
        super().__init__()
        self.w1 = gate_proj
        self.w2 = down_proj
        self.w3 = up_proj
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``[..., dim]``.

        Returns:
            ``[..., dim]``.
        """
        if self.activation is F.silu:
            return self.w2(_SiluMul.apply(self.w1(x), self.w3(x)))  # [..., hidden] in between
        return self.w2(self.activation(self.w1(x)) * self.w3(x))
