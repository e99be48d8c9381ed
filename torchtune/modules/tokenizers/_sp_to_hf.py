# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Hugging Face tokenizer files for a SentencePiece BPE model (Llama 2's ``tokenizer.model``).

A folder with only ``tokenizer.model`` loads in transformers 5 only with ``protobuf``
installed (it converts the model on every load). The files written here make
``AutoTokenizer.from_pretrained(folder)`` work without it and encode exactly as
:class:`SentencePieceTokenizer` does:

- ``tokenizer.json``: the pieces as a byte-fallback BPE vocabulary; the merges derived from
  it (SentencePiece BPE stores none: a piece ``a + b`` merges from its halves, earlier
  pieces first, as SentencePiece prefers the higher-scored piece); a normalizer that starts
  every segment between special tokens with the word-boundary marker (what ``encode(text)``
  does once per text, so ``"<s>" + text`` encodes as ``[bos] + encode(text)``, as a chat
  template needs) and turns spaces into it; ``<s>`` added by the post-processor;
- ``tokenizer_config.json``: ``PreTrainedTokenizerFast`` (which runs tokenizer.json as
  written; transformers 5's ``LlamaTokenizer`` rebuilds its own pipeline, whose pre-tokenizer
  adds no marker before a leading space: ``" "`` would be one token instead of our two),
  bos / eos / unk / pad, ``add_bos_token``, ``model_max_length`` and the chat template;
- ``special_tokens_map.json``.

Only models whose encoding that pipeline reproduces are converted: BPE, identity
normalization, ``add_dummy_prefix`` on and ``remove_extra_whitespaces`` off (Llama 2's
settings). The settings are read from the model file's protobuf fields directly, so neither
``protobuf`` nor transformers is needed.
"""

import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from sentencepiece import SentencePieceProcessor

_MARKER = "\u2581"  # SentencePiece's word-boundary piece, "▁"
_BPE = 2  # TrainerSpec.ModelType
# proto2 defaults of the NormalizerSpec fields read below (an absent field has its default).
_NORMALIZER_DEFAULTS = {"name": "", "add_dummy_prefix": True, "remove_extra_whitespaces": True}


def _varint(buf: bytes, pos: int) -> Tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[Tuple[int, Any]]:
    """(field number, value) of a protobuf message: an int for varints, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire in (1, 5):  # fixed64 / fixed32 (piece scores)
            size = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value


def sentencepiece_settings(path: Path) -> Dict[str, Any]:
    """``model_type`` (1 unigram, 2 BPE, ...) and the normalizer flags of a ``.model`` file.

    Raises:
        ValueError: if the file is not a protobuf message.
    """
    settings: Dict[str, Any] = {"model_type": 1, **_NORMALIZER_DEFAULTS}
    try:
        for number, value in _fields(Path(path).read_bytes()):
            if number == 2:  # ModelProto.trainer_spec
                for n, v in _fields(value):
                    if n == 3:
                        settings["model_type"] = v
            elif number == 3:  # ModelProto.normalizer_spec
                for n, v in _fields(value):
                    if n == 1:
                        settings["name"] = v.decode("utf-8")
                    elif n == 3:
                        settings["add_dummy_prefix"] = bool(v)
                    elif n == 4:
                        settings["remove_extra_whitespaces"] = bool(v)
    except (IndexError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a SentencePiece model file: {e}") from e
    return settings


def unsupported_reason(path: Path) -> Optional[str]:
    """Why :func:`sentencepiece_hf_files` cannot reproduce the model's encoding, or None."""
    s = sentencepiece_settings(path)
    problems = []
    if s["model_type"] != _BPE:
        problems.append(f"model_type {s['model_type']} (only BPE, 2, is converted)")
    if s["name"] not in ("identity", ""):
        problems.append(f"normalization {s['name']!r} (only identity)")
    if not s["add_dummy_prefix"]:
        problems.append("add_dummy_prefix off")
    if s["remove_extra_whitespaces"]:
        problems.append("remove_extra_whitespaces on")
    return "; ".join(problems) or None


def _merges(pieces: List[str], mergeable: List[bool]) -> List[List[str]]:
    # A piece is reachable by merging any split into two pieces; SentencePiece merges the pair
    # whose result has the highest score, i.e. the lowest id, so rank merges by the result's id
    # (then by the left part's id, which only orders merges that make the same piece).
    ids = {p: i for i, p in enumerate(pieces) if mergeable[i]}
    ranked = []
    for i, piece in enumerate(pieces):
        if not mergeable[i] or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in ids and right in ids:
                ranked.append((i, ids[left], left, right))
    ranked.sort()
    return [[left, right] for _, _, left, right in ranked]


def sentencepiece_hf_files(
    path: Path, model_max_length: Optional[int] = None, chat_template: Optional[str] = None
) -> Dict[str, str]:
    """The text of ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``
    for the SentencePiece model at ``path``.

    Args:
        path (Path): a SentencePiece BPE ``.model`` file (see :func:`unsupported_reason`).
        model_max_length (Optional[int]): the model's context length, for the config.
        chat_template (Optional[str]): a Jinja chat template for the config.

    Returns:
        Dict[str, str]: file name -> JSON text.

    Raises:
        ValueError: if the model cannot be converted exactly (the message says why).
    """
    path = Path(path)
    reason = unsupported_reason(path)
    if reason is not None:
        raise ValueError(f"{path} cannot be written as tokenizer.json: {reason}")
    sp = SentencePieceProcessor()
    sp.Load(str(path))
    n = sp.GetPieceSize()
    pieces = [sp.IdToPiece(i) for i in range(n)]
    special = [sp.IsControl(i) or sp.IsUnknown(i) for i in range(n)]
    mergeable = [not (special[i] or sp.IsByte(i) or sp.IsUnused(i)) for i in range(n)]
    unk = pieces[sp.unk_id()]
    named = {"bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "unk_token": sp.unk_id()}
    named = {k: pieces[i] for k, i in named.items() if i >= 0}
    if sp.pad_id() >= 0:
        named["pad_token"] = pieces[sp.pad_id()]
    bos = named.get("bos_token")

    def added(i: int) -> Dict[str, Any]:
        return dict(
            id=i,
            content=pieces[i],
            single_word=False,
            lstrip=False,
            rstrip=False,
            normalized=False,
            special=True,
        )

    post = None
    if bos is not None:
        post = {
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
            "special_tokens": {bos: {"id": bos, "ids": [sp.bos_id()], "tokens": [bos]}},
        }
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added(i) for i in range(n) if special[i]],
        # The marker starts every segment between special tokens (what encode(text) does
        # once per text) and replaces every space; the whole segment is then one BPE word,
        # as SentencePiece sees the whole text.
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": _MARKER},
                {"type": "Replace", "pattern": {"String": " "}, "content": _MARKER},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": post,
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": _MARKER}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": unk,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": {p: i for i, p in enumerate(pieces)},
            "merges": _merges(pieces, mergeable),
        },
    }
    config: Dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "add_bos_token": bos is not None,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {k: v for k, v in added(i).items() if k != "id"} for i in range(n) if special[i]
        },
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    if chat_template is not None:
        config["chat_template"] = chat_template
    return {
        "tokenizer.json": json.dumps(tokenizer, indent=2, ensure_ascii=False) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        "special_tokens_map.json": json.dumps(named, indent=2, ensure_ascii=False) + "\n",
    }
