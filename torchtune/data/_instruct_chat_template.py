# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""A Jinja chat template that renders conversations in an instruct template's prompt format, so
chat front ends (transformers' ``apply_chat_template``, llama.cpp's server, Ollama) prompt a
model the way an instruct dataset trained it.

How a conversation maps to the template's fields: a user message's ``content`` fills the first
required field (Alpaca: ``instruction``); every other field comes from the user message's key
of the same name, e.g. for Alpaca
``{"role": "user", "content": "Add the two numbers.", "input": "2 and 8"}``. A template with one
optional field has two variants, as ``AlpacaInstructTemplate.format`` has: the field's
variant when the key is present and non-empty, the other one otherwise. An assistant message
renders as its content followed by ``eos_token``; the conversation starts with ``bos_token``
(empty for a model without one). So ``[user, assistant]`` renders exactly as
``InstructDataset`` encodes a row, ``bos + prompt + response + eos``. The prompt already ends
where the response begins (Alpaca's ``### Response:\\n``), so ``add_generation_prompt`` adds
nothing. Later turns repeat the prompt format; a system message is refused (the format has
no place for one).
"""

import uuid
from typing import Dict, List, Tuple

from torchtune.data._templates import InstructTemplate


def _literal(text: str) -> str:
    # A Jinja string literal: Jinja unescapes it as Python's unicode-escape does.
    escaped = text.replace("\\", "\\\\").replace("'", "\\'")
    for raw, esc in (("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t")):
        escaped = escaped.replace(raw, esc)
    return f"{{{{- '{escaped}' -}}}}" if text else ""


def _field(name: str, first: str) -> str:
    return "{{- message['content'] -}}" if name == first else f"{{{{- message['{name}'] -}}}}"


def _variant(template: InstructTemplate, fields: List[str], first: str) -> str:
    """The template's prompt as Jinja: the text ``format`` produces, with each field's value
    replaced by the message key it comes from."""
    markers: Dict[str, str] = {f: f"\x00{uuid.uuid4().hex}\x00" for f in fields}
    text = template.format(markers)
    pieces: List[Tuple[int, str]] = []
    for name, marker in markers.items():
        if text.count(marker) != 1:
            raise ValueError(
                f"{type(template).__name__}.format does not place field {name!r} once in its "
                "prompt; no chat template can be written for it"
            )
        pieces.append((text.index(marker), name))
    out, pos = [], 0
    for start, name in sorted(pieces):
        out.append(_literal(text[pos:start]))
        out.append(_field(name, first))
        pos = start + len(markers[name])
    out.append(_literal(text[pos:]))
    return "".join(out)


def instruct_chat_template(template: InstructTemplate) -> str:
    """The Jinja chat template of ``template``'s prompt format (see the module docstring).

    Args:
        template (InstructTemplate): the dataset's template (class or instance).

    Returns:
        str: the Jinja source, for ``tokenizer_config.json``'s ``chat_template``.

    Raises:
        ValueError: if the template has no required field, more than one optional field, or a
            ``format`` that does not place each field's value once.
    """
    required, optional = list(template.required_fields), list(template.optional_fields)
    if not required or len(optional) > 1:
        raise ValueError(
            f"{getattr(template, '__name__', type(template).__name__)} has required fields "
            f"{required} and optional fields {optional}; a chat template is written for one "
            "or more required fields and at most one optional field"
        )
    first = required[0]
    user = _variant(template, required, first)
    if optional:
        name = optional[0]
        with_optional = _variant(template, required + optional, first)
        user = (
            f"{{%- if message['{name}'] is defined and message['{name}'] -%}}{with_optional}"
            f"{{%- else -%}}{user}{{%- endif -%}}"
        )
    missing = "".join(
        f"{{%- if message['{f}'] is not defined -%}}{{{{- raise_exception("
        f"'The user message needs the key {f}: the prompt format has that field') -}}}}"
        "{%- endif -%}"
        for f in required[1:]
    )
    return (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}" + missing + user + ""
        "{%- elif message['role'] == 'assistant' -%}"
        "{{- message['content'] -}}{{- eos_token -}}"
        "{%- else -%}"
        "{{- raise_exception('This model was trained with an instruct prompt that has only "
        "user and assistant turns, got a ' + message['role'] + ' message') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )
