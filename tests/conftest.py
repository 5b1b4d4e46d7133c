"""Test setup: without a GPU, Triton kernels run under the Triton interpreter on the CPU.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is created, so it is
set here, before the kernels are imported. On a GPU machine the same tests run on CUDA.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


def pytest_collection_modifyitems(config, items):
    """GPU-only tests fail loudly when asked for on a GPU machine, and are skipped on CPU CI."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
