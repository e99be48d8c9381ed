# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Metric loggers the recipes instantiate from ``metric_logger: {_component_: ...}``.

Each has ``log_dict(payload, step)`` and ``close()``. A recipe logs one payload per optimizer
step it reports (``loss``, ``lr``, ``tokens_per_second``, ``peak_memory_gib``).
"""

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch


def _scalar(name: str, value: Any) -> Union[int, float]:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"Metric '{name}' must be a scalar, got a tensor of shape {tuple(value.shape)}"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Metric '{name}' must be a number, got {type(value).__name__}: {value!r}")
    return value


class MetricLogger:
    """Interface: ``log(name, value, step)``, ``log_dict(payload, step)``, ``close()``."""

    def log(self, name: str, value: Any, step: int) -> None:
        self.log_dict({name: value}, step)

    def log_dict(self, payload: Mapping[str, Any], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DiskLogger(MetricLogger):
    """Append one JSON object per ``log_dict`` call to ``log_dir/<filename>``.

    Each line is ``{"step": step, **payload}``; non-finite floats are written as strings
    (``"nan"``, ``"inf"``) so every line stays valid JSON. The file is flushed after each line,
    so a crashed run keeps its metrics.

    Args:
        log_dir: directory, created when missing.
        filename: defaults to ``log_<unix time>_<pid>.jsonl``, unique per run.
    """

    def __init__(self, log_dir: Union[str, Path], filename: Optional[str] = None) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        filename = filename or f"log_{int(time.time())}_{os.getpid()}.jsonl"
        self.path = self.log_dir / filename
        self._file = open(self.path, "a", encoding="utf-8")

    def log_dict(self, payload: Mapping[str, Any], step: int) -> None:
        record: Dict[str, Any] = {"step": int(step)}
        for name, value in payload.items():
            value = _scalar(name, value)
            record[name] = value if math.isfinite(value) else str(value)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class StdoutLogger(MetricLogger):
    """Print ``Step 12 | loss:1.2345 lr:0.0001 ...`` lines to stdout."""

    def log_dict(self, payload: Mapping[str, Any], step: int) -> None:
        items = " ".join(f"{k}:{_scalar(k, v):.6g}" for k, v in payload.items())
        print(f"Step {step} | {items}", file=sys.stdout, flush=True)


class TensorBoardLogger(MetricLogger):
    """Write scalars with ``torch.utils.tensorboard.SummaryWriter`` (needs ``tensorboard``).

    Args:
        log_dir: the writer's directory.
        **kwargs: passed to ``SummaryWriter``.

    Raises:
        ImportError: when the ``tensorboard`` package is not installed.
    """

    def __init__(self, log_dir: Union[str, Path], **kwargs: Any) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(
                "TensorBoardLogger needs the 'tensorboard' package: pip install tensorboard"
            ) from e
        self._writer = SummaryWriter(log_dir=str(log_dir), **kwargs)

    def log_dict(self, payload: Mapping[str, Any], step: int) -> None:
        for name, value in payload.items():
            self._writer.add_scalar(name, _scalar(name, value), global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandBLogger(MetricLogger):
    """Log to Weights & Biases (needs ``wandb``).

    Args:
        project: the W&B project.
        entity: team or user; None uses the default.
        log_dir: local directory for W&B's files.
        **kwargs: passed to ``wandb.init``.

    Raises:
        ImportError: when the ``wandb`` package is not installed.
    """

    def __init__(
        self,
        project: str = "torchtune",
        entity: Optional[str] = None,
        log_dir: Optional[Union[str, Path]] = None,
        **kwargs: Any,
    ) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ImportError("WandBLogger needs the 'wandb' package: pip install wandb") from e
        self._wandb = wandb
        self._run = wandb.init(
            project=project, entity=entity, dir=str(log_dir) if log_dir else None, **kwargs
        )

    def log_dict(self, payload: Mapping[str, Any], step: int) -> None:
        self._run.log({k: _scalar(k, v) for k, v in payload.items()}, step=step)

    def close(self) -> None:
        self._run.finish()


__all__ = ["DiskLogger", "MetricLogger", "StdoutLogger", "TensorBoardLogger", "WandBLogger"]
