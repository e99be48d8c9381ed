# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Checkpointers: bit-exact round trips, parity of logits with HF, resume state, errors."""

import json
import os
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.test_utils import tiny_hf_llama
from tests.torchtune.utils.checkpoint_fixtures import (
    hf_state_dict,
    ours_like,
    tiny_hf,
    write_hf_checkpoint,
    write_meta_checkpoint,
)
from torchtune.utils import (
    FullModelHFCheckpointer,
    FullModelMetaCheckpointer,
    FullModelTorchTuneCheckpointer,
    safe_torch_load,
    validate_state_dict_shapes,
)

TOKENS = torch.tensor([[1, 17, 250, 3, 99, 320, 42, 7], [5, 0, 64, 128, 200, 11, 2, 300]])


def _read_any(path):
    return load_file(str(path)) if path.suffix == ".safetensors" else safe_torch_load(path)


def _assert_same_files(src_dir, out_dir, names):
    for name in names:
        a, b = _read_any(src_dir / name), _read_any(out_dir / name)
        assert list(a) == list(b) or sorted(a) == sorted(b), name
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{name}:{k}"


@pytest.mark.parametrize("num_kv_heads", [4, 2])
@pytest.mark.parametrize(
    "n_shards,fmt,via_index",
    [
        (1, "safetensors", False),
        (3, "safetensors", True),
        (2, "bin", True),
        (2, "safetensors", False),
    ],
)
def test_hf_round_trip_bit_exact(tmp_path, num_kv_heads, n_shards, fmt, via_index):
    hf = tiny_hf(num_kv_heads)
    names = write_hf_checkpoint(tmp_path / "in", hf, n_shards, fmt)
    index = [p.name for p in (tmp_path / "in").glob("*.index.json")]
    files = index if via_index else names
    ckpt = FullModelHFCheckpointer(tmp_path / "in", files, "LLAMA2", tmp_path / "out")
    sd = ckpt.load_checkpoint()["model"]
    assert all(k.startswith(("tok_embeddings", "layers.", "norm.", "output.")) for k in sd)
    out = ckpt.save_checkpoint({"model": sd}, epoch=0)
    assert out == tmp_path / "out" / "epoch_0"
    _assert_same_files(tmp_path / "in", out, names)
    assert (out / "config.json").read_text() == (tmp_path / "in" / "config.json").read_text()
    if n_shards > 1:
        src_index = json.loads(next((tmp_path / "in").glob("*.index.json")).read_text())
        new_index = json.loads(next(out.glob("*.index.json")).read_text())
        assert new_index["weight_map"] == src_index["weight_map"]
        assert new_index["metadata"]["total_size"] == src_index["metadata"]["total_size"]
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_meta_round_trip_bit_exact(tmp_path, num_kv_heads):
    name = write_meta_checkpoint(tmp_path / "in", tiny_hf(num_kv_heads))
    # Meta files may carry a RoPE table; it is not loaded but must survive the round trip.
    sd = torch.load(tmp_path / "in" / name, weights_only=True)
    sd["rope.freqs"] = torch.randn(8)
    torch.save(sd, tmp_path / "in" / name)
    ckpt = FullModelMetaCheckpointer(tmp_path / "in", [name], "LLAMA2", tmp_path / "out")
    model = ckpt.load_checkpoint()["model"]
    assert "rope.freqs" not in model and "norm.scale" in model
    out = ckpt.save_checkpoint({"model": model}, epoch=3)
    _assert_same_files(tmp_path / "in", out, [name])
    assert json.loads((out / "params.json").read_text())["n_kv_heads"] == num_kv_heads


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_torchtune_round_trip(tmp_path, suffix):
    hf = tiny_hf()
    ours = ours_like(hf)
    files = [f"a{suffix}", f"b{suffix}"]
    sd = {k: v.clone() for k, v in ours.state_dict().items()}
    keys = list(sd)
    (tmp_path / "in").mkdir()
    for name, part in zip(files, (keys[:7], keys[7:])):
        shard = {k: sd[k] for k in part}
        if suffix == ".pt":
            torch.save(shard, tmp_path / "in" / name)
        else:
            from safetensors.torch import save_file

            save_file(shard, str(tmp_path / "in" / name))
    ckpt = FullModelTorchTuneCheckpointer(tmp_path / "in", files, "llama2", tmp_path / "out")
    loaded = ckpt.load_checkpoint()["model"]
    validate_state_dict_shapes(ours.state_dict(), loaded)
    out = ckpt.save_checkpoint({"model": loaded}, epoch=1)
    _assert_same_files(tmp_path / "in", out, files)
    index = (
        "model.safetensors.index.json"
        if suffix == ".safetensors"
        else "pytorch_model.pt.index.json"
    )
    assert json.loads((out / index).read_text())["weight_map"][keys[0]] == files[0]


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_hf_and_meta_give_identical_logits_and_match_hf(tmp_path, num_kv_heads):
    hf = tiny_hf(num_kv_heads, seed=1)
    write_hf_checkpoint(tmp_path / "hf", hf, n_shards=2)
    name = write_meta_checkpoint(tmp_path / "meta", hf)
    from_hf = FullModelHFCheckpointer(
        tmp_path / "hf", ["model.safetensors.index.json"], "LLAMA2", tmp_path / "o1"
    ).load_checkpoint()["model"]
    from_meta = FullModelMetaCheckpointer(
        tmp_path / "meta", [name], "LLAMA2", tmp_path / "o2"
    ).load_checkpoint()["model"]
    logits = []
    for sd in (from_hf, from_meta):
        model = ours_like(hf)
        model.load_state_dict(sd)
        with torch.no_grad():
            logits.append(model(TOKENS))
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)
    with torch.no_grad():
        ref = hf(TOKENS).logits
    torch.testing.assert_close(logits[0], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_shards", [1, 2])
def test_saved_hf_checkpoint_loads_with_from_pretrained(tmp_path, n_shards):
    from transformers import AutoModelForCausalLM

    hf = tiny_hf(2, seed=2)
    names = write_hf_checkpoint(tmp_path / "in", hf, n_shards)
    files = names if n_shards == 1 else ["model.safetensors.index.json"]
    ckpt = FullModelHFCheckpointer(tmp_path / "in", files, "LLAMA2", tmp_path / "out")
    model = ours_like(hf)
    model.load_state_dict(ckpt.load_checkpoint()["model"])
    # "Train" a little so the saved weights differ from the input.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        ours = model(TOKENS)
    out = ckpt.save_checkpoint({"model": model.state_dict()}, epoch=0)
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    with torch.no_grad():
        theirs = reloaded(TOKENS).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_recipe_state_round_trip_on_resume(tmp_path):
    hf = tiny_hf()
    names = write_hf_checkpoint(tmp_path / "in", hf)
    ckpt = FullModelHFCheckpointer(tmp_path / "in", names, "LLAMA2", tmp_path / "out")
    sd = ckpt.load_checkpoint()["model"]
    param = torch.nn.Parameter(torch.randn(5, 3))
    opt = torch.optim.AdamW([param], lr=0.1)
    param.sum().backward()
    opt.step()
    state = {
        "model": sd,
        "optimizer": opt.state_dict(),
        "epochs_run": 2,
        "total_epochs": 3,
        "seed": 7,
        "rng_state": torch.get_rng_state(),
        "py_rng_state": random.getstate(),
        "data_position": {"epoch": 1, "step": 11},
    }
    out = ckpt.save_checkpoint(state, epoch=1, intermediate_checkpoint=True)
    assert out == tmp_path / "out" / "epoch_1"
    recipe_file = tmp_path / "out" / "epoch_1_state" / "recipe_state.pt"
    assert recipe_file.is_file() and not (out / "recipe_state.pt").exists()
    # Resume from the intermediate checkpoint: the epoch folder is itself an HF checkpoint.
    resumed = FullModelHFCheckpointer(
        out,
        names,
        "LLAMA2",
        tmp_path / "out2",
        recipe_checkpoint=recipe_file,
        resume_from_checkpoint=True,
    ).load_checkpoint()
    assert set(resumed) == set(state)
    for k in sd:
        assert torch.equal(resumed["model"][k], sd[k])
    assert torch.equal(resumed["rng_state"], state["rng_state"])
    assert tuple(resumed["py_rng_state"][1]) == state["py_rng_state"][1]
    assert resumed["epochs_run"] == 2 and resumed["data_position"] == {"epoch": 1, "step": 11}
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(5, 3))], lr=0.1)
    opt2.load_state_dict(resumed["optimizer"])
    for name in ("exp_avg", "exp_avg_sq", "step"):
        got, want = opt2.state_dict()["state"][0][name], opt.state_dict()["state"][0][name]
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # A final (non-intermediate) checkpoint has no recipe state.
    ckpt.save_checkpoint(state, epoch=2)
    assert not (tmp_path / "out" / "epoch_2_state").exists()


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {_RunsCode.marker}",))


