# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The one LoRA path (merge, adapter tensors, adapter config, fresh adapters), all read from the
LoRALinear modules: against plain derivations and PEFT's ``merge_and_unload``."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from torchtune.models.llama2 import llama2, lora_llama2
from torchtune.modules.peft import (
    LoRALinear,
    get_adapter_params,
    get_adapter_state_dict,
    get_lora_config,
    get_merged_lora_state_dict,
    init_lora_adapters,
    merge_lora_in_place,
)

SHAPE = dict(
    vocab_size=53,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=32,
    max_seq_len=32,
    intermediate_dim=40,
)


def _tiny_lora(rank=4, alpha=8.0, dropout=0.0, device=None):
    torch.manual_seed(0)
    with torch.device(device or "cpu"):
        model = lora_llama2(
            ["q_proj", "v_proj"],
            apply_lora_to_mlp=True,
            apply_lora_to_output=True,
            lora_rank=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            **SHAPE,
        )
    if device is None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_b" in name:
                    p.normal_(std=0.1)
    return model.eval()


def _plain_merge(sd, scaling):
    out = {}
    for k, v in sd.items():
        if "lora_" in k:
            continue
        prefix = k[: -len("weight")]
        if prefix + "lora_a.weight" in sd:
            a, b = sd[prefix + "lora_a.weight"], sd[prefix + "lora_b.weight"]
            v = v + scaling * b @ a
        out[k] = v
    return out


def test_merge_matches_a_plain_derivation_and_the_base_model_logits():
    model = _tiny_lora()
    sd = model.state_dict()
    merged = get_merged_lora_state_dict(model)
    expected = _plain_merge(sd, 8.0 / 4)
    assert merged.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], rtol=1e-6, atol=1e-6, msg=k)
    base = llama2(**SHAPE).eval()
    base.load_state_dict(merged)  # strict: exactly the base keys
    tokens = torch.randint(0, 53, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(base(tokens), model(tokens), rtol=1e-5, atol=1e-5)


def test_merge_reads_tensors_from_the_given_state_dict_and_attributes_from_the_model():
    # As on rank 0 of an FSDP run: the model's own parameters are not the full tensors (here
    # on the meta device), the gathered state dict is.
    sd = _tiny_lora().state_dict()
    meta = _tiny_lora(device="meta")
    merged = get_merged_lora_state_dict(meta, sd)
    expected = _plain_merge(sd, 2.0)
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], rtol=1e-6, atol=1e-6, msg=k)
    adapter = get_adapter_state_dict(meta, sd)
    assert list(adapter) == list(get_adapter_params(meta))
    assert all(adapter[k] is sd[k] for k in adapter)


def test_merge_is_fp32_and_cast_back():
    model = _tiny_lora().to(torch.bfloat16)
    sd = model.state_dict()
    merged = get_merged_lora_state_dict(model)
    key = "layers.0.attn.q_proj.weight"
    a, b = sd["layers.0.attn.q_proj.lora_a.weight"], sd["layers.0.attn.q_proj.lora_b.weight"]
    want = (sd[key].float() + 2.0 * (b.float() @ a.float())).to(torch.bfloat16)
    assert merged[key].dtype == torch.bfloat16
    torch.testing.assert_close(merged[key], want, rtol=0, atol=0)


def test_each_layer_merges_with_its_own_rank_and_alpha():
    model = _tiny_lora()
    model.layers[1].attn.q_proj = LoRALinear(32, 32, rank=2, alpha=1.0)
    with torch.no_grad():
        model.layers[1].attn.q_proj.lora_b.weight.normal_()
    sd = model.state_dict()
    merged = get_merged_lora_state_dict(model)
    p = "layers.1.attn.q_proj."
    want = sd[p + "weight"] + 0.5 * sd[p + "lora_b.weight"] @ sd[p + "lora_a.weight"]
    torch.testing.assert_close(merged[p + "weight"], want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"disagree on r: \[2, 4\]"):
        get_lora_config(model)


def test_merge_rejects_state_dicts_that_do_not_fit():
    model = _tiny_lora()
    sd = model.state_dict()
    broken = {k: v for k, v in sd.items() if k != "layers.0.attn.q_proj.lora_b.weight"}
    with pytest.raises(ValueError, match="layers.0.attn.q_proj.lora_b.weight"):
        get_merged_lora_state_dict(model, broken)
    extra = {**sd, "layers.0.mlp.extra.lora_a.weight": torch.zeros(4, 32)}
    with pytest.raises(ValueError, match="no LoRA layer"):
        get_merged_lora_state_dict(model, extra)
    with pytest.raises(ValueError, match="lacks adapter keys"):
        get_adapter_state_dict(model, broken)


