# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""benchmarks/compare_commits.py: ABBA order, summed-token speed ratio, peak memory ratio."""

import argparse
import subprocess
from pathlib import Path

import pytest

from benchmarks import compare_commits as C


def _result(tok_s, s_per_step, steps, peak):
    return {
        "tok_s_real": tok_s,
        "s_per_step": s_per_step,
        "steps": steps,
        "peak": {"peak_rss_gib": peak},
    }


def test_compare_alternates_abba_and_sums_tokens_over_seconds(monkeypatch):
    calls = []
    fake = {
        "old": [_result(100.0, 1.0, 2, 1.0), _result(50.0, 2.0, 2, 1.5)],
        "new": [_result(200.0, 1.0, 2, 1.2), _result(100.0, 1.0, 2, 1.1)],
    }
    trees = {"old": Path("/o"), "new": Path("/n")}

    def run_side(tree, method, rounds, argv):
        side = "old" if tree == trees["old"] else "new"
        calls.append(side)
        return fake[side][sum(c == side for c in calls) - 1]

    monkeypatch.setattr(C, "run_side", run_side)
    out = C.compare(trees, "lora", argparse.Namespace(repeats=2, rounds=1), [])
    assert calls == ["old", "new", "new", "old"]
    # old: (100*2 + 50*4) tokens / (2 + 4) s; new: (200*2 + 100*2) / (2 + 2)
    assert out["old"]["tok_s_real"] == pytest.approx(400 / 6)
    assert out["new"]["tok_s_real"] == pytest.approx(600 / 4)
    assert out["speed_new_over_old"] == pytest.approx((600 / 4) / (400 / 6))
    assert out["memory_new_over_old"] == pytest.approx(1.2 / 1.5)


@pytest.mark.slow
def test_end_to_end_at_tiny_against_head(tmp_path):
    root = Path(C.__file__).resolve().parents[1]
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    out = tmp_path / "cmp"
    report = C.main(
        ["--old", "HEAD", "--shape", "tiny", "--methods", "lora", "--repeats", "1"]
        + ["--rounds", "1", "--out", str(out)]
    )
    (result,) = report["results"]
    assert result["speed_new_over_old"] > 0 and result["memory_new_over_old"] > 0
    assert "| lora |" in (tmp_path / "cmp.md").read_text()
