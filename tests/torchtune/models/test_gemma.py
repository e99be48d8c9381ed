# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Gemma 2 / Gemma 3 specifics against transformers (the shared parity, round-trip, packing,
KV-cache and PEFT tests run them too, in test_hf_families.py): a converter with two norms
swapped fails parity, every Gemma knob matters, the norm and the scaled embedding equal
transformers' bit for bit in bf16, the fused loss soft-caps, packed rows give unpacked
per-token losses, and the configs' unimplemented settings are refused by name."""

import pytest
import torch
import torch.nn.functional as F

from tests.torchtune.models.test_hf_families import ATOL, RTOL, TOKENS, VOCAB, ours_from, tiny_hf
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.models._families import family_for_hf_model_type
from torchtune.modules.attention import DocumentMask, softcapped_attention
from torchtune.training import ChunkedCrossEntropyLoss, LinearCrossEntropyLoss
from torchtune.training._next_token_loss import next_token_loss_sum

GEMMA = ["gemma2-all", "gemma3-all"]


def _max_logit_gap(case):
    """Largest |ours - transformers| over the logits and every weight's gradient."""
    hf = tiny_hf(case)
    row, ours = ours_from(hf, case)
    logits, expected = ours(TOKENS), hf(TOKENS).logits
    for out in (logits, expected):
        F.cross_entropy(out[:, :-1].flatten(0, 1), TOKENS[:, 1:].flatten()).backward()
    gaps = [(logits - expected).abs().max()]
    hf_named = dict(hf.named_parameters())
    for name, grad in row.tune_to_hf({n: p.grad for n, p in ours.named_parameters()}).items():
        gaps.append((grad - hf_named[name].grad).abs().max())
    return max(gaps).item()


@pytest.mark.parametrize("case", GEMMA)
def test_swapping_the_feedforward_norms_in_the_converter_fails_parity(case, monkeypatch):
    """The parity test can tell pre- from post-feedforward norm: swap them in the key map
    and logits or gradients move far outside its tolerance."""
    assert _max_logit_gap(case) < ATOL
    module = {"gemma2-all": "gemma2", "gemma3-all": "gemma3"}[case]
    convert = __import__(f"torchtune.models.{module}._convert_weights", fromlist=["_"])
    swapped = dict(convert._HF_TO_TUNE)
    pre = "model.layers.{}.pre_feedforward_layernorm.weight"
    post = "model.layers.{}.post_feedforward_layernorm.weight"
    swapped[pre], swapped[post] = swapped[post], swapped[pre]
    monkeypatch.setattr(convert, "_HF_TO_TUNE", swapped)
    assert _max_logit_gap(case) > 100 * ATOL


def _disable(model, knob):
    if knob == "attn_softcap":
        for layer in model.layers:
            layer.attn.softcap = None
    elif knob == "final_softcap":
        model.output_softcap = None
    elif knob == "query_pre_attn_scalar":
        for layer in model.layers:
            layer.attn.scale = None
    elif knob == "embed_scale":
        model.tok_embeddings.scale = 1.0
        model.tok_embeddings._rounded.clear()
    elif knob == "post_norms":
        for layer in model.layers:
            layer.post_attn_norm = layer.post_mlp_norm = None
    elif knob == "window":
        for layer in model.layers:
            layer.attn.sliding_window = None
    elif knob == "local_rope":  # every layer on the global layers' rotary embedding
        global_rope = next(
            la.attn.pos_embeddings for la in model.layers if not la.attn.sliding_window
        )
        for layer in model.layers:
            layer.attn.pos_embeddings = global_rope


KNOBS = [
    ("gemma2-all", k)
    for k in ("attn_softcap", "final_softcap", "query_pre_attn_scalar", "embed_scale")
    + ("post_norms", "window")
] + [("gemma3-all", k) for k in ("query_pre_attn_scalar", "embed_scale", "window", "local_rope")]


@pytest.mark.parametrize("case,knob", KNOBS, ids=[f"{c}-{k}" for c, k in KNOBS])
def test_every_gemma_knob_changes_the_logits(case, knob):
    """Each feature the parity tests cover is really exercised by their tiny configs."""
    hf = tiny_hf(case)
    _, ours = ours_from(hf, case)
    with torch.no_grad():
        expected = hf(TOKENS).logits
        torch.testing.assert_close(ours(TOKENS), expected, atol=ATOL, rtol=RTOL)
        _disable(ours, knob)
        assert (ours(TOKENS) - expected).abs().max() > 1e-3