@pytest.mark.parametrize(
    "checkpointer,name",
    [
        (FullModelMetaCheckpointer, "consolidated.00.pth"),
        (FullModelHFCheckpointer, "pytorch_model.bin"),
    ],
)
def test_pickle_with_code_is_refused(tmp_path, checkpointer, name):
    hf = tiny_hf()
    write_hf_checkpoint(tmp_path, hf, fmt="bin")
    write_meta_checkpoint(tmp_path, hf)
    _RunsCode.marker = tmp_path / "pwned"
    if name.endswith(".bin"):
        sd = hf_state_dict(hf)
    else:
        sd = torch.load(tmp_path / name, weights_only=True)
    sd["extra"] = _RunsCode()
    torch.save(sd, tmp_path / name)
    ckpt = checkpointer(tmp_path, [name], "LLAMA2", tmp_path / "out")
    with pytest.raises(ValueError, match=f"Refusing to load .*{name}"):
        ckpt.load_checkpoint()
    assert not _RunsCode.marker.exists()


def test_errors_name_the_problem(tmp_path):
    hf = tiny_hf()
    names = write_hf_checkpoint(tmp_path / "in", hf, n_shards=2)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        FullModelHFCheckpointer(
            tmp_path / "in", [names[0], "nope.safetensors"], "LLAMA2", tmp_path / "o"
        )
    with pytest.raises(ValueError, match="Unknown model_type 'GPT9'"):
        FullModelHFCheckpointer(tmp_path / "in", names, "GPT9", tmp_path / "o")
    # Resume without recipe_checkpoint needs a complete checkpoint in output_dir.
    with pytest.raises(FileNotFoundError, match="no complete checkpoint.*checkpoints.json"):
        FullModelHFCheckpointer(
            tmp_path / "in", names, "LLAMA2", tmp_path / "o", resume_from_checkpoint=True
        )
    # An index naming a shard that is not there.
    (tmp_path / "in" / names[1]).rename(tmp_path / "in" / "moved")
    with pytest.raises(FileNotFoundError, match=names[1]):
        FullModelHFCheckpointer(
            tmp_path / "in", ["model.safetensors.index.json"], "LLAMA2", tmp_path / "o"
        )
    (tmp_path / "in" / "moved").rename(tmp_path / "in" / names[1])
    (tmp_path / "in" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        FullModelHFCheckpointer(tmp_path / "in", names, "LLAMA2", tmp_path / "o")


def test_checkpoint_of_another_size_names_key_and_shapes(tmp_path):
    # Weights of a wider model next to the small model's config.json.
    write_hf_checkpoint(tmp_path, tiny_hf_llama(0, hidden_size=96))
    small = tiny_hf(2)
    small.config.to_json_file(str(tmp_path / "config.json"))
    ckpt = FullModelHFCheckpointer(tmp_path, ["model.safetensors"], "LLAMA2", tmp_path / "o")
    msg = r"'lm_head\.weight' in .*model\.safetensors has shape \(321, 96\) but config\.json .*\(321, 64\)"
    with pytest.raises(ValueError, match=msg):
        ckpt.load_checkpoint()
    # A checkpoint with fewer layers than the model.
    model = ours_like(small)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("layers.2.")}
    with pytest.raises(ValueError, match=r"missing keys \['layers\.2\."):
        validate_state_dict_shapes(model.state_dict(), sd)
    sd = dict(model.state_dict(), **{"norm.scale": torch.ones(65)})
    msg = r"'norm.scale' has shape \(65,\) in the checkpoint but the model expects \(64,\)"
    with pytest.raises(ValueError, match=msg):
        validate_state_dict_shapes(model.state_dict(), sd)


