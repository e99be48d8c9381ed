# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The quickstart: LoRA fine-tune the bundled tiny Llama2 on CPU and measure what it learned.

    python -m torchtune.demo [--output-dir ./torchtune_demo_output]

1. Held-out accuracy of the base model (exact match of its greedy answer).
2. ``tune lora_finetune_single_device --config tiny/lora`` on the bundled Alpaca-format data.
3. Held-out accuracy of the fine-tuned model.
4. ``tune generate --config tiny/generate``-style answer to one held-out instruction, before
   and after.
5. A loss curve (PNG, needs matplotlib) beside the training log, and a summary.

Everything is seeded: the same command on the same machine prints the same numbers.
The assets and how they were made: ``torchtune/assets/tiny/README.md``.
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

ASSETS = Path(__file__).resolve().parent / "assets" / "tiny"
# A file the demo leaves in the folders it creates, so that a rerun only ever deletes its own.
_MARKER = ".torchtune_demo"

# Overrides on top of configs/tiny/lora.yaml: the bundled assets by absolute path (the config's
# paths are relative to a source checkout) and the demo's training length.
DEMO_TRAINING = {
    "model.lora_attn_modules": "[q_proj,k_proj,v_proj,output_proj]",
    "model.apply_lora_to_mlp": True,
    "model.lora_rank": 16,
    "model.lora_alpha": 32,
    "optimizer.lr": 5e-3,
    "batch_size": 16,
    "max_steps_per_epoch": 400,
}


def asset_paths(assets: Path = ASSETS) -> Dict[str, Path]:
    """Paths of the bundled tiny assets.

    Raises:
        FileNotFoundError: if one is missing (e.g. a broken install).
    """
    paths = {
        "tokenizer": assets / "tokenizer.model",
        "model_dir": assets / "model",
        "train": assets / "data" / "train.json",
        "heldout": assets / "data" / "heldout.json",
    }
    for name in ("tokenizer", "train", "heldout"):
        if not paths[name].is_file():
            raise FileNotFoundError(f"Bundled asset {paths[name]} is missing; reinstall torchtune")
    for name in ("config.json", "model.safetensors"):
        if not (paths["model_dir"] / name).is_file():
            raise FileNotFoundError(f"Bundled asset {paths['model_dir'] / name} is missing")
    return paths


def load_rows(path: Path) -> List[Dict[str, str]]:
    """Read an Alpaca-format JSON list (``instruction``, ``input``, ``output`` strings).

    Raises:
        ValueError: naming the file and row when the file is not such a list.
    """
    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: expected a non-empty JSON list of Alpaca rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not all(
            isinstance(row.get(k), str) for k in ("instruction", "input", "output")
        ):
            raise ValueError(
                f"{path}: row {i} must be an object with string fields instruction, input and "
                f"output, got {row!r}"
            )
    return rows


def load_model(checkpoint_dir: Path):
    """Build the Llama2 described by ``checkpoint_dir/config.json`` and load its HF weights.

    Returns:
        TransformerDecoder: in eval mode, fp32, on CPU.
    """
    import torch

    from torchtune.models.llama2 import llama2
    from torchtune.utils import FullModelHFCheckpointer

    cfg = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    with torch.device("meta"):
        model = llama2(
            vocab_size=cfg["vocab_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            embed_dim=cfg["hidden_size"],
            max_seq_len=cfg["max_position_embeddings"],
            intermediate_dim=cfg["intermediate_size"],
            norm_eps=cfg["rms_norm_eps"],
            # transformers >= 5 nests rope_theta in rope_parameters
            rope_base=cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0),
        )
    # output_dir is never written: this checkpointer only loads.
    ckpt = FullModelHFCheckpointer(
        checkpoint_dir=checkpoint_dir,
        checkpoint_files=["model.safetensors"],
        model_type="LLAMA2",
        output_dir=checkpoint_dir,
    ).load_checkpoint()
    model.load_state_dict(ckpt["model"], assign=True)
    return model.eval()


def format_prompt(row: Dict[str, str]) -> str:
    from torchtune.data import AlpacaInstructTemplate

    return AlpacaInstructTemplate.format(row)


def answer(model, tokenizer, rows: Sequence[Dict[str, str]], max_new_tokens: int = 16,
           batch_size: int = 50) -> List[str]:
    """Greedy answers to Alpaca rows, prompted exactly as the training data is tokenized."""
    from torchtune.utils import generate

    answers = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [tokenizer.encode(format_prompt(r), add_bos=True, add_eos=False) for r in chunk]
        out = generate(
            model,
            prompts,
            max_new_tokens,
            temperature=0.0,
            stop_tokens=[tokenizer.eos_id],
            pad_id=tokenizer.pad_id,
        )
        answers.extend(tokenizer.decode(ids).strip() for ids in out)
    return answers


def accuracy(answers: Sequence[str], rows: Sequence[Dict[str, str]]) -> float:
    """Fraction of answers equal to the reference ``output`` (surrounding spaces ignored)."""
    if len(answers) != len(rows):
        raise ValueError(f"{len(answers)} answers for {len(rows)} rows")
    return sum(a.strip() == r["output"].strip() for a, r in zip(answers, rows)) / len(rows)


def evaluate(checkpoint_dir: Path, tokenizer_path: Path, rows) -> Tuple[float, List[str]]:
    """Held-out exact-match accuracy of the model in ``checkpoint_dir`` and its answers."""
    import torch

    from torchtune.models.llama2 import llama2_tokenizer

    torch.manual_seed(0)
    model = load_model(checkpoint_dir)
    answers = answer(model, llama2_tokenizer(tokenizer_path), rows)
    return accuracy(answers, rows), answers


