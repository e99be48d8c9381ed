# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``tune plan``: predict a run's peak memory per component before it starts.

    tune plan --config tiny/lora batch_size=4
    tune plan --config llama3_1/8B_lora_single_device --memory 20GiB --json
    tune plan --config tiny/full --measure

The config is read and checked as ``tune validate`` does (same messages), the checkpointer is
built as the run builds it (a missing checkpoint fails as the run would), the model is built
on the meta device, and the prediction comes from ``_plan_estimate``. ``--memory`` ranks the
settings that would make the run fit and prints the best combination as overrides;
``--measure`` runs a few real steps in a fresh process and prints the measured peaks per
phase next to the predicted ones.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from itertools import product
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from torchtune._cli._names import resolve_config
from torchtune._cli.validate import check, print_problems

_MEASURE_STEPS = 3
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """``"24GiB"``, ``"500MB"``, ``"1.5gib"`` or a byte count -> bytes.

    Raises:
        ValueError: naming ``--memory`` and the accepted units.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"--memory: expected a size like 24GiB or 500MB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tune plan",
        usage="tune plan --config <config> [key=value ...] [--device cpu|cuda] "
        "[--memory SIZE] [--nproc N] [--json] [--measure]",
        description="Predict the peak memory of a fine-tuning run, per component.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True, help="a packaged config name or a .yaml")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="predict for this device (default: the config's)")  # fmt: skip
    parser.add_argument("--memory", default=None, help="budget, e.g. 24GiB: what fits in it")
    parser.add_argument("--nproc", type=int, default=1, help="FSDP ranks (per-rank memory)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--measure", action="store_true",
                        help=f"run {_MEASURE_STEPS} real steps and print the measured peaks")  # fmt: skip
    parser.add_argument("--recipe", default=None, help="the recipe (default: the config's)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def recipe_for(config_name: str, path: Path) -> str:
    """The recipe a config belongs to: the registry's, else the one its first line names
    (``# tune <recipe> --config ...``).

    Raises:
        ValueError: if neither names one.
    """
    from torchtune import _recipe_registry as registry

    for recipe in registry.RECIPES:
        if any(c.name == config_name or c.file_path == path for c in recipe.configs):
            return recipe.name
    first = path.read_text().splitlines()[0] if path.is_file() else ""
    words = first.lstrip("# ").split()
    if "--config" in words and words.index("--config") > 0:
        return words[words.index("--config") - 1]
    raise ValueError(f"{path}: cannot tell its recipe; pass --recipe")


class Planner:
    """Everything ``estimate`` needs that is expensive to get, cached across alternatives
    (the tokenizer, datasets by their config, the runtime share, the checkpoint bytes)."""

    def __init__(self, cfg, device: str, nproc: int) -> None:
        from torchtune import config

        self.device, self.nproc = device, nproc
        self.checkpoint_bytes = _checkpoint_bytes(cfg)
        self.tokenizer = config.instantiate(cfg.tokenizer)
        self._datasets: Dict[str, Any] = {}
        self._dataset(cfg)
        from torchtune._cli._plan_estimate import warm_runtime_bytes
        from torchtune._cli._plan_measure import rss_bytes

        quantized = bool(cfg.model.get("quantize_base", False))
        if quantized:
            from torchtune.modules.peft._nf4 import _bnb_ops

            _bnb_ops()  # the run imports bitsandbytes while it builds the model
        setup_rss = rss_bytes()
        self.runtime = (setup_rss, warm_runtime_bytes(device == "cpu" and not quantized, quantized))
        self.notes: List[str] = []

    def _dataset(self, cfg):
        from omegaconf import OmegaConf

        from torchtune import config

        key = json.dumps(OmegaConf.to_container(cfg.dataset, resolve=True), sort_keys=True)
        if key not in self._datasets:
            try:
                self._datasets[key] = config.instantiate(cfg.dataset, tokenizer=self.tokenizer)
            except Exception as e:  # remote or unreadable data: fall back to max_seq_len
                self._datasets[key] = e
        return self._datasets[key]

    def plan(self, cfg):
        from torchtune._cli import _plan_estimate as E

        dataset = self._dataset(cfg)
        if isinstance(dataset, Exception):
            seq = int(cfg.dataset.get("max_seq_len") or cfg.model.get("max_seq_len"))
            rows = int(cfg.batch_size)
            steps = [
                [E.MicroBatch(rows * seq, rows * seq, False)] * int(cfg.gradient_accumulation_steps)
            ]
            steps = steps * 2
            note = f"dataset not readable here ({type(dataset).__name__}): {rows} x {seq} tokens"
        else:
            steps, note = E.micro_batches(cfg, self.tokenizer, dataset), None
        inputs = E.Inputs(self.runtime, self.checkpoint_bytes, steps, self.device, self.nproc)
        plan = E.estimate(cfg, inputs)
        if note:
            plan.notes.append(note)
        return plan


def _checkpoint_bytes(cfg) -> int:
    from torchtune import config
    from torchtune._cli._plan_estimate import checkpoint_bytes

    checkpointer = config.instantiate(
        cfg.checkpointer, resume_from_checkpoint=bool(cfg.get("resume_from_checkpoint", False))
    )
    return checkpoint_bytes(checkpointer)


# ------------------------------------------------------------------ --memory

# Throughput kept (1 = none lost), rough CPU/GPU figures: whole-layer recompute costs about a
# third more compute, selective a few percent; halving the micro-batch shrinks the GEMMs;
# QLoRA dequantizes every weight twice per step.
_AC_SPEED = {None: 1.0, "selective": 0.95, True: 0.75}
_HALVING_SPEED = 0.92
_QLORA_SPEED = 0.75


def alternatives(planner: Planner, cfg, budget: int) -> Tuple[List[Dict], Optional[Dict]]:
    """Single changes ranked by memory saved (then throughput lost), and the cheapest
    combination predicted to fit ``budget`` (None if nothing does)."""
    from omegaconf import OmegaConf

    base = planner.plan(cfg).peak
    batch, accum = int(cfg.batch_size), int(cfg.gradient_accumulation_steps)
    ac_now = cfg.get("enable_activation_checkpointing") or None
    lora = "lora_rank" in cfg.model
    halvings = [k for k in range(0, 8) if batch % (2**k) == 0]
    acs = [None, "selective", True]
    qlora = [False, True] if lora and not cfg.model.get("quantize_base", False) else [False]
    # AdamW's fused kernel: its temporaries are not rebuilt in later steps, and it is not slower.
    adam = cfg.optimizer._component_ in ("torch.optim.AdamW", "torch.optim.Adam")
    fuse = adam and not cfg.optimizer.get("fused", False)

    def new(key: str) -> str:  # an override of a key the config lacks needs a leading +
        return key if OmegaConf.select(cfg, key) is not None else "+" + key

    def overrides_for(k, ac, q, fused=False) -> List[str]:
        out = [f"{new('optimizer.fused')}=True"] if fused else []
        if k:
            out += [f"batch_size={batch // 2**k}", f"gradient_accumulation_steps={accum * 2**k}"]
        if ac != ac_now:
            out.append(f"enable_activation_checkpointing={ac if ac else False}")
        if q:
            out.append(f"{new('model.quantize_base')}=True")
        return out

    def evaluate(ovr: List[str], speed: float) -> Dict:
        c = OmegaConf.merge(cfg, OmegaConf.from_dotlist([o.lstrip("+") for o in ovr]))
        peak = planner.plan(c).peak
        return {"overrides": ovr, "predicted_peak_bytes": peak, "saved_bytes": base - peak,
                "throughput_kept": round(speed, 3)}  # fmt: skip

    singles = []
    for k in halvings[1:]:
        singles.append(evaluate(overrides_for(k, ac_now, False), _HALVING_SPEED**k))
    for ac in acs:
        if ac != ac_now:
            singles.append(evaluate(overrides_for(0, ac, False), _AC_SPEED[ac]))
    if lora:
        rank = int(cfg.model.lora_rank)
        if rank > 1:
            singles.append(evaluate([f"model.lora_rank={rank // 2}"], 1.0))
        if True in qlora:
            singles.append(evaluate(overrides_for(0, ac_now, True), _QLORA_SPEED))
    if fuse:
        singles.append(evaluate(overrides_for(0, ac_now, False, True), 1.0))
    seq = cfg.dataset.get("max_seq_len")
    if seq:
        # Changes what is trained on (longer samples are cut): listed, never recommended.
        singles.append(evaluate([f"dataset.max_seq_len={int(seq) // 2}"], 1.0))
    singles.sort(key=lambda r: (-r["saved_bytes"], -r["throughput_kept"]))
    best = None
    combos = sorted(
        product(halvings, acs, qlora, [True] if fuse else [False]),
        key=lambda c: -(_HALVING_SPEED ** c[0]) * _AC_SPEED[c[1]] * (_QLORA_SPEED if c[2] else 1),
    )
    for k, ac, q, fused in combos:
        ovr = overrides_for(k, ac, q, fused)
        speed = _HALVING_SPEED**k * _AC_SPEED[ac] * (_QLORA_SPEED if q else 1)
        result = evaluate(ovr, speed)
        if result["predicted_peak_bytes"] <= budget:
            best = result
            break
    return singles, best


# ------------------------------------------------------------------ --measure


def measure(recipe: str, path: Path, overrides: List[str]) -> Dict:
    """Run the recipe in a fresh process (``_plan_measure``) and return its peaks."""
    from torchtune._cli._names import resolve_recipe

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peaks.json"
        cmd = [sys.executable, "-m", "torchtune._cli._plan_measure", "--recipe",
               str(resolve_recipe(recipe)), "--config", str(path), "--out", str(out), *overrides]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise RuntimeError(f"the measured run failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    path = resolve_config(args.config)
    overrides = list(args.overrides)
    if args.measure:
        overrides += [f"max_steps_per_epoch={_MEASURE_STEPS}", "epochs=1"]
    cfg, problems = check(path, overrides)
    if problems:
        print_problems(path, problems)
        return 1
    try:
        budget = parse_size(args.memory) if args.memory else None
        if args.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
        device = args.device or ("cuda" if str(cfg.device).startswith("cuda") else "cpu")
        planner = Planner(cfg, device, args.nproc)
        plan = planner.plan(cfg)
        singles, best = alternatives(planner, cfg, budget) if budget is not None else ([], None)
        measured = (
            measure(args.recipe or recipe_for(args.config, path), path, overrides)
            if args.measure
            else None
        )
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"tune plan: error: {e}", file=sys.stderr)
        return 1
    result = {
        "predicted_peak_bytes": plan.peak,
        "peak_phase": plan.peak_phase,
        "when": plan.when,
        "phases": plan.phases,
        "components": plan.components,
        "notes": plan.notes,
    }
    if budget is not None:
        result["budget_bytes"] = budget
        result["fits"] = plan.peak <= budget
        result["alternatives"] = singles
        # Nothing to change when it already fits; None when no combination does.
        fits = plan.peak <= budget
        result["recommended_overrides"] = [] if fits else (best or {}).get("overrides")
    if measured is not None:
        result["measured"] = measured
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    _print_table(path, result, plan, budget, best)
    return 0


def _print_table(path: Path, result: Dict, plan, budget: Optional[int], best) -> None:
    print(f"{path}: predicted peak {_mib(plan.peak)} in {plan.when}")
    print(f"{'component (' + plan.peak_phase + ' phase inputs)':<40} {'bytes':>16}")
    for name, n in result["components"].items():
        print(f"  {name:<38} {_mib(n):>16}")
    meas = result.get("measured")
    print(f"{'phase':<12} {'predicted':>16}" + (f" {'measured':>16} {'ratio':>7}" if meas else ""))
    for phase, n in plan.phases.items():
        line = f"  {phase:<10} {_mib(n):>16}"
        if meas:
            m = meas["phases"][phase]
            line += f" {_mib(m):>16} {n / m:>7.3f}"
        print(line)
    for note in plan.notes:
        print(f"note: {note}")
    if budget is None:
        return
    verdict = "fits" if plan.peak <= budget else "does NOT fit"
    print(f"budget {_mib(budget)}: {verdict}")
    for alt in result["alternatives"]:
        print(f"  {' '.join(alt['overrides']):<60} saves {_mib(alt['saved_bytes']):>14}, "
              f"throughput x{alt['throughput_kept']}")  # fmt: skip
    if plan.peak > budget:
        if best:
            print("best combination (paste): " + " ".join(best["overrides"]))
        else:
            print("nothing predicted to fit; try more ranks (--nproc) or a smaller model")
