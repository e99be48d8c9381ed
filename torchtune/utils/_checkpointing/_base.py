# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""What every checkpointer shares: argument checks, adapter and recipe-state I/O, and the
bookkeeping that writes each key of a multi-file checkpoint back to the file it came from."""

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from torchtune.models._families import FAMILIES, ModelFamily, family_for_model_type
from torchtune.utils._checkpointing._io import StagedWriter, load_state_dict_file, safe_torch_load

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
PEFT_ADAPTER_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_ADAPTER_DIR = "adapter"  # in the epoch folder; why: see _checkpointer.py's docstring
RECIPE_STATE_FILE = "recipe_state.pt"
# What a recipe's state dict may hold besides the recipe state proper.
_WEIGHT_KEYS = ("model", "adapter", "adapter_config")
_ADAPTER_SUFFIXES = ("lora_a.weight", "lora_b.weight", ".magnitude")  # DoRA's magnitude too
PathLike = Union[str, Path]
# The tokenizer's files in a model folder; set_model_folder_files replaces the input's.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def _read_json(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path.name} not found in {path.parent} (needed next to the weights)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


class _Checkpointer:
    """Shared argument checks, adapter and recipe-state I/O. Subclasses do the model files."""

    # Whether the format names its model family itself (HF's config.json), so that
    # model_type may be omitted.
    _FORMAT_NAMES_FAMILY = False

    def __init__(
        self,
        checkpoint_dir: PathLike,
        checkpoint_files: Union[PathLike, Sequence[PathLike]],
        model_type: Optional[str] = None,
        output_dir: Optional[PathLike] = None,
        adapter_checkpoint: Optional[PathLike] = None,
        recipe_checkpoint: Optional[PathLike] = None,
        resume_from_checkpoint: bool = False,
    ) -> None:
        self._checkpoint_dir = Path(checkpoint_dir)
        if not self._checkpoint_dir.is_dir():
            raise FileNotFoundError(f"checkpoint_dir {self._checkpoint_dir} is not a directory")
        if output_dir is None:
            raise ValueError(f"{type(self).__name__} needs output_dir")
        if model_type is None and not self._FORMAT_NAMES_FAMILY:
            supported = [t for f in FAMILIES for t in f.model_types]
            raise ValueError(f"{type(self).__name__} needs model_type, one of {supported}")
        # None only until a format that names its family (HF's config.json) has been read.
        self._family: Optional[ModelFamily] = (
            family_for_model_type(model_type) if model_type is not None else None
        )
        if isinstance(checkpoint_files, (str, Path)):
            checkpoint_files = [checkpoint_files]
        names = [str(f) for f in checkpoint_files]
        if not names:
            raise ValueError("checkpoint_files is empty")
        self._checkpoint_paths = self._resolve(names)
        self._adapter_path = (
            self._resolve_adapter(adapter_checkpoint) if adapter_checkpoint else None
        )
        self._resume = bool(resume_from_checkpoint)
        self._recipe_path = None
        if self._resume:
            if recipe_checkpoint is None:
                raise ValueError(
                    "resume_from_checkpoint=True needs recipe_checkpoint (recipe_state.pt)"
                )
            self._recipe_path = self._resolve([recipe_checkpoint])[0]
        self._output_dir = Path(output_dir)
        self._model_folder_files: Optional[Dict[str, Union[Path, str]]] = None

    def set_model_folder_files(self, files: Optional[Mapping[str, Union[Path, str]]]) -> None:
        """Files every later save writes into the model folder instead of the tokenizer files
        of ``checkpoint_dir`` (the recipes pass ``training.tokenizer_output_files``).

        Args:
            files: name in the model folder -> a file to copy (Path) or the text to write
                (str); None: copy ``checkpoint_dir``'s tokenizer files, as without a call.

        Raises:
            FileNotFoundError: if a file to copy is missing.
            ValueError: if a name leaves the model folder or is not a tokenizer-side file.
        """
        if files is None:
            self._model_folder_files = None
            return
        for name, source in files.items():
            parts = Path(name).parts
            if Path(name).is_absolute() or ".." in parts or not parts:
                raise ValueError(
                    f"model folder file name {name!r} must be a relative path inside it"
                )
            if isinstance(source, Path) and not source.is_file():
                raise FileNotFoundError(f"{source} (for {name} in the model folder) not found")
            if not isinstance(source, (Path, str)):
                raise ValueError(
                    f"{name}: expected a Path to copy or the text to write, got {source!r:.80}"
                )
        self._model_folder_files = dict(files)

    def _write_model_folder_files(self, writer: StagedWriter, model_dir: Path) -> None:
        for name, source in (self._model_folder_files or {}).items():
            if isinstance(source, Path):
                writer.copy_file(source, model_dir / name)
            else:
                writer.write_text(source, model_dir / name)

    def _resolve(self, names: Sequence[PathLike]) -> List[Path]:
        """Paths relative to checkpoint_dir (absolute ones as given); all must exist."""
        paths = [Path(n) if Path(n).is_absolute() else self._checkpoint_dir / n for n in names]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"Checkpoint files not found: {missing}")
        return paths

    def _resolve_adapter(self, adapter_checkpoint: PathLike) -> Path:
        """A file as :meth:`_resolve`; a folder is PEFT's ``save_pretrained`` output, whose
        ``adapter_model.safetensors`` is read (its keys mapped by the family's converter)."""
        folder = Path(adapter_checkpoint)
        if not folder.is_absolute():
            folder = self._checkpoint_dir / folder
        if not folder.is_dir():
            return self._resolve([adapter_checkpoint])[0]
        missing = [n for n in (PEFT_ADAPTER_FILE, PEFT_CONFIG_FILE) if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"adapter_checkpoint {folder} is a folder but lacks {missing}; expected PEFT's "
                f"{PEFT_ADAPTER_FILE} and {PEFT_CONFIG_FILE}"
            )
        return folder / PEFT_ADAPTER_FILE

    def _peft_base_model_path(self) -> Optional[str]:
        """What PEFT's adapter_config.json names as the base model (an HF folder), if any."""
        return None

    # ---- load -------------------------------------------------------------------------------
    def load_checkpoint(self) -> Dict[str, Any]:
        """Read the model (and adapter / recipe state when configured).

        Returns:
            ``{"model": {native key: tensor}}`` plus ``"adapter"`` and the recipe state keys.

        Raises:
            ValueError: on unsafe files, unexpected keys or shapes that fit another model.
        """
        state = {"model": self._load_model()}
        if self._adapter_path is not None:
            state["adapter"] = self._load_adapter(self._adapter_path)
        if self._resume:
            recipe_state = safe_torch_load(self._recipe_path)
            if not isinstance(recipe_state, dict):
                raise ValueError(f"{self._recipe_path} does not hold a dict of recipe state")
            clash = sorted(set(recipe_state) & set(_WEIGHT_KEYS))
            if clash:
                raise ValueError(
                    f"{self._recipe_path} holds weight keys {clash}; expected recipe state only"
                )
            state.update(recipe_state)
        return state

    def _load_model(self) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def _load_adapter(self, path: Path) -> Dict[str, torch.Tensor]:
        sd = load_state_dict_file(path)
        if any(k.startswith("base_model.model.") for k in sd):
            sd = self._family.peft_to_tune_adapter(sd)
        bad = [k for k in sd if not k.endswith(_ADAPTER_SUFFIXES)]
        if bad:
            raise ValueError(
                f"{path} holds non-LoRA keys {bad[:5]}; expected lora_a/lora_b weights "
                "(and DoRA magnitudes)"
            )
        return sd

    # ---- save -------------------------------------------------------------------------------
    def save_checkpoint(
        self, state_dict: Dict[str, Any], epoch: int, intermediate_checkpoint: bool = False
    ) -> Path:
        """Write ``output_dir/epoch_{epoch}/``; all files appear together or not at all.

        Args:
            state_dict: ``"model"`` (native keys, merged weights); optionally ``"adapter"``
                (native LoRA keys) and ``"adapter_config"`` (``r``, ``lora_alpha``,
                ``target_modules``); for intermediate checkpoints the recipe state.
            epoch: epoch number, used in the folder name.
            intermediate_checkpoint: also write ``recipe_state.pt`` (every key but the weights).

        Returns:
            The epoch folder.

        Raises:
            ValueError: if ``"model"`` is missing or its keys do not fit the format's layout.
        """
        if "model" not in state_dict:
            raise ValueError(
                f"save_checkpoint needs a 'model' entry; got keys {sorted(state_dict)}"
            )
        epoch_dir = self._output_dir / f"epoch_{epoch}"
        with StagedWriter() as writer:
            self._save_model(writer, state_dict["model"], epoch_dir)
            if "adapter" in state_dict:
                self._save_adapter(writer, state_dict, epoch_dir)
            if intermediate_checkpoint:
                recipe_state = {k: v for k, v in state_dict.items() if k not in _WEIGHT_KEYS}
                writer.save_object(recipe_state, epoch_dir / RECIPE_STATE_FILE)
        log.info("Saved checkpoint to %s", epoch_dir)
        return epoch_dir

    def _save_model(self, writer: StagedWriter, sd: Dict[str, torch.Tensor], epoch_dir: Path):
        raise NotImplementedError

    def _save_adapter(self, writer: StagedWriter, state_dict: Dict[str, Any], epoch_dir: Path):
        adapter = state_dict["adapter"]
        writer.save_state_dict(adapter, epoch_dir / ADAPTER_FILE)
        config = state_dict.get("adapter_config")
        if config is None:
            log.warning("Not writing PEFT's %s: no adapter_config given", PEFT_ADAPTER_FILE)
            return
        peft_config = self._family.tune_to_peft_adapter_config(config, self._peft_base_model_path())
        peft_dir = epoch_dir / PEFT_ADAPTER_DIR
        peft_weights = self._family.tune_to_peft_adapter(adapter)
        writer.save_state_dict(peft_weights, peft_dir / PEFT_ADAPTER_FILE)
        writer.write_text(json.dumps(peft_config, indent=2), peft_dir / PEFT_CONFIG_FILE)


class _ShardedCheckpointer(_Checkpointer):
    """Reads one or several files, remembering which file each key came from, and writes each
    key back to its file (and the index, when there was or should be one)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._index_name: Optional[str] = None
        paths = self._checkpoint_paths
        if len(paths) == 1 and paths[0].name.endswith(".index.json"):
            self._index_name = paths[0].name
            weight_map = _read_json(paths[0]).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{paths[0]} has no 'weight_map'")
            files = list(dict.fromkeys(weight_map.values()))
            self._checkpoint_paths = self._resolve([paths[0].parent / f for f in files])
        suffixes = {p.suffix for p in self._checkpoint_paths}
        if len(suffixes) > 1:
            raise ValueError(f"checkpoint_files mix formats {sorted(suffixes)}; use one format")
        if self._index_name is None and len(self._checkpoint_paths) > 1:
            suffix = self._checkpoint_paths[0].suffix
            self._index_name = (
                "model.safetensors.index.json"
                if suffix == ".safetensors"
                else (f"pytorch_model{suffix}.index.json")
            )
        self._key_to_file: Dict[str, str] = {}

    def _read_shards(self, check=None):
        """Yield each file's state dict (source keys), recording key -> file name."""
        self._key_to_file = {}
        for path in self._checkpoint_paths:
            shard = load_state_dict_file(path)
            for key in shard:
                if key in self._key_to_file:
                    raise ValueError(
                        f"Key '{key}' is in both {self._key_to_file[key]} and {path.name}"
                    )
                self._key_to_file[key] = path.name
            if check is not None:
                check(shard, path)
            yield shard

    def _write_shards(
        self,
        writer: StagedWriter,
        sd: Dict[str, torch.Tensor],
        epoch_dir: Path,
        extra_keys: Optional[Dict[str, str]] = None,
    ):
        """Write ``sd`` in the loaded files' layout; ``extra_keys`` (key -> file name) places
        keys the source did not have."""
        if not self._key_to_file:
            raise ValueError("save_checkpoint needs the file layout: call load_checkpoint() first")
        layout = {k: f for k, f in self._key_to_file.items() if not _ignored_on_save(k)}
        layout.update(extra_keys or {})
        missing, extra = sorted(set(layout) - set(sd)), sorted(set(sd) - set(layout))
        if missing or extra:
            raise ValueError(
                f"The state dict does not match the loaded checkpoint's keys: missing {missing}, "
                f"unexpected {extra}"
            )
        for path in self._checkpoint_paths:
            shard = {k: v for k, v in sd.items() if layout[k] == path.name}
            writer.save_state_dict(shard, epoch_dir / path.name)
        if self._index_name is not None:
            total = sum(v.numel() * v.element_size() for v in sd.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(layout.items()))}
            writer.write_text(json.dumps(index, indent=2), epoch_dir / self._index_name)


def _ignored_on_save(key: str) -> bool:
    # Recomputed buffers some checkpoints carry (HF rotary inv_freq, Meta rope.freqs).
    return key.endswith("rotary_emb.inv_freq") or key == "rope.freqs"
