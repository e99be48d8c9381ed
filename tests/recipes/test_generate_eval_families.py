# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``tune generate`` and ``eleuther_eval`` on a non-llama family built from its ``config.json``.

The model is Qwen2 with tied embeddings and a sliding window of 5 on its upper layers, named
in the config only as ``torchtune.models.from_hf_config`` and loaded by the HF checkpointer
without a ``model_type``. Greedy text runs far past the window and must equal HF's
``generate``; eval numbers (loglikelihood of documents longer than the window) must equal
lm-eval's ``HFLM`` on the HF model.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import save_file

from tests.recipes.test_eleuther_eval import LL_ATOL, LL_PAIRS, _hf_tokenizer
from tests.test_utils import train_sentencepiece
from tests.torchtune.models.test_hf_families import tiny_hf
from torchtune.models import from_hf_config
from torchtune.models._families import family_for_hf_model_type
from torchtune.models.llama2 import llama2_tokenizer
from torchtune.utils import generate

REPO = Path(__file__).resolve().parents[2]
TUNE = str(Path(sys.executable).parent / "tune")
VOCAB, MAX_SEQ, WINDOW = 400, 256, 5
CASE = "qwen2-tied-window"  # window on layers >= max_window_layers (1), tied output


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


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2_assets")
    sp_path = train_sentencepiece(root / "tok" / "sp", vocab_size=VOCAB)
    hf = tiny_hf(CASE, seed=2, vocab_size=VOCAB, max_position_embeddings=MAX_SEQ)
    assert hf.config.sliding_window == WINDOW and hf.config.tie_word_embeddings
    hf.save_pretrained(root / "hf_model", safe_serialization=True)
    return {"sp": sp_path, "hf": hf, "hf_dir": root / "hf_model"}


def _cfg(assets, out_dir, **extra):
    return {
        "model": {
            "_component_": "torchtune.models.from_hf_config",
            "config": str(assets["hf_dir"]),
        },
        "tokenizer": {
            "_component_": "torchtune.models.llama2.llama2_tokenizer",
            "path": str(assets["sp"]),
        },
        "checkpointer": {  # no model_type: the family comes from config.json
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


def _hf_greedy_text(assets, prompt, max_new_tokens):
    tok = llama2_tokenizer(assets["sp"])
    ids = torch.tensor([tok.encode(prompt, add_bos=True, add_eos=False)])
    with torch.no_grad():
        out = assets["hf"].generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
        )[0, ids.shape[1] :]
    out = out.tolist()
    assert len(ids[0]) + len(out) > 4 * WINDOW  # the run goes far past the window
    return tok.decode(out[: out.index(tok.eos_id)] if tok.eos_id in out else out)


@pytest.mark.integration
def test_tune_generate_from_hf_config_equals_hf_greedy(assets, tmp_path):
    cfg = _cfg(
        assets,
        tmp_path / "out",
        prompt="the quick brown fox",
        instruct_template=None,
        instruct_input=None,
        max_new_tokens=30,
        temperature=0.0,
        top_k=None,
        top_p=None,
        stop_strings=[],
    )
    path = tmp_path / "generate_qwen2.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [TUNE, "generate", "--config", str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = _hf_greedy_text(assets, "the quick brown fox", 30)
    assert expected.strip()
    assert proc.stdout.startswith(expected + "\n"), (proc.stdout, expected)


@pytest.fixture(scope="module")
def eval_model(assets, tmp_path_factory):
    ee = _load("eleuther_eval.py")
    out = tmp_path_factory.mktemp("eval_out")
    cfg = OmegaConf.create(
        _cfg(
            assets,
            out,
            tasks=["x"],
            limit=None,
            num_fewshot=None,
            batch_size=2,
            max_seq_length=24,
            add_bos=True,
            include_path=None,
            include_default_tasks=False,
            output_dir=str(out),
        )
    )
    recipe = ee.EleutherEvalRecipe(cfg)
    recipe.setup(cfg)
    windows = [layer.attn.sliding_window for layer in recipe._model.layers]
    assert windows == [None, WINDOW, WINDOW]
    assert recipe._model.output.weight is recipe._model.tok_embeddings.weight
    return ee, recipe._model


def _lms(assets, eval_model, add_bos, max_length):
    from lm_eval.models.huggingface import HFLM

    ee, model = eval_model
    ours = ee.TorchTuneLM(
        model,
        llama2_tokenizer(assets["sp"]),
        device=torch.device("cpu"),
        max_seq_length=max_length,
        batch_size=2,
        add_bos=add_bos,
    )
    ref = HFLM(
        pretrained=assets["hf"],
        tokenizer=_hf_tokenizer(assets["sp"]),
        batch_size=3,
        max_length=max_length,
        add_bos_token=add_bos,
        device="cpu",
        logits_cache=False,  # see tests/recipes/test_eleuther_eval.py
    )
    return ours, ref


@pytest.mark.parametrize("add_bos", [True, False])
def test_eval_loglikelihood_from_hf_config_matches_hflm(assets, eval_model, add_bos):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    ours, ref = _lms(assets, eval_model, add_bos, max_length=24)
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(LL_PAIRS)]
    expected, got = ref.loglikelihood(reqs), ours.loglikelihood(reqs)
    assert len(got) == len(expected)
    for (ll, greedy), (ll_ref, greedy_ref), pair in zip(got, expected, LL_PAIRS):
        assert abs(ll - ll_ref) <= LL_ATOL, (pair, ll, ll_ref)
        assert greedy == greedy_ref, pair

    texts = ["the quick brown fox jumps over lazy dog " * 6, "hello world", "add two numbers."]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    torch.testing.assert_close(
        torch.tensor(ours.loglikelihood_rolling(reqs)),
        torch.tensor(ref.loglikelihood_rolling(reqs)),
        atol=LL_ATOL,
        rtol=0,
    )


