# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""End-to-end tests of ``lora_dpo_single_device`` on a tiny model, on CPU, against a plain
transformers + PEFT preference-tuning loop (DPO, IPO, SimPO)."""

import json
import math
import random
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from tests.recipes.single_device_utils import (
    build_tiny_assets,
    load_hf_model,
    read_disk_log,
    run_tune,
    tiny_overrides,
)
from tests.test_utils import sample_corpus
from torchtune import config
from torchtune._recipe_registry import get_config
from torchtune.data import padded_collate_pairs, padding_id
from torchtune.recipes import lora_dpo_single_device

RECIPE = str(Path(lora_dpo_single_device.__file__))
CONFIG = str(get_config("tiny/lora_dpo").file_path)
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies")
METRICS += ("rewards/margins", "logps/chosen", "logps/rejected")
RANK, ALPHA = 4, 8
# 40 pairs, batches of 2, 2 micro-batches per step: 10 steps an epoch, 5 of them taken.
RUN_OVERRIDES = [
    "shuffle=False",
    "batch_size=2",
    "gradient_accumulation_steps=2",
    "epochs=2",
    "max_steps_per_epoch=5",
    "optimizer.lr=3e-3",
    "optimizer.weight_decay=0.01",
    "lr_scheduler.num_warmup_steps=2",
    f"model.lora_rank={RANK}",
    f"model.lora_alpha={ALPHA}",
    "model.lora_attn_modules=[q_proj,v_proj]",
    "clip_grad_norm=1.0",
]
LOSSES = {
    "dpo": ["loss._component_=torchtune.rlhf.DPOLoss", "loss.beta=0.2", "loss.label_smoothing=0.1"],
    "ipo": ["loss._component_=torchtune.rlhf.IPOLoss", "~loss.beta", "~loss.label_smoothing"]
    + ["+loss.tau=0.5"],
    "simpo": ["loss._component_=torchtune.rlhf.SimPOLoss", "loss.beta=2.0", "~loss.label_smoothing"]
    + ["+loss.gamma=0.5"],
}


def _write_pairs(path: Path, n: int = 40) -> Path:
    rng = random.Random(0)
    lines = sample_corpus(n_lines=3 * n, seed=3)
    rows = [
        {
            "prompt": lines[3 * i],
            "chosen": lines[3 * i + 1],
            "rejected": lines[3 * i + 2][: rng.randint(5, 60)],
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_assets")
    assets = build_tiny_assets(root, n_samples=2)
    assets.data = _write_pairs(root / "pairs.jsonl")
    return assets


@pytest.fixture(scope="module")
def peft_adapter(assets, tmp_path_factory):
    """A PEFT adapter folder with non-zero A and B (so the reference is not the base)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        load_hf_model(assets.model_dir),
        LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    peft_model.save_pretrained(folder)
    return folder


def _overrides(assets, out, *extra):
    return tiny_overrides(assets, out) + RUN_OVERRIDES + list(extra)


