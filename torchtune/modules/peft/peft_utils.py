# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Helpers around adapters: find their parameters, freeze the rest, draw fresh LoRA matrices,
and the one LoRA export path (merged weights, adapter tensors, adapter config), all reading
rank, alpha, dropout and targets from the :class:`LoRALinear` modules themselves."""

import math
from typing import Any, Dict, Optional

import torch
from torch import nn

from torchtune.modules.peft.lora import LoRALinear


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


def lora_modules(model: nn.Module) -> Dict[str, LoRALinear]:
    """Every :class:`LoRALinear` of ``model`` by module name, in ``named_modules`` order.

    Works on a model sharded with FSDP2 (its modules keep their names and attributes).
    """
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _dropout_p(module: LoRALinear) -> float:
    # LoRALinear holds nn.Identity instead of nn.Dropout(0).
    return float(getattr(module.dropout, "p", 0.0))


def init_lora_adapters(
    model: nn.Module, seed: int, base_state_dict: Optional[Dict[str, torch.Tensor]] = None
) -> Dict[str, torch.Tensor]:
    """Fresh adapter tensors for every :class:`LoRALinear` of ``model``, drawn from ``seed``.

    ``lora_a`` is kaiming-uniform (as ``nn.Linear`` and PEFT initialise it) from one CPU
    generator seeded with ``seed``, drawn module by module in ``named_modules`` order;
    ``lora_b`` is zero, so the model starts as the base model. A DoRA layer's ``magnitude``
    is the row norm of its base weight ``||W + s B A|| = ||W||`` (as PEFT sets it), so it
    needs the base: call this after loading it, or pass the base state dict. With
    ``quantize_base`` the norm is of the weight as the layer holds it (through NF4 and
    back), so one device and N ranks start from the same magnitude. Without DoRA only the
    modules' shapes are read, so ``model`` may live on the meta device or be sharded.

    Args:
        model: a model with LoRA layers.
        seed: the recipe's seed.
        base_state_dict: the base weights (native keys) for DoRA's magnitude, when the
            model's own are not loaded (a meta or sharded model); default: the model's.

    Returns:
        ``{"...q_proj.lora_a.weight": [rank, in_dim], "...q_proj.lora_b.weight":
        [out_dim, rank], "...q_proj.magnitude": [out_dim] (DoRA), ...}``: fp32 CPU tensors,
        keys as in :func:`get_adapter_params`.

    Raises:
        ValueError: if ``model`` has no LoRA layers, or ``base_state_dict`` lacks a DoRA
            layer's weight.
    """
    modules = lora_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no LoRALinear layers to initialise")
    gen = torch.Generator().manual_seed(int(seed))
    adapters = {}
    for name, m in modules.items():
        prefix = f"{name}." if name else ""
        lora_a = torch.empty(m.rank, m.in_dim, dtype=torch.float32)
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5), generator=gen)
        adapters[prefix + "lora_a.weight"] = lora_a
        lora_b = torch.zeros(m.out_dim, m.rank, dtype=torch.float32)
        adapters[prefix + "lora_b.weight"] = lora_b
        if m.use_dora:
            adapters[prefix + "magnitude"] = _initial_magnitude(m, prefix, base_state_dict)
    return adapters


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def _initial_magnitude(
    m: LoRALinear, prefix: str, base_state_dict: Optional[Dict[str, torch.Tensor]]
) -> torch.Tensor:
    """``||W||`` per row of the layer's base weight as loaded, as fp32 on the CPU."""
    if base_state_dict is None:
        weight = m.base_weight()
        if weight.is_meta or _is_dtensor(weight):  # not loaded, or a shard of it
            raise ValueError(
                f"DoRA layer '{prefix[:-1]}' has no loaded base weight to take its magnitude "
                "from: pass base_state_dict to init_lora_adapters"
            )
    else:
        if prefix + "weight" not in base_state_dict:
            raise ValueError(f"DoRA layer '{prefix[:-1]}' needs '{prefix}weight' in the base")
        weight = m.as_base_weight(base_state_dict[prefix + "weight"])
    with torch.no_grad():
        # PEFT: the norm of W + s * B A with B = 0, in the weight's dtype.
        return torch.linalg.norm(weight.detach(), dim=1).to(weight.dtype).float().cpu()


def get_lora_config(model: nn.Module) -> Dict[str, Any]:
    """The adapter config of ``model``'s LoRA layers, as the checkpointers'
    ``save_checkpoint({..., "adapter_config": ...})`` takes it.

    Returns:
        ``{"r": int, "lora_alpha": float, "lora_dropout": float, "target_modules": [...]}``
        plus ``"use_dora": True`` for DoRA layers, with ``target_modules`` the sorted last parts of the LoRA module names
        (``"layers.0.attn.q_proj"`` -> ``"q_proj"``), in torchtune's names.

    Raises:
        ValueError: if ``model`` has no LoRA layers, or its layers disagree on rank, alpha
            dropout or use_dora (PEFT's config holds one of each).
    """
    modules = lora_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no LoRALinear layers")
    config: Dict[str, Any] = {}
    for key, value_of in (
        ("r", lambda m: int(m.rank)),
        ("lora_alpha", lambda m: float(m.alpha)),
        ("lora_dropout", _dropout_p),
    ):
        values = {value_of(m) for m in modules.values()}
        if len(values) != 1:
            raise ValueError(
                f"LoRA layers disagree on {key}: {sorted(values)}; an adapter config holds one"
            )
        config[key] = values.pop()
    config["target_modules"] = sorted({name.split(".")[-1] for name in modules})
    use_dora = {bool(m.use_dora) for m in modules.values()}
    if len(use_dora) != 1:
        raise ValueError("LoRA layers disagree on use_dora; an adapter config holds one")
    if use_dora.pop():  # only then: a LoRA adapter's config stays as before
        config["use_dora"] = True
    return config


