# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Run a recipe for real and record its peak memory per phase (``tune plan --measure``).

    python -m torchtune._cli._plan_measure --recipe full_finetune_single_device \
        --config tiny/full --out peaks.json max_steps_per_epoch=2

Meant to run in a fresh process: the recipe class is driven through ``__init__``, ``setup``,
``train`` and ``cleanup`` as its ``recipe_main`` does, and the peak is read and reset between
phases. CPU: peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``; Linux). CUDA: the
caching allocator's ``max_memory_allocated`` / ``max_memory_reserved``. ``train`` ends where
the first checkpoint save starts; ``save`` is the saves.
"""

import argparse
import importlib.util
import inspect
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

_PHASES = ("setup", "train", "save")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_bytes() -> int:
    """This process's resident set size now (``VmRSS``)."""
    return _status_bytes("VmRSS")


class PeakMeter:
    """Peak memory since the last :meth:`reset`, on CPU (RSS) or CUDA (allocator)."""

    def __init__(self, device_type: str) -> None:
        self.cuda = device_type == "cuda"

    def reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        # "5" resets VmHWM to the current RSS (Linux >= 4.0).
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def peak(self) -> int:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        return _status_bytes("VmHWM")

    def now(self) -> int:
        if self.cuda:
            import torch

            return int(torch.cuda.memory_allocated())
        return rss_bytes()


def recipe_class(path: Path) -> type:
    """The recipe class defined in the recipe script at ``path`` (the one with ``setup`` and
    ``train``)."""
    spec = importlib.util.spec_from_file_location(f"_tune_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for _, obj in inspect.getmembers(module, inspect.isclass):
        if obj.__module__ == module.__name__ and hasattr(obj, "setup") and hasattr(obj, "train"):
            return obj
    raise ValueError(f"{path} defines no recipe class (a class with setup and train)")


def measure(recipe_path: Path, config_path: Path, overrides: List[str]) -> Dict[str, Any]:
    """Run the recipe once and return ``{"runtime_bytes", "peak_bytes", "phases": {phase:
    peak bytes}}`` (``runtime_bytes``: RSS after the imports, before the recipe starts)."""
    import torch  # noqa: F401  (the runtime share counts it)

    from torchtune import config

    cls = recipe_class(recipe_path)
    cfg = config.load_config(config_path, overrides)
    config.validate(cfg)
    meter = PeakMeter("cuda" if str(cfg.get("device", "cpu")).startswith("cuda") else "cpu")
    runtime = meter.now() if meter.cuda else rss_bytes()
    phases: Dict[str, int] = {}
    meter.reset()
    recipe = cls(cfg)
    recipe.setup(cfg)
    phases["setup"] = meter.peak()
    meter.reset()
    original: Callable[..., Any] = recipe.save_checkpoint

    def save_checkpoint(*args, **kwargs):
        if "train" not in phases:
            phases["train"] = meter.peak()
            meter.reset()
        return original(*args, **kwargs)

    recipe.save_checkpoint = save_checkpoint
    recipe.train()
    phases.setdefault("train", meter.peak())
    phases["save"] = meter.peak()
    recipe.cleanup()
    return {"runtime_bytes": runtime, "peak_bytes": max(phases.values()), "phases": phases}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchtune._cli._plan_measure")
    parser.add_argument("--recipe", required=True, help="path to the recipe script")
    parser.add_argument("--config", required=True, help="path to the config")
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    result = measure(Path(args.recipe), Path(args.config), args.overrides)
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
