# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Gemma 3's multimodal checkpoints (Gemma3ForConditionalGeneration, the 4B / 12B / 27B files):
the text decoder read out of them equals transformers' model on text, and the checkpoint is
written back whole, vision tower included, bit for bit."""

import json

import pytest
import torch

from tests.test_utils import randomise_norms_and_biases_
from tests.torchtune.models.test_hf_families import BASE, CASES
from torchtune.models import from_hf_config, gemma3
from torchtune.models._families import family_for_hf_model_type
from torchtune.utils import FullModelHFCheckpointer

ATOL, RTOL = 1e-5, 1e-5
VOCAB = BASE["vocab_size"]
# Text only; the image token (VOCAB - 1) never appears.
TOKENS = torch.randint(0, VOCAB - 4, (2, 19), generator=torch.Generator().manual_seed(1))

# A one-layer SigLIP tower: the vision side of every tiny multimodal Gemma 3 in the tests.
TINY_SIGLIP = dict(
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
)


def tiny_multimodal(seed: int = 0, **text_overrides):
    """A random fp32 Gemma3ForConditionalGeneration: the gemma3-all text decoder (q/k norms,
    local / global RoPE, linear scaling, windows, tied) and a one-layer SigLIP tower."""
    import transformers

    text = transformers.Gemma3TextConfig(**{**BASE, **CASES["gemma3-all"][2], **text_overrides})
    vision = transformers.SiglipVisionConfig(**TINY_SIGLIP)
    config = transformers.Gemma3Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        boi_token_index=VOCAB - 3,
        eoi_token_index=VOCAB - 2,
        image_token_index=VOCAB - 1,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config).to(torch.float32).eval()
    return randomise_norms_and_biases_(model)


def _hf_logits(hf, tokens=TOKENS):
    with torch.no_grad():
        return hf(input_ids=tokens).logits


def _write_transformers5_layout(hf, folder):
    """The same model with transformers 5's module names as the file's keys."""
    from safetensors.torch import save_file

    folder.mkdir()
    sd = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf.config.to_dict()))
    return sd


def test_the_multimodal_config_names_the_gemma3_family_and_its_text_decoder():
    hf = tiny_multimodal()
    config = hf.config.to_dict()
    row = family_for_hf_model_type("gemma3")
    assert row.name == "gemma3" and row is family_for_hf_model_type("gemma3_text")
    want = row.hf_config_to_builder_kwargs(hf.config.text_config.to_dict())
    assert row.hf_config_to_builder_kwargs(config) == want
    assert row.expected_shapes(config) == row.expected_shapes(hf.config.text_config.to_dict())
    with pytest.raises(ValueError, match="text_config=None"):
        row.hf_config_to_builder_kwargs({"model_type": "gemma3"})
    with pytest.raises(ValueError, match="text_config has model_type 'llama'"):
        row.hf_config_to_builder_kwargs(
            {"model_type": "gemma3", "text_config": {"model_type": "llama"}}
        )


def test_text_defaults_are_transformers_gemma3_text_config_defaults():
    # The hub's multimodal files list only the text_config keys that differ from these.
    import transformers

    defaults = transformers.Gemma3TextConfig()
    for key, value in gemma3._convert_weights._TEXT_DEFAULTS.items():
        assert getattr(defaults, key) == value, key


def test_the_hubs_sparse_4b_config_builds_the_4b_preset():
    from tests.torchtune.models.test_gemma import _describe

    # google/gemma-3-4b-it's config.json as remembered (the hub is unreachable here).
    hub_4b = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": {
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "model_type": "gemma3_text",
            "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
        },
        "vision_config": {"model_type": "siglip_vision_model"},
    }
    with torch.device("meta"):
        assert _describe(from_hf_config(hub_4b, max_seq_len=64)) == _describe(
            gemma3.gemma3_4b(max_seq_len=64)
        )


def _load_all(folder):
    """{key: (file name, tensor)} over every safetensors file in ``folder``."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: (f.name, v) for k, v in load_file(f).items()})
    return out


