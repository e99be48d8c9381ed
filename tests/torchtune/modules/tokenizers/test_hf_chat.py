# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""HFTokenizer.tokenize_messages against transformers: tokens equal apply_chat_template's, and the
mask equals the prefix rule computed here independently with the reference tokenizer."""

import json

import pytest

from tests.tokenizer_fixtures import QWEN3_LIKE_TEMPLATE as QWEN3_LIKE
from tests.tokenizer_fixtures import build_hf_tokenizer_dir
from torchtune.models import hf_tokenizer

SYSTEM = {"role": "system", "content": "You answer in one line.\tBe brief."}
U1 = {"role": "user", "content": "What is  12 + 30?\n"}
A1 = {"role": "assistant", "content": "The answer is 42. 🙂"}
U2 = {"role": "user", "content": "And in 東京 ünïcödé?"}
A2 = {"role": "assistant", "content": "  Still 42.\n\nsure.  "}
TOOL = {"role": "tool", "content": '{"result": 42}'}

CONVERSATIONS = {
    "single": [U1, A1],
    "system": [SYSTEM, U1, A1],
    "multi": [U1, A1, U2, A2],
    "system_multi": [SYSTEM, U1, A1, U2, A2],
    "prompt_only": [U1],
    "open_turn": [SYSTEM, U1, A1, U2],
    "tool": [U1, A1, TOOL, A2],
    "bad_order": [U1, U2, A1],
}
# Per template: (kind of pipeline, storage of the template).
SETUPS = [
    ("byte_bpe", "llama3", "config"),
    ("byte_bpe", "chatml", "config"),
    ("byte_bpe", "chatml", "jinja"),
    ("byte_bpe", "chatml", "list"),
    ("byte_bpe", "gemma", "config"),
    ("metaspace", "gemma", "jinja"),
    ("metaspace", "mistral", "config"),
    ("metaspace", "chatml", "config"),
    ("metaspace", "phi3", "config"),
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two numbers <fast> & exact: 東京",
            "parameters": {"type": "object", "properties": {"a": {"type": "number"}}},
        },
    }
]


@pytest.fixture(scope="module", params=SETUPS, ids=lambda s: "-".join(s))
def setup(request, tmp_path_factory):
    from transformers import AutoTokenizer

    kind, template, storage = request.param
    path = build_hf_tokenizer_dir(
        tmp_path_factory.mktemp(template), kind, template, template_storage=storage
    )
    return template, hf_tokenizer(path), AutoTokenizer.from_pretrained(path)


def _reference_stop_ids(hf, path):
    gen = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    return {hf.eos_token_id, *(gen if isinstance(gen, list) else [gen])}


def _reference_mask(hf, path, messages, add_generation_prompt, tools=None):
    """The prefix rule, from transformers' renderings and offsets."""
    full = hf.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    enc = hf(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    stops = _reference_stop_ids(hf, path)
    mask = [True] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = hf.apply_chat_template(
            messages[:i], tools=tools, add_generation_prompt=True, tokenize=False
        )
        assert full.startswith(prompt)
        for j, (_, end) in enumerate(offsets):
            if end <= len(prompt):
                continue
            mask[j] = False
            if ids[j] in stops:
                break
    return ids, mask


def _reference_tokens(hf, messages, add_generation_prompt, tools=None):
    out = hf.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    return out["input_ids"]  # transformers 5 returns a BatchEncoding


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_tokens_and_mask_match_reference(setup, name, add_generation_prompt):
    template, tok, hf = setup
    messages = CONVERSATIONS[name]
    try:
        expected = _reference_tokens(hf, messages, add_generation_prompt)
    except Exception as e:  # the template rejects this conversation: so must we, with its words
        with pytest.raises(ValueError, match=str(e)[:40].replace("(", r"\(")):
            tok.tokenize_messages(messages, add_generation_prompt)
        assert template in ("gemma", "mistral")
        return
    # Phi-3's template ends a finished conversation with its eos: a conversation cut after an
    # assistant turn is no prefix of the whole, so its turns are scored as rendered.
    kw = dict(rewritten_turns="as_rendered") if template == "phi3" else {}
    tokens, mask = tok.tokenize_messages(messages, add_generation_prompt, **kw)
    assert tokens == expected
    assert tok.render(messages, add_generation_prompt) == hf.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    ref_ids, ref_mask = _reference_mask(hf, tok.path, messages, add_generation_prompt)
    assert ref_ids == tokens and mask == ref_mask
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    # One scored run per assistant turn, each ending on a stop token.
    runs = [j for j in range(len(mask)) if not mask[j] and (j + 1 == len(mask) or mask[j + 1])]
    assert len(runs) == n_assistant
    assert all(tokens[j] in tok.stop_token_ids for j in runs)
    if template == "phi3":  # Phi-3's template writes no <s> and its tokenizer adds none
        assert tok.bos_id not in tokens
    elif tok.bos_id is not None:
        assert tokens.count(tok.bos_id) == 1 and tokens[0] == tok.bos_id
    else:
        assert hf.bos_token_id is None


@pytest.mark.parametrize("storage", ["config", "list"])
def test_tools_rendered_as_reference(tmp_path, storage):
    # Only the ChatML (Qwen 2.5) template renders tools.
    from transformers import AutoTokenizer

    path = build_hf_tokenizer_dir(tmp_path, "byte_bpe", "chatml", template_storage=storage)
    tok, hf = hf_tokenizer(path), AutoTokenizer.from_pretrained(path)
    messages = CONVERSATIONS["system_multi"]
    try:
        expected = _reference_tokens(hf, messages, False, tools=TOOLS)
    except Exception as e:  # the list-form fixture's "tool_use" decoy: picked by both
        with pytest.raises(ValueError, match="tool_use template was picked"):
            tok.tokenize_messages(messages, tools=TOOLS)
        assert "tool_use" in str(e)
        return
    tokens, mask = tok.tokenize_messages(messages, tools=TOOLS)
    assert tokens == expected
    assert "東京" in tok.render(messages, tools=TOOLS)
    assert mask == _reference_mask(hf, tok.path, messages, False, tools=TOOLS)[1]


def _scored(tok, tokens, mask):
    return tok.decode([t for t, m in zip(tokens, mask) if not m], skip_special_tokens=False)


def test_mask_by_hand_chatml(tmp_path):
    tok = hf_tokenizer(build_hf_tokenizer_dir(tmp_path, "byte_bpe", "chatml"))
    tokens, mask = tok.tokenize_messages([U1, A1])
    pieces = [tok.decode([t], skip_special_tokens=False) for t in tokens]
    assert _scored(tok, tokens, mask) == A1["content"] + "<|im_end|>"
    # The end-of-turn token is scored, the "\n" after it and the header before are not.
    assert pieces[-2:] == ["<|im_end|>", "\n"] and mask[-2:] == [False, True]
    start = mask.index(False)
    assert all(mask[:start]) and "".join(pieces[:start]).endswith("<|im_start|>assistant\n")
    assert pieces[start - 3 : start] == ["<|im_start|>", "assistant", "\n"]


def test_mask_by_hand_llama3(tmp_path):
    tok = hf_tokenizer(build_hf_tokenizer_dir(tmp_path, "byte_bpe", "llama3"))
    tokens, mask = tok.tokenize_messages([SYSTEM, U1, A1, U2, A2])
    scored = _scored(tok, tokens, mask)
    # The template trims content; both answers end on <|eot_id|>.
    assert scored == "The answer is 42. 🙂<|eot_id|>Still 42.\n\nsure.<|eot_id|>"
    assert mask[0] and mask[-1] is False
    assert [tokens[-1]] == tok.encode("<|eot_id|>", add_bos=False, add_eos=False)


def test_mask_straddling_token_is_scored(tmp_path):
    # The Llama 3 split regex keeps "\n\n" in one piece, so an answer starting with "\n" after
    # ChatML's "assistant\n" header shares a token with the header: that token holds answer
    # text and is scored.
    tok = hf_tokenizer(build_hf_tokenizer_dir(tmp_path, "byte_bpe", "chatml"))
    messages = [U1, {"role": "assistant", "content": "\nhello"}]
    prompt = tok.render(messages[:1], add_generation_prompt=True)
    enc = tok._tok.encode(tok.render(messages), add_special_tokens=False)
    tokens, mask = tok.tokenize_messages(messages)
    first = mask.index(False)
    assert enc.offsets[first][0] < len(prompt) < enc.offsets[first][1]
    assert tok.decode([tokens[first]]) == "\n\n" and all(mask[:first])


def test_errors(tmp_path):
    tok = hf_tokenizer(build_hf_tokenizer_dir(tmp_path / "m", "metaspace", "mistral"))
    with pytest.raises(ValueError, match="must alternate") as info:
        tok.tokenize_messages([SYSTEM, U1, A1])  # Mistral v0.1 has no system turn
    assert "tokenizer_config.json" in str(info.value)
    with pytest.raises(ValueError, match="message 1 has role 'robot'"):
        tok.tokenize_messages([U1, {"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="message 0 .*content must be a string"):
        tok.render([{"role": "user", "content": ["a", "b"]}])
    with pytest.raises(ValueError, match="message 0 must be a dict"):
        tok.tokenize_messages(["hello"])
    with pytest.raises(ValueError, match="non-empty list"):
        tok.tokenize_messages([])
    # The whole conversation renders, but the prompt before turn 0 (no messages) does not.
    llama = hf_tokenizer(build_hf_tokenizer_dir(tmp_path / "l", "byte_bpe", "llama3"))
    llama.render([A1, U1])
    with pytest.raises(ValueError, match="prefixes of assistant turn 0"):
        llama.tokenize_messages([A1, U1])


def _with_template(tmp_path, source):
    return hf_tokenizer(
        build_hf_tokenizer_dir(
            tmp_path, "byte_bpe", "chatml", template_storage="jinja", chat_template=source
        )
    )


def test_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    # Like Qwen 3 dropping past <think> blocks: earlier assistant turns are not rendered.
    source = (
        "{% for m in messages %}{% if loop.last or m.role != 'assistant' %}"
        "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = _with_template(tmp_path, source)
    tok.tokenize_messages([U1, A1])  # a single turn is fine
    with pytest.raises(ValueError, match=r"chat_template.jinja rewrites earlier turns.*turn 1"):
        tok.tokenize_messages([U1, A1, U2, A2])


def test_turn_without_stop_token_is_refused(tmp_path):
    source = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}\n{% endfor %}"
    tok = _with_template(tmp_path, source)
    with pytest.raises(ValueError, match=r"assistant turn 1 .*no stop token.*<\|im_end\|>"):
        tok.tokenize_messages([U1, A1])


def test_no_template(tmp_path):
    path = build_hf_tokenizer_dir(tmp_path, "byte_bpe", "chatml")
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = hf_tokenizer(path)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match=f"{path}.*no chat template"):
        tok.tokenize_messages([U1, A1])
    # The processors' legacy chat_template.json is the last resort.
    (path / "chat_template.json").write_text(
        json.dumps({"chat_template": "{{ messages[0].content }}"})
    )
    assert hf_tokenizer(path).render([U1]) == U1["content"]


def test_template_precedence(tmp_path):
    # chat_template.jinja wins over the config's template (transformers 5), which wins over
    # chat_template.json.
    from transformers import AutoTokenizer

    path = build_hf_tokenizer_dir(tmp_path, "byte_bpe", "chatml")
    (path / "chat_template.json").write_text(json.dumps({"chat_template": "json"}))
    assert hf_tokenizer(path).render([U1]).startswith("<|im_start|>system")
    (path / "chat_template.jinja").write_text("jinja {{ messages[0].content }}")
    tok, hf = hf_tokenizer(path), AutoTokenizer.from_pretrained(path)
    assert (
        tok.render([U1]) == hf.apply_chat_template([U1], tokenize=False) == "jinja " + U1["content"]
    )
    assert tok.chat_template == hf.chat_template


def _scored_texts(tok, tokens, mask):
    runs, run = [], []
    for t, m in zip(tokens, mask):
        if not m:
            run.append(t)
        elif run:
            runs.append(tok.decode(run, skip_special_tokens=False))
            run = []
    return runs + ([tok.decode(run, skip_special_tokens=False)] if run else [])


def test_turn_rendered_differently_later_needs_rewritten_turns(tmp_path):
    from transformers import AutoTokenizer

    tok = _with_template(tmp_path, QWEN3_LIKE)
    ref = AutoTokenizer.from_pretrained(tmp_path)
    tokens, mask = tok.tokenize_messages([U1, A1])  # one turn: it is the last one
    assert _scored_texts(tok, tokens, mask) == [f"<think>\n\n</think>\n\n{A1['content']}<|im_end|>"]
    conversation = [U1, {**A1, "reasoning_content": "think hard"}, U2, A2]
    with pytest.raises(ValueError, match=r"renders assistant turn 1 differently.*as_rendered"):
        tok.tokenize_messages(conversation)
    with pytest.raises(ValueError, match="rewritten_turns must be"):
        tok.tokenize_messages([U1, A1], rewritten_turns="ignore")
    tokens, mask = tok.tokenize_messages(conversation, rewritten_turns="as_rendered")
    assert tokens == ref.apply_chat_template(conversation, tokenize=True)["input_ids"]
    # Turn 1 as the whole rendering shows it (its reasoning dropped), the last one with its block.
    assert _scored_texts(tok, tokens, mask) == [
        f"{A1['content']}<|im_end|>",
        f"<think>\n\n</think>\n\n{A2['content']}<|im_end|>",
    ]