def test_generate_merges_a_lora_adapter_on_a_tied_windowed_model(assets, tmp_path):
    """LoRA on the output projection of a tied model adapts the output only: after the merge
    the output holds ``W + (alpha/r) B A`` and the embedding keeps ``W`` (they untie), and the
    merged model's logits and greedy text are those of the unmerged LoRA model."""
    lora_kw = dict(
        lora_attn_modules=["q_proj", "v_proj"],
        apply_lora_to_mlp=True,
        apply_lora_to_output=True,
        lora_rank=2,
        lora_alpha=6.0,
    )
    torch.manual_seed(4)
    lora = from_hf_config(assets["hf_dir"], **lora_kw).eval()
    assert lora.output.weight is lora.tok_embeddings.weight
    adapter = {k: torch.randn_like(v) * 0.1 for k, v in lora.state_dict().items() if "lora_" in k}
    row = family_for_hf_model_type("qwen2")
    lora.load_state_dict({**row.hf_to_tune(dict(assets["hf"].state_dict())), **adapter})
    save_file(adapter, tmp_path / "adapter.safetensors")

    cfg = _cfg(
        assets,
        tmp_path / "out",
        prompt="the quick brown fox",
        instruct_template=None,
        instruct_input=None,
        max_new_tokens=25,
        temperature=0.0,
        top_k=None,
        top_p=None,
        stop_strings=[],
    )
    cfg["model"].update(lora_kw)
    cfg["checkpointer"]["adapter_checkpoint"] = str(tmp_path / "adapter.safetensors")
    cfg = OmegaConf.create(cfg)
    recipe = _load("generate.py").GenerateRecipe(cfg)
    recipe.setup(cfg)
    merged = recipe._model
    assert not [m for m in merged.modules() if type(m).__name__ == "LoRALinear"]
    torch.testing.assert_close(
        merged.tok_embeddings.weight, lora.tok_embeddings.weight, atol=0, rtol=0
    )
    tokens = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), lora(tokens), atol=1e-5, rtol=1e-5)
    tok = llama2_tokenizer(assets["sp"])
    prompt = tok.encode("the quick brown fox", add_bos=True, add_eos=False)
    (want,) = generate(lora, [prompt], 25, temperature=0.0, stop_tokens=[tok.eos_id])
    assert recipe.generate() == tok.decode(want)