def _logps(model, batch):
    logits = model(input_ids=batch["tokens"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    scored = labels != -100
    token_logps = torch.gather(
        F.log_softmax(logits, -1), 2, labels.clamp(min=0).unsqueeze(-1)
    ).squeeze(-1)
    return (token_logps * scored).sum(1), scored.sum(1)


def _pair_loss(kind, pc, pr, rc, rr, nc, nr):
    """The three losses from their papers' formulas (TRL's conventions), per pair."""
    if kind == "dpo":
        h = 0.2 * ((pc - rc) - (pr - rr))
        return -0.9 * F.logsigmoid(h) - 0.1 * F.logsigmoid(-h), 0.2 * (pc - rc), 0.2 * (pr - rr)
    if kind == "ipo":
        d = (pc - rc) / nc - (pr - rr) / nr
        return (d - 1 / (2 * 0.5)) ** 2, 0.5 * (pc - rc), 0.5 * (pr - rr)
    ac, ar = pc / nc, pr / nr
    return -F.logsigmoid(2.0 * (ac - ar) - 0.5), 2.0 * ac, 2.0 * ar


def _reference_loop(kind, cfg, assets, adapter_dir, steps=10):
    """A transformers + PEFT loop: the policy starts from ``adapter_dir``; the reference is a
    second PEFT model with that adapter, frozen."""
    from peft import PeftModel
    from transformers import get_cosine_schedule_with_warmup

    policy = PeftModel.from_pretrained(
        load_hf_model(assets.model_dir), adapter_dir, is_trainable=True
    ).train()
    reference = PeftModel.from_pretrained(load_hf_model(assets.model_dir), adapter_dir).eval()
    tokenizer = config.instantiate(cfg.tokenizer)
    ds = config.instantiate(cfg.dataset, tokenizer=tokenizer)
    collate = partial(padded_collate_pairs, padding_idx=padding_id(tokenizer))
    loader = DataLoader(ds, batch_size=2, shuffle=False, collate_fn=collate)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=steps)
    rows = []
    for _epoch in range(2):
        batches = iter(loader)
        for _ in range(steps // 2):
            micro = [next(batches), next(batches)]
            n_pairs = sum(mb["tokens"].shape[0] // 2 for mb in micro)
            sums = torch.zeros(7, dtype=torch.float64)
            for mb in micro:
                with torch.no_grad():
                    ref, _ = _logps(reference, mb)
                logps, lengths = _logps(policy, mb)
                (pc, pr), (rc, rr) = logps.chunk(2), ref.chunk(2)
                nc, nr = lengths.chunk(2)
                losses, cr, rj = _pair_loss(kind, pc, pr, rc, rr, nc, nr)
                (losses.sum() / n_pairs).backward()
                cr, rj = cr.detach(), rj.detach()
                stats = [
                    losses.detach(),
                    cr,
                    rj,
                    (cr > rj).float(),
                    cr - rj,
                    pc.detach(),
                    pr.detach(),
                ]
                sums += torch.stack(stats).sum(1).double()
            torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
            opt.step()
            opt.zero_grad()
            sched.step()
            rows.append(dict(zip(METRICS, (sums / n_pairs).tolist())))
    return rows


def _cfg(overrides):
    return config.load_config(CONFIG, overrides)


def _check_against_reference(kind, assets, peft_adapter, out):
    overrides = _overrides(
        assets, out, f"checkpointer.adapter_checkpoint={peft_adapter}", *LOSSES[kind]
    )
    run_tune(RECIPE, CONFIG, overrides, cwd=out)
    ours = read_disk_log(out)
    expected = _reference_loop(kind, _cfg(overrides), assets, peft_adapter)
    assert [r["step"] for r in ours] == list(range(1, 11))
    for name in METRICS:
        got = torch.tensor([r[name] for r in ours], dtype=torch.float64)
        want = torch.tensor([r[name] for r in expected], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4, msg=f"{kind} {name}")
    for r in ours:
        assert {"lr", "tokens_per_second"} <= set(r)
    return overrides


def test_dpo_matches_peft_loop_from_a_peft_adapter(assets, peft_adapter, tmp_path):
    _check_against_reference("dpo", assets, peft_adapter, tmp_path)
    # Starting from an adapter, step 1 is at the reference: ln 2 and zero rewards.
    first = read_disk_log(tmp_path)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ipo", "simpo"])
def test_ipo_and_simpo_match_peft_loop(assets, peft_adapter, tmp_path, kind):
    _check_against_reference(kind, assets, peft_adapter, tmp_path)


def test_fresh_adapter_starts_at_ln2_with_zero_rewards(assets, tmp_path):
    extra = ["epochs=1", "max_steps_per_epoch=2", "lr_scheduler.num_warmup_steps=0"]
    overrides = _overrides(assets, tmp_path, *extra)
    run_tune(RECIPE, CONFIG, overrides, cwd=tmp_path)
    rows = read_disk_log(tmp_path)
    assert len(rows) == 2
    first = rows[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first[name] == pytest.approx(0.0, abs=1e-7)
    assert first["rewards/accuracies"] == 0.0
    assert abs(rows[1]["rewards/margins"]) > 1e-6  # the adapter moved off the reference
    assert (tmp_path / "epoch_1_peft" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_resume_gives_the_uninterrupted_second_epoch(assets, peft_adapter, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    overrides = _check_against_reference("dpo", assets, peft_adapter, full)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    run_tune(
        RECIPE,
        CONFIG,
        overrides
        + [
            f"checkpointer.adapter_checkpoint={full / 'epoch_1_adapter' / 'adapter.safetensors'}",
            f"checkpointer.recipe_checkpoint={full / 'epoch_1_state' / 'recipe_state.pt'}",
            "resume_from_checkpoint=True",
            f"output_dir={resumed}",
        ],
        cwd=resumed,
    )
    ours, theirs = read_disk_log(resumed), read_disk_log(full)[5:]
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(6, 11))
    for name in METRICS:
        torch.testing.assert_close(
            torch.tensor([r[name] for r in ours]),
            torch.tensor([r[name] for r in theirs]),
            rtol=0,
            atol=1e-6,
            msg=name,
        )


@pytest.mark.slow
def test_compile_gives_the_same_metrics(assets, peft_adapter, tmp_path):
    """`compile=True` (each decoder layer compiled; the reference forward runs the same
    layers with the adapters swapped or off) logs the eager run's metrics within 1e-5."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    for out, extra in ((eager, []), (compiled, ["compile=True"])):
        out.mkdir()
        overrides = _overrides(
            assets,
            out,
            f"checkpointer.adapter_checkpoint={peft_adapter}",
            "epochs=1",
            "max_steps_per_epoch=4",
        )
        run_tune(RECIPE, CONFIG, overrides + extra, cwd=out)
    rows_e, rows_c = read_disk_log(eager), read_disk_log(compiled)
    assert len(rows_e) == len(rows_c) == 4
    for name in METRICS:
        got = torch.tensor([r[name] for r in rows_c], dtype=torch.float64)
        want = torch.tensor([r[name] for r in rows_e], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "variant", [["model.use_dora=True"], ["model.quantize_base=True"]], ids=["dora", "qlora"]
)
def test_dora_and_qlora_start_at_the_reference(assets, tmp_path, variant):
    """With a fresh DoRA adapter (magnitude = the base column norms) or over an NF4 base, the
    policy starts equal to its reference (the same model with adapters off): ln 2 and zero
    rewards; then the adapter moves."""
    extra = ["epochs=1", "max_steps_per_epoch=2", "lr_scheduler.num_warmup_steps=0", *variant]
    run_tune(RECIPE, CONFIG, _overrides(assets, tmp_path, *extra), cwd=tmp_path)
    rows = read_disk_log(tmp_path)
    assert len(rows) == 2
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert rows[0][name] == pytest.approx(0.0, abs=1e-6)
    assert abs(rows[1]["rewards/margins"]) > 1e-6


def test_step_checkpoint_resume_by_one_switch_matches_the_uninterrupted_run(
    assets, peft_adapter, tmp_path
):
    """From a PEFT adapter (so the frozen reference adapter must come back from
    ``recipe_state.pt``), with dropout drawing from the RNG: a copy of the finished run cut
    back to its mid-epoch ``step_6`` resumes with ``resume_from_checkpoint=True`` alone and logs
    the uninterrupted run's steps 7-10 and ends with its adapter, bit for bit."""
    from safetensors.torch import load_file

    from torchtune.utils import read_checkpoints

    straight = tmp_path / "straight"
    extra = [f"checkpointer.adapter_checkpoint={peft_adapter}", "save_every_n_steps=3"]
    extra += ["model.lora_dropout=0.1"]
    run_tune(RECIPE, CONFIG, _overrides(assets, straight, *extra), cwd=tmp_path)
    entries = read_checkpoints(straight)
    names = ["step_3", "epoch_1", "step_6", "step_9", "epoch_2"]
    assert [e["name"] for e in entries] == names
    assert [e["final"] for e in entries] == [False] * 4 + [True]
    assert (entries[2]["epochs_run"], entries[2]["steps_in_epoch"]) == (1, 1)

    cut = tmp_path / "cut"
    shutil.copytree(straight, cut)
    index = json.loads((cut / "checkpoints.json").read_text())
    index["checkpoints"] = index["checkpoints"][:3]  # as if killed during step 7
    (cut / "checkpoints.json").write_text(json.dumps(index))
    log_dir = tmp_path / "resumed_log"
    resume = [f"metric_logger.log_dir={log_dir}", "resume_from_checkpoint=True"]
    # The PEFT folder stays in the config: the one switch takes the run's own adapter.
    run_tune(RECIPE, CONFIG, _overrides(assets, cut, *extra, *resume), cwd=tmp_path)
    ours, theirs = read_disk_log(log_dir), read_disk_log(straight)[6:]
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(7, 11))
    for name in (*METRICS, "lr"):
        assert [r[name] for r in ours] == [r[name] for r in theirs], (name, ours, theirs)
    a = load_file(straight / "epoch_2_adapter" / "adapter.safetensors")
    b = load_file(cut / "epoch_2_adapter" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_max_steps_ends_the_run_mid_epoch(assets, tmp_path):
    run_tune(RECIPE, CONFIG, _overrides(assets, tmp_path, "max_steps=7"), cwd=tmp_path)
    assert [r["step"] for r in read_disk_log(tmp_path)] == list(range(1, 8))
    from torchtune.utils import read_checkpoints

    entries = read_checkpoints(tmp_path)
    assert [(e["name"], e["final"]) for e in entries] == [("epoch_1", False), ("step_7", True)]
    assert (tmp_path / "step_7_peft" / "adapter_config.json").is_file()
