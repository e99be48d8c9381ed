# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``generate`` and ``eleuther_eval`` on the folder a training run writes (``output_dir/epoch_1``,
passed as ``checkpointer.checkpoint_dir`` with the files found by ``checkpoint_files: null``):
greedy text equals transformers' on ``from_pretrained`` of that folder, the eval model's logits
equal it, and ``max_seq_length`` defaults to the model's ``max_seq_len``."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from torchtune import _recipe_registry as registry
from torchtune.config import load_config
from torchtune.models.llama2 import llama2_tokenizer

REPO = Path(__file__).resolve().parents[2]
TUNE = str(Path(sys.executable).parent / "tune")
ASSETS = REPO / "torchtune" / "assets" / "tiny"


def _tune(*args, cwd):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["HF_DATASETS_CACHE"] = str(Path(cwd) / "hf_datasets")
    proc = subprocess.run(
        [TUNE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def epoch_dir(tmp_path_factory):
    """A tiny LoRA run's model folder (merged weights, config.json), two steps of training."""
    root = tmp_path_factory.mktemp("trained")
    _tune(
        "lora_finetune_single_device",
        "--config",
        "tiny/lora",
        f"output_dir={root / 'run'}",
        "max_steps_per_epoch=2",
        cwd=root,
    )
    folder = root / "run" / "epoch_1"
    trained = load_file(folder / "model.safetensors")
    base = load_file(ASSETS / "model" / "model.safetensors")
    assert trained.keys() == base.keys()
    assert any(not torch.equal(trained[k], base[k]) for k in base)  # training moved weights
    return folder


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.slow
def test_generate_from_a_trained_folder_matches_transformers(epoch_dir, tmp_path):
    prompt, n_new = "the quick brown fox", 12
    proc = _tune(
        "generate",
        "--config",
        "tiny/generate",
        f"checkpointer.checkpoint_dir={epoch_dir}",
        f"prompt={prompt}",
        "instruct_template=null",
        "temperature=0",
        f"max_new_tokens={n_new}",
        "stop_strings=[]",
        cwd=tmp_path,
    )
    text = proc.stdout.split("\n\n[")[0]

    tok = llama2_tokenizer(str(ASSETS / "tokenizer.model"))
    ids = torch.tensor([tok.encode(prompt, add_bos=True, add_eos=False)])
    with torch.no_grad():
        out = _hf(epoch_dir).generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=n_new,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
        )[0, ids.shape[1] :]
    out = out.tolist()
    assert text == tok.decode(out[: out.index(tok.eos_id)] if tok.eos_id in out else out)


def _eval_module():
    spec = importlib.util.spec_from_file_location(
        "eleuther_eval_recipe", REPO / "torchtune" / "recipes" / "eleuther_eval.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_eval_loads_a_trained_folder_with_the_models_max_seq_len(epoch_dir, tmp_path):
    pytest.importorskip("lm_eval")
    ee = _eval_module()
    config_path = registry.get_config("tiny/eval").file_path
    base = [f"checkpointer.checkpoint_dir={epoch_dir}", f"output_dir={tmp_path}"]

    cfg = load_config(config_path, base)
    assert cfg.max_seq_length is None and cfg.checkpointer.checkpoint_files is None
    recipe = ee.EleutherEvalRecipe(cfg)
    recipe.setup(cfg)
    assert recipe._max_seq_length == cfg.model.max_seq_len
    tokens = torch.randint(
        0, cfg.model.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        ours, trained = recipe._model(tokens), _hf(epoch_dir)(tokens).logits
        untrained = _hf(ASSETS / "model")(tokens).logits
    # fp32, 4 layers of dim 128 summed in another order than transformers' SDPA: ~3e-5 apart;
    # the base model (what a wrong folder or file would load) is far further off.
    torch.testing.assert_close(ours, trained, atol=1e-4, rtol=1e-4)
    assert (ours - untrained).abs().max() > 100 * (ours - trained).abs().max()

    # A model shorter than the old fixed default: the default follows it; a longer ask is refused.
    cfg = load_config(config_path, [*base, "model.max_seq_len=96"])
    recipe = ee.EleutherEvalRecipe(cfg)
    recipe.setup(cfg)
    assert recipe._max_seq_length == 96
    cfg = load_config(config_path, [*base, "model.max_seq_len=96", "max_seq_length=4096"])
    with pytest.raises(ValueError, match="'max_seq_length' is 4096.*max_seq_len=96.*null"):
        ee.EleutherEvalRecipe(cfg).setup(cfg)


@pytest.mark.slow
def test_tune_eleuther_eval_on_a_trained_folder(epoch_dir, tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from tests.recipes.test_eleuther_eval import MC_DOCS, _hflm, _write_tasks

    tasks = _write_tasks(tmp_path, [{"question": "hello", "answer": "world"}])
    out = tmp_path / "out"
    _tune(
        "eleuther_eval",
        "--config",
        "tiny/eval",
        f"checkpointer.checkpoint_dir={epoch_dir}",
        "tasks=[tiny_mc]",
        f"include_path={tasks}",
        "include_default_tasks=False",
        "limit=null",
        f"output_dir={out}",
        cwd=tmp_path,
    )
    (written,) = out.glob("eval_results_*.json")
    acc = json.loads(written.read_text())["results"]["tiny_mc"]["acc,none"]

    # The harness's own HF model on from_pretrained(epoch_1): which choices it scores best.
    ref = _hflm({"hf": _hf(epoch_dir), "sp": ASSETS / "tokenizer.model"}, True, 256)
    correct = 0
    for doc in MC_DOCS:
        reqs = [
            Instance("loglikelihood", {}, (doc["question"], " " + c), i)
            for i, c in enumerate(doc["choices"])
        ]
        lls = [ll for ll, _ in ref.loglikelihood(reqs)]
        correct += int(max(range(len(lls)), key=lls.__getitem__) == doc["label"])
    assert acc == pytest.approx(correct / len(MC_DOCS))
