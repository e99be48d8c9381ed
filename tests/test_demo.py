# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""python -m torchtune.demo: its pieces (fast) and the whole quickstart (slow)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchtune import demo

ROWS = [
    {"instruction": "Add the two numbers.", "input": "1 and 2", "output": "3"},
    {"instruction": "Reverse the order of the words: a b", "input": "", "output": "b a"},
]


def test_accuracy_is_exact_match():
    assert demo.accuracy(["3", "b a"], ROWS) == 1.0
    assert demo.accuracy([" 3 ", "a b"], ROWS) == 0.5  # surrounding spaces are ignored
    assert demo.accuracy(["3.", "ba"], ROWS) == 0.0
    with pytest.raises(ValueError, match="1 answers for 2 rows"):
        demo.accuracy(["3"], ROWS)


def test_load_rows_names_the_bad_row(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS + [{"instruction": "x", "output": "y"}]))
    with pytest.raises(ValueError, match=r"d\.json: row 2 .*instruction, input and output"):
        demo.load_rows(path)
    path.write_text("{}")
    with pytest.raises(ValueError, match="non-empty JSON list"):
        demo.load_rows(path)
    path.write_text(json.dumps(ROWS))
    assert demo.load_rows(path) == ROWS


def test_bundled_assets_are_found():
    paths = demo.asset_paths()
    assert len(demo.load_rows(paths["heldout"])) > 50
    with pytest.raises(FileNotFoundError, match="missing"):
        demo.asset_paths(Path("/nonexistent"))


def test_prompts_match_the_training_tokenization():
    """The demo prompts the model exactly as alpaca_dataset tokenizes the prompt part."""
    from torchtune.datasets import alpaca_dataset
    from torchtune.models.llama2 import llama2_tokenizer

    paths = demo.asset_paths()
    tok = llama2_tokenizer(paths["tokenizer"])
    ds = alpaca_dataset(tok, source="json", data_files=str(paths["heldout"]), train_on_input=False)
    rows = demo.load_rows(paths["heldout"])
    assert {bool(r["input"]) for r in rows} == {True, False}
    for row, sample in zip(rows, ds):
        n_prompt = sum(label == -100 for label in sample["labels"])
        prompt = tok.encode(demo.format_prompt(row), add_bos=True, add_eos=False)
        # The whole prompt is masked and is exactly what the demo (and tune generate) feed;
        # the scored tokens are the answer with no word-boundary piece in front.
        assert sample["tokens"][:n_prompt] == prompt
        assert tok.decode(sample["tokens"][n_prompt:-1]) == row["output"]
        assert tok.decode(sample["tokens"]) == demo.format_prompt(row) + row["output"]


def test_answer_matches_a_plain_greedy_loop():
    """Batched, KV-cached answers equal a one-row-at-a-time full-recompute greedy loop."""
    from torchtune.models.llama2 import llama2_tokenizer

    paths = demo.asset_paths()
    tok = llama2_tokenizer(paths["tokenizer"])
    model = demo.load_model(paths["model_dir"])
    rows = demo.load_rows(paths["heldout"])[::40][:5]
    got = demo.answer(model, tok, rows, max_new_tokens=6, batch_size=5)
    for row, text in zip(rows, got):
        ids = tok.encode(demo.format_prompt(row), add_bos=True, add_eos=False)
        new = []
        with torch.no_grad():
            for _ in range(6):
                nxt = int(model(torch.tensor([ids + new]))[0, -1].argmax())
                if nxt == tok.eos_id:
                    break
                new.append(nxt)
        assert text == tok.decode(new).split("\n")[0].strip()


def test_commands_run_the_shipped_configs(tmp_path):
    cmd = demo.finetune_command(tmp_path, max_steps=3)
    assert cmd[:6] == [
        sys.executable,
        "-m",
        "torchtune._cli.tune",
        "lora_finetune_single_device",
        "--config",
        "tiny/lora",
    ]
    assert cmd[6:] == [f"output_dir={tmp_path}", "max_steps_per_epoch=3"]
    assert demo.finetune_command(tmp_path)[6:] == [f"output_dir={tmp_path}"]
    ev = demo.eval_command(tmp_path / "ckpt", tmp_path / "task", tmp_path / "out")
    assert ev[3:6] == ["eleuther_eval", "--config", "tiny/eval"]
    assert f"tasks=[{demo.EVAL_TASK}]" in ev and f"include_path={tmp_path / 'task'}" in ev


