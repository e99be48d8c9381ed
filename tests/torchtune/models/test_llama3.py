# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Llama 3.x / SmolLM (HF ``model_type: llama``) from config.json against transformers'
``LlamaForCausalLM``: scaled RoPE, GQA, explicit head_dim, biases, tied output; the refusals;
:func:`torchtune.models.from_hf_config`; the size presets."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from tests.test_utils import tiny_hf_llama, tiny_hf_llama_config
from torchtune import config as tt_config
from torchtune.models import from_hf_config, llama3
from torchtune.models.llama2 import hf_config_to_builder_kwargs, hf_to_tune, tune_to_hf
from torchtune.modules.peft import LoRALinear
from torchtune.modules.position_embeddings import rope_inv_freq

ATOL, RTOL = 1e-5, 1e-5
# 48 positions, past the original_max_position_embeddings (32) of the llama3 scaling below.
SEQ = 48
TOKENS = torch.randint(0, 321, (2, SEQ), generator=torch.Generator().manual_seed(0))

# With head_dim 24 and theta 1e4 the wavelengths 2 pi theta^(2i/24) are 6.3, 13.5, 29.2,
# 62.8, ...: with original 32, high_freq_factor 4, low_freq_factor 1 (bands 8 and 32) the
# table has kept, blended and divided frequencies.
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
LINEAR = {"rope_type": "linear", "factor": 2.5}
CONFIGS = {
    # GQA, head_dim != hidden / heads, tied, llama3 scaling, all biases.
    "llama3_tied_biases": dict(
        head_dim=24,
        num_kv_heads=2,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        rope_scaling=LLAMA3,
    ),
    # MQA, untied, linear scaling, mlp bias only, theta 5e5, pretraining_tp that HF ignores.
    "linear_untied": dict(
        num_kv_heads=1,
        mlp_bias=True,
        rope_theta=500_000.0,
        rope_scaling=LINEAR,
        pretraining_tp=2,
    ),
    # Llama 3.1-like: llama3 scaling, untied, attention bias, odd width.
    "llama3_untied": dict(
        head_dim=24, attention_bias=True, intermediate_size=70, rope_scaling=LLAMA3
    ),
}


def _tiny_hf(**config):
    # LlamaConfig writes rope_theta into the rope_scaling dict it is given: hand it a copy.
    return tiny_hf_llama(0, **copy.deepcopy(config))


def _loss(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), TOKENS[:, 1:].flatten())


def _keep_embedding_output(module: torch.nn.Module, box: list):
    def hook(_, __, out):
        out.retain_grad()
        box.append(out)

    return module.register_forward_hook(hook)


def _assert_logits_and_grads_match(hf, ours):
    hf_emb, our_emb = [], []
    _keep_embedding_output(hf.model.embed_tokens, hf_emb)
    _keep_embedding_output(ours.tok_embeddings, our_emb)
    logits, expected = ours(TOKENS), hf(TOKENS).logits
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL)
    _loss(logits).backward()
    _loss(expected).backward()
    torch.testing.assert_close(our_emb[0].grad, hf_emb[0].grad, atol=ATOL, rtol=RTOL)
    hf_grads = tune_to_hf({n: p.grad for n, p in ours.named_parameters()})
    hf_named = dict(hf.named_parameters())
    assert set(hf_grads) == set(hf_named)
    for name, grad in hf_grads.items():
        torch.testing.assert_close(grad, hf_named[name].grad, atol=ATOL, rtol=RTOL, msg=name)


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_logits_and_gradients_match_hf(config):
    hf = _tiny_hf(**config)
    cfg = {**hf.config.to_dict(), "model_type": "llama"}
    ours = from_hf_config(cfg).eval()
    ours.load_state_dict(hf_to_tune(hf.state_dict()))
    tied = config.get("tie_word_embeddings", False)
    assert (ours.output.weight is ours.tok_embeddings.weight) == tied
    biases = [n for n, _ in ours.named_parameters() if n.endswith(".bias")]
    per_layer = 4 * config.get("attention_bias", False) + 3 * config.get("mlp_bias", False)
    assert len(biases) == 3 * per_layer
    _assert_logits_and_grads_match(hf, ours)


