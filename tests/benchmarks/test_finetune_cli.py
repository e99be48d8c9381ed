# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The benchmark script end to end on the tiny shape (numbers meaningless, plumbing real)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).parents[2]


@pytest.mark.slow
def test_finetune_benchmark_writes_report_with_process_lever(tmp_path):
    out = tmp_path / "tiny"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.finetune",
        "--shape",
        "tiny",
        "--methods",
        "full",
        "--rounds",
        "1",
        "--batches-per-window",
        "1",
        "--levers",
        "cpu_heap",
        "--out",
        str(out),
    ]
    subprocess.run(cmd, cwd=_ROOT, check=True, capture_output=True, timeout=600)
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["args"]["cpu_heap"] == "retain"
    (res,) = report["results"]
    assert res["levers_default"]["cpu_heap"] == "retain"
    assert res["ratios"]["tok_s_real"] > 0 and res["ratios"]["peak_memory"] > 0
    (row,) = res["levers"]
    assert row["variant"] == {"cpu_heap": "default"}
    assert row["speed_ratio_variant_over_default"] > 0
    assert row["memory_ratio_variant_over_default"] > 0
    assert "cpu_heap" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_finetune_benchmark_bf16_isolated_sides(tmp_path):
    # The GPU command's path (bf16, each side in its own process) run on CPU at `tiny`, so a
    # GPU lease is not spent finding plumbing bugs.
    out = tmp_path / "tiny_bf16"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.finetune",
        "--shape",
        "tiny",
        "--methods",
        "lora",
        "--dtype",
        "bf16",
        "--isolate",
        "--rounds",
        "1",
        "--batches-per-window",
        "1",
        "--skip-memory",
        "--out",
        str(out),
    ]
    subprocess.run(cmd, cwd=_ROOT, check=True, capture_output=True, timeout=600)
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["args"]["dtype"] == "bf16" and report["args"]["isolate"]
    (res,) = report["results"]
    assert res["method"] == "lora"
    assert res["ratios"]["tok_s_real"] > 0
