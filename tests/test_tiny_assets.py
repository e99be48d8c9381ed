# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The bundled tiny assets: reproducible from scripts/make_tiny_assets.py, correct, loadable."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "torchtune" / "assets" / "tiny"


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "make_tiny_assets", REPO / "scripts" / "make_tiny_assets.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mta = _load_script()


def _rows(name):
    return json.loads((ASSETS / "data" / f"{name}.json").read_text(encoding="utf-8"))


def test_data_and_tokenizer_reproduce_byte_for_byte(tmp_path):
    mta.write_data(tmp_path)
    mta.write_pairs(tmp_path)
    mta.write_tokenizer(tmp_path)
    for rel in ("data/train.json", "data/heldout.json", "data/pairs.json", "tokenizer.model"):
        assert (tmp_path / rel).read_bytes() == (ASSETS / rel).read_bytes(), rel


def test_pairs_prefer_the_right_answer():
    # Chosen is the train row's answer, re-derived from its text; rejected is wrong.
    by_prompt = {
        (f"{r['instruction']}\n{r['input']}" if r["input"] else r["instruction"]): r
        for r in _rows("train")
    }
    pairs = _rows("pairs")
    assert len(pairs) == 400
    for pair in pairs:
        row = by_prompt[pair["prompt"]]
        assert pair["chosen"] == _solve(row) != pair["rejected"]


def _solve(row):
    """Re-derive the answer from the text of the row alone (independent of the generator)."""
    instruction, inp = row["instruction"], row["input"]
    if instruction.startswith("Reverse the order of the words: "):
        return " ".join(reversed(instruction.split(": ", 1)[1].split()))
    if instruction.startswith("Convert "):
        src, dst = re.fullmatch(r"Convert (\w+) to (\w+)\.", instruction).groups()
        n, unit = inp.split()
        assert unit == src
        factor = {
            ("kilometers", "meters"): 1000,
            ("kilograms", "grams"): 1000,
            ("meters", "centimeters"): 100,
            ("liters", "milliliters"): 1000,
        }[(src, dst)]
        return f"{int(n) * factor} {dst}"
    a, b = map(int, re.fullmatch(r"(\d+) and (\d+)", inp).groups())
    if "sum" in instruction or instruction.startswith("Add"):
        return str(a + b)
    if "larger" in instruction:
        return str(max(a, b))
    assert "ubtract" in instruction or "difference" in instruction, instruction
    return str(a - b)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_rows_are_alpaca_and_answers_are_right(split):
    rows = _rows(split)
    assert (
        len(rows)
        == {"train": 5 * mta.N_TRAIN_PER_TASK, "heldout": 5 * mta.N_HELDOUT_PER_TASK}[split]
    )
    for i, row in enumerate(rows):
        assert list(row) == ["instruction", "input", "output"], (split, i)
        assert row["output"] == _solve(row), (split, i, row)


def test_heldout_problems_are_unseen():
    train, heldout = _rows("train"), _rows("heldout")

    def key(row):  # the problem, whichever paraphrase of the instruction was used
        ins = row["instruction"]
        if not row["input"]:
            return ("reverse", ins)
        if ins.startswith("Convert"):
            return ("convert", ins, row["input"])
        if "larger" in ins:
            return ("larger", row["input"])
        if "ubtract" in ins or "difference" in ins:
            return ("subtract", row["input"])
        return ("add", row["input"])

    train_keys = {key(r) for r in train}
    assert not [r for r in heldout if key(r) in train_keys]
    # Nor in the pre-training text: no held-out sum or reversal is ever stated there.
    _, _, heldout_problems = mta.make_splits()
    lines = mta.pretrain_lines(heldout_problems, mta.SEED + 2)
    seen = set()
    for _ in range(20000):
        line = next(lines)
        seen.add(line.split("### Response:\n", 1)[-1])
    for p in heldout_problems:
        if p[0] == "add":
            c = p[1] + p[2]
            assert (
                not {
                    f"{p[1]} plus {p[2]} is {c}.",
                    f"the sum of {p[1]} and {p[2]} is {c}.",
                    f"{p[1]} + {p[2]} = {c}",
                }
                & seen
            ), p
        if p[0] == "reverse":
            words, rev = " ".join(p[1]), " ".join(reversed(p[1]))
            assert not {f"{words} reversed is {rev}.", f"backwards, {words} reads {rev}."} & seen, p


def test_tokenizer_is_llama_style():
    from torchtune.models.llama2 import llama2_tokenizer

    tok = llama2_tokenizer(ASSETS / "tokenizer.model")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (mta.VOCAB_SIZE, 1, 2, 0)
    ids = tok.encode("123 plus 45", add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    # One token per digit, so the model can do arithmetic digit by digit.
    pieces = [tok.decode([i]) for i in ids[1:-1]]
    assert [p for p in pieces if p.strip().isdigit()] == ["1", "2", "3", "4", "5"]
    for row in _rows("heldout"):
        for text in row.values():
            assert tok.decode(tok.encode(text, add_bos=False, add_eos=False)) == text


def test_model_matches_transformers():
    """The shipped checkpoint loads in HF transformers and gives our model's logits."""
    transformers = pytest.importorskip("transformers")
    from torchtune.demo import load_model

    hf = transformers.LlamaForCausalLM.from_pretrained(
        ASSETS / "model", attn_implementation="eager"
    ).eval()
    ours = load_model(ASSETS / "model")
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    tokens = torch.randint(3, mta.VOCAB_SIZE, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # Trained logits reach |10|+; fp32 summation order differs between the two by ~1e-5.
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=5e-5, rtol=1e-5)
    config = json.loads((ASSETS / "model" / "config.json").read_text())
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (
        mta.MODEL["vocab_size"],
        mta.MODEL["embed_dim"],
        mta.MODEL["num_layers"],
    )


def test_pretraining_is_deterministic(tmp_path):
    mta.write_tokenizer(tmp_path)
    a = mta.pretrain(tmp_path / "tokenizer.model", steps=2, log_every=0).state_dict()
    b = mta.pretrain(tmp_path / "tokenizer.model", steps=2, log_every=0).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_model_reproduces_byte_for_byte(tmp_path):
    """Several minutes: the whole pre-training run. Same CPU kind and torch version only."""
    mta.write_tokenizer(tmp_path)
    mta.write_model(tmp_path)
    for rel in ("model/config.json", "model/generation_config.json", "model/model.safetensors"):
        assert (tmp_path / rel).read_bytes() == (ASSETS / rel).read_bytes(), rel
