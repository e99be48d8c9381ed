# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The Llama2 converter unit: bit-exact round trips, Meta's layout derived independently,
PEFT renames, shapes and builder kwargs from config.json."""

import pytest
import torch

from tests.test_utils import tiny_hf_llama
from torchtune.models.llama2 import (
    expected_shapes,
    hf_config_to_builder_kwargs,
    hf_to_tune,
    llama2,
    lora_targets_to_hf,
    meta_params_to_hf_config,
    meta_to_tune,
    peft_to_tune_adapter_weights,
    tune_to_hf,
    tune_to_meta,
    tune_to_peft_adapter_weights,
)

TOKENS = torch.randint(0, 321, (2, 23), generator=torch.Generator().manual_seed(0))


def _assert_bit_exact(a, b):
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF (halves) -> Meta (interleaved) q/k rows by index: Meta row 2i + j of a head is
    HF row j * h_d/2 + i. Written out without the converter's view/transpose."""
    head_dim = w.shape[0] // n_heads
    rows = [
        h * head_dim + j * (head_dim // 2) + i
        for h in range(n_heads)
        for i in range(head_dim // 2)
        for j in range(2)
    ]
    return w[torch.tensor(rows)]


def _meta_state_dict(hf) -> dict:
    """A Meta ``consolidated.00.pth`` for an HF model, key by key from Meta's naming."""
    c = hf.config
    sd = hf.state_dict()
    out = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
        "rope.freqs": torch.randn(8),  # Meta's recomputable table: dropped
    }
    for i in range(c.num_hidden_layers):
        hf_p, p = f"model.layers.{i}.", f"layers.{i}."
        out[p + "attention.wq.weight"] = _meta_rows(
            sd[hf_p + "self_attn.q_proj.weight"], c.num_attention_heads
        )
        out[p + "attention.wk.weight"] = _meta_rows(
            sd[hf_p + "self_attn.k_proj.weight"], c.num_key_value_heads
        )
        out[p + "attention.wv.weight"] = sd[hf_p + "self_attn.v_proj.weight"]
        out[p + "attention.wo.weight"] = sd[hf_p + "self_attn.o_proj.weight"]
        out[p + "attention_norm.weight"] = sd[hf_p + "input_layernorm.weight"]
        out[p + "ffn_norm.weight"] = sd[hf_p + "post_attention_layernorm.weight"]
        for ours, theirs in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
            out[p + f"feed_forward.{ours}.weight"] = sd[hf_p + f"mlp.{theirs}.weight"]
    return out


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_meta_checkpoint_gives_hf_logits_and_round_trips(num_kv_heads):
    hf = tiny_hf_llama(0, num_kv_heads=num_kv_heads)
    meta = _meta_state_dict(hf)
    ours = llama2(**hf_config_to_builder_kwargs(hf.config.to_dict())).eval()
    ours.load_state_dict(meta_to_tune(meta, 4, num_kv_heads))
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), hf(TOKENS).logits, atol=1e-5, rtol=1e-5)
    # The q/k permutation is the only difference between Meta's and HF's weights.
    _assert_bit_exact(meta_to_tune(meta, 4, num_kv_heads), hf_to_tune(hf.state_dict()))
    del meta["rope.freqs"]
    _assert_bit_exact(tune_to_meta(meta_to_tune(meta, 4, num_kv_heads), 4, num_kv_heads), meta)


