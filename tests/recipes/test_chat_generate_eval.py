# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Conversations through ``generate`` and chat-templated ``eleuther_eval``, against transformers
and lm-eval's ``HFLM`` on the same weights and the same tokenizer folder.

The tokenizer folders come from ``tests/tokenizer_fixtures.py`` (trained on the spot, Llama 3.1
and Qwen 2.5 ChatML templates); the models are tiny HF Llama / Qwen2 checkpoints whose
vocabulary is the tokenizer's. One output row of each model is biased towards a stop token
that is not the tokenizer's EOS (Llama 3's ``<|eom_id|>``, Qwen's ``<|endoftext|>``), so that
greedy decoding of the test conversation ends on it a few tokens in: both sides must stop at
the same step, on any of the stop ids.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from tests.test_utils import tiny_hf_llama
from tests.tokenizer_fixtures import build_hf_tokenizer_dir
from tests.torchtune.models.test_hf_families import tiny_hf

REPO = Path(__file__).resolve().parents[2]
TUNE = str(Path(sys.executable).parent / "tune")
MAX_SEQ, MAX_NEW, STOP_STEP = 512, 16, 3
# model, tokenizer kind, template, the stop token (not the tokenizer's EOS) the model is biased to
CASES = {
    "llama-llama3": ("llama", "byte_bpe", "llama3", "<|eom_id|>"),
    "qwen2-chatml": ("qwen2", "byte_bpe", "chatml", "<|endoftext|>"),
}
MESSAGES = [
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": "add the two numbers 12 and 30"},
    {"role": "assistant", "content": "the answer is 42."},
    {"role": "user", "content": "and the quick brown fox?"},
]
CHAT_PROMPT = "hello there, what is the answer?"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "torchtune" / "recipes" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls on a shared, busy CPU: extra intra-op threads only spin and wait.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _input_ids(hf_tok, messages):
    out = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


def _hf_greedy(hf, hf_tok, stop_ids, ids):
    """transformers' greedy tokens after ``ids``, cut before the first stop id, and the text."""
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids_t,
            attention_mask=torch.ones_like(ids_t),
            do_sample=False,
            max_new_tokens=MAX_NEW,
            eos_token_id=stop_ids,
            pad_token_id=stop_ids[0],
        )[0, len(ids) :].tolist()
    stop_at = next((i for i, t in enumerate(out) if t in stop_ids), len(out))
    new = out[:stop_at]
    return new, stop_at < len(out), hf_tok.decode(new, skip_special_tokens=True)


def _build(root: Path, case: str):
    from transformers import AutoTokenizer

    family, kind, template, stop = CASES[case]
    tok_dir = build_hf_tokenizer_dir(root / "tok", kind, template)
    hf_tok = AutoTokenizer.from_pretrained(tok_dir)
    stop_ids = sorted(
        {hf_tok.eos_token_id, *[hf_tok.convert_tokens_to_ids(s) for s in _stops(tok_dir)]}
    )
    ids = dict(
        vocab_size=len(hf_tok),
        max_position_embeddings=MAX_SEQ,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=stop_ids,
    )
    if family == "llama":
        hf = tiny_hf_llama(3, **ids)
    else:
        hf = tiny_hf("qwen2-untied", seed=3, **ids)
    # Bias the stop token's output row towards the token greedy decoding of MESSAGES picks at
    # STOP_STEP, so the stop id outscores it there (or a little earlier).
    prompt = _input_ids(hf_tok, MESSAGES)
    free, _, _ = _hf_greedy(hf, hf_tok, [-1], prompt)
    stop_id = hf_tok.convert_tokens_to_ids(stop)
    assert stop_id in stop_ids and stop_id != hf_tok.eos_token_id
    with torch.no_grad():
        hf.lm_head.weight[stop_id] = 1.1 * hf.lm_head.weight[free[STOP_STEP]]
    new, stopped, _ = _hf_greedy(hf, hf_tok, stop_ids, prompt)
    assert stopped and 0 < len(new) <= STOP_STEP, (free, new)
    hf.generation_config.eos_token_id = stop_ids  # what HFLM's generate stops at
    hf.save_pretrained(root / "hf_model", safe_serialization=True)
    return dict(hf=hf, hf_tok=hf_tok, tok_dir=tok_dir, hf_dir=root / "hf_model", stop_ids=stop_ids)


