# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Render Hugging Face Jinja chat templates the way transformers 5's ``apply_chat_template`` does.

Chat templates come from model repositories, so they are untrusted code: they run in Jinja's
immutable sandbox. The environment matches transformers' (``trim_blocks``, ``lstrip_blocks``,
the ``loopcontrols`` extension, a ``tojson`` that does not HTML-escape and keeps non-ASCII text,
the ``raise_exception`` and ``strftime_now`` globals), and so do the template's inputs:
``messages`` (keys whose value is None dropped, the reasoning field aliased), ``tools``,
``documents`` (always None here), ``add_generation_prompt`` and the named special-token strings.
transformers' ``{% generation %}`` tag is not supported (the masks here come from rendering
prefixes instead); a template that uses it fails to compile with a ValueError.
"""

import json
from datetime import datetime
from typing import Any, Dict, List, Mapping, Optional

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The names a message's reasoning travels under; templates read the first, gpt-oss's "thinking".
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: Optional[int] = None,
    separators=None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes "<", ">", "&" and "'"; templates expect plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _plain(value: Any) -> Any:
    """A copy made of plain JSON types only, so the template can neither mutate the caller's
    messages nor reach the methods of richer objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    # Subclasses (enums, numpy scalars) carry extra methods: keep only the base value.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    return f"<{type(value).__name__}>"


def _template_messages(messages: List[dict]) -> List[dict]:
    out = []
    for message in messages:
        # APIs return content=None / tool_calls=None; templates handle a missing key instead.
        message = {k: _plain(v) for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


class ChatTemplate:
    """A compiled chat template.

    Args:
        source (str): the Jinja template text.
        name (str): where the template came from (a file), used in error messages.

    Raises:
        ValueError: if the template does not compile (the message names ``name``).
    """

    def __init__(self, source: str, name: str):
        if not isinstance(source, str):
            raise ValueError(f"chat template from {name} must be a string, got {source!r:.80}")
        self.source = source
        self.name = name
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template from {name} does not compile: {e}") from e

    def render(
        self,
        messages: List[dict],
        add_generation_prompt: bool = False,
        tools: Optional[List[dict]] = None,
        special_tokens: Optional[Dict[str, str]] = None,
    ) -> str:
        """Render ``messages`` to text.

        Args:
            messages (List[dict]): the conversation (dicts with ``role`` and ``content``).
            add_generation_prompt (bool): append the header that opens an assistant turn.
            tools (Optional[List[dict]]): JSON schemas of the tools, or None.
            special_tokens (Optional[Dict[str, str]]): ``bos_token``, ``eos_token``, ... strings.

        Returns:
            str: the rendered conversation.

        Raises:
            ValueError: if the template raises (``raise_exception``) or fails while rendering;
                the message names the template and carries the template's own message.
        """
        try:
            return self._template.render(
                messages=_template_messages(messages),
                tools=_plain(tools),
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **_plain(dict(special_tokens or {})),
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template from {self.name} failed: {e.message}") from e
