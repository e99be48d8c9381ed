# Copyright (c) torchtune contributors. BSD-3-Clause license.
from torchtune.models.llama2._component_builders import llama2, lora_llama2
from torchtune.models.llama2._convert_weights import (
    hf_to_tune,
    meta_to_tune,
    tune_to_hf,
    tune_to_meta,
)
from torchtune.models.llama2._model_builders import (
    llama2_7b,
    llama2_13b,
    llama2_70b,
    lora_llama2_7b,
    lora_llama2_13b,
)
from torchtune.models.llama2._tokenizer import llama2_tokenizer

__all__ = [
    "hf_to_tune",
    "llama2",
    "llama2_7b",
    "llama2_13b",
    "llama2_70b",
    "llama2_tokenizer",
    "lora_llama2",
    "lora_llama2_7b",
    "lora_llama2_13b",
    "meta_to_tune",
    "tune_to_hf",
    "tune_to_meta",
]
