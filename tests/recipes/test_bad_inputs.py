# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Bad inputs through the real ``tune`` CLI: one paragraph naming the config key and what to
do, exit status 1, no traceback; ``--debug`` / ``TUNE_DEBUG=1`` and bugs keep the traceback;
under torchrun the reason is printed once."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import torchtune
from torchtune import _recipe_registry as registry
from torchtune._cli.download import download_command
from torchtune.config import load_config

REPO = Path(__file__).resolve().parents[2]
TUNE = str(Path(sys.executable).parent / "tune")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def _tune(*args, cwd, debug_env=None, timeout=600):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.pop("TUNE_DEBUG", None)
    if debug_env is not None:
        env["TUNE_DEBUG"] = debug_env
    return subprocess.run(
        [TUNE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _error_line(proc) -> str:
    """The one ``error:`` paragraph of a run that failed on a bad input."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def _lora(tmp_path, *overrides, **kwargs):
    return _tune(
        "lora_finetune_single_device",
        "--config",
        "tiny/lora",
        f"output_dir={tmp_path / 'out'}",
        *overrides,
        cwd=tmp_path,
        **kwargs,
    )


BAD_INPUTS = [
    pytest.param(
        ["dataset.data_files=/nope/train.json"],
        [
            "dataset.data_files=/nope/train.json: data file /nope/train.json does not exist",
            "Give the path of an existing .json",
        ],
        id="missing_data_file",
    ),
    pytest.param(
        ["dataset.column_map={instruction: prompt}"],
        ["error: dataset: ", "column(s) ['prompt'] missing", "train.json", "column_map"],
        id="wrong_column",
    ),
    pytest.param(
        ["model.embed_dim=64"],
        [
            "checkpointer.checkpoint_dir=",
            "does not fit the model built by model._component_=torchtune.models.llama2.lora_llama2",
            "[640, 128] in the checkpoint but [640, 64] in the model",
            "another model size",
        ],
        id="wrong_shape",
    ),
    pytest.param(
        ["modle.embed_dim=64"],
        ["modle: unknown key in the config; did you mean 'model'?"],
        id="unknown_key",
    ),
    pytest.param(
        ["device=cuda"],
        ["device=cuda but CUDA is not available on this machine", "set device=cpu"],
        id="no_cuda",
        marks=NO_CUDA,
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("overrides,expected", BAD_INPUTS)
def test_bad_input_is_one_paragraph(tmp_path, overrides, expected):
    line = _error_line(_lora(tmp_path, *overrides))
    assert line.startswith("lora_finetune_single_device.py: error: "), line
    for text in expected:
        assert text in line, line


@pytest.mark.slow
def test_missing_model_folder_gives_the_download_command(tmp_path):
    folder = tmp_path / "models" / "Llama-2-7b-hf"
    line = _error_line(_lora(tmp_path, f"checkpointer.checkpoint_dir={folder}"))
    assert f"checkpointer.checkpoint_dir={folder}: checkpoint_dir {folder} does not exist" in line
    assert f"tune download meta-llama/Llama-2-7b-hf --output-dir {folder}" in line


@pytest.mark.slow
@pytest.mark.parametrize("how", ["option", "env"])
def test_debug_shows_the_traceback(tmp_path, how):
    bad = "dataset.data_files=/nope/train.json"
    if how == "option":
        proc = _tune(
            "--debug", "lora_finetune_single_device", "--config", "tiny/lora", bad, cwd=tmp_path
        )
    else:
        proc = _lora(tmp_path, bad, debug_env="1")
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("FileNotFoundError: data file")


@pytest.mark.slow
def test_a_bug_keeps_its_traceback(tmp_path):
    recipe = tmp_path / "buggy.py"
    recipe.write_text(
        textwrap.dedent(
            """
            import sys
            from torchtune import config

            @config.parse
            def recipe_main(cfg):
                return cfg.epochs + "1"  # a TypeError: a bug, not a bad input

            if __name__ == "__main__":
                sys.exit(recipe_main())
            """
        )
    )
    (tmp_path / "c.yaml").write_text("epochs: 1\n")
    proc = _tune(str(recipe), "--config", str(tmp_path / "c.yaml"), cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("TypeError")


@pytest.mark.slow
@pytest.mark.parametrize(
    "override,expected",
    [
        pytest.param(
            "dataset.data_files=/nope/train.json",
            "dataset.data_files=/nope/train.json: data file /nope/train.json does not exist",
            id="missing_data_file",
        ),
        pytest.param(
            "device=cuda",
            "device=cuda but CUDA is not available",
            id="no_cuda",
            marks=NO_CUDA,
        ),
    ],
)
def test_torchrun_prints_the_reason_once(tmp_path, override, expected):
    proc = _tune(
        "--nproc_per_node",
        "2",
        "full_finetune_distributed",
        "--config",
        "tiny/full_distributed",
        f"output_dir={tmp_path / 'out'}",
        override,
        cwd=tmp_path,
    )
    line = _error_line(proc)
    assert line.startswith("full_finetune_distributed.py: error: ") and expected in line
    assert proc.stderr.count(expected) == 1, proc.stderr[-3000:]
    for dump in ("ChildFailedError", "Root Cause", "FAILED", "rank 0", "rank 1"):
        assert dump not in proc.stderr, proc.stderr[-3000:]


def test_every_packaged_model_folder_has_its_download_command():
    # The repo ids come from the configs' own `tune download` lines: a config whose
    # checkpoint_dir has none would get a placeholder.
    for name in registry.config_names():
        cfg = load_config(registry.get_config(name).file_path)
        folder = str(cfg.checkpointer.checkpoint_dir) if "checkpointer" in cfg else ""
        bundled = Path(torchtune.__file__).parent / "assets"
        if not folder or Path(folder).resolve().is_relative_to(bundled.resolve()):
            continue  # the bundled tiny model (under /tmp too when the checkout is)
        command = download_command(Path(folder))
        assert re.match(rf"tune download \S+/\S+ --output-dir {re.escape(folder)}", command), (
            name,
            command,
        )
        assert "<hub-id>" not in command
