# Copyright (c) torchtune contributors. BSD-3-Clause license.
from typing import Callable, Optional

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
        gate_up_proj: instead of ``gate_proj`` and ``up_proj`` (then None), one fused
            ``dim -> 2 * hidden`` projection, gate rows first (Phi-3's ``gate_up_proj``),
            stored as ``w13``: one GEMM, and a LoRA adapter on it is PEFT's on the fused module.

    Raises:
        ValueError: if ``gate_up_proj`` comes with ``gate_proj`` or ``up_proj``.
    """

    def __init__(
        self,
        gate_proj: Optional[nn.Module],
        down_proj: nn.Module,
        up_proj: Optional[nn.Module],
        activation: Callable[[torch.Tensor], torch.Tensor] = F.silu,
        *,
        gate_up_proj: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        if gate_up_proj is not None and (gate_proj is not None or up_proj is not None):
            raise ValueError("Give either gate_up_proj or gate_proj and up_proj, not both")
        self.w1 = gate_proj
        self.w2 = down_proj
        self.w3 = up_proj
        self.w13 = gate_up_proj  # a submodule only when set: unfused models keep their keys
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``[..., dim]``.

        Returns:
            ``[..., dim]``.
        """
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)  # each [..., hidden]
        else:
            gate, up = self.w1(x), self.w3(x)
        if self.activation is F.silu:
            return self.w2(_SiluMul.apply(gate, up))  # [..., hidden] in between
        return self.w2(self.activation(gate) * up)
