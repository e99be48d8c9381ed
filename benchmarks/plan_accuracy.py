# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``tune plan``'s predicted peak memory against the measured one, config by config (CPU).

    python -m benchmarks.plan_accuracy --out benchmarks/results/plan_accuracy
    python -m benchmarks.plan_accuracy --only tiny_full_b1 small_lora_b4

Each configuration is one of the tiny configs with overrides; ``small`` (dim 768, 12 layers,
vocab 32000, intermediate 2048) reads a random HF checkpoint written to a temporary folder.
For each, ``tune plan --json`` runs in a fresh process (the runtime share is measured there),
then the real recipe runs ``max_steps_per_epoch`` steps in another fresh process
(``torchtune._cli._plan_measure``: peak RSS per phase). Target: every ratio within 10%.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from torchtune import _recipe_registry as registry

SMALL = {"vocab_size": 32000, "embed_dim": 768, "num_layers": 12, "num_heads": 12,
         "num_kv_heads": 12, "intermediate_dim": 2048}  # fmt: skip
_RECIPE = {"full": "full_finetune_single_device", "lora": "lora_finetune_single_device",
           "qlora": "lora_finetune_single_device"}  # fmt: skip
_CONFIG = {"full": "tiny/full", "lora": "tiny/lora", "qlora": "tiny/qlora"}

# name -> (method, shape, overrides)
CASES: Dict[str, Tuple[str, str, List[str]]] = {
    "tiny_full_b1": ("full", "tiny", ["batch_size=1"]),
    "tiny_full_b4_ac": ("full", "tiny", ["batch_size=4", "enable_activation_checkpointing=True"]),
    "tiny_lora_b4_packed": ("lora", "tiny", ["batch_size=4", "dataset.packed=True"]),
    "tiny_qlora_b4": ("qlora", "tiny", ["batch_size=4"]),
    "small_full_b1": ("full", "small", ["batch_size=1"]),
    "small_full_b4": ("full", "small", ["batch_size=4"]),
    "small_full_b4_sel": ("full", "small", ["batch_size=4", "enable_activation_checkpointing=selective"]),
    "small_full_b4_ac_packed": ("full", "small", ["batch_size=4", "enable_activation_checkpointing=True", "dataset.packed=True"]),
    "small_lora_b1": ("lora", "small", ["batch_size=1"]),
    "small_lora_b4": ("lora", "small", ["batch_size=4"]),
    "small_lora_b4_sel_packed": ("lora", "small", ["batch_size=4", "enable_activation_checkpointing=selective", "dataset.packed=True"]),
    "small_qlora_b4": ("qlora", "small", ["batch_size=4"]),
    "small_qlora_b4_ac": ("qlora", "small", ["batch_size=4", "enable_activation_checkpointing=True"]),
}  # fmt: skip


def write_small_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A random Llama checkpoint of the ``small`` shape in HF format (config.json +
    model.safetensors), fp32."""
    from safetensors.torch import save_file

    tiny = registry.RECIPES_DIR.parent / "assets" / "tiny" / "model"
    hf_config = json.loads((tiny / "config.json").read_text())
    d, h, v = SMALL["embed_dim"], SMALL["intermediate_dim"], SMALL["vocab_size"]
    hf_config.update(hidden_size=d, intermediate_size=h, vocab_size=v, head_dim=d // SMALL["num_heads"],
                     num_hidden_layers=SMALL["num_layers"], num_attention_heads=SMALL["num_heads"],
                     num_key_value_heads=SMALL["num_kv_heads"])  # fmt: skip
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.02

    sd = {"model.embed_tokens.weight": rand(v, d), "model.norm.weight": 1 + rand(d),
          "lm_head.weight": rand(v, d)}  # fmt: skip
    for i in range(SMALL["num_layers"]):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{name}.weight"] = rand(d, d)
        sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"] = rand(h, d), rand(h, d)
        sd[p + "mlp.down_proj.weight"] = rand(d, h)
        sd[p + "input_layernorm.weight"] = 1 + rand(d)
        sd[p + "post_attention_layernorm.weight"] = 1 + rand(d)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config))
    save_file(sd, str(folder / "model.safetensors"))
    return folder


def case_overrides(name: str, small_dir: Path, out_dir: Path) -> Tuple[str, str, List[str]]:
    method, shape, extra = CASES[name]
    overrides = [
        f"output_dir={out_dir}",
        "max_steps_per_epoch=3",
        "epochs=1",
        "log_every_n_steps=100",
    ]
    if shape == "small":
        overrides += [f"model.{k}={v}" for k, v in SMALL.items()]
        overrides += [f"checkpointer.checkpoint_dir={small_dir}"]
    return _RECIPE[method], _CONFIG[method], overrides + extra


def _env() -> Dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_case(name: str, small_dir: Path, work: Path) -> Dict:
    recipe, cfg, overrides = case_overrides(name, small_dir, work / name)
    plan = subprocess.run(
        [sys.executable, "-m", "torchtune._cli.tune", "plan", "--config", cfg, "--json", *overrides],
        capture_output=True, text=True, env=_env(), check=True,
    )  # fmt: skip
    predicted = json.loads(plan.stdout)
    out = work / f"{name}.json"
    recipe_path = registry.get_recipe(recipe).file_path
    config_path = registry.get_config(cfg).file_path
    subprocess.run(
        [sys.executable, "-m", "torchtune._cli._plan_measure", "--recipe", str(recipe_path),
         "--config", str(config_path), "--out", str(out), *overrides],
        capture_output=True, text=True, env=_env(), check=True,
    )  # fmt: skip
    measured = json.loads(out.read_text())
    return {
        "case": name,
        "overrides": CASES[name][2],
        "predicted_peak_bytes": predicted["predicted_peak_bytes"],
        "predicted_phase": predicted["peak_phase"],
        "predicted_phases": predicted["phases"],
        "measured_peak_bytes": measured["peak_bytes"],
        "measured_phases": measured["phases"],
        "ratio": predicted["predicted_peak_bytes"] / measured["peak_bytes"],
    }


def to_markdown(rows: List[Dict]) -> str:
    mib = 2**20
    lines = ["| case | predicted MiB (phase) | measured MiB (setup / train / save) | ratio |",
             "|---|---|---|---|"]  # fmt: skip
    for r in rows:
        m = r["measured_phases"]
        lines.append(
            f"| {r['case']} | {r['predicted_peak_bytes'] / mib:.0f} ({r['predicted_phase']}) | "
            f"{r['measured_peak_bytes'] / mib:.0f} ({m['setup'] / mib:.0f} / "
            f"{m['train'] / mib:.0f} / {m['save'] / mib:.0f}) | {r['ratio']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plan_accuracy")
    parser.add_argument("--only", nargs="*", default=None, help="case names (default: all)")
    parser.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    names = args.only or list(CASES)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        small_dir = write_small_checkpoint(work / "small_model")
        for name in names:
            rows.append(run_case(name, small_dir, work))
            r = rows[-1]
            print(f"{name}: predicted {r['predicted_peak_bytes'] / 2**20:.0f} MiB, measured "
                  f"{r['measured_peak_bytes'] / 2**20:.0f} MiB {r['measured_phases']}, ratio "
                  f"{r['ratio']:.3f}", flush=True)  # fmt: skip
    print(to_markdown(rows))
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(rows, indent=1))
        Path(args.out + ".md").write_text(to_markdown(rows))
    bad = [r["case"] for r in rows if abs(r["ratio"] - 1) > 0.10]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
