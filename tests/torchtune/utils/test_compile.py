# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``utils.compile_layers`` marks exactly the decoder layers for torch.compile, keys unchanged."""

from omegaconf import OmegaConf

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


def test_recipe_setup_model_compiles_only_when_asked():
    import torch

    from torchtune.recipes.full_finetune_single_device import FullFinetuneRecipeSingleDevice

    recipe = FullFinetuneRecipeSingleDevice.__new__(FullFinetuneRecipeSingleDevice)
    recipe._device, recipe._dtype = torch.device("cpu"), torch.float32
    cfg = OmegaConf.create({"_component_": "torchtune.models.llama2.llama2", **SHAPE})
    sd = llama2(**SHAPE).state_dict()
    off = recipe._setup_model(cfg, False, sd)
    on = recipe._setup_model(cfg, False, sd, compile_layers=True)
    assert not any(_compiled(layer) for layer in off.layers)
    assert all(_compiled(layer) for layer in on.layers)
