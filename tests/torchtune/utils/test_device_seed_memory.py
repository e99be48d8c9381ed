# Copyright (c) torchtune contributors. BSD-3-Clause license.
import os
import platform
import random
import resource
import subprocess
import sys

import pytest
import torch

from torchtune.utils import (
    get_device,
    get_dtype,
    get_memory_stats,
    retain_freed_cpu_memory,
    set_default_dtype,
    set_seed,
)


def test_get_device():
    assert get_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="Unknown device 'gpu0'"):
        get_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            get_device("cuda")
        assert get_device(None) == torch.device("cpu")


def test_get_dtype():
    assert get_dtype("fp32", "cpu") == torch.float32
    assert get_dtype("bf16", "cpu") == torch.bfloat16
    assert get_dtype(None) == torch.float32
    with pytest.raises(ValueError, match="fp16 training needs loss scaling"):
        get_dtype("fp16", "cpu")
    with pytest.raises(ValueError, match="Unknown dtype 'int8'"):
        get_dtype("int8", "cpu")


def test_get_dtype_refuses_bf16_on_old_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(ValueError, match="'Tesla V100' does not support bf16"):
        get_dtype("bf16", torch.device("cuda", 0))


def test_set_default_dtype_restores():
    with set_default_dtype(torch.bfloat16):
        assert torch.nn.Linear(2, 2).weight.dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32


def test_set_seed_reproduces_streams():
    assert set_seed(123) == 123
    a = (random.random(), torch.rand(3))
    set_seed(123)
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0]
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    assert 0 <= set_seed(None) < 2**32
    with pytest.raises(ValueError, match="seed must be in"):
        set_seed(-1)


def test_memory_stats_cpu_is_peak_rss():
    stats = get_memory_stats("cpu")
    expected = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1024**3
    assert stats["peak_memory_gib"] == pytest.approx(expected, rel=0.05)


@pytest.mark.gpu
def test_memory_stats_cuda_tracks_allocations():
    torch.cuda.reset_peak_memory_stats()
    x = torch.empty(256 * 1024**2, dtype=torch.uint8, device="cuda")  # 0.25 GiB
    stats = get_memory_stats("cuda")
    assert stats["peak_memory_gib"] >= 0.25
    assert stats["peak_memory_reserved_gib"] >= stats["peak_memory_gib"]
    del x


_FREE_SCRIPT = """
import sys
import torch
from torchtune.utils import retain_freed_cpu_memory
def rss_kib():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1])
if sys.argv[1] == "retain":
    assert retain_freed_cpu_memory()
x = torch.empty(16 * 2**20).fill_(1.0)  # a 64 MiB activation, written
before = rss_kib()
del x
print(before - rss_kib())
"""


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt"
)
def test_retain_freed_cpu_memory_keeps_freed_blocks_mapped():
    # Each setting in a fresh process: it is process-wide and cannot be undone.
    def rss_drop_kib(mode):
        out = subprocess.run(
            [sys.executable, "-c", _FREE_SCRIPT, mode],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        return int(out.stdout.split()[-1])

    block_kib = 64 * 1024
    # By default glibc unmaps the block on free (the next step faults it in again, page by
    # page); retained, it stays mapped in the heap for the next allocation.
    assert rss_drop_kib("default") > 0.9 * block_kib
    assert abs(rss_drop_kib("retain")) < 0.02 * block_kib


def test_retain_freed_cpu_memory_is_a_no_op_off_glibc(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert retain_freed_cpu_memory() is False
