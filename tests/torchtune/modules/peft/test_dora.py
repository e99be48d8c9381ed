# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""DoRA (``LoRALinear(use_dora=True)``) against PEFT's ``use_dora=True`` layer: outputs,
gradients, the merge, the initial magnitude and the exported adapter."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

from tests.test_utils import tiny_hf_llama
from torchtune.models.llama2 import (
    hf_to_tune,
    lora_llama2,
    tune_to_peft_adapter_config,
    tune_to_peft_adapter_weights,
)
from torchtune.modules.peft import (
    LoRALinear,
    get_adapter_params,
    get_lora_config,
    get_merged_lora_state_dict,
    init_lora_adapters,
)


class _Wrap(torch.nn.Module):
    def __init__(self, proj: torch.nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def _peft_and_ours(in_dim, out_dim, rank, alpha, use_bias, dropout):
    """A PEFT DoRA layer with random B and magnitude, and ours holding the same tensors."""
    torch.manual_seed(0)
    ref = get_peft_model(
        _Wrap(torch.nn.Linear(in_dim, out_dim, bias=use_bias)),
        LoraConfig(
            r=rank,
            lora_alpha=alpha,
            target_modules=["proj"],
            lora_dropout=dropout,
            use_dora=True,
        ),
    )
    layer = ref.base_model.model.proj
    with torch.no_grad():  # B = 0 and m = ||W|| would hide the DoRA terms
        layer.lora_B["default"].weight.normal_()
        layer.lora_magnitude_vector["default"].weight.mul_(1.0 + 0.3 * torch.rand(out_dim))
    ours = LoRALinear(
        in_dim, out_dim, rank=rank, alpha=alpha, dropout=dropout, use_bias=use_bias, use_dora=True
    )
    sd = {
        "weight": layer.base_layer.weight,
        "lora_a.weight": layer.lora_A["default"].weight,
        "lora_b.weight": layer.lora_B["default"].weight,
        "magnitude": layer.lora_magnitude_vector["default"].weight,
    }
    if use_bias:
        sd["bias"] = layer.base_layer.bias
    ours.load_state_dict({k: v.detach().clone() for k, v in sd.items()})
    peft_params = [sd[k] for k in ("lora_a.weight", "lora_b.weight", "magnitude")]
    return ref, ours, peft_params


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_dora_linear_matches_peft_outputs_and_gradients(use_bias, dropout):
    ref, ours, peft_params = _peft_and_ours(24, 37, 4, 6.0, use_bias, dropout)
    ours_params = [ours.lora_a.weight, ours.lora_b.weight, ours.magnitude]
    x = torch.randn(3, 5, 24)
    w = torch.randn(3, 5, 37)  # a loss that weighs every output differently
    for train in (True, False):  # PEFT's base term differs under active dropout
        ref.train(train), ours.train(train)
        torch.manual_seed(1)  # the same dropout mask: both draw once, on x
        want = ref(x)
        torch.manual_seed(1)
        got = ours(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        want_g = torch.autograd.grad((want * w).sum(), peft_params)
        got_g = torch.autograd.grad((got * w).sum(), ours_params)
        for name, g, e in zip(("lora_a", "lora_b", "magnitude"), got_g, want_g):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=name)


def test_dora_norm_is_detached():
    """The row norm gets no gradient (paper, section 4.3): B's gradient is the one through
    the numerator only, ``scale * s * g^T (A x)`` summed; a derivation in plain torch."""
    torch.manual_seed(0)
    layer = LoRALinear(8, 6, rank=2, alpha=4.0, use_dora=True)
    with torch.no_grad():
        layer.lora_b.weight.normal_()
        layer.magnitude.mul_(1.5)
    x, g = torch.randn(5, 8), torch.randn(5, 6)
    (layer(x) * g).sum().backward()
    w, a, b, m = (
        t.detach()
        for t in (layer.weight, layer.lora_a.weight, layer.lora_b.weight, layer.magnitude)
    )
    scale = m / torch.linalg.norm(w + 2.0 * b @ a, dim=1)
    want_b = (scale[None] * g).T @ (x @ a.T) * 2.0
    torch.testing.assert_close(layer.lora_b.weight.grad, want_b, rtol=1e-5, atol=1e-6)


def test_dora_merge_matches_peft_merge_and_unload():
    ref, ours, _ = _peft_and_ours(24, 37, 4, 6.0, True, 0.0)
    merged = get_merged_lora_state_dict(ours)
    peft_merged = ref.merge_and_unload().proj.state_dict()
    assert merged.keys() == {"weight", "bias"}
    for k in merged:
        torch.testing.assert_close(merged[k], peft_merged[k], rtol=1e-6, atol=1e-6, msg=k)


def test_fresh_magnitude_is_the_base_row_norm_as_peft_sets_it():
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 37, bias=False)
    ref = get_peft_model(
        _Wrap(base), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], use_dora=True)
    )
    peft_m = ref.base_model.model.proj.lora_magnitude_vector["default"].weight
    model = _Wrap(LoRALinear(24, 37, rank=4, alpha=8.0, use_dora=True))
    model.load_state_dict({"proj.weight": base.weight.detach()}, strict=False)
    fresh = init_lora_adapters(model, seed=0)
    assert list(fresh) == ["proj.lora_a.weight", "proj.lora_b.weight", "proj.magnitude"]
    torch.testing.assert_close(fresh["proj.magnitude"], peft_m.detach(), rtol=0, atol=0)
    # From the base state dict (rank 0 of a sharded model): the same magnitude.
    with torch.device("meta"):
        meta = _Wrap(LoRALinear(24, 37, rank=4, alpha=8.0, use_dora=True))
    from_sd = init_lora_adapters(meta, seed=0, base_state_dict={"proj.weight": base.weight})
    for k in fresh:
        torch.testing.assert_close(from_sd[k], fresh[k], rtol=0, atol=0, msg=k)
    with pytest.raises(ValueError, match="'proj'.*base_state_dict"):
        init_lora_adapters(meta, seed=0)
    with pytest.raises(ValueError, match="proj.weight"):
        init_lora_adapters(meta, seed=0, base_state_dict={})


