# Copyright (c) torchtune contributors. BSD-3-Clause license.
import types
from typing import Tuple, Type

from torch import nn
from torch.utils.checkpoint import checkpoint

from torchtune.modules import TransformerDecoderLayer


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    # Recompute this layer's activations in backward instead of storing them.
    return checkpoint(type(self).forward, self, *args, use_reentrant=False, **kwargs)


def set_activation_checkpointing(
    model: nn.Module, module_types: Tuple[Type[nn.Module], ...] = (TransformerDecoderLayer,)
) -> int:
    """Checkpoint the activations of every ``module_types`` submodule (non-reentrant).

    Each matching module's ``forward`` is replaced, on that instance only, by one that runs
    the original under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``. No wrapper
    module is inserted, so parameter names and state_dict keys are unchanged and FSDP can
    still shard the layer itself. Calling it twice is harmless.

    Args:
        model: the model (e.g. a ``TransformerDecoder``).
        module_types: module classes to checkpoint.

    Returns:
        How many modules were (newly) set to checkpoint.
    """
    count = 0
    for module in model.modules():
        done = getattr(module, "_activation_checkpointed", False)
        if isinstance(module, module_types) and not done:
            module.forward = types.MethodType(_checkpointed_forward, module)
            module._activation_checkpointed = True
            count += 1
    return count
