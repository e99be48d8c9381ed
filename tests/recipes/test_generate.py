# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The generate recipe: greedy text equals HF's greedy ``generate`` on the same checkpoint, the
Alpaca template, stop strings, seeded sampling, and ``tune generate`` end to end."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.test_utils import tiny_hf_llama, train_sentencepiece
from torchtune.data import AlpacaInstructTemplate
from torchtune.models.llama2 import llama2_tokenizer

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "torchtune" / "recipes" / "generate.py"
TUNE = str(Path(sys.executable).parent / "tune")
VOCAB, MAX_SEQ = 400, 256
MODEL_KW = dict(
    vocab_size=VOCAB,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=64,
    max_seq_len=MAX_SEQ,
    intermediate_dim=88,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls on a shared, busy CPU: extra intra-op threads only spin and wait.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("generate_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_assets")
    sp_path = train_sentencepiece(root / "tok" / "sp", vocab_size=VOCAB)
    hf = tiny_hf_llama(1, vocab_size=VOCAB, max_position_embeddings=MAX_SEQ)
    hf.save_pretrained(root / "hf_model", safe_serialization=True)
    return {"sp": sp_path, "hf": hf, "hf_dir": root / "hf_model"}


def _cfg(assets, **overrides):
    cfg = OmegaConf.load(REPO / "torchtune" / "recipes" / "configs" / "tiny" / "generate.yaml")
    cfg.model.update(MODEL_KW)
    cfg.tokenizer.path = str(assets["sp"])
    cfg.checkpointer.checkpoint_dir = str(assets["hf_dir"])
    cfg.checkpointer.checkpoint_files = ["model.safetensors"]
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def _hf_greedy_text(assets, prompt, max_new_tokens):
    tok = llama2_tokenizer(assets["sp"])
    ids = torch.tensor([tok.encode(prompt, add_bos=True, add_eos=False)])
    with torch.no_grad():
        out = (
            assets["hf"]
            .generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=tok.eos_id,
                pad_token_id=tok.pad_id,
            )[0, ids.shape[1] :]
            .tolist()
        )
    return tok.decode(out[: out.index(tok.eos_id)] if tok.eos_id in out else out)


def _run(gen, cfg):
    recipe = gen.GenerateRecipe(cfg)
    recipe.setup(cfg)
    return recipe.generate()


def test_greedy_text_matches_hf(gen, assets, capsys):
    cfg = _cfg(
        assets,
        prompt="the quick brown fox",
        instruct_template=None,
        temperature=0.0,
        max_new_tokens=15,
        stop_strings=[],
    )
    text = _run(gen, cfg)
    assert text == _hf_greedy_text(assets, "the quick brown fox", 15)
    out = capsys.readouterr().out
    assert out.startswith(text + "\n") and "tokens/s" in out


def test_alpaca_template_and_stop_strings(gen, assets):
    instruction, input_ = "Add the two numbers.", "12 and 30"
    formatted = AlpacaInstructTemplate.format({"instruction": instruction, "input": input_})
    expected = _hf_greedy_text(assets, formatted, 20)
    cfg = _cfg(
        assets,
        prompt=instruction,
        instruct_input=input_,
        temperature=0.0,
        max_new_tokens=20,
        stop_strings=[],
    )
    assert _run(gen, cfg) == expected
    stop = expected[len(expected) // 2 : len(expected) // 2 + 2]  # text the model really produces
    assert stop.strip(), expected
    cfg.stop_strings = [stop]
    assert _run(gen, cfg) == expected.split(stop)[0]


def test_sampling_is_seeded(gen, assets):
    cfg = _cfg(assets, temperature=1.0, top_k=None, top_p=None, max_new_tokens=12, stop_strings=[])
    a, b = _run(gen, cfg), _run(gen, cfg)
    cfg.seed = 1
    c = _run(gen, cfg)
    assert a == b and a != c


def test_base_plus_lora_adapter_is_merged_on_load(gen, assets, tmp_path):
    from safetensors.torch import save_file

    from torchtune.models.llama2 import hf_to_tune, lora_llama2

    torch.manual_seed(5)
    lora = lora_llama2(
        ["q_proj", "k_proj", "output_proj"],
        apply_lora_to_output=True,
        lora_rank=2,
        lora_alpha=6.0,
        **MODEL_KW,
    ).eval()
    base = hf_to_tune(assets["hf"].state_dict())
    adapter = {k: torch.randn_like(v) * 0.1 for k, v in lora.state_dict().items() if "lora_" in k}
    lora.load_state_dict({**base, **adapter})
    save_file(adapter, tmp_path / "adapter.safetensors")
    cfg = _cfg(assets, temperature=0.0)
    cfg.model = OmegaConf.create(
        {
            "_component_": "torchtune.models.llama2.lora_llama2",
            "lora_attn_modules": ["q_proj", "k_proj", "output_proj"],
            "apply_lora_to_output": True,
            "lora_rank": 2,
            "lora_alpha": 6.0,
            **MODEL_KW,
        }
    )
    cfg.checkpointer.adapter_checkpoint = str(tmp_path / "adapter.safetensors")
    recipe = gen.GenerateRecipe(cfg)
    recipe.setup(cfg)
    assert not [m for m in recipe._model.modules() if type(m).__name__ == "LoRALinear"]
    tokens = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(recipe._model(tokens), lora(tokens), atol=1e-5, rtol=1e-5)
    cfg.checkpointer.adapter_checkpoint = None
    with pytest.raises(ValueError, match="adapter_checkpoint is not set"):
        gen.GenerateRecipe(cfg).setup(cfg)


def test_bad_config_values(gen, assets):
    for key, value, match in [
        ("prompt", "", "prompt"),
        ("temperature", -0.5, "temperature"),
        ("top_p", 1.5, "top_p"),
        ("max_new_tokens", 0, "max_new_tokens"),
    ]:
        with pytest.raises(ValueError, match=match):
            gen.GenerateRecipe(_cfg(assets, **{key: value}))


@pytest.mark.integration
def test_tune_generate_cli(assets, tmp_path):
    overrides = [
        f"checkpointer.checkpoint_dir={assets['hf_dir']}",
        f"tokenizer.path={assets['sp']}",
        *[f"model.{k}={v}" for k, v in MODEL_KW.items()],
        "prompt=hello world",
        "instruct_template=null",
        "temperature=0",
        "max_new_tokens=10",
        "stop_strings=[]",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [TUNE, "generate", "--config", "tiny/generate", *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(_hf_greedy_text(assets, "hello world", 10) + "\n"), proc.stdout
    assert "tokens/s" in proc.stdout
