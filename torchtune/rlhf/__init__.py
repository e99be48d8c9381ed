# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Preference tuning: the losses (DPO, IPO, SimPO), sequence log-probabilities of chosen and
rejected responses in one forward, the reference policy of a LoRA model, one optimizer step."""

from torchtune.rlhf._logps import sequence_logps
from torchtune.rlhf._losses import DPOLoss, IPOLoss, SimPOLoss
from torchtune.rlhf._reference import adapter_swapped, adapters_disabled, lora_reference_logps
from torchtune.rlhf._step import preference_step

__all__ = [
    "DPOLoss",
    "IPOLoss",
    "SimPOLoss",
    "adapter_swapped",
    "adapters_disabled",
    "lora_reference_logps",
    "preference_step",
    "sequence_logps",
]
