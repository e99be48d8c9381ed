# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Phi-3 / Phi-4 against transformers: fused qkv and gate/up, partial rotary, LongRoPE, tied
embeddings, sliding windows, the embedding's padding row; checkpoints and PEFT adapters."""

import pytest
import torch
import torch.nn.functional as F

from tests.test_utils import randomise_norms_and_biases_
from torchtune.models._families import family_for_hf_model_type
from torchtune.modules.attention import DocumentMask

ATOL, RTOL = 1e-5, 1e-5
VOCAB, PAD = 321, 3
ORIGINAL = 16  # LongRoPE's original length: TOKENS (23) take the long factors, 12 the short
_g = torch.Generator().manual_seed(0)
TOKENS = torch.randint(0, VOCAB, (2, 23), generator=_g)
TOKENS[0, 3] = TOKENS[1, 9] = TOKENS[1, 17] = PAD  # the padding row gets no gradient in HF


def _factors(n: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return (1.0 + 3.0 * torch.rand(n, generator=g)).tolist()


BASE = dict(
    vocab_size=VOCAB,
    hidden_size=60,  # 6 heads of 10 channels
    intermediate_size=44,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=64,
    original_max_position_embeddings=ORIGINAL,
    rms_norm_eps=1e-5,
    rope_theta=10_000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=PAD,
)
LONGROPE = dict(type="longrope", short_factor=_factors(3, 1), long_factor=_factors(3, 2))
# name -> config fields on top of BASE; the first is the fast one and has everything on.
CASES = {
    "all-on-tied": dict(  # GQA, 6 of 10 channels rotated, LongRoPE, window, tied (Phi-4 mini)
        partial_rotary_factor=0.6, rope_scaling=LONGROPE, sliding_window=5, tie_word_embeddings=True
    ),
    "longrope-partial-untied": dict(  # LongRoPE with a given factor and attention_factor
        partial_rotary_factor=0.6,
        rope_scaling={**LONGROPE, "factor": 3.0, "attention_factor": 1.3},
        sliding_window=7,
    ),
    "mha-window": dict(num_key_value_heads=6, sliding_window=5),  # Phi-3 mini 4k
    "gqa-no-window": dict(pad_token_id=None, rope_theta=250_000.0),  # Phi-4
}
FAST = "all-on-tied"
PARAMS = [pytest.param(c, marks=() if c == FAST else pytest.mark.slow) for c in CASES]


def tiny_hf(case: str, seed: int = 0, **overrides):
    """A random fp32 ``Phi3ForCausalLM``, eager attention, norms re-randomised (HF inits them
    to ones, which would hide a swapped or missing tensor)."""
    import transformers

    config = transformers.Phi3Config(**{**BASE, **CASES[case], **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Phi3ForCausalLM(config).to(torch.float32).eval()
    return randomise_norms_and_biases_(model)


def ours_from(hf, lora: dict = None):
    row = family_for_hf_model_type(hf.config.model_type)
    assert row.name == "phi3"
    kwargs = row.hf_config_to_builder_kwargs(hf.config.to_dict())
    model = row.lora_builder(**lora, **kwargs) if lora else row.builder(**kwargs)
    missing, unexpected = model.load_state_dict(row.hf_to_tune(dict(hf.state_dict())), strict=False)
    assert not unexpected and all(".lora_" in k for k in missing)
    return row, model.eval()


def _loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def _embedding_output(embedding: torch.nn.Module, store: list):
    def hook(_module, _inputs, out):
        out.retain_grad()
        store.append(out)

    return embedding.register_forward_hook(hook)


@pytest.mark.parametrize("case", PARAMS)
@pytest.mark.parametrize("length", [23, 12], ids=["long", "short"])
def test_logits_and_gradients_match_transformers(case, length):
    hf = tiny_hf(case)
    row, ours = ours_from(hf)
    extra = {**BASE, **CASES[case]}
    assert [layer.attn.sliding_window for layer in ours.layers] == [extra.get("sliding_window")] * 3
    assert (ours.output.weight is ours.tok_embeddings.weight) == extra["tie_word_embeddings"]
    rope = ours.layers[0].attn.pos_embeddings
    assert rope.rotary_dim == int(10 * extra.get("partial_rotary_factor", 1.0))
    assert (rope.longrope is not None) == ("rope_scaling" in extra)
    assert ours.tok_embeddings.padding_idx == extra["pad_token_id"]
    tokens = TOKENS[:, :length]

    ours_emb, hf_emb = [], []
    _embedding_output(ours.tok_embeddings, ours_emb)
    _embedding_output(hf.model.embed_tokens, hf_emb)
    logits, expected = ours(tokens), hf(tokens).logits
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL)
    _loss(logits, tokens).backward()
    _loss(expected, tokens).backward()
    torch.testing.assert_close(ours_emb[0].grad, hf_emb[0].grad, atol=ATOL, rtol=RTOL)
    hf_grads = row.tune_to_hf({n: p.grad for n, p in ours.named_parameters()})
    hf_named = dict(hf.named_parameters())
    assert set(hf_grads) == set(hf_named)
    for name, grad in hf_grads.items():
        torch.testing.assert_close(grad, hf_named[name].grad, atol=ATOL, rtol=RTOL, msg=name)
    if extra["pad_token_id"] is not None and not extra["tie_word_embeddings"]:
        # the padding row gets no gradient from its lookups, as in HF (tied: lm_head's only)
        assert ours.tok_embeddings.weight.grad[PAD].abs().max() == 0


def test_longrope_switches_tables_at_the_original_length():
    """Past ``original_max_position_embeddings`` the long factors apply to the whole forward,
    below it the short ones: the first 12 logits differ between the two, as in HF."""
    hf = tiny_hf(FAST)
    _, ours = ours_from(hf)
    with torch.no_grad():
        long, short = ours(TOKENS)[:, :12], ours(TOKENS[:, :12])
        torch.testing.assert_close(short, hf(TOKENS[:, :12]).logits, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(long, hf(TOKENS).logits[:, :12], atol=ATOL, rtol=RTOL)
    assert (long - short).abs().max() > 1e-4  # 10x the tolerance: the tables matter
    at = ours(TOKENS[:, :ORIGINAL]).detach()  # exactly the original length: still short
    torch.testing.assert_close(at[:, :12], short, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("swap", ["gate-up", "k-v"])
def test_swapping_halves_of_a_fused_tensor_breaks_the_parity(swap):
    """The parity tests above would catch a converter that split or ordered a fused tensor
    wrongly: the same checkpoint with gate/up halves or k/v rows swapped gives other logits."""
    hf = tiny_hf(FAST)
    row, ours = ours_from(hf)
    sd = {k: v.clone() for k, v in row.hf_to_tune(dict(hf.state_dict())).items()}
    for i in range(3):
        if swap == "gate-up":
            w = sd[f"layers.{i}.mlp.w13.weight"]
            sd[f"layers.{i}.mlp.w13.weight"] = torch.cat(w.chunk(2)[::-1])
        else:
            q, k, v = sd[f"layers.{i}.attn.qkv_proj.weight"].split([60, 20, 20])
            sd[f"layers.{i}.attn.qkv_proj.weight"] = torch.cat([q, v, k])
    ours.load_state_dict(sd)
    with torch.no_grad():
        assert (ours(TOKENS) - hf(TOKENS).logits).abs().max() > 1e-2


@pytest.mark.parametrize("case", PARAMS)
def test_hf_round_trip_is_bit_exact_and_shapes_are_expected(case):
    hf = tiny_hf(case)
    row, ours = ours_from(hf)
    hf_sd = dict(hf.state_dict())
    back = row.tune_to_hf(row.hf_to_tune(hf_sd))
    assert set(back) == set(hf_sd) and "model.layers.0.self_attn.qkv_proj.weight" in back
    for k, v in hf_sd.items():
        assert torch.equal(back[k], v), k
    shapes = row.expected_shapes(hf.config.to_dict())
    assert shapes == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


@pytest.mark.parametrize("case", PARAMS)
def test_full_model_hf_checkpointer_round_trip_through_save_pretrained(tmp_path, case):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from torchtune.models import from_hf_config
    from torchtune.utils import FullModelHFCheckpointer

    hf = tiny_hf(case)
    hf.save_pretrained(tmp_path / "in")
    ckpt = FullModelHFCheckpointer(tmp_path / "in", ["model.safetensors"], None, tmp_path / "out")
    ours = from_hf_config(tmp_path / "in").eval()
    ours.load_state_dict(ckpt.load_checkpoint()["model"])
    ckpt.save_checkpoint({"model": ours.state_dict()}, epoch=0)
    saved = load_file(tmp_path / "out/epoch_0/model.safetensors")
    original = load_file(tmp_path / "in/model.safetensors")
    assert set(saved) == set(original)
    for k, v in original.items():
        assert torch.equal(saved[k], v), k
    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out/epoch_0", attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, hf(TOKENS).logits, atol=0, rtol=0)
        torch.testing.assert_close(ours(TOKENS), hf(TOKENS).logits, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    "case,attn,mlp,output",
    [
        pytest.param(FAST, ["qkv_proj", "output_proj"], True, False),
        pytest.param("longrope-partial-untied", ["qkv_proj"], False, True, marks=pytest.mark.slow),
        pytest.param("mha-window", ["output_proj"], True, True, marks=pytest.mark.slow),
    ],
)
def test_peft_loads_the_adapter_the_checkpointer_saves(tmp_path, case, attn, mlp, output):
    """One lora_A / lora_B on each fused projection: PEFT applies our adapter to
    ``qkv_proj`` / ``gate_up_proj`` and gives our logits."""
    from peft import PeftModel

    from torchtune.modules.peft import (
        get_adapter_params,
        get_lora_config,
        get_merged_lora_state_dict,
    )
    from torchtune.utils import FullModelHFCheckpointer

    hf = tiny_hf(case, seed=4)
    hf.save_pretrained(tmp_path / "in")
    ckpt = FullModelHFCheckpointer(tmp_path / "in", ["model.safetensors"], None, tmp_path / "out")
    ckpt.load_checkpoint()  # the file layout save_checkpoint writes back
    lora = dict(
        lora_attn_modules=attn,
        apply_lora_to_mlp=mlp,
        apply_lora_to_output=output,
        lora_rank=4,
        lora_alpha=8.0,
    )
    _, model = ours_from(hf, lora)
    if "qkv_proj" in attn:
        assert model.layers[0].attn.qkv_proj.lora_b.weight.shape == (100, 4)  # q, k, v rows
    torch.manual_seed(3)
    with torch.no_grad():
        base = model(TOKENS)
        for p in get_adapter_params(model).values():
            p.copy_(0.1 * torch.randn_like(p))
        ours = model(TOKENS)
    assert (ours - base).abs().max() > 0.1
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = {
        "model": get_merged_lora_state_dict(model, sd),
        "adapter": {k: sd[k] for k in get_adapter_params(model)},
        "adapter_config": get_lora_config(model),
    }
    out = ckpt.save_checkpoint(state, epoch=0)
    import json

    peft_config = json.loads((out.parent / "epoch_0_peft" / "adapter_config.json").read_text())
    want = (["qkv_proj"] if "qkv_proj" in attn else []) + (
        ["o_proj"] if "output_proj" in attn else []
    )
    want += ["gate_up_proj", "down_proj"] if mlp else []
    want += ["lm_head"] if output else []
    assert sorted(peft_config["target_modules"]) == sorted(want)
    peft_model = PeftModel.from_pretrained(hf, out.parent / "epoch_0_peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(TOKENS).logits, ours, atol=ATOL, rtol=RTOL)
    # and the merged export is HF's model with the adapter folded in
    merged = type(hf).from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(TOKENS).logits, ours, atol=ATOL, rtol=RTOL)


def test_lora_targets_and_adapter_keys():
    hf = tiny_hf(FAST)
    row = family_for_hf_model_type("phi3")
    kwargs = row.hf_config_to_builder_kwargs(hf.config.to_dict())
    with pytest.raises(ValueError, match="Phi-3 fuses q, k and v into one projection"):
        row.lora_builder(["q_proj", "v_proj"], lora_rank=2, lora_alpha=4.0, **kwargs)
    with pytest.raises(ValueError, match=r"Unknown lora_attn_modules \['w1'\]"):
        row.lora_builder(["w1"], lora_rank=2, lora_alpha=4.0, **kwargs)
    with pytest.raises(ValueError, match="lora_phi3 adapts nothing"):
        row.lora_builder([], lora_rank=2, lora_alpha=4.0, **kwargs)
    lora = row.lora_builder(["qkv_proj"], True, lora_rank=2, lora_alpha=4.0, **kwargs)
    adapter = {k: v for k, v in lora.state_dict().items() if ".lora_" in k}
    peft = row.tune_to_peft_adapter(adapter)
    assert "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight" in peft
    assert "base_model.model.model.layers.2.mlp.gate_up_proj.lora_B.weight" in peft
    assert peft["base_model.model.model.layers.2.mlp.gate_up_proj.lora_B.weight"].shape == (88, 2)
    back = row.peft_to_tune_adapter(peft)
    assert set(back) == set(adapter) and all(back[k] is adapter[k] for k in adapter)
    config = row.tune_to_peft_adapter_config(
        {"r": 2, "lora_alpha": 4.0, "target_modules": ["qkv_proj", "output_proj", "mlp"]}
    )
    assert config["target_modules"] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    with pytest.raises(ValueError, match="Unknown LoRA target module 'q_proj'"):
        row.tune_to_peft_adapter_config({"r": 2, "lora_alpha": 4.0, "target_modules": ["q_proj"]})


@pytest.mark.parametrize("case", PARAMS)
def test_packed_documents_equal_each_document_alone(case):
    """Document masks under the window, positions restarting per document. No document passes
    ORIGINAL: LongRoPE picks its table from a forward's longest position (as HF does), so a
    longer one would switch the whole packed row to the long factors."""
    hf = tiny_hf(case)
    _, ours = ours_from(hf)
    lengths = (9, 3, 11, ORIGINAL, 6)  # some longer than the window, some shorter
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    weights = torch.randn(1, sum(lengths), VOCAB, generator=g)
    packed = ours(tokens, mask=DocumentMask(lengths), input_pos=pos)
    (packed * weights).mean().backward()
    packed_grads = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    docs = tokens.split(lengths, dim=1)
    alone = torch.cat([ours(doc) for doc in docs], dim=1)
    (alone * weights).mean().backward()
    torch.testing.assert_close(packed, alone, atol=ATOL, rtol=RTOL)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, atol=ATOL, rtol=RTOL, msg=name)
    with torch.no_grad():  # and each document alone is transformers' forward of it
        want = torch.cat([hf(d).logits for d in docs], dim=1)
    torch.testing.assert_close(alone, want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("case", PARAMS)
def test_kv_cache_decode_equals_the_full_forward(case):
    hf = tiny_hf(case)
    _, ours = ours_from(hf)
    # With LongRoPE, decode up to the original length (one table throughout): a forward with
    # the cache keeps its keys; generate (and transformers') re-encode when crossing it.
    n = ORIGINAL if "rope_scaling" in CASES[case] else TOKENS.shape[1]
    tokens, prompt = TOKENS[:, :n], 4
    with torch.no_grad():
        full = ours(tokens)
        ours.setup_caches(batch_size=2, dtype=torch.float32, max_seq_len=32)
        pos = torch.arange(n).expand_as(tokens)
        steps = [ours(tokens[:, :prompt], input_pos=pos[:, :prompt])]
        for p in range(prompt, n):  # one token at a time, past the window
            steps.append(ours(tokens[:, p : p + 1], input_pos=pos[:, p : p + 1]))
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(full, hf(tokens).logits, atol=ATOL, rtol=RTOL)


def _hub_layout(config: dict) -> dict:
    """transformers 5's config dict in the hub's layout: rope_theta, partial_rotary_factor on
    top, the longrope dict as ``rope_scaling`` with ``type``."""
    config = dict(config)
    params = config.pop("rope_parameters")
    config["rope_theta"] = params["rope_theta"]
    config["partial_rotary_factor"] = params.get("partial_rotary_factor", 1.0)
    if params.get("rope_type") == "longrope":
        keep = ("short_factor", "long_factor", "factor", "attention_factor")
        config["rope_scaling"] = {"type": "longrope", **{k: params[k] for k in keep if k in params}}
    else:
        config["rope_scaling"] = None
    return config


@pytest.mark.parametrize("case", list(CASES))
def test_hub_and_transformers5_config_layouts_give_the_same_model(case):
    row = family_for_hf_model_type("phi3")
    t5 = tiny_hf(case).config.to_dict()
    assert "rope_parameters" in t5
    hub = _hub_layout(t5)
    assert row.hf_config_to_builder_kwargs(hub) == row.hf_config_to_builder_kwargs(t5)
    layer_types = ["sliding_attention" if t5.get("sliding_window") else "full_attention"] * 3
    assert row.hf_config_to_builder_kwargs(
        {**t5, "layer_types": layer_types}
    ) == row.hf_config_to_builder_kwargs(t5)


REFUSED = [
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "rope_scaling with rope_type 'dynamic'"),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 1e4}, "rope_type 'llama3'"),
    ("rope_parameters", {"rope_type": "longrope", "short_factor": [1.0]}, r"without \['long"),
    (
        "rope_parameters",
        {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]},
        "short_factor of 1 entries; the rotary dimension 10 needs 5",
    ),
    ("partial_rotary_factor", 0.5, "partial_rotary_factor=0.5: head_dim 10"),
    ("resid_pdrop", 0.1, "resid_pdrop=0.1"),
    ("embd_pdrop", 0.1, "embd_pdrop=0.1"),
    ("attention_bias", True, "attention_bias=True"),
    ("layer_types", ["full_attention", "sliding_attention"] * 2, "layer_types"),
    ("num_local_experts", 8, "num_local_experts=8"),
    ("quantization_config", {"quant_method": "awq"}, r"quantization_config \(awq\)"),
    ("hidden_act", "gelu", "hidden_act 'gelu'"),
    ("pad_token_id", 400, "pad_token_id=400 outside the vocabulary of 321"),
]