def test_save_needs_matching_keys(tmp_path):
    names = write_hf_checkpoint(tmp_path, tiny_hf())
    ckpt = FullModelHFCheckpointer(tmp_path, names, "LLAMA2", tmp_path / "o")
    with pytest.raises(ValueError, match="call load_checkpoint"):
        ckpt.save_checkpoint({"model": {}}, epoch=0)
    sd = ckpt.load_checkpoint()["model"]
    del sd["norm.scale"]
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\]"):
        ckpt.save_checkpoint({"model": sd}, epoch=0)


_CRASH_SCRIPT = """
import os, sys, torch
import torchtune.utils._checkpointing._io as io
from torchtune.utils import FullModelHFCheckpointer

src, out, epoch = sys.argv[1], sys.argv[2], int(sys.argv[3])
ckpt = FullModelHFCheckpointer(src, ["model.safetensors.index.json"], "LLAMA2", out)
sd = ckpt.load_checkpoint()["model"]
real, calls = io._write_state_dict, []

def write_then_die(state_dict, path, fmt):
    if calls:
        os._exit(17)  # the process dies mid-save: no cleanup, no exception handling
    calls.append(path)
    real(state_dict, path, fmt)

io._write_state_dict = write_then_die
ckpt.save_checkpoint({"model": {k: v + 1 for k, v in sd.items()}}, epoch=epoch)
"""


