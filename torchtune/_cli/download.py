# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""``tune download``: fetch a model repository from the Hugging Face Hub."""

import argparse
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Type

import huggingface_hub
from huggingface_hub import errors as hf_errors

from torchtune._cli._names import CLIError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tune download",
        usage="tune download [<repo-id>] --repo-id <repo-id> --output-dir DIR "
        "[--hf-token TOKEN] [--ignore-patterns GLOB]",
        description=(
            "Download every file of a Hugging Face Hub model repository into DIR. Gated models "
            "(such as meta-llama/Llama-2-7b-hf) need an access request on the Hub and a token, "
            "given with --hf-token or the HF_TOKEN environment variable."
        ),
        epilog="example:\n  tune download --repo-id meta-llama/Llama-2-7b-hf --output-dir /tmp/Llama-2-7b-hf "
        "--ignore-patterns '*.safetensors'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "repo_id", nargs="?", default=None, metavar="repo-id", help="e.g. meta-llama/Llama-2-7b-hf"
    )
    parser.add_argument(
        "--repo-id",
        dest="repo_id_option",
        default=None,
        metavar="REPO_ID",
        help="same as the positional repo-id",
    )
    parser.add_argument(
        "--output-dir",
        required=True,
        type=Path,
        help="folder to download into (created if missing)",
    )
    parser.add_argument(
        "--hf-token", default=None, metavar="TOKEN", help="Hugging Face token (default: $HF_TOKEN)"
    )
    parser.add_argument(
        "--ignore-patterns",
        action="append",
        default=None,
        metavar="GLOB",
        help="skip files matching this glob, e.g. '*.safetensors'; may be repeated",
    )
    return parser


def _network_errors() -> Tuple[Type[BaseException], ...]:
    kinds: List[Type[BaseException]] = [
        hf_errors.LocalEntryNotFoundError,
        hf_errors.OfflineModeIsEnabled,
        ConnectionError,
        TimeoutError,
    ]
    # The Hub client's HTTP library differs between huggingface_hub versions.
    for module, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests.exceptions", ("ConnectionError", "Timeout")),
    ):
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        kinds.extend(getattr(mod, n) for n in names if hasattr(mod, n))
    return tuple(kinds)


def _explain(error: BaseException, repo_id: str, output_dir: Path, has_token: bool) -> str:
    token_state = (
        "a token was given" if has_token else "no token was given (no --hf-token and no HF_TOKEN)"
    )
    if isinstance(error, hf_errors.GatedRepoError):
        return (
            f"'{repo_id}' is a gated repository and {token_state}, or that token's account has "
            "no access yet. Request access on the model's page on the Hugging Face Hub, wait "
            "until it is granted, then pass a read token of that same account with --hf-token "
            "or set HF_TOKEN."
        )
    if isinstance(error, hf_errors.RepositoryNotFoundError):
        return (
            f"repository '{repo_id}' was not found, or it is private and {token_state} that can "
            "see it. Check the repo id (owner/name, e.g. meta-llama/Llama-2-7b-hf); for a private "
            "repository pass a valid token with --hf-token or set HF_TOKEN."
        )
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, hf_errors.HfHubHTTPError) and status in (401, 403):
        return (
            f"the Hugging Face Hub refused the request for '{repo_id}' (HTTP {status}): "
            f"{token_state}, and it was not accepted. Create a read token in your Hub account "
            "settings and pass it with --hf-token or set HF_TOKEN."
        )
    if isinstance(error, _network_errors()):
        return (
            f"could not reach the Hugging Face Hub to download '{repo_id}' and no complete copy "
            "is cached. Check the network connection and any proxy settings, make sure "
            "HF_HUB_OFFLINE is not set, then run the command again."
        )
    if isinstance(error, hf_errors.HfHubHTTPError):
        return (
            f"the Hugging Face Hub answered HTTP {status} for '{repo_id}'. Check the repo id "
            "and try again later."
        )
    if isinstance(error, OSError):
        return (
            f"could not write the files of '{repo_id}' to {output_dir}: {error.strerror or error}. "
            "Check that the folder is writable and the disk has room."
        )
    return f"downloading '{repo_id}' failed: {type(error).__name__}: {error}"


# The download line every packaged config's header comment carries.
_CONFIG_DOWNLOAD = re.compile(r"^#\s*tune download (\S+) --output-dir (\S+)(.*)$", re.M)


def known_models() -> Dict[str, Tuple[str, str]]:
    """Folder name -> (Hub repo id, extra options), from the packaged configs' download lines,
    e.g. ``"Llama-2-7b-hf" -> ("meta-llama/Llama-2-7b-hf", "")``."""
    from torchtune import _recipe_registry as registry

    table: Dict[str, Tuple[str, str]] = {}
    for name in registry.config_names():
        path = registry.get_config(name).file_path
        if not path.is_file():
            continue
        for repo, folder, rest in _CONFIG_DOWNLOAD.findall(path.read_text()):
            table.setdefault(Path(folder).name, (repo, rest.rstrip()))
    return table


def download_command(folder: Path) -> str:
    """The ``tune download`` command that fetches a model into ``folder``.

    The repo id is the packaged configs' for a folder of that name (``/data/Llama-2-7b-hf`` ->
    ``meta-llama/Llama-2-7b-hf``), else a placeholder ``<hub-id>``.
    """
    repo, rest = known_models().get(Path(folder).name, ("<hub-id>", ""))
    return f"tune download {repo} --output-dir {shlex.quote(str(folder))}{rest}"


def _scrub(text: str, token: Optional[str]) -> str:
    return text.replace(token, "<hf-token>") if token else text


def main(argv: List[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repo_id and args.repo_id_option and args.repo_id != args.repo_id_option:
        parser.error(
            "give the repo id once: positionally or with --repo-id, not two different ones"
        )
    repo_id = args.repo_id or args.repo_id_option
    if not repo_id:
        parser.error(
            "the following arguments are required: repo-id (positionally or with --repo-id)"
        )
    token = args.hf_token or os.environ.get("HF_TOKEN") or None
    try:
        path = huggingface_hub.snapshot_download(
            repo_id=repo_id,
            local_dir=str(args.output_dir),
            token=token,
            ignore_patterns=args.ignore_patterns,
        )
    except Exception as e:  # noqa: BLE001 - every failure becomes one paragraph, no traceback
        raise CLIError(
            _scrub(_explain(e, repo_id, args.output_dir, token is not None), token), code=1
        ) from None
    print(f"Downloaded {repo_id} to {path}", file=sys.stdout)
    return 0
