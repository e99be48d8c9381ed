# Copyright (c) torchtune contributors. BSD-3-Clause license.
import torch
from torch import nn


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 -> fp32; fp64 stays


class _RMSNormFunction(torch.autograd.Function):
    """``(x * rsqrt(mean(x^2) + eps)).type_as(x) * scale`` that keeps only ``x`` for backward.

    Autograd would also keep the normalised ``x`` (for the scale's gradient), one more
    ``[b, s, d]`` tensor per norm; backward recomputes it and the statistic from ``x`` (one
    cheap pass) and applies the closed-form gradient
    ``d_x = rstd * (g_n - n * mean(g_n * n))`` with ``n = x * rstd`` and ``g_n = g * scale``.
    """

    @staticmethod
    def forward(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = _upcast(x)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return (x32 * rstd).type_as(x).mul_(scale)  # in place: no autograd inside forward

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # separate, so torch.func transforms work
        x, scale, ctx.eps = inputs
        ctx.save_for_backward(x, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, scale = ctx.saved_tensors
        x32 = _upcast(x)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + ctx.eps)
        normed = x32 * rstd  # [..., d] fp32
        grad_scale = None
        if ctx.needs_input_grad[1]:
            grad_scale = (grad * normed.type_as(x)).reshape(-1, x.shape[-1]).sum(0)
        grad_n = _upcast(grad * scale)
        grad_x = rstd * (grad_n - normed * (grad_n * normed).mean(-1, keepdim=True))
        return grad_x.type_as(x), grad_scale, None


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, 2019) with a learned per-channel scale.

    The statistic is computed in (at least) fp32 and the normalised input is cast back to the
    input dtype before scaling, as Llama does, so bf16 training keeps a stable norm. Backward
    keeps only the input (see ``_RMSNormFunction``).

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
        return _RMSNormFunction.apply(x, self.scale, self.eps)

    def extra_repr(self) -> str:
        return f"{self.scale.shape[0]}, eps={self.eps}"


class GemmaRMSNorm(nn.Module):
    """RMSNorm with Gemma's zero-centred scale: ``(x * rsqrt(mean(x^2) + eps) * (1 + scale))``,
    all in fp32 and cast back to the input dtype only at the end.

    Two differences from :class:`RMSNorm`, both Gemma's (transformers' ``Gemma2RMSNorm`` /
    ``Gemma3RMSNorm``): the stored ``scale`` is an offset from one (checkpoints hold it as is,
    zeros at init), and the multiplication by it happens in fp32 before the cast (Llama casts
    first). Plain autograd: a small variant of the plain norm, no derived backward.

    Args:
        dim: size of the last dimension of the input.
        eps: added to the mean square before the reciprocal square root.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.zeros(dim))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: input of shape ``[..., dim]``.

        Returns:
            Tensor of the same shape and dtype as ``x``.
        """
        x32 = _upcast(x)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + _upcast(self.scale))).type_as(x)

    def extra_repr(self) -> str:
        return f"{self.scale.shape[0]}, eps={self.eps}"
