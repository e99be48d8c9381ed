# Copyright (c) torchtune contributors. BSD-3-Clause license.
import difflib
from dataclasses import dataclass
from typing import Iterable, List, Optional


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a config: the dotted ``key`` path and what is wrong there."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


class ConfigError(ValueError):
    """A config (or its overrides) is wrong. ``problems`` lists every problem found."""

    def __init__(self, problems: List[ConfigProblem], source: Optional[str] = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        if len(self.problems) == 1:
            text = f"config error{where}: {self.problems[0]}"
        else:
            lines = "\n".join(f"  {p}" for p in self.problems)
            text = f"{len(self.problems)} config errors{where}:\n{lines}"
        super().__init__(text)


class InstantiationError(ConfigError):
    """A ``_component_`` node could not be imported, bound or built."""


def nearest(word: str, candidates: Iterable[str]) -> Optional[str]:
    """The candidate closest to ``word`` (difflib ratio >= 0.6), or None."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(word: str, candidates: Iterable[str], prefix: str = "") -> str:
    """``"; did you mean 'x'?"`` for the nearest candidate, or ``""`` when none is close."""
    match = nearest(word, candidates)
    return f"; did you mean '{prefix}{match}'?" if match else ""


# Set on an exception (see ``for_argument`` and ``instantiate``) so that the report at the
# top of a run can name the config key; the exception keeps its type.
ARGUMENT_ATTR = "torchtune_argument"
KEY_ATTR = "torchtune_config_key"


def for_argument(error: BaseException, name: str) -> BaseException:
    """Mark ``error`` as caused by the argument ``name`` of the component raising it.

    ``instantiate`` then names the full config key, e.g. ``dataset.data_files`` for
    ``raise for_argument(FileNotFoundError(...), "data_files")`` inside a dataset builder.

    Returns:
        ``error`` itself, to be raised.
    """
    setattr(error, ARGUMENT_ATTR, name)
    return error
