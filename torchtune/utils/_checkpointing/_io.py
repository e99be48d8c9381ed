# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Safe reads and all-or-nothing writes of state dict files, plus a shape check.

Reads never run pickled code: ``.bin``/``.pth``/``.pt`` go through
``torch.load(weights_only=True, mmap=True)`` (the tensors stay backed by the file until touched),
``.safetensors`` through safetensors. Writes go to ``<name>.tmp`` next to the target and are
renamed only once every file of a checkpoint has been written, so a crash mid-save leaves each
target file either as it was or absent, never half-written. Which checkpoints are complete is
recorded apart from the files (``checkpoints.json``, see ``_index.py``).

``TORCHTUNE_TEST_WRITE_DELAY=<seconds>`` makes every staged write and rename sleep that long
afterwards: a test hook, so that a test can kill a run in the middle of a checkpoint write.
"""

import json
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Tuple, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as _safetensors_load
from safetensors.torch import save_file as _safetensors_save

_TORCH_SUFFIXES = (".bin", ".pt", ".pth")
_TEST_DELAY_ENV = "TORCHTUNE_TEST_WRITE_DELAY"


def _test_delay() -> None:
    delay = os.environ.get(_TEST_DELAY_ENV)
    if delay:
        time.sleep(float(delay))


def write_json_atomic(obj: Any, path: Union[str, Path]) -> None:
    """Write ``obj`` as JSON to ``path`` through ``<name>.tmp`` and one ``os.replace``: a
    reader sees the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def safe_torch_load(path: Union[str, Path]) -> Any:
    """``torch.load`` that only accepts tensors and plain containers (no pickled code).

    Args:
        path: a file written by ``torch.save``.

    Returns:
        The loaded object, tensors on CPU (memory-mapped when the file format allows).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file carries anything but tensors/containers/primitives (e.g. a
            custom class or a ``__reduce__`` that would run code), or is not a torch file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"Refusing to load {path}: it holds objects other than tensors and plain containers "
            f"(weights_only=True rejected it). Only tensors are loaded from checkpoints; "
            f"details: {e}"
        ) from e
    except RuntimeError as e:
        # Files from torch < 1.6 (legacy format) cannot be memory-mapped: read them plainly.
        if "mmap" not in str(e):
            raise ValueError(f"Could not read {path} as a torch checkpoint: {e}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"Refusing to load {path}: weights_only=True rejected it: {e}") from e


def load_state_dict_file(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Read one ``.safetensors`` or ``.bin``/``.pt``/``.pth`` state dict file.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: on an unknown suffix, unsafe or corrupt content, or a non-dict payload.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            sd = _safetensors_load(str(path), device="cpu")
        except (SafetensorError, OSError) as e:
            raise ValueError(f"Could not read {path} as safetensors: {e}") from e
    elif path.suffix in _TORCH_SUFFIXES:
        sd = safe_torch_load(path)
    else:
        raise ValueError(
            f"Unsupported checkpoint file {path}: expected .safetensors or one of {_TORCH_SUFFIXES}"
        )
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors (got {type(sd)})")
    return dict(sd)


def _write_state_dict(state_dict: Dict[str, torch.Tensor], path: Path, fmt: str) -> None:
    if fmt == ".safetensors":
        # safetensors wants contiguous tensors that own their memory.
        tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
        _safetensors_save(tensors, str(path), metadata={"format": "pt"})
    else:
        torch.save(state_dict, path)


class StagedWriter:
    """Write a checkpoint's files as ``<name>.tmp`` and rename them all at the end.

    Use as a context manager: on an exception inside the block every ``.tmp`` file is removed
    and no target is touched; on success ``commit`` renames each ``.tmp`` onto its target with
    ``os.replace`` (atomic on POSIX within one directory).
    """

    def __init__(self) -> None:
        self._staged: List[Tuple[Path, Path]] = []

    def _stage(self, target: Path, write: Callable[[Path], None]) -> None:
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        self._staged.append((tmp, target))
        write(tmp)
        _test_delay()

    def save_state_dict(self, state_dict: Dict[str, torch.Tensor], target: Path) -> None:
        """Stage a state dict file; its suffix picks safetensors or ``torch.save``."""
        fmt = Path(target).suffix
        if fmt != ".safetensors" and fmt not in _TORCH_SUFFIXES:
            raise ValueError(f"Unsupported checkpoint file name {target}")
        self._stage(target, lambda tmp: _write_state_dict(state_dict, tmp, fmt))

    def save_object(self, obj: Any, target: Path) -> None:
        """Stage a ``torch.save`` of ``obj`` (e.g. recipe state)."""
        self._stage(target, lambda tmp: torch.save(obj, tmp))

    def write_text(self, text: str, target: Path) -> None:
        self._stage(target, lambda tmp: tmp.write_text(text))

    def copy_file(self, source: Path, target: Path) -> None:
        self._stage(target, lambda tmp: shutil.copyfile(source, tmp))

    def commit(self) -> None:
        for tmp, target in self._staged:
            os.replace(tmp, target)
            _test_delay()
        self._staged = []

    def abort(self) -> None:
        for tmp, _ in self._staged:
            tmp.unlink(missing_ok=True)
        self._staged = []

    def __enter__(self) -> "StagedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def validate_state_dict_shapes(
    expected: Mapping[str, Union[torch.Tensor, torch.Size, Tuple[int, ...]]],
    actual: Mapping[str, torch.Tensor],
    source: str = "checkpoint",
) -> None:
    """Check that ``actual`` has exactly ``expected``'s keys with the same shapes.

    Call it with ``model.state_dict()`` before ``model.load_state_dict(ckpt["model"])`` to get
    an error that names the key and both shapes (e.g. a 13B checkpoint for a 7B model).

    Args:
        expected: key -> tensor or shape (what the model wants).
        actual: key -> tensor (what the checkpoint holds).
        source: how to name ``actual`` in the error (e.g. a file name).

    Raises:
        ValueError: listing missing keys, unexpected keys and every shape mismatch.
    """
    problems = []
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    for key in expected:
        if key not in actual:
            continue
        want = expected[key]
        want = tuple(want.shape) if isinstance(want, torch.Tensor) else tuple(want)
        got = tuple(actual[key].shape)
        if want != got:
            problems.append(f"'{key}' has shape {got} in the {source} but the model expects {want}")
    if problems:
        raise ValueError(f"The {source} does not fit the model: " + "; ".join(problems))
