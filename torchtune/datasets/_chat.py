# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Conversation datasets: rows of chat messages, rendered by the model's own chat template."""

from typing import Any, Dict, List, Optional, Sequence, Union

from torch.utils.data import Dataset

from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padding_id
from torchtune.datasets._packed import PackedDataset
from torchtune.datasets._utils import load_source
from torchtune.modules.tokenizers import truncate_chat

Message = Dict[str, Any]

# The ShareGPT names of the roles; the values are the chat-template (OpenAI) names.
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
OPENAI_ROLES = ("system", "user", "assistant", "tool")
_STYLES = {"openai": ("role", "content"), "sharegpt": ("from", "value")}


class ChatDataset(Dataset):
    """One conversation per row, tokenized lazily by the tokenizer's chat template.

    A sample is ``tokens, mask = tokenizer.tokenize_messages(messages)``, with ``labels`` equal to
    ``tokens`` except where ``mask`` is True (``CROSS_ENTROPY_IGNORE_IDX``). With
    ``train_on_input=False`` the scored tokens are each assistant turn's answer up to and
    including its stop token (the rule of ``HFTokenizer.tokenize_messages``); with True, every
    token is scored.

    Truncation (``max_seq_len``): the sample is cut to ``max_seq_len`` tokens, and an assistant
    turn that the cut splits is masked entirely (``truncate_chat``): a turn that lost its stop
    token would teach the model to run on, so it is not learned at all. Turns before it keep
    their labels.

    Every row's conversation is validated when the dataset is built: a list of at least one
    message, each a mapping with a known role and string content, and at least one assistant
    turn. Errors name the row (counted from 0) and the message.

    Args:
        tokenizer: a tokenizer with a chat template (``torchtune.models.hf_tokenizer``).
        source (str): Hub id, ``datasets`` builder name (``"json"``, ``"parquet"``) with
            ``data_files``, or a local ``.json`` / ``.jsonl`` / ``.parquet`` file.
        data_files: passed to ``datasets.load_dataset``.
        split (str): dataset split. Default "train".
        conversation_column (str): the column holding each row's list of messages.
        conversation_style (str): ``"openai"`` (``role`` / ``content``) or ``"sharegpt"``
            (``from`` / ``value``, with roles ``system``, ``human`` -> user, ``gpt`` -> assistant).
        train_on_input (bool): score every token, prompts included. Default False.
        max_seq_len (Optional[int]): cut samples to this many tokens; None keeps them whole.
        new_system_prompt (Optional[str]): replace every row's system messages by this one.
        rewritten_turns (str): ``"error"`` or ``"as_rendered"``, for templates that render an
            assistant turn differently once later turns follow (Qwen 3); see
            ``HFTokenizer.tokenize_messages``. Default "error".
        **load_dataset_kwargs: passed to ``datasets.load_dataset``.

    Raises:
        ValueError: on an unknown style, a tokenizer without ``tokenize_messages``, a missing
            column, or a malformed row.
    """

    def __init__(
        self,
        tokenizer: Any,
        source: str,
        *,
        data_files: Optional[Union[str, Sequence[str]]] = None,
        split: str = "train",
        conversation_column: str = "messages",
        conversation_style: str = "openai",
        train_on_input: bool = False,
        max_seq_len: Optional[int] = None,
        new_system_prompt: Optional[str] = None,
        rewritten_turns: str = "error",
        **load_dataset_kwargs: Any,
    ):
        if conversation_style not in _STYLES:
            raise ValueError(
                f"conversation_style must be one of {sorted(_STYLES)}, got {conversation_style!r}"
            )
        if max_seq_len is not None and max_seq_len < 1:
            raise ValueError(f"max_seq_len must be a positive int or None, got {max_seq_len}")
        if not callable(getattr(tokenizer, "tokenize_messages", None)):
            raise ValueError(
                f"chat datasets need a tokenizer with a chat template (tokenize_messages), such as "
                f"torchtune.models.hf_tokenizer; got {type(tokenizer).__name__}"
            )
        self._tokenizer = tokenizer
        self._style = conversation_style
        self.train_on_input = train_on_input
        self.max_seq_len = max_seq_len
        self._new_system_prompt = new_system_prompt
        self._rewritten_turns = rewritten_turns
        self._data, self._source = load_source(source, split, data_files, **load_dataset_kwargs)
        if conversation_column not in self._data.column_names:
            raise ValueError(
                f"{self._source}: column {conversation_column!r} missing (row 0 onwards); the "
                f"dataset has columns {self._data.column_names}. Set conversation_column."
            )
        # Whole-column access is one Arrow conversion; the rows are checked once, up front.
        self._conversations = [
            self._to_messages(i, row) for i, row in enumerate(self._data[conversation_column][:])
        ]

    def __len__(self) -> int:
        return len(self._conversations)

    def __getitem__(self, index: int) -> Dict[str, List[int]]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        index = index % len(self)
        try:
            tokens, mask = self._tokenizer.tokenize_messages(
                self._conversations[index], rewritten_turns=self._rewritten_turns
            )
        except ValueError as e:
            raise ValueError(f"{self._source}: row {index}: {e}") from e
        if self.max_seq_len is not None:
            tokens, mask = truncate_chat(tokens, mask, self.max_seq_len)
        if self.train_on_input:
            labels = list(tokens)
        else:
            labels = [CROSS_ENTROPY_IGNORE_IDX if m else t for t, m in zip(tokens, mask)]
        return {"tokens": tokens, "labels": labels}

    def _to_messages(self, row: int, conversation: Any) -> List[Message]:
        """One row's conversation as OpenAI-style messages, or a ValueError naming the row."""

        def bad(problem: str) -> ValueError:
            return ValueError(f"{self._source}: row {row}: {problem}")

        if not isinstance(conversation, list) or not conversation:
            what = "an empty list" if conversation == [] else repr(conversation)[:80]
            raise bad(f"the conversation must be a non-empty list of messages, got {what}")
        role_key, content_key = _STYLES[self._style]
        messages = []
        for j, message in enumerate(conversation):
            if not isinstance(message, dict):
                raise bad(f"message {j} is {type(message).__name__}, not a mapping")
            role, content = message.get(role_key), message.get(content_key)
            if self._style == "sharegpt":
                if role not in SHAREGPT_ROLES:
                    raise bad(
                        f"message {j} has {role_key}={role!r}; ShareGPT roles are "
                        f"{sorted(SHAREGPT_ROLES)}"
                    )
                message = {"role": SHAREGPT_ROLES[role], "content": content}
            elif role not in OPENAI_ROLES:
                raise bad(f"message {j} has role={role!r}; roles are {list(OPENAI_ROLES)}")
            if not isinstance(content, str):
                problem = "no" if content is None else f"non-string ({type(content).__name__})"
                raise bad(f"message {j} ({role}) has {problem} {content_key!r}")
            # Arrow fills keys that other rows have with None; the template should not see them.
            messages.append({k: v for k, v in message.items() if v is not None})
        if self._new_system_prompt is not None:
            messages = [m for m in messages if m["role"] != "system"]
            messages.insert(0, {"role": "system", "content": self._new_system_prompt})
        if not any(m["role"] == "assistant" for m in messages):
            raise bad("the conversation has no assistant message, so nothing to learn")
        return messages