@pytest.mark.parametrize("layout", ["hub", "hub-sharded", "transformers5"])
def test_logits_equal_transformers_and_the_round_trip_is_bit_exact(tmp_path, layout, caplog):
    from transformers import Gemma3ForConditionalGeneration

    hf = tiny_multimodal()
    src = tmp_path / "in"
    files = ["model.safetensors"]
    if layout.startswith("hub"):
        # transformers 5 still writes the hub's key names; small shards as the 4B's files
        # (some of them hold vision tensors only).
        hf.save_pretrained(src, max_shard_size="20KB" if layout == "hub-sharded" else "5GB")
        if layout == "hub-sharded":
            files = ["model.safetensors.index.json"]
    else:
        _write_transformers5_layout(hf, src)
    original = _load_all(src)
    prefix = "language_model.model." if layout.startswith("hub") else "model.language_model."
    assert any(k.startswith(prefix) for k in original)
    if layout == "hub-sharded":
        kinds = {}
        for k, (f, _) in original.items():
            kinds.setdefault(f, set()).add("language_model" in k)
        assert len(kinds) > 2 and {False} in kinds.values()
    ckpt = FullModelHFCheckpointer(src, files, None, tmp_path / "out")
    with caplog.at_level("INFO"):
        sd = ckpt.load_checkpoint()["model"]
    vision = [k for k in original if "vision_tower" in k or "multi_modal_projector" in k]
    assert len(vision) == len([k for k in original if "language_model" not in k])
    assert vision and f"skipped {len(vision)} other tensors" in caplog.text
    ours = from_hf_config(src).eval()
    ours.load_state_dict(sd)
    assert ours.output.weight is ours.tok_embeddings.weight
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), _hf_logits(hf), atol=ATOL, rtol=RTOL)

    processor = {"image_processor_type": "Gemma3ImageProcessor", "size": {"height": 28}}
    (src / "preprocessor_config.json").write_text(json.dumps(processor))
    ckpt.save_checkpoint({"model": ours.state_dict()}, epoch=0)
    out = tmp_path / "out/epoch_0"
    assert json.loads((out / "preprocessor_config.json").read_text()) == processor
    saved = _load_all(out)
    assert set(saved) == set(original)
    for k, (f, v) in original.items():
        assert saved[k][0] == f and torch.equal(saved[k][1], v), k
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (src / "config.json").read_text()
    )
    if layout == "hub-sharded":
        index = json.loads((out / files[0]).read_text())["weight_map"]
        assert index == json.loads((src / files[0]).read_text())["weight_map"]
    reloaded = Gemma3ForConditionalGeneration.from_pretrained(out, attn_implementation="eager")
    torch.testing.assert_close(_hf_logits(reloaded.eval()), _hf_logits(hf), atol=0, rtol=0)


def test_a_trained_untied_decoder_saves_into_the_multimodal_checkpoint(tmp_path):
    from safetensors.torch import load_file
    from transformers import Gemma3ForConditionalGeneration

    hf = tiny_multimodal(seed=3)
    hf.save_pretrained(tmp_path / "in")
    ckpt = FullModelHFCheckpointer(tmp_path / "in", ["model.safetensors"], None, tmp_path / "out")
    sd = ckpt.load_checkpoint()["model"]
    ours = from_hf_config(tmp_path / "in").eval()
    ours.load_state_dict(sd)
    # "Training": the decoder changes everywhere, and the output projection leaves the table.
    g = torch.Generator().manual_seed(5)
    trained = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
    ckpt.save_checkpoint({"model": trained}, epoch=1)
    out = tmp_path / "out/epoch_1"
    saved, original = (
        load_file(out / "model.safetensors"),
        load_file(tmp_path / "in/model.safetensors"),
    )
    assert "language_model.lm_head.weight" in saved
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    for k in original:
        is_vision = not k.startswith("language_model.")
        assert torch.equal(saved[k], original[k]) == is_vision, k
    reloaded = Gemma3ForConditionalGeneration.from_pretrained(out, attn_implementation="eager")
    untied = from_hf_config({**ckpt._config, "tie_word_embeddings": False}).eval()
    untied.load_state_dict(trained)
    with torch.no_grad():
        torch.testing.assert_close(
            untied(TOKENS), _hf_logits(reloaded.eval()), atol=ATOL, rtol=RTOL
        )


