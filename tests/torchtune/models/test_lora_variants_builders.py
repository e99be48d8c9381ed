# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``use_dora`` / ``quantize_base`` / ``quantize_double`` on every LoRA builder: the family
rows, the size presets and ``from_hf_config``; QLoRA against LoRA on the dequantized weights
for the families with fused projections (Phi-3) and soft-capped / scaled paths (Gemma)."""

import importlib
import inspect

import pytest
import torch

from tests.test_utils import tiny_hf_llama_config
from tests.torchtune.models import test_phi3
from tests.torchtune.models.test_hf_families import BASE, CASES, TOKENS
from torchtune.models import from_hf_config
from torchtune.models._families import FAMILIES
from torchtune.modules import TransformerDecoder
from torchtune.modules.peft import (
    LoRALinear,
    NF4Linear,
    get_adapter_params,
    init_lora_adapters,
)

VARIANT_KWARGS = {"use_dora": False, "quantize_base": False, "quantize_double": True}


def _builds_a_model(fn) -> bool:
    return callable(fn) and inspect.signature(fn).return_annotation is TransformerDecoder


def _lora_builders():
    for family in ("llama2", "llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"):
        module = importlib.import_module(f"torchtune.models.{family}")
        for name in getattr(module, "__all__", dir(module)):
            fn = getattr(module, name)
            if name.startswith("lora_") and _builds_a_model(fn):
                yield f"{family}.{name}", getattr(module, name)
    for row in FAMILIES:
        yield f"FAMILIES[{row.name}].lora_builder", row.lora_builder


BUILDERS = list(_lora_builders())


@pytest.mark.parametrize("name,builder", BUILDERS, ids=[n for n, _ in BUILDERS])
def test_every_lora_builder_takes_the_variant_flags_as_keywords(name, builder):
    params = inspect.signature(builder).parameters
    for key, default in VARIANT_KWARGS.items():
        assert key in params, f"{name} lacks {key}"
        assert params[key].kind is inspect.Parameter.KEYWORD_ONLY, f"{name}.{key}"
        assert params[key].default is default, f"{name}.{key}"


def _is_preset(builder) -> bool:
    """A size preset: nothing to give but the modules (and Phi's LongRoPE factors)."""
    required = [
        k
        for k, p in inspect.signature(builder).parameters.items()
        if p.default is inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD
    ]
    return set(required) <= {"lora_attn_modules", "short_factor", "long_factor"}


PRESETS = [(n, b) for n, b in BUILDERS if not n.startswith("FAMILIES[") and _is_preset(b)]


@pytest.mark.parametrize("name,builder", PRESETS, ids=[n for n, _ in PRESETS])
def test_every_lora_preset_passes_the_variant_flags_on_to_decoder(name, builder, monkeypatch):
    """Each preset hands its flags, unchanged, to the shared builder (not built: a stand-in
    ``decoder`` records its arguments, so the published sizes cost nothing)."""
    seen = {}
    for family in ("llama2", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"):
        monkeypatch.setattr(
            f"torchtune.models.{family}._component_builders.decoder",
            lambda **kwargs: seen.update(kwargs),
        )
    params = inspect.signature(builder).parameters
    factors = {k: [1.0] * 3 for k in ("short_factor", "long_factor") if k in params}
    attn = ["qkv_proj"] if name.startswith("phi3.") else ["q_proj"]
    flags = dict(use_dora=True, quantize_base=True, quantize_double=False)
    builder(attn, **factors, **flags)
    assert {k: seen.get(k) for k in flags} == flags, name


def _hf_config(case: str) -> dict:
    """A tiny HF ``config.json`` dict: a case of test_hf_families or (``phi3-*``) test_phi3."""
    import transformers

    if case.startswith("phi3-"):
        extra = test_phi3.CASES[case[len("phi3-") :]]
        return transformers.Phi3Config(**{**test_phi3.BASE, **extra}).to_dict()
    _, config_cls, extra = CASES[case]
    return getattr(transformers, config_cls)(**{**BASE, **extra}).to_dict()


def _configs():
    yield "llama", tiny_hf_llama_config(hidden_size=48, intermediate_size=72).to_dict()
    for case in ("qwen2-untied", "qwen3-head-dim", "mistral-window", "gemma2-all", "gemma3-all"):
        yield case, _hf_config(case)
    for case in test_phi3.CASES:
        yield f"phi3-{case}", _hf_config(f"phi3-{case}")


def _lora_kwargs(config: dict) -> dict:
    # Phi-3 fuses q, k and v: its one adapter sits on qkv_proj, w13 stays a plain NF4 layer.
    attn = ["qkv_proj"] if config["model_type"] == "phi3" else ["q_proj", "v_proj"]
    return dict(lora_attn_modules=attn, lora_rank=4, lora_alpha=8.0)


def _assert_same_gemma_paths(model: TransformerDecoder, reference: TransformerDecoder) -> None:
    """The knobs QLoRA must leave alone: attention scale and soft-cap, output soft-cap, the
    embedding scale, the sandwich norms."""
    assert model.output_softcap == reference.output_softcap
    assert type(model.tok_embeddings) is type(reference.tok_embeddings)
    assert getattr(model.tok_embeddings, "scale", None) == getattr(
        reference.tok_embeddings, "scale", None
    )
    for layer, ref in zip(model.layers, reference.layers):
        assert (layer.attn.scale, layer.attn.softcap) == (ref.attn.scale, ref.attn.softcap)
        assert layer.attn.sliding_window == ref.attn.sliding_window
        for norm in ("post_attn_norm", "post_mlp_norm"):
            assert type(getattr(layer, norm)) is type(getattr(ref, norm))


@pytest.mark.parametrize(
    "case,config", list(_configs()), ids=lambda x: x if isinstance(x, str) else ""
)
def test_from_hf_config_builds_qdora_on_every_family(case, config):
    """Decoder-layer linears in NF4, the adapted ones DoRA; with fresh adapters the model is
    the base model on its dequantized weights (built plainly from the same config)."""
    torch.manual_seed(0)
    base = from_hf_config(config).eval()
    lora = _lora_kwargs(config)
    qdora = from_hf_config(config, **lora, use_dora=True, quantize_base=True).eval()
    linears = ("_proj", ".w1", ".w2", ".w3", ".w13")
    for name, m in qdora.named_modules():
        if name.startswith("layers.") and name.endswith(linears):
            if isinstance(m, LoRALinear):
                assert m.use_dora and m.quantize_base, name
            else:
                assert isinstance(m, NF4Linear), name
    assert isinstance(qdora.output, torch.nn.Linear) and isinstance(
        qdora.tok_embeddings, torch.nn.Embedding
    )
    if config["model_type"] == "phi3":  # DoRA on the fused module: one magnitude per q/k/v row
        attn, mlp = qdora.layers[0].attn, qdora.layers[0].mlp
        rows = (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * (
            config["hidden_size"] // config["num_attention_heads"]
        )
        assert isinstance(attn.qkv_proj, LoRALinear)
        assert attn.qkv_proj.magnitude.shape == (rows,)
        assert attn.qkv_proj.base_weight().shape == (rows, config["hidden_size"])
        assert isinstance(mlp.w13, NF4Linear)
        assert qdora.state_dict()["layers.0.mlp.w13.weight"].shape == (
            2 * config["intermediate_size"],
            config["hidden_size"],
        )
    _assert_same_gemma_paths(qdora, base)
    missing, unexpected = qdora.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all("lora_" in k or k.endswith("magnitude") for k in missing)
    qdora.load_state_dict(init_lora_adapters(qdora, seed=0), strict=False)
    dequantized = from_hf_config(config).eval()
    dequantized.load_state_dict(
        {k: v for k, v in qdora.state_dict().items() if "lora_" not in k and "magnitude" not in k}
    )
    tokens = TOKENS.clamp(max=config["vocab_size"] - 1)
    with torch.no_grad():
        torch.testing.assert_close(qdora(tokens), dequantized(tokens), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(dequantized(tokens), base(tokens))  # it was quantized
    plain = from_hf_config(config, **lora, quantize_base=True, quantize_double=False)
    w2 = plain.layers[0].mlp.w2  # present, and a plain NF4 layer, in every family
    assert not w2.weight_nf4.double_quant


@pytest.mark.parametrize("use_dora", [False, True], ids=["qlora", "qdora"])
@pytest.mark.parametrize("case", ["gemma2-all", "gemma3-all", "phi3-all-on-tied"])
def test_qlora_equals_lora_on_the_dequantized_weights(case, use_dora):
    """A trained-looking adapter on every projection (Phi-3: the fused qkv_proj and w13): the
    QLoRA model's logits and adapter gradients are the LoRA model's on the dequantized
    weights, through Gemma's soft-caps and scales and Phi-3's fused splits."""
    config = _hf_config(case)
    attn = ["qkv_proj", "output_proj"] if config["model_type"] == "phi3" else ["q_proj", "k_proj"]
    lora = dict(lora_attn_modules=attn, apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8.0)
    torch.manual_seed(0)
    base = from_hf_config(config).state_dict()
    qlora = from_hf_config(config, **lora, use_dora=use_dora, quantize_base=True)
    qlora.load_state_dict(base, strict=False)
    qlora.load_state_dict(init_lora_adapters(qlora, seed=0), strict=False)
    with torch.no_grad():
        for n, p in get_adapter_params(qlora).items():
            if n.endswith("lora_b.weight"):
                p.normal_(std=0.1)
    fused = ("qkv_proj", "w13") if config["model_type"] == "phi3" else ()
    for name in fused:
        module = qlora.layers[0].get_submodule(("attn." if name == "qkv_proj" else "mlp.") + name)
        assert isinstance(module, LoRALinear) and module.quantize_base, name
    lora_model = from_hf_config(config, **lora, use_dora=use_dora)
    lora_model.load_state_dict(qlora.state_dict())  # dequantized weights, the same adapter
    _assert_same_gemma_paths(qlora, lora_model)
    tokens = TOKENS.clamp(max=config["vocab_size"] - 1)
    out_q, out_l = qlora(tokens), lora_model(tokens)
    torch.testing.assert_close(out_q, out_l, rtol=1e-5, atol=1e-5)
    g = torch.randn(out_q.shape, generator=torch.Generator().manual_seed(1))
    names = list(get_adapter_params(qlora))
    grads_q = torch.autograd.grad((out_q * g).sum(), [qlora.get_parameter(n) for n in names])
    grads_l = torch.autograd.grad((out_l * g).sum(), [lora_model.get_parameter(n) for n in names])
    for n, a, b in zip(names, grads_q, grads_l):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)


def test_from_hf_config_refuses_variants_without_lora():
    config = tiny_hf_llama_config().to_dict()
    for key in ("use_dora", "quantize_base"):
        with pytest.raises(ValueError, match=f"{key}=True"):
            from_hf_config(config, **{key: True})
