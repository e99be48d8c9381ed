# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Preference datasets: a prompt with a chosen and a rejected response, tokenized per side."""

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from torch.utils.data import Dataset

from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, AlpacaInstructTemplate
from torchtune.datasets._chat import OPENAI_ROLES
from torchtune.datasets._instruct import _common_prefix_len
from torchtune.datasets._utils import load_source
from torchtune.modules.tokenizers import truncate_chat

_FIELDS = ("prompt", "chosen", "rejected")
_SIDES = ("chosen", "rejected")


class PreferenceDataset(Dataset):
    """Rows of (prompt, chosen, rejected), tokenized lazily, one pair per row.

    Two row layouts, told apart by the ``chosen`` column's type:

    - **Conversations** (the common hub layout): ``chosen`` and ``rejected`` are lists of
      messages (``role`` / ``content``) ending in the assistant's answer; everything before
      that answer is the prompt and must be the same on both sides (a ``prompt`` column, if
      present, is not read). Each side is ``tokenizer.tokenize_messages(messages)``; only the
      last assistant turn is scored (answer and stop token, by the tokenizer's rule), so an
      earlier assistant turn of the prompt is never a preference target.
    - **Strings**: ``prompt``, ``chosen`` and ``rejected`` are strings; the prompt is rendered
      with the Alpaca template (no-input variant) and each side is tokenized as a whole text,
      ``encode(prompt + response, add_bos=True, add_eos=True)``, with the prompt's tokens (the
      common prefix with ``encode(prompt)``) masked, as ``InstructDataset`` does.

    ``train_on_input=True`` scores every token of both sides. ``max_seq_len`` cuts each side
    on its own (a conversation by ``truncate_chat``, which masks an answer the cut splits; a
    string side loses its EOS). Every row is checked when the dataset is built; errors name
    the row (counted from 0) and the column.

    Args:
        tokenizer: a torchtune tokenizer; conversations need ``tokenize_messages``.
        source (str): Hub id, ``datasets`` builder name with ``data_files``, or a local
            ``.json`` / ``.jsonl`` / ``.parquet`` file.
        data_files: passed to ``datasets.load_dataset``.
        split (str): dataset split. Default "train".
        column_map (Optional[Dict[str, str]]): ``prompt`` / ``chosen`` / ``rejected`` -> column.
        train_on_input (bool): also score the prompt. Default False.
        max_seq_len (Optional[int]): cut each side to this many tokens; None keeps them whole.
        rewritten_turns (str): ``"error"`` or ``"as_rendered"``, for chat templates that render
            an assistant turn differently once later turns follow (Qwen 3); see
            ``HFTokenizer.tokenize_messages``. Default "error".
        **load_dataset_kwargs: passed to ``datasets.load_dataset``.

    Raises:
        ValueError: on an unknown ``column_map`` key, a bad ``max_seq_len``, a missing column,
            or a malformed row.
    """

    def __init__(
        self,
        tokenizer: Any,
        source: str,
        *,
        data_files: Optional[Union[str, Sequence[str]]] = None,
        split: str = "train",
        column_map: Optional[Dict[str, str]] = None,
        train_on_input: bool = False,
        max_seq_len: Optional[int] = None,
        rewritten_turns: str = "error",
        **load_dataset_kwargs: Any,
    ):
        column_map = dict(column_map or {})
        unknown = sorted(set(column_map) - set(_FIELDS))
        if unknown:
            raise ValueError(f"column_map keys {unknown} are not among {list(_FIELDS)}")
        if max_seq_len is not None and max_seq_len < 1:
            raise ValueError(f"max_seq_len must be a positive int or None, got {max_seq_len}")
        self._tokenizer = tokenizer
        self._rewritten_turns = rewritten_turns
        self.train_on_input = train_on_input
        self.max_seq_len = max_seq_len
        data, self._source = load_source(source, split, data_files, **load_dataset_kwargs)
        self._columns = {f: column_map.get(f, f) for f in _FIELDS}
        for side in _SIDES:
            self._require_column(data, side)
        chosen = data[self._columns["chosen"]][:]
        self.conversational = bool(chosen) and isinstance(chosen[0], list)
        if self.conversational:
            if not callable(getattr(tokenizer, "tokenize_messages", None)):
                raise ValueError(
                    f"{self._source}: the rows are conversations, which need a tokenizer with a "
                    f"chat template (tokenize_messages); got {type(tokenizer).__name__}"
                )
            rejected = data[self._columns["rejected"]][:]
            self._rows = [
                self._conversation_pair(i, c, r) for i, (c, r) in enumerate(zip(chosen, rejected))
            ]
        else:
            self._require_column(data, "prompt")
            columns = [data[self._columns[f]][:] for f in _FIELDS]
            self._rows = [self._string_pair(i, *row) for i, row in enumerate(zip(*columns))]

    def _require_column(self, data: Any, field: str) -> None:
        column = self._columns[field]
        if column not in data.column_names:
            raise ValueError(
                f"{self._source}: row 0: column {column!r} ({field}) missing; the dataset has "
                f"columns {data.column_names}. Set column_map."
            )

    def _bad(self, row: int, field: str, problem: str) -> ValueError:
        return ValueError(f"{self._source}: row {row}: column {self._columns[field]!r}: {problem}")

    def _conversation_pair(self, row: int, chosen: Any, rejected: Any) -> Tuple[list, list]:
        sides = {}
        for field, conv in zip(_SIDES, (chosen, rejected)):
            if not isinstance(conv, list) or not conv:
                raise self._bad(
                    row, field, f"expected a non-empty list of messages, got {conv!r:.80}"
                )
            messages = []
            for j, m in enumerate(conv):
                if not isinstance(m, dict) or m.get("role") not in OPENAI_ROLES:
                    raise self._bad(row, field, f"message {j} is not a message with a known role")
                if not isinstance(m.get("content"), str):
                    raise self._bad(row, field, f"message {j} ({m['role']}) has no string content")
                # Arrow fills keys that other rows have with None; the template should not see them.
                messages.append({k: v for k, v in m.items() if v is not None})
            if messages[-1]["role"] != "assistant":
                raise self._bad(row, field, "the conversation does not end in an assistant message")
            sides[field] = messages
        if sides["chosen"][:-1] != sides["rejected"][:-1]:
            raise self._bad(
                row,
                "rejected",
                f"its prompt (messages before the answer) differs from column "
                f"{self._columns['chosen']!r}'s",
            )
        return sides["chosen"], sides["rejected"]

    def _string_pair(self, row: int, prompt: Any, chosen: Any, rejected: Any) -> Tuple[str, ...]:
        for field, value in zip(_FIELDS, (prompt, chosen, rejected)):
            if not isinstance(value, str):
                raise self._bad(row, field, f"expected a string, got {type(value).__name__}")
        return prompt, chosen, rejected

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> Dict[str, List[int]]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        index = index % len(self)
        if self.conversational:
            sides = [self._tokenize_conversation(index, m) for m in self._rows[index]]
        else:
            prompt, chosen, rejected = self._rows[index]
            text = AlpacaInstructTemplate.format({"instruction": prompt})
            sides = [self._tokenize_text(text, r) for r in (chosen, rejected)]
        sample = {}
        for side, (tokens, labels) in zip(_SIDES, sides):
            sample[f"{side}_tokens"], sample[f"{side}_labels"] = tokens, labels
        return sample

    def _tokenize_conversation(self, index: int, messages: list) -> Tuple[List[int], List[int]]:
        try:
            tokens, mask = self._tokenizer.tokenize_messages(
                messages, rewritten_turns=self._rewritten_turns
            )
        except ValueError as e:
            raise ValueError(f"{self._source}: row {index}: {e}") from e
        if not self.train_on_input:
            mask = _only_last_run_scored(mask)
        if self.max_seq_len is not None:
            tokens, mask = truncate_chat(tokens, mask, self.max_seq_len)
        if self.train_on_input:
            return tokens, list(tokens)
        return tokens, [CROSS_ENTROPY_IGNORE_IDX if m else t for t, m in zip(tokens, mask)]

    def _tokenize_text(self, prompt: str, response: str) -> Tuple[List[int], List[int]]:
        tokens = self._tokenizer.encode(prompt + response, add_bos=True, add_eos=True)
        n_prompt = _common_prefix_len(
            self._tokenizer.encode(prompt, add_bos=True, add_eos=False), tokens
        )
        labels = list(tokens)
        if not self.train_on_input:
            labels[:n_prompt] = [CROSS_ENTROPY_IGNORE_IDX] * n_prompt
        if self.max_seq_len is not None:
            tokens, labels = tokens[: self.max_seq_len], labels[: self.max_seq_len]
        return tokens, labels


