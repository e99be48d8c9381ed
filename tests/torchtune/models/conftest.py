# Copyright (c) torchtune contributors. BSD-3-Clause license.
import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared, oversubscribed CPU
    # OpenMP barriers make them 10-100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
