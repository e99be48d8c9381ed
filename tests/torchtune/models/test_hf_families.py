# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Qwen2, Qwen3 and Mistral against transformers: logits, gradients, windows, checkpoints."""

import pytest
import torch
import torch.nn.functional as F

from tests.test_utils import randomise_norms_and_biases_
from torchtune.models._families import family_for_hf_model_type
from torchtune.modules.attention import DocumentMask

ATOL, RTOL = 1e-5, 1e-5
VOCAB = 321
# Longer than every window below, so the band is exercised.
TOKENS = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(0))

BASE = dict(
    vocab_size=VOCAB,
    hidden_size=60,
    intermediate_size=88,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_theta=10_000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
# (family, HF config class name, extra config fields); sizes odd to catch transposes.
CASES = {
    "qwen2-untied": ("qwen2", "Qwen2Config", {}),
    "qwen2-tied-window": (
        "qwen2",
        "Qwen2Config",
        dict(
            tie_word_embeddings=True, use_sliding_window=True, sliding_window=5, max_window_layers=1
        ),
    ),
    "qwen2-head-dim-mqa-window": (
        "qwen2",
        "Qwen2Config",
        dict(
            head_dim=14,
            num_key_value_heads=1,
            use_sliding_window=True,
            sliding_window=7,
            max_window_layers=0,
        ),
    ),
    "qwen2-window-off": (  # the hub's files: a window value, switched off
        "qwen2",
        "Qwen2Config",
        dict(use_sliding_window=False, sliding_window=4, max_window_layers=1),
    ),
    "qwen3-head-dim": ("qwen3", "Qwen3Config", dict(head_dim=14)),
    "qwen3-tied-bias-window": (
        "qwen3",
        "Qwen3Config",
        dict(
            head_dim=8,
            tie_word_embeddings=True,
            attention_bias=True,
            use_sliding_window=True,
            sliding_window=6,
            max_window_layers=2,
        ),
    ),
    "mistral-window": ("mistral", "MistralConfig", dict(head_dim=14, sliding_window=5)),
    "mistral-no-window-tied": (
        "mistral",
        "MistralConfig",
        dict(sliding_window=None, tie_word_embeddings=True, num_key_value_heads=3),
    ),
    # Every Gemma feature on: head_dim != dim / heads, a query_pre_attn_scalar that is not
    # head_dim, both soft-caps small enough to bend the logits, alternating windows, tied
    # embeddings with a padding row, attention biases.
    "gemma2-all": (
        "gemma2",
        "Gemma2Config",
        dict(
            head_dim=14,
            query_pre_attn_scalar=11,
            attn_logit_softcapping=1.5,
            final_logit_softcapping=2.0,
            sliding_window=5,
            attention_bias=True,
            tie_word_embeddings=True,
            pad_token_id=0,
            initializer_range=0.05,  # attention logits up to ~3: the 1.5 cap bends them
        ),
    ),
    # Gemma 3: q/k norms, local / global RoPE bases, linear scaling on the global layers, one
    # global layer in two (the released pattern, one in six, would leave 3 layers all local).
    "gemma3-all": (
        "gemma3",
        "Gemma3TextConfig",
        dict(
            head_dim=14,
            query_pre_attn_scalar=11,
            sliding_window=5,
            sliding_window_pattern=2,
            rope_theta=100_000.0,
            rope_local_base_freq=100.0,
            rope_scaling={"rope_type": "linear", "factor": 4.0},
            tie_word_embeddings=True,
            pad_token_id=0,
            initializer_range=0.05,
        ),
    ),
}
HF_CLASSES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}


def tiny_hf(case: str, seed: int = 0, **overrides):
    """A random fp32 HF model, eager attention, norms and biases re-randomised (HF inits
    them to ones / zeros, which would hide a swapped or missing tensor). ``overrides`` replace
    config fields (e.g. ``vocab_size`` to fit a tokenizer)."""
    import transformers

    family, config_cls, extra = CASES[case]
    config = getattr(transformers, config_cls)(**{**BASE, **extra, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, HF_CLASSES[family])(config).to(torch.float32).eval()
    return randomise_norms_and_biases_(model)


def ours_from(hf, case: str):
    row = family_for_hf_model_type(hf.config.model_type)
    assert row.name == CASES[case][0]
    model = row.builder(**row.hf_config_to_builder_kwargs(hf.config.to_dict())).eval()
    model.load_state_dict(row.hf_to_tune(dict(hf.state_dict())))
    return row, model


def _loss(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), TOKENS[:, 1:].flatten())


