# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The eleuther_eval recipe: our lm-eval wrapper against the harness's own ``HFLM`` on the HF copy
of the same tiny model, LoRA merging on load, and ``tune eleuther_eval`` end to end on a custom
task (YAML + local JSON) with no network.

Reference tokenizer: transformers 5 has no slow Llama tokenizer; ``SentencePieceBackend`` with
``legacy=True`` encodes through the same SentencePiece model, and ``special_tokens_pattern="bos"``
makes ``add_special_tokens=True`` prepend BOS as Llama's tokenizer does.

``HFLM`` runs with ``logits_cache=False``: its one-token-continuation cache groups requests by
``context + continuation[:-1]`` and then gathers the wrong positions for the shorter of two
grouped continuations (e.g. ``("hello ", "world")`` next to ``("", "hello world")``), so with
the cache on, HFLM itself is off for such pairs.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from tests.test_utils import tiny_hf_llama, train_sentencepiece
from torchtune.models.llama2 import hf_to_tune, llama2, llama2_tokenizer, lora_llama2

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "torchtune" / "recipes" / "eleuther_eval.py"
VOCAB, DIM, LAYERS, HEADS, KV_HEADS, HIDDEN, MAX_SEQ = 400, 64, 3, 4, 2, 88, 256
MODEL_KW = dict(
    vocab_size=VOCAB,
    num_layers=LAYERS,
    num_heads=HEADS,
    num_kv_heads=KV_HEADS,
    embed_dim=DIM,
    max_seq_len=MAX_SEQ,
    intermediate_dim=HIDDEN,
)
LL_ATOL = 1e-4
TUNE = str(Path(sys.executable).parent / "tune")


def _load_recipe_module():
    spec = importlib.util.spec_from_file_location("eleuther_eval_recipe", RECIPE)
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


@pytest.fixture(scope="module")
def ee():
    return _load_recipe_module()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_assets")
    sp_path = train_sentencepiece(root / "tok" / "sp", vocab_size=VOCAB)
    hf = tiny_hf_llama(0, vocab_size=VOCAB, num_kv_heads=KV_HEADS, max_position_embeddings=MAX_SEQ)
    hf.save_pretrained(root / "hf_model", safe_serialization=True)
    ours = llama2(**MODEL_KW).eval()
    ours.load_state_dict(hf_to_tune(hf.state_dict()))
    return {"root": root, "sp": sp_path, "hf": hf, "ours": ours, "hf_dir": root / "hf_model"}


def _hf_tokenizer(sp_path):
    from transformers import SentencePieceBackend

    return SentencePieceBackend(
        vocab_file=str(sp_path),
        legacy=True,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        special_tokens_pattern="bos",
    )


def _hflm(assets, add_bos, max_length):
    from lm_eval.models.huggingface import HFLM

    return HFLM(
        pretrained=assets["hf"],
        tokenizer=_hf_tokenizer(assets["sp"]),
        batch_size=3,
        max_length=max_length,
        add_bos_token=add_bos,
        device="cpu",
        logits_cache=False,
    )


def _ours(ee, assets, add_bos, max_length, batch_size=2):
    return ee.TorchTuneLM(
        assets["ours"],
        llama2_tokenizer(assets["sp"]),
        device=torch.device("cpu"),
        max_seq_length=max_length,
        batch_size=batch_size,
        add_bos=add_bos,
    )


LL_PAIRS = [
    ("the quick brown", " fox"),
    ("the quick brown", " dog jumps"),
    ("hello ", "world"),  # trailing space moves into the continuation
    ("", "hello world"),  # empty context: BOS is the context
    ("add two numbers and give answer below " * 4, " 42 and done"),  # truncated on the left
    ("what is sum of 3 and 4?", " 7"),
]


@pytest.mark.parametrize("add_bos", [True, False])
def test_loglikelihood_matches_hflm(ee, assets, add_bos):
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(LL_PAIRS)]
    expected = _hflm(assets, add_bos, max_length=24).loglikelihood(reqs)
    got = _ours(ee, assets, add_bos, max_length=24).loglikelihood(reqs)
    assert len(got) == len(expected)
    for (ll, greedy), (ll_ref, greedy_ref), pair in zip(got, expected, LL_PAIRS):
        assert abs(ll - ll_ref) <= LL_ATOL, (pair, ll, ll_ref)
        assert greedy == greedy_ref, pair


