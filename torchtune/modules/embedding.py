# Copyright (c) torchtune contributors. BSD-3-Clause license.
from typing import Optional

import torch
from torch import nn


class ScaledEmbedding(nn.Embedding):
    """An embedding whose output is multiplied by a constant (Gemma: ``sqrt(embed_dim)``).

    The constant is rounded to the table's dtype before the multiply, as transformers'
    ``Gemma2TextScaledWordEmbedding`` does (in bf16, ``sqrt(2304) = 48`` exactly, but
    ``sqrt(3072) = 55.43`` becomes 55.5), so bf16 models match the reference bit for bit. A
    subclass of ``nn.Embedding`` with the same ``weight``: state-dict keys and weight tying
    stay as for a plain embedding.

    Args:
        num_embeddings: vocabulary size.
        embedding_dim: model dimension.
        scale: the multiplier.
        padding_idx: as in ``nn.Embedding`` (that row gets no gradient through the lookup);
            transformers' Gemma passes ``pad_token_id``.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        scale: float,
        padding_idx: Optional[int] = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.scale = float(scale)
        self._rounded = {}  # dtype -> the scale rounded to it

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """
        Args:
            tokens: ``LongTensor[...]``.

        Returns:
            ``[..., embedding_dim]`` in the table's dtype.
        """
        return super().forward(tokens) * self._rounded_scale(self.weight.dtype)

    def _rounded_scale(self, dtype: torch.dtype) -> float:
        # fp32 first, then the table's dtype: transformers' fp32 buffer cast at use. The
        # rounded value is exact in fp32, so multiplying by it as a Python float is the same.
        if dtype not in self._rounded:
            self._rounded[dtype] = torch.tensor(self.scale, dtype=torch.float32).to(dtype).item()
        return self._rounded[dtype]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}"
