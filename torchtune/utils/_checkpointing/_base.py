# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""What every checkpointer shares: argument checks, finding the checkpoint to resume from,
adapter and recipe-state I/O in the output layout of ``_index.py``, and the bookkeeping that
writes each key of a multi-file checkpoint back to the file it came from."""

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from torchtune.config import for_argument
from torchtune.models._families import FAMILIES, ModelFamily, family_for_model_type
from torchtune.utils._checkpointing._index import (
    ADAPTER_FILE,
    RECIPE_STATE_FILE,
    checkpoint_paths,
    forget_checkpoint,
    latest_checkpoint,
    record_checkpoint,
)
from torchtune.utils._checkpointing._io import StagedWriter, load_state_dict_file, safe_torch_load

log = logging.getLogger(__name__)

PEFT_ADAPTER_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
# What a recipe's state dict may hold besides the recipe state proper.
_WEIGHT_KEYS = ("model", "adapter", "adapter_config")
# Recipe state keys copied into the checkpoints.json entry.
_POSITION_KEYS = ("global_step", "epochs_run", "steps_in_epoch")
_ADAPTER_SUFFIXES = ("lora_a.weight", "lora_b.weight", ".magnitude")  # DoRA's magnitude too
# What ``checkpoint_files: null`` finds, in order of preference: the first pattern with a match.
_WEIGHT_PATTERNS = (
    "*.safetensors.index.json",
    "*.safetensors",
    "*.bin.index.json",
    "*.bin",
    "*.pth",
    "*.pt",
)
_NOT_MODEL_FILES = (ADAPTER_FILE, PEFT_ADAPTER_FILE, RECIPE_STATE_FILE)
PathLike = Union[str, Path]
# The tokenizer's files in a model folder; set_model_folder_files replaces the input's.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def find_checkpoint_files(checkpoint_dir: Path) -> List[str]:
    """The model's files in ``checkpoint_dir``, for ``checkpoint_files: null``.

    The first of these that matches: one ``*.safetensors.index.json`` (its shards are read),
    every ``*.safetensors``, one ``*.bin.index.json``, every ``*.bin``, ``*.pth``, ``*.pt``;
    adapter and recipe-state files are never taken for the model. So a Hugging Face download
    and a folder that training wrote (``output_dir/epoch_N``) both load without naming files.

    Raises:
        FileNotFoundError: if nothing matches, or ValueError for several indexes.
    """
    for pattern in _WEIGHT_PATTERNS:
        found = sorted(
            p.name
            for p in checkpoint_dir.glob(pattern)
            if p.is_file() and p.name not in _NOT_MODEL_FILES
        )
        if pattern.endswith(".index.json") and len(found) > 1:
            raise for_argument(
                ValueError(
                    f"checkpoint_dir {checkpoint_dir} holds several indexes {found}; name the "
                    "one to load in checkpoint_files"
                ),
                "checkpoint_files",
            )
        if found:
            return found
    held = sorted(p.name for p in checkpoint_dir.iterdir())
    raise for_argument(
        FileNotFoundError(
            f"checkpoint_dir {checkpoint_dir} holds no model weights (*.safetensors, *.bin, *.pth "
            f"or *.pt){'; it holds ' + ', '.join(held[:10]) if held else '; it is empty'}. Point "
            "checkpoint_dir at the model's folder (or a training output_dir/epoch_N), or fetch "
            f"the model: {_download_command(checkpoint_dir)}"
        ),
        "checkpoint_files",
    )


def _download_command(folder: Path) -> str:
    from torchtune._cli.download import download_command

    return download_command(folder)


def _missing_checkpoint_dir(folder: Path) -> OSError:
    if folder.exists():
        return NotADirectoryError(
            f"checkpoint_dir {folder} is a file; give the folder that holds the checkpoint"
        )
    return FileNotFoundError(
        f"checkpoint_dir {folder} does not exist. Download the model into it first: "
        f"{_download_command(folder)} (or point checkpoint_dir at a folder a training run wrote, "
        "output_dir/epoch_N)"
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
        checkpoint_files: Union[PathLike, Sequence[PathLike], None] = None,
        model_type: Optional[str] = None,
        output_dir: Optional[PathLike] = None,
        adapter_checkpoint: Optional[PathLike] = None,
        recipe_checkpoint: Optional[PathLike] = None,
        resume_from_checkpoint: bool = False,
        keep_last_n_checkpoints: Optional[int] = None,
    ) -> None:
        self._checkpoint_dir = Path(checkpoint_dir)
        if not self._checkpoint_dir.is_dir():
            raise for_argument(_missing_checkpoint_dir(self._checkpoint_dir), "checkpoint_dir")
        if output_dir is None:
            raise ValueError(f"{type(self).__name__} needs output_dir")
        self._output_dir = Path(output_dir)
        if keep_last_n_checkpoints is not None and int(keep_last_n_checkpoints) < 1:
            raise ValueError(
                f"keep_last_n_checkpoints must be >= 1 or null, got {keep_last_n_checkpoints}"
            )
        self._keep_last_n = (
            None if keep_last_n_checkpoints is None else int(keep_last_n_checkpoints)
        )
        if model_type is None and not self._FORMAT_NAMES_FAMILY:
            supported = [t for f in FAMILIES for t in f.model_types]
            raise ValueError(f"{type(self).__name__} needs model_type, one of {supported}")
        # None only until a format that names its family (HF's config.json) has been read.
        self._family: Optional[ModelFamily] = (
            family_for_model_type(model_type) if model_type is not None else None
        )
        if checkpoint_files is None:
            checkpoint_files = find_checkpoint_files(self._checkpoint_dir)
        if isinstance(checkpoint_files, (str, Path)):
            checkpoint_files = [checkpoint_files]
        names = [str(f) for f in checkpoint_files]
        if not names:
            raise for_argument(
                ValueError("checkpoint_files is empty; name the files, or null to find them"),
                "checkpoint_files",
            )
        self._resume = bool(resume_from_checkpoint)
        # The checkpoint resumed from when resume_from_checkpoint=True names no file: the
        # latest complete one in output_dir (checkpoints.json).
        self.resume_entry: Optional[Dict[str, Any]] = None
        if self._resume and recipe_checkpoint is None:
            entry = self.resume_entry = latest_checkpoint(self._output_dir)
            files = entry["files"]
            if files.get("adapter"):  # LoRA: the same base, the saved adapter
                # A configured adapter_checkpoint is the run's starting adapter; the state
                # resumed belongs with the saved one.
                if adapter_checkpoint is not None:
                    log.info(
                        "Resuming: the saved adapter replaces adapter_checkpoint %s (the "
                        "run's start)",
                        adapter_checkpoint,
                    )
                adapter_checkpoint = self._output_dir / files["adapter"]
            else:  # full fine-tuning: the saved model, under the input's file names
                checkpoint_dir = self._output_dir / files["model"]
                names = [Path(n).name for n in names]
            if entry.get("final"):
                self._resume = False  # nothing to resume: the recipe sees "finished_checkpoint"
            else:
                recipe_checkpoint = self._output_dir / files["recipe_state"]
            log.info("Resuming from %s", self._output_dir / entry["name"])
        self._checkpoint_dir = Path(checkpoint_dir)
        if not self._checkpoint_dir.is_dir():
            raise for_argument(_missing_checkpoint_dir(self._checkpoint_dir), "checkpoint_dir")
        self._checkpoint_paths = self._resolve(names)
        self._adapter_path = (
            self._resolve_adapter(adapter_checkpoint) if adapter_checkpoint else None
        )
        self._recipe_path = None
        if self._resume:
            self._recipe_path = self._resolve([recipe_checkpoint], "recipe_checkpoint")[0]
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

    def _resolve(self, names: Sequence[PathLike], argument: str = "checkpoint_files") -> List[Path]:
        """Paths relative to checkpoint_dir (absolute ones as given); all must exist."""
        paths = [Path(n) if Path(n).is_absolute() else self._checkpoint_dir / n for n in names]
        missing = [str(p) for p in paths if not p.is_file()]
        if not missing:
            return paths
        message = f"{argument} not found: {missing}."
        if argument == "checkpoint_files":
            try:
                held = find_checkpoint_files(self._checkpoint_dir)
                message += (
                    f" {self._checkpoint_dir} holds {held}: name those, or set checkpoint_files "
                    "to null to load them."
                )
            except (OSError, ValueError) as e:
                message += f" {e}"
        raise for_argument(FileNotFoundError(message), argument)

    def _resolve_adapter(self, adapter_checkpoint: PathLike) -> Path:
        """A file as :meth:`_resolve`; a folder is PEFT's ``save_pretrained`` output, whose
        ``adapter_model.safetensors`` is read (its keys mapped by the family's converter)."""
        folder = Path(adapter_checkpoint)
        if not folder.is_absolute():
            folder = self._checkpoint_dir / folder
        if not folder.is_dir():
            return self._resolve([adapter_checkpoint], "adapter_checkpoint")[0]
        missing = [n for n in (PEFT_ADAPTER_FILE, PEFT_CONFIG_FILE) if not (folder / n).is_file()]
        if missing:
            raise for_argument(
                FileNotFoundError(
                    f"adapter_checkpoint {folder} is a folder but lacks {missing}; expected PEFT's "
                    f"{PEFT_ADAPTER_FILE} and {PEFT_CONFIG_FILE}"
                ),
                "adapter_checkpoint",
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
        if self.resume_entry is not None and self.resume_entry.get("final"):
            state["finished_checkpoint"] = dict(self.resume_entry)
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
        self,
        state_dict: Dict[str, Any],
        epoch: Optional[int] = None,
        intermediate_checkpoint: bool = False,
        *,
        name: Optional[str] = None,
        info: Optional[Dict[str, Any]] = None,
    ) -> Path:
        """Write checkpoint ``name`` (default ``epoch_{epoch}``) in the layout of ``_index.py``,
        then list it in ``checkpoints.json`` and prune old step checkpoints.

        Each folder's files appear together or not at all; the checkpoint counts (for resume)
        only once ``checkpoints.json`` lists it, after all its folders are in place.

        Args:
            state_dict: ``"model"`` (native keys, merged weights); optionally ``"adapter"``
                (native LoRA keys) and ``"adapter_config"`` (``r``, ``lora_alpha``,
                ``target_modules``); for intermediate checkpoints the recipe state.
            epoch: epochs finished, for the default name.
            intermediate_checkpoint: also write ``NAME_state/recipe_state.pt`` (every key but
                the weights); without it the checkpoint is listed as the run's final one.
            name: the checkpoint's name (``epoch_N`` or ``step_N``).
            info: more fields for the checkpoints.json entry (the position and what a resume
                must match; ``RecipeState.checkpoint_info``). Without it the position comes
                from the recipe state keys in ``state_dict``, when there.

        Returns:
            The model folder ``output_dir/NAME``.

        Raises:
            ValueError: if ``"model"`` is missing or its keys do not fit the format's layout,
                or neither ``name`` nor ``epoch`` is given.
        """
        if "model" not in state_dict:
            raise ValueError(
                f"save_checkpoint needs a 'model' entry; got keys {sorted(state_dict)}"
            )
        if name is None:
            if epoch is None:
                raise ValueError("save_checkpoint needs name= or epoch=")
            name = f"epoch_{epoch}"
        paths = checkpoint_paths(self._output_dir, name)
        forget_checkpoint(self._output_dir, name)
        with StagedWriter() as writer:
            self._save_model(writer, state_dict["model"], paths.model_dir)
            if "adapter" in state_dict:
                self._save_adapter(writer, state_dict, paths)
            if intermediate_checkpoint:
                recipe_state = {k: v for k, v in state_dict.items() if k not in _WEIGHT_KEYS}
                writer.save_object(recipe_state, paths.recipe_state)
        out = self._output_dir

        def rel(path: Path) -> str:
            return str(path.relative_to(out))

        has_peft = "adapter" in state_dict and state_dict.get("adapter_config") is not None
        entry = {
            "name": name,
            **{k: state_dict[k] for k in _POSITION_KEYS if k in state_dict},
            **(info or {}),
            "final": not intermediate_checkpoint,
            "files": {
                "model": rel(paths.model_dir),
                "adapter": rel(paths.adapter_file) if "adapter" in state_dict else None,
                "peft": rel(paths.peft_dir) if has_peft else None,
                "recipe_state": rel(paths.recipe_state) if intermediate_checkpoint else None,
            },
        }
        record_checkpoint(out, entry, self._keep_last_n)
        log.info("Saved checkpoint %s to %s", name, out)
        return paths.model_dir

    def _save_model(self, writer: StagedWriter, sd: Dict[str, torch.Tensor], model_dir: Path):
        raise NotImplementedError

    def _peft_adapter(self, adapter: Dict[str, torch.Tensor], adapter_config: Dict[str, Any]):
        """``(PEFT adapter weights, adapter_config.json dict)`` of native LoRA tensors."""
        config = self._family.tune_to_peft_adapter_config(
            adapter_config, self._peft_base_model_path()
        )
        return self._family.tune_to_peft_adapter(adapter), config

    def _save_adapter(self, writer: StagedWriter, state_dict: Dict[str, Any], paths):
        adapter = state_dict["adapter"]
        writer.save_state_dict(adapter, paths.adapter_file)
        config = state_dict.get("adapter_config")
        if config is None:
            log.warning("Not writing PEFT's %s: no adapter_config given", PEFT_ADAPTER_FILE)
            return
        peft_weights, peft_config = self._peft_adapter(adapter, config)
        writer.save_state_dict(peft_weights, paths.peft_dir / PEFT_ADAPTER_FILE)
        writer.write_text(json.dumps(peft_config, indent=2), paths.peft_dir / PEFT_CONFIG_FILE)


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
        model_dir: Path,
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
            writer.save_state_dict(shard, model_dir / path.name)
        if self._index_name is not None:
            total = sum(v.numel() * v.element_size() for v in sd.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(layout.items()))}
            writer.write_text(json.dumps(index, indent=2), model_dir / self._index_name)


def _ignored_on_save(key: str) -> bool:
    # Recomputed buffers some checkpoints carry (HF rotary inv_freq, Meta rope.freqs).
    return key.endswith("rotary_emb.inv_freq") or key == "rope.freqs"