@pytest.mark.parametrize("add_bos", [True, False])
def test_loglikelihood_rolling_matches_hflm(ee, assets, add_bos):
    texts = [
        "the quick brown fox jumps over lazy dog " * 6,
        "hello world",
        "add two numbers: 12 and 30.",
    ]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    expected = _hflm(assets, add_bos, max_length=16).loglikelihood_rolling(reqs)
    got = _ours(ee, assets, add_bos, max_length=16).loglikelihood_rolling(reqs)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=LL_ATOL, rtol=0)


def test_generate_until_is_hf_greedy_cut_at_stop_strings(ee, assets):
    """Each answer is HF's greedy continuation, decoded and cut at the first stop string."""
    tok = llama2_tokenizer(assets["sp"])
    prompts = ["the quick brown", "hello", "what is sum of 12 and"]
    gen_kwargs = {"until": ["o", "\n\n"], "max_gen_toks": 12, "do_sample": False}
    reqs = [Instance("generate_until", {}, (p, dict(gen_kwargs)), i) for i, p in enumerate(prompts)]
    got = _ours(ee, assets, add_bos=True, max_length=64).generate_until(reqs)
    for prompt, answer in zip(prompts, got):
        ids = torch.tensor([tok.encode(prompt, add_eos=False)])
        with torch.no_grad():
            out = (
                assets["hf"]
                .generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=12,
                    eos_token_id=tok.eos_id,
                    pad_token_id=tok.pad_id,
                )[0, ids.shape[1] :]
                .tolist()
            )
        out = out[: out.index(tok.eos_id)] if tok.eos_id in out else out
        text = tok.decode(out)
        for stop in gen_kwargs["until"]:
            text = text.split(stop)[0]
        assert answer == text, prompt


def _lora_config(assets, adapter_path, out_dir):
    return OmegaConf.create(
        {
            "model": {
                "_component_": "torchtune.models.llama2.lora_llama2",
                "lora_attn_modules": ["q_proj", "v_proj"],
                "apply_lora_to_mlp": True,
                "lora_rank": 4,
                "lora_alpha": 8.0,
                **MODEL_KW,
            },
            "tokenizer": {
                "_component_": "torchtune.models.llama2.llama2_tokenizer",
                "path": str(assets["sp"]),
            },
            "checkpointer": {
                "_component_": "torchtune.utils.FullModelHFCheckpointer",
                "checkpoint_dir": str(assets["hf_dir"]),
                "checkpoint_files": ["model.safetensors"],
                "adapter_checkpoint": str(adapter_path),
                "model_type": "LLAMA2",
                "output_dir": str(out_dir),
            },
            "tasks": ["x"],
            "limit": None,
            "num_fewshot": None,
            "batch_size": 2,
            "max_seq_length": 64,
            "add_bos": True,
            "include_path": None,
            "include_default_tasks": False,
            "seed": 0,
            "device": "cpu",
            "dtype": "fp32",
            "output_dir": str(out_dir),
        }
    )


