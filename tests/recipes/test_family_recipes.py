# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Every model family through ``tune full_finetune_single_device`` and
``tune lora_finetune_single_device`` with ``model: torchtune.models.from_hf_config``, against a
plain transformers (+ PEFT) loop on the same weights and batches; the outputs load back with
``AutoModelForCausalLM.from_pretrained`` and ``PeftModel.from_pretrained`` (an adapter on a
tied lm_head included; Gemma 2's soft-capped logits through the fused loss); and two gloo ranks
of packed, windowed Mistral LoRA against one device."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.recipes.single_device_utils import (
    VOCAB_SIZE,
    hf_reference_losses,
    logged_losses,
    run_tune,
)
from tests.recipes.test_full_finetune_distributed import (
    PER_RANK_BATCH,
    WORLD_SIZE,
    assert_same_weights,
    run_tune_distributed,
)
from tests.test_utils import randomise_norms_and_biases_, train_sentencepiece, write_alpaca_json
from torchtune import config, utils
from torchtune._recipe_registry import get_config
from torchtune.models import from_hf_config
from torchtune.models._families import family_for_hf_model_type
from torchtune.modules.peft import init_lora_adapters

SEQ = 64  # the dataset's max_seq_len; every window below is shorter
STEPS = 10
BASE = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=48,
    intermediate_size=88,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=SEQ,
    rms_norm_eps=1e-5,
    rope_theta=10_000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)
