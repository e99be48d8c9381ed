# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""A Hugging Face model folder's tokenizer (``tokenizer.json`` + configs) with its chat template."""

import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

from tokenizers import AddedToken, Tokenizer

from torchtune.modules.tokenizers._chat_template import ChatTemplate
from torchtune.modules.tokenizers._utils import truncate_chat

# The named special tokens transformers hands to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
_NAMED_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Named tokens that transformers 5's model-specific classes default to when tokenizer_config.json
# leaves the key out (their __init__ defaults); a key given as null stays null.
_CLASS_DEFAULTS = {
    "GemmaTokenizer": dict(
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        mask_token="<mask>",
    ),
    "LlamaTokenizer": dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>"),
    "Qwen2Tokenizer": dict(
        unk_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    ),
}
_ROLES = ("system", "user", "assistant", "tool")
# transformers' clean_up_tokenization: the spaces a WordPiece tokenizer leaves before punctuation.
_CLEANUP = tuple(
    (before, before.replace(" ", "")) for before in (" .", " ?", " !", " ,", " ' ")
) + tuple((" " + s, s) for s in ("n't", "'m", "'s", "'ve", "'re"))


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); expected {what}") from e


def _token_content(value: Any, key: str, path: Path) -> Optional[str]:
    """A special token given as a string, an AddedToken dict ({"content": ...}) or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{path}: {key} must be a string, a dict with a 'content' string or null")


def _added_token(value: Any, special: bool) -> AddedToken:
    if isinstance(value, str):
        return AddedToken(value, special=special, normalized=not special)
    flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
    kwargs = {k: value[k] for k in flags if k in value}
    kwargs.setdefault("special", special)
    return AddedToken(value["content"], **kwargs)


class HFTokenizer:
    """Encode, decode and chat-template text with a Hugging Face model folder's tokenizer.

    Reads ``tokenizer.json`` (with the ``tokenizers`` library), ``tokenizer_config.json`` (the
    named special tokens, ``clean_up_tokenization_spaces``, ``chat_template``) and, where
    present, ``chat_template.jinja`` / ``additional_chat_templates/*.jinja`` (which take priority
    over the config's template, as in transformers 5), ``chat_template.json`` (the processors'
    legacy file; transformers' tokenizer ignores it, so it is used only when nothing else gives a
    template) and ``generation_config.json`` (stop tokens). A template stored as a list of
    ``{name, template}`` uses ``"default"``, or ``"tool_use"`` when tools are passed and it
    exists, as transformers does.

    Args:
        path (Union[str, Path]): the model folder.
        max_seq_len (Optional[int]): if set, ``tokenize_messages`` truncates to it with
            :func:`truncate_chat`.

    Attributes:
        bos_id (Optional[int]): id of ``bos_token``; None where the model has none (Qwen).
        eos_id (Optional[int]): id of the config's ``eos_token``.
        pad_id (Optional[int]): id of ``pad_token``; None where the model has none (Llama 3).
        stop_token_ids (List[int]): ``eos_id`` and every ``eos_token_id`` of
            generation_config.json, deduplicated, in that order.
        vocab_size (int): vocabulary size including added tokens.
        chat_template (Optional[str]): the default chat template's text.
        special_tokens (Dict[str, str]): the named tokens (``bos_token``, ``eos_token``, ...)
            the template is rendered with, as transformers' ``special_tokens_map``.
        max_seq_len (Optional[int]), path (Path).

    Raises:
        FileNotFoundError: if the folder, ``tokenizer.json`` or ``tokenizer_config.json`` is missing.
        ValueError: if a file is malformed (the message names it and what was expected).
    """

    def __init__(self, path: Union[str, Path], max_seq_len: Optional[int] = None):
        path = Path(path)
        if max_seq_len is not None and (
            isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1
        ):
            raise ValueError(f"max_seq_len must be None or a positive int, got {max_seq_len!r}")
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {path}")
        self.path, self.max_seq_len = path, max_seq_len
        tok_file, config_file = path / "tokenizer.json", path / "tokenizer_config.json"
        for f in (tok_file, config_file):
            if not f.is_file():
                raise FileNotFoundError(
                    f"{f} not found; expected a Hugging Face model folder with tokenizer.json "
                    "(the tokenizers library's file) and tokenizer_config.json"
                )
        try:
            self._tok = Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises a bare Exception on a bad file
            raise ValueError(f"{tok_file} is not a tokenizers tokenizer.json: {e}") from e
        config = _read_json(config_file, "a JSON object of tokenizer settings")
        if not isinstance(config, dict):
            raise ValueError(f"{config_file} must hold a JSON object, got {type(config).__name__}")

        tokenizer_class = str(config.get("tokenizer_class", "")).removesuffix("Fast")
        config = {**_CLASS_DEFAULTS.get(tokenizer_class, {}), **config}
        self._add_missing_tokens(config, config_file)
        self.special_tokens: Dict[str, str] = {}
        for key in _NAMED_TOKENS:
            content = _token_content(config.get(key), key, config_file)
            if content is not None:
                self.special_tokens[key] = content
        ids = {k: self._tok.token_to_id(v) for k, v in self.special_tokens.items()}
        self.bos_id: Optional[int] = ids.get("bos_token")
        self.eos_id: Optional[int] = ids.get("eos_token")
        self.pad_id: Optional[int] = ids.get("pad_token")
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.stop_token_ids: List[int] = self._read_stop_ids(path / "generation_config.json")
        # transformers skips the cleanup for BPE models unless told it may corrupt the output.
        self._clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(self._tok.model).__name__ != "BPE"
            or bool(
                config.get(
                    "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"
                )
            )
        )
        self._templates = self._read_templates(config, config_file)
        default = self._templates.get("default")
        self.chat_template: Optional[str] = default.source if default is not None else None

    def _add_missing_tokens(self, config: dict, config_file: Path) -> None:
        # As transformers does: tokens the config declares but tokenizer.json lacks get new ids.
        declared = []
        decoder = config.get("added_tokens_decoder", {})
        if not isinstance(decoder, dict):
            raise ValueError(f"{config_file}: added_tokens_decoder must be an object id -> token")
        for _, value in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            _token_content(value, "added_tokens_decoder", config_file)
            special = isinstance(value, dict) and bool(value.get("special", False))
            declared.append(_added_token(value, special=special))
        for key in _NAMED_TOKENS:
            value = config.get(key)
            if _token_content(value, key, config_file) is not None:
                declared.append(_added_token(value, special=True))
        for token in declared:
            if self._tok.token_to_id(token.content) is None:
                self._tok.add_tokens([token])

    def _read_stop_ids(self, gen_file: Path) -> List[int]:
        stops = [self.eos_id] if self.eos_id is not None else []
        if gen_file.is_file():
            gen = _read_json(gen_file, "a JSON object with an optional eos_token_id")
            eos = gen.get("eos_token_id") if isinstance(gen, dict) else None
            eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
            for i in eos:
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size:
                    raise ValueError(
                        f"{gen_file}: eos_token_id must be an id or a list of ids in "
                        f"[0, {self.vocab_size}), got {gen['eos_token_id']!r}"
                    )
                stops.append(i)
        return list(dict.fromkeys(stops))

    def _read_templates(self, config: dict, config_file: Path) -> Dict[str, ChatTemplate]:
        jinja_file, extra_dir = (
            self.path / "chat_template.jinja",
            self.path / "additional_chat_templates",
        )
        files = {"default": jinja_file} if jinja_file.is_file() else {}
        if extra_dir.is_dir():
            files.update({f.name.removesuffix(".jinja"): f for f in extra_dir.glob("*.jinja")})
        if files:
            return {
                name: ChatTemplate(f.read_text(encoding="utf-8"), str(f))
                for name, f in files.items()
            }
        source = config.get("chat_template")
        if isinstance(source, str):
            return {"default": ChatTemplate(source, str(config_file))}
        if isinstance(source, list):
            templates = {}
            for entry in source:
                if not (isinstance(entry, dict) and {"name", "template"} <= set(entry)):
                    raise ValueError(
                        f"{config_file}: a chat_template list holds {{name, template}} "
                        f"objects, got {entry!r:.80}"
                    )
                name = f"{config_file} (chat_template {entry['name']!r})"
                templates[entry["name"]] = ChatTemplate(entry["template"], name)
            return templates
        if source is not None:
            raise ValueError(f"{config_file}: chat_template must be a string or a list")
        json_file = self.path / "chat_template.json"
        if json_file.is_file():
            data = _read_json(json_file, 'an object {"chat_template": "<jinja text>"}')
            if not isinstance(data, dict) or not isinstance(data.get("chat_template"), str):
                raise ValueError(f'{json_file} must hold {{"chat_template": "<jinja text>"}}')
            return {"default": ChatTemplate(data["chat_template"], str(json_file))}
        return {}

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        """Encode ``text``; special-token strings inside it become their ids (as transformers).

        ``add_bos`` is a no-op for a model without a BOS token (Qwen), and no BOS (EOS) is added
        when the text already starts (ends) with it, so there is never a double BOS.

        Args:
            text (str): the text; may be empty.
            add_bos (bool): prepend ``bos_id`` where the model has one. Default True.
            add_eos (bool): append ``eos_id`` where the model has one. Default True.

        Returns:
            List[int]: the token ids.

        Raises:
            TypeError: if ``text`` is not a string.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}: {text!r:.80}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        if add_eos and self.eos_id is not None and ids[-1:] != [self.eos_id]:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Decode token ids (a list or a 1-D tensor) to text, as transformers' ``decode``.

        Args:
            ids (Iterable[int]): token ids, each in the vocabulary.
            skip_special_tokens (bool): drop special tokens. Default True.

        Returns:
            str: the text.

        Raises:
            ValueError: naming the ids outside the vocabulary (e.g. the -100 ignore index).
        """
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size or self._tok.id_to_token(i) is None]
        if bad:
            raise ValueError(
                f"token ids {bad[:5]} are outside the vocabulary of {self.path} "
                f"(size {self.vocab_size})"
            )
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        if self._clean_up:
            for before, after in _CLEANUP:
                text = text.replace(before, after)
        return text

    def _template(self, tools: Optional[List[dict]]) -> ChatTemplate:
        if tools is not None and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" not in self._templates:
            raise ValueError(
                f"{self.path} has no chat template (none in tokenizer_config.json, "
                "chat_template.jinja or chat_template.json)"
            )
        return self._templates["default"]

    def render(
        self,
        messages: List[Dict[str, Any]],
        add_generation_prompt: bool = False,
        tools: Optional[List[dict]] = None,
    ) -> str:
        """Render ``messages`` with the chat template (the text transformers'
        ``apply_chat_template(tokenize=False)`` gives).

        Raises:
            ValueError: for a malformed message (naming its index), a missing template, or a
                template error (carrying the template's message).
        """
        _check_messages(messages)
        return self._template(tools).render(
            messages, add_generation_prompt, tools, self.special_tokens
        )

    def tokenize_messages(
        self,
        messages: List[Dict[str, Any]],
        add_generation_prompt: bool = False,
        tools: Optional[List[dict]] = None,
    ) -> Tuple[List[int], List[bool]]:
        """Tokenize a conversation and mark which tokens are not trained on.

        The tokens are the rendered template's, tokenized without adding special tokens (as
        transformers 5's ``apply_chat_template(tokenize=True)``), so the template's own BOS is the
        only one. For each assistant message ``i``, the scored tokens are those the template adds
        after ``render(messages[:i], add_generation_prompt=True)``, up to and including the first
        stop token; every other token is masked (system, user and tool turns, headers, whatever
        follows the stop token). The prompt's character length is mapped to a token index with
        the tokenizer's offsets: a token straddling that boundary holds answer text and is scored.

        Args:
            messages (List[Dict[str, Any]]): dicts with ``role`` (system/user/assistant/tool) and
                a string ``content``.
            add_generation_prompt (bool): end with the header that opens an assistant turn.
            tools (Optional[List[dict]]): JSON schemas of tools the template may render.

        Returns:
            Tuple[List[int], List[bool]]: tokens and mask (True = not trained on), each of length
            ``n`` (at most ``max_seq_len`` when set; see :func:`truncate_chat`).

        Raises:
            ValueError: for a malformed message, a missing template or a template error; if the
                template rewrites earlier turns (a prefix rendering is not a prefix of the whole
                rendering: naming the template and the turn); if an assistant turn holds no stop
                token (naming the turn and the stop tokens).
        """
        _check_messages(messages)
        template = self._template(tools)
        full = template.render(messages, add_generation_prompt, tools, self.special_tokens)
        encoding = self._tok.encode(full, add_special_tokens=False)
        tokens, offsets = encoding.ids, encoding.offsets
        mask = [True] * len(tokens)
        stops = set(self.stop_token_ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            try:
                prompt = template.render(messages[:i], True, tools, self.special_tokens)
                turn = template.render(messages[: i + 1], False, tools, self.special_tokens)
            except ValueError as e:
                # E.g. a conversation that opens with an assistant turn: its prompt is empty.
                raise ValueError(
                    f"rendering the prefixes of assistant turn {i} (to mask it) failed: {e}"
                ) from e
            for text, which in (
                (prompt, f"messages[:{i}] + generation prompt"),
                (turn, f"messages[:{i + 1}]"),
            ):
                if not full.startswith(text):
                    raise ValueError(
                        f"chat template from {template.name} rewrites earlier turns: the "
                        f"rendering of {which} is not a prefix of the whole conversation's, so "
                        f"assistant turn {i} cannot be masked by prefixes"
                    )
            start = next(
                (j for j, (_, end) in enumerate(offsets) if end > len(prompt)), len(tokens)
            )
            stop = next(
                (
                    j
                    for j in range(start, len(tokens))
                    if offsets[j][0] < len(turn) and tokens[j] in stops
                ),
                None,
            )
            if stop is None:
                names = [self._tok.id_to_token(s) for s in self.stop_token_ids]
                raise ValueError(
                    f"assistant turn {i} of the conversation holds no stop token (stop ids "
                    f"{self.stop_token_ids} = {names}); the model would never learn to stop"
                )
            mask[start : stop + 1] = [False] * (stop + 1 - start)
        if self.max_seq_len is not None:
            tokens, mask = truncate_chat(tokens, mask, self.max_seq_len)
        return tokens, mask


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of dicts, got {messages!r:.80}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} must be a dict, got {type(message).__name__}")
        if message.get("role") not in _ROLES:
            raise ValueError(
                f"message {i} has role {message.get('role')!r}; expected one of {_ROLES}"
            )
        if not isinstance(message.get("content"), str):
            raise ValueError(
                f"message {i} ({message['role']}) content must be a string, "
                f"got {type(message.get('content')).__name__}"
            )
