# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The tokenizer files a run writes into its model folder, so that ``from_pretrained``,
llama.cpp's converter and chat front ends find the tokenizer the run used and prompt the model
in the format it was trained with.

The chat template is the one the training data was rendered with:

- ``chat_dataset``, and ``preference_dataset`` on conversations: the tokenizer's own template;
- ``instruct_dataset`` / ``alpaca_dataset``, and ``preference_dataset`` on string rows (Alpaca
  prompt): a template written for the instruct template
  (:func:`torchtune.data.instruct_chat_template`; how a user message fills its fields is
  documented there);
- other data (text completion): the tokenizer's own template, if it has one.
"""

import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Union

from torch.utils.data import Dataset

from torchtune.data import AlpacaInstructTemplate
from torchtune.data._instruct_chat_template import instruct_chat_template
from torchtune.datasets import ChatDataset, InstructDataset, PreferenceDataset
from torchtune.modules.tokenizers import HFTokenizer, SentencePieceTokenizer
from torchtune.modules.tokenizers._sp_to_hf import sentencepiece_hf_files, unsupported_reason

log = logging.getLogger(__name__)

# Copied from an HF tokenizer folder as they are (tokenizer_config.json is rewritten).
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "special_tokens_map.json")
FileSource = Union[Path, str]  # a file to copy, or the text to write


def training_chat_template(tokenizer: Any, dataset: Dataset) -> Optional[str]:
    """The Jinja chat template that renders prompts as ``dataset`` rendered them for training,
    or None when neither the data nor the tokenizer has one (see the module docstring)."""
    own = getattr(tokenizer, "chat_template", None)
    dataset = getattr(dataset, "source_dataset", dataset)  # PackedDataset keeps its rows' set
    if isinstance(dataset, InstructDataset):
        try:
            return instruct_chat_template(dataset.template)
        except ValueError as e:
            log.warning("No chat template for the model folder: %s", e)
            return None
    if isinstance(dataset, PreferenceDataset) and not dataset.conversational:
        return instruct_chat_template(AlpacaInstructTemplate)
    if own is None and not isinstance(dataset, (ChatDataset, PreferenceDataset)):
        log.info("The training data has no prompt format: the model folder gets no chat template")
    return own


def tokenizer_output_files(
    cfg: Any, tokenizer: Any, dataset: Dataset
) -> Optional[Dict[str, FileSource]]:
    """What a training recipe hands to ``checkpointer.set_model_folder_files``: the tokenizer
    the run used, with the chat template of its training data in ``tokenizer_config.json``.

    - An HF tokenizer (``hf_tokenizer(path=<folder>)``): its ``tokenizer.json``,
      ``tokenizer.model`` and ``special_tokens_map.json`` (those present) and its
      ``tokenizer_config.json`` with ``chat_template`` set (a ``chat_template.jinja`` file,
      which transformers would prefer over the config, is not copied: its text is inlined).
    - A SentencePiece model (``llama2_tokenizer(path=.../tokenizer.model)``): the model plus
      ``tokenizer.json``, ``tokenizer_config.json`` (``model_max_length`` from
      ``cfg.model.max_seq_len``) and ``special_tokens_map.json`` that load with
      ``AutoTokenizer`` and encode exactly as the model does
      (:func:`~torchtune.modules.tokenizers._sp_to_hf.sentencepiece_hf_files`).

    Args:
        cfg: the recipe config (reads ``model.max_seq_len`` when present).
        tokenizer: the run's tokenizer.
        dataset: the training dataset (its prompt format picks the chat template).

    Returns:
        Optional[Dict[str, FileSource]]: file name in the model folder -> the file to copy
        (a Path) or the text to write (a str); None for another kind of tokenizer, whose
        files the checkpointer then copies from ``checkpoint_dir`` as before.
    """
    template = training_chat_template(tokenizer, dataset)
    if isinstance(tokenizer, HFTokenizer):
        return _hf_files(tokenizer.path, template)
    if isinstance(tokenizer, SentencePieceTokenizer):
        model_cfg = cfg.get("model") if hasattr(cfg, "get") else None
        max_len = model_cfg.get("max_seq_len") if model_cfg is not None else None
        return _sentencepiece_files(Path(tokenizer.path), template, max_len)
    log.warning(
        "Tokenizer %s is neither an HF folder nor a SentencePiece model: the model folder "
        "gets the tokenizer files of checkpoint_dir",
        type(tokenizer).__name__,
    )
    return None


def _hf_files(folder: Path, template: Optional[str]) -> Dict[str, FileSource]:
    files: Dict[str, FileSource] = {
        name: folder / name for name in _HF_TOKENIZER_FILES if (folder / name).is_file()
    }
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    if template is not None:
        # One place for the template: a list of named templates becomes the one trained with.
        config["chat_template"] = template
    files["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    return files


def _sentencepiece_files(
    model: Path, template: Optional[str], max_len: Optional[int]
) -> Dict[str, FileSource]:
    files: Dict[str, FileSource] = {"tokenizer.model": model}
    reason = unsupported_reason(model)
    if reason is None:
        files.update(
            sentencepiece_hf_files(model, model_max_length=max_len, chat_template=template)
        )
        return files
    log.warning(
        "%s: no tokenizer.json for the model folder (%s); transformers converts "
        "tokenizer.model itself (it needs protobuf) and may encode differently",
        model,
        reason,
    )
    config: Dict[str, Any] = {"tokenizer_class": "LlamaTokenizer", "legacy": True}
    if max_len is not None:
        config["model_max_length"] = max_len
    if template is not None:
        config["chat_template"] = template
    files["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    return files
