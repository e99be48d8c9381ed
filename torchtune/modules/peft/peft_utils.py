# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Helpers around adapters: find their parameters, freeze the rest, fold LoRA into weights."""

from typing import Dict

import torch
from torch import nn


def get_adapter_params(model: nn.Module) -> Dict[str, nn.Parameter]:
    """All adapter parameters of ``model``, keyed by their ``named_parameters`` name.

    A module is an adapter when it has an ``adapter_params()`` method listing its adapter
    parameter names (``LoRALinear`` returns ``["lora_a.weight", "lora_b.weight"]``).

    Args:
        model: any module.

    Returns:
        ``{"layers.0.attn.q_proj.lora_a.weight": Parameter, ...}``.
    """
    params = {}
    for module_name, module in model.named_modules():
        if not callable(getattr(module, "adapter_params", None)):
            continue
        for name in module.adapter_params():
            param = module.get_parameter(name)
            params[f"{module_name}.{name}" if module_name else name] = param
    return params


def set_trainable_params(model: nn.Module, adapter_params: Dict[str, nn.Parameter]) -> None:
    """Make exactly the parameters named in ``adapter_params`` trainable; freeze the rest.

    Args:
        model: the model.
        adapter_params: as returned by :func:`get_adapter_params`.

    Raises:
        ValueError: if a name in ``adapter_params`` is not a parameter of ``model``.
    """
    names = {name for name, _ in model.named_parameters()}
    missing = sorted(set(adapter_params) - names)
    if missing:
        raise ValueError(f"Adapter parameters not found in the model: {missing}")
    for name, param in model.named_parameters():
        param.requires_grad_(name in adapter_params)


def get_merged_lora_ckpt(
    state_dict: Dict[str, torch.Tensor], rank: int, alpha: float
) -> Dict[str, torch.Tensor]:
    """Fold every LoRA adapter into its base weight: ``W + (alpha / rank) * B @ A``.

    The product is computed in fp32 and cast back to ``W``'s dtype. The ``lora_a``/``lora_b``
    keys are dropped, so the result loads into the plain (non-LoRA) model.

    Args:
        state_dict: a LoRA model's state dict (``...q_proj.weight``, ``...q_proj.lora_a.weight``,
            ``...q_proj.lora_b.weight``, ...). Not modified.
        rank: LoRA rank used in training.
        alpha: LoRA alpha used in training.

    Returns:
        A new state dict without LoRA keys.

    Raises:
        ValueError: if an adapter lacks its partner matrix or base weight, or shapes disagree.
    """
    merged = dict(state_dict)
    scaling = alpha / rank
    for key in [k for k in state_dict if k.endswith("lora_a.weight")]:
        prefix = key[: -len("lora_a.weight")]
        b_key, w_key = prefix + "lora_b.weight", prefix + "weight"
        if b_key not in state_dict or w_key not in state_dict:
            raise ValueError(f"LoRA key '{key}' needs '{b_key}' and '{w_key}' in the state dict")
        a, b, w = state_dict[key], state_dict[b_key], state_dict[w_key]
        if a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(
                f"'{key}' / '{b_key}' have shapes {tuple(a.shape)} / {tuple(b.shape)}, "
                f"expected rank {rank}"
            )
        if (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise ValueError(
                f"LoRA update {(b.shape[0], a.shape[1])} does not match '{w_key}' {tuple(w.shape)}"
            )
        merged[w_key] = (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)
        del merged[key], merged[b_key]
    orphans = [k for k in merged if k.endswith("lora_b.weight")]
    if orphans:
        raise ValueError(f"LoRA B matrices without A: {orphans}")
    return merged
