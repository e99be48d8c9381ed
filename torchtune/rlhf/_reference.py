# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The reference policy of a LoRA model, without a second copy of the model.

With a fresh adapter the reference is the base model: the same modules with their adapters
switched off. Starting from a trained adapter, the reference is that adapter as it was at the
start: only its weights are copied, and swapped in for the reference forward.
"""

import contextlib
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch import nn

from torchtune.modules.peft import lora_modules
from torchtune.rlhf._logps import sequence_logps


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every ``LoRALinear`` of ``model`` computes its base layer only.

    Each layer's ``disabled`` switch is set, so the layer computes ``x W^T (+ b)`` itself:
    on the NF4 weight under ``quantize_base`` (where ``weight`` is None) and without DoRA's
    magnitude, which is part of the adapter. The adapter path is skipped, not multiplied by
    zero, so the reference forward costs what the base model's does. The switches are put
    back on exit, also after an exception.

    Raises:
        ValueError: if ``model`` has no LoRA modules.
    """
    modules = list(lora_modules(model).values())
    if not modules:
        raise ValueError(f"{type(model).__name__} has no LoRA modules to switch off")
    previous = [m.disabled for m in modules]
    try:
        for m in modules:
            m.disabled = True
        yield model
    finally:
        for m, was in zip(modules, previous):
            m.disabled = was


@contextlib.contextmanager
def adapter_swapped(
    model: nn.Module, adapter: Dict[str, torch.Tensor], params: Dict[str, nn.Parameter]
) -> Iterator[nn.Module]:
    """Within the block the adapter parameters ``params`` hold ``adapter``'s values.

    The values are copied in place (and the live ones copied back on exit, also after an
    exception), not rebound: FSDP2 gathers a parameter from its own storage, so this works on
    sharded (DTensor) parameters too, with ``adapter`` sharded like them. The optimizer, which
    holds the Parameter objects, is unaffected. Use it under ``torch.no_grad()``.

    Args:
        model: the model (returned for convenience).
        adapter: the frozen adapter, ``{name: tensor}`` with the keys, shapes and placement of
            ``params`` (e.g. ``{k: p.detach().clone()}`` taken at the start).
        params: the live adapter parameters (``get_adapter_params(model)``).

    Raises:
        ValueError: if the keys or shapes of ``adapter`` and ``params`` differ.
    """
    if set(adapter) != set(params):
        raise ValueError(
            f"reference adapter keys differ from the model's: missing "
            f"{sorted(set(params) - set(adapter))[:5]}, unexpected "
            f"{sorted(set(adapter) - set(params))[:5]}"
        )
    bad = [k for k, p in params.items() if adapter[k].shape != p.shape]
    if bad:
        raise ValueError(f"reference adapter shapes differ from the model's at {bad[:5]}")
    with torch.no_grad():
        live = {k: p.detach().clone() for k, p in params.items()}
        for k, p in params.items():
            p.copy_(adapter[k])
    try:
        yield model
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(live[k])


def lora_reference_logps(
    model: nn.Module,
    batch: Dict[str, Any],
    device: torch.device,
    *,
    adapter_params: Dict[str, nn.Parameter],
    reference_adapter: Optional[Dict[str, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The reference policy's :func:`~torchtune.rlhf.sequence_logps` (``pairs``) of a pair batch, from
    the policy model itself: its adapters switched off (``reference_adapter`` None, a fresh
    adapter) or ``reference_adapter`` copied in. In eval mode (no dropout), without gradients;
    the model is left in train mode.

    Args:
        model: the LoRA policy (sharded or not).
        batch: ``tokens`` / ``labels`` ``[2b, s]``.
        device: where the model is.
        adapter_params: the live adapter parameters.
        reference_adapter: the frozen starting adapter (sharded like ``adapter_params``), or
            None for the base model.

    Returns:
        ``(logps, lengths)``, each ``[2b]``.
    """
    if reference_adapter is None:
        as_reference = adapters_disabled(model)
    else:
        as_reference = adapter_swapped(model, reference_adapter, adapter_params)
    model.eval()
    try:
        with torch.no_grad(), as_reference:
            return sequence_logps(model, batch, device, pairs=True)
    finally:
        model.train()
