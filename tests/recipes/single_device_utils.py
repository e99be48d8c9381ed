# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Shared pieces of the single-device recipe tests: tiny assets, the CLI runner, reference
loops over Hugging Face / PEFT models."""

import json
import subprocess
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from tests.test_utils import tiny_hf_llama, train_sentencepiece, write_alpaca_json
from torchtune import config
from torchtune.data import padded_collate, padding_id

VOCAB_SIZE = 400  # the tokenizer's; the HF model is built to match it


@dataclass
class TinyAssets:
    model_dir: Path
    tokenizer: Path
    data: Path


def build_tiny_assets(root: Path, n_samples: int = 40) -> TinyAssets:
    """An HF-format tiny Llama2 (vocab 400), a 400-piece SentencePiece model, Alpaca data."""
    model_dir = root / "hf_model"
    tiny_hf_llama(seed=0, vocab_size=VOCAB_SIZE).save_pretrained(model_dir, safe_serialization=True)
    tokenizer = train_sentencepiece(root / "tok" / "sp", vocab_size=VOCAB_SIZE)
    data = write_alpaca_json(root / "alpaca.json", n=n_samples)
    return TinyAssets(model_dir, tokenizer, data)


def tiny_overrides(assets: TinyAssets, output_dir: Path) -> List[str]:
    """Point a ``tiny/*`` config at the test assets (and size the model like them)."""
    return [
        f"checkpointer.checkpoint_dir={assets.model_dir}",
        "checkpointer.checkpoint_files=[model.safetensors]",
        f"tokenizer.path={assets.tokenizer}",
        "dataset.source=json",
        f"dataset.data_files={assets.data}",
        f"model.vocab_size={VOCAB_SIZE}",
        "model.num_layers=3",
        "model.num_heads=4",
        "model.num_kv_heads=2",
        "model.embed_dim=64",
        "model.intermediate_dim=88",
        "model.max_seq_len=256",
        f"output_dir={output_dir}",
        "device=cpu",
    ]


def run_tune(recipe: str, config_name: str, overrides: Sequence[str], cwd: Path) -> None:
    """Run ``tune <recipe> --config <config_name> k=v ...`` in a subprocess; on failure,
    raise with its output."""
    tune = Path(sys.executable).parent / "tune"
    cmd = [str(tune), recipe, "--config", config_name, *overrides]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-8000:]}"
        )


def read_disk_log(log_dir: Path) -> List[Dict]:
    """The rows of the single ``*.jsonl`` file a DiskLogger wrote into ``log_dir``."""
    files = sorted(Path(log_dir).glob("*.jsonl"))
    if len(files) != 1:
        raise AssertionError(f"expected one *.jsonl in {log_dir}, found {[f.name for f in files]}")
    return [json.loads(line) for line in files[0].read_text().splitlines()]


def logged_losses(log_dir: Path) -> torch.Tensor:
    rows = read_disk_log(log_dir)
    assert [r["step"] for r in rows] == list(range(rows[0]["step"], rows[0]["step"] + len(rows)))
    return torch.tensor([r["loss"] for r in rows], dtype=torch.float64)


def reference_batches(cfg: DictConfig) -> DataLoader:
    """The recipe's batches in order (shuffle off), built with the same dataset and collate."""
    tokenizer = config.instantiate(cfg.tokenizer)
    ds = config.instantiate(cfg.dataset, tokenizer=tokenizer)
    collate = partial(padded_collate, padding_idx=padding_id(tokenizer))
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate)


def hf_reference_losses(
    model: torch.nn.Module, optimizer, cfg: DictConfig, steps_per_epoch: int, scheduler=None
) -> torch.Tensor:
    """A plain training loop over an HF (or PEFT) causal LM: per optimizer step, the sum of
    token cross-entropies over its micro-batches divided by the step's scored-token count."""
    loader = reference_batches(cfg)
    gas = cfg.gradient_accumulation_steps
    losses = []
    for _ in range(cfg.epochs):
        batches = iter(loader)
        for _ in range(steps_per_epoch):
            micro = [next(batches) for _ in range(gas)]
            n_tokens = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro)
            step_loss = 0.0
            for mb in micro:
                logits = model(input_ids=mb["tokens"]).logits.float()
                loss = (
                    F.cross_entropy(
                        logits[:, :-1].reshape(-1, logits.shape[-1]),
                        mb["labels"][:, 1:].reshape(-1),
                        ignore_index=-100,
                        reduction="sum",
                    )
                    / n_tokens
                )
                loss.backward()
                step_loss += loss.item()
            if cfg.clip_grad_norm is not None:
                params = [p for p in model.parameters() if p.requires_grad]
                torch.nn.utils.clip_grad_norm_(params, max_norm=float(cfg.clip_grad_norm))
            optimizer.step()
            optimizer.zero_grad()
            if scheduler is not None:
                scheduler.step()
            losses.append(step_loss)
    return torch.tensor(losses, dtype=torch.float64)


def load_hf_model(model_dir: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).train()