def _stops(tok_dir: Path):
    gen = json.loads((tok_dir / "generation_config.json").read_text())["eos_token_id"]
    gen = gen if isinstance(gen, list) else [gen]
    vocab = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    return [by_id[i] for i in gen]


@pytest.fixture(scope="module", params=list(CASES))
def assets(request, tmp_path_factory):
    return _build(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def llama_assets(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("llama_only"), "llama-llama3")


def _base_cfg(assets, out_dir, **extra):
    return {
        "model": {
            "_component_": "torchtune.models.from_hf_config",
            "config": str(assets["hf_dir"]),
        },
        "tokenizer": {
            "_component_": "torchtune.models.hf_tokenizer",
            "path": str(assets["tok_dir"]),
        },
        "checkpointer": {
            "_component_": "torchtune.utils.FullModelHFCheckpointer",
            "checkpoint_dir": str(assets["hf_dir"]),
            "checkpoint_files": ["model.safetensors"],
            "adapter_checkpoint": None,
            "recipe_checkpoint": None,
            "output_dir": str(out_dir),
        },
        "seed": 0,
        "device": "cpu",
        "dtype": "fp32",
        **extra,
    }


def _gen_cfg(assets, out_dir, **extra):
    fields = dict(
        prompt=None,
        messages=None,
        chat=False,
        instruct_template=None,
        instruct_input=None,
        max_new_tokens=MAX_NEW,
        temperature=0.0,
        top_k=None,
        top_p=None,
        stop_strings=[],
    )
    return _base_cfg(assets, out_dir, **{**fields, **extra})


# ---------------------------------------------------------------- generate


@pytest.mark.parametrize("mode", ["messages", "chat_prompt"])
def test_generate_conversation_equals_hf_greedy_on_chat_template(assets, tmp_path, capsys, mode):
    if mode == "messages":
        messages, extra = MESSAGES, dict(messages=MESSAGES)
    else:
        messages = [{"role": "user", "content": CHAT_PROMPT}]
        extra = dict(prompt=CHAT_PROMPT, chat=True)
    ids = _input_ids(assets["hf_tok"], messages)
    want, stopped, want_text = _hf_greedy(assets["hf"], assets["hf_tok"], assets["stop_ids"], ids)
    if mode == "messages":
        assert stopped  # the biased row ends this one on a stop id that is not EOS

    cfg = OmegaConf.create(_gen_cfg(assets, tmp_path / "out", **extra))
    recipe = _load("generate.py").GenerateRecipe(cfg)
    recipe.setup(cfg)
    assert recipe._prompt_tokens == ids  # the template's one BOS, no second one
    capsys.readouterr()
    text = recipe.generate()
    out = capsys.readouterr().out
    assert text == want_text and want_text.strip()
    assert out.startswith(text + "\n")
    assert int(re.search(r"\[(\d+) tokens in", out).group(1)) == len(want)  # the same step


@pytest.mark.integration
def test_tune_generate_messages_cli(llama_assets, tmp_path):
    assets = llama_assets
    ids = _input_ids(assets["hf_tok"], MESSAGES)
    want, stopped, want_text = _hf_greedy(assets["hf"], assets["hf_tok"], assets["stop_ids"], ids)
    assert stopped
    path = tmp_path / "chat_generate.yaml"
    path.write_text(yaml.safe_dump(_gen_cfg(assets, tmp_path / "out", messages=MESSAGES)))
    proc = subprocess.run(
        [TUNE, "generate", "--config", str(path)],
        cwd=tmp_path,
        env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(want_text + "\n"), (proc.stdout, want_text)
    assert f"\n[{len(want)} tokens in" in proc.stdout


def _sp_cfg(tmp_path, **extra):
    """The tiny SentencePiece config; its checkpoint folder does not exist, so only an error
    raised before any weights load can be the one expected."""
    cfg = OmegaConf.load(REPO / "torchtune" / "recipes" / "configs" / "tiny" / "generate.yaml")
    cfg.checkpointer.checkpoint_dir = str(tmp_path / "no_such_checkpoint")
    cfg.instruct_template = None
    for k, v in extra.items():
        cfg[k] = v
    return cfg


def test_generate_conversation_errors(tmp_path):
    gen = _load("generate.py")
    user = [{"role": "user", "content": "hi"}]
    for extra, match in [
        (dict(prompt="hi", messages=user), "exactly one of config keys 'prompt' and 'messages'"),
        (dict(prompt=None), "exactly one of config keys 'prompt' and 'messages'"),
        (dict(prompt=None, messages="hi"), "'messages' must be a list"),
        (dict(prompt=None, messages=[]), "'messages' is an empty list"),
        (dict(prompt=None, messages=[{"role": "user"}]), r"messages\[0\] must be a mapping"),
        (dict(prompt=None, messages=[*user, "hello"]), r"messages\[1\] must be a mapping"),
        (
            dict(prompt=None, messages=[*user, {"role": "assistant", "content": 3}]),
            r"messages\[1\]\.content must be a string",
        ),
        (dict(prompt=None, messages=[{"role": "", "content": "x"}]), r"messages\[0\]\.role"),
        (dict(prompt="", chat=True), "'prompt' must be a non-empty string"),
    ]:
        with pytest.raises(ValueError, match=match):
            gen.GenerateRecipe(_sp_cfg(tmp_path, **extra))
    cfg = _sp_cfg(tmp_path, prompt=None, messages=user)
    cfg.instruct_template = {"_component_": "torchtune.data.AlpacaInstructTemplate"}
    with pytest.raises(ValueError, match="Set instruct_template=null"):
        gen.GenerateRecipe(cfg)
    # A SentencePiece tokenizer has no chat template: the error names the tokenizer to use.
    for extra in [dict(chat=True), dict(prompt=None, messages=user)]:
        cfg = _sp_cfg(tmp_path, **extra)
        recipe = gen.GenerateRecipe(cfg)
        with pytest.raises(
            ValueError, match="llama2_tokenizer' has none. Use torchtune.models.hf_"
        ):
            recipe.setup(cfg)


# ---------------------------------------------------------------- eleuther_eval

MC_DOCS = [
    {"question": "the quick brown", "choices": ["fox", "dog", "world"], "label": 0},
    {"question": "hello", "choices": ["world", "fox"], "label": 0},
    {"question": "add two", "choices": ["numbers", "strings", "lazy dog"], "label": 2},
    {"question": "convert meters to", "choices": ["centimeters", "grams"], "label": 0},
]
GEN_DOCS = [
    {"question": "the quick brown fox", "answer": "jumps"},
    {"question": "hello there", "answer": "world"},
]
SYSTEM = "You are a helpful assistant. Answer with one word."


def _write_tasks(root: Path) -> Path:
    tasks = root / "tasks"
    tasks.mkdir(parents=True)
    (tasks / "mc.json").write_text(json.dumps(MC_DOCS))
    (tasks / "gen.json").write_text(json.dumps(GEN_DOCS))
    (tasks / "chat_mc.yaml").write_text(
        f"""task: chat_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / "mc.json"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
    )
    (tasks / "chat_gen.yaml").write_text(
        f"""task: chat_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / "gen.json"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
gen_prefix: "Answer:"
generation_kwargs:
  until: ["."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
    )
    return tasks


class _Recorder:
    """Wraps an LM's request entry points and records what reaches them."""

    def __init__(self, monkeypatch, cls):
        self.strings, self.pairs, self.gen_contexts, self.answers = [], [], [], []
        ll, ll_tokens, gen = cls.loglikelihood, cls._loglikelihood_tokens, cls.generate_until

        def loglikelihood(lm, requests, *a, **k):
            self.strings += [r.args for r in requests]
            return ll(lm, requests, *a, **k)

        def loglikelihood_tokens(lm, requests, *a, **k):
            self.pairs += [(list(ctx), list(cont)) for _, ctx, cont in requests]
            return ll_tokens(lm, requests, *a, **k)

        def generate_until(lm, requests, *a, **k):
            self.gen_contexts += [r.args[0] for r in requests]
            answers = gen(lm, requests, *a, **k)
            self.answers += answers
            return answers

        monkeypatch.setattr(cls, "loglikelihood", loglikelihood)
        monkeypatch.setattr(cls, "_loglikelihood_tokens", loglikelihood_tokens)
        monkeypatch.setattr(cls, "generate_until", generate_until)


@pytest.mark.parametrize("fewshot_as_multiturn", [False, True])
def test_eval_with_chat_template_equals_hflm(assets, tmp_path, monkeypatch, fewshot_as_multiturn):
    pytest.importorskip("lm_eval")
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    ee = _load("eleuther_eval.py")
    tasks = _write_tasks(tmp_path)
    options = dict(
        apply_chat_template=True,
        system_instruction=SYSTEM,
        fewshot_as_multiturn=fewshot_as_multiturn,
    )
    out = tmp_path / "out"
    cfg = OmegaConf.create(
        _base_cfg(
            assets,
            out,
            tasks=["chat_mc", "chat_gen"],
            limit=None,
            num_fewshot=1,
            batch_size=3,
            max_seq_length=MAX_SEQ,
            add_bos=True,
            include_path=str(tasks),
            include_default_tasks=False,
            output_dir=str(out),
            **options,
        )
    )
    ours_rec = _Recorder(monkeypatch, ee.TorchTuneLM)
    recipe = ee.EleutherEvalRecipe(cfg)
    recipe.setup(cfg)
    got = recipe.evaluate()["results"]

    ref_rec = _Recorder(monkeypatch, HFLM)
    ref_lm = HFLM(
        pretrained=assets["hf"],
        tokenizer=assets["hf_tok"],
        batch_size=3,
        max_length=MAX_SEQ,
        device="cpu",
        logits_cache=False,  # see tests/recipes/test_eleuther_eval.py
    )
    want = simple_evaluate(
        model=ref_lm,
        tasks=["chat_mc", "chat_gen"],
        num_fewshot=1,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=False,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
        **options,
    )["results"]

    # The same rendered requests, encoded to the same tokens, with one BOS where there is one.
    assert ours_rec.strings == ref_rec.strings and ours_rec.strings
    assert all(SYSTEM in ctx for ctx, _ in ours_rec.strings)
    assert ours_rec.pairs == ref_rec.pairs
    assert ours_rec.gen_contexts == ref_rec.gen_contexts and ours_rec.gen_contexts
    assert ours_rec.answers == ref_rec.answers, (ours_rec.answers, ref_rec.answers)
    assert all(ctx.rstrip().endswith("Answer:") for ctx in ours_rec.gen_contexts)
    bos = assets["hf_tok"].bos_token_id
    for ctx, _ in ours_rec.pairs:
        if bos is not None:
            assert ctx[0] == bos and ctx[1] != bos, ctx[:3]
        else:
            assert ctx[0] == assets["hf_tok"].convert_tokens_to_ids("<|im_start|>"), ctx[:3]
    lm = ee.TorchTuneLM(
        recipe._model, recipe._tokenizer, device=torch.device("cpu"), max_seq_length=MAX_SEQ
    )
    for ctx in ours_rec.gen_contexts:
        assert lm.tok_encode(ctx) == assets["hf_tok"](ctx, add_special_tokens=False)["input_ids"]
    assert lm.chat_template(True) == assets["hf_tok"].chat_template
    # A chat prompt on which the biased model ends on a stop id that is not EOS: both stop there.
    from lm_eval.api.instance import Instance

    ctx = lm.apply_chat_template(MESSAGES)
    kwargs = {"until": ["\n\n\n"], "max_gen_toks": MAX_NEW, "do_sample": False}
    (answer,) = lm.generate_until([Instance("generate_until", {}, (ctx, kwargs), 0)])
    ids = _input_ids(assets["hf_tok"], MESSAGES)
    _, stopped, want_text = _hf_greedy(assets["hf"], assets["hf_tok"], assets["stop_ids"], ids)
    assert stopped and answer == want_text, (answer, want_text)
    assert ref_lm.generate_until([Instance("generate_until", {}, (ctx, kwargs), 0)]) == [answer]

    assert got["chat_mc"]["acc,none"] == want["chat_mc"]["acc,none"]
    assert got["chat_gen"]["exact_match,none"] == want["chat_gen"]["exact_match,none"]


def test_eval_chat_options_errors(tmp_path):
    pytest.importorskip("lm_eval")
    ee = _load("eleuther_eval.py")
    base = OmegaConf.load(REPO / "torchtune" / "recipes" / "configs" / "tiny" / "eval.yaml")
    base.checkpointer.checkpoint_dir = str(tmp_path / "no_such_checkpoint")
    for extra, match in [
        (dict(apply_chat_template=3), "'apply_chat_template' must be true, false or a"),
        (dict(apply_chat_template=True, system_instruction=5), "'system_instruction' must be"),
        (dict(fewshot_as_multiturn=True), "'fewshot_as_multiturn' needs apply_chat_template"),
    ]:
        with pytest.raises(ValueError, match=match):
            ee.EleutherEvalRecipe(OmegaConf.merge(base, extra))
    for value in [True, "default"]:
        cfg = OmegaConf.merge(base, dict(apply_chat_template=value))
        recipe = ee.EleutherEvalRecipe(cfg)
        with pytest.raises(
            ValueError, match="llama2_tokenizer' has none. Use torchtune.models.hf_"
        ):
            recipe.setup(cfg)


def _always_bos_tokenizer(path):
    """An HF tokenizer whose ``encode(add_bos=True)`` prepends BOS even to text that starts
    with one (as transformers' own ``encode`` does), so only the recipe's check prevents a
    second BOS."""
    from torchtune.modules.tokenizers._hf import HFTokenizer

    class AlwaysBOS(HFTokenizer):
        def encode(self, text, add_bos=True, add_eos=True):
            ids = super().encode(text, add_bos=False, add_eos=add_eos)
            return [self.bos_id] + ids if add_bos and self.bos_id is not None else ids

    return AlwaysBOS(path)


@pytest.mark.parametrize("always_bos", [False, True])
@pytest.mark.parametrize(
    "kind,template", [("byte_bpe", "llama3"), ("metaspace", "gemma"), ("metaspace", "mistral")]
)
def test_apply_chat_template_equals_hflm(tmp_path, kind, template, always_bos):
    """Rendering, with and without a generation prompt (a task's ``gen_prefix``: the text
    ends right after it), a system turn the template rejects (Mistral's: both drop it), and
    the encoding of the rendered text (one BOS)."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from torchtune.models import from_hf_config, hf_tokenizer

    ee = _load("eleuther_eval.py")
    tok_dir = build_hf_tokenizer_dir(tmp_path / "tok", kind, template)
    hf_tok = AutoTokenizer.from_pretrained(tok_dir)
    hf = tiny_hf_llama(0, vocab_size=len(hf_tok), max_position_embeddings=64)
    hf.save_pretrained(tmp_path / "hf")
    ref = HFLM(pretrained=hf, tokenizer=hf_tok, batch_size=1, max_length=64, device="cpu")
    ours = ee.TorchTuneLM(
        from_hf_config(tmp_path / "hf").eval(),
        _always_bos_tokenizer(tok_dir) if always_bos else hf_tokenizer(tok_dir),
        device=torch.device("cpu"),
        max_seq_length=64,
    )
    system = [{"role": "system", "content": SYSTEM}]
    turns = [
        {"role": "user", "content": "the quick brown"},
        {"role": "assistant", "content": "fox"},
        {"role": "user", "content": "hello"},
    ]
    prefix = [{"role": "assistant", "content": "Answer:"}]
    for chat, add_gen in [
        (system + turns, True),
        (turns, True),
        (system + turns + prefix, False),
        (turns + prefix, False),
    ]:
        want = ref.apply_chat_template(chat, add_generation_prompt=add_gen)
        got = ours.apply_chat_template(chat, add_generation_prompt=add_gen)
        assert got == want, (chat, add_gen)
        if not add_gen:
            assert got.endswith("Answer:")
        assert ours.tok_encode(got) == ref.tok_encode(got)
        assert ours.tok_encode(got).count(hf_tok.bos_token_id) == 1
        assert ours.tok_encode(got + " fox") == ref.tok_encode(got + " fox")
    plain = "the quick brown fox"
    assert ours.tok_encode(plain) == ref.tok_encode(plain)  # BOS added to non-chat text
