# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The shared decoder builder's knobs against transformers' LlamaForCausalLM and plain PyTorch."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.test_utils import tiny_hf_llama
from torchtune.models._decoder import decoder
from torchtune.models.llama2 import (
    hf_config_to_builder_kwargs,
    hf_to_tune,
    llama2,
    lora_llama2,
    tune_to_hf,
)
from torchtune.modules import RMSNorm, RotaryPositionalEmbeddings
from torchtune.modules.peft import LoRALinear

ATOL, RTOL = 1e-5, 1e-5
TOKENS = torch.randint(0, 321, (3, 19), generator=torch.Generator().manual_seed(0))

KNOBS = {
    "bias": dict(attention_bias=True),
    "head_dim": dict(head_dim=24),  # 4 heads of 24 in a 64-wide model
    "tied": dict(tie_word_embeddings=True),
    "all": dict(attention_bias=True, head_dim=24, tie_word_embeddings=True, num_kv_heads=1),
}


def _loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, so gradients are of a training step's size."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), TOKENS[:, 1:].flatten())


def _pair(**config):
    hf = tiny_hf_llama(0, **config)
    ours = llama2(**hf_config_to_builder_kwargs(hf.config.to_dict())).eval()
    ours.load_state_dict(hf_to_tune(hf.state_dict()))
    return hf, ours


@pytest.mark.parametrize("knobs", list(KNOBS.values()), ids=list(KNOBS))
def test_knobs_match_hf_logits_and_gradients(knobs):
    hf, ours = _pair(**knobs)
    if knobs.get("attention_bias"):
        biases = [n for n, _ in ours.named_parameters() if n.endswith(".bias")]
        assert len(biases) == 4 * 3  # q, k, v, output_proj in every layer
        assert all(p.abs().min() > 0 for n, p in hf.named_parameters() if n.endswith(".bias"))
    if knobs.get("head_dim"):
        assert ours.layers[0].attn.q_proj.weight.shape == (4 * 24, 64)
        assert ours.head_dim == 24
    tied = knobs.get("tie_word_embeddings", False)
    assert (ours.output.weight is ours.tok_embeddings.weight) == tied
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tied

    logits, expected = ours(TOKENS), hf(TOKENS).logits
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL)
    _loss(logits).backward()
    _loss(expected).backward()
    ours_grads = {n: p.grad for n, p in ours.named_parameters()}
    hf_grads = tune_to_hf(ours_grads)
    hf_named = dict(hf.named_parameters())
    assert set(hf_grads) == set(hf_named)
    for name, grad in hf_grads.items():
        torch.testing.assert_close(grad, hf_named[name].grad, atol=ATOL, rtol=RTOL, msg=name)


def test_tied_output_is_one_parameter_whose_gradient_sums_both_uses():
    hf, tied = _pair(tie_word_embeddings=True)
    kwargs = hf_config_to_builder_kwargs(hf.config.to_dict())
    untied = llama2(**{**kwargs, "tie_word_embeddings": False}).eval()
    untied.load_state_dict(tied.state_dict())
    assert tied.output.weight is tied.tok_embeddings.weight
    assert sum(1 for _ in tied.parameters()) == sum(1 for _ in untied.parameters()) - 1
    # Both keys stay in the state dict, so checkpoints keep their layout.
    assert {"output.weight", "tok_embeddings.weight"} <= set(tied.state_dict())
    _loss(tied(TOKENS)).backward()
    _loss(untied(TOKENS)).backward()
    want = untied.tok_embeddings.weight.grad + untied.output.weight.grad
    torch.testing.assert_close(tied.tok_embeddings.weight.grad, want, atol=ATOL, rtol=RTOL)


def test_lora_with_bias_and_head_dim_loads_hf_and_adapts_the_chosen_projections():
    hf = tiny_hf_llama(0, attention_bias=True, head_dim=24)
    kwargs = hf_config_to_builder_kwargs(hf.config.to_dict())
    ours = lora_llama2(
        ["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=2, lora_alpha=4.0, **kwargs
    ).eval()
    missing, unexpected = ours.load_state_dict(hf_to_tune(hf.state_dict()), strict=False)
    assert not unexpected and missing and all(".lora_" in k for k in missing)
    attn = ours.layers[0].attn
    assert isinstance(attn.q_proj, LoRALinear) and attn.q_proj.bias is not None
    assert isinstance(attn.k_proj, nn.Linear) and not isinstance(attn.k_proj, LoRALinear)
    assert all(isinstance(getattr(ours.layers[0].mlp, w), LoRALinear) for w in ("w1", "w2", "w3"))
    with torch.no_grad():  # lora_b starts at zero: the base model's logits
        torch.testing.assert_close(ours(TOKENS), hf(TOKENS).logits, atol=ATOL, rtol=RTOL)


def test_norm_activation_and_rope_factories_are_used():
    calls = []

    def rope(head_dim, max_seq_len):
        calls.append((head_dim, max_seq_len))
        return RotaryPositionalEmbeddings(head_dim, max_seq_len=max_seq_len, base=77.0)

    gelu = partial(F.gelu, approximate="tanh")
    model = decoder(
        vocab_size=50,
        num_layers=2,
        num_heads=3,
        num_kv_heads=1,
        embed_dim=30,
        intermediate_dim=44,
        head_dim=8,
        max_seq_len=16,
        norm=partial(nn.LayerNorm, eps=1e-3),
        mlp_activation=gelu,
        rope=rope,
    )
    assert calls == [(8, 16), (8, 16)]
    assert all(layer.attn.pos_embeddings.base == 77.0 for layer in model.layers)
    assert isinstance(model.norm, nn.LayerNorm) and model.norm.eps == 1e-3
    assert isinstance(model.layers[1].sa_norm, nn.LayerNorm)
    mlp = model.layers[0].mlp
    x = torch.randn(2, 5, 30, requires_grad=True)
    want = mlp.w2(gelu(mlp.w1(x)) * mlp.w3(x))  # plain PyTorch
    torch.testing.assert_close(mlp(x), want, atol=0, rtol=0)
    # The default is RMSNorm with norm_eps and SiLU.
    default = decoder(
        vocab_size=50,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        embed_dim=16,
        intermediate_dim=24,
        max_seq_len=8,
        norm_eps=1e-4,
    )
    assert isinstance(default.norm, RMSNorm) and default.norm.eps == 1e-4
    assert default.layers[0].mlp.activation is F.silu
    assert default.output.weight is not default.tok_embeddings.weight


def test_bad_arguments_raise():
    kw = dict(vocab_size=10, num_layers=1, intermediate_dim=8, max_seq_len=8)
    with pytest.raises(ValueError, match=r"embed_dim \(30\) must be divisible by num_heads \(4\)"):
        decoder(num_heads=4, num_kv_heads=2, embed_dim=30, **kw)
    decoder(num_heads=4, num_kv_heads=2, embed_dim=30, head_dim=6, **kw)  # fine with head_dim
    with pytest.raises(ValueError, match=r"num_heads \(4\) must be divisible by num_kv_heads"):
        decoder(num_heads=4, num_kv_heads=3, embed_dim=32, **kw)
    with pytest.raises(ValueError, match=r"Unknown lora_modules \['mlp'\]"):
        decoder(num_heads=4, num_kv_heads=2, embed_dim=32, lora_modules=["mlp"], **kw)