@pytest.mark.parametrize("how", ["exception", pytest.param("killed", marks=pytest.mark.slow)])
def test_interrupted_save_leaves_last_checkpoint_whole(tmp_path, monkeypatch, how):
    import subprocess
    import sys

    import torchtune.utils._checkpointing._io as io

    hf = tiny_hf()
    write_hf_checkpoint(tmp_path / "in", hf, n_shards=3)
    ckpt = FullModelHFCheckpointer(
        tmp_path / "in", ["model.safetensors.index.json"], "LLAMA2", tmp_path / "out"
    )
    good = ckpt.load_checkpoint()["model"]
    ckpt.save_checkpoint({"model": good}, epoch=0)

    def crash(epoch):
        if how == "killed":
            proc = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    _CRASH_SCRIPT,
                    str(tmp_path / "in"),
                    str(tmp_path / "out"),
                    str(epoch),
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert proc.returncode == 17, proc.stderr
            return
        real = io._write_state_dict
        calls = []

        def write_then_fail(state_dict, path, fmt):
            if calls:
                raise OSError("disk full")
            calls.append(path)
            real(state_dict, path, fmt)

        monkeypatch.setattr(io, "_write_state_dict", write_then_fail)
        with pytest.raises(OSError, match="disk full"):
            ckpt.save_checkpoint({"model": {k: v + 1 for k, v in good.items()}}, epoch=epoch)
        monkeypatch.setattr(io, "_write_state_dict", real)

    crash(epoch=0)  # overwriting the last good checkpoint
    crash(epoch=1)  # writing the next one
    # epoch_0 is still the old checkpoint, whole, and loads; epoch_1 has no model file at all.
    reloaded = FullModelHFCheckpointer(
        tmp_path / "out" / "epoch_0", ["model.safetensors.index.json"], "LLAMA2", tmp_path / "x"
    ).load_checkpoint()["model"]
    for k in good:
        assert torch.equal(reloaded[k], good[k]), k
    epoch_1 = tmp_path / "out" / "epoch_1"
    assert not [p for p in epoch_1.glob("*") if not p.name.endswith(".tmp")]
    if how == "exception":
        assert not list((tmp_path / "out").glob("epoch_*/*.tmp"))


