# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Opt-in ``torch.compile`` of the decoder layers (the recipes' ``compile: true``)."""

from typing import Tuple, Type

from torch import nn

from torchtune.modules import TransformerDecoderLayer


def compile_layers(
    model: nn.Module, module_types: Tuple[Type[nn.Module], ...] = (TransformerDecoderLayer,)
) -> int:
    """``torch.compile`` every ``module_types`` submodule in place (``nn.Module.compile``).

    Per layer rather than the whole model: the layers are identical, so one compiled graph
    serves them all (compile time does not grow with depth), and the embedding, loss and
    FSDP's root stay outside the graph. Parameter names and state_dict keys are unchanged.
    Compilation happens lazily, on the first forward.

    Args:
        model: the model (e.g. a ``TransformerDecoder``).
        module_types: module classes to compile.

    Returns:
        How many modules were set to compile.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, module_types):
            module.compile()
            count += 1
    return count
