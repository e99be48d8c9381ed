# Copyright (c) torchtune contributors. BSD-3-Clause license.
import functools
import types
from typing import Optional, Tuple, Type, Union

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from torchtune.modules import TransformerDecoderLayer

_aten = torch.ops.aten
# Ops whose outputs selective checkpointing keeps: the matmuls and attention, the expensive
# part of a layer. Everything else (norms, RoPE, SiLU * up, residual adds) is elementwise
# and is recomputed in backward from these and the layer input.
_SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
}


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    # Recompute this layer's activations in backward instead of storing them.
    return checkpoint(type(self).forward, self, *args, use_reentrant=False, **kwargs)


def _selectively_checkpointed_forward(self: nn.Module, *args, **kwargs):
    # Keep matmul/attention outputs, recompute the elementwise ops between them.
    context_fn = functools.partial(create_selective_checkpoint_contexts, _save_matmuls)
    return checkpoint(
        type(self).forward, self, *args, use_reentrant=False, context_fn=context_fn, **kwargs
    )


def set_activation_checkpointing(
    model: nn.Module,
    module_types: Tuple[Type[nn.Module], ...] = (TransformerDecoderLayer,),
    selective: bool = False,
) -> int:
    """Checkpoint the activations of every ``module_types`` submodule (non-reentrant).

    Each matching module's ``forward`` is replaced, on that instance only, by one that runs
    the original under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``. No wrapper
    module is inserted, so parameter names and state_dict keys are unchanged and FSDP can
    still shard the layer itself. Calling it twice is harmless.

    Args:
        model: the model (e.g. a ``TransformerDecoder``).
        module_types: module classes to checkpoint.
        selective: keep the outputs of matmuls and attention and recompute only the
            elementwise ops in backward (PyTorch's selective activation checkpointing), rather
            than recomputing the whole forward of the module.

    Returns:
        How many modules were (newly) set to checkpoint.
    """
    forward = _selectively_checkpointed_forward if selective else _checkpointed_forward
    count = 0
    for module in model.modules():
        done = getattr(module, "_activation_checkpointed", False)
        if isinstance(module, module_types) and not done:
            module.forward = types.MethodType(forward, module)
            module._activation_checkpointed = True
            count += 1
    return count


def apply_activation_checkpointing(model: nn.Module, setting: Optional[Union[bool, str]]) -> int:
    """Apply the recipes' ``enable_activation_checkpointing`` config value to ``model``.

    Args:
        model: the model.
        setting: ``False``/``None`` (off), ``True`` (recompute whole layers: least memory,
            about a third more compute) or ``"selective"`` (keep matmul and attention outputs,
            recompute only elementwise ops: most of the saving at a few percent).

    Returns:
        How many layers were set to checkpoint.

    Raises:
        ValueError: on any other value.
    """
    if setting is None or setting is False:
        return 0
    if setting is True or setting == "selective":
        return set_activation_checkpointing(model, selective=setting == "selective")
    raise ValueError(
        f"enable_activation_checkpointing must be True, False or 'selective'; got {setting!r}"
    )