@pytest.mark.parametrize(
    "key,value,message", REFUSED, ids=[f"{r[0]}{i}" for i, r in enumerate(REFUSED)]
)
def test_unimplemented_settings_are_refused_by_name(key, value, message):
    row = family_for_hf_model_type("phi3")
    config = {**tiny_hf("mha-window").config.to_dict(), key: value}
    if key == "partial_rotary_factor":
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4}
    with pytest.raises(ValueError, match=message):
        row.hf_config_to_builder_kwargs(config)


# Parameter counts of the model cards (tied tables counted once): Phi-3 mini 3.82B, Phi-4 mini
# 3.84B, Phi-4 14.66B.
PRESETS = {
    "phi3_mini_4k": 3_821_079_552,
    "phi3_5_mini": 3_821_079_552,
    "phi4_mini": 3_836_021_760,
    "phi4": 14_659_507_200,
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_have_the_published_sizes_and_lora_twins(name):
    from torchtune.models import phi3

    kw = {}
    if name in ("phi3_5_mini", "phi4_mini"):
        kw = dict(short_factor=[1.0] * 48, long_factor=[2.0] * 48)
    with torch.device("meta"):
        model = getattr(phi3, name)(max_seq_len=64, **kw)
        lora = getattr(phi3, f"lora_{name}")(["qkv_proj"], True, max_seq_len=64, **kw)
    assert sum(p.numel() for p in model.parameters()) == PRESETS[name]
    base = {k: v.shape for k, v in lora.state_dict().items() if ".lora_" not in k}
    assert base == {k: v.shape for k, v in model.state_dict().items()}
    assert lora.layers[0].attn.qkv_proj.lora_a.weight.shape[0] == 8
    if name == "phi4_mini":
        assert model.layers[0].attn.pos_embeddings.rotary_dim == 96
        assert model.output.weight is model.tok_embeddings.weight


def test_partial_rotary_without_longrope_is_the_plain_rope_on_its_channels():
    from torchtune.modules import RotaryPositionalEmbeddings
    from torchtune.modules.position_embeddings import PartialRotaryPositionalEmbeddings

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 3, 14, generator=g)
    pos = torch.randint(0, 32, (2, 9), generator=g)
    full = PartialRotaryPositionalEmbeddings(14, 32, base=500.0)
    plain = RotaryPositionalEmbeddings(14, 32, base=500.0)
    for p in (None, pos):
        torch.testing.assert_close(full(x, input_pos=p), plain(x, input_pos=p), atol=0, rtol=0)
    part = PartialRotaryPositionalEmbeddings(14, 32, base=500.0, rotary_dim=8)
    want = torch.cat([RotaryPositionalEmbeddings(8, 32, base=500.0)(x[..., :8]), x[..., 8:]], -1)
    torch.testing.assert_close(part(x), want, atol=0, rtol=0)
    # fp32 tables through .to(bf16); built on meta, filled by to_empty
    assert part.to(torch.bfloat16).cache.dtype == torch.float32
    with torch.device("meta"):
        lazy = PartialRotaryPositionalEmbeddings(14, 32, base=500.0, rotary_dim=8)
    lazy.to_empty(device="cpu")
    torch.testing.assert_close(lazy(x), want, atol=0, rtol=0)


