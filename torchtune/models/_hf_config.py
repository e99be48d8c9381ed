# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""A model from an HF ``config.json``: the family its ``model_type`` names, built to its sizes."""

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from torchtune.models._families import family_for_hf_model_type
from torchtune.modules import TransformerDecoder


def _read_config(config: Union[str, Path, Mapping[str, Any]]) -> Tuple[Dict[str, Any], str]:
    """``(parsed config, where it came from)`` for error messages."""
    if isinstance(config, Mapping):
        return dict(config), "the config dict"
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"config.json not found: {path} is not a file")
    try:
        parsed = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(parsed, dict):
        raise ValueError(f"{path} holds a {type(parsed).__name__}, not a JSON object")
    return parsed, str(path)


def from_hf_config(
    config: Union[str, Path, Mapping[str, Any]],
    *,
    max_seq_len: Optional[int] = None,
    lora_attn_modules: Optional[List[str]] = None,
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: Optional[int] = None,
    lora_alpha: Optional[float] = None,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    quantize_double: bool = True,
) -> TransformerDecoder:
    """The model an HF ``config.json`` describes, with LoRA adapters when any LoRA argument is
    given. From YAML: ``model: {_component_: torchtune.models.from_hf_config, config: <dir>}``.

    Args:
        config: a ``config.json`` path, the folder holding it, or its parsed contents.
        max_seq_len: longest sequence (RoPE table, KV cache); the config's
            ``max_position_embeddings`` when None.
        lora_attn_modules: attention projections to adapt (``q_proj``, ``k_proj``,
            ``v_proj``, ``output_proj``).
        apply_lora_to_mlp: also adapt the MLP projections.
        apply_lora_to_output: also adapt the output projection.
        lora_rank: adapter rank (required for LoRA).
        lora_alpha: adapter alpha (required for LoRA).
        lora_dropout: dropout on the adapters' input.
        use_dora: DoRA adapters (a learned magnitude per output feature).
        quantize_base: QLoRA: the decoder layers' frozen linear weights in NF4.
        quantize_double: with ``quantize_base``, quantize the NF4 block scales too.

    Returns:
        A :class:`TransformerDecoder` with PyTorch's default init (load the checkpoint next).

    Raises:
        FileNotFoundError: if there is no ``config.json`` at ``config``.
        ValueError: on bad JSON (naming the file), a missing or unknown ``model_type``, a
            setting the family does not implement, or LoRA arguments without
            ``lora_rank`` / ``lora_alpha``, or ``use_dora`` / ``quantize_base`` without LoRA.
    """
    cfg, where = _read_config(config)
    if not cfg.get("model_type"):
        raise ValueError(f"{where} has no 'model_type'; got keys {sorted(cfg)}")
    try:
        family = family_for_hf_model_type(cfg["model_type"])
        kwargs = family.hf_config_to_builder_kwargs(cfg)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    if max_seq_len is not None:
        kwargs["max_seq_len"] = int(max_seq_len)
    lora = bool(lora_attn_modules) or apply_lora_to_mlp or apply_lora_to_output
    # Passed only when set, so a family's LoRA builder without them still builds plain LoRA.
    variants = {
        k: v
        for k, v, default in (
            ("use_dora", use_dora, False),
            ("quantize_base", quantize_base, False),
            ("quantize_double", quantize_double, True),
        )
        if bool(v) != default
    }
    if not lora:
        if {"use_dora", "quantize_base"} & set(variants):
            raise ValueError(
                f"use_dora={use_dora} / quantize_base={quantize_base} need LoRA adapters: set "
                "lora_attn_modules, apply_lora_to_mlp or apply_lora_to_output"
            )
        if lora_rank is not None or lora_alpha is not None:
            raise ValueError(
                f"lora_rank={lora_rank} / lora_alpha={lora_alpha} given but nothing to adapt: "
                "set lora_attn_modules, apply_lora_to_mlp or apply_lora_to_output"
            )
        return family.builder(**kwargs)
    if lora_rank is None or lora_alpha is None:
        raise ValueError(
            f"LoRA needs lora_rank and lora_alpha; got lora_rank={lora_rank}, "
            f"lora_alpha={lora_alpha}"
        )
    return family.lora_builder(
        list(lora_attn_modules or []),
        apply_lora_to_mlp,
        apply_lora_to_output,
        **kwargs,
        lora_rank=int(lora_rank),
        lora_alpha=float(lora_alpha),
        lora_dropout=float(lora_dropout),
        **{k: bool(v) for k, v in variants.items()},
    )