def test_dora_is_an_adapter_parameter_and_in_the_config():
    layer = LoRALinear(8, 6, rank=2, alpha=4.0, use_dora=True)
    assert layer.adapter_params() == ["lora_a.weight", "lora_b.weight", "magnitude"]
    model = _Wrap(layer)
    assert list(get_adapter_params(model)) == [
        "proj.lora_a.weight",
        "proj.lora_b.weight",
        "proj.magnitude",
    ]
    assert get_lora_config(model)["use_dora"] is True
    assert "use_dora" not in get_lora_config(_Wrap(LoRALinear(8, 6, rank=2, alpha=4.0)))


def test_dora_adapter_exports_to_peft_with_our_logits(tmp_path):
    """Our adapter under PEFT's key names (``lora_magnitude_vector``) and config
    (``use_dora: true``) loads with ``PeftModel.from_pretrained`` and gives our logits."""
    hf = tiny_hf_llama(vocab_size=97, hidden_size=48, num_layers=2, intermediate_size=72)
    ours = lora_llama2(
        ["q_proj", "v_proj", "output_proj"],
        apply_lora_to_mlp=True,
        vocab_size=97,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=48,
        intermediate_dim=72,
        max_seq_len=64,
        lora_rank=4,
        lora_alpha=8.0,
        use_dora=True,
    ).eval()
    ours.load_state_dict(hf_to_tune(hf.state_dict()), strict=False)
    adapter = init_lora_adapters(ours, seed=0)
    gen = torch.Generator().manual_seed(1)
    for k, v in adapter.items():  # a trained-looking adapter: B and m away from their init
        if k.endswith("lora_b.weight"):
            v.normal_(generator=gen)
        elif k.endswith("magnitude"):
            v.mul_(1.0 + 0.2 * torch.rand(v.shape, generator=gen))
    ours.load_state_dict(adapter, strict=False)
    peft_sd = tune_to_peft_adapter_weights(adapter)
    assert sum(k.endswith(".lora_magnitude_vector") for k in peft_sd) == 2 * 6
    save_file(peft_sd, tmp_path / "adapter_model.safetensors")
    peft_config = tune_to_peft_adapter_config(get_lora_config(ours))
    assert peft_config["use_dora"] is True
    (tmp_path / "adapter_config.json").write_text(json.dumps(peft_config))
    tokens = torch.randint(0, 97, (2, 13), generator=gen)
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(hf, tmp_path).eval()
        torch.testing.assert_close(
            peft_model(input_ids=tokens).logits, ours(tokens), rtol=0, atol=1e-5
        )
    from torchtune.models.llama2 import peft_to_tune_adapter_weights

    back = peft_to_tune_adapter_weights(peft_sd)
    assert back.keys() == adapter.keys()
