# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Rebuild the assets shipped in ``torchtune/assets/tiny/`` from nothing.

    python scripts/make_tiny_assets.py                  # everything, into torchtune/assets/tiny
    python scripts/make_tiny_assets.py --out-dir /tmp/t --only data tokenizer

What is made (all deterministic; the model is byte-for-byte reproducible on the same CPU kind
and torch version, since float rounding depends on both):

* ``data/train.json``, ``data/heldout.json``: Alpaca-format rows (``instruction``, ``input``,
  ``output``) for five small tasks: add, subtract, pick the larger number, convert units, and
  reverse a list of words. Held-out problems never appear in the train split nor in the
  pre-training text, so held-out accuracy measures generalisation, not recall.
* ``tokenizer.model``: a Llama-style SentencePiece BPE (unk=0, bos=1, eos=2, no pad, digits
  split so arithmetic sees one token per digit).
* ``model/config.json`` + ``model/model.safetensors``: a tiny Llama2 in Hugging Face format,
  pre-trained for a few minutes on the same kinds of problems written as questions and answers
  in five plain layouts ("Q: Add the two numbers.\\n23 and 45\\nA: 68", ...), never in Alpaca's,
  never followed by an end-of-sequence token, and never on a held-out problem. It can do the
  tasks in its own layouts but not yet follow the Alpaca prompt nor stop after answering:
  that is what the LoRA fine-tune of the quickstart teaches it.
