# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Hugging Face tokenizer folders trained on the spot (no downloads), shaped like real models'.

``build_hf_tokenizer_dir(path, kind, template)`` writes ``tokenizer.json``,
``tokenizer_config.json`` and ``generation_config.json`` that
``transformers.AutoTokenizer.from_pretrained(path)`` loads as the reference. ``kind`` picks the
tokenization pipeline, ``template`` the chat template and with it the special tokens, the
bos/eos/pad choice and the stop ids of the model it imitates:

- kinds: ``"byte_bpe"`` (Llama 3 / Qwen: ByteLevel with a split regex) and ``"metaspace"``
  (Gemma / Mistral: SentencePiece-style BPE with byte fallback; with the ``gemma`` template the
  Gemma normalizer form, with the others the Metaspace pre-tokenizer form).
- templates: ``"llama3"`` (Llama 3.1 instruct), ``"chatml"`` (Qwen 2.5 instruct, with tools),
  ``"gemma"`` (Gemma 3), ``"mistral"`` (Mistral 7B instruct v0.1), ``"phi3"`` (Phi-3 / Phi-3.5
  mini instruct: ``<|user|>`` / ``<|assistant|>`` / ``<|end|>`` turns, as recalled, unverified).

``template_storage`` says where the template goes: ``"config"`` (tokenizer_config.json, as
older checkpoints have it), ``"jinja"`` (a chat_template.jinja file, as transformers 5's
save_pretrained writes it) or ``"list"`` (tokenizer_config.json's list-of-{name, template} form,
the template under "default" next to a decoy "tool_use").
"""

import json
from pathlib import Path
from typing import Dict, List, Optional

from tests.test_utils import sample_corpus

KINDS = ("byte_bpe", "metaspace")
TEMPLATES = ("llama3", "chatml", "gemma", "mistral", "phi3")

# The regex Llama 3 (tiktoken cl100k-style) splits text with before byte-level BPE.
# transformers 5's model-specific tokenizer classes rebuild the pipeline from the vocabulary
# instead of reading tokenizer.json's; each natural pair names the real model's class so that the
# reference is what transformers does with a real checkpoint, the crossings load tokenizer.json.
_CLASSES = {
    ("byte_bpe", "llama3"): "PreTrainedTokenizerFast",
    ("byte_bpe", "chatml"): "Qwen2Tokenizer",
    ("metaspace", "gemma"): "GemmaTokenizer",
    ("metaspace", "mistral"): "LlamaTokenizer",
    ("metaspace", "phi3"): "LlamaTokenizer",
}
# Qwen 2's split regex: single digits (Llama 3 groups up to three).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] == 'tool' %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" + message['content'] | trim + "<|eot_id|>" }}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

_QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
CHATML_TEMPLATE = (
    """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- '"""
    + _QWEN_SYSTEM
    + """' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\n"""
    + _QWEN_SYSTEM
    + """<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
)

GEMMA_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") -}}
    {{- message['content'] | trim -}}
    {{- '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)

# Phi-3 mini / Phi-3.5 mini instruct: every turn closes with <|end|>; a finished conversation
# ends with the eos token (<|endoftext|>).
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Qwen 3's structure: turns after the last user query open with a <think> block (empty without
# reasoning); earlier assistant turns render their content alone.
QWEN3_LIKE_TEMPLATE = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and loop.index0 > ns.last_query %}"
    "{%- set r = m.reasoning_content if m.reasoning_content is defined else '' %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + r + '\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Per template: the special tokens (in id order), the named tokens of tokenizer_config.json and
# the stop tokens of generation_config.json, as the imitated model ships them.
_MODELS: Dict[str, dict] = {
    "llama3": dict(
        template=LLAMA3_TEMPLATE,
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>"]
        + ["<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"],
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad=None,
        unk=None,
        stops=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
    ),
    "chatml": dict(
        template=CHATML_TEMPLATE,
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        unk=None,
        stops=["<|im_end|>", "<|endoftext|>"],
    ),
    "gemma": dict(
        template=GEMMA_TEMPLATE,
        specials=["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"],
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        stops=["<eos>", "<end_of_turn>"],
    ),
    "mistral": dict(
        template=MISTRAL_TEMPLATE,
        specials=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        bos="<s>",
        eos="</s>",
        pad=None,
        unk="<unk>",
        stops=["</s>"],
    ),
    "phi3": dict(
        template=PHI3_TEMPLATE,
        specials=["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>"]
        + ["<|user|>", "<|system|>"],
        bos="<s>",
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        unk="<unk>",
        stops=["<|endoftext|>", "<|assistant|>", "<|end|>"],
    ),
}


def _training_corpus(seed: int) -> List[str]:
    lines = sample_corpus(n_lines=300, seed=seed)
    # Chat-shaped text so that newlines, indentation and role words get merges of their own.
    extra = ["user\nhello there\n\nassistant\nsure, the answer is 42.\n"] * 20
    extra += ["\tindented line\n    four spaces\n", "system\nYou are a helpful assistant.\n"] * 10
    return lines + extra


def _train(kind: str, template: str, specials: List[str], seed: int):
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    corpus = _training_corpus(seed)
    if kind == "byte_bpe":
        tok = Tokenizer(models.BPE())
        split = _LLAMA3_SPLIT
        if template == "chatml":  # Qwen 2 / 2.5: its own regex after an NFC normalizer
            split = _QWEN2_SPLIT
            tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=500,
            special_tokens=[AddedToken(s, special=True, normalized=False) for s in specials],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(corpus, trainer)
        return tok
    if kind != "metaspace":
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {KINDS}")
    # SentencePiece-style: the byte pieces <0x00>..<0xFF> are trained in as special tokens (so
    # they sit in the model vocabulary) and turned into plain vocabulary entries afterwards.
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials + (["<unk>"] if "<unk>" not in specials else []) + byte_pieces,
        limit_alphabet=60,
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def _finish_json(kind: str, template: str, tok) -> dict:
    """The trained tokenizer as tokenizer.json, with the imitated model's pipeline."""
    spec = _MODELS[template]
    data = json.loads(tok.to_str())
    data["added_tokens"] = [
        dict(t, special=True, normalized=False)
        for t in data["added_tokens"]
        if t["content"] in spec["specials"]
    ]
    bos = spec["bos"]
    if bos is not None:
        bos_id = data["model"]["vocab"][bos]
        data["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
        }
    elif kind == "byte_bpe":
        data["post_processor"] = {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": False,
            "use_regex": False,
        }
    if kind == "metaspace":
        if template != "mistral":
            data["model"]["unk_token"] = spec["unk"] or "<unk>"
        sp_decoder = [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ]
        if template == "gemma":
            # Gemma: spaces become "▁" in the normalizer, no pre-tokenizer, no prefix space.
            data["normalizer"] = {
                "type": "Replace",
                "pattern": {"String": " "},
                "content": "\u2581",
            }
            data["pre_tokenizer"] = None
            data["decoder"] = {"type": "Sequence", "decoders": sp_decoder}
        else:
            # Mistral / Llama 2 in the newer form: a Metaspace pre-tokenizer that prefixes "▁" to
            # the first piece, and a decoder that strips it again.
            data["normalizer"] = None
            data["pre_tokenizer"] = {
                "type": "Metaspace",
                "replacement": "\u2581",
                "prepend_scheme": "first",
                "split": False,
            }
            strip = {"type": "Strip", "content": " ", "start": 1, "stop": 0}
            data["decoder"] = {"type": "Sequence", "decoders": sp_decoder + [strip]}
    return data