@pytest.mark.slow
def test_lora_adapter_loads_on_the_multimodal_model_with_peft(tmp_path):
    from peft import PeftModel
    from transformers import Gemma3ForConditionalGeneration

    hf = tiny_multimodal(seed=2)
    hf.save_pretrained(tmp_path / "in")
    ckpt = FullModelHFCheckpointer(tmp_path / "in", ["model.safetensors"], None, tmp_path / "out")
    sd = ckpt.load_checkpoint()["model"]
    lora = from_hf_config(
        tmp_path / "in",
        lora_attn_modules=["q_proj", "v_proj", "output_proj"],
        apply_lora_to_mlp=True,
        apply_lora_to_output=True,
        lora_rank=2,
        lora_alpha=4.0,
    ).eval()
    missing, unexpected = lora.load_state_dict(sd, strict=False)
    assert not unexpected and all(".lora_" in k for k in missing)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        base_logits = lora(TOKENS)
        # At the weights' scale: larger adapters grow the activations past fp32's 1e-5.
        for name, p in lora.named_parameters():
            if ".lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        assert (lora(TOKENS) - base_logits).abs().max() > 0.1
    adapter = {k: v for k, v in lora.state_dict().items() if ".lora_" in k}
    config = {
        "r": 2,
        "lora_alpha": 4.0,
        "target_modules": ["q_proj", "v_proj", "output_proj", "mlp", "output"],
    }
    out = ckpt.save_checkpoint({"model": sd, "adapter": adapter, "adapter_config": config}, epoch=0)

    # The adapter also loads back into our LoRA keys.
    again = FullModelHFCheckpointer(
        tmp_path / "in",
        ["model.safetensors"],
        None,
        tmp_path / "o2",
        adapter_checkpoint=out.parent / "epoch_0_peft",
    ).load_checkpoint()["adapter"]
    assert set(again) == set(adapter) and all(torch.equal(again[k], adapter[k]) for k in adapter)

    base = Gemma3ForConditionalGeneration.from_pretrained(
        tmp_path / "in", attn_implementation="eager"
    )
    peft = PeftModel.from_pretrained(base.eval(), out.parent / "epoch_0_peft").eval()
    adapted = {n for n, _ in peft.named_modules() if n.endswith("lora_A")}
    assert not [n for n in adapted if "vision_tower" in n]  # the tower has q_proj / v_proj too
    n_layers = BASE["num_hidden_layers"]
    assert len(adapted) == n_layers * 6 + 1  # q, v, o, gate, up, down per layer; lm_head
    with torch.no_grad():
        torch.testing.assert_close(
            lora(TOKENS), peft(input_ids=TOKENS).logits, atol=ATOL, rtol=RTOL
        )


def test_split_and_join_refuse_unknown_and_mixed_keys():
    t = torch.zeros(1)
    text, rest, layout = gemma3.split_multimodal(
        {
            "language_model.model.norm.weight": t,
            "vision_tower.x": t,
            "language_model.lm_head.weight": t,
        }
    )
    assert layout == "hub" and set(text) == {"model.norm.weight", "lm_head.weight"}
    assert set(rest) == {"vision_tower.x"}
    back = gemma3.join_multimodal(text, rest, layout)
    assert set(back) == {
        "language_model.model.norm.weight",
        "vision_tower.x",
        "language_model.lm_head.weight",
    }
    assert gemma3.split_multimodal({"model.vision_tower.x": t})[2] == "transformers5"
    with pytest.raises(ValueError, match="Unexpected key 'model.layers.0.x'"):
        gemma3.split_multimodal({"model.layers.0.x": t})
    with pytest.raises(ValueError, match="mixes the hub's key layout"):
        gemma3.split_multimodal({"language_model.model.norm.weight": t, "model.vision_tower.x": t})
    with pytest.raises(ValueError, match="Unknown Gemma 3 multimodal layout 'x'"):
        gemma3.join_multimodal(text, rest, "x")
