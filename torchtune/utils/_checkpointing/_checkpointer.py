# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Checkpointers: read a Meta / Hugging Face / torchtune checkpoint into torchtune keys, and
write it back in the same format and file layout after (or during) training.

Every checkpointer takes ``(checkpoint_dir, checkpoint_files, model_type, output_dir,
adapter_checkpoint=None, recipe_checkpoint=None, resume_from_checkpoint=False)``.

``load_checkpoint()`` returns ``{"model": native state dict}``, plus ``"adapter"`` (native LoRA
keys) when ``adapter_checkpoint`` is given, plus the recipe state (optimizer, epochs_run, rng
state, ...) when resuming. ``save_checkpoint(state_dict, epoch, intermediate_checkpoint)`` writes
``output_dir/epoch_{epoch}/``: the model in the input's format and file names; when
``state_dict`` has ``"adapter"``, ``adapter.safetensors`` (native keys) and, given
``"adapter_config"`` and known head counts, PEFT's ``adapter_model.safetensors`` +
``adapter_config.json`` in ``epoch_{epoch}/adapter/``; for intermediate checkpoints,
``recipe_state.pt``.

Why PEFT's files sit in a subfolder: ``transformers.AutoModelForCausalLM.from_pretrained(dir)``
looks for ``adapter_config.json`` in ``dir`` and, when it finds one next to a full model, loads
that adapter on top. Our model files already hold the merged weights, so the adapter would be
applied twice, silently. Load the adapter with
``PeftModel.from_pretrained(base_model, output_dir / f"epoch_{epoch}" / "adapter")``.
"""
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from torchtune.models.llama2._convert_adapter import (
    peft_to_tune_adapter_weights,
    tune_to_peft_adapter_config,
    tune_to_peft_adapter_weights,
)
from torchtune.models.llama2._convert_weights import (
    hf_to_tune,
    meta_to_tune,
    tune_to_hf,
    tune_to_meta,
)
from torchtune.utils._checkpointing._io import (
    StagedWriter,
    load_state_dict_file,
    safe_torch_load,
    validate_state_dict_shapes,
)

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("LLAMA2",)
ADAPTER_FILE = "adapter.safetensors"
PEFT_ADAPTER_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_ADAPTER_DIR = "adapter"  # relative to the epoch folder; see the module docstring
RECIPE_STATE_FILE = "recipe_state.pt"
# What a recipe's state dict may hold besides the recipe state proper.
_WEIGHT_KEYS = ("model", "adapter", "adapter_config")
# Files next to an HF checkpoint that from_pretrained / AutoTokenizer read; copied when present.
_HF_AUX_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
PathLike = Union[str, Path]


def _llama2_shapes(
    *,
    vocab_size: Optional[int],
    dim: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    hidden_dim: Optional[int],
) -> Dict[str, Tuple[int, ...]]:
    """Native-key shapes of a Llama2 model; entries whose size is unknown (None) are left out."""
    shapes: Dict[str, Tuple[int, ...]] = {"norm.scale": (dim,)}
    if vocab_size:
        shapes["tok_embeddings.weight"] = (vocab_size, dim)
        shapes["output.weight"] = (vocab_size, dim)
    for i in range(num_layers):
        p = f"layers.{i}."
        shapes[p + "attn.q_proj.weight"] = (num_heads * head_dim, dim)
        shapes[p + "attn.k_proj.weight"] = (num_kv_heads * head_dim, dim)
        shapes[p + "attn.v_proj.weight"] = (num_kv_heads * head_dim, dim)
        shapes[p + "attn.output_proj.weight"] = (dim, num_heads * head_dim)
        shapes[p + "sa_norm.scale"] = (dim,)
        shapes[p + "mlp_norm.scale"] = (dim,)
        if hidden_dim:
            shapes[p + "mlp.w1.weight"] = (hidden_dim, dim)
            shapes[p + "mlp.w2.weight"] = (dim, hidden_dim)
            shapes[p + "mlp.w3.weight"] = (hidden_dim, dim)
    return shapes


def _check_shard_shapes(
    shard: Dict[str, torch.Tensor], expected: Dict[str, Tuple[int, ...]], path: Path, cfg: str
) -> None:
    # Before conversion: a wrong q/k shape would otherwise fail inside the row permutation.
    for key, value in shard.items():
        if key in expected and tuple(value.shape) != expected[key]:
            raise ValueError(
                f"'{key}' in {path} has shape {tuple(value.shape)} but {cfg} describes a model "
                f"where it is {expected[key]}: the checkpoint is for another model size"
            )


def _read_json(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} not found in {path.parent} (needed next to the weights)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


class _Checkpointer:
    """Shared argument checks, adapter and recipe-state I/O. Subclasses do the model files."""

    def __init__(
        self,
        checkpoint_dir: PathLike,
        checkpoint_files: Union[PathLike, Sequence[PathLike]],
        model_type: str,
        output_dir: PathLike,
        adapter_checkpoint: Optional[PathLike] = None,
        recipe_checkpoint: Optional[PathLike] = None,
        resume_from_checkpoint: bool = False,
    ) -> None:
        self._checkpoint_dir = Path(checkpoint_dir)
        if not self._checkpoint_dir.is_dir():
            raise FileNotFoundError(f"checkpoint_dir {self._checkpoint_dir} is not a directory")
        if str(model_type).upper() not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"Unknown model_type '{model_type}'; supported: {list(SUPPORTED_MODEL_TYPES)}"
            )
        self._model_type = str(model_type).upper()
        if isinstance(checkpoint_files, (str, Path)):
            checkpoint_files = [checkpoint_files]
        names = [str(f) for f in checkpoint_files]
        if not names:
            raise ValueError("checkpoint_files is empty")
        self._checkpoint_paths = self._resolve(names)
        self._adapter_path = self._resolve([adapter_checkpoint])[0] if adapter_checkpoint else None
        self._resume = bool(resume_from_checkpoint)
        self._recipe_path = None
        if self._resume:
            if recipe_checkpoint is None:
                raise ValueError("resume_from_checkpoint=True needs recipe_checkpoint (recipe_state.pt)")
            self._recipe_path = self._resolve([recipe_checkpoint])[0]
        self._output_dir = Path(output_dir)

    def _resolve(self, names: Sequence[PathLike]) -> List[Path]:
        """Paths relative to checkpoint_dir (absolute ones as given); all must exist."""
        paths = [Path(n) if Path(n).is_absolute() else self._checkpoint_dir / n for n in names]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"Checkpoint files not found: {missing}")
        return paths

    def _head_counts(self) -> Optional[Tuple[int, int]]:
        """(num_heads, num_kv_heads) when the format records them; PEFT output needs them."""
        return None

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
                raise ValueError(f"{self._recipe_path} holds weight keys {clash}; expected recipe state only")
            state.update(recipe_state)
        return state

    def _load_model(self) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def _load_adapter(self, path: Path) -> Dict[str, torch.Tensor]:
        sd = load_state_dict_file(path)
        if any(k.startswith("base_model.model.") for k in sd):
            heads = self._head_counts()
            if heads is None:
                raise ValueError(
                    f"{path} is a PEFT adapter; converting it needs head counts, which this "
                    f"checkpoint format does not record. Pass our adapter.safetensors instead."
                )
            sd = peft_to_tune_adapter_weights(sd, *heads)
        bad = [k for k in sd if not (k.endswith("lora_a.weight") or k.endswith("lora_b.weight"))]
        if bad:
            raise ValueError(f"{path} holds non-LoRA keys {bad[:5]}; expected lora_a/lora_b weights")
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
            raise ValueError(f"save_checkpoint needs a 'model' entry; got keys {sorted(state_dict)}")
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
        heads = self._head_counts()
        if config is None or heads is None:
            log.warning(
                "Not writing PEFT's %s: %s", PEFT_ADAPTER_FILE,
                "no adapter_config given" if config is None else "head counts are unknown",
            )
            return
        peft_config = tune_to_peft_adapter_config(config, self._peft_base_model_path())
        peft_dir = epoch_dir / PEFT_ADAPTER_DIR
        writer.save_state_dict(tune_to_peft_adapter_weights(adapter, *heads), peft_dir / PEFT_ADAPTER_FILE)
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
            self._index_name = "model.safetensors.index.json" if suffix == ".safetensors" else (
                f"pytorch_model{suffix}.index.json"
            )
        self._key_to_file: Dict[str, str] = {}

    def _read_shards(self, check=None):
        """Yield each file's state dict (source keys), recording key -> file name."""
        self._key_to_file = {}
        for path in self._checkpoint_paths:
            shard = load_state_dict_file(path)
            for key in shard:
                if key in self._key_to_file:
                    raise ValueError(f"Key '{key}' is in both {self._key_to_file[key]} and {path.name}")
                self._key_to_file[key] = path.name
            if check is not None:
                check(shard, path)
            yield shard

    def _write_shards(self, writer: StagedWriter, sd: Dict[str, torch.Tensor], epoch_dir: Path):
        if not self._key_to_file:
            raise ValueError("save_checkpoint needs the file layout: call load_checkpoint() first")
        layout = {k: f for k, f in self._key_to_file.items() if not _ignored_on_save(k)}
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


