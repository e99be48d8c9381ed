# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The quickstart: LoRA fine-tune the bundled tiny Llama2 on CPU and measure what it learned.

    python -m torchtune.demo [--output-dir ./torchtune_demo_output]

Each step runs the product's own command, shown as it runs:

1. Held-out accuracy of the base model: ``tune eleuther_eval --config tiny/eval`` on a local
   lm-eval task (greedy answers, exact match); a plain accuracy loop here when lm-eval is not
   installed.
2. ``tune lora_finetune_single_device --config tiny/lora`` (the config points at the bundled
   model, tokenizer and Alpaca-format data).
3. Held-out accuracy of the fine-tuned model, as in 1.
4. ``tune generate --config tiny/generate`` on one held-out instruction, before and after.
5. A loss curve (PNG, needs matplotlib) beside the training log, and a summary.

Everything is seeded: the same command on the same machine prints the same numbers.
The assets and how they were made: ``torchtune/assets/tiny/README.md``.
"""

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

ASSETS = Path(__file__).resolve().parent / "assets" / "tiny"
# A file the demo leaves in the folders it creates, so that a rerun only ever deletes its own.
_MARKER = ".torchtune_demo"


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
            rope_base=cfg.get("rope_theta")
            or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0),
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


def answer(
    model, tokenizer, rows: Sequence[Dict[str, str]], max_new_tokens: int = 16, batch_size: int = 50
) -> List[str]:
    """Greedy one-line answers to Alpaca rows, prompted exactly as the training data is tokenized."""
    from torchtune.data import padding_id
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
            pad_id=padding_id(tokenizer),
        )
        # Cut at the first newline like the lm-eval task's stop string: answers are one line.
        answers.extend(tokenizer.decode(ids).split("\n")[0].strip() for ids in out)
    return answers


def accuracy(answers: Sequence[str], rows: Sequence[Dict[str, str]]) -> float:
    """Fraction of answers equal to the reference ``output`` (surrounding spaces ignored)."""
    if len(answers) != len(rows):
        raise ValueError(f"{len(answers)} answers for {len(rows)} rows")
    return sum(a.strip() == r["output"].strip() for a, r in zip(answers, rows)) / len(rows)


def _tune(*args: str) -> List[str]:
    return [sys.executable, "-m", "torchtune._cli.tune", *args]


def _override(key: str, value: Any) -> str:
    # Strings go JSON-quoted so YAML keeps them strings (an input such as "12" or "yes").
    return f"{key}={json.dumps(value) if isinstance(value, str) else value}"


def finetune_command(output_dir: Path, max_steps: Optional[int] = None) -> List[str]:
    """``tune lora_finetune_single_device --config tiny/lora``: the config already points at
    the bundled model, tokenizer and data; the demo only picks where the outputs go."""
    args = [f"output_dir={output_dir}"]
    if max_steps is not None:
        args.append(f"max_steps_per_epoch={max_steps}")
    return _tune("lora_finetune_single_device", "--config", "tiny/lora", *args)


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


EVAL_TASK = "tiny_heldout"


def write_eval_task(rows: Sequence[Dict[str, str]], task_dir: Path) -> Path:
    """A local lm-eval task over ``rows``: greedy generation scored by exact match.

    The prompts are rendered here with the same template the training data used, so the task
    YAML needs no template logic of its own.

    Returns:
        ``task_dir``, to pass as the eval recipe's ``include_path``.
    """
    task_dir.mkdir(parents=True, exist_ok=True)
    docs = [{"prompt": format_prompt(r), "answer": r["output"]} for r in rows]
    data = task_dir / f"{EVAL_TASK}.json"
    data.write_text(json.dumps(docs, indent=1) + "\n", encoding="utf-8")
    (task_dir / f"{EVAL_TASK}.yaml").write_text(
        f"""task: {EVAL_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 16
  do_sample: false
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
        encoding="utf-8",
    )
    return task_dir


def eval_command(checkpoint_dir: Path, task_dir: Path, output_dir: Path) -> List[str]:
    """``tune eleuther_eval --config tiny/eval`` on the local held-out task."""
    return _tune(
        "eleuther_eval",
        "--config",
        "tiny/eval",
        f"checkpointer.checkpoint_dir={checkpoint_dir}",
        f"tasks=[{EVAL_TASK}]",
        f"include_path={task_dir}",
        "include_default_tasks=False",
        "limit=null",
        "batch_size=50",
        f"output_dir={output_dir}",
    )


def read_eval_accuracy(output_dir: Path) -> float:
    """Exact match of the held-out task from the results JSON the eval recipe wrote."""
    written = sorted(Path(output_dir).rglob("eval_results_*.json"))
    if not written:
        raise FileNotFoundError(f"No eval_results_*.json under {output_dir}")
    results = json.loads(written[-1].read_text())["results"]
    try:
        return float(results[EVAL_TASK]["exact_match,strip"])
    except KeyError as e:
        raise ValueError(f"{written[-1]} has no {EVAL_TASK} exact_match,strip result") from e


def generate_command(checkpoint_dir: Path, row: Dict[str, str]) -> List[str]:
    """``tune generate --config tiny/generate``: a greedy answer to one Alpaca row."""
    return _tune(
        "generate",
        "--config",
        "tiny/generate",
        f"checkpointer.checkpoint_dir={checkpoint_dir}",
        _override("prompt", row["instruction"]),
        _override("instruct_input", row["input"]),
        "temperature=0",
        "max_new_tokens=24",
    )