def test_longrope_tables_and_checks():
    from torchtune.modules.position_embeddings import PartialRotaryPositionalEmbeddings

    longrope = dict(
        short_factor=[1.0, 2.0], long_factor=[3.0, 4.0], original_max_position_embeddings=8
    )
    longrope["attention_factor"] = 1.25
    short_only = PartialRotaryPositionalEmbeddings(6, 8, rotary_dim=4, longrope=longrope)
    assert not hasattr(short_only, "long_cache")  # no position can pass the original 8
    rope = PartialRotaryPositionalEmbeddings(6, 16, rotary_dim=4, longrope=longrope)
    # a plain-PyTorch derivation of HF's longrope: angle p / (factor * base ** (2i / 4)), x1.25
    for factors, table in ((longrope["short_factor"], rope.cache), ([3.0, 4.0], rope.long_cache)):
        inv = 1.0 / (torch.tensor(factors) * 10_000.0 ** (torch.arange(0, 4, 2) / 4))
        angles = torch.arange(16.0)[:, None] * inv
        torch.testing.assert_close(table[:, 0], 1.25 * angles.cos(), atol=0, rtol=0)
        torch.testing.assert_close(table[:, 1], 1.25 * angles.sin(), atol=0, rtol=0)
    with pytest.raises(ValueError, match="longrope lacks"):
        PartialRotaryPositionalEmbeddings(6, 16, rotary_dim=4, longrope={"short_factor": [1.0]})
    with pytest.raises(ValueError, match="longrope short_factor has 2 entries, expected"):
        PartialRotaryPositionalEmbeddings(10, 16, rotary_dim=6, longrope=longrope)
    with pytest.raises(ValueError, match=r"rotary_dim must be even and in \(0, dim=6\], got 5"):
        PartialRotaryPositionalEmbeddings(6, 16, rotary_dim=5)


