# Copyright (c) torchtune contributors. BSD-3-Clause license.
import os

import pytest
import torch

# Tiny test models gain nothing from intra-op threads, and on a small shared CPU the OpenMP
# barriers make them 10-100x slower. Subprocesses (recipes run through `tune`) inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