@pytest.mark.parametrize("scaling", [None, LLAMA3, LINEAR], ids=["none", "llama3", "linear"])
def test_rope_frequencies_equal_transformers(scaling):
    hf = _tiny_hf(head_dim=24, rope_scaling=scaling)
    want = hf.model.rotary_emb.inv_freq
    got = rope_inv_freq(24, 10_000.0, scaling)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    if scaling is LLAMA3:
        plain = rope_inv_freq(24, 10_000.0)
        wavelen = 2 * math.pi / plain
        kept, divided = wavelen < 8, wavelen > 32
        blended = ~kept & ~divided
        assert kept.any() and divided.any() and blended.any()  # all three regimes are tested
        torch.testing.assert_close(got[kept], plain[kept], atol=0, rtol=0)
        torch.testing.assert_close(got[divided], plain[divided] / 8, atol=0, rtol=0)
        assert ((got[blended] < plain[blended]) & (got[blended] > plain[blended] / 8)).all()


def _hub_layout(written, key):
    """transformers 5's config.json in the hub's layout: rope_theta on top, rope_scaling
    naming its type under ``key`` ("type" or "rope_type")."""
    cfg = {k: v for k, v in written.items() if k != "rope_parameters"}
    params = written["rope_parameters"]
    rope = {k: v for k, v in params.items() if k not in ("rope_type", "rope_theta")}
    return {
        **cfg,
        "rope_theta": params["rope_theta"],
        "rope_scaling": {key: params["rope_type"], **rope},
    }


@pytest.mark.parametrize("scaling", [LLAMA3, LINEAR], ids=["llama3", "linear"])
def test_both_config_layouts_give_the_same_model(tmp_path, scaling):
    hf = _tiny_hf(head_dim=24, rope_theta=500_000.0, rope_scaling=scaling)
    hf.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    # transformers 5 writes one rope_parameters dict holding theta and the scaling.
    assert written["rope_parameters"]["rope_type"] == scaling["rope_type"]
    assert written["rope_parameters"]["rope_theta"] == 500_000.0
    assert not written.get("rope_scaling") and not written.get("rope_theta")
    want = hf_config_to_builder_kwargs(written)
    assert want["rope_base"] == 500_000.0 and want["rope_scaling"] == scaling
    for key in ("type", "rope_type"):
        assert hf_config_to_builder_kwargs(_hub_layout(written, key)) == want
    # llama3 without original_max_position_embeddings falls back to max_position_embeddings,
    # as transformers does.
    if scaling is LLAMA3:
        hub = _hub_layout(written, "rope_type")
        del hub["rope_scaling"]["original_max_position_embeddings"]
        got = hf_config_to_builder_kwargs(hub)["rope_scaling"]
        assert got["original_max_position_embeddings"] == hub["max_position_embeddings"]
    # Through from_hf_config on the folder save_pretrained wrote.
    ours = from_hf_config(tmp_path).eval()
    ours.load_state_dict(hf_to_tune(hf.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), hf(TOKENS).logits, atol=ATOL, rtol=RTOL)


