# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Instruction-tuning datasets: a prompt template plus a response column."""

import inspect
from typing import Any, Dict, List, Mapping, Optional, Type, Union

from torch.utils.data import Dataset

from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, InstructTemplate, padding_id
from torchtune.datasets._packed import PackedDataset
from torchtune.datasets._utils import get_component, load_source, validate_columns
from torchtune.modules.tokenizers import Tokenizer

TemplateLike = Union[str, Type[InstructTemplate], InstructTemplate]


class InstructDataset(Dataset):
    """Rows formatted by a prompt template and tokenized lazily, one sample per row.

    A sample is the whole text's tokenization, ``tokens = encode(prompt + response,
    add_bos=True, add_eos=True)``, so a SentencePiece model does not put a word-boundary piece
    at the start of every answer (encoding the response on its own would, and the model would
    learn to begin each answer with a space). ``labels`` equal ``tokens``, except that with
    ``train_on_input=False`` the prompt positions are ``CROSS_ENTROPY_IGNORE_IDX`` (-100).

    The prompt positions (masked) are the longest common prefix of ``encode(prompt,
    add_bos=True, add_eos=False)`` and ``tokens``: the tokens the prompt alone also produces, in
    place. This needs nothing from the tokenizer beyond ``encode``. A token that straddles the
    boundary holds answer text, so it is scored: SentencePiece's ``"▁hello"`` after a prompt
    ending in a space. If the tokenizer merges differently earlier than the prompt's last token,
    every token from the first that differs is scored, some prompt text included: the bundled
    tiny tokenizer ends a prompt ``"...:\\n"`` with a ``":\\n"`` token, but ends it ``":"``,
    ``"\\n\\n"`` when the answer starts with ``"\\n"``. Where the prompt ends in a newline and
    the answer does not start with whitespace the boundary is clean (checked for the Alpaca
    prompt with the tokenizers the tests train and the bundled one): the scored tokens are
    exactly the answer's.

    Samples longer than ``max_seq_len`` are cut to its length; a cut sample loses its EOS (it
    is not re-appended, so the model never learns to stop at a point the data did not stop).

    Every row is validated when the dataset is built (see ``validate_columns``).

    Args:
        tokenizer (Tokenizer): any torchtune tokenizer (SentencePiece or tokenizer.json).
        source (str): Hub id or builder name (``"json"``, ``"csv"``, ``"parquet"``) for
            ``datasets.load_dataset``.
        template (TemplateLike): an ``InstructTemplate`` class or instance, or its dotted path
            such as ``"torchtune.data.AlpacaInstructTemplate"``.
        column_map (Optional[Dict[str, str]]): template field (and ``"output"``) -> dataset column.
        train_on_input (bool): also compute the loss on the prompt. Default False.
        max_seq_len (Optional[int]): truncate samples to this many tokens; None keeps them whole.
        split (str): dataset split. Default "train".
        skip_bad_rows (bool): drop invalid rows (their count is logged) instead of raising.
        **load_dataset_kwargs: passed to ``datasets.load_dataset`` (e.g. ``data_files``).

    Raises:
        ValueError: on an unknown template or column_map field, a bad ``max_seq_len``, or bad rows.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        source: str,
        template: TemplateLike,
        column_map: Optional[Dict[str, str]] = None,
        train_on_input: bool = False,
        max_seq_len: Optional[int] = None,
        split: str = "train",
        skip_bad_rows: bool = False,
        **load_dataset_kwargs: Any,
    ):
        if max_seq_len is not None and max_seq_len < 1:
            raise ValueError(f"max_seq_len must be a positive int or None, got {max_seq_len}")
        self._tokenizer = tokenizer
        self.template = _resolve_template(template)
        fields = {f: True for f in self.template.required_fields}
        fields.update({f: False for f in self.template.optional_fields})
        fields["output"] = True
        self._column_map = dict(column_map or {})
        unknown = set(self._column_map) - set(fields)
        if unknown:
            raise ValueError(
                f"column_map keys {sorted(unknown)} are not fields of {type(self.template).__name__} "
                f"(fields: {sorted(fields)})"
            )
        self.train_on_input = train_on_input
        self.max_seq_len = max_seq_len
        self._data, label = load_source(source, split, **load_dataset_kwargs)
        self._output_column = self._column_map.get("output", "output")
        columns = {self._column_map.get(f, f): required for f, required in fields.items()}
        self._indices = validate_columns(self._data, columns, label, skip_bad_rows)
        self.num_skipped = 0 if self._indices is None else len(self._data) - len(self._indices)

    def __len__(self) -> int:
        return len(self._data) if self._indices is None else len(self._indices)

    def __getitem__(self, index: int) -> Dict[str, List[int]]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        row = self._data[int(index if self._indices is None else self._indices[index])]
        return self._tokenize(row)

    def _tokenize(self, row: Mapping[str, Any]) -> Dict[str, List[int]]:
        prompt = self.template.format(row, self._column_map)
        tokens = self._tokenizer.encode(
            prompt + row[self._output_column], add_bos=True, add_eos=True
        )
        n_prompt = _common_prefix_len(
            self._tokenizer.encode(prompt, add_bos=True, add_eos=False), tokens
        )
        if self.train_on_input:
            labels = list(tokens)
        else:
            labels = [CROSS_ENTROPY_IGNORE_IDX] * n_prompt + tokens[n_prompt:]
        if self.max_seq_len is not None:
            tokens, labels = tokens[: self.max_seq_len], labels[: self.max_seq_len]
        return {"tokens": tokens, "labels": labels}


def _common_prefix_len(a: List[int], b: List[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _resolve_template(template: TemplateLike) -> InstructTemplate:
    if isinstance(template, str):
        template = get_component(template)
    if inspect.isclass(template):
        if not issubclass(template, InstructTemplate):
            raise ValueError(f"template {template!r} is not an InstructTemplate subclass")
        template = template()
    if not isinstance(template, InstructTemplate):
        raise ValueError(
            f"template must be an InstructTemplate (class, instance or dotted path), got {template!r}"
        )
    return template


def instruct_dataset(
    tokenizer: Tokenizer,
    source: str,
    template: TemplateLike,
    column_map: Optional[Dict[str, str]] = None,
    train_on_input: bool = False,
    max_seq_len: Optional[int] = 512,
    packed: bool = False,
    split: str = "train",
    skip_bad_rows: bool = False,
    **load_dataset_kwargs: Any,
) -> Union[InstructDataset, PackedDataset]:
    """Build an instruction dataset for any schema, optionally packed.

    Example config::

        dataset:
          _component_: torchtune.datasets.instruct_dataset
          source: json
          data_files: my_data.jsonl
          template: torchtune.data.AlpacaInstructTemplate
          column_map: {instruction: prompt, input: context, output: response}

    Args: see ``InstructDataset``; ``packed`` packs samples into ``max_seq_len`` rows
    (see ``PackedDataset``), which then needs a ``max_seq_len``.

    Returns:
        Union[InstructDataset, PackedDataset]: the dataset.
    """
    ds = InstructDataset(
        tokenizer,
        source,
        template,
        column_map=column_map,
        train_on_input=train_on_input,
        max_seq_len=max_seq_len,
        split=split,
        skip_bad_rows=skip_bad_rows,
        **load_dataset_kwargs,
    )
    if packed:
        if max_seq_len is None:
            raise ValueError("packed=True needs a max_seq_len")
        return PackedDataset(ds, max_seq_len=max_seq_len, padding_idx=padding_id(tokenizer))
    return ds