def get_adapter_state_dict(
    model: nn.Module, state_dict: Optional[Dict[str, torch.Tensor]] = None
) -> Dict[str, torch.Tensor]:
    """The adapter tensors (what ``adapter.safetensors`` holds) of ``model``.

    Args:
        model: a model with adapters; its module names give the keys.
        state_dict: where the tensors come from (e.g. a full state dict gathered from an
            FSDP model on rank 0); default ``model.state_dict()``.

    Returns:
        ``{key: tensor}`` for the keys of :func:`get_adapter_params`, tensors as stored.

    Raises:
        ValueError: if ``state_dict`` lacks an adapter key.
    """
    keys = list(get_adapter_params(model))
    state_dict = model.state_dict() if state_dict is None else state_dict
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise ValueError(f"The state dict lacks adapter keys {missing[:4]} ({len(missing)})")
    return {k: state_dict[k] for k in keys}


def _fold_lora(
    merged: Dict[str, torch.Tensor],
    state_dict: Dict[str, torch.Tensor],
    prefix: str,
    rank: int,
    alpha: float,
    use_dora: bool = False,
) -> None:
    """Replace ``merged[prefix + "weight"]`` by ``W + (alpha / rank) B A`` (DoRA: that times
    ``magnitude / ||W + (alpha / rank) B A||`` per row), in fp32 and cast back to ``W``'s
    dtype, and drop the adapter's keys; tensors from ``state_dict``."""
    a_key, b_key, w_key = prefix + "lora_a.weight", prefix + "lora_b.weight", prefix + "weight"
    m_key = prefix + "magnitude"
    needed = (a_key, b_key, w_key, m_key) if use_dora else (a_key, b_key, w_key)
    missing = [k for k in needed if k not in state_dict]
    if missing:
        raise ValueError(f"LoRA layer '{prefix[:-1]}' needs {missing} in the state dict")
    a, b, w = state_dict[a_key], state_dict[b_key], state_dict[w_key]  # [r, in], [out, r]
    if a.shape[0] != rank or b.shape[1] != rank:
        raise ValueError(
            f"'{a_key}' / '{b_key}' have shapes {tuple(a.shape)} / {tuple(b.shape)}, "
            f"expected rank {rank}"
        )
    if (b.shape[0], a.shape[1]) != tuple(w.shape):
        raise ValueError(
            f"LoRA update {(b.shape[0], a.shape[1])} does not match '{w_key}' {tuple(w.shape)}"
        )
    folded = w.float() + (alpha / rank) * (b.float() @ a.float())
    if use_dora:
        magnitude = state_dict[m_key].float()
        if tuple(magnitude.shape) != (w.shape[0],):
            raise ValueError(f"'{m_key}' has shape {tuple(magnitude.shape)}, expected {w.shape[0]}")
        folded = folded * (magnitude / torch.linalg.norm(folded, dim=1)).unsqueeze(1)
        del merged[m_key]
    merged[w_key] = folded.to(w.dtype)
    del merged[a_key], merged[b_key]


def get_merged_lora_state_dict(
    model: nn.Module, state_dict: Optional[Dict[str, torch.Tensor]] = None
) -> Dict[str, torch.Tensor]:
    """``state_dict`` with every LoRA layer of ``model`` folded into its base weight:
    ``W + (alpha / rank) * B @ A``, each layer with its own rank and alpha; a DoRA layer's
    rows then scaled to its ``magnitude``. A quantized base's ``weight`` in ``state_dict``
    is already dequantized (``LoRALinear.state_dict``), so the result is full precision.

    The product is computed in fp32 and cast back to ``W``'s dtype. The adapter keys are
    dropped, so the result loads into the plain (non-LoRA) model.

    Args:
        model: the LoRA model, for its layers' names, ranks and alphas (a sharded model is
            fine: only module attributes are read).
        state_dict: the tensors (e.g. the full state dict gathered from an FSDP model on
            rank 0); default ``model.state_dict()``. Not modified.

    Returns:
        A new state dict without LoRA keys.

    Raises:
        ValueError: if an adapter lacks its partner matrix or base weight, shapes disagree,
            or ``state_dict`` holds LoRA keys of no LoRA layer of ``model``.
    """
    state_dict = model.state_dict() if state_dict is None else state_dict
    merged = dict(state_dict)
    for name, m in lora_modules(model).items():
        prefix = f"{name}." if name else ""
        _fold_lora(merged, state_dict, prefix, int(m.rank), float(m.alpha), bool(m.use_dora))
    leftover = [k for k in merged if k.endswith(("lora_a.weight", "lora_b.weight", ".magnitude"))]
    if leftover:
        raise ValueError(f"LoRA keys of no LoRA layer of the model: {leftover[:4]}")
    return merged


def merge_lora_in_place(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` by an ``nn.Linear`` holding ``W + (alpha/r) B A``
    (DoRA's rescaled; a quantized base dequantized) for evaluation and generation: faster,
    same outputs.

    Returns:
        The same model, now without adapters.
    """
    merged = get_merged_lora_state_dict(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                base = child.base_weight()
                linear = nn.Linear(
                    child.in_dim,
                    child.out_dim,
                    bias=child.bias is not None,
                    device=base.device,
                    dtype=base.dtype,
                )
                setattr(module, child_name, linear)
    model.load_state_dict(merged)
    return model