"""

import argparse
import io
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "torchtune" / "assets" / "tiny"

SEED = 1234
N_TRAIN_PER_TASK = 1000
N_HELDOUT_PER_TASK = 40
VOCAB_SIZE = 640

# The tiny model. head_dim 32; the MLP width is the Llama2 rule (2/3 * 4 * dim, rounded up).
MODEL = dict(
    vocab_size=VOCAB_SIZE,
    num_layers=4,
    num_heads=4,
    num_kv_heads=4,
    embed_dim=128,
    intermediate_dim=352,
    max_seq_len=256,
    norm_eps=1e-5,
    rope_base=10000.0,
)
PRETRAIN = dict(steps=6000, batch_size=16, seq_len=64, lr=3e-3, warmup=100, weight_decay=0.01)
PRETRAIN_THREADS = 2

WORDS = (
    "red blue green cat dog sun moon tree fish bird book milk rain snow star road ship king gold "
    "wind"
).split()
UNITS = [
    ("kilometers", "meters", 1000),
    ("kilograms", "grams", 1000),
    ("meters", "centimeters", 100),
    ("liters", "milliliters", 1000),
]
TASKS = ("add", "subtract", "larger", "convert", "reverse")

# The standard Alpaca prompts. Only used to give the tokenizer the words it will see in
# training; the datasets in torchtune.data own the template actually used.
_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

Problem = Tuple  # (task, *operands): hashable, identifies a problem across phrasings


# --------------------------------------------------------------------------- problems
def _sample_problem(task: str, rng: random.Random) -> Problem:
    if task in ("add", "larger"):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if task == "larger" and a == b:
            b = (b + 1 + rng.randint(0, 98)) % 100
        return (task, a, b)
    if task == "subtract":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return (task, max(a, b), min(a, b))
    if task == "convert":
        return (task, rng.randrange(len(UNITS)), rng.randint(1, 99))
    if task == "reverse":
        return (task, tuple(rng.choice(WORDS) for _ in range(rng.randint(3, 5))))
    raise ValueError(f"Unknown task '{task}'")


def _answer(p: Problem) -> str:
    task = p[0]
    if task == "add":
        return str(p[1] + p[2])
    if task == "subtract":
        return str(p[1] - p[2])
    if task == "larger":
        return str(max(p[1], p[2]))
    if task == "convert":
        src, dst, factor = UNITS[p[1]]
        return f"{p[2] * factor} {dst}"
    return " ".join(reversed(p[1]))


_INSTRUCTIONS = {
    "add": ["Add the two numbers.", "What is the sum of the two numbers?"],
    "subtract": ["Subtract the second number from the first.", "What is the difference?"],
    "larger": ["Which number is larger?", "Give the larger of the two numbers."],
}


def to_alpaca(p: Problem, rng: random.Random) -> Dict[str, str]:
    """One Alpaca row for a problem (the reverse task has no ``input``, as in Alpaca)."""
    task = p[0]
    if task in _INSTRUCTIONS:
        instruction, inp = rng.choice(_INSTRUCTIONS[task]), f"{p[1]} and {p[2]}"
    elif task == "convert":
        src, dst, _ = UNITS[p[1]]
        instruction, inp = f"Convert {src} to {dst}.", f"{p[2]} {src}"
    else:
        instruction, inp = "Reverse the order of the words: " + " ".join(p[1]), ""
    return {"instruction": instruction, "input": inp, "output": _answer(p)}


def to_sentence(p: Problem, rng: random.Random) -> str:
    """The same problem as a plain sentence, in one of several phrasings (pre-training text)."""
    task, c = p[0], _answer(p)
    if task == "convert":
        src, dst, factor = UNITS[p[1]]
        return rng.choice(
            [
                f"{p[2]} {src} is {c}.",
                f"{p[2]} {src} equals {c}.",
                f"in {dst}, {p[2]} {src} is {c}.",
            ]
        )
    if task == "reverse":
        words = " ".join(p[1])
        return rng.choice([f"{words} reversed is {c}.", f"backwards, {words} reads {c}."])
    a, b = p[1], p[2]
    phrasings = {
        "add": [f"{a} plus {b} is {c}.", f"the sum of {a} and {b} is {c}.", f"{a} + {b} = {c}"],
        "subtract": [
            f"{a} minus {b} is {c}.",
            f"the difference of {a} and {b} is {c}.",
            f"{a} - {b} = {c}",
        ],
        "larger": [f"the larger of {a} and {b} is {c}.", f"of {a} and {b}, {c} is larger."],
    }
    return rng.choice(phrasings[task])


def make_splits(seed: int = SEED) -> Tuple[List[Dict[str, str]], List[Dict[str, str]], set]:
    """Train and held-out Alpaca rows, plus the held-out problems (kept out of everything else)."""
    rng = random.Random(seed)
    heldout_problems, heldout = set(), []
    for task in TASKS:
        while sum(p[0] == task for p in heldout_problems) < N_HELDOUT_PER_TASK:
            p = _sample_problem(task, rng)
            if p not in heldout_problems:
                heldout_problems.add(p)
                heldout.append(to_alpaca(p, rng))
    train = []
    for task in TASKS:
        n = 0
        while n < N_TRAIN_PER_TASK:
            p = _sample_problem(task, rng)
            if p not in heldout_problems:
                train.append(to_alpaca(p, rng))
                n += 1
    rng.shuffle(train)
    return train, heldout, heldout_problems


def _fragment(rng: random.Random, heldout_problems: set) -> str:
    """A piece of prompt-like text with no answer attached: the Alpaca preamble, a header
    followed by an instruction, an input or a fact sentence. It gives every prompt word a
    trained embedding without ever showing an instruction next to its answer."""
    p = _sample_problem(rng.choice(TASKS), rng)
    while p in heldout_problems:
        p = _sample_problem(rng.choice(TASKS), rng)
    row = to_alpaca(p, rng)
    kind = rng.randrange(5)
    if kind == 0:
        return rng.choice(_PROMPT_INPUT.split("\n\n")[:1] + _PROMPT_NO_INPUT.split("\n\n")[:1])
    if kind == 1:
        return "### Instruction:\n" + row["instruction"]
    if kind == 2:
        return "### Input:\n" + (row["input"] or " ".join(p[1]))
    if kind == 3:
        return "### Response:\n" + to_sentence(p, rng)
    return row["instruction"]


# Question/answer layouts of the pre-training text: (instruction, input, answer) prefixes.
# Several of them, so the model learns to find the operands by content rather than at a fixed
# distance; none is Alpaca's ("### Instruction:" ... "### Response:").
_LAYOUTS = (
    ("Q: ", "\n", "\nA: "),
    ("Question: ", "\nInput: ", "\n\nAnswer: "),
    ("Task: ", "\n\nGiven: ", "\n\nResult:\n"),
    ("", " ", " -> "),
    ("Instruction - ", "\nData - ", "\nReply - "),
)


def to_question(p: Problem, rng: random.Random) -> str:
    """The problem as a question and its answer in one of :data:`_LAYOUTS`: the instruction
    wording of the Alpaca rows, never Alpaca's layout, and no end-of-sequence after it."""
    row = to_alpaca(p, rng)
    ask, given, reply = rng.choice(_LAYOUTS)
    question = ask + row["instruction"] + (given + row["input"] if row["input"] else "")
    return question + reply + row["output"]


def pretrain_lines(heldout_problems: set, seed: int) -> Iterator[str]:
    """An endless, seeded stream of pre-training lines avoiding held-out problems: four in five
    a solved problem as a question and answer (:func:`to_question`), one in five a prompt
    fragment."""
    rng = random.Random(seed)
    while True:
        if rng.random() < 0.2:
            yield _fragment(rng, heldout_problems)
            continue
        p = _sample_problem(rng.choice(TASKS), rng)
        if p not in heldout_problems:
            yield to_question(p, rng)


def alpaca_text(row: Dict[str, str]) -> str:
    template = _PROMPT_INPUT if row["input"] else _PROMPT_NO_INPUT
    return template.format(**row) + row["output"]


# --------------------------------------------------------------------------- writers
def write_data(out_dir: Path, seed: int = SEED) -> None:
    train, heldout, _ = make_splits(seed)
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("heldout", heldout)):
        text = json.dumps(rows, indent=1, ensure_ascii=False) + "\n"
        (out_dir / "data" / f"{name}.json").write_text(text, encoding="utf-8")


