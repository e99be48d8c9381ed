# Copyright (c) torchtune contributors. BSD-3-Clause license.
from torchtune.models.qwen3._component_builders import lora_qwen3, qwen3
from torchtune.models.qwen3._convert_weights import (
    expected_shapes,
    hf_config_to_builder_kwargs,
    hf_to_tune,
    lora_targets_to_hf,
    peft_to_tune_adapter_weights,
    tune_to_hf,
    tune_to_peft_adapter_config,
    tune_to_peft_adapter_weights,
)
from torchtune.models.qwen3._model_builders import (
    lora_qwen3_0_6b,
    lora_qwen3_1_7b,
    lora_qwen3_4b,
    lora_qwen3_8b,
    qwen3_0_6b,
    qwen3_1_7b,
    qwen3_4b,
    qwen3_8b,
)

__all__ = [
    "expected_shapes",
    "hf_config_to_builder_kwargs",
    "hf_to_tune",
    "lora_qwen3",
    "lora_qwen3_0_6b",
    "lora_qwen3_1_7b",
    "lora_qwen3_4b",
    "lora_qwen3_8b",
    "lora_targets_to_hf",
    "peft_to_tune_adapter_weights",
    "qwen3",
    "qwen3_0_6b",
    "qwen3_1_7b",
    "qwen3_4b",
    "qwen3_8b",
    "tune_to_hf",
    "tune_to_peft_adapter_config",
    "tune_to_peft_adapter_weights",
]
