# Copyright (c) torchtune contributors. BSD-3-Clause license.
from torchtune.models._hf_config import from_hf_config

__all__ = ["from_hf_config"]
