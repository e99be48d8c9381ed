# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Checkpointers: read a Meta / Hugging Face / torchtune checkpoint into torchtune keys, and
write it back in the same format and file layout after (or during) training.

Every checkpointer takes ``(checkpoint_dir, checkpoint_files, model_type, output_dir,
adapter_checkpoint=None, recipe_checkpoint=None, resume_from_checkpoint=False,
keep_last_n_checkpoints=None)``; ``model_type`` may be None (or omitted, with ``output_dir=``
by keyword) for HF checkpoints; ``checkpoint_files`` None finds the model's files in
``checkpoint_dir``.

``load_checkpoint()`` returns ``{"model": native state dict}``, plus ``"adapter"`` (native LoRA
keys) when ``adapter_checkpoint`` is given, plus the recipe state (optimizer, epochs_run, rng
state, ...) when resuming. ``resume_from_checkpoint=True`` without ``recipe_checkpoint`` resumes
from the latest complete checkpoint in ``output_dir`` (``checkpoints.json``): a full model is
then read from that checkpoint's model folder (same file names), a LoRA run keeps its base and
reads the saved adapter; when that checkpoint is the run's final one, ``load_checkpoint()``
adds ``"finished_checkpoint"`` (its entry) instead of recipe state.

``save_checkpoint(state_dict, epoch, intermediate_checkpoint, name=, info=)`` writes
checkpoint ``name`` (default ``epoch_{epoch}``) as sibling folders of ``output_dir`` (see
``_index.py``): ``NAME/`` the model in the input's format and file names; given ``"adapter"``,
``NAME_adapter/adapter.safetensors`` (native keys) and, given ``"adapter_config"``, PEFT's
``adapter_model.safetensors`` + ``adapter_config.json`` in ``NAME_peft/``; for intermediate
checkpoints, ``NAME_state/recipe_state.pt``. It then lists the checkpoint in
``checkpoints.json`` and keeps the last ``keep_last_n_checkpoints`` step checkpoints.

The checkpointers only read and write files: every key map, shape and config rule is the
model family's (``torchtune.models._families``), found from ``model_type`` (a row's legacy
name) or, for HF checkpoints when it is omitted, from ``config.json``'s ``model_type``.

Why PEFT's files sit in a sibling folder: ``transformers.AutoModelForCausalLM.from_pretrained(dir)``
looks for ``adapter_config.json`` in ``dir`` and, when it finds one next to a full model, loads
that adapter on top. Our model files already hold the merged weights, so the adapter would be
applied twice, silently. Load the adapter with
``PeftModel.from_pretrained(base_model, output_dir / "epoch_1_peft")``.
"""

import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from torchtune.models._families import family_for_hf_model_type
from torchtune.utils._checkpointing._base import (
    PEFT_ADAPTER_FILE,
    PEFT_CONFIG_FILE,
    TOKENIZER_FILES,
    _Checkpointer,
    _read_json,
    _ShardedCheckpointer,
)
from torchtune.utils._checkpointing._index import ADAPTER_FILE, RECIPE_STATE_FILE
from torchtune.utils._checkpointing._io import (
    StagedWriter,
    load_state_dict_file,
    validate_state_dict_shapes,
)

__all__ = [
    "ADAPTER_FILE",
    "PEFT_ADAPTER_FILE",
    "PEFT_CONFIG_FILE",
    "RECIPE_STATE_FILE",
    "FullModelHFCheckpointer",
    "FullModelMetaCheckpointer",
    "FullModelTorchTuneCheckpointer",
]

log = logging.getLogger(__name__)

# Files next to an HF checkpoint that from_pretrained / AutoTokenizer read; copied when present.
_HF_AUX_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    # a multimodal model's image processor, read by AutoProcessor
    "preprocessor_config.json",
    "processor_config.json",
)


def _family_fn(fn: Callable, arg: Dict[str, Any], path: Path):
    """Call a family's config function; name the file in its error."""
    try:
        return fn(arg)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def _multimodal_types(family) -> Tuple[str, ...]:
    return family.multimodal.model_types if family.multimodal is not None else ()


