# Copyright (c) torchtune contributors. BSD-3-Clause license.

# The one label value that is not scored (torch.nn.CrossEntropyLoss's default ignore_index).
# Datasets, packing, collate and the losses all use it; it is deliberately not a setting:
# a loss told another value would score the prompt tokens the datasets mark with this one.
CROSS_ENTROPY_IGNORE_IDX = -100
