# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""LoRALinear against PEFT's LoRA layer, and the adapter helpers against plain re-derivations."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from torchtune.models.llama2 import llama2, lora_llama2
from torchtune.modules.peft import (
    LoRALinear,
    get_adapter_params,
    get_merged_lora_state_dict,
    set_trainable_params,
)


class _Wrap(torch.nn.Module):
    def __init__(self, proj: torch.nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("use_bias", [False, True])
def test_lora_linear_matches_peft(use_bias):
    torch.manual_seed(0)
    in_dim, out_dim, rank, alpha = 24, 40, 4, 8.0
    ref = get_peft_model(
        _Wrap(torch.nn.Linear(in_dim, out_dim, bias=use_bias)),
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0),
    ).eval()
    peft_layer = ref.base_model.model.proj
    with torch.no_grad():  # PEFT starts B at zero; random B makes the adapter path count
        peft_layer.lora_A["default"].weight.normal_()
        peft_layer.lora_B["default"].weight.normal_()
    ours = LoRALinear(in_dim, out_dim, rank=rank, alpha=alpha, use_bias=use_bias).eval()
    sd = {
        "weight": peft_layer.base_layer.weight,
        "lora_a.weight": peft_layer.lora_A["default"].weight,
        "lora_b.weight": peft_layer.lora_B["default"].weight,
    }
    if use_bias:
        sd["bias"] = peft_layer.base_layer.bias
    ours.load_state_dict(sd)
    x = torch.randn(3, 5, in_dim)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-6)


def test_lora_linear_init_and_dropout():
    torch.manual_seed(0)
    layer = LoRALinear(16, 12, rank=2, alpha=4.0, dropout=0.5)
    assert layer.lora_a.weight.abs().sum() > 0
    assert torch.count_nonzero(layer.lora_b.weight) == 0
    x = torch.randn(4, 16)
    base = x @ layer.weight.T
    torch.testing.assert_close(layer(x), base, atol=1e-6, rtol=1e-6)  # B = 0: base output
    with torch.no_grad():
        layer.lora_b.weight.normal_()
    layer.eval()  # no dropout in eval
    expected = base + 2.0 * (x @ layer.lora_a.weight.T @ layer.lora_b.weight.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(4, 4, rank=0, alpha=1.0)


def _tiny_lora(**kwargs):
    torch.manual_seed(0)
    model = lora_llama2(
        ["q_proj", "v_proj"],
        apply_lora_to_mlp=True,
        apply_lora_to_output=True,
        vocab_size=53,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=32,
        max_seq_len=32,
        intermediate_dim=40,
        lora_rank=4,
        lora_alpha=8.0,
        **kwargs,
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(std=0.1)
    return model.eval()


def test_adapter_params_and_trainable():
    model = _tiny_lora()
    adapter = get_adapter_params(model)
    expected = {"output.lora_a.weight", "output.lora_b.weight"}
    for i in range(2):
        for mod in ("attn.q_proj", "attn.v_proj", "mlp.w1", "mlp.w2", "mlp.w3"):
            expected |= {f"layers.{i}.{mod}.lora_a.weight", f"layers.{i}.{mod}.lora_b.weight"}
    assert set(adapter) == expected
    params = dict(model.named_parameters())
    assert all(adapter[k] is params[k] for k in adapter)
    set_trainable_params(model, adapter)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    with pytest.raises(ValueError, match="not found"):
        set_trainable_params(model, {"nope.weight": None})


def test_merged_checkpoint_matches_rederivation_and_logits():
    model = _tiny_lora()
    sd = model.state_dict()
    merged = get_merged_lora_state_dict(model, sd)  # rank 4, alpha 8 from the modules
    assert not any("lora" in k for k in merged)
    key = "layers.1.attn.q_proj"
    expected = sd[f"{key}.weight"] + 2.0 * sd[f"{key}.lora_b.weight"] @ sd[f"{key}.lora_a.weight"]
    torch.testing.assert_close(merged[f"{key}.weight"], expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        merged["layers.0.attn.k_proj.weight"], sd["layers.0.attn.k_proj.weight"]
    )

    base = llama2(
        vocab_size=53,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=32,
        max_seq_len=32,
        intermediate_dim=40,
    ).eval()
    base.load_state_dict(merged)  # strict: exactly the base keys
    tokens = torch.randint(0, 53, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(base(tokens), model(tokens), atol=1e-5, rtol=1e-5)


def test_merge_rejects_broken_state_dicts():
    sd = _tiny_lora().state_dict()
    broken = {k: v for k, v in sd.items() if k != "layers.0.attn.q_proj.lora_b.weight"}
    model = _tiny_lora()
    with pytest.raises(ValueError, match="layers.0.attn.q_proj.lora_b.weight"):
        get_merged_lora_state_dict(model, broken)
    wrong_rank = dict(sd, **{"layers.0.attn.q_proj.lora_a.weight": torch.zeros(8, 32)})
    with pytest.raises(ValueError, match="expected rank 4"):
        get_merged_lora_state_dict(model, wrong_rank)