def build_hf_tokenizer_dir(
    path: Path,
    kind: str,
    template: str,
    *,
    seed: int = 0,
    template_storage: str = "config",
    chat_template: Optional[str] = None,
) -> Path:
    """Train a small tokenizer and write a Hugging Face model folder for it.

    Args:
        path (Path): the folder to write (created if missing).
        kind (str): ``"byte_bpe"`` or ``"metaspace"``.
        template (str): ``"llama3"``, ``"chatml"``, ``"gemma"`` or ``"mistral"``; picks the special
            tokens, bos/eos/pad, stop ids and (unless ``chat_template`` is given) the template.
        seed (int): seed of the training corpus.
        template_storage (str): ``"config"``, ``"jinja"`` or ``"list"`` (see the module docstring).
        chat_template (Optional[str]): a template to store instead of the model's own (for tests
            of unusual templates); the special tokens stay those of ``template``.

    Returns:
        Path: ``path``.
    """
    from tokenizers import Tokenizer

    if template not in _MODELS:
        raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")
    spec = _MODELS[template]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    data = _finish_json(kind, template, _train(kind, template, spec["specials"], seed))
    (path / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, indent=1))
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))

    source = chat_template if chat_template is not None else spec["template"]
    config = {
        "tokenizer_class": _CLASSES.get((kind, template), "PreTrainedTokenizerFast"),
        "bos_token": spec["bos"],
        "eos_token": spec["eos"],
        "pad_token": spec["pad"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "added_tokens_decoder": {
            str(tok.token_to_id(s)): {
                "content": s,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for s in spec["specials"]
        },
    }
    # Written even when null: Qwen2Tokenizer's defaults would otherwise fill in <|endoftext|>.
    config["unk_token"] = spec["unk"]
    if template == "phi3":  # Llama 2's tokenizer without the automatic <s>
        config["add_bos_token"] = False
        config["add_eos_token"] = False
    if template in ("gemma", "mistral"):
        config["add_bos_token"] = True
        config["add_eos_token"] = False
        # The AddedToken-dict form older (Llama 2 era) configs write their eos in.
        config["eos_token"] = {"__type": "AddedToken", "content": spec["eos"], "lstrip": False}
        config["eos_token"].update(normalized=False, rstrip=False, single_word=False, special=True)
    if template_storage == "config":
        config["chat_template"] = source
    elif template_storage == "list":
        decoy = "{{ raise_exception('the tool_use template was picked') }}"
        config["chat_template"] = [
            {"name": "tool_use", "template": decoy},
            {"name": "default", "template": source},
        ]
    elif template_storage == "jinja":
        (path / "chat_template.jinja").write_text(source)
    else:
        raise ValueError(f"unknown template_storage {template_storage!r}")
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1))

    stop_ids = [tok.token_to_id(s) for s in spec["stops"]]
    generation = {
        "bos_token_id": tok.token_to_id(spec["bos"] or spec["specials"][0]),
        # A single stop id is written as an int, several as a list (both occur in the wild).
        "eos_token_id": stop_ids[0] if len(stop_ids) == 1 else stop_ids,
    }
    (path / "generation_config.json").write_text(json.dumps(generation, indent=1))
    return path
