"""Test tiers.

Default run (no GPU): reference, C++ CPU ops, Triton kernels in the interpreter (set here,
before anything imports triton), the nvcc compile check, packaging. Tests marked `cuda` skip
themselves without a GPU and, on a GPU machine (`pytest -m cuda`), run the same comparisons on
the device at real sizes.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton decides interpreter-or-compiler when a kernel is decorated, so this must be set
    # before seqkern._triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(
        reason="needs a CUDA GPU (the cuda tier runs in benchmarks/gpu_check.sh)"
    )
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