class FullModelHFCheckpointer(_ShardedCheckpointer):
    """Hugging Face ``LlamaForCausalLM`` checkpoints: ``*.safetensors`` or ``pytorch_model*.bin``,
    one file, a list of shards, or the ``*.index.json`` as the single entry.

    Head counts and sizes come from ``config.json`` in ``checkpoint_dir``. Saving writes the same
    file names (and a regenerated index) plus ``config.json`` and any generation/tokenizer files,
    so ``AutoModelForCausalLM.from_pretrained(output_dir / f"epoch_{epoch}")`` loads it.

    Raises:
        FileNotFoundError: if a checkpoint file or ``config.json`` is missing.
        ValueError: on an unknown ``model_type`` or inconsistent arguments.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._config = _read_json(self._checkpoint_dir / "config.json")
        try:
            c = self._config
            self._num_heads = int(c["num_attention_heads"])
            self._num_kv_heads = int(c.get("num_key_value_heads") or self._num_heads)
            dim = int(c["hidden_size"])
            self._expected = _llama2_shapes(
                vocab_size=c.get("vocab_size"),
                dim=dim,
                num_layers=int(c["num_hidden_layers"]),
                num_heads=self._num_heads,
                num_kv_heads=self._num_kv_heads,
                head_dim=int(c.get("head_dim") or dim // self._num_heads),
                hidden_dim=c.get("intermediate_size"),
            )
        except KeyError as e:
            raise ValueError(f"config.json in {self._checkpoint_dir} lacks {e}") from e

    def _head_counts(self) -> Tuple[int, int]:
        return self._num_heads, self._num_kv_heads

    def _peft_base_model_path(self) -> Optional[str]:
        return str(self._checkpoint_dir.resolve())

    def _load_model(self) -> Dict[str, torch.Tensor]:
        expected_hf = tune_to_hf(
            {k: torch.empty(s, device="meta") for k, s in self._expected.items()},
            self._num_heads, self._num_kv_heads,
        )
        expected_hf = {k: tuple(v.shape) for k, v in expected_hf.items()}

        def check(shard, path):
            _check_shard_shapes(shard, expected_hf, path, "config.json")

        model = {}
        for shard in self._read_shards(check):
            # Convert shard by shard: only one shard's permuted q/k copies live at a time.
            model.update(hf_to_tune(shard, self._num_heads, self._num_kv_heads))
        validate_state_dict_shapes(self._expected, model, source=f"checkpoint in {self._checkpoint_dir}")
        return model

    def _save_model(self, writer: StagedWriter, sd: Dict[str, torch.Tensor], epoch_dir: Path):
        self._write_shards(writer, tune_to_hf(sd, self._num_heads, self._num_kv_heads), epoch_dir)
        for name in _HF_AUX_FILES:
            if (self._checkpoint_dir / name).is_file():
                writer.copy_file(self._checkpoint_dir / name, epoch_dir / name)


class FullModelMetaCheckpointer(_Checkpointer):
    """Meta's ``consolidated.00.pth`` + ``params.json``.

    Only unsharded (single-file) Meta checkpoints are supported: ``consolidated.01.pth`` etc.
    are tensor-parallel slices, not a key partition.

    Raises:
        FileNotFoundError: if the checkpoint or ``params.json`` is missing.
        ValueError: on several files, an unknown ``model_type`` or a size mismatch.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if len(self._checkpoint_paths) != 1:
            raise ValueError(
                f"FullModelMetaCheckpointer reads one consolidated file, got "
                f"{[p.name for p in self._checkpoint_paths]} (model-parallel slices are not supported)"
            )
        self._params = _read_json(self._checkpoint_dir / "params.json")
        try:
            p = self._params
            self._num_heads = int(p["n_heads"])
            self._num_kv_heads = int(p.get("n_kv_heads") or self._num_heads)
            dim = int(p["dim"])
            vocab = p.get("vocab_size")
            self._expected = _llama2_shapes(
                vocab_size=vocab if vocab and vocab > 0 else None,
                dim=dim,
                num_layers=int(p["n_layers"]),
                num_heads=self._num_heads,
                num_kv_heads=self._num_kv_heads,
                head_dim=dim // self._num_heads,
                hidden_dim=None,  # Meta derives it from multiple_of / ffn_dim_multiplier
            )
        except KeyError as e:
            raise ValueError(f"params.json in {self._checkpoint_dir} lacks {e}") from e

    def _head_counts(self) -> Tuple[int, int]:
        return self._num_heads, self._num_kv_heads

    def _load_model(self) -> Dict[str, torch.Tensor]:
        path = self._checkpoint_paths[0]
        sd = load_state_dict_file(path)
        # Meta's recomputable RoPE table is not ours to load, but is written back for a
        # round trip that is key for key.
        self._rope_freqs = sd.get("rope.freqs")
        model = meta_to_tune(sd)
        for key, shape in self._expected.items():
            if key in model and tuple(model[key].shape) != shape:
                raise ValueError(
                    f"'{key}' in {path} has shape {tuple(model[key].shape)} but params.json "
                    f"describes a model where it is {shape}: the checkpoint is for another model size"
                )
        missing = sorted(set(self._expected) - set(model))
        if missing:
            raise ValueError(f"{path} lacks keys that params.json implies: {missing[:8]}")
        return model

    def _save_model(self, writer: StagedWriter, sd: Dict[str, torch.Tensor], epoch_dir: Path):
        meta_sd = tune_to_meta(sd)
        if getattr(self, "_rope_freqs", None) is not None:
            meta_sd["rope.freqs"] = self._rope_freqs
        writer.save_state_dict(meta_sd, epoch_dir / self._checkpoint_paths[0].name)
        writer.copy_file(self._checkpoint_dir / "params.json", epoch_dir / "params.json")


class FullModelTorchTuneCheckpointer(_ShardedCheckpointer):
    """torchtune's own format: native keys in ``.pt`` or ``.safetensors`` file(s).

    PEFT adapter output needs head counts; they are read from a ``config.json`` (HF) or
    ``params.json`` (Meta) in ``checkpoint_dir`` when one is there.
    """

    def _head_counts(self) -> Optional[Tuple[int, int]]:
        for name, heads, kv in (
            ("config.json", "num_attention_heads", "num_key_value_heads"),
            ("params.json", "n_heads", "n_kv_heads"),
        ):
            path = self._checkpoint_dir / name
            if path.is_file():
                cfg = _read_json(path)
                if heads in cfg:
                    return int(cfg[heads]), int(cfg.get(kv) or cfg[heads])
        return None

    def _load_model(self) -> Dict[str, torch.Tensor]:
        model = {}
        for shard in self._read_shards():
            model.update(shard)
        return model

    def _save_model(self, writer: StagedWriter, sd: Dict[str, torch.Tensor], epoch_dir: Path):
        self._write_shards(writer, sd, epoch_dir)