def test_transformers_save_pretrained_layout_round_trips_in_bf16(tmp_path):
    """A real ``save_pretrained`` sharded folder, given through config.instantiate as YAML would."""
    from omegaconf import OmegaConf

    from torchtune import config

    hf = tiny_hf(2, seed=3).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "in", max_shard_size="60KB")
    index = json.loads((tmp_path / "in" / "model.safetensors.index.json").read_text())
    names = sorted(set(index["weight_map"].values()))
    assert len(names) > 1
    cfg = OmegaConf.create(
        {
            "_component_": "torchtune.utils.FullModelHFCheckpointer",
            "checkpoint_dir": str(tmp_path / "in"),
            "checkpoint_files": ["model.safetensors.index.json"],
            "model_type": "LLAMA2",
            "output_dir": str(tmp_path / "out"),
        }
    )
    ckpt = config.instantiate(cfg)
    sd = ckpt.load_checkpoint()["model"]
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    out = ckpt.save_checkpoint({"model": sd}, epoch=0)
    _assert_same_files(tmp_path / "in", out, names)
    new_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert new_index["weight_map"] == index["weight_map"]
    assert new_index["metadata"]["total_size"] == sum(v.numel() * 2 for v in sd.values())
    assert (out / "generation_config.json").is_file()


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt"])
def test_corrupt_or_wrong_payload_names_the_file(tmp_path, name):
    good = {"norm.scale": torch.ones(4)}
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(good, str(tmp_path / name))
    else:
        torch.save(good, tmp_path / name)
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    ckpt = FullModelTorchTuneCheckpointer(tmp_path, [name], "LLAMA2", tmp_path / "o")
    with pytest.raises(ValueError, match=f"Could not read .*{name}"):
        ckpt.load_checkpoint()
    if name.endswith(".pt"):
        torch.save([torch.ones(2)], tmp_path / name)
        with pytest.raises(ValueError, match=f"{name} does not hold a flat state dict"):
            ckpt.load_checkpoint()


