# Copyright (c) torchtune contributors. BSD-3-Clause license.
import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from torchtune.modules.peft._nf4 import NF4Weight, linear_nf4, load_nf4_weight, save_nf4_weight


class LoRALinear(nn.Module):
    """A linear layer with a low-rank adapter (LoRA, Hu et al. 2021), optionally weight-
    decomposed (DoRA, Liu et al. 2024) and over a 4-bit base (QLoRA, Dettmers et al. 2023).

    LoRA: ``y = x W^T (+ b) + s * lora_b(lora_a(dropout(x)))`` with ``s = alpha / rank``.
    DoRA (``use_dora``) rescales every output feature of ``W + s B A`` to a learned
    ``magnitude``: ``y = (m / ||W + s B A||) * (x W^T + s B A dropout(x)) (+ b)``, the row norm
    ``||.||`` (PEFT's and the paper's "column" norm of ``W^T``) detached as in the paper's
    section 4.3 and PEFT, so it gets no gradient. With dropout active in training, the base
    term is PEFT's: ``x W^T + (m / ||.|| - 1) * dropout(x) W^T``.

    ``weight`` (and ``bias``) hold the frozen base layer under the same names as ``nn.Linear``,
    so a base checkpoint loads unchanged; ``lora_a`` starts kaiming-uniform and ``lora_b`` at
    zero, so a fresh adapter leaves the base output untouched; ``magnitude`` starts at the
    base weight's row norms (:func:`~torchtune.modules.peft.init_lora_adapters` sets it from
    the loaded base). With ``quantize_base`` the weight lives in NF4 (:class:`NF4Weight`):
    ``weight`` is then no parameter, ``state_dict()`` gives it dequantized in the model dtype
    and ``load_state_dict`` quantizes what it is given.

    ``disabled`` (a plain attribute, False at construction) switches the adapter off: the
    layer then computes its base alone, ``x W^T (+ b)`` on the (dequantized) base weight,
    without DoRA's magnitude (the reference policy of DPO, see
    :func:`~torchtune.rlhf.adapters_disabled`).

    Args:
        in_dim: input features.
        out_dim: output features.
        rank: adapter rank ``r``.
        alpha: scaling numerator; the update is scaled by ``alpha / rank``.
        dropout: dropout on the adapter's input.
        use_bias: whether the base layer has a bias.
        use_dora: learn a magnitude per output feature (DoRA).
        quantize_base: store the base weight in NF4, blocks of 64.
        quantize_double: with ``quantize_base``, also quantize the block scales.

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
        *,
        use_dora: bool = False,
        quantize_base: bool = False,
        quantize_double: bool = True,
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
        self.use_dora = use_dora
        self.quantize_base = quantize_base
        if quantize_base:
            self.weight_nf4 = NF4Weight(out_dim, in_dim, quantize_double)
            self.register_parameter("weight", None)
        else:
            self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        self.bias = nn.Parameter(torch.empty(out_dim)) if use_bias else None
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.lora_a = nn.Linear(in_dim, rank, bias=False)
        self.lora_b = nn.Linear(rank, out_dim, bias=False)
        self.magnitude = nn.Parameter(torch.empty(out_dim)) if use_dora else None
        self.disabled = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Base layer as nn.Linear initialises itself; A as PEFT does; B zero.
        if self.weight is not None:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_dim) if self.in_dim > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        if self.magnitude is not None and not self.magnitude.is_meta:
            with torch.no_grad():
                self.magnitude.copy_(self.weight_norm(self.base_weight(), self.lora_b.weight))

    def adapter_params(self) -> List[str]:
        """Names (relative to this module) of the trainable adapter parameters."""
        names = ["lora_a.weight", "lora_b.weight"]
        return names + ["magnitude"] if self.use_dora else names

    def base_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The frozen base weight ``[out_dim, in_dim]`` (dequantized with ``quantize_base``)."""
        if self.quantize_base:
            return self.weight_nf4.dequantize(dtype)
        return self.weight if dtype is None else self.weight.to(dtype)

    def as_base_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` as this layer would hold it once loaded: in its dtype and, with
        ``quantize_base``, through NF4 and back."""
        if not self.quantize_base:
            return weight.to(self.lora_a.weight.dtype)
        nf4 = NF4Weight(self.out_dim, self.in_dim, self.weight_nf4.double_quant)
        nf4 = nf4.to(device=weight.device, dtype=self.weight_nf4.dtype)
        nf4.quantize_(weight)
        return nf4.dequantize()

    def weight_norm(self, weight: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
        """``||W + s B A||`` over each row (DoRA's norm), detached, in ``weight``'s dtype.

        Args:
            weight: ``[out_dim, in_dim]``.
            lora_b: ``[out_dim, rank]`` (``lora_a`` is this layer's).

        Returns:
            ``[out_dim]``.
        """
        with torch.no_grad():
            lora_w = lora_b.to(weight.dtype) @ self.lora_a.weight.to(weight.dtype)
            return torch.linalg.norm(weight + self.scaling * lora_w, dim=1).to(weight.dtype)

    def _base_linear(self, x: torch.Tensor) -> torch.Tensor:
        # The NF4 path re-dequantizes in backward instead of keeping the full weight.
        if self.quantize_base:
            return linear_nf4(x, self.weight_nf4)
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``[..., in_dim]``.

        Returns:
            ``[..., out_dim]``.
        """
        if self.disabled:
            out = self._base_linear(x)
            return out if self.bias is None else out + self.bias
        x_d = self.dropout(x)
        if self.use_dora:
            return self._dora_forward(x, x_d)
        if self.quantize_base:
            out = linear_nf4(x, self.weight_nf4)
            out = out if self.bias is None else out + self.bias
        else:
            out = F.linear(x, self.weight, self.bias)  # autograd keeps no reference to it
        # In place, with the scaling folded in: no two extra [..., out_dim] temporaries.
        return out.add_(self.lora_b(self.lora_a(x_d)), alpha=self.scaling)

    def _dora_forward(self, x: torch.Tensor, x_d: torch.Tensor) -> torch.Tensor:
        weight = self.base_weight(x.dtype)
        scale = self.magnitude / self.weight_norm(weight, self.lora_b.weight)  # [out_dim]
        del weight  # the norm is all DoRA needs of it; the NF4 path frees it here
        lora = self.lora_b(self.lora_a(x_d))
        if isinstance(self.dropout, nn.Identity) or not self.training:  # one base matmul
            out = scale * (self._base_linear(x) + self.scaling * lora)
        else:
            out = self._base_linear(x) + (scale - 1) * self._base_linear(x_d)
            out = out + scale * self.scaling * lora
        return out if self.bias is None else out + self.bias

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.quantize_base:  # first, where nn.Linear has it
            save_nf4_weight(self.weight_nf4, destination, prefix)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        if not self.quantize_base:
            return super()._load_from_state_dict(state_dict, prefix, *args)
        load_nf4_weight(self.weight_nf4, state_dict, prefix, super()._load_from_state_dict, args)

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, out_dim={self.out_dim}, rank={self.rank}, "
            f"alpha={self.alpha}, bias={self.bias is not None}, use_dora={self.use_dora}, "
            f"quantize_base={self.quantize_base}"
        )
