# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""HFTokenizer's encode / decode / special ids / file handling against transformers' AutoTokenizer
on the same (locally trained) folder."""

import json

import pytest
import torch

from tests.tokenizer_fixtures import build_hf_tokenizer_dir
from torchtune.models import hf_tokenizer
from torchtune.modules.tokenizers import HFTokenizer

# (kind, template) pairs: every template on the pipeline its model uses, plus crossings.
COMBOS = [
    ("byte_bpe", "llama3"),
    ("byte_bpe", "chatml"),
    ("byte_bpe", "gemma"),
    ("metaspace", "gemma"),
    ("metaspace", "mistral"),
    ("metaspace", "chatml"),
]
SPECIALS = {
    "llama3": "<|begin_of_text|>",
    "chatml": "<|im_end|>",
    "gemma": "<start_of_turn>",
    "mistral": "[INST]",
}

TEXTS = [
    "",
    " ",
    "\n",
    "hello world",
    "  leading spaces",
    "trailing spaces   ",
    "a  b   c    d",
    "line one\nline two\n\nline four\n",
    "tabs\tand\t\ttabs",
    "café naïve 東京 ünïcödé",
    "emoji 🙂🚀 and 中文字符",
    "Hello World. What is the SUM of 12 and 30?",
    "don't , isn't . it 's ok ?",
]


def _texts(template):
    tok = SPECIALS[template]
    return TEXTS + [f"{tok}", f"before {tok} after", f"x{tok}{tok}y\n", f"{tok} lead"]


@pytest.fixture(scope="module", params=COMBOS, ids=lambda c: f"{c[0]}-{c[1]}")
def pair(request, tmp_path_factory):
    from transformers import AutoTokenizer

    kind, template = request.param
    path = build_hf_tokenizer_dir(tmp_path_factory.mktemp(f"{kind}_{template}"), kind, template)
    return template, hf_tokenizer(path), AutoTokenizer.from_pretrained(path)


def test_special_ids_match_reference(pair):
    from transformers import GenerationConfig

    template, tok, hf = pair
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (
        hf.bos_token_id,
        hf.eos_token_id,
        hf.pad_token_id,
    )
    assert tok.vocab_size == len(hf)
    assert tok.special_tokens == hf.special_tokens_map
    gen_eos = GenerationConfig.from_pretrained(tok.path).eos_token_id
    gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
    assert tok.stop_token_ids == list(dict.fromkeys([hf.eos_token_id] + gen_eos))
    expected_stops = {
        "llama3": ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"],
        "chatml": ["<|im_end|>", "<|endoftext|>"],
        "gemma": ["<eos>", "<end_of_turn>"],
        "mistral": ["</s>"],
    }[template]
    assert tok.stop_token_ids == hf.convert_tokens_to_ids(expected_stops)
    # Qwen has no BOS, Llama 3 no pad: None, not a stand-in id.
    assert (tok.bos_id is None) == (template == "chatml")
    assert (tok.pad_id is None) == (template in ("llama3", "mistral"))


def test_encode_matches_reference(pair):
    template, tok, hf = pair
    for text in _texts(template):
        body = hf.encode(text, add_special_tokens=False)
        assert tok.encode(text, add_bos=False, add_eos=False) == body, repr(text)
        bos = (
            [hf.bos_token_id]
            if hf.bos_token_id is not None and body[:1] != [hf.bos_token_id]
            else []
        )
        eos = [hf.eos_token_id] if body[-1:] != [hf.eos_token_id] else []
        assert tok.encode(text) == bos + body + eos, repr(text)
        # The reference's own post-processor adds the BOS alone (none for Qwen), even before a
        # BOS already in the text, where ours keeps one.
        ref = hf.encode(text)
        if bos == [] and ref[:2] == [hf.bos_token_id] * 2:
            ref = ref[1:]
        assert tok.encode(text, add_eos=False) == ref, repr(text)


def test_special_strings_in_text_become_special_ids(pair):
    template, tok, hf = pair
    special = SPECIALS[template]
    ids = tok.encode(f"a {special} b", add_bos=False, add_eos=False)
    assert hf.convert_tokens_to_ids(special) in ids


def test_never_a_double_bos(pair):
    template, tok, hf = pair
    if tok.bos_id is None:
        assert tok.encode("hi", add_bos=True, add_eos=False) == tok.encode("hi", False, False)
        return
    bos = hf.bos_token
    ids = tok.encode(f"{bos}hello", add_bos=True, add_eos=False)
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_reference(pair, skip):
    template, tok, hf = pair
    for text in _texts(template):
        ids = hf.encode(text) + [hf.eos_token_id]
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(
            ids, skip_special_tokens=skip
        ), repr(text)
        assert tok.decode(torch.tensor(ids), skip_special_tokens=skip) == tok.decode(ids, skip)


def test_decode_rejects_ids_outside_vocab(pair):
    _, tok, _ = pair
    with pytest.raises(ValueError, match="-100"):
        tok.decode([3, -100])
    with pytest.raises(ValueError, match=str(tok.vocab_size)):
        tok.decode([tok.vocab_size])


@pytest.mark.parametrize("force", [False, True])
def test_clean_up_tokenization_spaces_as_reference(tmp_path, force):
    # transformers skips the cleanup for BPE models unless forced; both branches must agree.
    from transformers import AutoTokenizer

    path = build_hf_tokenizer_dir(tmp_path, "byte_bpe", "chatml")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["clean_up_tokenization_spaces"] = True
    if force:
        config["clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"] = True
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tok, hf = hf_tokenizer(path), AutoTokenizer.from_pretrained(path)
    text = "don't , isn't . it 's ok ? we 're here ' now"
    ids = hf.encode(text)
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert (tok.decode(ids) != text) == force


def test_token_missing_from_tokenizer_json_is_added_as_reference(tmp_path):
    # A config may name a special token tokenizer.json lacks; transformers gives it a new id.
    from transformers import AutoTokenizer

    path = build_hf_tokenizer_dir(tmp_path, "byte_bpe", "llama3")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["pad_token"] = "<|finetune_right_pad_id|>"
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tok, hf = hf_tokenizer(path), AutoTokenizer.from_pretrained(path)
    assert tok.pad_id == hf.pad_token_id == tok.vocab_size - 1 and tok.vocab_size == len(hf)
    text = "x <|finetune_right_pad_id|> y"
    assert tok.encode(text, False, False) == hf.encode(text, add_special_tokens=False)


def test_max_seq_len_and_path(tmp_path):
    path = build_hf_tokenizer_dir(tmp_path, "byte_bpe", "chatml")
    tok = hf_tokenizer(path, max_seq_len=7)
    assert tok.max_seq_len == 7 and tok.path == path
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello world"}]
    tokens, mask = tok.tokenize_messages(messages)
    full_tokens, _ = hf_tokenizer(path).tokenize_messages(messages)
    assert len(tokens) == len(mask) == 7 and tokens == full_tokens[:7]
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="max_seq_len"):
            hf_tokenizer(path, max_seq_len=bad)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        hf_tokenizer(tmp_path / "nowhere")
    path = build_hf_tokenizer_dir(tmp_path / "m", "byte_bpe", "chatml")
    config_text = (path / "tokenizer_config.json").read_text()

    (path / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        hf_tokenizer(path)
    (path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        hf_tokenizer(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": 5}))
    with pytest.raises(ValueError, match="eos_token"):
        hf_tokenizer(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"x": 1}]}))
    with pytest.raises(ValueError, match="name, template"):
        hf_tokenizer(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% if %}"}))
    with pytest.raises(ValueError, match="tokenizer_config.json.*compile"):
        hf_tokenizer(path)
    (path / "tokenizer_config.json").write_text(config_text)

    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    with pytest.raises(ValueError, match="generation_config.json.*eos_token_id"):
        hf_tokenizer(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 10**6]}))
    with pytest.raises(ValueError, match="generation_config.json"):
        hf_tokenizer(path)
    (path / "generation_config.json").unlink()  # optional: eos alone then
    assert hf_tokenizer(path).stop_token_ids == [hf_tokenizer(path).eos_id]

    (path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json"):
        hf_tokenizer(path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        hf_tokenizer(path)


def test_encode_rejects_non_strings(pair):
    _, tok, _ = pair
    with pytest.raises(TypeError, match="str"):
        tok.encode(None)


@pytest.mark.parametrize("kind, template", [("byte_bpe", "chatml"), ("metaspace", "gemma")])
def test_class_defaults_fill_absent_tokens_as_reference(tmp_path, kind, template):
    # Qwen2Tokenizer / GemmaTokenizer default the named tokens a config leaves out.
    from transformers import AutoTokenizer

    path = build_hf_tokenizer_dir(tmp_path, kind, template)
    config = json.loads((path / "tokenizer_config.json").read_text())
    for key in ("unk_token", "pad_token", "eos_token"):
        config.pop(key)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tok, hf = hf_tokenizer(path), AutoTokenizer.from_pretrained(path)
    assert tok.special_tokens == hf.special_tokens_map
    assert (tok.eos_id, tok.pad_id) == (hf.eos_token_id, hf.pad_token_id)
    assert tok.pad_id is not None and tok.vocab_size == len(hf)
