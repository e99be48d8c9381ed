# Copyright (c) torchtune contributors. BSD-3-Clause license.

# Label value ignored by torch.nn.CrossEntropyLoss (its default ignore_index).
CROSS_ENTROPY_IGNORE_IDX = -100
