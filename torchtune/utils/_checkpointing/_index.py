# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The output folder's layout and ``checkpoints.json``, the list of complete checkpoints.

A checkpoint named ``NAME`` (``epoch_N``: N epochs finished; ``step_N``: N optimizer steps
taken) is four sibling folders of ``output_dir``::

    NAME/                          what loaders read: the weights in the input's format and
                                   file names, index, config.json, generation_config.json,
                                   tokenizer files (Meta format: the .pth and params.json)
    NAME_adapter/adapter.safetensors   our LoRA adapter (native keys)
    NAME_peft/                     PEFT's adapter_model.safetensors + adapter_config.json
    NAME_state/recipe_state.pt     optimizer, RNG states, position in the data (to resume)

A loader that globs ``NAME/*.safetensors`` finds only the model, and
``AutoModelForCausalLM.from_pretrained(NAME)`` finds no ``adapter_config.json`` to apply a
second time on top of the merged weights.

``checkpoints.json`` is the commit point: it is rewritten atomically (temp file + rename) only
after all of a checkpoint's files are in place, so a run killed mid-write leaves the previous
entry the latest complete one. Each entry records the position (``global_step``,
``epochs_run``, ``steps_in_epoch``), whether it is the run's ``final`` one (no recipe state),
the paths of its parts relative to ``output_dir``, and what a resume must match
(``world_size``, ``batch_size``, ``gradient_accumulation_steps``, ``dataset``).
"""

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

from torchtune.utils._checkpointing._io import write_json_atomic

log = logging.getLogger(__name__)

CHECKPOINTS_INDEX = "checkpoints.json"
ADAPTER_FILE = "adapter.safetensors"
RECIPE_STATE_FILE = "recipe_state.pt"
ADAPTER_DIR_SUFFIX = "_adapter"
PEFT_DIR_SUFFIX = "_peft"
STATE_DIR_SUFFIX = "_state"
_SUFFIXES = ("", ADAPTER_DIR_SUFFIX, PEFT_DIR_SUFFIX, STATE_DIR_SUFFIX)
_VERSION = 1


@dataclass(frozen=True)
class CheckpointPaths:
    """Where the parts of checkpoint ``name`` live under ``output_dir``."""

    model_dir: Path
    adapter_file: Path
    peft_dir: Path
    recipe_state: Path


def checkpoint_paths(output_dir: Union[str, Path], name: str) -> CheckpointPaths:
    """The folders and files of checkpoint ``name`` (``epoch_N`` or ``step_N``)."""
    out = Path(output_dir)
    return CheckpointPaths(
        model_dir=out / name,
        adapter_file=out / f"{name}{ADAPTER_DIR_SUFFIX}" / ADAPTER_FILE,
        peft_dir=out / f"{name}{PEFT_DIR_SUFFIX}",
        recipe_state=out / f"{name}{STATE_DIR_SUFFIX}" / RECIPE_STATE_FILE,
    )


def read_checkpoints(output_dir: Union[str, Path]) -> List[Dict[str, Any]]:
    """The complete checkpoints in ``output_dir``, oldest first ([] without an index).

    Raises:
        ValueError: if ``checkpoints.json`` is not the index this module writes.
    """
    path = Path(output_dir) / CHECKPOINTS_INDEX
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("checkpoints"), list):
        raise ValueError(f"{path} has no 'checkpoints' list; it was not written by torchtune")
    return data["checkpoints"]


def latest_checkpoint(output_dir: Union[str, Path]) -> Dict[str, Any]:
    """The newest complete checkpoint's entry.

    Raises:
        FileNotFoundError: if ``output_dir`` has no complete checkpoint.
    """
    entries = read_checkpoints(output_dir)
    if not entries:
        raise FileNotFoundError(
            f"resume_from_checkpoint=True but output_dir {output_dir} has no complete checkpoint "
            f"({CHECKPOINTS_INDEX} missing or empty); set output_dir to the run's folder, or give "
            "checkpointer.recipe_checkpoint (and checkpointer.adapter_checkpoint for LoRA)"
        )
    return entries[-1]


def _write(output_dir: Path, entries: List[Dict[str, Any]]) -> None:
    write_json_atomic({"version": _VERSION, "checkpoints": entries}, output_dir / CHECKPOINTS_INDEX)


def forget_checkpoint(output_dir: Union[str, Path], name: str) -> None:
    """Drop ``name`` from the index before its files are rewritten (an earlier run into the
    same ``output_dir``): while the new files replace the old one by one, the folder is no
    complete checkpoint. The old files stay, each whole, until replaced."""
    output_dir = Path(output_dir)
    entries = read_checkpoints(output_dir)
    kept = [e for e in entries if e["name"] != name]
    if len(kept) != len(entries):
        _write(output_dir, kept)


def record_checkpoint(
    output_dir: Union[str, Path], entry: Mapping[str, Any], keep_last_n: Optional[int] = None
) -> List[str]:
    """Append a complete checkpoint's entry (the commit), then prune step checkpoints.

    Args:
        output_dir: the run's folder.
        entry: the new checkpoint's entry (``name`` among its keys); call only once all its
            files are in place.
        keep_last_n: keep this many ``step_*`` checkpoints (the new one included), or all when
            None. Epoch checkpoints are never pruned, nor the new (latest complete) one.

    Returns:
        The names of the pruned checkpoints.
    """
    output_dir = Path(output_dir)
    entries = [e for e in read_checkpoints(output_dir) if e["name"] != entry["name"]]
    entries.append(dict(entry))
    _write(output_dir, entries)
    if keep_last_n is None:
        return []
    steps = [e["name"] for e in entries[:-1] if e["name"].startswith("step_")]
    n_old = keep_last_n - 1 if entry["name"].startswith("step_") else keep_last_n
    pruned = steps[: max(len(steps) - n_old, 0)]
    if pruned:
        # Out of the index first: a kill in between leaves orphan folders, never a listed
        # checkpoint with missing files.
        _write(output_dir, [e for e in entries if e["name"] not in pruned])
        for name in pruned:
            for suffix in _SUFFIXES:
                shutil.rmtree(output_dir / f"{name}{suffix}", ignore_errors=True)
        log.info("Pruned checkpoints %s (keep_last_n_checkpoints=%d)", pruned, keep_last_n)
    return pruned