def _child_env(work_dir: Path) -> Dict[str, str]:
    # Everything is local: no hub lookups, and the datasets cache stays inside the demo folder.
    return dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(work_dir / "hf_datasets_cache"),
    )


def evaluate(checkpoint_dir: Path, rows: Sequence[Dict[str, str]], work_dir: Path) -> float:
    """Held-out exact match of the model in ``checkpoint_dir``: through ``tune eleuther_eval``
    and a local lm-eval task when lm-eval is installed, else with :func:`answer` here."""
    work_dir.mkdir(parents=True, exist_ok=True)
    if not lm_eval_available():
        import torch

        from torchtune.models.llama2 import llama2_tokenizer

        torch.manual_seed(0)
        tokenizer = llama2_tokenizer(asset_paths()["tokenizer"])
        return accuracy(answer(load_model(checkpoint_dir), tokenizer, rows), rows)
    task_dir = write_eval_task(rows, work_dir / "task")
    cmd = eval_command(checkpoint_dir, task_dir, work_dir)
    print("      tune " + " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True, env=_child_env(work_dir))
    return read_eval_accuracy(work_dir)


def generate_answer(checkpoint_dir: Path, row: Dict[str, str], work_dir: Path) -> str:
    """What ``tune generate`` prints for ``row`` (its text, without the speed line)."""
    proc = subprocess.run(
        generate_command(checkpoint_dir, row),
        check=True,
        capture_output=True,
        text=True,
        env=_child_env(work_dir),
    )
    return proc.stdout.rsplit("\n\n[", 1)[0].strip()


def read_losses(log_dir: Path) -> List[Tuple[int, float]]:
    """(step, loss) pairs from the DiskLogger file the recipe wrote in ``log_dir``."""
    logs = sorted(Path(log_dir).glob("log_*.jsonl"), key=lambda p: p.stat().st_mtime)
    if not logs:
        raise FileNotFoundError(f"No training log (log_*.jsonl) in {log_dir}")
    points = []
    for line in logs[-1].read_text().splitlines():
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
    parser = argparse.ArgumentParser(
        prog="python -m torchtune.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--output-dir", type=Path, default=Path("torchtune_demo_output"))
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="cap the LoRA training steps per epoch (default: tiny/lora's)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="evaluate on only the first N held-out rows (default: all)",
    )
    args = parser.parse_args(argv)

    t_start = time.perf_counter()
    paths = asset_paths()
    out = _fresh_dir(args.output_dir.resolve())
    heldout = load_rows(paths["heldout"])[: args.limit]
    how = (
        "tune eleuther_eval"
        if lm_eval_available()
        else "a plain loop (pip install -e '.[eval]' for lm-eval)"
    )

    print(
        f"[1/4] Held-out accuracy of the base model ({len(heldout)} instructions, {how}) ...",
        flush=True,
    )
    acc_before = evaluate(paths["model_dir"], heldout, out / "eval_base")
    print(f"      base model: {acc_before:.1%}", flush=True)

    print("[2/4] LoRA fine-tuning:", flush=True)
    run_dir = out / "lora"
    cmd = finetune_command(run_dir, args.max_steps)
    print("      tune " + " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True)
    # The last epoch's folder holds the final weights.
    ckpt_dir = max(run_dir.glob("epoch_*"), key=lambda p: int(p.name.split("_")[1]))

    print("[3/4] Held-out accuracy of the fine-tuned model ...", flush=True)
    acc_after = evaluate(ckpt_dir, heldout, out / "eval_finetuned")
    print(f"      fine-tuned model: {acc_after:.1%}", flush=True)

    print(
        "[4/4] One held-out instruction, answered by tune generate --config tiny/generate:",
        flush=True,
    )
    example = heldout[_pick_example(heldout)]
    print("      " + format_prompt(example).replace("\n", "\n      "))
    before = generate_answer(paths["model_dir"], example, out)
    after = generate_answer(ckpt_dir, example, out)
    print(f"      base model answers:       {before!r}")
    print(f"      fine-tuned model answers: {after!r}")
    print(f"      expected:                 {example['output']!r}")

    losses = read_losses(run_dir)
    plot = plot_losses(losses, run_dir / "loss_curve.png")
    summary = {
        "loss_first": losses[0][1],
        "loss_last": losses[-1][1],
        "steps": losses[-1][0],
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "accuracy_by": "lm-eval" if lm_eval_available() else "plain",
        "heldout_rows": len(heldout),
        "example": {**example, "before": before, "after": after},
        "checkpoint_dir": str(ckpt_dir),
        "log_dir": str(run_dir),
        "loss_plot": str(plot) if plot else None,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\nSummary")
    print(
        f"  training loss        {summary['loss_first']:.4f} (step 1) -> "
        f"{summary['loss_last']:.4f} (step {summary['steps']})"
    )
    print(
        f"  held-out accuracy    {acc_before:.1%} before -> {acc_after:.1%} after "
        f"({len(heldout)} instructions, exact match)"
    )
    print(f"  fine-tuned model     {ckpt_dir}")
    print(f"  training log         {run_dir}")
    if plot:
        print(f"  loss curve           {plot}")
    print(f"  summary              {out / 'summary.json'}")
    print(f"  wall time            {summary['seconds']:.0f}s")
    return summary


if __name__ == "__main__":
    main()
