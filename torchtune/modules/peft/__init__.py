# Copyright (c) torchtune contributors. BSD-3-Clause license.
from torchtune.modules.peft.lora import LoRALinear
from torchtune.modules.peft.peft_utils import (
    get_adapter_params,
    get_adapter_state_dict,
    get_lora_config,
    get_merged_lora_state_dict,
    init_lora_adapters,
    lora_modules,
    merge_lora_in_place,
    set_trainable_params,
)

__all__ = [
    "LoRALinear",
    "get_adapter_params",
    "get_adapter_state_dict",
    "get_lora_config",
    "get_merged_lora_state_dict",
    "init_lora_adapters",
    "lora_modules",
    "merge_lora_in_place",
    "set_trainable_params",
]