def make_pairs(train: List[Dict[str, str]], n: int = 400, seed: int = SEED) -> List[Dict[str, str]]:
    """Preference pairs for the DPO recipes: a wrong answer to the same kind of instruction."""
    rng = random.Random(seed + 2)
    by_instruction: Dict[str, List[str]] = {}
    for row in train:
        by_instruction.setdefault(row["instruction"].split(":")[0], []).append(row["output"])
    pairs = []
    for row in train[:n]:
        prompt = f"{row['instruction']}\n{row['input']}" if row["input"] else row["instruction"]
        others = [o for o in by_instruction[row["instruction"].split(":")[0]] if o != row["output"]]
        pairs.append({"prompt": prompt, "chosen": row["output"], "rejected": rng.choice(others)})
    return pairs


def write_pairs(out_dir: Path, seed: int = SEED) -> None:
    train, _, _ = make_splits(seed)
    text = json.dumps(make_pairs(train, seed=seed), indent=1, ensure_ascii=False) + "\n"
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    (out_dir / "data" / "pairs.json").write_text(text, encoding="utf-8")


def write_tokenizer(out_dir: Path, seed: int = SEED) -> None:
    import sentencepiece as spm

    train, _, heldout_problems = make_splits(seed)
    lines = pretrain_lines(heldout_problems, seed + 1)
    corpus = [alpaca_text(r) for r in train] + [next(lines) for _ in range(5000)]
    out_dir.mkdir(parents=True, exist_ok=True)
    # Written through a buffer: with a model_prefix the output path would be stored inside
    # the model and the bytes would depend on where it was built.
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=buf,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        seed_sentencepiece_size=100000,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    (out_dir / "tokenizer.model").write_bytes(buf.getvalue())


def _pretrain_rows(tokenizer_path: Path, heldout_problems: set, seed: int, seq_len: int):
    """Endless rows of ``seq_len`` ids: BOS, then sentences joined by blank lines, cut."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    lines = pretrain_lines(heldout_problems, seed)
    while True:
        doc = [next(lines)]
        while len(sp.encode("\n\n".join(doc))) < seq_len:
            doc.append(next(lines))
        yield ([1] + sp.encode("\n\n".join(doc)))[:seq_len]


def pretrain(tokenizer_path: Path, steps: int, seed: int = SEED, log_every: int = 100):
    """Pre-train the tiny Llama from scratch on plain sentences; returns an HF LlamaForCausalLM.

    A plain loop on Hugging Face's Llama (the reference our model is tested against), so the
    base checkpoint does not change when torchtune's own modules are refactored. Deterministic:
    fixed seeds, a fixed thread count and a data stream that depends only on ``seed``; float
    results still depend on the CPU kind and the torch/transformers versions.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(PRETRAIN_THREADS)
    torch.manual_seed(0)
    _, _, heldout_problems = make_splits(seed)
    cfg = PRETRAIN
    rows = _pretrain_rows(tokenizer_path, heldout_problems, seed + 2, cfg["seq_len"])
    config = LlamaConfig(
        vocab_size=MODEL["vocab_size"],
        hidden_size=MODEL["embed_dim"],
        intermediate_size=MODEL["intermediate_dim"],
        num_hidden_layers=MODEL["num_layers"],
        num_attention_heads=MODEL["num_heads"],
        num_key_value_heads=MODEL["num_kv_heads"],
        max_position_embeddings=MODEL["max_seq_len"],
        tie_word_embeddings=False,
        rms_norm_eps=MODEL["norm_eps"],
    )
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=(0.9, 0.95)
    )

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine to zero
        warm = min(1.0, (step + 1) / cfg["warmup"])
        return warm * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    t0 = time.perf_counter()
    for step in range(steps):
        x = torch.tensor([next(rows) for _ in range(cfg["batch_size"])])  # [b, s]
        loss = model(x, labels=x).loss  # HF shifts the labels inside
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(
                f"pretrain step {step}/{steps} loss {loss.item():.4f} "
                f"({time.perf_counter() - t0:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
    return model.eval()


def write_model(out_dir: Path, seed: int = SEED, steps: Optional[int] = None) -> None:
    """Pre-train and write ``model/`` in Hugging Face format (config.json, model.safetensors).

    Needs ``tokenizer.model`` in ``out_dir`` (made by :func:`write_tokenizer`).
    """
    model = pretrain(
        out_dir / "tokenizer.model", PRETRAIN["steps"] if steps is None else steps, seed
    )
    model.save_pretrained(out_dir / "model")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["data", "pairs", "tokenizer", "model"],
        default=["data", "pairs", "tokenizer", "model"],
    )
    args = parser.parse_args(argv)
    for part in args.only:
        t0 = time.perf_counter()
        writers = {
            "data": write_data,
            "pairs": write_pairs,
            "tokenizer": write_tokenizer,
            "model": write_model,
        }
        writers[part](args.out_dir)
        print(f"{part}: done in {time.perf_counter() - t0:.1f}s -> {args.out_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