REFUSED = {
    "yarn": ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
    "dynamic": ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
    "longrope": (
        {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
        "rope_parameters has rope_type 'longrope'",
    ),
    "unknown_rope": ({"rope_scaling": {"type": "spiral"}}, "rope_type 'spiral'"),
    "two_scalings": (
        {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_parameters": LLAMA3},
        "two RoPE scalings that disagree",
    ),
    "llama3_lacks_key": (
        {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}},
        "rope_type 'llama3' lacks 'high_freq_factor'",
    ),
    "linear_lacks_factor": ({"rope_scaling": {"type": "linear"}}, "lacks 'factor'"),
    "partial_rotary": ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    "num_local_experts": ({"num_local_experts": 8}, "num_local_experts=8: mixture-of-experts"),
    "num_experts": ({"num_experts": 60}, "num_experts=60"),
    "num_experts_per_tok": ({"num_experts_per_tok": 2}, "num_experts_per_tok=2"),
    "quantization": (
        {"quantization_config": {"quant_method": "gptq", "bits": 4}},
        r"quantization_config \(gptq\)",
    ),
    "hidden_act": ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
}


def _plain_config():
    cfg = tiny_hf_llama_config().to_dict()
    cfg.pop("rope_parameters", None)
    return {**cfg, "model_type": "llama", "rope_theta": 10_000.0}


@pytest.mark.parametrize("bad, match", list(REFUSED.values()), ids=list(REFUSED))
def test_unimplemented_settings_are_refused_by_name(bad, match):
    cfg = {**_plain_config(), **bad}
    with pytest.raises(ValueError, match=match):
        hf_config_to_builder_kwargs(cfg)
    with pytest.raises(ValueError, match=r"the config dict: .*" + match):
        from_hf_config(cfg)


def test_unknown_or_missing_model_type_and_bad_files_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown HF model_type 'mixtral'; supported: \["):
        from_hf_config({**_plain_config(), "model_type": "mixtral"})
    no_type = {k: v for k, v in _plain_config().items() if k != "model_type"}
    with pytest.raises(ValueError, match="the config dict has no 'model_type'"):
        from_hf_config(no_type)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "config.json")):
        from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'} is not valid JSON"):
        from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a list, not a JSON object"):
        from_hf_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({**_plain_config(), "num_experts": 4}))
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}: config.json has num_exp"):
        from_hf_config(str(tmp_path))


def test_pretraining_tp_is_accepted_because_transformers_ignores_it():
    # transformers 5's LlamaForCausalLM no longer splits the projections by pretraining_tp
    # (it never changed the math); test_logits_and_gradients_match_hf[linear_untied] runs
    # with pretraining_tp=2 against it.
    assert hf_config_to_builder_kwargs({**_plain_config(), "pretraining_tp": 4})


def test_from_hf_config_lora_and_max_seq_len(tmp_path):
    hf = _tiny_hf(head_dim=24, mlp_bias=True, rope_scaling=LLAMA3)
    hf.save_pretrained(tmp_path)
    base = from_hf_config(tmp_path / "config.json")
    assert base.max_seq_len == 256 and base.layers[0].attn.pos_embeddings.max_seq_len == 256
    assert from_hf_config(tmp_path, max_seq_len=64).layers[0].attn.pos_embeddings.cache.shape[0]
    short = from_hf_config(tmp_path, max_seq_len=64)
    assert short.max_seq_len == 64 and short.layers[0].attn.pos_embeddings.cache.shape[0] == 64
    lora = from_hf_config(
        tmp_path,
        lora_attn_modules=["q_proj", "v_proj"],
        apply_lora_to_mlp=True,
        lora_rank=2,
        lora_alpha=4.0,
    ).eval()
    layer = lora.layers[0]
    assert isinstance(layer.attn.q_proj, LoRALinear) and layer.attn.q_proj.rank == 2
    assert not isinstance(layer.attn.k_proj, LoRALinear)
    assert isinstance(layer.mlp.w2, LoRALinear) and layer.mlp.w2.bias is not None
    assert not isinstance(lora.output, LoRALinear)
    missing, unexpected = lora.load_state_dict(hf_to_tune(hf.state_dict()), strict=False)
    assert not unexpected and missing and all(".lora_" in k for k in missing)
    with torch.no_grad():  # lora_b starts at zero: the base model's logits
        torch.testing.assert_close(lora(TOKENS), hf(TOKENS).logits, atol=ATOL, rtol=RTOL)
    out_only = from_hf_config(tmp_path, apply_lora_to_output=True, lora_rank=2, lora_alpha=2)
    assert isinstance(out_only.output, LoRALinear)
    with pytest.raises(ValueError, match="LoRA needs lora_rank and lora_alpha; got lora_rank=N"):
        from_hf_config(tmp_path, lora_attn_modules=["q_proj"])
    with pytest.raises(ValueError, match="lora_rank=8 / lora_alpha=None given but nothing"):
        from_hf_config(tmp_path, lora_rank=8)
    with pytest.raises(ValueError, match=r"Unknown lora_attn_modules \['wq'\]"):
        from_hf_config(tmp_path, lora_attn_modules=["wq"], lora_rank=2, lora_alpha=2)