def test_gemma_norm_and_scaled_embedding_equal_transformers_in_bf16():
    from transformers.models.gemma2.modeling_gemma2 import (
        Gemma2RMSNorm,
        Gemma2TextScaledWordEmbedding,
    )

    from torchtune.modules.embedding import ScaledEmbedding
    from torchtune.modules.rms_norm import GemmaRMSNorm

    torch.manual_seed(0)
    theirs, ours = Gemma2RMSNorm(3072, eps=1e-6), GemmaRMSNorm(3072, eps=1e-6)
    with torch.no_grad():
        theirs.weight.normal_()
        ours.scale.copy_(theirs.weight)
    theirs, ours = theirs.bfloat16(), ours.bfloat16()
    x = torch.randn(3, 5, 3072).bfloat16()
    assert torch.equal(ours(x), theirs(x))
    # sqrt(3072) = 55.43 is 55.5 in bf16: the table's dtype decides, as in transformers.
    emb_theirs = Gemma2TextScaledWordEmbedding(50, 3072, 0, embed_scale=3072**0.5)
    emb_ours = ScaledEmbedding(50, 3072, 3072**0.5, padding_idx=0)
    emb_ours.load_state_dict(emb_theirs.state_dict())
    tokens = torch.randint(0, 50, (2, 7))
    for dtype in (torch.float32, torch.bfloat16):
        emb_theirs, emb_ours = emb_theirs.to(dtype), emb_ours.to(dtype)
        assert torch.equal(emb_ours(tokens), emb_theirs(tokens))


def test_softcapped_attention_equals_sdpa_when_the_cap_is_far_and_zeroes_empty_rows():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    mask = torch.ones(7, 7, dtype=torch.bool).tril()
    mask[4] = False  # a query that may attend nothing
    got = softcapped_attention(q, k, v, mask, False, 0.0, 0.3, softcap=1e6)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(got, want.nan_to_num(0.0), atol=1e-6, rtol=1e-6)
    assert (got[:, :, 4] == 0).all()
    causal = softcapped_attention(q, k, v, None, True, 0.0, None, softcap=1e6)
    torch.testing.assert_close(
        causal, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6, rtol=1e-6
    )


@pytest.mark.parametrize("kind", ["linear", "lora"])
def test_fused_loss_soft_caps_like_the_model(kind):
    """LinearCrossEntropyLoss(softcap=c) = CE of c * tanh(projection(h) / c): loss and
    gradients of the hidden states and of every trainable parameter."""
    from torch import nn

    from torchtune.modules.peft import LoRALinear

    torch.manual_seed(0)
    if kind == "lora":
        projection = LoRALinear(19, 41, rank=4, alpha=8.0)
        nn.init.normal_(projection.lora_b.weight)
        projection.weight.requires_grad_(False)
    else:
        projection = nn.Linear(19, 41, bias=True)
    hidden = (3 * torch.randn(53, 19)).requires_grad_()
    labels = torch.randint(0, 41, (53,))
    labels[:5] = CROSS_ENTROPY_IGNORE_IDX
    params = [hidden] + [p for p in projection.parameters() if p.requires_grad]
    cap = 2.5
    logits = projection(hidden)
    assert logits.abs().max() > 2 * cap  # the cap bends the logits
    ref = F.cross_entropy(torch.tanh(logits / cap) * cap, labels, reduction="sum")
    ref_grads = torch.autograd.grad(ref, params)
    for chunks in (1, 3):
        loss, n = LinearCrossEntropyLoss(num_chunks=chunks)(hidden, projection, labels, softcap=cap)
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
        for got, want in zip(torch.autograd.grad(loss, params), ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        loss, _ = LinearCrossEntropyLoss(num_chunks=3)(hidden, projection, labels, softcap=cap)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-5)
    uncapped, _ = LinearCrossEntropyLoss()(hidden, projection, labels)
    assert (uncapped - ref).abs() > 1.0
    with pytest.raises(ValueError, match="softcap must be positive or None, got 0"):
        LinearCrossEntropyLoss()(hidden, projection, labels, softcap=0)


def test_recipe_loss_fused_and_unfused_agree_on_a_soft_capped_packed_batch():
    """next_token_loss_sum with the fused loss (which must apply the model's final cap) and
    with the logits-based loss: same loss and gradients, on packed documents past the window."""
    hf = tiny_hf("gemma2-all")
    _, model = ours_from(hf, "gemma2-all")
    lengths = (9, 3, 11, 17, 6)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (1, sum(lengths)), generator=g)
    labels = tokens.clone()
    labels[:, :4] = CROSS_ENTROPY_IGNORE_IDX
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    batch = {"tokens": tokens, "labels": labels, "mask": DocumentMask(lengths), "input_pos": pos}
    results = []
    for loss_fn in (LinearCrossEntropyLoss(num_chunks=3), ChunkedCrossEntropyLoss()):
        model.zero_grad()
        loss, n = next_token_loss_sum(model, loss_fn, batch, torch.device("cpu"))
        (loss / n).backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (fused, fused_grads), (plain, plain_grads) = results
    torch.testing.assert_close(fused, plain, atol=ATOL, rtol=RTOL)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=ATOL, rtol=RTOL, msg=name)


