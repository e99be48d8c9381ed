# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""How a run ends on a bad input: one paragraph naming the config key, exit status 1.

What counts as a bad input: a ``ConfigError``; a missing, unreadable or misplaced file
(``FileNotFoundError``, ``PermissionError``, ``IsADirectoryError``, ...); a ``ValueError``
raised on purpose (a ``raise`` statement) by torchtune or by a component built from the config;
and a checkpoint whose shapes or keys do not fit the model (torch's ``load_state_dict`` error).
Anything else is a bug and keeps its traceback, as does everything with ``TUNE_DEBUG=1``.

Under torchrun, ``tune`` names a folder in ``TUNE_ERROR_DIR``: each failing worker writes its
paragraph there instead of printing it, and ``tune`` prints the first failing rank's once.
"""

import os
import re
import sys
import traceback
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from torchtune.config._errors import KEY_ATTR, ConfigError

DEBUG_ENV = "TUNE_DEBUG"
ERROR_DIR_ENV = "TUNE_ERROR_DIR"
DEBUG_HINT = "(TUNE_DEBUG=1 or tune --debug shows the traceback.)"

_FILE_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])
_SIZE_MISMATCH = re.compile(
    r"size mismatch for ([^:\s]+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from "
    r"checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)"
)
_KEY_LIST = r"key\(s\) in state_dict: (.*?)\.\s*$"


def debug_enabled() -> bool:
    """Whether ``TUNE_DEBUG`` asks for tracebacks (any value but empty, 0 or false)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def user_message(
    error: BaseException, cfg: Optional[DictConfig] = None, recipe_file: Optional[str] = None
) -> Optional[str]:
    """The one-paragraph message for a bad input, or None when ``error`` looks like a bug.

    Args:
        error: what the run raised.
        cfg: the run's config, to show the value of the key the error names.
        recipe_file: the recipe's ``.py``; its ``raise ValueError`` counts as torchtune's.
    """
    if isinstance(error, ConfigError):
        return str(error)
    key = getattr(error, KEY_ATTR, None)
    if isinstance(error, _FILE_ERRORS) or (
        isinstance(error, ValueError)
        and _raised_on_purpose(error)
        and (key is not None or _raised_in(error, recipe_file))
    ):
        return _paragraph(_with_key(str(error) or type(error).__name__, key, cfg))
    text = _state_dict_message(error, cfg)
    return None if text is None else _paragraph(text)


def report(
    error: BaseException,
    prog: str,
    cfg: Optional[DictConfig] = None,
    recipe_file: Optional[str] = None,
) -> bool:
    """Print ``error`` as ``<prog>: error: <paragraph>`` if it is a bad input.

    Under a ``tune`` torchrun launch the paragraph goes to ``$TUNE_ERROR_DIR/rank_<RANK>.txt``
    instead, for ``tune`` to print once.

    Returns:
        True if reported (the caller exits with status 1), False for a bug (re-raise it).
    """
    if debug_enabled():
        return False
    text = user_message(error, cfg, recipe_file)
    if text is None:
        return False
    if not isinstance(error, ConfigError):
        text = f"{text} {DEBUG_HINT}"
    line = f"{prog}: error: {text}"
    rank, error_dir = os.environ.get("RANK"), os.environ.get(ERROR_DIR_ENV)
    if rank is not None and error_dir:
        path = Path(error_dir) / f"rank_{rank}.txt"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(line + "\n")
        os.replace(tmp, path)  # tune reads whole messages only
        return True
    if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1":
        line = f"[rank {rank}] {line}"
    print(line, file=sys.stderr)
    return True


def _raised_on_purpose(error: BaseException) -> bool:
    # A raise statement, not an implicit ValueError of a bug (``a, b = three_things``).
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and (frames[-1].line or "").lstrip().startswith("raise")


def _raised_in(error: BaseException, recipe_file: Optional[str]) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    filename = os.path.abspath(frames[-1].filename)
    recipe = os.path.abspath(recipe_file) if recipe_file else None
    return filename.startswith(_PACKAGE_DIR + os.sep) or filename == recipe


def _with_key(text: str, key: Optional[str], cfg: Optional[DictConfig]) -> str:
    if key is None:
        return text
    value = _select(cfg, key)
    if value is None:
        return f"{key}: {text}"
    return f"{key}={value}: {text}"


def _select(cfg: Optional[DictConfig], key: str) -> Optional[str]:
    """The config's value at ``key`` as the user would type it, or None."""
    if cfg is None:
        return None
    try:
        value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
    except Exception:  # noqa: BLE001 - a key path the config cannot select, e.g. list items
        return None
    if value is None or OmegaConf.is_dict(value):
        return None
    if OmegaConf.is_list(value):
        value = OmegaConf.to_container(value, resolve=True)
    return str(value)


def _paragraph(text: str) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _key_list(text: str, kind: str) -> list:
    match = re.search(kind + " " + _KEY_LIST, text, re.M)
    return re.findall(r'"([^"]+)"', match.group(1)) if match else []


def _state_dict_message(error: BaseException, cfg: Optional[DictConfig]) -> Optional[str]:
    """torch's ``load_state_dict`` error, rewritten with the config keys that built the two."""
    text = str(error)
    if not isinstance(error, RuntimeError) or not text.startswith("Error(s) in loading state_dict"):
        return None
    sizes = _SIZE_MISMATCH.findall(text)
    missing, unexpected = _key_list(text, "Missing"), _key_list(text, "Unexpected")
    if not (sizes or missing or unexpected):
        return None
    parts = []
    if sizes:
        name, in_ckpt, in_model = sizes[0]
        more = f" (and {len(sizes) - 1} more parameters differ)" if len(sizes) > 1 else ""
        parts.append(
            f"'{name}' has shape [{in_ckpt}] in the checkpoint but [{in_model}] in the model{more}"
        )
    if missing:
        parts.append(f"the checkpoint lacks {len(missing)} of its parameters (first: {missing[0]})")
    if unexpected:
        parts.append(f"the checkpoint has {len(unexpected)} it does not (first: {unexpected[0]})")
    ckpt_dir = _select(cfg, "checkpointer.checkpoint_dir")
    model = _select(cfg, "model._component_")
    where = f"checkpointer.checkpoint_dir={ckpt_dir}" if ckpt_dir else "the checkpoint"
    built = f"model._component_={model}" if model else "the config's model"
    what = "another model size" if sizes else "another model"
    return (
        f"the checkpoint in {where} does not fit the model built by {built}: "
        f"{'; '.join(parts)}. The checkpoint is for {what}: give the model builder and sizes that "
        "match it (its config.json), or point checkpointer.checkpoint_dir at the model the "
        "config describes."
    )