class _TwoProj(torch.nn.Module):
    def __init__(self, q, v):
        super().__init__()
        self.q_proj, self.v_proj = q, v

    def forward(self, x):
        return self.v_proj(self.q_proj(x))


def test_merge_matches_peft_merge_and_unload():
    torch.manual_seed(0)
    dim, rank, alpha = 24, 4, 6.0
    ref = get_peft_model(
        _TwoProj(torch.nn.Linear(dim, dim, bias=False), torch.nn.Linear(dim, dim, bias=False)),
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"]),
    )
    ours = _TwoProj(*(LoRALinear(dim, dim, rank=rank, alpha=alpha) for _ in range(2)))
    with torch.no_grad():
        for name in ("q_proj", "v_proj"):
            layer = getattr(ref.base_model.model, name)
            layer.lora_B["default"].weight.normal_()
            mine = getattr(ours, name)
            mine.weight.copy_(layer.base_layer.weight)
            mine.lora_a.weight.copy_(layer.lora_A["default"].weight)
            mine.lora_b.weight.copy_(layer.lora_B["default"].weight)
    peft_merged = ref.merge_and_unload().state_dict()
    merged = get_merged_lora_state_dict(ours)
    assert merged.keys() == peft_merged.keys()
    for k in merged:
        torch.testing.assert_close(merged[k], peft_merged[k], rtol=1e-6, atol=1e-6, msg=k)
    assert get_lora_config(ours) == {
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
    }


def test_adapter_config_matches_the_state_dict_derivation():
    model = _tiny_lora(rank=4, alpha=8.0, dropout=0.05)
    config = get_lora_config(model)
    adapter = get_adapter_state_dict(model)
    # What the recipes derived before: the module name before lora_a/lora_b.weight.
    targets = sorted({k.split(".")[-3] for k in adapter})
    assert config == {"r": 4, "lora_alpha": 8.0, "lora_dropout": 0.05, "target_modules": targets}
    assert targets == ["output", "q_proj", "v_proj", "w1", "w2", "w3"]
    with pytest.raises(ValueError, match="no LoRALinear"):
        get_lora_config(llama2(**SHAPE))


def test_fresh_adapters_are_drawn_from_the_seed_alone():
    cpu, meta = _tiny_lora(), _tiny_lora(device="meta")
    fresh = init_lora_adapters(cpu, seed=3)
    # The plain derivation (the distributed recipe's draw before the kit): one generator,
    # adapters in get_adapter_params order, A kaiming-uniform as nn.Linear, B zero.
    gen = torch.Generator().manual_seed(3)
    expected = {}
    for name, param in get_adapter_params(cpu).items():
        t = torch.zeros(param.shape)
        if name.endswith("lora_a.weight"):
            torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=gen)
        expected[name] = t
    assert list(fresh) == list(expected)
    for k in expected:
        torch.testing.assert_close(fresh[k], expected[k], rtol=0, atol=0, msg=k)
    on_meta = init_lora_adapters(meta, seed=3)  # shapes only: a meta or sharded model is fine
    for k in expected:
        torch.testing.assert_close(on_meta[k], fresh[k], rtol=0, atol=0, msg=k)
    assert not torch.equal(
        init_lora_adapters(cpu, seed=4)["output.lora_a.weight"], fresh["output.lora_a.weight"]
    )
    cpu.load_state_dict(fresh, strict=False)
    tokens = torch.randint(0, 53, (2, 7))
    base = llama2(**SHAPE).eval()
    base.load_state_dict(get_merged_lora_state_dict(cpu))
    with torch.no_grad():  # B = 0: the model is the base model
        torch.testing.assert_close(cpu(tokens), base(tokens), rtol=0, atol=0)


def test_merge_lora_in_place_keeps_the_outputs():
    model = _tiny_lora()
    tokens = torch.randint(0, 53, (2, 9))
    with torch.no_grad():
        want = model(tokens)
        merged = merge_lora_in_place(model)
        assert merged is model
        assert not [m for m in model.modules() if isinstance(m, LoRALinear)]
        torch.testing.assert_close(model(tokens), want, rtol=1e-5, atol=1e-5)