@pytest.mark.parametrize("case", GEMMA)
def test_packed_rows_give_each_document_its_unpacked_per_token_losses(case):
    """Soft-capping and windows in packed rows: every document's per-token losses equal its
    own forward's, and transformers' on that document alone."""
    hf = tiny_hf(case)
    _, ours = ours_from(hf, case)
    lengths = (12, 4, 15, 7)  # two longer than the window (5)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, VOCAB, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)

    def per_token(logits, doc):  # [n - 1] losses of a document's next tokens
        return F.cross_entropy(logits[0, :-1], doc[0, 1:], reduction="none")

    with torch.no_grad():
        packed = ours(tokens, mask=DocumentMask(lengths), input_pos=pos)
        for doc, out in zip(tokens.split(lengths, dim=1), packed.split(lengths, dim=1)):
            alone = per_token(ours(doc), doc)
            torch.testing.assert_close(per_token(out, doc), alone, atol=ATOL, rtol=RTOL)
            torch.testing.assert_close(alone, per_token(hf(doc).logits, doc), atol=ATOL, rtol=RTOL)


REFUSED = [
    ("gemma2", "hidden_activation", "gelu", "hidden_activation 'gelu'"),
    ("gemma2", "mlp_bias", True, "mlp_bias=true"),
    ("gemma2", "use_bidirectional_attention", True, "use_bidirectional_attention=true"),
    ("gemma2", "num_experts", 8, "num_experts=8"),
    ("gemma2", "quantization_config", {"quant_method": "gptq"}, r"quantization_config \(gptq\)"),
    ("gemma2", "rope_scaling", {"rope_type": "linear", "factor": 2.0}, "rope_type 'linear'"),
    ("gemma2", "rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4}, "rope_type 'yarn'"),
    ("gemma2", "layer_types", ["full_attention"], r"layer_types \['full_attention'\] for 3"),
    ("gemma2", "layer_types", ["chunked_attention"] * 3, "knows only 'full_attention'"),
    ("gemma3", "attn_logit_softcapping", 50.0, "attn_logit_softcapping=50.0"),
    ("gemma3", "hidden_activation", "silu", "hidden_activation 'silu'"),
    (
        "gemma3",
        "rope_parameters",
        {
            "full_attention": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
        r"rope_parameters.full_attention with rope_type 'yarn'",
    ),
    (
        "gemma3",
        "rope_parameters",
        {"rope_type": "default", "rope_theta": 1e6},
        "without 'full_attention' / 'sliding_attention'",
    ),
    ("gemma3", "use_bidirectional_attention", True, "use_bidirectional_attention=true"),
    ("gemma3", "pad_token_id", 321, "pad_token_id=321 outside the vocab_size=321"),
]


@pytest.mark.parametrize(
    "family,key,value,message", REFUSED, ids=[f"{r[0]}-{r[1]}{i}" for i, r in enumerate(REFUSED)]
)
def test_unimplemented_gemma_settings_are_refused_by_name(family, key, value, message):
    case = {"gemma2": "gemma2-all", "gemma3": "gemma3-all"}[family]
    config = {**tiny_hf(case).config.to_dict(), key: value}
    row = family_for_hf_model_type(config["model_type"])
    with pytest.raises(ValueError, match=message):
        row.hf_config_to_builder_kwargs(config)


def test_hub_defaults_and_the_sliding_window_pattern():
    """What the hub's files leave out takes the config classes' defaults."""
    g2 = family_for_hf_model_type("gemma2")
    minimal = dict(
        vocab_size=11,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
    )
    kw = g2.hf_config_to_builder_kwargs(minimal)
    assert kw["sliding_window"] == [4096, None, 4096, None]
    assert (kw["attn_softcap"], kw["final_softcap"], kw["head_dim"]) == (50.0, 30.0, 256)
    assert kw["tie_word_embeddings"] and kw["padding_idx"] == 0
    assert g2.tied_by_default
    off = g2.hf_config_to_builder_kwargs(
        {**minimal, "attn_logit_softcapping": None, "final_logit_softcapping": None}
    )
    assert off["attn_softcap"] is None and off["final_softcap"] is None
    g3 = family_for_hf_model_type("gemma3_text")
    kw = g3.hf_config_to_builder_kwargs({**minimal, "num_hidden_layers": 13, "sliding_window": 512})
    assert kw["sliding_window"] == [512] * 5 + [None] + [512] * 5 + [None, 512]
    assert (kw["rope_base"], kw["rope_local_base"], kw["rope_scaling"]) == (1e6, 1e4, None)
    assert kw["final_softcap"] is None
    model = g3.builder(**{**kw, "max_seq_len": 16})
    bases = [layer.attn.pos_embeddings.base for layer in model.layers]
    assert bases == [1e4 if w else 1e6 for w in kw["sliding_window"]]
    with pytest.raises(ValueError, match="sliding_attention layers in layer_types but"):
        g2.hf_config_to_builder_kwargs(
            {**minimal, "sliding_window": None, "layer_types": ["sliding_attention"] * 4}
        )


# The hub's config.json files as remembered (unverified: the hub is unreachable here), keys
# that transformers ignores (hidden_act, cache_implementation ...) included.
HUB_GEMMA2_2B = {
    "architectures": ["Gemma2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0,
    "bos_token_id": 2,
    "cache_implementation": "hybrid",
    "eos_token_id": 1,
    "final_logit_softcapping": 30.0,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2304,
    "initializer_range": 0.02,
    "intermediate_size": 9216,
    "max_position_embeddings": 8192,
    "model_type": "gemma2",
    "num_attention_heads": 8,
    "num_hidden_layers": 26,
    "num_key_value_heads": 4,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "torch_dtype": "float32",
    "use_cache": True,
    "vocab_size": 256000,
}
HUB_GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": None,
    "bos_token_id": 2,
    "cache_implementation": "hybrid",
    "eos_token_id": [1, 106],
    "final_logit_softcapping": None,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152,
    "initializer_range": 0.02,
    "intermediate_size": 6912,
    "max_position_embeddings": 32768,
    "model_type": "gemma3_text",
    "num_attention_heads": 4,
    "num_hidden_layers": 26,
    "num_key_value_heads": 1,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 262144,
}
# gemma-3-4b's text_config, spelled out (the hub's file leaves most keys to the defaults).
HUB_GEMMA3_4B_TEXT = {
    **HUB_GEMMA3_1B,
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "num_hidden_layers": 34,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 131072,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
    "sliding_window": 1024,
    "vocab_size": 262208,
}


def _describe(model):
    """Everything a preset fixes: shapes, and per layer the window, RoPE, scale and caps."""
    layers = [
        (
            la.attn.sliding_window,
            la.attn.pos_embeddings.base,
            la.attn.pos_embeddings.scaling,
            la.attn.scale,
            la.attn.softcap,
            la.attn.q_norm is not None,
        )
        for la in model.layers
    ]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = model.output.weight is model.tok_embeddings.weight
    emb = (model.tok_embeddings.scale, model.tok_embeddings.padding_idx)
    return shapes, layers, model.output_softcap, tied, emb


@pytest.mark.parametrize(
    "hub,preset",
    [(HUB_GEMMA2_2B, "gemma2_2b"), (HUB_GEMMA3_1B, "gemma3_1b"), (HUB_GEMMA3_4B_TEXT, "gemma3_4b")],
    ids=["gemma2_2b", "gemma3_1b", "gemma3_4b"],
)
def test_hub_config_files_build_the_presets(hub, preset):
    from torchtune.models import from_hf_config, gemma2, gemma3

    module = gemma2 if preset.startswith("gemma2") else gemma3
    with torch.device("meta"):
        ours = _describe(from_hf_config(hub, max_seq_len=64))
        want = _describe(getattr(module, preset)(max_seq_len=64))
    assert ours == want
    shapes = family_for_hf_model_type(hub["model_type"]).expected_shapes(hub)
    assert shapes == want[0]


def test_decoder_gemma_knobs_are_checked_and_absent_by_default():
    from functools import partial

    from torch import nn

    from torchtune.models._decoder import decoder
    from torchtune.modules import RotaryPositionalEmbeddings

    kw = dict(
        vocab_size=10,
        num_layers=3,
        num_heads=2,
        num_kv_heads=1,
        embed_dim=8,
        intermediate_dim=8,
        max_seq_len=8,
    )
    rope = partial(RotaryPositionalEmbeddings, base=100.0)
    with pytest.raises(ValueError, match="rope has 2 entries for 3 layers"):
        decoder(rope=[rope, rope], **kw)
    plain = decoder(**kw)
    assert type(plain.tok_embeddings) is nn.Embedding and plain.output_softcap is None
    assert not any("post_" in k for k in plain.state_dict())
    assert plain.layers[0].attn.scale is None and plain.layers[0].attn.softcap is None
    with pytest.raises(ValueError, match="softcap must be positive or None, got -1.0"):
        decoder(attn_softcap=-1.0, **kw)
    with pytest.raises(ValueError, match="output_softcap must be positive or None, got 0.0"):
        decoder(output_softcap=0.0, **kw)