def _keep_embedding_grad(embedding: torch.nn.Module, store: list) -> None:
    def hook(_module, _inputs, out):
        out.retain_grad()
        store.append(out)

    embedding.register_forward_hook(hook)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_gradients_match_transformers(case):
    hf = tiny_hf(case)
    row, ours = ours_from(hf, case)
    extra = CASES[case][2]
    windows = [layer.attn.sliding_window for layer in ours.layers]
    expected_windows = [getattr(a.self_attn, "sliding_window", None) for a in hf.model.layers]
    if row.name == "mistral":
        expected_windows = [hf.config.sliding_window] * 3
    assert windows == expected_windows
    if extra.get("use_sliding_window") or extra.get("sliding_window") and row.name == "mistral":
        assert any(w is not None and w < TOKENS.shape[1] for w in windows)
    tied = extra.get("tie_word_embeddings", False)
    assert (ours.output.weight is ours.tok_embeddings.weight) == tied
    if row.name in ("qwen3", "gemma3"):
        assert ours.layers[0].attn.q_norm.scale.shape == (hf.config.head_dim,)

    ours_emb, hf_emb = [], []
    _keep_embedding_grad(ours.tok_embeddings, ours_emb)
    _keep_embedding_grad(hf.model.embed_tokens, hf_emb)
    logits, expected = ours(TOKENS), hf(TOKENS).logits
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL)
    _loss(logits).backward()
    _loss(expected).backward()
    torch.testing.assert_close(ours_emb[0].grad, hf_emb[0].grad, atol=ATOL, rtol=RTOL)
    hf_grads = row.tune_to_hf({n: p.grad for n, p in ours.named_parameters()})
    hf_named = dict(hf.named_parameters())
    assert set(hf_grads) == set(hf_named)
    for name, grad in hf_grads.items():
        torch.testing.assert_close(grad, hf_named[name].grad, atol=ATOL, rtol=RTOL, msg=name)