def test_from_hf_config_from_yaml_validates_and_builds(tmp_path):
    _tiny_hf(rope_scaling=LINEAR).save_pretrained(tmp_path)
    cfg = OmegaConf.create(
        {
            "model": {
                "_component_": "torchtune.models.from_hf_config",
                "config": str(tmp_path),
                "max_seq_len": 32,
                "lora_attn_modules": ["q_proj", "output_proj"],
                "lora_rank": 4,
                "lora_alpha": 8,
            }
        }
    )
    tt_config.validate(cfg)
    model = tt_config.instantiate(cfg.model)
    assert model.max_seq_len == 32 and isinstance(model.layers[1].attn.output_proj, LoRALinear)
    cfg.model.lora_rnak = 4  # a typo is caught before anything is built
    with pytest.raises(tt_config.ConfigError, match="lora_rnak"):
        tt_config.validate(cfg)


# Each preset's numbers as the model's config.json on the hub has them (hub layout), written
# here from the published files; the hub is not reachable from the tests.
_L3 = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}
_L3["original_max_position_embeddings"] = 8192
_COMMON = {"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5}
PRESET_CONFIGS = {
    "llama3_1_8b": {
        **{"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336},
        **{"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8},
        **{"rope_theta": 500000.0, "rope_scaling": {**_L3, "factor": 8.0}},
        **{"max_position_embeddings": 131072, "tie_word_embeddings": False},
    },
    "llama3_2_1b": {
        **{"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192},
        **{"num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8},
        **{"head_dim": 64, "rope_theta": 500000.0, "rope_scaling": {**_L3, "factor": 32.0}},
        **{"max_position_embeddings": 131072, "tie_word_embeddings": True},
    },
    "llama3_2_3b": {
        **{"vocab_size": 128256, "hidden_size": 3072, "intermediate_size": 8192},
        **{"num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8},
        **{"head_dim": 128, "rope_theta": 500000.0, "rope_scaling": {**_L3, "factor": 32.0}},
        **{"max_position_embeddings": 131072, "tie_word_embeddings": True},
    },
    "smollm2_135m": {
        **{"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536},
        **{"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3},
        **{"rope_theta": 100000.0, "max_position_embeddings": 8192},
        **{"tie_word_embeddings": True},
    },
    "smollm2_1_7b": {
        **{"vocab_size": 49152, "hidden_size": 2048, "intermediate_size": 8192},
        **{"num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 32},
        **{"rope_theta": 130000.0, "max_position_embeddings": 8192},
        **{"tie_word_embeddings": True},
    },
}


def _describe(model):
    """Everything a preset fixes: shapes, tie, heads, norm eps, RoPE settings."""
    layer = model.layers[0]
    rope = layer.attn.pos_embeddings
    return {
        "shapes": {k: tuple(v.shape) for k, v in model.state_dict().items()},
        "tied": model.output.weight is model.tok_embeddings.weight,
        "heads": (layer.attn.num_heads, layer.attn.num_kv_heads, layer.attn.head_dim),
        "eps": (model.norm.eps, layer.sa_norm.eps),
        "rope": (rope.base, rope.scaling, rope.max_seq_len),
        "lora": sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear)),
    }


@pytest.mark.parametrize("name", list(PRESET_CONFIGS))
def test_presets_equal_from_hf_config_on_the_published_numbers(name):
    cfg = {**_COMMON, **PRESET_CONFIGS[name]}
    lora_args = dict(lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True)
    with torch.device("meta"):  # sizes only: nothing is allocated
        assert _describe(getattr(llama3, name)()) == _describe(
            from_hf_config(cfg, max_seq_len=8192)
        )
        lora = getattr(llama3, f"lora_{name}")(**lora_args, lora_rank=4, lora_alpha=8)
        want = from_hf_config(cfg, max_seq_len=2048, **lora_args, lora_rank=4, lora_alpha=8)
        assert _describe(
            getattr(llama3, f"lora_{name}")(
                **lora_args, max_seq_len=2048, lora_rank=4, lora_alpha=8
            )
        ) == (_describe(want))
        assert lora.layers[0].attn.q_proj.rank == 4