def _check_shard_shapes(
    shard: Dict[str, torch.Tensor], expected: Dict[str, Tuple[int, ...]], path: Path, cfg: str
) -> None:
    # Before conversion, so the error names the key as it is in the file.
    for key, value in shard.items():
        if key in expected and tuple(value.shape) != expected[key]:
            raise ValueError(
                f"'{key}' in {path} has shape {tuple(value.shape)} but {cfg} describes a model "
                f"where it is {expected[key]}: the checkpoint is for another model size"
            )


class FullModelHFCheckpointer(_ShardedCheckpointer):
    """Hugging Face checkpoints: ``*.safetensors`` or ``pytorch_model*.bin``, one file, a list
    of shards, or the ``*.index.json`` as the single entry.

    The family and sizes come from ``config.json`` in ``checkpoint_dir``. Saving writes the same
    file names (and a regenerated index) plus ``config.json`` and any generation/tokenizer files,
    so ``AutoModelForCausalLM.from_pretrained(output_dir / "epoch_1")`` loads it.

    A multimodal checkpoint whose ``model_type`` a family lists in its ``multimodal`` format
    (a language model beside a vision tower) loads as its language model alone; the other
    tensors are kept as read (one log line says how many) and saved back unchanged, in their
    files and under their names, beside the trained decoder: the output is the same
    multimodal checkpoint (its ``...ForConditionalGeneration.from_pretrained`` loads it), and
    PEFT adapters are written for that model's module names.

    Args:
        checkpoint_dir: folder holding the checkpoint (and config.json / params.json).
        checkpoint_files: file names in ``checkpoint_dir`` (or absolute paths): one file, the
            shards, or a single ``*.index.json``; None finds them (its ``*.safetensors`` index,
            else every ``*.safetensors``, ...: see ``find_checkpoint_files``), so a training
            run's ``output_dir/epoch_N`` folder loads as it is.
        model_type: a family's legacy name in ``torchtune.models._families`` (any case); for
            HF checkpoints None means the family of config.json's ``model_type``.
        output_dir: where checkpoint folders and ``checkpoints.json`` are written (required).
        adapter_checkpoint: optional LoRA adapter to load (our ``adapter.safetensors``, or
            PEFT's ``adapter_model.safetensors``).
        recipe_checkpoint: ``recipe_state.pt`` to load when resuming; None with
            ``resume_from_checkpoint`` resumes from the latest entry of
            ``output_dir/checkpoints.json``.
        resume_from_checkpoint: merge the recipe state into ``load_checkpoint()``'s result.
        keep_last_n_checkpoints: how many ``step_*`` checkpoints to keep (None: all).

    Raises:
        FileNotFoundError: if a checkpoint file or ``config.json`` is missing, or on resume
            without ``recipe_checkpoint`` when ``output_dir`` has no complete checkpoint.
        ValueError: on an unknown ``model_type``, one that config.json contradicts, or
            inconsistent arguments.
    """

    _FORMAT_NAMES_FAMILY = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        config_path = self._checkpoint_dir / "config.json"
        self._config = _read_json(config_path)
        hf_type = self._config.get("model_type")
        if self._family is None:
            if hf_type is None:
                raise ValueError(f"{config_path} has no 'model_type'; pass model_type")
            self._family = family_for_hf_model_type(hf_type)
        elif hf_type is not None and hf_type not in (
            self._family.hf_model_types + _multimodal_types(self._family)
        ):
            raise ValueError(
                f"{config_path} is for model_type '{hf_type}', not the {self._family.name} "
                f"family's {list(self._family.hf_model_types)}"
            )
        fam = self._family
        self._expected = _family_fn(fam.expected_shapes, self._config, config_path)
        self._tied = bool(self._config.get("tie_word_embeddings", fam.tied_by_default))
        self._output_from_embeddings = False  # set on load: lm_head absent, tied to the table
        # A multimodal checkpoint: the decoder is read, the vision tower and
        # projector are kept as loaded and written back beside the trained decoder.
        self._multimodal = fam.multimodal if hf_type in _multimodal_types(fam) else None
        self._passthrough: Dict[str, torch.Tensor] = {}
        self._layout: Optional[str] = None

    def _peft_base_model_path(self) -> Optional[str]:
        return str(self._checkpoint_dir.resolve())

    def _source_key(self, hf_key: str) -> str:
        """A text-only HF key as the loaded checkpoint names it (prefixed if multimodal)."""
        if self._multimodal is None:
            return hf_key
        return next(iter(self._multimodal.join({hf_key: None}, {}, self._layout)))

    def _peft_adapter(self, adapter, adapter_config):
        if self._multimodal is None:
            return super()._peft_adapter(adapter, adapter_config)
        # On the multimodal model: its module names, and the decoder's modules only.
        config = self._multimodal.tune_to_peft_adapter_config(
            adapter_config, self._peft_base_model_path()
        )
        return self._multimodal.tune_to_peft_adapter(adapter), config

    def _load_model(self) -> Dict[str, torch.Tensor]:
        expected_hf = self._family.tune_to_hf(
            {k: torch.empty(s, device="meta") for k, s in self._expected.items()}
        )
        expected_hf = {k: tuple(v.shape) for k, v in expected_hf.items()}

        def check(shard, path):
            if self._multimodal is not None:
                shard = self._multimodal.split(shard)[0]
            _check_shard_shapes(shard, expected_hf, path, "config.json")

        model = {}
        self._passthrough, layouts = {}, set()
        for shard in self._read_shards(check):
            if self._multimodal is not None:
                shard, rest, layout = self._multimodal.split(shard)
                self._passthrough.update(rest)
                layouts |= {layout} - {None}
            model.update(self._family.hf_to_tune(shard))
        if self._multimodal is not None:
            if len(layouts) != 1:
                raise ValueError(
                    f"The multimodal checkpoint in {self._checkpoint_dir} has key layouts "
                    f"{sorted(layouts)} across its files; expected exactly one"
                )
            self._layout = layouts.pop()
            log.info(
                "Read the text decoder of the multimodal checkpoint in %s; skipped %d other "
                "tensors (vision tower, projector), written back unchanged on save",
                self._checkpoint_dir,
                len(self._passthrough),
            )
        # Tied embeddings (tie_word_embeddings: true): HF stores no lm_head. A copy of the
        # table fills output.weight, so an untied model starts as HF's tied one and a tied
        # model (builder's tie_word_embeddings) loads the same values into its one Parameter.
        self._output_from_embeddings = (
            self._tied and "output.weight" not in model and "tok_embeddings.weight" in model
        )
        if self._output_from_embeddings:
            model["output.weight"] = model["tok_embeddings.weight"].clone()
        source = f"checkpoint in {self._checkpoint_dir}"
        validate_state_dict_shapes(self._expected, model, source=source)
        return model

    def _save_model(self, writer: StagedWriter, sd: Dict[str, torch.Tensor], model_dir: Path):
        if self._tied and "output.weight" not in sd and "tok_embeddings.weight" in sd:
            # A tied model's parameters listed once (e.g. from named_parameters()): its
            # output projection is the table.
            sd = {**sd, "output.weight": sd["tok_embeddings.weight"]}
        hf_sd = self._family.tune_to_hf(sd)
        config, extra = self._config, None
        if self._output_from_embeddings:
            if torch.equal(hf_sd["lm_head.weight"], hf_sd["model.embed_tokens.weight"]):
                del hf_sd["lm_head.weight"]  # still tied: the input's format, unchanged
            else:
                # Training moved the two apart: a tied checkpoint would lose one of them, so
                # write lm_head beside the table and mark the model untied.
                log.warning(
                    "The output projection no longer equals the embedding table: saving "
                    "lm_head.weight and tie_word_embeddings=false in %s",
                    model_dir,
                )
                head, table = (
                    self._source_key("lm_head.weight"),
                    self._source_key("model.embed_tokens.weight"),
                )
                extra = {head: self._key_to_file[table]}
                config = {**self._config, "tie_word_embeddings": False}
        if self._multimodal is not None:
            hf_sd = self._multimodal.join(hf_sd, self._passthrough, self._layout)
        self._write_shards(writer, hf_sd, model_dir, extra_keys=extra)
        for name in _HF_AUX_FILES:
            if name in TOKENIZER_FILES and self._model_folder_files is not None:
                continue  # the run's tokenizer, written below
            if name == "config.json" and config is not self._config:
                writer.write_text(json.dumps(config, indent=2) + "\n", model_dir / name)
            elif (self._checkpoint_dir / name).is_file():
                writer.copy_file(self._checkpoint_dir / name, model_dir / name)
        self._write_model_folder_files(writer, model_dir)


