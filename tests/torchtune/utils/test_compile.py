# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``utils.compile_layers`` marks exactly the decoder layers for torch.compile, keys unchanged;
the recipe compiles only when its config asks."""

import pytest

from tests.recipes.single_device_utils import build_tiny_assets, tiny_overrides
from torchtune import utils
from torchtune.models.llama2 import llama2

SHAPE = dict(vocab_size=50, num_layers=3, num_heads=2, num_kv_heads=2, embed_dim=16, max_seq_len=8)


def _compiled(module):
    return getattr(module, "_compiled_call_impl", None) is not None


def test_compile_layers_compiles_each_decoder_layer_only():
    model = llama2(**SHAPE)
    keys = list(model.state_dict())
    assert utils.compile_layers(model) == 3
    assert all(_compiled(layer) for layer in model.layers)
    assert (
        not _compiled(model) and not _compiled(model.output) and not _compiled(model.layers[0].attn)
    )
    assert list(model.state_dict()) == keys


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_tiny_assets(tmp_path_factory.mktemp("compile_assets"))


@pytest.mark.parametrize("compile_flag", [False, True])
def test_recipe_setup_compiles_only_when_asked(assets, tmp_path, compile_flag):
    # Through the recipe's public setup, as `tune` runs it: `compile` decides whether the
    # built model goes through utils.compile_layers (checked on the model it is given).
    from torchtune import config
    from torchtune._recipe_registry import get_config
    from torchtune.recipes.full_finetune_single_device import FullFinetuneRecipeSingleDevice

    overrides = tiny_overrides(assets, tmp_path) + [f"compile={compile_flag}"]
    cfg = config.load_config(get_config("tiny/full").file_path, overrides)
    compiled = []
    real = utils.compile_layers

    def spy(model):
        compiled.append(model)
        return real(model)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(utils, "compile_layers", spy)
        recipe = FullFinetuneRecipeSingleDevice(cfg)
        recipe.setup(cfg)
        recipe.cleanup()
    assert len(compiled) == int(compile_flag)
    if compile_flag:
        assert all(_compiled(layer) for layer in compiled[0].layers)