def _only_last_run_scored(mask: List[bool]) -> List[bool]:
    """``mask`` (True: not scored) with every scored run but the last one masked."""
    end = len(mask)
    while end > 0 and mask[end - 1]:
        end -= 1
    start = end
    while start > 0 and not mask[start - 1]:
        start -= 1
    return [True] * start + mask[start:]


def preference_dataset(
    tokenizer: Any,
    *,
    source: str,
    data_files: Optional[Union[str, Sequence[str]]] = None,
    split: str = "train",
    column_map: Optional[Dict[str, str]] = None,
    train_on_input: bool = False,
    max_seq_len: Optional[int] = None,
    rewritten_turns: str = "error",
    **load_dataset_kwargs: Any,
) -> PreferenceDataset:
    """Build a preference dataset for DPO / IPO / SimPO (see :class:`PreferenceDataset`).

    Example config::

        dataset:
          _component_: torchtune.datasets.preference_dataset
          source: json
          data_files: pairs.jsonl
          max_seq_len: 1024

    Returns:
        PreferenceDataset: samples ``{chosen,rejected}_{tokens,labels}``; batch them with
        ``torchtune.data.padded_collate_pairs``.
    """
    return PreferenceDataset(
        tokenizer,
        source,
        data_files=data_files,
        split=split,
        column_map=column_map,
        train_on_input=train_on_input,
        max_seq_len=max_seq_len,
        rewritten_turns=rewritten_turns,
        **load_dataset_kwargs,
    )
