# Copyright (c) torchtune contributors. BSD-3-Clause license.
from torchtune.utils._activation_checkpointing import (
    apply_activation_checkpointing,
    set_activation_checkpointing,
)
from torchtune.utils._checkpointing import (
    FullModelHFCheckpointer,
    FullModelMetaCheckpointer,
    FullModelTorchTuneCheckpointer,
    checkpoint_paths,
    latest_checkpoint,
    load_state_dict_file,
    read_checkpoints,
    safe_torch_load,
    validate_state_dict_shapes,
)
from torchtune.utils._compile import compile_layers
from torchtune.utils._device import get_device, get_dtype, set_default_dtype
from torchtune.utils._distributed import (
    all_reduce_sum,
    broadcast_object,
    gather_full_state_dict,
    gather_optimizer_state_dict,
    get_world_size_and_rank,
    init_distributed,
    is_distributed,
    load_from_full_state_dict,
    load_optimizer_state_dict,
    record_rank_on_failure,
    shard_model,
)
from torchtune.utils._generation import generate, sample_next_token, top_k_filter, top_p_filter
from torchtune.utils._memory import (
    get_memory_stats,
    reset_peak_memory_stats,
    retain_freed_cpu_memory,
)
from torchtune.utils._seed import set_seed

__all__ = [
    "checkpoint_paths",
    "latest_checkpoint",
    "read_checkpoints",
    "FullModelHFCheckpointer",
    "FullModelMetaCheckpointer",
    "FullModelTorchTuneCheckpointer",
    "all_reduce_sum",
    "apply_activation_checkpointing",
    "broadcast_object",
    "compile_layers",
    "gather_full_state_dict",
    "gather_optimizer_state_dict",
    "generate",
    "get_device",
    "get_dtype",
    "get_memory_stats",
    "get_world_size_and_rank",
    "init_distributed",
    "is_distributed",
    "load_from_full_state_dict",
    "load_optimizer_state_dict",
    "load_state_dict_file",
    "record_rank_on_failure",
    "reset_peak_memory_stats",
    "retain_freed_cpu_memory",
    "safe_torch_load",
    "sample_next_token",
    "set_activation_checkpointing",
    "set_default_dtype",
    "set_seed",
    "shard_model",
    "top_k_filter",
    "top_p_filter",
    "validate_state_dict_shapes",
]