# family -> (HF config class, HF model class, fields on top of BASE). Each case carries the
# family's distinguishing features.
FAMILIES = {
    "llama3": (  # GQA, llama3 rope scaling, tied
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(rope_theta=500_000.0, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True),
    ),
    "qwen2": (  # q/k/v biases, tied, a window on the layers from max_window_layers on
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(
            tie_word_embeddings=True, use_sliding_window=True, sliding_window=6, max_window_layers=1
        ),
    ),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=14)),  # q/k norm, head_dim 14
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=5)),
    "phi3": (  # fused qkv / gate_up, RoPE on 6 of 12 channels, LongRoPE (64 > 32), window, tied
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(
            partial_rotary_factor=0.5,
            original_max_position_embeddings=32,
            rope_scaling=dict(
                type="longrope", short_factor=[1.0, 1.5, 2.5], long_factor=[1.2, 3.0, 7.0]
            ),
            sliding_window=5,
            tie_word_embeddings=True,
            pad_token_id=2,  # Phi-3's pad is its EOS: that embedding row gets no gradient
        ),
    ),
    # Both soft-caps bending the logits (initializer_range 0.05: attention logits up to ~3),
    # query_pre_attn_scalar != head_dim, a window on layer 0, tied with a padding row.
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            head_dim=14,
            query_pre_attn_scalar=10,
            attn_logit_softcapping=1.5,
            final_logit_softcapping=2.0,
            sliding_window=6,
            tie_word_embeddings=True,
            pad_token_id=0,
            initializer_range=0.05,
        ),
    ),
    # q/k norms, a local layer (window 6, RoPE base 100) and a global one (1e5, linear x4).
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            head_dim=14,
            query_pre_attn_scalar=10,
            sliding_window=6,
            sliding_window_pattern=2,
            rope_theta=100_000.0,
            rope_local_base_freq=100.0,
            rope_scaling={"rope_type": "linear", "factor": 4.0},
            tie_word_embeddings=True,
            pad_token_id=0,
        ),
    ),
}
MODEL_KEYS = ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim")
MODEL_KEYS += ("intermediate_dim", "max_seq_len")
LORA_ATTN = ["q_proj", "k_proj", "v_proj", "output_proj"]
HF_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Families with fused projections: one adapter on each fused module, PEFT's names for them.
FUSED_LORA = {
    "phi3": (["qkv_proj", "output_proj"], ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
}
RECIPES = {
    "full": ("full_finetune_single_device", "tiny/full"),
    "lora": ("lora_finetune_single_device", "tiny/lora"),
    "lora_output": ("lora_finetune_single_device", "tiny/lora"),  # LoRA on lm_head too
}
RUN_OVERRIDES = {
    "full": ["optimizer.lr=1e-3"],
    "lora": [
        "optimizer.lr=3e-3",
        "optimizer.weight_decay=0.01",
        "lr_scheduler.num_warmup_steps=2",
        "model.lora_rank=4",
        "model.lora_alpha=8",
        f"model.lora_attn_modules=[{','.join(LORA_ATTN)}]",
        "model.apply_lora_to_mlp=True",
        "model.apply_lora_to_output=False",
    ],
}
RUN_OVERRIDES["lora_output"] = RUN_OVERRIDES["lora"][:-1] + ["model.apply_lora_to_output=True"]


def tiny_hf(family: str, seed: int = 0):
    """A random fp32 HF model of ``family``, eager attention, norms and biases re-randomised
    (HF inits them to ones / zeros, which would hide a swapped or missing tensor)."""
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    hf_config = getattr(transformers, config_cls)(**{**BASE, **extra})
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(hf_config).to(torch.float32).eval()
    return randomise_norms_and_biases_(model)


def load_auto(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The tokenizer and the data every family trains on: (root, tokenizer, data)."""
    root = tmp_path_factory.mktemp("family_recipes")
    tokenizer = train_sentencepiece(root / "tok" / "sp", vocab_size=VOCAB_SIZE)
    data = write_alpaca_json(root / "alpaca.json", n=2 * STEPS)
    return root, tokenizer, data


def family_overrides(shared, family: str, kind: str, out: Path) -> list:
    """Save the family's tiny model and point ``tiny/<kind>`` at it, with no model sizes and no
    ``model_type`` (both come from its ``config.json``)."""
    root, tokenizer, data = shared
    model_dir = root / f"hf_{family}"
    if not model_dir.exists():
        tiny_hf(family).save_pretrained(model_dir, safe_serialization=True)
    return [f"~model.{k}" for k in MODEL_KEYS] + [
        "model._component_=torchtune.models.from_hf_config",
        f"+model.config={model_dir}",
        f"checkpointer.checkpoint_dir={model_dir}",
        "checkpointer.checkpoint_files=[model.safetensors]",
        "~checkpointer.model_type",
        f"tokenizer.path={tokenizer}",
        "dataset.source=json",
        f"dataset.data_files={data}",
        f"dataset.max_seq_len={SEQ}",
        "dataset.train_on_input=True",  # the prompt alone fills 64 tokens: score it too
        "device=cpu",
        "dtype=fp32",
        "shuffle=False",
        "batch_size=2",
        "gradient_accumulation_steps=1",
        "epochs=1",
        f"max_steps_per_epoch={STEPS}",
        "clip_grad_norm=null",
        f"output_dir={out}",
        *_run_overrides(family, kind),
    ]


def _run_overrides(family: str, kind: str) -> list:
    if kind == "full" or family not in FUSED_LORA:
        return RUN_OVERRIDES[kind]
    attn = f"model.lora_attn_modules=[{','.join(FUSED_LORA[family][0])}]"
    return [attn if o.startswith("model.lora_attn_modules=") else o for o in RUN_OVERRIDES[kind]]


def _ours(model_dir: Path, sd_dir: Path, **lora) -> torch.nn.Module:
    """Our model built from ``model_dir``'s config.json, holding ``sd_dir/model.safetensors``
    (HF keys), in eval mode."""
    model = from_hf_config(model_dir, **lora)
    row = family_for_hf_model_type(
        json.loads((model_dir / "config.json").read_text())["model_type"]
    )
    missing, unexpected = model.load_state_dict(
        row.hf_to_tune(load_file(sd_dir / "model.safetensors")), strict=False
    )
    if model.output.weight is model.tok_embeddings.weight:  # tied: one table, filled once
        missing = [k for k in missing if k != "output.weight"]
    assert not unexpected and all(".lora_" in k for k in missing)
    return model.eval()


def _tokens(seed: int = 0) -> torch.Tensor:
    # Longer than every window: the band is exercised.
    return torch.randint(0, VOCAB_SIZE, (2, 29), generator=torch.Generator().manual_seed(seed))


def _lora_kwargs(kind: str, family: str) -> dict:
    return dict(
        lora_attn_modules=FUSED_LORA[family][0] if family in FUSED_LORA else LORA_ATTN,
        apply_lora_to_mlp=True,
        apply_lora_to_output=kind == "lora_output",
        lora_rank=4,
        lora_alpha=8.0,
    )


def _check_full(family, overrides, out):
    cfg = config.load_config(get_config("tiny/full").file_path, overrides)
    model_dir = Path(cfg.checkpointer.checkpoint_dir)
    hf = load_auto(model_dir).train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, weight_decay=0.0)
    expected = hf_reference_losses(hf, opt, cfg, steps_per_epoch=STEPS)
    torch.testing.assert_close(logged_losses(out), expected, rtol=0, atol=1e-4)
    print(f"{family} full: max |loss - HF loop| {(logged_losses(out) - expected).abs().max():.2e}")

    epoch = out / "epoch_1"
    saved = load_file(epoch / "model.safetensors")
    tied = FAMILIES[family][2].get("tie_word_embeddings", False)
    assert ("lm_head.weight" in saved) != tied  # a tied input stays tied: one table
    ref = {k: v for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert saved.keys() == ref.keys()
    for name, param in ref.items():
        torch.testing.assert_close(saved[name], param, rtol=0, atol=1e-4, msg=name)

    assert (epoch / "config.json").read_bytes() == (model_dir / "config.json").read_bytes()
    reloaded = load_auto(epoch).eval()
    assert reloaded.config.model_type == hf.config.model_type
    if tied:
        assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    ours = _ours(epoch, epoch)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=_tokens()).logits, ours(_tokens()), rtol=0, atol=1e-5
        )


def _check_lora(family, kind, overrides, out):
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from transformers import get_cosine_schedule_with_warmup

    cfg = config.load_config(get_config("tiny/lora").file_path, overrides)
    model_dir = Path(cfg.checkpointer.checkpoint_dir)
    row = family_for_hf_model_type(
        json.loads((model_dir / "config.json").read_text())["model_type"]
    )
    # The recipe's fresh adapters: lora_b zero, lora_a drawn from the seed.
    utils.set_seed(cfg.seed)
    lora_kwargs = _lora_kwargs(kind, family)
    ours_init = init_lora_adapters(from_hf_config(model_dir, **lora_kwargs), cfg.seed)
    targets = FUSED_LORA[family][1] if family in FUSED_LORA else HF_LORA_TARGETS
    targets = targets + (["lm_head"] if kind == "lora_output" else [])
    peft_model = get_peft_model(
        load_auto(model_dir).train(),
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0),
    )
    result = set_peft_model_state_dict(peft_model, row.tune_to_peft_adapter(ours_init))
    assert not result.unexpected_keys
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=3e-3, weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=STEPS)
    expected = hf_reference_losses(peft_model, opt, cfg, steps_per_epoch=STEPS, scheduler=sched)
    ours_losses = logged_losses(out)
    torch.testing.assert_close(ours_losses, expected, rtol=0, atol=1e-4)
    print(f"{family} {kind}: max |loss - PEFT loop| {(ours_losses - expected).abs().max():.2e}")

    epoch = out / "epoch_1"
    adapter = load_file(out / "epoch_1_adapter" / "adapter.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_b" in k)  # trained
    ours = _ours(model_dir, model_dir, **lora_kwargs)
    ours.load_state_dict(adapter, strict=False)
    tokens = _tokens(1)
    peft_config = json.loads((out / "epoch_1_peft" / "adapter_config.json").read_text())
    assert sorted(peft_config["target_modules"]) == sorted(targets)
    config_in = json.loads((model_dir / "config.json").read_text())
    config_out = json.loads((epoch / "config.json").read_text())
    if kind == "lora_output" and config_in.get("tie_word_embeddings"):
        # Merging the output's adapter moves lm_head off the (unchanged) table: the export is
        # untied, lm_head written beside the embeddings.
        assert "lm_head.weight" in load_file(epoch / "model.safetensors")
        assert config_out == {**config_in, "tie_word_embeddings": False}
    else:
        assert (epoch / "config.json").read_bytes() == (model_dir / "config.json").read_bytes()
    with torch.no_grad():
        want = ours(tokens)
        loaded = PeftModel.from_pretrained(load_auto(model_dir).eval(), out / "epoch_1_peft").eval()
        torch.testing.assert_close(loaded(input_ids=tokens).logits, want, rtol=0, atol=1e-5)
        merged = load_auto(epoch).eval()
        torch.testing.assert_close(merged(input_ids=tokens).logits, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(
            _ours(epoch, epoch)(tokens), want, rtol=0, atol=1e-5
        )  # the merged file read back by us


# Per layer, the window our model must read from each config.json (HF's qwen2 windows the
# layers from max_window_layers on); all shorter than the SEQ-token rows.
WINDOWS = {
    "llama3": [None, None],
    "qwen2": [None, 6],
    "qwen3": [None, None],
    "mistral": [5, 5],
    "phi3": [5, 5],
    "gemma2": [6, None],
    "gemma3": [6, None],
}
# One case per family in the default suite (about 5 s each); the other recipe is slow.
FAST = {("llama3", "full"), ("qwen2", "lora"), ("qwen3", "full"), ("mistral", "lora")}
FAST.add(("phi3", "lora"))  # the fused adapters against PEFT's; full fine-tuning is slow
FAST |= {("gemma2", "lora"), ("gemma3", "full")}
CASES = [
    pytest.param(f, k, id=f"{f}-{k}", marks=() if (f, k) in FAST else pytest.mark.slow)
    for f in FAMILIES
    for k in ("full", "lora")
]
# An adapter on a tied lm_head: one tied family, one untied.
CASES += [
    pytest.param(f, "lora_output", id=f"{f}-lora_output", marks=pytest.mark.slow)
    for f in ("qwen2", "qwen3", "phi3", "gemma2")
]


@pytest.mark.parametrize("family,kind", CASES)
def test_recipe_trains_like_transformers_and_exports_load(shared, family, kind, tmp_path):
    out = tmp_path / "out"
    overrides = family_overrides(shared, family, kind, out)
    model_dir = shared[0] / f"hf_{family}"
    assert [layer.attn.sliding_window for layer in from_hf_config(model_dir).layers] == (
        WINDOWS[family]
    )
    recipe, config_name = RECIPES[kind]
    run_tune(recipe, config_name, overrides, cwd=tmp_path)
    if kind == "full":
        _check_full(family, overrides, out)
    else:
        _check_lora(family, kind, overrides, out)


@pytest.mark.slow  # about 15 s each: two runs, one of them on two processes
@pytest.mark.parametrize("family", ["mistral", "phi3", "gemma2"])  # gemma2: soft-caps, fused loss
def test_two_ranks_of_packed_windowed_lora_match_one_device(shared, tmp_path, family):
    """Packed rows (document masks) under the family's window, sharded over two gloo ranks;
    phi3's fused adapters (every packed row passes LongRoPE's original length, so both runs
    use its long factors); gemma2's soft-caps through the fused loss."""
    single, dist = tmp_path / "single", tmp_path / "dist"
    common = family_overrides(shared, family, "lora", single)
    common = [o for o in common if not o.startswith(("batch_size=", "output_dir="))]
    # The prompts are 106-161 tokens: at 64 every row would be one truncated sample; at 256
    # rows hold two or three documents (and pieces), every one longer than the window.
    common = [o for o in common if not o.startswith(("dataset.max_seq_len=", "~model.max_seq_len"))]
    common += ["dataset.max_seq_len=256", "model.max_seq_len=256", "dataset.packed=True"]
    common += ["max_steps_per_epoch=3"]
    run_tune(
        "lora_finetune_single_device",
        "tiny/lora",
        [*common, f"batch_size={PER_RANK_BATCH * WORLD_SIZE}", f"output_dir={single}"],
        cwd=tmp_path,
    )
    run_tune_distributed(
        "lora_finetune_distributed",
        "tiny/lora_distributed",
        [*common, f"batch_size={PER_RANK_BATCH}", f"output_dir={dist}"],
        cwd=tmp_path,
    )
    losses = logged_losses(dist)
    assert len(losses) == 3
    torch.testing.assert_close(losses, logged_losses(single), rtol=0, atol=1e-5)
    print(f"2 ranks: max |loss - 1 device| {(losses - logged_losses(single)).abs().max():.2e}")
    for name in (
        "model.safetensors",
        "_adapter/adapter.safetensors",
        "_peft/adapter_model.safetensors",
    ):
        path = f"epoch_1{'/' if name[0] != '_' else ''}{name}"
        assert_same_weights(single / path, dist / path, atol=1e-5)
