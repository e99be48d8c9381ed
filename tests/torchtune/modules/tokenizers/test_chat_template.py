# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""ChatTemplate renders exactly as transformers 5's apply_chat_template(tokenize=False) does (its
message normalization, then render_jinja_template), and turns template errors into ValueErrors."""

import copy
from datetime import datetime

import pytest

from tests.tokenizer_fixtures import CHATML_TEMPLATE, GEMMA_TEMPLATE, LLAMA3_TEMPLATE
from torchtune.modules.tokenizers._chat_template import ChatTemplate

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
MESSAGES = [
    {"role": "system", "content": "  Be <brief> & 'exact'.  "},
    {"role": "user", "content": "東京 ünïcödé\ttab 🙂\n\nnew lines"},
    {"role": "assistant", "content": "ok", "tool_calls": None, "reasoning": "think first"},
    {"role": "user", "content": "again"},
]
TOOLS = [{"type": "function", "function": {"name": "f", "description": "<x> & 東京"}}]

CASES = {
    "tojson": "{% for m in messages %}{{ m | tojson }}\n{% endfor %}{{ tools | tojson(indent=2) }}",
    "tojson_options": "{{ messages[0] | tojson(sort_keys=True, separators=(',', ':')) }}"
    "{{ messages[1].content | tojson(ensure_ascii=True) }}",
    "trim_lstrip_blocks": """
    {% for m in messages %}
        {% if m.role == 'user' %}
    U: {{ m.content }}
        {% else %}
    {{ m.role }}: {{ m.content }}
        {% endif %}
    {% endfor %}
""",
    "loopcontrols": "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
    "{{ m.content }}|{% if m.role == 'assistant' %}{% break %}{% endif %}{% endfor %}",
    "special_tokens": "{{ bos_token }}{{ eos_token }}{{ pad_token }}{{ unk_token is defined }}",
    "none_inputs": "{{ tools is none }} {{ documents is none }} {{ add_generation_prompt }}",
    "dropped_none_keys": "{{ messages[2].tool_calls is defined }} {{ messages[2] | length }}",
    "reasoning_alias": "{{ messages[2].reasoning_content }}|{{ messages[2].thinking }}",
    "namespace": "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
    "{% endfor %}{{ ns.n }}",
    "filters": "{{ messages[0].content | trim }}|{{ messages | map(attribute='role') | join(',') }}",
    "llama3": LLAMA3_TEMPLATE,
    "chatml": CHATML_TEMPLATE,
    "gemma": GEMMA_TEMPLATE,
}


def _reference(source, messages, add_generation_prompt=False, tools=None):
    # What apply_chat_template does around the tokenizer: normalize the messages, then render.
    from transformers.utils.chat_template_utils import (
        _normalize_chat_messages,
        render_jinja_template,
    )

    rendered, _ = render_jinja_template(
        conversations=[_normalize_chat_messages(messages)],
        tools=tools,
        chat_template=source,
        add_generation_prompt=add_generation_prompt,
        **SPECIAL,
    )
    return rendered[0]


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("with_tools", [False, True])
def test_render_matches_transformers(name, add_generation_prompt, with_tools):
    source = CASES[name]
    # Gemma 3 folds the system prompt in; its template raises on a second user turn only.
    messages = [m for m in MESSAGES if m["role"] != "system"] if name == "gemma" else MESSAGES
    tools = TOOLS if with_tools else None
    before = copy.deepcopy(messages)
    ours = ChatTemplate(source, "t.jinja").render(messages, add_generation_prompt, tools, SPECIAL)
    assert ours == _reference(source, messages, add_generation_prompt, tools)
    assert messages == before  # the caller's messages are never touched


def test_render_details():
    # Spot checks of what the parity test above relies on.
    render = lambda src: ChatTemplate(src, "t").render(MESSAGES, False, None, SPECIAL)  # noqa: E731
    assert render(CASES["tojson_options"]).startswith('{"content":"  Be <brief> & \'exact\'.  "')
    # role, content, reasoning and its two aliases; tool_calls=None is gone
    assert render(CASES["dropped_none_keys"]) == "False 5"
    assert render(CASES["reasoning_alias"]) == "think first|think first"
    assert render(CASES["none_inputs"]) == "True True False"
    assert render("{{ strftime_now('%Y-%m') }}") == datetime.now().strftime("%Y-%m")


@pytest.mark.parametrize(
    "source, match",
    [
        (
            "{{ raise_exception('Roles must alternate, got ' + messages[0].role) }}",
            "Roles must alternate, got system",
        ),
        ("{{ messages[0].nope.deeper }}", "nope"),
        ("{{ messages.append(1) }}", "append"),  # the sandbox is immutable
        ("{{ ''.__class__.__mro__ }}", "__class__|__mro__"),
        ("{% set ns = namespace() %}{% set ns.x = messages.pop() %}", "pop"),
    ],
)
def test_template_errors_become_value_errors(source, match):
    template = ChatTemplate(source, "my_template.jinja")
    with pytest.raises(ValueError, match="my_template.jinja") as info:
        template.render(MESSAGES, False, None, SPECIAL)
    assert __import__("re").search(match, str(info.value))
    if "raise_exception" in source:  # the same words transformers raises
        from jinja2.exceptions import TemplateError

        with pytest.raises(TemplateError, match="Roles must alternate, got system"):
            _reference(source, MESSAGES)


def test_syntax_error_names_the_source():
    with pytest.raises(ValueError, match="config.json.*does not compile"):
        ChatTemplate("{% for m in messages %}", "config.json")
    with pytest.raises(ValueError, match="must be a string"):
        ChatTemplate(["not", "a", "template"], "config.json")
