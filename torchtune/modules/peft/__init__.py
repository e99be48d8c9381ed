# Copyright (c) torchtune contributors. BSD-3-Clause license.
from torchtune.modules.peft.lora import LoRALinear
from torchtune.modules.peft.peft_utils import (
    get_adapter_params,
    get_merged_lora_ckpt,
    set_trainable_params,
)

__all__ = ["LoRALinear", "get_adapter_params", "get_merged_lora_ckpt", "set_trainable_params"]