def test_fused_projection_knobs_are_checked():
    from torch import nn

    from torchtune.models._decoder import decoder
    from torchtune.modules import CausalSelfAttention, FeedForward

    kw = dict(vocab_size=10, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=8)
    kw.update(intermediate_dim=6, max_seq_len=8, lora_rank=2, lora_alpha=2.0)
    with pytest.raises(ValueError, match=r"lora_modules \['q_proj'\] are not in this model"):
        decoder(fused_qkv=True, lora_modules=["q_proj"], **kw)
    with pytest.raises(ValueError, match=r"lora_modules \['qkv_proj', 'w13'\] are not in this"):
        decoder(lora_modules=["qkv_proj", "w13"], **kw)
    model = decoder(fused_qkv=True, fused_gate_up=True, lora_modules=["qkv_proj", "w13"], **kw)
    layer = model.layers[0]
    assert layer.attn.q_proj is None and layer.mlp.w1 is None and layer.mlp.w3 is None
    assert layer.attn.qkv_proj.lora_b.weight.shape == (16, 2)  # (2 + 2 * 1) heads x 4
    assert layer.mlp.w13.lora_b.weight.shape == (12, 2)
    plain = decoder(**kw)
    assert plain.layers[0].attn.qkv_proj is None and plain.layers[0].mlp.w13 is None
    assert not any("qkv" in k or "w13" in k for k in plain.state_dict())
    with pytest.raises(ValueError, match="Give either qkv_proj or q_proj"):
        CausalSelfAttention(
            8,
            2,
            1,
            4,
            nn.Linear(8, 8),
            None,
            None,
            nn.Linear(8, 8),
            nn.Identity(),
            qkv_proj=nn.Linear(8, 16),
        )
    with pytest.raises(ValueError, match="Give either gate_up_proj or gate_proj"):
        FeedForward(nn.Linear(8, 6), nn.Linear(6, 8), None, gate_up_proj=nn.Linear(8, 12))