def chat_dataset(
    tokenizer: Any,
    *,
    source: str,
    data_files: Optional[Union[str, Sequence[str]]] = None,
    split: str = "train",
    conversation_column: str = "messages",
    conversation_style: str = "openai",
    train_on_input: bool = False,
    max_seq_len: Optional[int] = None,
    packed: bool = False,
    new_system_prompt: Optional[str] = None,
    rewritten_turns: str = "error",
    **load_dataset_kwargs: Any,
) -> Union[ChatDataset, PackedDataset]:
    """Build a conversation dataset, optionally packed.

    Example config::

        dataset:
          _component_: torchtune.datasets.chat_dataset
          source: json
          data_files: chats.jsonl
          conversation_style: sharegpt
          conversation_column: conversations
          max_seq_len: 2048

    Args: see ``ChatDataset``; ``packed`` packs samples into ``max_seq_len`` rows (see
    ``PackedDataset``), which then needs a ``max_seq_len``.

    Returns:
        Union[ChatDataset, PackedDataset]: the dataset.
    """
    if packed and max_seq_len is None:
        raise ValueError("packed=True needs a max_seq_len")
    ds = ChatDataset(
        tokenizer,
        source,
        data_files=data_files,
        split=split,
        conversation_column=conversation_column,
        conversation_style=conversation_style,
        train_on_input=train_on_input,
        max_seq_len=max_seq_len,
        new_system_prompt=new_system_prompt,
        rewritten_turns=rewritten_turns,
        **load_dataset_kwargs,
    )
    if packed:
        return PackedDataset(ds, max_seq_len=max_seq_len, padding_idx=padding_id(tokenizer))
    return ds
