# Copyright (c) torchtune contributors. BSD-3-Clause license.
from torchtune.utils._checkpointing._checkpointer import (
    ADAPTER_FILE,
    PEFT_ADAPTER_FILE,
    PEFT_CONFIG_FILE,
    RECIPE_STATE_FILE,
    FullModelHFCheckpointer,
    FullModelMetaCheckpointer,
    FullModelTorchTuneCheckpointer,
)
from torchtune.utils._checkpointing._index import (
    CHECKPOINTS_INDEX,
    CheckpointPaths,
    checkpoint_paths,
    latest_checkpoint,
    read_checkpoints,
)
from torchtune.utils._checkpointing._io import (
    load_state_dict_file,
    safe_torch_load,
    validate_state_dict_shapes,
)

__all__ = [
    "ADAPTER_FILE",
    "CHECKPOINTS_INDEX",
    "CheckpointPaths",
    "checkpoint_paths",
    "latest_checkpoint",
    "read_checkpoints",
    "FullModelHFCheckpointer",
    "FullModelMetaCheckpointer",
    "FullModelTorchTuneCheckpointer",
    "PEFT_ADAPTER_FILE",
    "PEFT_CONFIG_FILE",
    "RECIPE_STATE_FILE",
    "load_state_dict_file",
    "safe_torch_load",
    "validate_state_dict_shapes",
]