def test_meta_rotary_on_interleaved_pairs_equals_ours_on_halves():
    """Meta's rotary (complex multiply on interleaved pairs) on Meta's q/k rows gives the same
    attention scores as ours (halves) on the converted rows: the permutation is the right one."""
    torch.manual_seed(0)
    n_h, h_d, dim, s = 2, 8, 12, 5
    wq, wk = torch.randn(n_h * h_d, dim), torch.randn(n_h * h_d, dim)
    x = torch.randn(1, s, dim)
    theta = 1.0 / (10_000.0 ** (torch.arange(0, h_d, 2).float() / h_d))
    freqs = torch.polar(torch.ones(s, h_d // 2), torch.outer(torch.arange(s).float(), theta))

    def meta_rotary(t):  # Llama's reference apply_rotary_emb
        t = torch.view_as_complex(t.reshape(1, s, n_h, h_d // 2, 2))
        return torch.view_as_real(t * freqs[None, :, None]).flatten(3)

    from torchtune.modules import RotaryPositionalEmbeddings

    rope = RotaryPositionalEmbeddings(h_d, max_seq_len=s)
    sd = {"layers.0.attention.wq.weight": wq, "layers.0.attention.wk.weight": wk}
    ours = meta_to_tune(sd, n_h, n_h)
    q_meta = meta_rotary((x @ wq.T).view(1, s, n_h, h_d))
    k_meta = meta_rotary((x @ wk.T).view(1, s, n_h, h_d))
    q = rope((x @ ours["layers.0.attn.q_proj.weight"].T).view(1, s, n_h, h_d))
    k = rope((x @ ours["layers.0.attn.k_proj.weight"].T).view(1, s, n_h, h_d))
    scores_meta = torch.einsum("bshd,bthd->bhst", q_meta, k_meta)
    scores = torch.einsum("bshd,bthd->bhst", q, k)
    torch.testing.assert_close(scores, scores_meta, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_hf_is_a_pure_rename_both_ways(bias):
    hf = tiny_hf_llama(0, attention_bias=bias, mlp_bias=bias)
    hf_sd = hf.state_dict()
    ours = hf_to_tune(hf_sd)
    assert all(ours[k] is hf_sd[k2] for k, k2 in zip(ours, hf_sd))  # no tensor copied
    assert any(k.endswith("attn.output_proj.bias") for k in ours) == bias
    assert any(k.endswith("mlp.w2.bias") for k in ours) == bias
    _assert_bit_exact(tune_to_hf(ours), hf_sd)
    moe = "model.layers.0.mlp.experts.0.gate_proj.weight"  # a Mixtral key
    with pytest.raises(ValueError, match=f"Unexpected key '{moe}'"):
        hf_to_tune({moe: torch.zeros(3)})
    with pytest.raises(ValueError, match="Unexpected key 'layers.0.attn.q_proj.bias'"):
        tune_to_meta({"layers.0.attn.q_proj.bias": torch.zeros(3)}, 4, 2)


def test_peft_adapter_round_trip_is_bit_exact_and_names_peft_modules():
    g = torch.Generator().manual_seed(0)
    adapter = {
        f"layers.{i}.{m}.lora_{ab}.weight": torch.randn(4, 7, generator=g)
        for i in (0, 2)
        for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.output_proj", "mlp.w1")
        for ab in "ab"
    }
    adapter["output.lora_b.weight"] = torch.randn(9, 4, generator=g)
    peft = tune_to_peft_adapter_weights(adapter)
    assert "base_model.model.model.layers.2.self_attn.o_proj.lora_A.weight" in peft
    assert "base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight" in peft
    assert "base_model.model.lm_head.lora_B.weight" in peft
    _assert_bit_exact(peft_to_tune_adapter_weights(peft), adapter)
    assert lora_targets_to_hf(["w3", "mlp", "q_proj", "output"]) == [
        "up_proj",
        "gate_proj",
        "down_proj",
        "q_proj",
        "lm_head",
    ]
    with pytest.raises(ValueError, match="Unknown LoRA target module 'wq'"):
        lora_targets_to_hf(["wq"])


@pytest.mark.parametrize(
    "config",
    [
        {},
        dict(attention_bias=True, head_dim=24, num_kv_heads=1),
        dict(tie_word_embeddings=True, rope_theta=500_000.0),
    ],
    ids=["plain", "bias_head_dim", "tied_theta"],
)
def test_config_gives_builder_kwargs_and_shapes(config):
    hf = tiny_hf_llama(0, **config)
    cfg = hf.config.to_dict()
    kwargs = hf_config_to_builder_kwargs(cfg)
    ours = llama2(**kwargs)
    assert kwargs["rope_base"] == config.get("rope_theta", 10_000.0)
    assert ours.layers[0].attn.pos_embeddings.base == kwargs["rope_base"]
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert expected_shapes(cfg) == shapes
    # HF's own parameter shapes, renamed.
    hf_shapes = hf_to_tune({k: v for k, v in hf.state_dict().items()})
    assert {k: tuple(v.shape) for k, v in hf_shapes.items()} == shapes


def test_config_errors_name_the_setting():
    cfg = tiny_hf_llama(0).config.to_dict()
    for bad, match in (
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        # The full list of refusals, one message each: tests/torchtune/models/test_llama3.py.
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}, "rope_type 'yarn'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
        ({"num_hidden_layers": None}, "lacks 'num_hidden_layers'"),
    ):
        with pytest.raises(ValueError, match=match):
            hf_config_to_builder_kwargs({**cfg, **bad})
    with pytest.raises(ValueError, match="lacks 'hidden_size'"):
        expected_shapes({k: v for k, v in cfg.items() if k != "hidden_size"})


def test_meta_params_describe_the_same_model_as_config_json():
    params = {"dim": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 321}
    cfg = meta_params_to_hf_config(params)
    shapes = expected_shapes(cfg)
    full = expected_shapes(tiny_hf_llama(0).config.to_dict())
    # Meta leaves the MLP width implicit, so those entries are not checked.
    assert shapes == {k: v for k, v in full.items() if ".mlp." not in k}
    assert "vocab_size" not in meta_params_to_hf_config({**params, "vocab_size": -1})
    assert meta_params_to_hf_config({**params, "n_kv_heads": None})["num_key_value_heads"] == 4
    with pytest.raises(ValueError, match="params.json lacks 'n_heads'"):
        meta_params_to_hf_config({"dim": 64, "n_layers": 3})