def test_tied_embeddings_load_and_save_back_in_the_input_format(tmp_path):
    """A tied HF checkpoint (no lm_head in the file): logits match HF; saved untouched it is the
    same tied file; once the output projection moves, from_pretrained gets an untied model
    with exactly our logits."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from tests.test_utils import tiny_hf_llama_config

    config = tiny_hf_llama_config()
    config.tie_word_embeddings = True
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "in", safe_serialization=True)
    assert "lm_head.weight" not in load_file(str(tmp_path / "in" / "model.safetensors"))

    ckpt = FullModelHFCheckpointer(
        tmp_path / "in", ["model.safetensors"], "LLAMA2", tmp_path / "out"
    )
    model = ours_like(hf)
    model.load_state_dict(ckpt.load_checkpoint()["model"])
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), hf(TOKENS).logits, rtol=0, atol=1e-5)

    out = ckpt.save_checkpoint({"model": model.state_dict()}, epoch=0)
    _assert_same_files(tmp_path / "in", out, ["model.safetensors"])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True

    with torch.no_grad():
        model.output.weight.add_(0.01 * torch.randn_like(model.output.weight))
        ours = model(TOKENS)
    out = ckpt.save_checkpoint({"model": model.state_dict()}, epoch=1)
    saved = load_file(str(out / "model.safetensors"))
    assert torch.equal(saved["lm_head.weight"], model.output.weight)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, ours, rtol=0, atol=1e-5)


def test_hf_family_comes_from_config_json_when_model_type_is_omitted(tmp_path):
    hf = tiny_hf(2, seed=2)
    names = write_hf_checkpoint(tmp_path / "in", hf)
    by_type = FullModelHFCheckpointer(tmp_path / "in", names, "LLAMA2", tmp_path / "o1")
    for ckpt in (
        FullModelHFCheckpointer(tmp_path / "in", names, output_dir=tmp_path / "o2"),
        FullModelHFCheckpointer(tmp_path / "in", names, None, tmp_path / "o3"),
    ):
        sd, want = ckpt.load_checkpoint()["model"], by_type.load_checkpoint()["model"]
        assert sorted(sd) == sorted(want) and all(torch.equal(sd[k], want[k]) for k in sd)
        out = ckpt.save_checkpoint({"model": sd}, epoch=0)
        _assert_same_files(tmp_path / "in", out, names)

    config = json.loads((tmp_path / "in" / "config.json").read_text())
    assert config["model_type"] == "llama"
    for model_type, value, match in (
        (None, "falcon", r"Unknown HF model_type 'falcon'; supported: \['llama', 'qwen2'"),
        ("LLAMA2", "mistral", r"is for model_type 'mistral', not the llama2 family's"),
        (None, None, r"config\.json has no 'model_type'; pass model_type"),
    ):
        bad = {k: v for k, v in config.items() if k != "model_type"}
        if value is not None:
            bad["model_type"] = value
        (tmp_path / "in" / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            FullModelHFCheckpointer(tmp_path / "in", names, model_type, tmp_path / "o")


def test_meta_and_torchtune_need_model_type_and_all_need_output_dir(tmp_path):
    name = write_meta_checkpoint(tmp_path, tiny_hf())
    with pytest.raises(ValueError, match=r"FullModelMetaCheckpointer needs model_type, one of"):
        FullModelMetaCheckpointer(tmp_path, [name], output_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="FullModelTorchTuneCheckpointer needs model_type"):
        FullModelTorchTuneCheckpointer(tmp_path, [name], output_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="FullModelMetaCheckpointer needs output_dir"):
        FullModelMetaCheckpointer(tmp_path, [name], "LLAMA2")
    with pytest.raises(ValueError, match="Unknown model_type 'GPT9'"):
        FullModelMetaCheckpointer(tmp_path, [name], "GPT9", tmp_path / "o")


def test_tied_builder_model_saves_back_a_tied_file(tmp_path):
    """With the builder's tie knob the output projection is the embedding, so training keeps
    them equal and the saved HF file stays tied (no lm_head), matching from_pretrained."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from tests.test_utils import tiny_hf_llama_config
    from torchtune.models._families import family_for_hf_model_type

    config = tiny_hf_llama_config(tie_word_embeddings=True)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "in", safe_serialization=True)
    ckpt = FullModelHFCheckpointer(tmp_path / "in", ["model.safetensors"], None, tmp_path / "out")
    family = family_for_hf_model_type(config.model_type)
    model = family.builder(**family.hf_config_to_builder_kwargs(config.to_dict())).eval()
    model.load_state_dict(ckpt.load_checkpoint()["model"])
    assert model.output.weight is model.tok_embeddings.weight
    with torch.no_grad():
        model.tok_embeddings.weight.add_(0.01 * torch.randn_like(model.tok_embeddings.weight))
        ours = model(TOKENS)
    out = ckpt.save_checkpoint({"model": model.state_dict()}, epoch=0)
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_llama3_config_through_the_hf_checkpointer_and_back_to_from_pretrained(tmp_path, tied):
    """A Llama 3-style checkpoint (llama3 RoPE scaling, head_dim, attention and MLP biases,
    tied or not): from_hf_config + the checkpointer give HF's logits; after a training step
    the saved folder loads with from_pretrained to our logits, config.json unchanged and, when
    tied, no lm_head written."""
    from transformers import AutoModelForCausalLM

    from torchtune.models import from_hf_config

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}
    scaling.update(high_freq_factor=4.0, original_max_position_embeddings=32)
    hf = tiny_hf_llama(
        0,
        head_dim=24,
        attention_bias=True,
        mlp_bias=True,
        rope_theta=500_000.0,
        rope_scaling=scaling,
        tie_word_embeddings=tied,
    )
    hf.save_pretrained(tmp_path / "in", safe_serialization=True)
    tokens = torch.randint(0, 321, (2, 48), generator=torch.Generator().manual_seed(1))
    ckpt = FullModelHFCheckpointer(tmp_path / "in", ["model.safetensors"], None, tmp_path / "out")
    model = from_hf_config(tmp_path / "in").eval()
    model.load_state_dict(ckpt.load_checkpoint()["model"], strict=True)
    assert (model.output.weight is model.tok_embeddings.weight) == tied
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=0, atol=1e-5)

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    logits = model(tokens)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    opt.step()
    with torch.no_grad():
        ours = model(tokens)
    out = ckpt.save_checkpoint({"model": model.state_dict()}, epoch=0)
    saved = load_file(str(out / "model.safetensors"))
    assert ("lm_head.weight" in saved) == (not tied)
    assert (out / "config.json").read_bytes() == (tmp_path / "in" / "config.json").read_bytes()
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, ours, rtol=0, atol=1e-5)
    if tied:  # the tied parameter listed once saves the same files
        once = dict(model.named_parameters())
        assert "output.weight" not in once
        out1 = load_file(str(ckpt.save_checkpoint({"model": once}, epoch=1) / "model.safetensors"))
        assert out1.keys() == saved.keys() and all(torch.equal(out1[k], saved[k]) for k in saved)