class FullModelMetaCheckpointer(_Checkpointer):
    """Meta's ``consolidated.00.pth`` + ``params.json``.

    Only unsharded (single-file) Meta checkpoints are supported: ``consolidated.01.pth`` etc.
    are tensor-parallel slices, not a key partition. Arguments as
    :class:`FullModelHFCheckpointer` (``model_type`` required); head counts and sizes come
    from ``params.json``.

    Raises:
        FileNotFoundError: if the checkpoint or ``params.json`` is missing.
        ValueError: on several files, an unknown ``model_type`` or a size mismatch.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if len(self._checkpoint_paths) != 1:
            raise ValueError(
                f"FullModelMetaCheckpointer reads one consolidated file, got "
                f"{[p.name for p in self._checkpoint_paths]} "
                "(model-parallel slices are not supported)"
            )
        if self._family.meta_to_tune is None:
            raise ValueError(f"The {self._family.name} family has no Meta checkpoint format")
        params_path = self._checkpoint_dir / "params.json"
        self._params = _read_json(params_path)
        fam = self._family
        config = _family_fn(fam.meta_params_to_hf_config, self._params, params_path)
        self._num_heads = config["num_attention_heads"]
        self._num_kv_heads = config["num_key_value_heads"]
        self._expected = _family_fn(fam.expected_shapes, config, params_path)

    def _load_model(self) -> Dict[str, torch.Tensor]:
        path = self._checkpoint_paths[0]
        sd = load_state_dict_file(path)
        # Meta's recomputable RoPE table is not ours to load, but is written back for a
        # round trip that is key for key.
        self._rope_freqs = sd.get("rope.freqs")
        model = self._family.meta_to_tune(sd, self._num_heads, self._num_kv_heads)
        for key, shape in self._expected.items():
            if key in model and tuple(model[key].shape) != shape:
                raise ValueError(
                    f"'{key}' in {path} has shape {tuple(model[key].shape)} but params.json "
                    f"describes a model where it is {shape}: the checkpoint is for another "
                    "model size"
                )
        missing = sorted(set(self._expected) - set(model))
        if missing:
            raise ValueError(f"{path} lacks keys that params.json implies: {missing[:8]}")
        return model

    def _save_model(self, writer: StagedWriter, sd: Dict[str, torch.Tensor], model_dir: Path):
        meta_sd = self._family.tune_to_meta(sd, self._num_heads, self._num_kv_heads)
        if getattr(self, "_rope_freqs", None) is not None:
            meta_sd["rope.freqs"] = self._rope_freqs
        writer.save_state_dict(meta_sd, model_dir / self._checkpoint_paths[0].name)
        writer.copy_file(self._checkpoint_dir / "params.json", model_dir / "params.json")
        self._write_model_folder_files(writer, model_dir)


class FullModelTorchTuneCheckpointer(_ShardedCheckpointer):
    """torchtune's own format: native keys in ``.pt`` or ``.safetensors`` file(s).

    Arguments as :class:`FullModelHFCheckpointer` (``model_type`` required). Saving writes each
    key back to the file it came from (plus an index when there are several); adapters as the
    other formats do (PEFT's files are a rename of ours, so they are always written).
    """

    def _load_model(self) -> Dict[str, torch.Tensor]:
        model = {}
        for shard in self._read_shards():
            model.update(shard)
        return model

    def _save_model(self, writer: StagedWriter, sd: Dict[str, torch.Tensor], model_dir: Path):
        self._write_shards(writer, sd, model_dir)
        self._write_model_folder_files(writer, model_dir)
