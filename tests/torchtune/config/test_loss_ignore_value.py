# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The loss has no ``ignore_index`` setting: ``CROSS_ENTROPY_IGNORE_IDX`` is the one ignore value,
so ``loss.ignore_index=-1`` (which used to validate and then train on prompt tokens) is refused."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

import torchtune
from torchtune.config import ConfigError, find_problems, load_config

LOSSES = ["torchtune.training.LinearCrossEntropyLoss", "torchtune.training.ChunkedCrossEntropyLoss"]
# The configs whose loss is a token cross-entropy (the preference losses take no ignore value).
CONFIGS = sorted(
    p
    for p in (Path(torchtune.__file__).parent / "recipes" / "configs").rglob("*.yaml")
    if OmegaConf.load(p).get("loss", {}).get("_component_") in LOSSES
)


def test_the_shipped_training_configs_have_a_loss():
    assert len(CONFIGS) >= 4  # the four training recipes' configs at least


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.parent.name + "/" + p.name)
def test_ignore_index_override_is_refused_naming_the_key(path):
    load_config(path, ["loss.num_chunks=2"])  # the loss's real argument still binds
    with pytest.raises(ConfigError) as info:
        load_config(path, ["loss.ignore_index=-1"])
    assert [p.key for p in info.value.problems] == ["loss.ignore_index"]
    assert "'ignore_index' is not an argument" in str(info.value)


@pytest.mark.parametrize("component", LOSSES)
def test_ignore_index_in_a_config_file_is_refused(component):
    cfg = OmegaConf.create({"loss": {"_component_": component, "ignore_index": -100}})
    problems = find_problems(cfg)
    assert [p.key for p in problems] == ["loss.ignore_index"]
    assert find_problems(OmegaConf.create({"loss": {"_component_": component}})) == []
