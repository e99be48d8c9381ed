# Copyright (c) torchtune contributors. BSD-3-Clause license.
from torchtune.modules.peft._nf4 import NF4Linear, NF4Weight, dequantize_nf4, quantize_nf4
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
    "NF4Linear",
    "NF4Weight",
    "dequantize_nf4",
    "get_adapter_params",
    "get_adapter_state_dict",
    "get_lora_config",
    "get_merged_lora_state_dict",
    "init_lora_adapters",
    "lora_modules",
    "merge_lora_in_place",
    "quantize_nf4",
    "set_trainable_params",
]