def finetune_command(paths: Dict[str, Path], output_dir: Path,
                     overrides: Optional[Dict[str, Any]] = None) -> List[str]:
    """The ``tune`` command line the demo runs (as a list for subprocess)."""
    args = {
        "checkpointer.checkpoint_dir": paths["model_dir"],
        "tokenizer.path": paths["tokenizer"],
        "dataset.data_files": paths["train"],
        "output_dir": output_dir,
        **DEMO_TRAINING,
        **(overrides or {}),
    }
    return [sys.executable, "-m", "torchtune._cli.tune", "lora_finetune_single_device",
            "--config", "tiny/lora"] + [f"{k}={v}" for k, v in args.items()]


def read_losses(log_dir: Path) -> List[Tuple[int, float]]:
    """(step, loss) pairs from the DiskLogger file the recipe wrote in ``log_dir``."""
    logs = sorted(Path(log_dir).glob("log_*.jsonl"), key=lambda p: p.stat().st_mtime)
    if not logs:
        raise FileNotFoundError(f"No training log (log_*.jsonl) in {log_dir}")
    points = []
    for n, line in enumerate(logs[-1].read_text().splitlines()):
        record = json.loads(line)
        if "loss" in record:
            points.append((int(record["step"]), float(record["loss"])))
    if not points:
        raise ValueError(f"{logs[-1]} has no 'loss' entries")
    return points


def plot_losses(points: List[Tuple[int, float]], path: Path) -> Optional[Path]:
    """Write the loss curve to ``path`` (PNG); None, with a message, without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss plot (pip install 'torchtune[plot]')")
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in points], [l for _, l in points], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title("LoRA fine-tuning of the tiny Llama2")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path


def _fresh_dir(path: Path) -> Path:
    """Empty ``path`` if this demo made it before; refuse to touch anything else."""
    if path.exists() and any(path.iterdir()):
        if not (path / _MARKER).exists():
            raise ValueError(
                f"{path} exists and was not made by torchtune.demo; pass another --output-dir"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / _MARKER).touch()
    return path


def _pick_example(rows: Sequence[Dict[str, str]]) -> int:
    """The first held-out row with an ``input`` (shows the full prompt layout)."""
    return next((i for i, r in enumerate(rows) if r["input"]), 0)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m torchtune.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("torchtune_demo_output"))
    parser.add_argument("--max-steps", type=int, default=DEMO_TRAINING["max_steps_per_epoch"],
                        help="LoRA training steps (default %(default)s)")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate on only the first N held-out rows (default: all)")
    args = parser.parse_args(argv)

    t_start = time.perf_counter()
    paths = asset_paths()
    out = _fresh_dir(args.output_dir.resolve())
    heldout = load_rows(paths["heldout"])[: args.limit]

    print(f"[1/4] Held-out accuracy of the base model ({len(heldout)} instructions) ...", flush=True)
    acc_before, answers_before = evaluate(paths["model_dir"], paths["tokenizer"], heldout)
    print(f"      base model: {acc_before:.1%}", flush=True)

    print("[2/4] LoRA fine-tuning:", flush=True)
    run_dir = out / "lora"
    cmd = finetune_command(paths, run_dir, {"max_steps_per_epoch": args.max_steps})
    print("      tune " + " ".join(cmd[4:]), flush=True)
    subprocess.run(cmd, check=True)
    # The last epoch's folder holds the final weights (epochs may be raised in tiny/lora).
    ckpt_dir = max(run_dir.glob("epoch_*"), key=lambda p: int(p.name.split("_")[1]))

    print("[3/4] Held-out accuracy of the fine-tuned model ...", flush=True)
    acc_after, answers_after = evaluate(ckpt_dir, paths["tokenizer"], heldout)
    print(f"      fine-tuned model: {acc_after:.1%}", flush=True)

    print("[4/4] One held-out instruction:", flush=True)
    i = _pick_example(heldout)
    example = heldout[i]
    print("      " + format_prompt(example).replace("\n", "\n      "))
    print(f"      base model answers:       {answers_before[i]!r}")
    print(f"      fine-tuned model answers: {answers_after[i]!r}")
    print(f"      expected:                 {example['output']!r}")

    losses = read_losses(run_dir)
    plot = plot_losses(losses, run_dir / "loss_curve.png")
    summary = {
        "loss_first": losses[0][1],
        "loss_last": losses[-1][1],
        "steps": losses[-1][0],
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "heldout_rows": len(heldout),
        "checkpoint_dir": str(ckpt_dir),
        "log_dir": str(run_dir),
        "loss_plot": str(plot) if plot else None,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\nSummary")
    print(f"  training loss        {summary['loss_first']:.4f} (step 1) -> "
          f"{summary['loss_last']:.4f} (step {summary['steps']})")
    print(f"  held-out accuracy    {acc_before:.1%} before -> {acc_after:.1%} after "
          f"({len(heldout)} instructions, exact match)")
    print(f"  fine-tuned model     {ckpt_dir}")
    print(f"  training log         {run_dir}")
    if plot:
        print(f"  loss curve           {plot}")
    print(f"  summary              {out / 'summary.json'}")
    print(f"  wall time            {summary['seconds']:.0f}s")
    return summary


if __name__ == "__main__":
    main()
