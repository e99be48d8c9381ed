# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Weight init for training a decoder from scratch (fine-tuning loads a checkpoint instead)."""

import math
from typing import Optional

import torch
from torch import nn

from torchtune.modules.peft.lora import LoRALinear
from torchtune.modules.position_embeddings import (
    PartialRotaryPositionalEmbeddings,
    RotaryPositionalEmbeddings,
)
from torchtune.modules.rms_norm import GemmaRMSNorm, RMSNorm

# Projections that write into the residual stream; their std is shrunk with depth.
_RESIDUAL_OUTPUTS = ("attn.output_proj", "mlp.w2")


@torch.no_grad()
def init_weights_(model: nn.Module, std: float = 0.02, num_layers: Optional[int] = None) -> None:
    """Initialise ``model`` in place for pre-training from scratch (GPT-2 / Megatron scheme).

    * embeddings and linear weights ~ N(0, std), biases 0;
    * projections into the residual stream (``attn.output_proj``, ``mlp.w2``) ~
      N(0, std / sqrt(2 * num_layers)), so the residual variance does not grow with depth;
    * RMSNorm scales 1 (Gemma's zero-centred scales 0: the same unit gain); RoPE tables
      recomputed;
    * LoRA adapters as fresh ones (``lora_a`` kaiming-uniform, ``lora_b`` zero).

    Args:
        model: e.g. a ``TransformerDecoder`` built by ``llama2(...)``.
        std: base standard deviation.
        num_layers: depth used for the residual scaling; ``len(model.layers)`` when None.

    Raises:
        ValueError: if ``std`` is not positive or the depth is unknown.
    """
    if std <= 0:
        raise ValueError(f"std must be positive, got {std}")
    if num_layers is None:
        if not hasattr(model, "layers"):
            raise ValueError("Pass num_layers: the model has no .layers to count")
        num_layers = len(model.layers)
    residual_std = std / math.sqrt(2 * num_layers)
    for name, module in model.named_modules():
        module_std = residual_std if name.endswith(_RESIDUAL_OUTPUTS) else std
        if isinstance(module, LoRALinear):
            if module.quantize_base:
                raise ValueError(f"'{name}' has a quantized (frozen) base: load one instead")
            module.reset_parameters()  # fresh adapter
            nn.init.normal_(module.weight, mean=0.0, std=module_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            if module.use_dora:  # DoRA starts at the base's row norms
                module.magnitude.copy_(module.weight_norm(module.weight, module.lora_b.weight))
        elif isinstance(module, nn.Linear):
            if name.endswith((".lora_a", ".lora_b")):
                continue  # handled with their LoRALinear
            nn.init.normal_(module.weight, mean=0.0, std=module_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:  # as nn.Embedding and HF leave it: zero
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, (RMSNorm, GemmaRMSNorm)):
            module.reset_parameters()
        elif isinstance(module, (RotaryPositionalEmbeddings, PartialRotaryPositionalEmbeddings)):
            module.rope_init()
