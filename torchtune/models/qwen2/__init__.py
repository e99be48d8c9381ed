# Copyright (c) torchtune contributors. BSD-3-Clause license.
from torchtune.models.qwen2._component_builders import lora_qwen2, qwen2
from torchtune.models.qwen2._convert_weights import (
    expected_shapes,
    hf_config_to_builder_kwargs,
    hf_to_tune,
    lora_targets_to_hf,
    peft_to_tune_adapter_weights,
    tune_to_hf,
    tune_to_peft_adapter_config,
    tune_to_peft_adapter_weights,
)
from torchtune.models.qwen2._model_builders import (
    lora_qwen2_5_0_5b,
    lora_qwen2_5_1_5b,
    lora_qwen2_5_3b,
    lora_qwen2_5_7b,
    qwen2_5_0_5b,
    qwen2_5_1_5b,
    qwen2_5_3b,
    qwen2_5_7b,
)

__all__ = [
    "expected_shapes",
    "hf_config_to_builder_kwargs",
    "hf_to_tune",
    "lora_qwen2",
    "lora_qwen2_5_0_5b",
    "lora_qwen2_5_1_5b",
    "lora_qwen2_5_3b",
    "lora_qwen2_5_7b",
    "lora_targets_to_hf",
    "peft_to_tune_adapter_weights",
    "qwen2",
    "qwen2_5_0_5b",
    "qwen2_5_1_5b",
    "qwen2_5_3b",
    "qwen2_5_7b",
    "tune_to_hf",
    "tune_to_peft_adapter_config",
    "tune_to_peft_adapter_weights",
]
