# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""What a training run writes loads in other tools: transformers' AutoModelForCausalLM and
AutoTokenizer (chat template included) on the model folder, PEFT on the adapter folder, and
llama.cpp's convert_hf_to_gguf.py, for the bundled tiny Llama 2 (SentencePiece) and for a
family with a tokenizer.json (the Mistral layout of tests/recipes/test_family_configs.py).

The llama.cpp test needs the ``gguf`` package and the converter from the ``llama-cpp-python``
source distribution: ``pip download --no-deps --no-binary llama-cpp-python llama-cpp-python
-d DIR`` and ``LLAMA_CPP_PYTHON_SDIST=DIR/llama_cpp_python-<version>.tar.gz`` (or the path of
its extracted ``vendor/llama.cpp``).
"""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Dict

import pytest
import torch

from tests.recipes.single_device_utils import run_tune
from tests.recipes.test_family_configs import _model_folder
from tests.test_utils import sample_conversations
from torchtune import config as tt_config
from torchtune.data import AlpacaInstructTemplate
from torchtune.datasets import alpaca_dataset, chat_dataset
from torchtune.models import hf_tokenizer
from torchtune.models.llama2 import llama2_tokenizer

TINY = Path(tt_config.__file__).parents[1] / "assets" / "tiny"
# The recipe config per run; the Llama 2 ones are the bundled tiny configs as shipped.
RUNS = {
    "llama2_lora": ("lora_finetune_single_device", "tiny/lora"),
    "llama2_full": ("full_finetune_single_device", "tiny/full"),
    "mistral_lora": ("lora_finetune_single_device", "mistral/7B_lora_single_device"),
}
# The files a model folder may hold: what from_pretrained and other loaders read.
MODEL_FOLDER_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
}


def output_folders(output_dir: Path, epoch: int = 1) -> Dict[str, Path]:
    """Where a run puts the epoch's model folder and PEFT's adapter folder: the ONE place
    that knows the layout."""
    model = output_dir / f"epoch_{epoch}"
    return {"model": model, "peft": output_dir / f"epoch_{epoch}_peft"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_folder_outputs")
    # Mistral's template takes alternating user/assistant turns only: no system prompts.
    rows = [[m for m in c if m["role"] != "system"] for c in sample_conversations(6, seed=7)]
    (root / "chats.jsonl").write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    return root


_DONE: Dict[str, Path] = {}


def _run(root: Path, name: str) -> Path:
    """Run ``name`` once per session (two optimizer steps of batch 2); its output_dir."""
    if name in _DONE:
        return _DONE[name]
    recipe, cfg = RUNS[name]
    out = root / name
    overrides = [f"output_dir={out}", "max_steps_per_epoch=2", "batch_size=2", "epochs=1"]
    if name.startswith("mistral"):
        model_dir = _model_folder(root, "mistral")
        overrides += [
            f"model.config={model_dir}",
            "model.max_seq_len=128",
            f"tokenizer.path={model_dir}",
            f"checkpointer.checkpoint_dir={model_dir}",
            "checkpointer.checkpoint_files=[model.safetensors]",
            f"dataset.source={root / 'chats.jsonl'}",
            "dataset.split=train",
            "dataset.max_seq_len=128",
            "device=cpu",
            "dtype=fp32",
            "gradient_accumulation_steps=1",
        ]
    run_tune(recipe, cfg, overrides, cwd=root)
    _DONE[name] = out
    return out


def _check_model_folder_holds_only_model_files(folder: Path) -> None:
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert names <= MODEL_FOLDER_FILES, sorted(names - MODEL_FOLDER_FILES)
    # Loaders that glob *.safetensors must find the model only.
    assert [p.name for p in folder.glob("*.safetensors")] == ["model.safetensors"]


def _hf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    return model.eval()


def _llama2_rows(n: int):
    return json.loads((TINY / "data" / "train.json").read_text())[:n]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama2_lora", "llama2_full"])
def test_llama2_output_loads_in_transformers(root, name):
    from transformers import AutoTokenizer

    folders = output_folders(_run(root, name))
    model = _hf_model(folders["model"])
    tok = AutoTokenizer.from_pretrained(str(folders["model"]))
    ours = llama2_tokenizer(TINY / "tokenizer.model")
    data = str(TINY / "data" / "train.json")
    ds = alpaca_dataset(ours, source="json", data_files=data, train_on_input=False)
    rows = _llama2_rows(16)
    assert {bool(r["input"]) for r in rows} == {True, False}
    for i, row in enumerate(rows):
        text = AlpacaInstructTemplate.format(row) + row["output"]
        assert tok(text)["input_ids"] == ours.encode(text, add_eos=False)
        messages = [
            {"role": "user", "content": row["instruction"], "input": row["input"]},
            {"role": "assistant", "content": row["output"]},
        ]
        ids = tok.apply_chat_template(messages, return_dict=False)
        assert ids == ds[i]["tokens"]  # the chat template renders the training prompt
    with torch.no_grad():
        logits = model(torch.tensor([ds[0]["tokens"]])).logits
    assert logits.shape == (1, len(ds[0]["tokens"]), 640) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_llama2_peft_adapter_loads_with_peft(root):
    from peft import PeftModel

    folders = output_folders(_run(root, "llama2_lora"))
    merged = _hf_model(folders["model"])
    base = _hf_model(TINY / "model")
    peft_model = PeftModel.from_pretrained(base, str(folders["peft"])).eval()
    tokens = torch.tensor([llama2_tokenizer(TINY / "tokenizer.model").encode("Add 2 and 8.")])
    with torch.no_grad():
        expected = merged(tokens).logits
        torch.testing.assert_close(peft_model(tokens).logits, expected, atol=1e-5, rtol=1e-5)
    # The trained adapter changed the model, so the comparison above means something.
    with peft_model.disable_adapter(), torch.no_grad():
        assert not torch.allclose(peft_model(tokens).logits, expected, atol=1e-4)


@pytest.mark.slow
def test_llama2_full_model_folder_holds_only_model_files(root):
    _check_model_folder_holds_only_model_files(output_folders(_run(root, "llama2_full"))["model"])


@pytest.mark.slow
def test_llama2_lora_model_folder_holds_only_model_files(root):
    _check_model_folder_holds_only_model_files(output_folders(_run(root, "llama2_lora"))["model"])


@pytest.mark.slow
def test_tokenizer_json_family_output_loads_in_transformers(root):
    from transformers import AutoTokenizer

    folders = output_folders(_run(root, "mistral_lora"))
    model_dir = _model_folder(root, "mistral")
    _hf_model(folders["model"])
    tok = AutoTokenizer.from_pretrained(str(folders["model"]))
    tok_json = (folders["model"] / "tokenizer.json").read_bytes()
    assert tok_json == (model_dir / "tokenizer.json").read_bytes()  # the run's, copied
    source = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tok.chat_template == source["chat_template"]  # chat data: the model's own template
    ours = hf_tokenizer(model_dir)
    ds = chat_dataset(ours, source=str(root / "chats.jsonl"))
    for i, line in enumerate((root / "chats.jsonl").read_text().splitlines()):
        messages = json.loads(line)["messages"]
        assert tok.apply_chat_template(messages, return_dict=False) == ds[i]["tokens"]
        text = " ".join(m["content"] for m in messages)
        assert tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text, False, False)


def _converter() -> Path:
    try:
        import gguf  # noqa: F401
    except ImportError:
        pytest.skip("the gguf package is not installed (pip install gguf)")
    where = os.environ.get("LLAMA_CPP_PYTHON_SDIST")
    if not where:
        pytest.skip(
            "LLAMA_CPP_PYTHON_SDIST is not set: pip download --no-deps --no-binary "
            "llama-cpp-python llama-cpp-python -d DIR, then set it to the .tar.gz"
        )
    path = Path(where)
    if path.is_file():
        target = Path(os.environ.get("TMPDIR", "/tmp")) / f"{path.name}.extracted"
        if not target.is_dir():
            with tarfile.open(path) as tar:
                members = [
                    m
                    for m in tar.getmembers()
                    if "/vendor/llama.cpp/" in m.name
                    and any(
                        s in m.name for s in ("convert_hf_to_gguf.py", "/gguf-py/", "/conversion/")
                    )
                ]
                tar.extractall(target.with_suffix(".tmp"), members=members, filter="data")
            target.with_suffix(".tmp").rename(target)
        found = sorted(target.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    else:
        found = sorted(path.glob("**/convert_hf_to_gguf.py"))
    if not found:
        pytest.fail(f"{where} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
    return found[0]


def _convert(converter: Path, folder: Path, outfile: Path) -> None:
    llama_cpp = converter.parent
    env = {**os.environ, "PYTHONPATH": f"{llama_cpp / 'gguf-py'}{os.pathsep}{llama_cpp}"}
    cmd = [sys.executable, str(converter), str(folder), "--outfile", str(outfile)]
    proc = subprocess.run(
        cmd + ["--outtype", "f32"], env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama2_lora", "mistral_lora"])
def test_output_converts_with_llama_cpp(root, name, tmp_path):
    import gguf
    from safetensors import safe_open
    from transformers import AutoTokenizer

    converter = _converter()
    folder = output_folders(_run(root, name))["model"]
    outfile = tmp_path / "model.gguf"
    _convert(converter, folder, outfile)
    reader = gguf.GGUFReader(str(outfile))
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        weights = {k: f.get_tensor(k) for k in f.keys()}
    assert len(reader.tensors) == len(weights)
    tensors = {t.name: t for t in reader.tensors}
    for ours, theirs in (
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
    ):
        data = torch.from_numpy(tensors[theirs].data.copy()).reshape(weights[ours].shape)
        torch.testing.assert_close(data, weights[ours], atol=0, rtol=0)

    def field(key):
        f = reader.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert field("tokenizer.chat_template") == [config["chat_template"]]
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert field("tokenizer.ggml.tokens") == tok.convert_ids_to_tokens(list(range(len(tok))))
