# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Custom ``${...}`` interpolations available in every torchtune config."""

from pathlib import Path

from omegaconf import OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def package_path(relative: str) -> str:
    """``${pkg:assets/tiny/tokenizer.model}``: a path inside the installed torchtune package,
    so packaged configs find bundled files from any working directory and from a
    non-editable install.

    Raises:
        ValueError: if ``relative`` is empty, absolute or leaves the package.
    """
    rel = Path(str(relative))
    if not str(relative) or rel.is_absolute() or ".." in rel.parts:
        raise ValueError(
            f"${{pkg:...}} takes a path relative to the torchtune package, got {relative!r}"
        )
    return str(PACKAGE_DIR / rel)


def register_resolvers() -> None:
    if OmegaConf.has_resolver("pkg"):
        return
    # omegaconf 2.4 renamed register_new_resolver; older releases only have the old name.
    register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
    register("pkg", package_path)