@pytest.mark.parametrize(
    "case",
    ["qwen2-tied-window", "qwen3-tied-bias-window", "mistral-window", "gemma2-all", "gemma3-all"],
)
def test_packed_documents_with_a_window_equal_each_document_alone(case):
    hf = tiny_hf(case)
    _, ours = ours_from(hf, case)
    lengths = (9, 3, 11, 17, 6)  # some longer than the window, some shorter
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    weights = torch.randn(1, sum(lengths), VOCAB, generator=g)
    packed = ours(tokens, mask=DocumentMask(lengths), input_pos=pos)
    (packed * weights).mean().backward()
    packed_grads = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    alone = torch.cat([ours(doc) for doc in tokens.split(lengths, dim=1)], dim=1)
    (alone * weights).mean().backward()
    torch.testing.assert_close(packed, alone, atol=ATOL, rtol=RTOL)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, atol=ATOL, rtol=RTOL, msg=name)
    with torch.no_grad():  # and each document alone is transformers' forward of it
        want = torch.cat([hf(d).logits for d in tokens.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(alone, want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    "case",
    ["qwen2-head-dim-mqa-window", "qwen3-tied-bias-window", "mistral-window"]
    + ["gemma2-all", "gemma3-all"],
)
def test_kv_cache_decode_with_a_window_equals_the_full_forward(case):
    hf = tiny_hf(case)
    _, ours = ours_from(hf, case)
    prompt = 4
    with torch.no_grad():
        full = ours(TOKENS)
        ours.setup_caches(batch_size=TOKENS.shape[0], dtype=torch.float32, max_seq_len=32)
        pos = torch.arange(TOKENS.shape[1]).expand_as(TOKENS)
        steps = [ours(TOKENS[:, :prompt], input_pos=pos[:, :prompt])]
        for p in range(prompt, TOKENS.shape[1]):  # one token at a time, far past the window
            steps.append(ours(TOKENS[:, p : p + 1], input_pos=pos[:, p : p + 1]))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=RTOL)
    with torch.no_grad():
        torch.testing.assert_close(full, hf(TOKENS).logits, atol=ATOL, rtol=RTOL)


def test_attention_window_on_bool_and_float_masks_and_short_sequences():
    hf = tiny_hf("mistral-window")
    _, ours = ours_from(hf, "mistral-window")
    attn = ours.layers[0].attn  # window 5
    x = torch.randn(2, 11, 60, generator=torch.Generator().manual_seed(3))
    causal = torch.ones(11, 11, dtype=torch.bool).tril().expand(2, 11, 11)
    band = causal & ~torch.ones(11, 11, dtype=torch.bool).tril(-5)  # keys in (p - 5, p]
    additive = torch.zeros(2, 11, 11).masked_fill(~causal, float("-inf"))
    with torch.no_grad():
        want = attn(x)
        for mask in (causal, band, additive):
            torch.testing.assert_close(attn(x, mask=mask), want, atol=ATOL, rtol=RTOL)
        attn.sliding_window = None
        torch.testing.assert_close(attn(x, mask=band), want, atol=ATOL, rtol=RTOL)
        full = attn(x)
        attn.sliding_window = 11  # a window as long as the sequence changes nothing
        torch.testing.assert_close(attn(x), full, atol=0, rtol=0)
    assert not torch.allclose(want, full)


def test_explicit_padding_mask_keeps_the_window():
    hf = tiny_hf("mistral-window")
    _, ours = ours_from(hf, "mistral-window")
    s = TOKENS.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool).tril().expand(2, s, s)
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS, mask=causal), ours(TOKENS), atol=0, rtol=0)
        torch.testing.assert_close(ours(TOKENS), hf(TOKENS).logits, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("case", list(CASES))
def test_hf_round_trip_is_bit_exact_and_shapes_are_expected(case):
    hf = tiny_hf(case)
    row, ours = ours_from(hf, case)
    hf_sd = {k: v for k, v in hf.state_dict().items()}
    back = row.tune_to_hf(row.hf_to_tune(hf_sd))
    assert set(back) == set(hf_sd)
    for k, v in hf_sd.items():
        assert torch.equal(back[k], v), k
    shapes = row.expected_shapes(hf.config.to_dict())
    assert shapes == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


@pytest.mark.parametrize(
    "case", ["qwen2-tied-window", "qwen3-head-dim", "mistral-window", "gemma2-all", "gemma3-all"]
)
def test_full_model_hf_checkpointer_round_trip_through_save_pretrained(tmp_path, case):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from torchtune.utils import FullModelHFCheckpointer

    hf = tiny_hf(case)
    hf.save_pretrained(tmp_path / "in")
    ckpt = FullModelHFCheckpointer(tmp_path / "in", ["model.safetensors"], None, tmp_path / "out")
    sd = ckpt.load_checkpoint()["model"]
    row, ours = ours_from(hf, case)
    ours.load_state_dict(sd)
    ckpt.save_checkpoint({"model": ours.state_dict()}, epoch=0)
    saved, original = (
        load_file(tmp_path / "out/epoch_0/model.safetensors"),
        load_file(tmp_path / "in/model.safetensors"),
    )
    assert set(saved) == set(original)
    for k, v in original.items():
        assert torch.equal(saved[k], v), k
    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out/epoch_0", attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, hf(TOKENS).logits, atol=0, rtol=0)
        torch.testing.assert_close(ours(TOKENS), hf(TOKENS).logits, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "gemma2", "gemma3"])
