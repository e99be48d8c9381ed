# Copyright (c) torchtune contributors. BSD-3-Clause license.
import json
import math

import pytest
import torch

from torchtune.utils.metric_logging import DiskLogger, StdoutLogger, TensorBoardLogger, WandBLogger


def test_disk_logger_writes_one_json_object_per_call(tmp_path):
    with DiskLogger(tmp_path / "logs") as logger:
        logger.log_dict({"loss": torch.tensor(1.5), "lr": 1e-4, "tokens_per_second": 10}, step=1)
        logger.log_dict({"loss": 1.25, "lr": 2e-4, "tokens_per_second": 12.5}, step=2)
        logger.log("loss", float("nan"), step=3)
    files = list((tmp_path / "logs").glob("*.jsonl"))
    assert len(files) == 1
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert rows[0] == {"step": 1, "loss": 1.5, "lr": 1e-4, "tokens_per_second": 10}
    assert rows[1] == {"step": 2, "loss": 1.25, "lr": 2e-4, "tokens_per_second": 12.5}
    assert rows[2]["step"] == 3 and math.isnan(float(rows[2]["loss"]))


def test_disk_logger_rejects_non_scalars(tmp_path):
    logger = DiskLogger(tmp_path, filename="x.jsonl")
    with pytest.raises(ValueError, match="'loss'.*shape"):
        logger.log_dict({"loss": torch.ones(2)}, step=0)
    with pytest.raises(ValueError, match="'name'.*str"):
        logger.log_dict({"name": "abc"}, step=0)
    logger.close()


def test_stdout_logger(capsys):
    StdoutLogger().log_dict({"loss": 0.5, "lr": 3e-4}, step=7)
    assert capsys.readouterr().out.strip() == "Step 7 | loss:0.5 lr:0.0003"


def test_optional_loggers_explain_missing_packages(tmp_path):
    optional = [
        (TensorBoardLogger, "tensorboard", {"log_dir": tmp_path}),
        (WandBLogger, "wandb", {}),
    ]
    for cls, pkg, kwargs in optional:
        try:
            __import__(pkg)
        except ImportError:
            with pytest.raises(ImportError, match=f"pip install {pkg}"):
                cls(**kwargs)
