# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``use_dora`` / ``quantize_base`` / ``quantize_double`` on every LoRA builder: the family
rows, the size presets and ``from_hf_config``."""

import importlib
import inspect

import pytest
import torch

from tests.test_utils import tiny_hf_llama_config
from tests.torchtune.models.test_hf_families import BASE, CASES, TOKENS
from torchtune.models import from_hf_config
from torchtune.models._families import FAMILIES
from torchtune.modules import TransformerDecoder
from torchtune.modules.peft import LoRALinear, NF4Linear, init_lora_adapters

VARIANT_KWARGS = {"use_dora": False, "quantize_base": False, "quantize_double": True}


def _builds_a_model(fn) -> bool:
    return callable(fn) and inspect.signature(fn).return_annotation is TransformerDecoder


def _lora_builders():
    for family in ("llama2", "llama3", "mistral", "qwen2", "qwen3"):
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


def _configs():
    yield "llama", tiny_hf_llama_config(hidden_size=48, intermediate_size=72).to_dict()
    for case in ("qwen2-untied", "qwen3-head-dim", "mistral-window"):
        import transformers

        _, config_cls, extra = CASES[case]
        yield case, getattr(transformers, config_cls)(**{**BASE, **extra}).to_dict()


@pytest.mark.parametrize(
    "case,config", list(_configs()), ids=lambda x: x if isinstance(x, str) else ""
)
def test_from_hf_config_builds_qdora_on_every_family(case, config):
    """Decoder-layer linears in NF4, the adapted ones DoRA; with fresh adapters the model is
    the base model on its dequantized weights (built plainly from the same config)."""
    torch.manual_seed(0)
    base = from_hf_config(config).eval()
    lora = dict(lora_attn_modules=["q_proj", "v_proj"], lora_rank=4, lora_alpha=8.0)
    qdora = from_hf_config(config, **lora, use_dora=True, quantize_base=True).eval()
    for name, m in qdora.named_modules():
        if name.startswith("layers.") and name.endswith(("_proj", ".w1", ".w2", ".w3")):
            if isinstance(m, LoRALinear):
                assert m.use_dora and m.quantize_base, name
            else:
                assert isinstance(m, NF4Linear), name
    assert isinstance(qdora.output, torch.nn.Linear) and isinstance(
        qdora.tok_embeddings, torch.nn.Embedding
    )
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
    assert not plain.layers[0].mlp.w1.weight_nf4.double_quant


def test_from_hf_config_refuses_variants_without_lora():
    config = tiny_hf_llama_config().to_dict()
    for key in ("use_dora", "quantize_base"):
        with pytest.raises(ValueError, match=f"{key}=True"):
            from_hf_config(config, **{key: True})
