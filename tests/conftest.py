"""Test session setup.

On a machine without CUDA, TRITON_INTERPRET=1 is set before anything imports triton, so the Triton
kernels run on CPU tensors through the interpreter (Triton decides interpret mode when a kernel is
decorated; `import torch` does not import triton). The model itself still uses the fp32 reference ops
on CPU unless a test asks for kernel_impl="triton". On a GPU machine the kernels compile for the GPU.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
