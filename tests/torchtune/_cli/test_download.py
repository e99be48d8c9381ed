# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``tune download``; only ``huggingface_hub.snapshot_download`` (the network edge) is mocked."""

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import errors as hf_errors

from torchtune._cli.tune import main

TOKEN = "hf_NotARealTokenButSecret123"
REPO = "meta-llama/Llama-2-7b-hf"


def _response(status: int) -> httpx2.Response:
    return httpx2.Response(
        status, request=httpx2.Request("GET", f"https://hub.invalid/api/models/{REPO}")
    )


@pytest.fixture
def hub(monkeypatch):
    """Replace snapshot_download; ``hub.error`` is raised when set, calls are recorded."""

    class Hub:
        error = None
        calls = []

    def fake_snapshot_download(**kwargs):
        Hub.calls.append(kwargs)
        if Hub.error is not None:
            raise Hub.error
        return kwargs["local_dir"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return Hub


def test_download_passes_arguments(hub, tmp_path, capsys):
    out = tmp_path / "model"
    argv = [
        "download",
        "--repo-id",
        REPO,
        "--output-dir",
        str(out),
        "--hf-token",
        TOKEN,
        "--ignore-patterns",
        "*.safetensors",
        "--ignore-patterns",
        "*.bin",
    ]
    assert main(argv) == 0
    (call,) = hub.calls
    assert call == {
        "repo_id": REPO,
        "local_dir": str(out),
        "token": TOKEN,
        "ignore_patterns": ["*.safetensors", "*.bin"],
    }
    captured = capsys.readouterr()
    assert f"Downloaded {REPO} to {out}" in captured.out
    assert TOKEN not in captured.out + captured.err


def test_positional_repo_id_and_token_from_env(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["download", REPO, "--output-dir", str(tmp_path)]) == 0
    assert hub.calls[0]["repo_id"] == REPO and hub.calls[0]["token"] == TOKEN
    assert hub.calls[0]["ignore_patterns"] is None
    assert main(["download", REPO, "--output-dir", str(tmp_path), "--hf-token", "hf_flagwins"]) == 0
    assert hub.calls[1]["token"] == "hf_flagwins"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["download", "--output-dir", "x"], "required: repo-id"),
        (["download", "a/b", "--repo-id", "c/d", "--output-dir", "x"], "give the repo id once"),
        (["download", "a/b"], "required: --output-dir"),
    ],
)
def test_argument_errors(hub, argv, message, capsys):
    assert main([*argv, "--hf-token", TOKEN]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert TOKEN not in captured.out + captured.err
    assert hub.calls == []


ERRORS = [
    (
        lambda: hf_errors.GatedRepoError("Access to model is restricted.", response=_response(403)),
        ["gated repository", "Request access", "HF_TOKEN"],
    ),
    (
        lambda: hf_errors.RepositoryNotFoundError("Repository Not Found", response=_response(404)),
        ["was not found, or it is private", "--hf-token", "HF_TOKEN"],
    ),
    (
        lambda: hf_errors.HfHubHTTPError("Invalid credentials", response=_response(401)),
        ["refused the request", "HTTP 401", "read token", "HF_TOKEN"],
    ),
    (
        lambda: hf_errors.LocalEntryNotFoundError(
            "Cannot find the requested files in the disk cache"
        ),
        ["could not reach the Hugging Face Hub", "network"],
    ),
    (
        lambda: httpx2.ConnectError("[Errno -3] Temporary failure in name resolution"),
        ["could not reach the Hugging Face Hub", "network"],
    ),
    (
        lambda: hf_errors.HfHubHTTPError("Server error", response=_response(503)),
        ["answered HTTP 503", "try again later"],
    ),
    (
        lambda: OSError(28, "No space left on device"),
        ["could not write", "No space left on device"],
    ),
    (
        lambda: RuntimeError(f"unexpected header Authorization: Bearer {TOKEN}"),
        ["downloading 'meta-llama/Llama-2-7b-hf' failed: RuntimeError", "<hf-token>"],
    ),
]


@pytest.mark.parametrize("make_error, phrases", ERRORS)
@pytest.mark.parametrize("token_source", ["flag", "env"])
def test_failures_are_one_paragraph_without_traceback_or_token(
    hub, tmp_path, monkeypatch, capsys, make_error, phrases, token_source
):
    hub.error = make_error()
    argv = ["download", "--repo-id", REPO, "--output-dir", str(tmp_path)]
    if token_source == "flag":
        argv += ["--hf-token", TOKEN]
    else:
        monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert err.startswith("tune: error: ") and err.count("\n") == 1  # one paragraph
    assert "Traceback" not in err
    assert TOKEN not in err
    for phrase in phrases:
        assert phrase in err, (phrase, err)


def test_missing_token_is_named_in_gated_message(hub, tmp_path, capsys):
    hub.error = hf_errors.GatedRepoError("restricted", response=_response(401))
    assert main(["download", REPO, "--output-dir", str(tmp_path)]) == 1
    assert "no token was given" in capsys.readouterr().err
    assert hub.calls[0]["token"] is None
