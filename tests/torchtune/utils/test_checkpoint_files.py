# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``checkpoint_files: null``: the model's files found in ``checkpoint_dir`` (an HF download, a
folder training wrote), loading the same weights as naming them; and the load-side messages
for a folder or file that is not there (with the ``tune download`` command)."""

import pytest
import torch
from safetensors.torch import save_file

from tests.torchtune.utils.checkpoint_fixtures import (
    tiny_hf,
    write_hf_checkpoint,
    write_meta_checkpoint,
)
from torchtune import config
from torchtune.utils import (
    FullModelHFCheckpointer,
    FullModelMetaCheckpointer,
    FullModelTorchTuneCheckpointer,
)
from torchtune.utils._checkpointing._base import find_checkpoint_files


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    "n_shards,fmt,with_index",
    [
        (1, "safetensors", False),
        (3, "safetensors", True),
        (2, "safetensors", False),
        (2, "bin", True),
    ],
)
def test_null_files_load_what_naming_them_loads(tmp_path, n_shards, fmt, with_index):
    names = write_hf_checkpoint(tmp_path / "in", tiny_hf(), n_shards, fmt, with_index)
    found = find_checkpoint_files(tmp_path / "in")
    if with_index:
        assert found == [f"{'model' if fmt == 'safetensors' else 'pytorch_model'}.{fmt}.index.json"]
    else:
        assert found == sorted(names)
    named = FullModelHFCheckpointer(tmp_path / "in", names, "LLAMA2", tmp_path / "o")
    auto = FullModelHFCheckpointer(tmp_path / "in", None, "LLAMA2", tmp_path / "o")
    _assert_same(auto.load_checkpoint()["model"], named.load_checkpoint()["model"])


def test_adapter_and_recipe_state_files_are_not_the_model(tmp_path):
    # A folder training wrote: the model beside our adapter and the recipe state.
    write_hf_checkpoint(tmp_path / "epoch_0", tiny_hf())
    save_file({"x.lora_a.weight": torch.zeros(2, 2)}, tmp_path / "epoch_0" / "adapter.safetensors")
    save_file({"y": torch.zeros(1)}, tmp_path / "epoch_0" / "adapter_model.safetensors")
    torch.save({"epochs_run": 1}, tmp_path / "epoch_0" / "recipe_state.pt")
    assert find_checkpoint_files(tmp_path / "epoch_0") == ["model.safetensors"]


def test_meta_and_torchtune_folders(tmp_path):
    hf = tiny_hf()
    name = write_meta_checkpoint(tmp_path / "meta", hf)
    named = FullModelMetaCheckpointer(tmp_path / "meta", [name], "LLAMA2", tmp_path / "o")
    auto = FullModelMetaCheckpointer(tmp_path / "meta", None, "LLAMA2", tmp_path / "o")
    _assert_same(auto.load_checkpoint()["model"], named.load_checkpoint()["model"])
    (tmp_path / "tt").mkdir()
    torch.save({"w": torch.ones(2)}, tmp_path / "tt" / "model.pt")
    torch.save({"epochs_run": 1}, tmp_path / "tt" / "recipe_state.pt")
    auto = FullModelTorchTuneCheckpointer(tmp_path / "tt", model_type="LLAMA2", output_dir="o")
    assert list(auto.load_checkpoint()["model"]) == ["w"]


def _key_of(error) -> str:
    return error.torchtune_argument


def test_missing_folder_names_the_download_command(tmp_path):
    folder = tmp_path / "Llama-2-7b-hf"
    with pytest.raises(FileNotFoundError) as info:
        FullModelHFCheckpointer(folder, None, "LLAMA2", tmp_path / "o")
    assert _key_of(info.value) == "checkpoint_dir"
    assert (
        f"tune download meta-llama/Llama-2-7b-hf --output-dir {folder} (or point checkpoint_dir"
        in str(info.value)
    )
    with pytest.raises(FileNotFoundError, match="tune download <hub-id> --output-dir"):
        FullModelHFCheckpointer(tmp_path / "my-model", None, "LLAMA2", tmp_path / "o")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        FullModelHFCheckpointer(tmp_path / "file", None, "LLAMA2", tmp_path / "o")


def test_missing_or_absent_files_say_what_the_folder_holds(tmp_path):
    write_hf_checkpoint(tmp_path / "in", tiny_hf(), n_shards=2, with_index=False)
    with pytest.raises(FileNotFoundError) as info:
        FullModelHFCheckpointer(tmp_path / "in", ["model.safetensors"], "LLAMA2", tmp_path / "o")
    assert _key_of(info.value) == "checkpoint_files"
    assert "holds ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']" in str(
        info.value
    ) and "null" in str(info.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="holds no model weights .*; it holds config.json"):
        FullModelHFCheckpointer(tmp_path / "empty", None, "LLAMA2", tmp_path / "o")


def test_config_key_is_named_through_instantiate(tmp_path):
    from omegaconf import OmegaConf

    from torchtune.config._report import user_message

    cfg = OmegaConf.create(
        {
            "checkpointer": {
                "_component_": "torchtune.utils.FullModelHFCheckpointer",
                "checkpoint_dir": str(tmp_path / "Qwen3-0.6B"),
                "output_dir": str(tmp_path / "o"),
            }
        }
    )
    with pytest.raises(FileNotFoundError) as info:
        config.instantiate(cfg.checkpointer)
    text = user_message(info.value, cfg)
    assert text.startswith(f"checkpointer.checkpoint_dir={tmp_path / 'Qwen3-0.6B'}: ")
    assert f"tune download Qwen/Qwen3-0.6B --output-dir {tmp_path / 'Qwen3-0.6B'}" in text