def test_generate_command_quotes_values_the_override_parser_would_split():
    """An instruction with ': ' must reach the recipe as a string, not a YAML mapping."""
    from torchtune._recipe_registry import get_config
    from torchtune.config import load_config

    row = {
        "instruction": "Reverse the order of the words: cat sun",
        "input": 'say "hi"',
        "output": "",
    }
    cmd = demo.generate_command(Path("/ckpt"), row)
    assert cmd[3:6] == ["generate", "--config", "tiny/generate"]
    cfg = load_config(get_config("tiny/generate").file_path, cmd[6:])
    assert cfg.prompt == row["instruction"] and cfg.instruct_input == row["input"]
    assert cfg.temperature == 0 and cfg.checkpointer.checkpoint_dir == "/ckpt"


@pytest.mark.integration
def test_eval_recipe_path_scores_like_the_plain_loop(tmp_path):
    """``tune eleuther_eval`` on the demo's local task asks the same prompts, gets the same
    greedy answers and scores them the same way as the plain loop: with targets set to the
    plain loop's answers for half the rows and to something else for the rest, it says 50%."""
    pytest.importorskip("lm_eval")
    from torchtune.models.llama2 import llama2_tokenizer

    paths = demo.asset_paths()
    rows = demo.load_rows(paths["heldout"])[::50][:4]
    plain = demo.answer(
        demo.load_model(paths["model_dir"]), llama2_tokenizer(paths["tokenizer"]), rows
    )
    assert all(plain), plain
    targets = [
        dict(r, output=a if i % 2 == 0 else a + " x") for i, (r, a) in enumerate(zip(rows, plain))
    ]
    assert demo.accuracy(plain, targets) == 0.5
    assert demo.evaluate(paths["model_dir"], targets, tmp_path / "eval") == 0.5


def test_read_eval_accuracy(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "eval_results_1.json").write_text(
        json.dumps({"results": {demo.EVAL_TASK: {"exact_match,strip": 0.25}}})
    )
    assert demo.read_eval_accuracy(tmp_path) == 0.25
    with pytest.raises(FileNotFoundError, match="No eval_results"):
        demo.read_eval_accuracy(tmp_path / "none")


def test_read_losses_and_plot(tmp_path):
    log = tmp_path / "log_1_2.jsonl"
    log.write_text(
        "\n".join(json.dumps({"step": s, "loss": 3.0 / s, "lr": 1e-3}) for s in (1, 2, 3))
    )
    points = demo.read_losses(tmp_path)
    assert points == [(1, 3.0), (2, 1.5), (3, 1.0)]
    pytest.importorskip("matplotlib")
    png = demo.plot_losses(points, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="No training log"):
        demo.read_losses(tmp_path / "empty")


def test_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert demo.plot_losses([(1, 1.0)], tmp_path / "loss.png") is None
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "loss.png").exists()


def test_output_dir_is_only_ever_cleared_if_the_demo_made_it(tmp_path):
    mine = demo._fresh_dir(tmp_path / "out")
    (mine / "old.txt").write_text("stale")
    assert not (demo._fresh_dir(tmp_path / "out") / "old.txt").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match="not made by torchtune.demo"):
        demo._fresh_dir(foreign)
    assert (foreign / "keep.txt").read_text() == "precious"


@pytest.mark.slow
@pytest.mark.integration
def test_demo_end_to_end_learns_and_is_reproducible(tmp_path):
    """The README's first command, twice: accuracy rises clearly and the numbers repeat."""
    summaries = []
    for _ in range(2):
        out = tmp_path / "demo"
        proc = subprocess.run(
            [sys.executable, "-m", "torchtune.demo", "--output-dir", str(out)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "held-out accuracy" in proc.stdout
        summaries.append(json.loads((out / "summary.json").read_text()))
    s = summaries[0]
    assert s["accuracy_after"] >= s["accuracy_before"] + 0.4, s
    assert s["loss_last"] < s["loss_first"] / 2, s
    assert Path(s["checkpoint_dir"], "model.safetensors").is_file()
    for key in ("accuracy_before", "accuracy_after", "loss_first", "loss_last"):
        assert summaries[0][key] == summaries[1][key], key


def test_without_lm_eval_the_plain_loop_scores(tmp_path, monkeypatch):
    """No lm-eval installed: evaluate() falls back to the plain loop and needs no subprocess."""
    from torchtune.models.llama2 import llama2_tokenizer

    paths = demo.asset_paths()
    rows = demo.load_rows(paths["heldout"])[:2]
    plain = demo.answer(
        demo.load_model(paths["model_dir"]), llama2_tokenizer(paths["tokenizer"]), rows
    )
    targets = [dict(rows[0], output=plain[0]), dict(rows[1], output=plain[1] + " x")]
    monkeypatch.setattr(demo, "lm_eval_available", lambda: False)
    monkeypatch.setattr(demo.subprocess, "run", None)  # any subprocess call would fail
    assert demo.evaluate(paths["model_dir"], targets, tmp_path / "eval") == 0.5
