# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""A LoRA Llama2 on PEFT's adapters gives PEFT's logits; merging leaves logits unchanged."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tests.test_utils import tiny_hf_llama
from torchtune.models._hf_common import map_key
from torchtune.models.llama2 import hf_to_tune, llama2, lora_llama2
from torchtune.models.llama2._convert_weights import _HF_TO_TUNE
from torchtune.modules.peft import get_merged_lora_state_dict

RANK, ALPHA = 4, 8.0


def _peft_to_tune(peft_sd):
    """PEFT LlamaForCausalLM state dict -> native keys (base and lora_a/lora_b), written out
    here independently of the converter's PEFT adapter map."""
    base, lora = {}, {}
    for key, value in peft_sd.items():
        key = key.removeprefix("base_model.model.").replace(".base_layer", "")
        for hf_name, ours in (
            (".lora_A.default.weight", "lora_a"),
            (".lora_B.default.weight", "lora_b"),
        ):
            if key.endswith(hf_name):
                module = key[: -len(hf_name)]
                native = map_key(module + ".weight", _HF_TO_TUNE, "HF")[: -len("weight")]
                # Our rotary layout is HF's: no row permutation, for lora_b of q/k either.
                lora[native + ours + ".weight"] = value
                break
        else:
            base[key] = value
    return {**hf_to_tune(base), **lora}


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_lora_llama2_matches_peft_and_merge(num_kv_heads):
    hf = tiny_hf_llama(0, num_kv_heads=num_kv_heads)
    targets = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "lm_head",
    ]
    peft_model = get_peft_model(
        hf, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, lora_dropout=0.0)
    ).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.05)
    ours = lora_llama2(
        ["q_proj", "k_proj", "v_proj", "output_proj"],
        apply_lora_to_mlp=True,
        apply_lora_to_output=True,
        vocab_size=321,
        num_layers=3,
        num_heads=4,
        num_kv_heads=num_kv_heads,
        embed_dim=64,
        max_seq_len=256,
        intermediate_dim=88,
        lora_rank=RANK,
        lora_alpha=ALPHA,
    ).eval()
    ours.load_state_dict(_peft_to_tune(peft_model.state_dict()))

    # Layer by layer: same rotary layout, so PEFT's q/k outputs are ours row for row.
    x = torch.randn(2, 7, 64)
    hf_attn = peft_model.base_model.model.model.layers[1].self_attn
    ours_attn = ours.layers[1].attn
    with torch.no_grad():
        for hf_name, name in (
            ("q_proj", "q_proj"),
            ("k_proj", "k_proj"),
            ("v_proj", "v_proj"),
            ("o_proj", "output_proj"),
        ):
            expected = getattr(hf_attn, hf_name)(x)
            torch.testing.assert_close(getattr(ours_attn, name)(x), expected, atol=1e-6, rtol=1e-6)

    tokens = torch.randint(0, 321, (3, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft_model(input_ids=tokens).logits
        # The adapters matter: the base model alone is far from PEFT's output.
        with peft_model.disable_adapter():
            assert (peft_model(input_ids=tokens).logits - expected).abs().max() > 1e-2
        logits = ours(tokens)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)

        merged = llama2(
            vocab_size=321,
            num_layers=3,
            num_heads=4,
            num_kv_heads=num_kv_heads,
            embed_dim=64,
            max_seq_len=256,
            intermediate_dim=88,
        ).eval()
        merged.load_state_dict(get_merged_lora_state_dict(ours))
        torch.testing.assert_close(merged(tokens), logits, atol=1e-5, rtol=1e-5)


def test_lora_llama2_bad_modules():
    kwargs = dict(
        vocab_size=11,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        embed_dim=8,
        max_seq_len=8,
        lora_rank=2,
        lora_alpha=4.0,
    )
    with pytest.raises(ValueError, match="o_proj"):
        lora_llama2(["o_proj"], **kwargs)
    with pytest.raises(ValueError, match="adapts nothing"):
        lora_llama2([], **kwargs)
