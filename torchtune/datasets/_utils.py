# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Loading and validating Hugging Face datasets."""

import importlib
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import datasets

from torchtune.config import for_argument

logger = logging.getLogger(__name__)


def load_hf_dataset(source: str, split: str, **load_dataset_kwargs: Any) -> datasets.Dataset:
    """``datasets.load_dataset(source, split=split, **load_dataset_kwargs)``, checked to be one split.

    ``source`` is a Hub id (``"tatsu-lab/alpaca"``) or a builder name such as ``"json"``,
    ``"csv"`` or ``"parquet"`` with ``data_files=...``.

    Raises:
        FileNotFoundError: naming ``data_files`` when a local file in it does not exist (before
            ``datasets`` reports it from deep inside its resolver).
        ValueError: if the result is not a single map-style split.
    """
    _check_local_files(load_dataset_kwargs.get("data_files"))
    # Called through the module so tests can patch datasets.load_dataset at the network edge.
    ds = datasets.load_dataset(source, split=split, **load_dataset_kwargs)
    if not isinstance(ds, datasets.Dataset):
        raise ValueError(
            f"load_dataset({source!r}, split={split!r}) returned {type(ds).__name__}; a single "
            "map-style split is needed (pass split='train', and no streaming=True)"
        )
    return ds


def _check_local_files(data_files: Any) -> None:
    if isinstance(data_files, dict):  # {split: files}
        for files in data_files.values():
            _check_local_files(files)
        return
    if data_files is None:
        return
    for name in [data_files] if isinstance(data_files, (str, Path)) else list(data_files):
        name = str(name)
        if "://" in name or any(c in name for c in "*?[") or Path(name).exists():
            continue  # remote, a glob (datasets resolves those), or there
        where = "" if Path(name).is_absolute() else f" (relative to {Path.cwd()})"
        raise for_argument(
            FileNotFoundError(
                f"data file {name} does not exist{where}. Give the path of an existing .json, "
                ".jsonl, .parquet or .csv file, or a Hugging Face dataset id as source."
            ),
            "data_files",
        )


# A local file given as ``source`` picks its ``datasets`` builder from the suffix.
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_source(
    source: str,
    split: str,
    data_files: Optional[Union[str, Sequence[str]]] = None,
    **load_dataset_kwargs: Any,
) -> Tuple[datasets.Dataset, str]:
    """:func:`load_hf_dataset` that also takes a local ``.json`` / ``.jsonl`` / ``.parquet``
    file as ``source``; returns the split and a label naming where it came from (for errors).
    """
    if data_files is None and Path(source).suffix.lower() in _BUILDERS:
        if not Path(source).is_file():
            raise for_argument(
                FileNotFoundError(
                    f"source {source} looks like a local file but does not exist"
                    + ("" if Path(source).is_absolute() else f" (relative to {Path.cwd()})")
                    + ". Give an existing .json, .jsonl or .parquet file, or a Hugging Face "
                    "dataset id."
                ),
                "source",
            )
        source, data_files = _BUILDERS[Path(source).suffix.lower()], source
    if data_files is not None:
        load_dataset_kwargs["data_files"] = data_files
    label = source if data_files is None else f"{source}:{data_files}"
    return load_hf_dataset(source, split, **load_dataset_kwargs), label


def validate_columns(
    ds: datasets.Dataset,
    columns: Dict[str, bool],
    source: str,
    skip_bad_rows: bool = False,
) -> Optional[List[int]]:
    """Check every row's text columns up front, so training never starts on bad data.

    Args:
        ds (datasets.Dataset): the loaded split.
        columns (Dict[str, bool]): column name -> whether it must be a non-empty string (True)
            or may also be empty / None (False).
        source (str): the dataset source, for messages.
        skip_bad_rows (bool): drop bad rows (with a warning giving their count) instead of raising.

    Returns:
        Optional[List[int]]: indices of the good rows when some were skipped, else None.

    Raises:
        ValueError: naming the column (and the row index) of the first bad value: a column
            missing from the dataset, a missing (None) or non-string value, or an empty required
            value. With ``skip_bad_rows`` it still raises for a missing column or when no row is good.
    """
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"{source}: column(s) {missing} missing from every row (row 0 onwards); the dataset "
            f"has columns {ds.column_names}. Rename them with column_map or fix the data."
        )
    bad_rows = set()
    for column, required in columns.items():
        # Whole-column access is one Arrow conversion, far faster than iterating rows.
        for i, value in enumerate(ds[column][:]):
            if value is None and not required:
                continue
            if not isinstance(value, str):
                problem = (
                    "is missing"
                    if value is None
                    else f"is of type {type(value).__name__} ({value!r}), not a string"
                )
            elif required and not value.strip():
                problem = f"is empty ({value!r})"
            else:
                continue
            if not skip_bad_rows:
                raise ValueError(
                    f"{source}: row {i}, column '{column}' {problem}. Fix the data, or pass "
                    "skip_bad_rows=True to drop such rows."
                )
            bad_rows.add(i)
    if not bad_rows:
        return None
    if len(bad_rows) == len(ds):
        raise ValueError(f"{source}: all {len(ds)} rows are bad (columns {list(columns)})")
    logger.warning(
        "%s: skipped %d of %d rows with missing, non-string or empty values (first: row %d)",
        source,
        len(bad_rows),
        len(ds),
        min(bad_rows),
    )
    return [i for i in range(len(ds)) if i not in bad_rows]


def get_component(path: str) -> Any:
    """Import ``"package.module.Name"`` and return ``Name``.

    Raises:
        ValueError: if the path cannot be imported.
    """
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"cannot import {path!r}: {e}") from e