def test_lora_builder_loads_hf_and_adapter_keys_round_trip_to_peft(family):
    case = {
        "qwen2": "qwen2-tied-window",
        "qwen3": "qwen3-tied-bias-window",
        "mistral": "mistral-window",
        "gemma2": "gemma2-all",
        "gemma3": "gemma3-all",
    }[family]
    hf = tiny_hf(case)
    row = family_for_hf_model_type(hf.config.model_type)
    kwargs = row.hf_config_to_builder_kwargs(hf.config.to_dict())
    lora = row.lora_builder(
        ["q_proj", "output_proj"], apply_lora_to_mlp=True, lora_rank=2, lora_alpha=4.0, **kwargs
    ).eval()
    missing, unexpected = lora.load_state_dict(row.hf_to_tune(dict(hf.state_dict())), strict=False)
    assert not unexpected and missing and all(".lora_" in k for k in missing)
    with torch.no_grad():  # lora_b starts at zero: the base model
        torch.testing.assert_close(lora(TOKENS), hf(TOKENS).logits, atol=ATOL, rtol=RTOL)
    adapter = {k: v for k, v in lora.state_dict().items() if ".lora_" in k}
    peft = row.tune_to_peft_adapter(adapter)
    assert "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight" in peft
    assert "base_model.model.model.layers.2.mlp.gate_proj.lora_B.weight" in peft
    back = row.peft_to_tune_adapter(peft)
    assert set(back) == set(adapter) and all(back[k] is adapter[k] for k in adapter)
    config = row.tune_to_peft_adapter_config(
        {"r": 2, "lora_alpha": 4.0, "target_modules": ["q_proj", "output_proj", "mlp"]}
    )
    assert config["target_modules"] == ["q_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]


def _hub_layout(config: dict) -> dict:
    """transformers 5's config dict in the hub's older layout: rope_theta on top, no
    layer_types (then derived from use_sliding_window / max_window_layers, or Gemma's
    alternating pattern). Gemma's files also leave tie_word_embeddings out (tied by default)
    and Gemma 3's give ``rope_local_base_freq`` and the global layers' ``rope_scaling``."""
    rope = config.get("rope_parameters") or {}
    config = {k: v for k, v in config.items() if k not in ("layer_types", "rope_parameters")}
    config["rope_theta"] = 10_000.0
    if config["model_type"].startswith("gemma"):
        assert config.pop("tie_word_embeddings") is True
    if config["model_type"] == "gemma3_text":
        full = dict(rope["full_attention"])
        config["rope_theta"] = full.pop("rope_theta")
        config["rope_scaling"] = full if full["rope_type"] != "default" else None
        config["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        config["sliding_window_pattern"] = CASES["gemma3-all"][2]["sliding_window_pattern"]
    return config


@pytest.mark.parametrize("case", list(CASES))
def test_hub_and_transformers5_config_layouts_give_the_same_model(case):
    hf = tiny_hf(case)
    row = family_for_hf_model_type(hf.config.model_type)
    t5 = hf.config.to_dict()
    hub = _hub_layout(t5)
    if "use_sliding_window" in CASES[case][2]:  # as the hub's files spell it
        hub["sliding_window"] = CASES[case][2]["sliding_window"]
    assert row.hf_config_to_builder_kwargs(hub) == row.hf_config_to_builder_kwargs(t5)


REFUSED = [
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling with rope_type 'yarn'"),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "rope_type 'dynamic'"),
    ("rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4}, "rope_type 'longrope'"),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 1e4}, "rope_type 'llama3'"),
    ("num_experts", 8, "num_experts=8: mixture-of-experts"),
    ("num_local_experts", 8, "num_local_experts=8"),
    ("moe_intermediate_size", 64, "moe_intermediate_size=64"),
    ("quantization_config", {"quant_method": "awq"}, r"quantization_config \(awq\)"),
    ("hidden_act", "gelu", "hidden_act 'gelu'"),
    ("mlp_bias", True, "mlp_bias=true"),
]


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize(
    "key,value,message", REFUSED, ids=[r[0] + str(i) for i, r in enumerate(REFUSED)]
)
def test_unimplemented_settings_are_refused_by_name(family, key, value, message):
    case = {"qwen2": "qwen2-untied", "qwen3": "qwen3-head-dim", "mistral": "mistral-window"}[family]
    row = family_for_hf_model_type(family)
    config = {**tiny_hf(case).config.to_dict(), key: value}
    with pytest.raises(ValueError, match=message):
        row.hf_config_to_builder_kwargs(config)


def test_layer_types_inconsistent_with_the_window_are_refused():
    row = family_for_hf_model_type("qwen2")
    config = tiny_hf("qwen2-untied").config.to_dict()
    sliding = ["full_attention", "sliding_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="sliding_attention layers in layer_types but"):
        row.hf_config_to_builder_kwargs({**config, "layer_types": sliding, "sliding_window": None})
    with pytest.raises(ValueError, match=r"layer_types \['full_attention'\] for 3 layers"):
        row.hf_config_to_builder_kwargs({**config, "layer_types": ["full_attention"]})
    with pytest.raises(ValueError, match="knows only 'full_attention' and 'sliding_attention'"):
        row.hf_config_to_builder_kwargs({**config, "layer_types": ["chunked_attention"] * 3})
    got = row.hf_config_to_builder_kwargs(
        {**config, "layer_types": sliding, "use_sliding_window": True, "sliding_window": 8}
    )
    assert got["sliding_window"] == [None, 8, 8]
    mistral = family_for_hf_model_type("mistral")
    m = tiny_hf("mistral-window").config.to_dict()
    with pytest.raises(ValueError, match="config.json has layer_types"):
        mistral.hf_config_to_builder_kwargs({**m, "layer_types": ["full_attention"] * 3})
    # Mistral without a sliding_window key gets MistralConfig's 4096; null means none.
    no_key = {k: v for k, v in m.items() if k != "sliding_window"}
    assert mistral.hf_config_to_builder_kwargs(no_key)["sliding_window"] == 4096
    assert (
        mistral.hf_config_to_builder_kwargs({**m, "sliding_window": None})["sliding_window"] is None
    )
    with pytest.raises(ValueError, match="lacks 'hidden_size'"):
        mistral.hf_config_to_builder_kwargs({k: v for k, v in m.items() if k != "hidden_size"})


# Parameter counts of the model cards (total; tied tables counted once), which these presets
# reproduce: Qwen2.5 0.49B / 1.54B / 3.09B / 7.61B, Qwen3 0.6B / 1.7B / 4.0B / 8.2B,
# Mistral 7B 7.24B, Gemma 2 2.6B / 9.2B, Gemma 3 1B.
PRESETS = {
    "qwen2_5_0_5b": 494_032_768,
    "qwen2_5_1_5b": 1_543_714_304,
    "qwen2_5_3b": 3_085_938_688,
    "qwen2_5_7b": 7_615_616_512,
    "qwen3_0_6b": 596_049_920,
    "qwen3_1_7b": 1_720_574_976,
    "qwen3_4b": 4_022_468_096,
    "qwen3_8b": 8_190_735_360,
    "mistral_7b": 7_241_732_096,
    # Gemma 2 2.6B / 9.2B, Gemma 3 1B (1.0B) and 4B's language model (3.88B of 4.3B).
    "gemma2_2b": 2_614_341_888,
    "gemma2_9b": 9_241_705_984,
    "gemma3_1b": 999_885_952,
    "gemma3_4b": 3_880_263_168,
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_have_the_published_sizes_and_lora_twins(name):
    from torchtune.models import gemma2, gemma3, mistral, qwen2, qwen3

    module = {"qwen2": qwen2, "qwen3": qwen3, "mistral": mistral, "gemma2": gemma2}.get(
        name.split("_")[0], gemma3
    )
    with torch.device("meta"):
        model = getattr(module, name)(max_seq_len=64)
        lora = getattr(module, f"lora_{name}")(["q_proj", "v_proj"], max_seq_len=64)
    assert sum(p.numel() for p in model.parameters()) == PRESETS[name]
    base = {k: v.shape for k, v in lora.state_dict().items() if ".lora_" not in k}
    assert base == {k: v.shape for k, v in model.state_dict().items()}
    assert lora.layers[0].attn.q_proj.lora_a.weight.shape[0] == 8


def test_decoder_window_and_norm_knobs_are_checked():
    from torchtune.models._decoder import decoder
    from torchtune.modules import CausalSelfAttention

    kw = dict(
        vocab_size=10,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        embed_dim=8,
        intermediate_dim=8,
        max_seq_len=8,
    )
    with pytest.raises(ValueError, match=r"sliding_window has 3 entries for 2 layers"):
        decoder(sliding_window=[4, None, 4], **kw)
    model = decoder(sliding_window=[None, 3], qk_norm=True, **kw)
    assert [layer.attn.sliding_window for layer in model.layers] == [None, 3]
    assert model.layers[1].attn.k_norm.scale.shape == (4,)
    assert decoder(**kw).layers[0].attn.q_norm is None
    attn = model.layers[0].attn
    with pytest.raises(ValueError, match="sliding_window must be a positive int or None, got 0"):
        CausalSelfAttention(
            8,
            2,
            1,
            4,
            attn.q_proj,
            attn.k_proj,
            attn.v_proj,
            attn.output_proj,
            attn.pos_embeddings,
            sliding_window=0,
        )


@pytest.mark.parametrize(
    "case,attn,mlp,output",
    [
        ("qwen2-tied-window", ["q_proj", "k_proj", "v_proj", "output_proj"], True, False),
        ("qwen3-tied-bias-window", ["q_proj", "v_proj"], True, False),
        ("qwen3-head-dim", ["k_proj", "output_proj"], False, True),
        ("mistral-window", ["q_proj", "output_proj"], True, True),
        ("gemma2-all", ["q_proj", "v_proj", "output_proj"], True, True),
        ("gemma3-all", ["q_proj", "k_proj"], True, False),
    ],
)
def test_peft_loads_the_adapter_the_checkpointer_saves(tmp_path, case, attn, mlp, output):
    from peft import PeftModel

    from torchtune.modules.peft import get_adapter_params, get_merged_lora_state_dict
    from torchtune.utils import FullModelHFCheckpointer

    hf = tiny_hf(case, seed=4)
    hf.save_pretrained(tmp_path / "in")
    ckpt = FullModelHFCheckpointer(tmp_path / "in", ["model.safetensors"], None, tmp_path / "out")
    row = family_for_hf_model_type(hf.config.model_type)
    kwargs = row.hf_config_to_builder_kwargs(hf.config.to_dict())
    model = row.lora_builder(attn, mlp, output, **kwargs, lora_rank=4, lora_alpha=8.0).eval()
    missing, unexpected = model.load_state_dict(ckpt.load_checkpoint()["model"], strict=False)
    assert not unexpected and all(".lora_" in k for k in missing)
    torch.manual_seed(3)
    with torch.no_grad():
        base = model(TOKENS)
        # lora_b starts at zero: make the adapter matter, at the weights' scale (larger
        # adapters grow the activations until fp32 rounding of the RoPE tables shows).
        for p in get_adapter_params(model).values():
            p.copy_(0.1 * torch.randn_like(p))
        ours = model(TOKENS)
    assert (ours - base).abs().max() > 0.1
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    adapter = {k: sd[k] for k in get_adapter_params(model)}
    targets = sorted({k.split(".")[-3] for k in adapter})
    state = {
        "model": get_merged_lora_state_dict(model, sd),
        "adapter": adapter,
        "adapter_config": {"r": 4, "lora_alpha": 8.0, "target_modules": targets},
    }
    out = ckpt.save_checkpoint(state, epoch=0)
    peft_model = PeftModel.from_pretrained(hf, out.parent / "epoch_0_peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(TOKENS).logits, ours, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_from_hf_config_and_the_hf_checkpointer_build_every_family(tmp_path, case):
    """The user's path: a downloaded folder, ``from_hf_config(dir)`` (also with LoRA), and
    ``FullModelHFCheckpointer`` without ``model_type``: the logits are transformers'."""
    from torchtune.models import from_hf_config
    from torchtune.modules.peft import get_adapter_params
    from torchtune.utils import FullModelHFCheckpointer

    hf = tiny_hf(case)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ckpt = FullModelHFCheckpointer(
        tmp_path / "hf", "model.safetensors", output_dir=tmp_path / "out"
    ).load_checkpoint()
    model = from_hf_config(tmp_path / "hf").eval()
    model.load_state_dict(ckpt["model"])
    with torch.no_grad():
        want = hf(TOKENS).logits
        torch.testing.assert_close(model(TOKENS), want, atol=1e-5, rtol=1e-5)
    lora = from_hf_config(
        tmp_path / "hf" / "config.json",
        lora_attn_modules=["q_proj", "v_proj"],
        lora_rank=4,
        lora_alpha=8.0,
    ).eval()
    missing, unexpected = lora.load_state_dict(ckpt["model"], strict=False)
    assert not unexpected and set(missing) == set(get_adapter_params(lora))
    with torch.no_grad():  # lora_b starts at zero: the base model's logits
        torch.testing.assert_close(lora(TOKENS), want, atol=1e-5, rtol=1e-5)