def test_base_plus_lora_adapter_is_merged_on_load(ee, assets, tmp_path):
    torch.manual_seed(3)
    lora = lora_llama2(
        ["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8.0, **MODEL_KW
    ).eval()
    lora.load_state_dict(assets["ours"].state_dict(), strict=False)
    adapter = {k: torch.randn_like(v) * 0.1 for k, v in lora.state_dict().items() if "lora_" in k}
    lora.load_state_dict(adapter, strict=False)
    save_file(adapter, tmp_path / "adapter.safetensors")

    cfg = _lora_config(assets, tmp_path / "adapter.safetensors", tmp_path / "out")
    recipe = ee.EleutherEvalRecipe(cfg)
    recipe.setup(cfg)
    assert not [m for m in recipe._model.modules() if type(m).__name__ == "LoRALinear"]
    tokens = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(recipe._model(tokens), lora(tokens), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(recipe._model(tokens), assets["ours"](tokens), atol=1e-3)

    cfg.model = OmegaConf.create({"_component_": "torchtune.models.llama2.llama2", **MODEL_KW})
    with pytest.raises(ValueError, match="no LoRA"):
        ee.EleutherEvalRecipe(cfg).setup(cfg)


# ---------------------------------------------------------------- end to end through `tune`

MC_DOCS = [
    {"question": "the quick brown", "choices": ["fox", "dog", "world"], "label": 0},
    {"question": "hello", "choices": ["world", "fox"], "label": 0},
    {"question": "add two", "choices": ["numbers", "strings", "lazy dog"], "label": 2},
    {"question": "convert meters to", "choices": ["centimeters", "grams"], "label": 0},
]
GEN_PROMPTS = ["the quick brown fox", "hello"]
GEN_MAX, GEN_STOP = 6, "."


def _hf_greedy_answer(assets, prompt: str) -> str:
    """What the harness should get from our model: HF's greedy tokens, decoded, cut at the stop."""
    tok = llama2_tokenizer(assets["sp"])
    ids = torch.tensor([tok.encode(prompt, add_eos=False)])
    with torch.no_grad():
        out = (
            assets["hf"]
            .generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=GEN_MAX,
                eos_token_id=tok.eos_id,
                pad_token_id=tok.pad_id,
            )[0, ids.shape[1] :]
            .tolist()
        )
    out = out[: out.index(tok.eos_id)] if tok.eos_id in out else out
    return tok.decode(out).split(GEN_STOP)[0]


def _write_tasks(root: Path, gen_docs) -> Path:
    tasks = root / "tasks"
    tasks.mkdir(parents=True)
    (tasks / "mc.json").write_text(json.dumps(MC_DOCS))
    (tasks / "gen.json").write_text(json.dumps(gen_docs))
    (tasks / "tiny_mc.yaml").write_text(
        f"""task: tiny_mc
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
    (tasks / "tiny_gen.yaml").write_text(
        f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / "gen.json"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["{GEN_STOP}"]
  max_gen_toks: {GEN_MAX}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
    )
    return tasks


def _offline_env():
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.integration
def test_tune_eleuther_eval_custom_tasks_offline(ee, assets, tmp_path):
    # The first generation doc's target is the reference answer, the second's cannot match.
    gen_docs = [
        {"question": GEN_PROMPTS[0], "answer": _hf_greedy_answer(assets, GEN_PROMPTS[0])},
        {
            "question": GEN_PROMPTS[1],
            "answer": _hf_greedy_answer(assets, GEN_PROMPTS[1]) + " not it",
        },
    ]
    tasks = _write_tasks(tmp_path, gen_docs)
    out = tmp_path / "out"
    overrides = [
        f"checkpointer.checkpoint_dir={assets['hf_dir']}",
        "checkpointer.checkpoint_files=[model.safetensors]",
        f"tokenizer.path={assets['sp']}",
        *[f"model.{k}={v}" for k, v in MODEL_KW.items()],
        "tasks=[tiny_mc,tiny_gen]",
        f"include_path={tasks}",
        "include_default_tasks=False",
        "limit=null",
        "batch_size=3",
        f"output_dir={out}",
        "seed=0",
    ]
    env = _offline_env()
    env["HF_DATASETS_CACHE"] = str(tmp_path / "hf_datasets")
    proc = subprocess.run(
        [TUNE, "eleuther_eval", "--config", "tiny/eval", *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(proc.stdout)
    assert "|tiny_mc " in proc.stdout and "|tiny_gen" in proc.stdout, proc.stdout
    written = sorted(out.glob("eval_results_*.json"))
    assert len(written) == 1, list(out.iterdir())
    results = json.loads(written[0].read_text())["results"]

    # acc = share of docs whose best-scoring choice (by HFLM on the HF copy) is the label.
    ref = _hflm(assets, add_bos=True, max_length=MAX_SEQ)
    correct = 0
    for doc in MC_DOCS:
        reqs = [
            Instance("loglikelihood", {}, (doc["question"], " " + c), i)
            for i, c in enumerate(doc["choices"])
        ]
        lls = [ll for ll, _ in ref.loglikelihood(reqs)]
        correct += int(max(range(len(lls)), key=lls.__getitem__) == doc["label"])
    assert results["tiny_mc"]["acc,none"] == pytest.approx(correct / len(MC_DOCS))
    assert results["tiny_gen"]["exact_match,none"] == pytest.approx(0.5)


def test_missing_lm_eval_says_how_to_install(tmp_path):
    code = (
        "import sys; sys.modules['lm_eval'] = None\n"  # any `import lm_eval...` now fails
        "from torchtune._cli.tune import main\n"
        "sys.exit(main(['eleuther_eval', '--config', 'tiny/eval']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=_offline_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert 'pip install -e ".[eval]"' in proc.stderr, proc.stderr