def test_fused_mlp_equals_the_split_one():
    """``w13``'s first half is the gate, as HF's ``gate_up_proj.chunk(2)``."""
    from torch import nn

    from torchtune.modules import FeedForward

    torch.manual_seed(0)
    gate, up, down = nn.Linear(8, 6, bias=False), nn.Linear(8, 6, bias=False), nn.Linear(6, 8)
    fused = nn.Linear(8, 12, bias=False)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([gate.weight, up.weight]))
    x = torch.randn(3, 5, 8)
    want = FeedForward(gate, down, up)(x)
    torch.testing.assert_close(FeedForward(None, down, None, gate_up_proj=fused)(x), want)


def test_init_weights_from_meta_fills_the_rope_tables_and_zeroes_the_padding_row():
    from torchtune.modules import init_weights_

    row = family_for_hf_model_type("phi3")
    kwargs = row.hf_config_to_builder_kwargs(tiny_hf(FAST).config.to_dict())
    with torch.device("meta"):
        model = row.builder(**kwargs)
    model.to_empty(device="cpu")
    init_weights_(model)
    fresh = row.builder(**kwargs).layers[0].attn.pos_embeddings
    rope = model.layers[0].attn.pos_embeddings
    torch.testing.assert_close(rope.cache, fresh.cache, atol=0, rtol=0)
    torch.testing.assert_close(rope.long_cache, fresh.long_cache, atol=0, rtol=0)
    assert model.tok_embeddings.weight[PAD].abs().max() == 0
    assert model.tok_embeddings.weight.std() > 0.01
